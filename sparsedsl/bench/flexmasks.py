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

Decoding (`sparsedsl bench --decode`): one query, the last position `pos = L - 1` of a
cache of L keys, so FlexAttention sees Q_LEN = 1 and KV_LEN = L (and picks its decoding
kernel for such short queries). Its `mask_mod` gets q_idx = 0 and adds `pos`. MoBA's
routing scores the complete past blocks' mean keys, which a cache keeps (`moba_route_decode`),
and the BlockMask holds one row of key tiles (`moba_decode_block_mask`); a static pattern's
row comes from evaluating its `mask_mod` on the L keys (`row_block_mask`).
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


def token_mask(block_mask, B: int, H: int, T: int, kv_len: int | None = None) -> torch.Tensor:
    """The [B, H, T, kv_len] mask a BlockMask computes (kv_len = T unless given): full tiles
    all True, partial tiles by its mask_mod, the rest False (for tests; eager flex_attention
    ignores the tiles)."""
    tq, tk = block_mask.BLOCK_SIZE
    dev = block_mask.kv_num_blocks.device
    KV = T if kv_len is None else kv_len

    def tiles(num, idx):
        Bm, Hm, nq, nkv = idx.shape
        m = torch.zeros(Bm, Hm, nq, nkv + 1, dtype=torch.bool, device=dev)
        live = torch.arange(nkv, device=dev) < num[..., None]
        m.scatter_(-1, torch.where(live, idx.long(), nkv), True)
        return m[..., :nkv].expand(B, H, nq, nkv)

    def tokens(m):
        return m.repeat_interleave(tq, 2).repeat_interleave(tk, 3)[:, :, :T, :KV]

    partial = tokens(tiles(block_mask.kv_num_blocks, block_mask.kv_indices))
    full = torch.zeros_like(partial)
    if block_mask.full_kv_num_blocks is not None:
        full = tokens(tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
    i, j = torch.arange(T, device=dev), torch.arange(KV, device=dev)
    b = torch.arange(B, device=dev)[:, None, None, None]
    h = torch.arange(H, device=dev)[None, :, None, None]
    mod = block_mask.mask_mod(b, h, i[None, None, :, None], j[None, None, None, :])
    return full | (partial & mod.expand(B, H, T, KV))


# ------------------------------------------------------------------------------ decoding
def moba_block_means(k: torch.Tensor, block: int) -> torch.Tensor:
    """Mean key of every complete block of a cache k [B, Hkv, L, D]: [B, Hkv, L // block, D]
    float32 (what a MoBA decoder keeps beside its cache, as sparsedsl's cache does)."""
    B, Hkv, L, D = k.shape
    n = L // block
    return k[:, :, :n * block].float().view(B, Hkv, n, block, D).mean(3)


def moba_route_decode(q: torch.Tensor, kmean: torch.Tensor, pos: int, block: int,
                      topk: int) -> torch.Tensor:
    """The routing of `moba_route` for one query at position `pos`: q [B, H, 1, D] scores
    the complete past blocks (pos // block of them) by q . mean key; the best topk - 1 as
    [B, H, topk - 1] int32, -1 where there are fewer. kmean: `moba_block_means` (at least
    pos // block blocks)."""
    B, H = q.shape[:2]
    c = pos // block
    kk = min(topk - 1, c)
    out = torch.full((B, H, max(topk - 1, 0)), -1, dtype=torch.int32, device=q.device)
    if kk <= 0:
        return out
    km = kmean[:, :, :c]
    if H != km.shape[1]:
        km = km.repeat_interleave(H // km.shape[1], dim=1)
    scores = (q.float() @ km.transpose(-1, -2))[:, :, 0]  # [B, H, c]
    out[..., :kk] = scores.topk(kk, dim=-1).indices.to(torch.int32)
    return out


def moba_decode_selected(sel: torch.Tensor, block: int, L: int) -> torch.Tensor:
    """The blocks the query at L - 1 attends, own block included: bool [B, H, cdiv(L, block)]
    from a selection [B, H, S] (-1 padded)."""
    B, H, _ = sel.shape
    n = _cdiv(L, block)
    onehot = torch.zeros(B, H, n + 1, dtype=torch.bool, device=sel.device)
    onehot.scatter_(-1, torch.where(sel >= 0, sel, n).long(), True)
    own = torch.arange(n, device=sel.device) == (L - 1) // block
    return onehot[..., :n] | own


def moba_decode_mask_mod(sel: torch.Tensor, block: int, pos: int):
    """mask_mod of the query at `pos` (FlexAttention's q_idx 0) for a selection [B, H, S]."""
    S = sel.shape[-1]

    def mask_mod(b, h, q_idx, kv_idx):
        kb = kv_idx // block
        hit = kb == (q_idx + pos) // block
        for s in range(S):
            hit = hit | (sel[b, h, s] == kb)
        return hit & (kv_idx <= q_idx + pos)

    return mask_mod


def moba_decode_block_mask(sel: torch.Tensor, block: int, L: int, tile: int = TILE,
                           mask_mod=None):
    """The BlockMask of the query at L - 1 over a cache of L keys (Q_LEN 1, one row of key
    tiles): the tiles that overlap a chosen block; those inside one chosen block are full
    (every cached key is at or before the query), the others partial (mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask
    dev = sel.device
    B, H = sel.shape[:2]
    n = _cdiv(L, block)
    chosen = moba_decode_selected(sel, block, L)  # [B, H, n]
    t0, t1 = _tile_ranges(L, tile, dev)
    b0 = torch.arange(n, device=dev) * block
    b1 = torch.clamp(b0 + block, max=L)
    overlap = torch.minimum(b1[:, None], t1[None, :]) > torch.maximum(b0[:, None], t0[None, :])
    touched = (chosen.float() @ overlap.float()) > 0  # [B, H, nt]
    kb0 = t0 // block
    inside = kb0 == (t1 - 1) // block
    full = chosen.gather(-1, kb0.expand(B, H, kb0.numel())) & inside
    partial = touched & ~full
    num, idx = _to_blocks(partial[:, :, None])
    full_num, full_idx = _to_blocks(full[:, :, None])
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=tile,
                                    mask_mod=mask_mod or moba_decode_mask_mod(sel, block, L - 1),
                                    seq_lengths=(1, L))


def at_position(mask_mod, pos: int):
    """A mask_mod written for absolute query positions, for one query at `pos`
    (FlexAttention's q_idx 0)."""
    def shifted(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx + pos, kv_idx)
    return shifted


def row_block_mask(mask_mod, L: int, device, tile: int = TILE):
    """The BlockMask of one query (Q_LEN 1, q_idx 0) over L keys for a mask_mod that does not
    depend on batch or head: its row is evaluated on every key, then cut into tiles (full:
    every key of the tile visible; partial: some)."""
    from torch.nn.attention.flex_attention import BlockMask
    zero = torch.zeros((), dtype=torch.int64, device=device)
    row = mask_mod(zero, zero, zero, torch.arange(L, device=device)).expand(L)
    nt = _cdiv(L, tile)
    pad = nt * tile - L
    any_k = torch.cat([row, row.new_zeros(pad)]).view(nt, tile).any(-1)
    all_k = torch.cat([row, row.new_ones(pad)]).view(nt, tile).all(-1)
    partial = (any_k & ~all_k)[None, None, None]  # [1, 1, 1, nt]
    full = all_k[None, None, None]
    num, idx = _to_blocks(partial)
    full_num, full_idx = _to_blocks(full)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=tile,
                                    mask_mod=mask_mod, seq_lengths=(1, L))


def window_sinks_decode_block_mask(L: int, window: int, sinks: int, device, tile: int = TILE):
    """(sink | window) & causal for the query at L - 1 over a cache of L keys."""
    return row_block_mask(at_position(window_sinks_mask_mod(window, sinks), L - 1), L, device,
                          tile)
