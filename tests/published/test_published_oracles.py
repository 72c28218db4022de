"""Sanity checks for the published-definition oracles (MoBA, NSA)."""

from __future__ import annotations

import math

import pytest
import torch

from .moba import moba_naive
from .nsa import mean_pool_blocks, nsa_naive, nsa_topk

DT = torch.float64


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT)


def _qkv(B, T, HQ, H, D, seed=0):
    return _rand(B, T, HQ, D, seed=seed), _rand(B, T, H, D, seed=seed + 1), _rand(B, T, H, D, seed=seed + 2)


def causal_attention(q, k, v, scale=None, window=None, allowed=None):
    """Independent dense reference: explicit per-(b, h, t) loops."""
    B, T, HQ, D = q.shape
    G = HQ // k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    o = torch.zeros(B, T, HQ, v.shape[-1], dtype=DT)
    for b in range(B):
        for h in range(HQ):
            kh, vh = k[b, :, h // G], v[b, :, h // G]
            for t in range(T):
                lo = 0 if window is None else max(0, t - window + 1)
                js = [j for j in range(lo, t + 1) if allowed is None or allowed(b, h, t, j)]
                s = (kh[js] @ q[b, t, h]) * scale
                p = torch.softmax(s, dim=0)
                o[b, t, h] = p @ vh[js]
    return o


# --------------------------------------------------------------------------- MoBA


@pytest.mark.parametrize("T,chunk", [(64, 16), (37, 8), (5, 8)])
def test_moba_full_topk_is_causal_attention(T, chunk):
    q, k, v = _qkv(2, T, 4, 2, 8)
    n_chunks = math.ceil(T / chunk)
    o, sel = moba_naive(q, k, v, chunk, topk=n_chunks + 3, return_selection=True)
    ref = causal_attention(q, k, v)
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
    # every causally available chunk is selected, nothing in the future
    t = torch.arange(T)
    expected = torch.arange(n_chunks)[None, :] <= (t // chunk)[:, None]
    assert sel.shape == (2, 4, T, n_chunks)
    assert torch.equal(sel, expected.expand_as(sel))


def test_moba_topk1_is_own_chunk_causal():
    T, chunk = 50, 8
    q, k, v = _qkv(1, T, 2, 2, 4, seed=3)
    o = moba_naive(q, k, v, chunk, topk=1)
    ref = causal_attention(q, k, v, allowed=lambda b, h, t, j: j // chunk == t // chunk)
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)


def _moba_tiny(sign):
    # T=8, chunk=2, D=1, one head.  Key chunk means: [1, 3, 2, 0.5].
    k = torch.tensor([1.0, 1.0, 3.0, 3.0, 1.0, 3.0, 0.5, 0.5], dtype=DT).view(1, 8, 1, 1)
    q = torch.full((1, 8, 1, 1), float(sign), dtype=DT)
    v = torch.arange(8, dtype=DT).view(1, 8, 1, 1) * 10.0
    return q, k, v


def test_moba_hand_worked_selection_positive_q():
    q, k, v = _moba_tiny(+1)
    o, sel = moba_naive(q, k, v, chunk_size=2, topk=2, return_selection=True)
    chosen = [sorted(torch.nonzero(sel[0, 0, t]).flatten().tolist()) for t in range(8)]
    # gate = q * mean: chunk 0 -> {0}; chunk 1 -> own + 0; chunk 2 -> own + argmax(1, 3) = 1;
    # chunk 3 -> own + argmax(1, 3, 2) = 1.
    assert chosen == [[0], [0], [0, 1], [0, 1], [1, 2], [1, 2], [1, 3], [1, 3]]
    # query 6 attends tokens {2, 3, 6} with logits q*k/sqrt(1)
    js = [2, 3, 6]
    p = torch.softmax(torch.tensor([k[0, j, 0, 0].item() for j in js], dtype=DT), 0)
    expected = (p * torch.tensor([10.0 * j for j in js], dtype=DT)).sum()
    torch.testing.assert_close(o[0, 6, 0, 0], expected, rtol=1e-12, atol=1e-12)


def test_moba_hand_worked_selection_negative_q():
    q, k, v = _moba_tiny(-1)
    _, sel = moba_naive(q, k, v, chunk_size=2, topk=2, return_selection=True)
    chosen = [sorted(torch.nonzero(sel[0, 0, t]).flatten().tolist()) for t in range(8)]
    # gate = -mean: the smallest mean wins -> chunk 0 for chunks 2 and 3
    assert chosen == [[0], [0], [0, 1], [0, 1], [0, 2], [0, 2], [0, 3], [0, 3]]


def test_moba_gqa_equals_repeated_kv_and_batch_independence():
    q, k, v = _qkv(2, 40, 6, 2, 8, seed=7)
    o = moba_naive(q, k, v, 8, topk=2)
    o_rep = moba_naive(q, k.repeat_interleave(3, dim=2), v.repeat_interleave(3, dim=2), 8, topk=2)
    torch.testing.assert_close(o, o_rep, rtol=0, atol=0)
    for b in range(2):
        ob = moba_naive(q[b:b + 1], k[b:b + 1], v[b:b + 1], 8, topk=2)
        torch.testing.assert_close(o[b:b + 1], ob, rtol=0, atol=0)
    # cu_seqlens on the flattened batch equals the batched call
    flat = [x.reshape(1, 80, x.shape[2], x.shape[3]) for x in (q, k, v)]
    o_var = moba_naive(*flat, 8, topk=2, cu_seqlens=torch.tensor([0, 40, 80]))
    torch.testing.assert_close(o_var.reshape(o.shape), o, rtol=0, atol=0)


def test_moba_sparse_selection_counts():
    T, chunk, topk = 100, 10, 3
    q, k, v = _qkv(1, T, 2, 1, 8, seed=11)
    o, sel = moba_naive(q, k, v, chunk, topk, return_selection=True)
    assert torch.isfinite(o).all()
    n_sel = sel.sum(-1)  # [B, HQ, T]
    expected = torch.clamp(torch.arange(T) // chunk + 1, max=topk)
    assert torch.equal(n_sel[0, 0], expected) and torch.equal(n_sel[0, 1], expected)
    own = sel[0, :, torch.arange(T), torch.arange(T) // chunk]
    assert own.all()


# --------------------------------------------------------------------------- NSA


def _gates(B, T, HQ, cmp, slc, swa):
    f = lambda x: torch.full((B, T, HQ), float(x), dtype=DT)  # noqa: E731
    return f(cmp), f(slc), f(swa)


def test_mean_pool_partial_last_block():
    x = torch.arange(10, dtype=DT).view(1, 10, 1, 1)
    p = mean_pool_blocks(x, 4).flatten().tolist()
    assert p == [1.5, 5.5, 8.5]


@pytest.mark.parametrize("G", [1, 3])
def test_nsa_full_selection_is_causal_attention(G):
    B, T, H, D, BS = 2, 70, 2, 8, 8
    q, k, v = _qkv(B, T, H * G, H, D, seed=5)
    g_cmp, g_slc, g_swa = _gates(B, T, H * G, 0, 1, 0)
    TC = math.ceil(T / BS)
    o, idx = nsa_naive(q, k, v, g_cmp, g_slc, g_swa, block_counts=TC + 2, block_size=BS,
                       window_size=16, return_block_indices=True)
    torch.testing.assert_close(o, causal_attention(q, k, v), rtol=1e-10, atol=1e-10)
    assert idx.shape == (B, T, H, TC + 2)
    # all blocks 0 .. t//BS, ascending, then -1
    for t in range(T):
        row = idx[0, t, 0].tolist()
        nb = t // BS + 1
        assert row == list(range(nb)) + [-1] * (TC + 2 - nb)


def test_nsa_window_branch():
    B, T, HQ, H, D = 1, 30, 4, 2, 4
    q, k, v = _qkv(B, T, HQ, H, D, seed=9)
    g_cmp, g_slc, g_swa = _gates(B, T, HQ, 0, 0, 1)
    o = nsa_naive(q, k, v, g_cmp, g_slc, g_swa, 3, 4, window_size=5)
    torch.testing.assert_close(o, causal_attention(q, k, v, window=5), rtol=1e-10, atol=1e-10)
    o1 = nsa_naive(q, k, v, g_cmp, g_slc, g_swa, 3, 4, window_size=1)
    torch.testing.assert_close(o1, v.repeat_interleave(2, dim=2), rtol=1e-12, atol=1e-12)
    # window_size == 0: no window branch at all
    o0 = nsa_naive(q, k, v, g_cmp, g_slc, g_swa, 3, 4, window_size=0)
    assert torch.equal(o0, torch.zeros_like(o0))


def test_nsa_compression_branch():
    B, T, HQ, H, D, BS = 1, 20, 2, 1, 4, 4
    q, k, v = _qkv(B, T, HQ, H, D, seed=13)
    g_cmp, g_slc, g_swa = _gates(B, T, HQ, 1, 0, 0)
    o = nsa_naive(q, k, v, g_cmp, g_slc, g_swa, 3, BS, window_size=0)
    # no block fully visible before t = BS-1
    assert torch.equal(o[:, : BS - 1], torch.zeros_like(o[:, : BS - 1]))
    # at t = BS-1 only block 0 is visible -> mean of v[0:BS]
    for h in range(HQ):
        torch.testing.assert_close(o[0, BS - 1, h], v[0, :BS, 0].mean(0), rtol=1e-12, atol=1e-12)
    # at t = 2*BS-1: softmax over blocks 0 and 1 of the pooled keys
    t = 2 * BS - 1
    kc, vc = k[0, :2 * BS, 0].view(2, BS, D).mean(1), v[0, :2 * BS, 0].view(2, BS, D).mean(1)
    for h in range(HQ):
        p = torch.softmax(kc @ q[0, t, h] / math.sqrt(D), 0)
        torch.testing.assert_close(o[0, t, h], p @ vc, rtol=1e-12, atol=1e-12)


def _nsa_tiny(q_values):
    # T=10, BS=2, TC=5, D=1.  Pooled key means per block: [0, 3, 1, 0, 0].
    k = torch.tensor([0, 0, 3, 3, 1, 1, 0, 0, 0, 0], dtype=DT).view(1, 10, 1, 1)
    HQ = len(q_values)
    q = torch.tensor(q_values, dtype=DT).view(1, 1, HQ, 1).expand(1, 10, HQ, 1).contiguous()
    return q, k


def test_nsa_topk_hand_worked():
    # one kv head, one query head, q = +1: block 1 (mean 3) beats block 2 (mean 1)
    q, k = _nsa_tiny([1.0])
    kc = mean_pool_blocks(k, 2)
    idx = nsa_topk(q, kc, 4, 2, scale=1.0)[0, :, 0].tolist()
    assert idx[9] == [0, 1, 3, 4]  # forced {0, 3, 4} + best of {1, 2}
    assert idx[8] == [0, 1, 3, 4]
    assert idx[6] == [0, 1, 2, 3]  # allowed set is exactly 0..3
    assert idx[1] == [0, -1, -1, -1]
    assert idx[2] == [0, 1, -1, -1]
    # q = -1 flips the preference to block 2
    q, k = _nsa_tiny([-1.0])
    idx = nsa_topk(q, mean_pool_blocks(k, 2), 4, 2, scale=1.0)[0, :, 0].tolist()
    assert idx[9] == [0, 2, 3, 4]


def test_nsa_topk_group_average():
    # head 0 (q=+5) strongly prefers block 1; head 1 (q=-1) mildly prefers block 2.
    # Group-mean of the probabilities at t=9: block 1 ~0.507, block 2 ~0.054 -> block 1.
    q, k = _nsa_tiny([5.0, -1.0])
    kc = mean_pool_blocks(k, 2)
    shared = nsa_topk(q, kc, 4, 2, scale=1.0)  # G=2, H=1
    assert shared[0, 9, 0].tolist() == [0, 1, 3, 4]
    separate = nsa_topk(q, kc.expand(1, 5, 2, 1), 4, 2, scale=1.0)  # G=1, H=2
    assert separate[0, 9, 0].tolist() == [0, 1, 3, 4]
    assert separate[0, 9, 1].tolist() == [0, 2, 3, 4]


def test_nsa_sparse_properties_and_tensor_counts():
    B, T, HQ, H, D, BS, S = 2, 96, 4, 2, 8, 8, 4
    q, k, v = _qkv(B, T, HQ, H, D, seed=21)
    g = torch.sigmoid(_rand(3, B, T, HQ, seed=22))
    o, idx = nsa_naive(q, k, v, g[0], g[1], g[2], S, BS, window_size=16, return_block_indices=True)
    assert torch.isfinite(o).all()
    t = torch.arange(T)
    n_valid = (idx >= 0).sum(-1)
    assert torch.equal(n_valid, torch.clamp(t // BS + 1, max=S)[None, :, None].expand(B, T, H))
    own = t // BS
    for b in range(B):
        for tt in range(T):
            for h in range(H):
                row = [x for x in idx[b, tt, h].tolist() if x >= 0]
                assert row == sorted(set(row)) and max(row) <= own[tt]
                assert {0, int(own[tt]), max(int(own[tt]) - 1, 0)} <= set(row)
    # the selection branch equals dense attention restricted to the selected blocks
    g0 = torch.zeros(B, T, HQ, dtype=DT)
    o_slc = nsa_naive(q, k, v, g0, g0 + 1, g0, S, BS, window_size=0, block_indices=idx)
    sel_sets = [[[set(idx[b, tt, h].tolist()) for h in range(H)] for tt in range(T)] for b in range(B)]
    ref = causal_attention(q, k, v, allowed=lambda b, h, tt, j: j // BS in sel_sets[b][tt][h // 2])
    torch.testing.assert_close(o_slc, ref, rtol=1e-10, atol=1e-10)
    # per-query block_counts tensor: a count of 3 keeps exactly the three forced blocks
    counts = torch.full((B, T, H), S, dtype=torch.long)
    counts[:, 50:] = 3
    idx2 = nsa_naive(q, k, v, g[0], g[1], g[2], counts, BS, window_size=16, return_block_indices=True)[1]
    assert torch.equal(idx2[:, :50], idx[:, :50])
    assert ((idx2[:, 50:] >= 0).sum(-1) == 3).all()
    assert (idx2[:, 50:, :, 3] == -1).all()
    for tt in range(50, T):
        ob = tt // BS
        assert (idx2[:, tt, :, :3] == torch.tensor([0, ob - 1, ob])).all()
