"""FlexAttention expressing the benchmark's patterns.

MoBA (sparsedsl/builtins/moba.attn) in FlexAttention takes two steps:

1. routing (`moba_route`): each query scores the complete past key blocks by
   q . mean(k of the block) (no scale), keeps the best topk - 1 of them; its own
   block is always kept; attention is causal;
2. a BlockMask (`moba_block_mask`): per tile of queries and tile of keys, the
   union of the blocks the tile's queries selected (partial tiles, where the
   `mask_mod` decides each pair) and the tiles that every query of the tile sees
   whole (full tiles, no `mask_mod`); the `mask_mod` looks up the per-token
   selection, so the masking is exact.

The window-with-sinks pattern is a static `mask_mod` built from and_masks/or_masks.
Layout here is FlexAttention's and SDPA's: [batch, heads, seq, head_dim].
"""
from __future__ import annotations

import torch

TILE = 128  # FlexAttention's default block size, in queries and in keys


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def moba_route(q: torch.Tensor, k: torch.Tensor, block: int, topk: int) -> torch.Tensor:
    """Selected past blocks [B, H, T, topk - 1] (int32, -1 where a query has fewer
    complete past blocks); the own block is implicit. q [B, H, T, D], k [B, Hkv, T, D]."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    n = _cdiv(T, block)
    kf = k.float()
    pad = n * block - T
    if pad:
        kf = torch.cat([kf, kf.new_zeros(B, Hkv, pad, D)], dim=2)
    count = torch.full((n,), float(block), device=k.device)
    count[-1] = T - (n - 1) * block  # a final partial block: the mean of its tokens
    kmean = kf.view(B, Hkv, n, block, D).sum(3) / count[:, None]
    if H != Hkv:
        kmean = kmean.repeat_interleave(H // Hkv, dim=1)
    scores = q.float() @ kmean.transpose(-1, -2)  # [B, H, T, n]
    c = torch.arange(T, device=q.device) // block
    candidate = torch.arange(n, device=q.device)[None, :] < c[:, None]  # complete past blocks
    scores = scores.masked_fill(~candidate, float("-inf"))
    kk = min(topk - 1, n)
    if kk <= 0:
        return torch.empty(B, H, T, 0, dtype=torch.int32, device=q.device)
    val, idx = scores.topk(kk, dim=-1)
    return torch.where(val > float("-inf"), idx, -1).to(torch.int32)


def moba_mask_mod(sel: torch.Tensor, block: int):
    """mask_mod for per-token selections `sel` [B, H, T, S] (-1 padded)."""
    S = sel.shape[-1]

    def mask_mod(b, h, q_idx, kv_idx):
        kb = kv_idx // block
        hit = kb == q_idx // block
        for s in range(S):
            hit = hit | (sel[b, h, q_idx, s] == kb)
        return hit & (kv_idx <= q_idx)

    return mask_mod


def moba_selected(sel: torch.Tensor, block: int, T: int) -> torch.Tensor:
    """Per-token block sets, own block included: bool [B, H, T, n]."""
    B, H, _, _ = sel.shape
    n = _cdiv(T, block)
    onehot = torch.zeros(B, H, T, n + 1, dtype=torch.bool, device=sel.device)
    onehot.scatter_(-1, torch.where(sel >= 0, sel, n).long(), True)
    own = torch.arange(T, device=sel.device)[:, None] // block == \
        torch.arange(n, device=sel.device)[None, :]
    return onehot[..., :n] | own


def _tile_ranges(T: int, tile: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(_cdiv(T, tile), device=device) * tile
    return start, torch.clamp(start + tile, max=T)  # [start, end)


def _to_blocks(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, H, nq, nkv] tiles -> (count [B, H, nq], indices [B, H, nq, nkv]) int32."""
    num = m.sum(-1, dtype=torch.int32)
    idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True)
    return num, idx.to(torch.int32)


def moba_block_mask(sel: torch.Tensor, block: int, T: int, tile: int = TILE, mask_mod=None):
    """The BlockMask of a MoBA selection (see the module docstring). `mask_mod`, when
    given, must read the same selection (a reused function keeps torch.compile from
    seeing a new closure, and perhaps recompiling, at every call)."""
    from torch.nn.attention.flex_attention import BlockMask
    dev = sel.device
    B, H = sel.shape[:2]
    n = _cdiv(T, block)
    nt = _cdiv(T, tile)
    chosen = moba_selected(sel, block, T)  # [B, H, T, n]
    pad = nt * tile - T
    if pad:  # padded queries: no key for `any`, no constraint for `all`
        any_in = torch.cat([chosen, chosen.new_zeros(B, H, pad, n)], dim=2)
        all_in = torch.cat([chosen, chosen.new_ones(B, H, pad, n)], dim=2)
    else:
        any_in = all_in = chosen
    any_q = any_in.view(B, H, nt, tile, n).any(3)  # [B, H, nt, n]: some query of the tile
    all_q = all_in.view(B, H, nt, tile, n).all(3)  # every query of the tile
    t0, t1 = _tile_ranges(T, tile, dev)
    b0 = torch.arange(n, device=dev) * block
    b1 = torch.clamp(b0 + block, max=T)
    overlap = (torch.minimum(b1[:, None], t1[None, :]) > torch.maximum(b0[:, None], t0[None, :]))
    touched = (any_q.float() @ overlap.float()) > 0  # [B, H, nt, nt(kv)]
    # causality per tile pair: some pair visible / every pair visible
    some_causal = t0[None, :] <= (t1[:, None] - 1)
    all_causal = (t1[None, :] - 1) <= t0[:, None]
    # a key tile inside one block is whole for a query tile whose queries all chose the block
    kb0, kb1 = t0 // block, (t1 - 1) // block
    inside = kb0 == kb1
    whole = all_q.gather(-1, kb0.expand(B, H, nt, nt)) & inside
    full = whole & all_causal
    partial = touched & some_causal & ~full
    num, idx = _to_blocks(partial)
    full_num, full_idx = _to_blocks(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=tile,
                                    mask_mod=mask_mod or moba_mask_mod(sel, block),
                                    seq_lengths=(T, T))


def window_sinks_mask_mod(window: int, sinks: int):
    """(sink(sinks) | window(window)) & causal."""
    from torch.nn.attention.flex_attention import and_masks, or_masks

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def sink(b, h, q_idx, kv_idx):
        return kv_idx < sinks

    def recent(b, h, q_idx, kv_idx):
        return q_idx - kv_idx < window

    return and_masks(or_masks(sink, recent), causal)


def window_sinks_block_mask(T: int, window: int, sinks: int, device, tile: int = TILE,
                            compile_mask: bool = False):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(window_sinks_mask_mod(window, sinks), None, None, T, T,
                             device=device, BLOCK_SIZE=tile, _compile=compile_mask)


def token_mask(block_mask, B: int, H: int, T: int) -> torch.Tensor:
    """The [B, H, T, T] mask a BlockMask computes: full tiles all True, partial tiles by
    its mask_mod, the rest False (for tests; eager flex_attention ignores the tiles)."""
    tq, tk = block_mask.BLOCK_SIZE
    dev = block_mask.kv_num_blocks.device

    def tiles(num, idx):
        Bm, Hm, nq, nkv = idx.shape
        m = torch.zeros(Bm, Hm, nq, nkv + 1, dtype=torch.bool, device=dev)
        live = torch.arange(nkv, device=dev) < num[..., None]
        m.scatter_(-1, torch.where(live, idx.long(), nkv), True)
        return m[..., :nkv].expand(B, H, nq, nkv)

    def tokens(m):
        return m.repeat_interleave(tq, 2).repeat_interleave(tk, 3)[:, :, :T, :T]

    partial = tokens(tiles(block_mask.kv_num_blocks, block_mask.kv_indices))
    full = torch.zeros_like(partial)
    if block_mask.full_kv_num_blocks is not None:
        full = tokens(tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
    i = torch.arange(T, device=dev)
    b = torch.arange(B, device=dev)[:, None, None, None]
    h = torch.arange(H, device=dev)[None, :, None, None]
    mod = block_mask.mask_mod(b, h, i[None, None, :, None], i[None, None, None, :])
    return full | (partial & mod.expand(B, H, T, T))
