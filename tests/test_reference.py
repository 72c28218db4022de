"""The dense reference against the published oracles (MoBA, NSA), and its own properties:
causality (the future never changes the past), masks against explicit loops over the
formulas in `ir/ops.py`, input validation, and empty rows."""
from __future__ import annotations

import math

import pytest
import torch

import sparsedsl
from sparsedsl.reference import evaluate as _evaluate

from .published.moba import moba_naive
from .published.nsa import nsa_naive

F64 = torch.float64
# the seeded hash behind `random`
HASH = _evaluate.hash24


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def qkv(B, T, HQ, HKV, D, seed=0, DV=None):
    g = torch.Generator().manual_seed(seed)
    return randn(g, B, T, HQ, D), randn(g, B, T, HKV, D), randn(g, B, T, HKV, DV or D)


def only(d: dict):
    assert len(d) == 1, list(d)
    return next(iter(d.values()))


# ====================================================================== (a) MoBA
# T, block, topk, q heads, kv heads
MOBA = [
    (1, 4, 1, 2, 2),
    (1, 4, 3, 16, 1),
    (63, 8, 1, 4, 1),
    (63, 8, 2, 2, 2),
    (63, 10, 8, 16, 1),
    (200, 16, 3, 4, 1),
    (200, 24, 2, 2, 2),
    (257, 32, 3, 16, 1),
    (257, 16, 8, 4, 4),
]


@pytest.mark.parametrize("T,block,topk,hq,hkv", MOBA,
                         ids=[f"T{c[0]}-b{c[1]}-k{c[2]}-g{c[3] // c[4]}" for c in MOBA])
def test_moba_matches_published(T, block, topk, hq, hkv):
    assert T == 1 or T % block != 0
    q, k, v = qkv(2, T, hq, hkv, 8, seed=T + block + topk)
    d = sparsedsl.reference("moba", q, k, v, block=block, topk=topk, return_details=True)
    want, want_sel = moba_naive(q, k, v, block, topk, return_selection=True, gate_dtype=None)
    torch.testing.assert_close(d.out, want, atol=1e-10, rtol=0)
    sel = d.blocksets["sel"]
    assert sel.shape == (2, hq, T, math.ceil(T / block)) and sel.dtype == torch.bool
    assert torch.equal(sel, want_sel)
    # each query keeps min(topk, its block index + 1) blocks
    c = torch.arange(T) // block
    assert torch.equal(sel.sum(-1), torch.minimum(c + 1, torch.tensor(topk)).expand(2, hq, T))
    # the output is returned in q's dtype
    assert sparsedsl.reference("moba", q, k, v, block=block, topk=topk).dtype == F64


def test_moba_float32_inputs_give_float32():
    q, k, v = (t.float() for t in qkv(1, 40, 2, 1, 8))
    out = sparsedsl.reference("moba", q, k, v, block=16, topk=2)
    assert out.dtype == torch.float32
    want = moba_naive(q.double(), k.double(), v.double(), 16, 2, gate_dtype=None)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)


# ======================================================================= (b) NSA
def gates(B, T, HQ, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, T, HQ, generator=g, dtype=F64) for _ in range(3)]


# T, block size, topn, window, q heads, kv heads
NSA = [
    (1, 4, 3, 2, 2, 2),
    (63, 8, 3, 16, 4, 1),
    (77, 8, 16, 8, 4, 4),
    (130, 16, 4, 1, 2, 1),
    (200, 16, 4, 32, 16, 1),
    (257, 16, 5, 40, 2, 2),
]


@pytest.mark.parametrize("T,bs,topn,window,hq,hkv", NSA,
                         ids=[f"T{c[0]}-bs{c[1]}-n{c[2]}-w{c[3]}-g{c[4] // c[5]}" for c in NSA])
def test_nsa_matches_published(T, bs, topn, window, hq, hkv):
    B = 2
    q, k, v = qkv(B, T, hq, hkv, 8, seed=T + bs)
    g_cmp, g_slc, g_swa = gates(B, T, hq, seed=T)
    d = sparsedsl.reference("nsa", q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=g_swa, cmp="mean",
                            cmp_len=bs, cmp_stride=bs, sel_len=bs, topn=topn, window=window,
                            return_details=True)
    want, want_idx = nsa_naive(q, k, v, g_cmp, g_slc, g_swa, topn, bs, window,
                               return_block_indices=True)
    torch.testing.assert_close(d.out, want, atol=1e-10, rtol=0)
    sel = d.selections["sel"]
    assert sel.shape[:3] == (B, T, hkv) and sel.shape[3] <= topn
    # the reference pads to the widest row; the oracle to topn
    padded = torch.full((B, T, hkv, topn), -1, dtype=sel.dtype)
    padded[..., :sel.shape[3]] = sel
    assert torch.equal(padded, want_idx)
    # rows are ascending with -1 padding at the end
    real = torch.where(sel < 0, torch.full_like(sel, 1 << 30), sel)
    assert torch.equal(real, real.sort(-1).values)


def test_nsa_branches_are_gated_sum():
    B, T, hq, hkv = 1, 50, 4, 2
    q, k, v = qkv(B, T, hq, hkv, 8)
    g = gates(B, T, hq)
    kw = dict(cmp="mean", cmp_len=8, cmp_stride=8, sel_len=8, topn=3, window=6)
    d = sparsedsl.reference("nsa", q, k, v, g_cmp=g[0], g_slc=g[1], g_swa=g[2],
                            return_details=True, **kw)
    br = d.branches
    mix = g[0][..., None] * br["cmp_out"] + g[1][..., None] * br["slc_out"] \
        + g[2][..., None] * br["swa_out"]
    torch.testing.assert_close(d.out, mix, atol=1e-12, rtol=0)


# ================================================ (c) NSA at the paper's defaults
def _nsa_defaults(topn=None):
    B, T, hq, hkv, D, dm = 1, 300, 4, 2, 8, 16
    over = {} if topn is None else {"topn": topn}
    q, k, v = qkv(B, T, hq, hkv, D, seed=5)
    x = randn(torch.Generator().manual_seed(6), B, T, dm)
    params = sparsedsl.init_params("nsa", head_dim=D, q_heads=hq, d_model=dm, dtype=F64, **over)
    d = sparsedsl.reference("nsa", q, k, v, x=x, params=params, return_details=True, **over)
    return d, T, hq, hkv


@pytest.mark.parametrize("topn", [None, 4])
def test_nsa_paper_defaults(topn):
    ir = sparsedsl.lower("nsa")
    p = ir.param_values()
    assert (p["cmp"], p["cmp_len"], p["cmp_stride"], p["sel_len"], p["topn"], p["window"]) == \
        ("mlp", 32, 16, 64, 16, 512)
    d, T, hq, hkv = _nsa_defaults(topn)
    n = topn or 16
    assert d.out.shape == (1, T, hq, 8) and torch.isfinite(d.out).all()
    for br in d.branches.values():
        assert torch.isfinite(br).all()
    sel = d.selections["sel"]  # [B, T, Hkv, S]
    assert sel.shape[:3] == (1, T, hkv) and sel.shape[3] <= n
    for t in range(T):
        c = t // 64
        for h in range(hkv):
            row = [int(b) for b in sel[0, t, h] if b >= 0]
            assert row == sorted(set(row))
            assert 0 in row and c in row, (t, h, row)
            assert max(row) <= c, (t, h, row)  # never a future block
            assert len(row) <= n
            if c >= 1:
                assert c - 1 in row  # the two most recent blocks are forced
            # every block in the row except the current one lies wholly at or before t
            assert all(b * 64 + 63 <= t for b in row if b != c)
    # the whole GQA group selects the same blocks
    bs = d.blocksets["sel"]  # [B, Hq, T, N]
    G = hq // hkv
    for h in range(hq):
        assert torch.equal(bs[:, h], bs[:, (h // G) * G])
    # and this matches the index lists
    for h in range(hkv):
        for t in range(T):
            assert sorted(int(b) for b in sel[0, t, h] if b >= 0) == \
                bs[0, h * G, t].nonzero().flatten().tolist()


def test_nsa_selection_is_not_trivial_with_small_topn():
    d, T, _, hkv = _nsa_defaults(4)
    sel = d.selections["sel"]
    # with 4 slots and 3 forced blocks, late queries choose one of blocks 1..c-2
    free = {int(b) for t in range(256, T) for h in range(hkv)
            for b in sel[0, t, h] if b not in (-1, 0, 3, 4)}
    assert free and free <= {1, 2}
    assert (sel >= 0).sum(-1).max() == 4


# ============================================================== (d) causality
DMODEL = 6
CAUSAL_SPECS = {
    "moba": ("moba", {"block": 4, "topk": 3}),
    "nsa-mlp": ("nsa", {"cmp_len": 4, "cmp_stride": 2, "sel_len": 8, "topn": 3, "window": 5}),
    "nsa-mean": ("nsa", {"cmp": "mean", "cmp_len": 6, "cmp_stride": 3, "sel_len": 6, "topn": 3,
                         "window": 4}),
    "token-rules": ("out = attend((sink(3) | window(5) | global(2) | strided(4, offset=1) "
                    "| summary(6, width=2)) & causal)\n", {}),
    "block-rules": ("let g = blocks(4)\nout = attend(tokens(random(g, 2, seed=1) | first(g, 1) "
                    "| recent(g, 2)) & causal)\n", {}),
    "pooled-union": ("let g = blocks(4, stride=2)\n"
                     "out = union(attend(pool(g, mean), past(g)), attend(window(4)))\n", {}),
    "topk-mix": ("input gx\nlet g = blocks(5)\nlet s = groupsum(dot(q, pool(g, mean), scale=0.5))\n"
                 "let a = attend(tokens(topk(s, 2, forbid=~past(g))) & causal)\n"
                 "let b = attend(pool(g, mean), topk(s, 1, forbid=~past(g)))\n"
                 "input gate = sigmoid(linear(gx))\n"
                 "out = gate * a + b\n", {}),
}
B_C, T_C, HQ_C, HKV_C, D_C = 1, 23, 4, 2, 4


def _inputs(spec, over, seed=0):
    ir = sparsedsl.lower(spec, over)
    q, k, v = qkv(B_C, T_C, HQ_C, HKV_C, D_C, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    tensors = {}
    for name, info in ir.inputs.items():
        if info.role == "x":
            tensors[name] = randn(g, B_C, T_C, DMODEL)
    params = sparsedsl.init_params(ir, head_dim=D_C, q_heads=HQ_C, d_model=DMODEL, dtype=F64,
                                   seed=seed)
    return ir, (q, k, v), tensors, params


def _perturbed(t, seed, q, k, v, tensors):
    """Copies with every position after t replaced by large random values."""
    g = torch.Generator().manual_seed(seed)

    def p(x):
        x = x.clone()
        x[:, t + 1:] = 10 * randn(g, *x[:, t + 1:].shape)
        return x
    return p(q), p(k), p(v), {n: p(x) for n, x in tensors.items()}


@pytest.mark.parametrize("name", list(CAUSAL_SPECS))
def test_future_never_changes_the_past(name):
    spec, over = CAUSAL_SPECS[name]
    ir, (q, k, v), tensors, params = _inputs(spec, over)
    full = sparsedsl.reference(ir, q, k, v, params=params, return_details=True, **tensors)
    assert torch.isfinite(full.out).all()
    for t in (0, 3, 8, 14, 21):
        for trial in range(2):
            q2, k2, v2, t2 = _perturbed(t, 1000 * t + trial, q, k, v, tensors)
            other = sparsedsl.reference(ir, q2, k2, v2, params=params, return_details=True, **t2)
            # exactly the same rows, for the output, every branch and every selection
            assert torch.equal(other.out[:, :t + 1], full.out[:, :t + 1]), (name, t)
            for b, o in full.branches.items():
                assert torch.equal(other.branches[b][:, :t + 1], o[:, :t + 1]), (name, b, t)
            for s, o in full.selections.items():
                assert torch.equal(other.selections[s][:, :t + 1], o[:, :t + 1]), (name, s, t)
        # a prefix of the sequence gives the same rows as the whole one
        pre = sparsedsl.reference(ir, q[:, :t + 1], k[:, :t + 1], v[:, :t + 1], params=params,
                                  **{n: x[:, :t + 1] for n, x in tensors.items()})
        torch.testing.assert_close(pre, full.out[:, :t + 1], atol=1e-12, rtol=0)


def test_future_changes_the_past_when_the_proof_is_skipped():
    """The property above has teeth: a spec the causality pass rejects (a top-k over scores
    remapped from a coarser, overlapping grid) does change past rows when evaluated anyway."""
    spec = ("let cg = blocks(8, stride=4)\nlet sg = blocks(4)\n"
            "let sel = topk(remap(dot(q, pool(cg, mean)), sg), 1, forbid=~past(sg))\n"
            "out = attend(tokens(sel) & causal)\n")
    with pytest.raises(sparsedsl.CausalityError):
        sparsedsl.lower(spec)
    ir = sparsedsl.lower(spec, stop_after="resolve-params")
    q, k, v = qkv(1, 16, 1, 1, 4, seed=3)
    full = sparsedsl.reference(ir, q, k, v)
    t = 9
    changed = 0
    for trial in range(20):
        q2, k2, v2, _ = _perturbed(t, trial, q, k, v, {})
        changed += not torch.equal(sparsedsl.reference(ir, q, k2, v)[:, :t + 1], full[:, :t + 1])
    assert changed > 0


# ========================================================== (e) masks from loops
T_M = 29


def _grid(length, stride):
    n = math.ceil(T_M / stride)
    return [(m * stride, m * stride + length) for m in range(n)]  # [start, end)


def _tokens(grid, chosen):
    """Key mask of tokens(B): j lies in a block of B[i]."""
    return lambda i, j: any(s <= j < e for m, (s, e) in enumerate(grid) if chosen(i, m))


def _random_rule(grid, stride, n, seed):
    def chosen(i, m):
        c = i // stride
        eligible = [mm for mm, (s, e) in enumerate(grid) if e - 1 < c * stride]
        ranked = sorted(eligible, key=lambda mm: (-int(HASH(seed, c, mm)), mm))
        return m in ranked[:n]
    return chosen


def _block_rules(length, stride):
    g = _grid(length, stride)
    past = lambda i, m: g[m][1] - 1 <= i  # noqa: E731
    current = lambda i, m: g[m][0] <= i < g[m][1]  # noqa: E731
    future = lambda i, m: g[m][0] > i  # noqa: E731
    first = lambda n: (lambda i, m: m < n)  # noqa: E731
    recent = lambda n: (lambda i, m: i // stride - n < m <= i // stride)  # noqa: E731
    grid = f"let g = blocks({length}, stride={stride})\n"
    return {
        f"past-{length}-{stride}": (grid + "out = attend(tokens(past(g)) & causal)\n",
                                    _tokens(g, past)),
        f"current-{length}-{stride}": (grid + "out = attend(tokens(current(g)) & causal)\n",
                                       _tokens(g, current)),
        f"first-{length}-{stride}": (grid + "out = attend(tokens(first(g, 2)) & causal)\n",
                                     _tokens(g, first(2))),
        f"recent-{length}-{stride}": (grid + "out = attend(tokens(recent(g, 2)) & causal)\n",
                                      _tokens(g, recent(2))),
        f"random-{length}-{stride}": (grid + "out = attend(tokens(random(g, 2, seed=7)) & causal)\n",
                                      _tokens(g, _random_rule(g, stride, 2, 7))),
        f"not-past-{length}-{stride}": (grid + "out = attend(tokens(~past(g) & ~future(g)) & causal)\n",
                                        _tokens(g, lambda i, m: not past(i, m) and not future(i, m))),
        f"first-or-recent-{length}-{stride}": (
            grid + "out = attend(tokens(first(g, 1) | recent(g, 1)) & causal)\n",
            _tokens(g, lambda i, m: m < 1 or i // stride - 1 < m <= i // stride)),
    }


MASKS = {
    "causal": ("out = attend(causal)\n", lambda i, j: True),
    "window": ("out = attend(window(5))\n", lambda i, j: 0 <= i - j < 5),
    "window-1": ("out = attend(window(1))\n", lambda i, j: i == j),
    "sink": ("out = attend(sink(3) & causal)\n", lambda i, j: j < 3),
    "global": ("out = attend(global(4) & causal)\n", lambda i, j: j < 4 or i < 4),
    "strided": ("out = attend(strided(4) & causal)\n", lambda i, j: (i - j) % 4 == 0),
    "strided-offset": ("out = attend(strided(5, offset=2) & causal)\n",
                       lambda i, j: (i - j) % 5 == 2),
    "summary": ("out = attend(summary(6) & causal)\n", lambda i, j: j % 6 >= 5),
    "summary-width": ("out = attend(summary(6, width=3) & causal)\n", lambda i, j: j % 6 >= 3),
    "sink-or-window": ("out = attend((sink(2) | window(4)) & causal)\n",
                       lambda i, j: j < 2 or 0 <= i - j < 4),
    "window-not-sink": ("out = attend(window(6) & ~sink(2))\n",
                        lambda i, j: 0 <= i - j < 6 and not j < 2),
    **_block_rules(6, 6),
    **_block_rules(6, 4),
    **_block_rules(5, 2),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_key_masks_match_loops(name):
    spec, rule = MASKS[name]
    q, k, v = qkv(1, T_M, 2, 1, 4)
    d = sparsedsl.reference(spec, q, k, v, return_details=True)
    got = only(d.keys)
    assert got.shape == (1, 2, T_M, T_M)
    want = torch.tensor([[j <= i and bool(rule(i, j)) for j in range(T_M)] for i in range(T_M)])
    assert torch.equal(got[0, 0], want), (got[0, 0].int() - want.int()).nonzero().tolist()
    assert torch.equal(got[0, 1], want)
    # and the output is softmax attention over exactly those keys, row by row
    scale = 1 / math.sqrt(4)
    for i in (0, 7, T_M - 1):
        js = [j for j in range(T_M) if want[i, j]]
        if not js:
            assert torch.equal(d.out[0, i], torch.zeros(2, 4, dtype=F64))
            continue
        for h in range(2):
            p = torch.softmax(scale * (k[0, js, 0] @ q[0, i, h]), 0)
            torch.testing.assert_close(d.out[0, i, h], p @ v[0, js, 0], atol=1e-12, rtol=0)


def test_blocksets_match_loops():
    """past/current/future/first/recent as block sets [B, Hq, T, N], on an overlapping grid."""
    length, stride = 6, 4
    g = _grid(length, stride)
    spec = (f"let g = blocks({length}, stride={stride})\n"
            "let p = past(g)\nlet c = current(g)\nlet f = future(g)\nlet a = first(g, 2)\n"
            "let r = recent(g, 2)\n"
            "out = union(attend(pool(g, mean), p), attend(tokens(c | f | a | r) & causal))\n")
    q, k, v = qkv(1, T_M, 1, 1, 4)
    d = sparsedsl.reference(spec, q, k, v, return_details=True)
    rules = {
        "p": lambda i, m: g[m][1] - 1 <= i,
        "c": lambda i, m: g[m][0] <= i < g[m][1],
        "f": lambda i, m: g[m][0] > i,
        "a": lambda i, m: m < 2,
        "r": lambda i, m: i // stride - 2 < m <= i // stride,
    }
    for name, rule in rules.items():
        want = torch.tensor([[rule(i, m) for m in range(len(g))] for i in range(T_M)])
        assert torch.equal(d.blocksets[name][0, 0], want), name


# ============================================================ (f) input errors
def test_wrong_rank():
    q, k, v = qkv(1, 10, 2, 1, 4)
    with pytest.raises(ValueError, match=r"`q` must have 4 dimensions .* got shape \(10, 2, 4\)"):
        sparsedsl.reference("moba", q[0], k, v)
    with pytest.raises(ValueError, match="`v` must have 4 dimensions"):
        sparsedsl.reference("moba", q, k, v[0])


def test_not_a_tensor():
    q, k, v = qkv(1, 10, 2, 1, 4)
    with pytest.raises(ValueError, match="`k` must be a tensor"):
        sparsedsl.reference("moba", q, k.tolist(), v)


def test_mismatched_seq():
    q, k, v = qkv(1, 10, 2, 1, 4)
    with pytest.raises(ValueError, match=r"`k` must be \[batch=1, seq=10, kv_heads, head_dim\]"):
        sparsedsl.reference("moba", q, k[:, :9], v)
    with pytest.raises(ValueError, match=r"`v` must be \[batch=1, seq=10"):
        sparsedsl.reference("moba", q, k, v[:, :9])


def test_mismatched_head_dims():
    q, k, v = qkv(1, 10, 2, 1, 4)
    with pytest.raises(ValueError, match="`k` must have head_dim 4 like `q`"):
        sparsedsl.reference("moba", q, k[..., :3], v)
    with pytest.raises(ValueError, match="`v` must have 1 heads like `k`"):
        sparsedsl.reference("moba", q, k, torch.cat([v, v], 2))


def test_value_head_dim_may_differ():
    q, k, v = qkv(1, 10, 2, 1, 4, DV=6)
    out = sparsedsl.reference("moba", q, k, v, block=4)
    assert out.shape == (1, 10, 2, 6)


def test_heads_not_a_multiple():
    q, k, v = qkv(1, 10, 3, 2, 4)
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a multiple of kv heads \(2\)"):
        sparsedsl.reference("moba", q, k, v)


def test_mixed_dtypes():
    q, k, v = qkv(1, 10, 2, 1, 4)
    with pytest.raises(ValueError, match="`q`, `k`, `v` must share one dtype"):
        sparsedsl.reference("moba", q.float(), k, v)


def test_missing_x_when_a_gate_has_no_tensor():
    q, k, v = qkv(1, 10, 2, 1, 4)
    g_cmp, g_slc, _ = gates(1, 10, 2)
    with pytest.raises(ValueError, match=r"spec `nsa` needs input `x` \(\[batch, seq, d_model\]\)"):
        sparsedsl.reference("nsa", q, k, v, g_cmp=g_cmp, g_slc=g_slc, cmp="mean")


def test_x_not_needed_when_every_gate_is_given():
    q, k, v = qkv(1, 10, 2, 1, 4)
    g = gates(1, 10, 2)
    out = sparsedsl.reference("nsa", q, k, v, g_cmp=g[0], g_slc=g[1], g_swa=g[2], cmp="mean",
                              cmp_len=4, cmp_stride=4, sel_len=4, topn=3, window=4)
    assert torch.isfinite(out).all()


def test_missing_learnable_params():
    q, k, v = qkv(1, 40, 2, 1, 4)
    x = randn(torch.Generator().manual_seed(0), 1, 40, 5)
    with pytest.raises(ValueError, match=r"spec `nsa` needs learnable tensor `[\w.]+` of shape "
                                         r"\[\d+(, \d+)?\] in `params`"):
        sparsedsl.reference("nsa", q, k, v, x=x)
    params = sparsedsl.init_params("nsa", head_dim=4, q_heads=2, d_model=5, dtype=F64)
    del params["ckv.k.pe"]
    with pytest.raises(ValueError, match=r"needs learnable tensor `ckv\.k\.pe` of shape \[32, 4\]"):
        sparsedsl.reference("nsa", q, k, v, x=x, params=params)
    params = sparsedsl.init_params("nsa", head_dim=4, q_heads=2, d_model=5, dtype=F64)
    del params["g_swa.weight"]
    with pytest.raises(ValueError, match="needs learnable tensor `g_swa.weight` of shape \\[2, 5\\]"):
        sparsedsl.reference("nsa", q, k, v, x=x, params=params)


def test_learnable_param_of_wrong_shape():
    q, k, v = qkv(1, 40, 2, 1, 4)
    x = randn(torch.Generator().manual_seed(0), 1, 40, 5)
    params = sparsedsl.init_params("nsa", head_dim=4, q_heads=2, d_model=5, dtype=F64)
    params["g_cmp.bias"] = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match=r"learnable tensor `g_cmp.bias` must have shape \[2\], "
                                         r"got \[3\]"):
        sparsedsl.reference("nsa", q, k, v, x=x, params=params)


def test_bad_inputs_of_the_spec():
    q, k, v = qkv(1, 10, 2, 1, 4)
    with pytest.raises(ValueError, match="spec `moba` has no input 'y'; its inputs are: none"):
        sparsedsl.reference("moba", q, k, v, y=q)
    g = gates(1, 10, 2)
    with pytest.raises(ValueError, match=r"gate `g_cmp` must be \[batch=1, seq=10, q_heads=2\]"):
        sparsedsl.reference("nsa", q, k, v, g_cmp=g[0][..., :1], g_slc=g[1], g_swa=g[2],
                            cmp="mean")
    with pytest.raises(ValueError, match=r"input `x` must be \[batch=1, seq=10, d_model\]"):
        sparsedsl.reference("nsa", q, k, v, x=torch.zeros(1, 9, 5, dtype=F64), cmp="mean")


def test_bad_overrides_are_spec_errors():
    q, k, v = qkv(1, 10, 2, 1, 4)
    with pytest.raises(sparsedsl.SpecTypeError, match="parameter `block` is an int"):
        sparsedsl.reference("moba", q, k, v, block="abc")
    with pytest.raises(sparsedsl.ValueRangeError, match="argument `k` of `topk` must be >= 1"):
        sparsedsl.reference("moba", q, k, v, topk=0)
    ir = sparsedsl.lower("moba")
    with pytest.raises(ValueError, match="parameter overrides need a spec"):
        sparsedsl.reference(ir, q, k, v, block=4)


# =============================================================== (g) empty rows
@pytest.mark.parametrize("spec,empty_until", [
    ("let g = blocks(4)\nout = attend(pool(g, mean), past(g))\n", 3),
    ("let g = blocks(3, stride=2)\nout = attend(pool(g, mean), past(g))\n", 2),
    ("let g = blocks(4)\nout = attend(tokens(future(g)) & causal)\n", 10),
    ("out = attend(window(4) & ~window(8))\n", 10),
    ("out = attend(causal & ~causal)\n", 10),
    ("out = attend(sink(2) & ~sink(3))\n", 10),  # rejected by the proof; evaluated anyway
    ("let g = blocks(4)\nout = attend(tokens(random(g, 1)) & causal)\n", 4),
])
def test_rows_without_keys_are_zero(spec, empty_until):
    q, k, v = qkv(2, 10, 2, 1, 4)
    try:
        ir = sparsedsl.lower(spec)
    except sparsedsl.CausalityError:
        ir = sparsedsl.lower(spec, stop_after="resolve-params")
    d = sparsedsl.reference(ir, q, k, v, return_details=True)
    assert not torch.isnan(d.out).any()
    assert torch.equal(d.out[:, :empty_until], torch.zeros_like(d.out[:, :empty_until]))
    if empty_until < 10:
        assert (d.out[:, empty_until:].abs().sum(-1) > 0).all()


def test_nsa_early_rows_have_zero_compression_output():
    q, k, v = qkv(1, 20, 2, 1, 4)
    g = gates(1, 20, 2)
    d = sparsedsl.reference("nsa", q, k, v, g_cmp=g[0], g_slc=g[1], g_swa=g[2], cmp="mean",
                            cmp_len=8, cmp_stride=4, sel_len=8, topn=3, window=4,
                            return_details=True)
    cmp = d.branches["cmp_out"]
    assert torch.equal(cmp[:, :7], torch.zeros_like(cmp[:, :7]))  # no block complete before 7
    assert (cmp[:, 7:].abs().sum(-1) > 0).all()
    assert torch.isfinite(d.out).all()


# ================================================================ empty inputs
@pytest.mark.parametrize("shape", [(1, 0, 2, 1, 4), (0, 5, 2, 1, 4), (1, 5, 2, 1, 0)],
                         ids=["T0", "B0", "D0"])
def test_empty_inputs(shape):
    B, T, hq, hkv, D = shape
    q, k, v = qkv(B, T, hq, hkv, D)
    with pytest.raises(ValueError, match="must not be empty"):
        sparsedsl.reference("moba", q, k, v, block=4)
