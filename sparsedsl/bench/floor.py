"""The floor of a case: the fewest FLOPs and bytes any implementation must spend.

Counted analytically from the pattern (no GPU, no reference):

* keys(i): keys query i attends, per query head, summed over branches (a pooled
  key of a compression branch counts as one key). Exact: the number of blocks a
  top-k keeps does not depend on the scores, and every block it can choose lies
  wholly in the past, so only the query's own block is partial.
* FLOPs, forward: sum_i keys(i) * q_heads * 4 * head_dim (q.k and p.v, 2 FLOPs a
  multiply-add), plus the matrix products that choose or make keys: MoBA's router
  (2 * head_dim per candidate block) and NSA's compression MLP. Backward: 2.5 times
  the attention FLOPs (five products instead of two) and twice the MLP's.
* Bytes (bfloat16): forward reads q, k, v and the gates once and writes o;
  backward reads q, k, v, o, dO and the gates and writes dq, dk, dv and the gate
  gradients. Learnable weights and softmax statistics are not counted.

The floor time is max(FLOPs / matmul rate, bytes / copy bandwidth) for rates
measured on the device (`measure.ceilings`).

A decode step (`decode_work`, `sparsedsl bench --decode`): one new query at position
p = L - 1 of a cache of L tokens whose keys, values and pooled blocks are already there
(pooling is the append's work, not the step's).

* keys: keys(p) of every branch, per query head, as above (the last row).
* FLOPs: keys * q_heads * 4 * head_dim, plus MoBA's router (2 * head_dim per complete past
  block and query head).
* Bytes (bfloat16): read q and the gates, write o, and read, per kv head, the keys and values
  the group's queries attend: at least keys(p) of them (each query head attends that many
  distinct keys). Several token branches (NSA's selection and window) may overlap, so their
  union is counted as the largest branch, a lower bound; pooled keys (compressed blocks) are
  read as bfloat16 keys and values too. MoBA's router also reads the mean key of every
  complete past block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cases import Case, Moba, Nsa, Pattern, WindowSinks

BYTES = 2  # bfloat16


def _i(T: int) -> torch.Tensor:
    return torch.arange(T, dtype=torch.int64)


def causal_keys(T: int) -> torch.Tensor:
    return _i(T) + 1


def moba_keys(T: int, block: int, topk: int) -> torch.Tensor:
    """Own block up to the query, plus topk - 1 of the c complete past blocks."""
    i = _i(T)
    c = i // block
    return (i - c * block + 1) + torch.clamp(c, max=topk - 1) * block


def moba_candidates(T: int, block: int) -> torch.Tensor:
    """Blocks the router scores for query i: the complete past ones."""
    return _i(T) // block


def window_sinks_keys(T: int, window: int, sinks: int) -> torch.Tensor:
    i = _i(T)
    return torch.clamp(i + 1, max=window) + torch.clamp(i - window + 1, min=0, max=sinks)


def nsa_cmp_keys(T: int, cmp_len: int, cmp_stride: int) -> torch.Tensor:
    """Compressed blocks wholly in the past: n * stride + len - 1 <= i."""
    i = _i(T)
    return torch.where(i >= cmp_len - 1, (i - cmp_len + 1) // cmp_stride + 1, torch.zeros_like(i))


def _overlap(a0, a1, b0, b1) -> torch.Tensor:
    """|[a0, a1) & [b0, b1)| elementwise."""
    return torch.clamp(torch.minimum(a1, b1) - torch.maximum(a0, b0), min=0)


def nsa_slc_keys(T: int, sel_len: int, topn: int, init_blocks: int,
                 local_blocks: int) -> torch.Tensor:
    """Tokens of the selected blocks up to the query: the forced blocks that have started
    (first `init_blocks`, last `local_blocks` up to the query's own), then the best of the
    complete past blocks until `topn` blocks are kept."""
    assert local_blocks >= 1, "the floor assumes the query's own block is forced"
    i = _i(T)
    c = i // sel_len
    zero = torch.zeros_like(i)
    first_end = torch.clamp(c + 1, max=init_blocks)       # A = [0, first_end)
    local_start = torch.clamp(c - local_blocks + 1, min=0)  # B = [local_start, c + 1)
    forced = first_end + (c + 1 - local_start) - _overlap(zero, first_end, local_start, c + 1)
    past = (i + 1) // sel_len                               # complete blocks: [0, past)
    forced_past = _overlap(zero, first_end, zero, past) + _overlap(local_start, c + 1, zero, past) \
        - _overlap(local_start, first_end, zero, past)
    chosen = torch.minimum(torch.clamp(topn - forced, min=0), past - forced_past)
    # every block but the query's own (forced) one is whole
    return (i - c * sel_len + 1) + (forced - 1 + chosen) * sel_len


def keys_per_query(pattern: Pattern, T: int) -> dict[str, torch.Tensor]:
    """Branch -> keys attended by each query [T] (per query head)."""
    if isinstance(pattern, Moba):
        return {"attend": moba_keys(T, pattern.block, pattern.topk)}
    if isinstance(pattern, WindowSinks):
        return {"attend": window_sinks_keys(T, pattern.window, pattern.sinks)}
    if isinstance(pattern, Nsa):
        out = {"cmp": nsa_cmp_keys(T, pattern.cmp_len, pattern.cmp_stride),
               "slc": nsa_slc_keys(T, pattern.sel_len, pattern.topn, pattern.init_blocks,
                                   pattern.local_blocks)}
        if pattern.window:
            out["swa"] = torch.clamp(_i(T) + 1, max=pattern.window)
        return out
    raise TypeError(pattern)


@dataclass(frozen=True)
class Work:
    """What one forward / backward of a case must do at least."""

    keys_per_query: float  # average over queries, per query head
    flops_fwd: float
    flops_bwd: float
    bytes_fwd: float
    bytes_bwd: float

    @property
    def flops_fwdbwd(self) -> float:
        return self.flops_fwd + self.flops_bwd

    @property
    def bytes_fwdbwd(self) -> float:
        return self.bytes_fwd + self.bytes_bwd

    def floor_ms(self, flops_per_s: float, bytes_per_s: float) -> dict:
        """Floor times (ms) and which term bounds each, for measured rates."""
        out = {}
        for name, f, b in (("fwd", self.flops_fwd, self.bytes_fwd),
                           ("fwdbwd", self.flops_fwdbwd, self.bytes_fwdbwd)):
            tf, tb = f / flops_per_s * 1e3, b / bytes_per_s * 1e3
            out[f"floor_{name}_ms"] = max(tf, tb)
            out[f"floor_{name}_bound"] = "compute" if tf >= tb else "memory"
        return out

    def to_json(self) -> dict:
        return {"keys_per_query": self.keys_per_query, "flops_fwd": self.flops_fwd,
                "flops_bwd": self.flops_bwd, "bytes_fwd": self.bytes_fwd,
                "bytes_bwd": self.bytes_bwd}


def _extra_flops(pattern: Pattern, T: int, q_heads: int, kv_heads: int,
                 D: int) -> tuple[float, float]:
    """Forward and backward FLOPs of the products that choose or make keys."""
    if isinstance(pattern, Moba):  # router: q . mean key of every candidate block
        return float(moba_candidates(T, pattern.block).sum()) * q_heads * 2 * D, 0.0
    if isinstance(pattern, Nsa) and pattern.mlp:  # Eq. 7 on every compressed block, k and v
        n_blocks = -(-T // pattern.cmp_stride)
        per_block = 2 * (pattern.cmp_len * D * D + D * D)  # hidden size = head_dim
        fwd = 2.0 * n_blocks * kv_heads * per_block
        return fwd, 2 * fwd
    return 0.0, 0.0


def work(case: Case, T: int) -> Work:
    return pattern_work(case.pattern, T, case.q_heads, case.kv_heads, case.head_dim,
                        len(case.gates))


def pattern_work(pattern: Pattern, T: int, q_heads: int, kv_heads: int, D: int,
                 n_gates: int = 0) -> Work:
    keys = sum(keys_per_query(pattern, T).values())
    total = float(keys.sum())
    attn = total * q_heads * 4 * D
    ex_f, ex_b = _extra_flops(pattern, T, q_heads, kv_heads, D)
    q = o = T * q_heads * D * BYTES
    kv = 2 * T * kv_heads * D * BYTES
    gates = n_gates * T * q_heads * BYTES
    return Work(keys_per_query=total / T, flops_fwd=attn + ex_f, flops_bwd=2.5 * attn + ex_b,
                bytes_fwd=q + kv + gates + o,
                bytes_bwd=(q + kv + o + o + gates) + (q + kv + gates))


def dense_work(T: int, q_heads: int, kv_heads: int, D: int) -> Work:
    """Causal dense attention, for comparison."""
    total = float(causal_keys(T).sum())
    attn = total * q_heads * 4 * D
    q = o = T * q_heads * D * BYTES
    kv = 2 * T * kv_heads * D * BYTES
    return Work(total / T, attn, 2.5 * attn, q + kv + o, (q + kv + 2 * o) + (q + kv))


# -------------------------------------------------------------------------------- decoding
POOLED_BRANCHES = ("cmp",)  # keys_per_query branches whose keys are pooled blocks


@dataclass(frozen=True)
class DecodeWork:
    """What one decode step (one query at the last position of a cache) must do at least."""

    keys: float        # keys the query attends, per query head, summed over branches
    keys_read: float   # distinct keys (tokens and pooled blocks) read per kv head, at least
    flops: float
    bytes: float

    def floor_ms(self, flops_per_s: float, bytes_per_s: float) -> dict:
        tf, tb = self.flops / flops_per_s * 1e3, self.bytes / bytes_per_s * 1e3
        return {"floor_fwd_ms": max(tf, tb), "floor_fwd_bound": "compute" if tf >= tb else "memory"}

    def to_json(self) -> dict:
        """In the prefill floors' keys (a decode step is a forward: `flops_fwd`, `bytes_fwd`)."""
        return {"mode": "decode", "keys_per_query": self.keys, "keys_read": self.keys_read,
                "flops_fwd": self.flops, "bytes_fwd": self.bytes}


def decode_keys(pattern: Pattern, L: int) -> dict[str, int]:
    """Branch -> keys the query at L - 1 attends (per query head)."""
    return {name: int(k[-1]) for name, k in keys_per_query(pattern, L).items()}


def decode_work(case: Case, L: int) -> DecodeWork:
    return pattern_decode_work(case.pattern, L, case.q_heads, case.kv_heads, case.head_dim,
                               len(case.gates))


def pattern_decode_work(pattern: Pattern, L: int, q_heads: int, kv_heads: int, D: int,
                        n_gates: int = 0, Dv: int | None = None) -> DecodeWork:
    Dv = D if Dv is None else Dv
    keys = decode_keys(pattern, L)
    total = sum(keys.values())
    pooled = sum(n for b, n in keys.items() if b in POOLED_BRANCHES)
    tokens = max((n for b, n in keys.items() if b not in POOLED_BRANCHES), default=0)
    flops = float(total) * q_heads * 2 * (D + Dv)
    router_bytes = 0.0
    if isinstance(pattern, Moba):  # q . mean key of every complete past block
        candidates = (L - 1) // pattern.block
        flops += float(candidates) * q_heads * 2 * D
        router_bytes = float(candidates) * kv_heads * D * BYTES
    read = tokens + pooled
    nbytes = (q_heads * (D + Dv) + n_gates * q_heads) * BYTES + \
        float(read) * kv_heads * (D + Dv) * BYTES + router_bytes
    return DecodeWork(float(total), float(read), flops, nbytes)


def dense_decode_work(L: int, q_heads: int, kv_heads: int, D: int) -> DecodeWork:
    """One query against every cached key, for comparison."""
    return DecodeWork(float(L), float(L), float(L) * q_heads * 4 * D,
                      (2 * q_heads * D + 2 * L * kv_heads * D) * BYTES)
