"""Test oracle for MoBA (Mixture of Block Attention), written from the published
definition.

Source transcribed (semantics only, code written fresh):
    MoonshotAI/MoBA, ``moba/moba_naive.py``, ``moba_attn_varlen_naive``
    ("A clean version of moba implementation for educational purposes").
    The upstream file was read and checked line by line against this module.

Definition, per sequence of length T, per (query) head:

1.  Keys are cut into ``N = ceil(T / chunk_size)`` chunks, the last one possibly
    partial.  The chunk's gate key is the plain mean of its keys (upstream takes
    the mean in the key dtype and then casts it to float32).
2.  ``gate[h, s, n] = q[s, h] . mean_k[n, h]`` -- no softmax scale -- computed in
    float32 upstream.
3.  Chunk ``n`` gets gate ``-inf`` for every query ``s < (n + 1) * chunk_size``
    (i.e. for queries in chunk n or earlier) and then ``+inf`` for the queries
    that lie inside chunk ``n`` (own chunk always chosen).  Equivalently, with
    ``c(s) = s // chunk_size``:  ``n > c(s) -> -inf``, ``n == c(s) -> +inf``,
    ``n < c(s) -> raw gate``.
4.  ``vals, idx = torch.topk(gate, k=min(topk, N))``;
    ``need_attend = (gate >= vals.min(-1)) & scatter(idx)``.  (The scattered
    index mask breaks ties so that at most ``min(topk, N)`` chunks are kept.)
5.  The chunk mask is expanded to tokens (chunk n covers tokens
    ``[n*chunk_size, (n+1)*chunk_size)``), ANDed with the token causal mask
    ``j <= s``, turned into an additive 0 / -inf mask.
6.  ``logits = (q . k + mask) * (1 / sqrt(d))``, softmax over keys, ``o = p @ v``
    (upstream does this in float32).

Notes / differences between the upstream file and the brief we were given:

*   The brief's description matches the upstream file.  Details worth knowing:
    the chunk mean is taken in the *input* dtype before the float32 cast (for a
    bf16 input the mean is rounded to bf16 first); the -inf/+inf mask is applied
    by two slice assignments in a loop over chunks (equivalent to item 3); the
    additive mask is added *before* the multiplication by the softmax scale
    (equivalent, since the mask is 0 / -inf).
*   When ``topk`` exceeds the number of causally available chunks for a query,
    the top-k values contain ``-inf`` (future chunks), the threshold becomes
    ``-inf`` and ``need_attend`` upstream additionally marks some *future*
    chunks (whichever ``-inf`` entries torch.topk happened to return).  Those are
    removed again by the token causal mask, so they never affect the output.
    ``return_selection`` here reports only chunks that can actually contribute
    (``need_attend & (n <= s // chunk_size)``), which is tie-break independent.
*   Ties between *finite* gate values at the top-k boundary are broken by
    torch.topk (implementation-defined); random inputs never hit this.
*   Upstream has no GQA.  Here k/v heads are repeated with ``repeat_interleave``
    (query head h uses kv head h // G), and each *query* head makes its own
    chunk selection (no sharing across the group), exactly what upstream would
    do on pre-repeated k/v.
*   Upstream always computes in float32.  Here the attention part is computed
    in float64 when inputs are float64 (float32 otherwise).  The gate is
    computed in ``gate_dtype`` (default float32, as upstream); pass
    ``gate_dtype=None`` to compute the gate in the same precision as the rest.
*   ``topk`` must be >= 1 (upstream would crash on ``min`` of an empty top-k).
"""

from __future__ import annotations

import math

import torch

__all__ = ["moba_naive"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _moba_one_sequence(
    q: torch.Tensor,  # [T, HQ, D]
    k: torch.Tensor,  # [T, HQ, D]   (kv heads already expanded to HQ)
    v: torch.Tensor,  # [T, HQ, Dv]
    chunk_size: int,
    topk: int,
    gate_dtype: torch.dtype,
    cdt: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    T, HQ, D = q.shape
    n_chunks = math.ceil(T / chunk_size)
    dev = q.device

    # (1) mean key per chunk, taken in the input dtype (as upstream), last partial.
    means = torch.stack(
        [k[c * chunk_size: min(T, (c + 1) * chunk_size)].mean(dim=0) for c in range(n_chunks)],
        dim=0,
    )  # [N, HQ, D]

    # (2) gate logits, no scale.
    gate = torch.einsum("shd,nhd->hsn", q.to(gate_dtype), means.to(gate_dtype))  # [HQ, T, N]

    # (3) causal chunk masking: future chunks -inf, own chunk +inf.
    q_chunk = torch.arange(T, device=dev) // chunk_size  # [T]
    chunk_id = torch.arange(n_chunks, device=dev)  # [N]
    is_future = chunk_id[None, :] > q_chunk[:, None]  # [T, N]
    is_own = chunk_id[None, :] == q_chunk[:, None]  # [T, N]
    gate = gate.masked_fill(is_future[None], float("-inf"))
    gate = gate.masked_fill(is_own[None], float("inf"))

    # (4) top-k selection: value threshold AND the scattered top-k indices.
    kk = min(topk, n_chunks)
    top_vals, top_idx = torch.topk(gate, k=kk, dim=-1)
    threshold = top_vals.min(dim=-1, keepdim=True).values
    in_topk = torch.zeros_like(gate, dtype=torch.bool).scatter(-1, top_idx, True)
    need_attend = (gate >= threshold) & in_topk  # [HQ, T, N]

    # (5) expand chunk selection to tokens and AND with token causality.
    key_chunk = torch.arange(T, device=dev) // chunk_size  # [T]
    token_sel = need_attend[:, :, key_chunk]  # [HQ, T, T]
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    allowed = token_sel & causal[None]
    add_mask = torch.zeros(allowed.shape, dtype=cdt, device=dev).masked_fill(~allowed, float("-inf"))

    # (6) masked softmax attention.  Own token is always allowed, so rows are never empty.
    scale = D ** -0.5
    logits = torch.einsum("shd,thd->hst", q.to(cdt), k.to(cdt))
    logits = (logits + add_mask) * scale
    p = torch.softmax(logits, dim=-1)
    o = torch.einsum("hst,thd->shd", p, v.to(cdt))  # [T, HQ, Dv]

    effective_sel = need_attend & ~is_future[None]  # drop future chunks (masked anyway)
    return o, effective_sel


def moba_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    topk: int,
    cu_seqlens: torch.Tensor | None = None,
    return_selection: bool = False,
    gate_dtype: torch.dtype | None = torch.float32,
):
    """MoBA reference forward.

    Args:
        q: ``[B, T, HQ, D]``.
        k: ``[B, T, H, D]`` with ``HQ % H == 0``.
        v: ``[B, T, H, Dv]``.
        chunk_size: MoBA chunk (block) size.
        topk: number of chunks per query, *including* the always-selected own chunk.
        cu_seqlens: optional cumulative sequence lengths ``[N+1]`` (flash-attn
            convention); requires ``B == 1`` and each segment is an independent
            sequence (chunks restart at each segment start).
        return_selection: also return a bool tensor ``[B, HQ, T, num_chunks]``,
            True where query (b, t) on query head h attends to chunk n.  Only
            chunks with ``n <= t // chunk_size`` can be True.  With ``cu_seqlens``
            the chunk index is local to the segment and ``num_chunks`` is the
            maximum over segments (padding is False).
        gate_dtype: dtype for the gate (routing) scores; default float32 like
            upstream.  ``None`` -> same as the compute dtype (float64 for
            float64 inputs, else float32).

    Returns:
        ``o`` of shape ``[B, T, HQ, Dv]`` in ``q.dtype``, and optionally the
        selection tensor.
    """
    if topk < 1:
        raise ValueError("topk must be >= 1")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    B, T, HQ, D = q.shape
    H = k.shape[2]
    if HQ % H != 0:
        raise ValueError(f"HQ={HQ} must be a multiple of H={H}")
    G = HQ // H
    cdt = _compute_dtype(q)
    gdt = cdt if gate_dtype is None else gate_dtype

    # GQA: query head h -> kv head h // G.
    k_rep = k.repeat_interleave(G, dim=2)
    v_rep = v.repeat_interleave(G, dim=2)

    if cu_seqlens is None:
        segments = [(b, 0, T) for b in range(B)]
    else:
        if B != 1:
            raise ValueError("cu_seqlens requires batch size 1")
        cs = [int(x) for x in cu_seqlens.tolist()]
        segments = [(0, cs[i], cs[i + 1]) for i in range(len(cs) - 1) if cs[i + 1] > cs[i]]

    o = torch.zeros(B, T, HQ, v.shape[-1], dtype=cdt, device=q.device)
    max_chunks = max((math.ceil((e - s) / chunk_size) for _, s, e in segments), default=0)
    selection = torch.zeros(B, HQ, T, max_chunks, dtype=torch.bool, device=q.device)
    for b, s, e in segments:
        o_seg, sel_seg = _moba_one_sequence(
            q[b, s:e], k_rep[b, s:e], v_rep[b, s:e], chunk_size, topk, gdt, cdt
        )
        o[b, s:e] = o_seg
        selection[b, :, s:e, : sel_seg.shape[-1]] = sel_seg

    o = o.to(q.dtype)
    if return_selection:
        return o, selection
    return o
