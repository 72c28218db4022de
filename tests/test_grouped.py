"""The `grouped` strategy (codegen/grouped.py): queries grouped by the block they selected.

Which specs get it, the grouping helper's invariants, and outputs, selections and
gradients against the float64 reference at odd sizes with GQA, including a mask term the
grouped kernels must generate (a window inside the selected blocks). Outputs are poisoned
with NaN (conftest), so an entry no kernel writes fails.
"""
from __future__ import annotations

import os

import pytest
import torch

import sparsedsl
from sparsedsl.testing.oracle import check_layer

# the kernel checks here run float64 on CPU tensors (Triton's interpreter); a GPU run of the
# suite (SPARSEDSL_TEST_DEVICE=cuda) checks the grouped kernels through test_kernels' MoBA cases
cpu_only = pytest.mark.skipif(os.environ.get("SPARSEDSL_TEST_DEVICE", "cpu") != "cpu",
                              reason="float64 kernels on CPU tensors (Triton's interpreter)")

WINDOWED = """pattern moba_windowed "MoBA's selection, keys also limited to a window"
param block = 8
param topk = 2
let blk = blocks(block)
let sel = topk(dot(q, pool(blk, mean)), topk, force=current(blk), forbid=future(blk))
out = attend(tokens(sel) & window(13))
"""


@pytest.mark.parametrize("spec, grouped", [
    ("moba", True),
    (WINDOWED, True),
    ("examples/moba_window_sinks.attn", False),  # a union: keys outside the listed blocks
    ("nsa", False),                              # a gated sum of three branches
    ("examples/sliding_window.attn", False),     # no selection
])
def test_which_specs_are_grouped(spec, grouped):
    layer = sparsedsl.compile(spec, head_dim=8, q_heads=2, d_model=8)
    final = layer.plan.stages[-1]
    assert (final.layout == "grouped") == grouped
    if grouped:
        assert "grouped by selected block" in layer.source.splitlines()[3]


@pytest.mark.parametrize("spec, own", [
    ("moba", True),
    (WINDOWED, True),
    ("let b = blocks(8)\n"  # forced blocks other than the current one: every slot grouped
     "let s = topk(dot(q, pool(b, mean)), 2, force=current(b) | first(b, 1), forbid=future(b))\n"
     "out = attend(tokens(s) & causal)", False),
])
def test_own_block_by_contiguous_tiles(spec, own):
    """Where the top-k forces exactly the current block, every query's list starts with its
    own block: the forward attends it by tiles of contiguous queries and merges the other
    blocks' partials there (no combine kernel, no partial for the own block); otherwise every
    slot is grouped and a combine kernel merges the partials."""
    src = sparsedsl.compile(spec, head_dim=16, q_heads=2).source
    fwd = src[src.index("\ndef forward("):src.index("\ndef backward(")]
    assert ("attend_out_own_kernel[" in fwd) == own
    assert ("attend_out_combine_kernel[" in fwd) == (not own)
    assert ("own=(T, " in fwd) == own


def _helpers(device: torch.device) -> dict:
    """The grouping's host helpers and kernels, as a generated module holds them."""
    layer = sparsedsl.compile("moba", head_dim=8, q_heads=2)
    return layer._op.kernels(device).__dict__


@pytest.mark.parametrize("T, NB, L, BM, programs", [
    (29, 5, 6, 4, None), (61, 4, 16, 3, None), (5, 1, 8, 8, None), (3000, 300, 10, 4, None),
    (3000, 300, 10, 4, 3)])
def test_group_by_block_invariants(monkeypatch, T, NB, L, BM, programs):
    """The ids, the sort, each group's bounds and tiles (`_group_bounds`: the table kernel,
    every program of which computes the groups' table for its own tiles), with and without a
    group's own queries left out, and the backward's tiles from the sizes alone
    (`_group_tiles`), against their definitions. The last size takes several chunks of
    groups and several programs; with `programs` a cap on them, each walks several chunks of
    tiles. On the GPU too (SPARSEDSL_TEST_DEVICE=cuda: the table kernel's barrier)."""
    dev = torch.device(os.environ.get("SPARSEDSL_TEST_DEVICE", "cpu"))
    ns = _helpers(dev)
    if programs:
        monkeypatch.setitem(ns, "_TABLE_PROGRAMS", programs)
    g = torch.Generator().manual_seed(T)
    B, HS, H, KS = 2, 2, 4, 3
    NG = B * H * NB
    sel = torch.randint(-1, NB, (B, T, HS, KS), generator=g, dtype=torch.int32)
    t = torch.arange(T).view(1, T, 1)
    # every query lists its own block first (L * NB >= T), then past blocks or nothing (-1),
    # as a router with the current block forced and the future forbidden does
    sel[..., 0] = t // L
    sel[..., 1:] = torch.where(sel[..., 1:] < t.unsqueeze(-1) // L, sel[..., 1:], -1)
    key, order = (t.cpu() for t in ns["_group_by_block"](sel.to(dev), H, NB))
    assert key.dtype == torch.int16 and order.dtype == torch.int64
    s = sel.repeat_interleave(H // HS, dim=2)
    b, h = torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, 1, H, 1)
    gid = torch.where(s >= 0, (b * H + h) * NB + s, NG).flatten()
    assert torch.equal(key.long(), gid.sort(stable=True).values)
    assert torch.equal(order, gid.sort(stable=True).indices)
    n_listed = int((s >= 0).sum())
    for own in (None, (T, L, NB)):
        goff, gcnt, toff, tcnt, first, tgroup = (t.cpu() for t in ns["_group_bounds"](
            key.to(dev), NG, BM, order.numel(), own=own))
        bound = torch.searchsorted(key.long(), torch.arange(NG + 1))
        assert torch.equal(goff, bound[:NG]) and torch.equal(gcnt, bound[1:] - bound[:NG])
        assert int(gcnt.sum()) == n_listed
        m = torch.arange(NG) % NB
        n_own = (T - m * L).clamp(max=L) if own else torch.zeros(NG, dtype=torch.int64)
        assert torch.equal(toff, goff + n_own) and torch.equal(tcnt, gcnt - n_own)
        if own:  # a group's first entries are its own block's queries, in order
            for gi in range(NG):
                e = order[int(goff[gi]):int(toff[gi])]
                q = (e // (H * KS)) % T
                assert torch.equal(q, torch.arange(int(m[gi]) * L, int(m[gi]) * L + len(q)))
                assert torch.equal(e % KS, torch.zeros_like(e))
        _check_tiles(tcnt, first, tgroup, BM, NG)
        first2, tgroup2 = (t.cpu() for t in ns["_group_tiles"](tcnt.to(dev), BM, order.numel()))
        assert torch.equal(first2, first) and torch.equal(tgroup2, tgroup)
    # the sizes alone, at a bound of the entries with room to spare
    first, tgroup = (t.cpu() for t in ns["_group_tiles"](gcnt.to(dev), BM, 3 * order.numel()))
    _check_tiles(gcnt, first, tgroup, BM, NG)


def _check_tiles(cnt, first, tgroup, BM, NG):
    """Group g's cdiv(cnt[g], BM) tiles start at first[g], in group order; every later tile
    names NG (past the last group)."""
    tiles = -(-cnt // BM)
    assert torch.equal(first, torch.cumsum(tiles, 0) - tiles)
    want = torch.repeat_interleave(torch.arange(NG, dtype=torch.int32), tiles)
    n = len(want)
    assert tgroup.dtype == torch.int32 and len(tgroup) >= n
    assert torch.equal(tgroup[:n], want)
    assert torch.all(tgroup[n:] == NG)


SHARED = """pattern shared_lists "MoBA's router summed over each GQA group: one list per kv head"
let blk = blocks(8)
let sel = topk(groupsum(dot(q, pool(blk, mean))), 3, force=current(blk), forbid=future(blk))
out = attend(tokens(sel) & causal)
"""

UNFORCED = """pattern one_block "each query attends the past block it scores best (block 0: none)"
param block = 8
let blk = blocks(block)
out = attend(tokens(topk(dot(q, pool(blk, mean)), 1, forbid=~past(blk))) & causal)
"""


@cpu_only
@pytest.mark.parametrize("spec, params, B, T, Hq, Hkv", [
    ("moba", dict(block=8, topk=2), 2, 37, 4, 2),
    ("moba", dict(block=7, topk=3), 1, 30, 2, 2),
    (WINDOWED, {}, 1, 33, 2, 1),
    (UNFORCED, {}, 1, 45, 2, 2),  # blocks no query chose: their dk, dv are stored zeros
    ("moba", dict(block=64, topk=3), 2, 50, 2, 1),  # one block: lists of one slot, no partials
    (SHARED, {}, 2, 43, 4, 2),  # lists shared by a kv head's query heads (HS < H)
], ids=["moba-gqa", "moba-odd-block", "windowed", "unforced", "one-block", "shared-lists"])
def test_grouped_outputs_and_gradients(spec, params, B, T, Hq, Hkv):
    _check_grouped(spec, params, B, T, Hq, Hkv)


WIDE_WINDOW = WINDOWED.replace("window(13)", "window(window)").replace(
    "param topk = 2", "param topk = 2\nparam window = 40")


@cpu_only
@pytest.mark.parametrize("spec, params, B, T, Hq, Hkv", [
    ("moba", dict(block=64, topk=3), 1, 211, 2, 1),
    ("moba", dict(block=40, topk=2), 2, 150, 2, 2),
    (WIDE_WINDOW, dict(block=64), 1, 190, 2, 1),
], ids=["moba-block64", "moba-block40-gqa", "window40"])
def test_grouped_full_chunks(monkeypatch, spec, params, B, T, Hq, Hkv):
    """Blocks of several 16-key chunks: the kernels run the chunks every query of a tile
    attends without masks (a past block's, the own block's below the diagonal, a window's
    inside), dk/dv skips the queries before a chunk, a block of 40 ends in a partial chunk.
    Tiles of 16 entries by 16 keys, so the runs start and end inside the blocks."""
    for var in ("SPARSEDSL_GROUPED", "SPARSEDSL_GROUPED_OWN", "SPARSEDSL_GROUPED_DQ",
                "SPARSEDSL_GROUPED_DKDV"):
        monkeypatch.setenv(var, "16,16,1,1")
    layer = sparsedsl.compile(spec, **params)
    assert layer.plan.stages[-1].groups[0][0].full  # inner ranges, given the list
    past = spec == "moba"  # the forward's tiles attend past blocks whole (a partial last chunk)
    for kernel in ("fwd", "own", "bwd_dq", "bwd_dkdv"):
        body = layer.source.split(f"def attend_out_{kernel}_kernel(")[1].split("@triton.jit")[0]
        edges = 1 if past and kernel == "fwd" else 2
        assert body.count("# full: no masks") == 1 and body.count("# edge: masked") == edges
    _check_grouped(spec, params, B, T, Hq, Hkv)


FORBID_NOT_PAST = """pattern not_past "MoBA's picks, forbidding every block not wholly past"
param block = 8
let blk = blocks(block)
let sel = topk(dot(q, pool(blk, mean)), 3, force=current(blk), forbid=~past(blk))
out = attend(tokens(sel) & causal)
"""

@cpu_only
@pytest.mark.parametrize("spec, past", [
    ("moba", True), (FORBID_NOT_PAST, True),
    (WINDOWED, False),  # a window need not hold on a whole past block
    (UNFORCED, False),  # no own block: a tile's block may be its queries' current one
], ids=["moba", "forbid-not-past", "windowed", "unforced"])
def test_forward_walks_past_blocks_whole(monkeypatch, spec, past):
    """When every pick besides the forced current block is a past block and the keys' rule
    holds on a whole past block (causal does), the forward's tiles walk their block without
    bounds or masks (`GroupedEmitter.past`); otherwise the masked edges stay. Either way the
    outputs and gradients match the reference: blocks of 40 keys in tiles of 16 (two whole
    chunks unmasked, a partial one masked), and of 8 (the partial chunk alone)."""
    monkeypatch.setenv("SPARSEDSL_GROUPED", "16,16,1,1")
    layer = sparsedsl.compile(spec)
    body = layer.source.split("def attend_out_fwd_kernel(")[1].split("@triton.jit")[0]
    assert ("a past block: whole" in body) == past
    assert body.count("# edge: masked") == (1 if past else 2)
    _check_grouped(spec, dict(block=40), 1, 173, 2, 1)
    _check_grouped(spec, dict(block=8), 2, 37, 4, 2)


@cpu_only
def test_grouped_dkdv_head_by_head(monkeypatch):
    """The dk/dv kernel's other launch order: head by head, past _BLOCK_MAJOR_PROGRAMS
    programs (the other tests' short grids go block by block), with GQA heads adding into
    shared keys."""
    layer = sparsedsl.compile("moba", block=8, topk=2)
    assert "BLOCK_MAJOR=NP <= _BLOCK_MAJOR_PROGRAMS" in layer.source
    monkeypatch.setitem(layer._op.kernels(torch.device("cpu")).__dict__,
                        "_BLOCK_MAJOR_PROGRAMS", 0)
    _check_grouped("moba", dict(block=8, topk=2), 2, 37, 4, 2)


@cpu_only
def test_grouped_tile_sizes_from_the_environment(monkeypatch):
    """SPARSEDSL_GROUPED / _DQ / _DKDV are read at each call: a dq tile other than the
    forward's (its own tile table), unequal BM and BN and a register cap (a fifth value) give
    the same results; a bad value is refused."""
    monkeypatch.setenv("SPARSEDSL_GROUPED", "16,32,1,1")
    monkeypatch.setenv("SPARSEDSL_GROUPED_OWN", "32,16,1,1")  # own-block tiles of 32 queries
    monkeypatch.setenv("SPARSEDSL_GROUPED_DQ", "32,16,1,1")
    monkeypatch.setenv("SPARSEDSL_GROUPED_DKDV", "16,32,1,1")
    _check_grouped("moba", dict(block=8, topk=2), 2, 37, 4, 2)
    monkeypatch.setenv("SPARSEDSL_GROUPED_DQ", "32,16,1,1,128")  # with a register cap
    _check_grouped("moba", dict(block=8, topk=2), 1, 29, 2, 2)
    layer = sparsedsl.compile("moba", block=8, topk=2)
    x = [torch.randn(1, 20, 2, 16, requires_grad=True) for _ in range(3)]
    monkeypatch.setenv("SPARSEDSL_GROUPED_DQ", "24,16,1,1")
    with pytest.raises(ValueError, match="grouped tile sizes must be powers of two"):
        layer(*x).sum().backward()
    monkeypatch.setenv("SPARSEDSL_GROUPED_DQ", "32,16,1")
    with pytest.raises(ValueError,
                       match=r"SPARSEDSL_GROUPED_DQ takes BM,BN,WARPS,STAGES\[,MAXNREG\[,PROGRAMS\]\]"):
        layer(*x).sum().backward()
    monkeypatch.setenv("SPARSEDSL_GROUPED_DQ", "32,16,1,0")
    with pytest.raises(ValueError, match="warps and stages must be at least 1"):
        layer(*x).sum().backward()


@cpu_only
@pytest.mark.parametrize("programs, tma", [(0, "1"), (3, "1"), (2, "0"), (50, "1")],
                         ids=["a-program-a-tile", "persistent", "persistent-no-tma", "more-than-tiles"])
def test_grouped_persistent_programs(monkeypatch, programs, tma):
    """The forward and dq kernels walk tiles p, p + P, ... of the real tiles: one program a
    tile slot (PROGRAMS 0), a few programs an SM each walking several tiles (4 SMs in the
    interpreter), or more programs than tiles; key tiles through tensor descriptors or
    (SPARSEDSL_TMA=0) masked loads. Every partial output is written once (the test suite
    fills torch.empty with NaN) and dq gets each tile's add once."""
    monkeypatch.setenv("SPARSEDSL_TMA", tma)
    for var in ("SPARSEDSL_GROUPED", "SPARSEDSL_GROUPED_DQ"):
        monkeypatch.setenv(var, f"16,16,1,1,0,{programs}")
    ns = sparsedsl.compile("moba", block=8, topk=2)._op.kernels(torch.device("cpu")).__dict__
    q = torch.zeros(1)
    assert [ns["_grouped_programs"](q, P, 50) for P in (0, 1, 3, 50)] == [50, 4, 12, 50]
    _check_grouped("moba", dict(block=8, topk=2), 2, 37, 4, 2)
    _check_grouped(UNFORCED, {}, 1, 45, 2, 2)  # the combine kernel's path (no own block)


def _check_grouped(spec, params, B, T, Hq, Hkv):
    layer = sparsedsl.compile(spec, **params)
    assert layer.plan.stages[-1].layout == "grouped"
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, T, Hq, 16, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, T, Hkv, 16, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, T, Hkv, 16, generator=g, dtype=torch.float64, requires_grad=True)
    rep = check_layer(layer, q, k, v, {}, out_tol=1e-12, score_tol=1e-12)
    assert rep.finite and rep.error < 1e-12
    out, lists = layer(q, k, v, return_lists=True)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(do)
    qd, kd, vd = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = layer.reference(qd, kd, vd, return_details=True,
                          selections={n: i.long() for n, i in lists.items()})
    ref.out.backward(do)
    for mine, theirs in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)



def _backward_source(spec, **kw):
    src = sparsedsl.compile(spec, head_dim=16, q_heads=4, **kw).source
    return src[src.index("\ndef backward("):]


def _buffers(src, fills=None):
    """{gradient: dtype expression} of the backward's dq, dk, dv buffers; `fills` gets
    {gradient: "zeros" or "empty"} (empty: its kernel is the only writer and stores), or
    the host's choice (`new_kv = torch.empty if G == 1 else torch.zeros`) as its condition."""
    out = {}
    lines = [x.strip() for x in src.splitlines()]
    choice = next((x.split("#")[0].split("=", 1)[1].strip() for x in lines
                   if x.startswith("new_kv = ")), None)
    for g in ("dq", "dk", "dv"):
        line = next(x for x in lines
                    if x.startswith((f"{g} = torch.zeros(", f"{g} = torch.empty(",
                                     f"{g} = new_kv(")))
        out[g] = line.split("dtype=", 1)[1].rstrip(")")
        if fills is not None:
            fills[g] = (choice if line.startswith(f"{g} = new_kv(")
                        else line.split("torch.", 1)[1].split("(", 1)[0])
    return out


def test_single_owner_gradients_skip_float32_buffers():
    """Gradients that one program writes once go straight into the inputs' dtype: MoBA's dk
    and dv when each kv head has one query head (the dk/dv kernel then stores every key
    instead of adding atomically, zeros for blocks no query chose, so the buffers are left
    unfilled), a static pattern's dq, dk and dv, a block-list pattern's dq. Gradients
    added by several programs (MoBA's dq, the keys of row-layout and NSA stages) keep
    float32 buffers. A mean pool that only feeds a router gets no backward (its gradient is
    zero: the selection is not differentiated). Where the one program writing an element is
    the only kernel writing that gradient (`sole_writer`), the buffer is left unfilled
    (torch.empty, NaN in tests: an element no kernel writes fails) and the kernel stores
    without reading it back."""
    fills = {}
    moba = _backward_source("moba")
    assert _buffers(moba, fills) == {"dq": "f32", "dk": "q.dtype if G == 1 else f32",
                                     "dv": "q.dtype if G == 1 else f32"}
    both = "torch.empty if G == 1 else torch.zeros"
    assert fills == {"dq": "zeros", "dk": both, "dv": both}
    assert "STORE=G == 1" in moba and "pool_" not in moba
    static = sparsedsl.compile("out = attend((sink(4) | window(32)) & causal)", head_dim=16,
                               q_heads=4).source
    assert _buffers(static[static.index("\ndef backward("):], fills) == {
        "dq": "q.dtype", "dk": "q.dtype", "dv": "q.dtype"}
    assert fills == {"dq": "empty", "dk": "empty", "dv": "empty"}
    assert "tl.store(p_dq, b_dq, mask=m_dq)" in static
    assert "tl.store(p_dk, b_dk, mask=m_dk)" in static and "tl.load(p_dk" not in static
    rows = _backward_source("let b = blocks(16, stride=8)\n"
                            "let s = topk(dot(q, pool(b, mean)), 2, force=current(b), "
                            "forbid=future(b))\n"
                            "out = attend(tokens(s) & causal)")
    assert _buffers(rows, fills) == {"dq": "q.dtype", "dk": "f32", "dv": "f32"}
    assert fills == {"dq": "empty", "dk": "zeros", "dv": "zeros"}
    nsa = _backward_source("nsa", d_model=32)
    assert _buffers(nsa, fills) == {"dq": "f32", "dk": "f32", "dv": "f32"}
    assert fills == {"dq": "zeros", "dk": "zeros", "dv": "zeros"}
