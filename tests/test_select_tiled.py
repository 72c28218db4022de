"""The query-tiled select kernel for score trees (`emit_tree` in codegen/emit.py): NSA's
`groupsum(remap(probs(...)))` and any other top-k score built from `probs`, `remap`,
`groupsum` and `dot`, BQ queries (x the head set's heads) per program.

Its block lists must equal the per-query kernel's (the same module's fallback, run with
SPARSEDSL_SELECT_TILE=query) exactly in float64, for tile sizes that cut the sequence and
the grids at odd places, and the reference's (up to near ties) in float32. So must the
split select's, the default (a score kernel by query tiles writing a scratch buffer, then
the per-query top-k reading it: `emit_scores`, `ScoredSelectEmitter`), for its tile sizes
and for scratch buffers small enough that the queries run in several chunks.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import sparsedsl
from sparsedsl.codegen.decode import generate_decode
from sparsedsl.codegen.emit import Exprs, select_kernel
from sparsedsl.testing import Shape, spec_inputs
from sparsedsl.testing.oracle import _as_sets, check_layer

# per-head lists (no groupsum) over remapped compression probabilities
HEAD_SPEC = """pattern tree_head "per-head lists over remapped probabilities"
let cblk = blocks(8, stride=4)
let cmp_out = attend(pool(cblk, mean), past(cblk))
let sblk = blocks(12)
let sel = topk(remap(probs(cmp_out), sblk), 3, force=first(sblk, 1) | recent(sblk, 1), forbid=~past(sblk))
out = attend(tokens(sel) & causal)
"""

# two remaps in a row (compressed -> 8-token blocks -> 16-token blocks), summed over the group
NESTED_SPEC = """pattern tree_nested "a remap of a remap, shared by the group"
let cblk = blocks(6, stride=3)
let cmp_out = attend(pool(cblk, mean), past(cblk))
let mid = blocks(8)
let sblk = blocks(16)
let sel = topk(groupsum(remap(remap(probs(cmp_out), mid), sblk)), 2, force=recent(sblk, 1), forbid=~past(sblk))
out = attend(tokens(sel) & causal)
"""

# a group sum of a plain dot product (MoBA's router shared by the group)
DOT_SPEC = """pattern tree_dot "a router summed over the group"
let blk = blocks(8)
let sel = topk(groupsum(dot(q, pool(blk, mean))), 2, force=current(blk), forbid=future(blk))
out = attend(tokens(sel) & causal)
"""

NSA = dict(cmp="mean", cmp_len=8, cmp_stride=4, sel_len=12, topn=3, init_blocks=1,
           local_blocks=2, window=8)
CASES = [  # (id, spec, params, B, T, Hkv, G, D, tiles): BQ,C,WARPS (the query-tiled kernel),
    # query,C,WARPS: the per-query kernel with other chunks (the GPU's default was 16 blocks);
    # None: the default (split), split:BQ,C,WARPS,QC,QWARPS its tiles, scratch:MiB its buffer
    ("nsa-g4", "nsa", NSA, 1, 45, 1, 4, 16, (None, "2,4,1", "1,2,1", "query,16,1", "query,4,1",
                                             "split:1,4,1,4,1", "scratch:0.0002")),
    ("nsa-g16", "nsa", dict(NSA, cmp_len=16, cmp_stride=8, sel_len=8, topn=4), 1, 37, 1, 16, 8,
     (None, "4,8,2", "split:2,8,2,2,1")),
    ("nsa-g1-mlp", "nsa", dict(NSA, cmp="mlp", sel_len=16), 1, 35, 2, 1, 8,
     (None, "2,4,1", "scratch:0.0003")),
    ("head-g2", HEAD_SPEC, {}, 1, 30, 1, 2, 8, (None, "2,4,1", "split:4,4,1,2,1")),
    ("nested-g4", NESTED_SPEC, {}, 1, 41, 1, 4, 8, (None, "2,4,1", "split:2,8,1,4,1")),
    ("dot-g4", DOT_SPEC, {}, 2, 27, 1, 4, 8, (None, "2,4,1", "scratch:0.0002")),
]


def _layer(spec, params, shape: Shape, seed=0):
    layer = sparsedsl.compile(spec, head_dim=shape.head_dim, q_heads=shape.q_heads,
                              d_model=shape.d_model, **params)
    data = spec_inputs(layer.ir, shape, seed, dtype=torch.float64)
    with torch.no_grad():
        for name, p in layer.learnable().items():
            p.copy_(data.params[name])
    return layer, data


class _Skip:
    """A kernel launch that does nothing (the final attention: only the lists matter here)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _lists(layer, data, dtype, tile, monkeypatch):
    mod = layer._kernels(torch.device("cpu"))
    for name in dir(mod):  # the final stage's kernels (row or grouped layout)
        if name.startswith("attend_out_") and name.endswith("_kernel"):
            monkeypatch.setattr(mod, name, _Skip())
    for var in ("SPARSEDSL_SELECT_TILE", "SPARSEDSL_SELECT_SPLIT", "SPARSEDSL_SELECT_SCRATCH"):
        monkeypatch.delenv(var, raising=False)
    if tile is not None and tile.startswith(("split:", "scratch:")):
        kind, value = tile.split(":")
        monkeypatch.setenv("SPARSEDSL_SELECT_" + kind.upper(), value)
    elif tile is not None:
        monkeypatch.setenv("SPARSEDSL_SELECT_TILE", tile)
    to = lambda t: t.to(dtype)  # noqa: E731
    with torch.no_grad():
        _, lists = layer(to(data.q), to(data.k), to(data.v), return_lists=True,
                         **{n: to(t) for n, t in data.tensors.items()})
    return lists


def test_nsa_gets_the_tiled_kernel():
    ir = sparsedsl.lower("nsa")
    layer = sparsedsl.compile("nsa", head_dim=16, q_heads=4, d_model=16)
    st = next(s for s in layer.plan.stages if s.kind == "select")
    assert select_kernel(ir, Exprs(ir, layer.plan), st) == "tree"
    assert "score tree" in layer.plan.strategy
    src = layer.source
    kernel = src.split("def select_sel_fwd_kernel(")[1].split("@triton.jit")[0]
    assert "query-tiled" in kernel and "tl.dot(b_x, b_w" in kernel
    assert "def select_sel_query_fwd_kernel(" in src  # the fallback
    # the default: the split select, scores by query tiles then the per-query top-k
    score = src.split("def select_sel_score_kernel(")[1].split("@triton.jit")[0]
    assert "tl.dot(b_x, b_w" in score and "tl.store(p_s[:, None] + N, b_score" in score
    topk = src.split("def select_sel_topk_kernel(")[1].split("@triton.jit")[0]
    assert "b_score = tl.load(p_s + o_n" in topk and "tl.dot" not in topk
    # decoding keeps one program per query
    dec = generate_decode(layer.ir, layer.plan)
    assert "one query per program" in dec.split("def select_sel_dec_kernel(")[1]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_tiled_lists_equal_per_query_and_reference(case, monkeypatch):
    _, spec, params, B, T, Hkv, G, D, tiles = case
    shape = Shape(batch=B, seq=T, kv_heads=Hkv, group=G, head_dim=D, d_model=8)
    layer, data = _layer(spec, params, shape)
    ir = layer.ir
    st = next(s for s in layer.plan.stages if s.kind == "select")
    assert select_kernel(ir, Exprs(ir, layer.plan), st) == "tree"
    want = _lists(layer, data, torch.float64, "query", monkeypatch)
    for tile in tiles:  # sequence and grids cut at odd places
        got = _lists(layer, data, torch.float64, tile, monkeypatch)
        for name in want:
            assert torch.equal(got[name], want[name]), (tile, name)
    # float32 against the float64 reference (near ties only), the whole layer
    monkeypatch.undo()
    f32 = {n: t.float() for n, t in data.tensors.items()}
    rep = check_layer(layer, data.q.float(), data.k.float(), data.v.float(), f32, 1e-4, 1e-4)
    assert rep.finite and rep.error < 1e-4, rep


def test_select_tile_environment(monkeypatch):
    layer, data = _layer(DOT_SPEC, {}, Shape(seq=9, kv_heads=1, group=2, head_dim=4))
    for bad in ("3,4,1", "4,4", "a,b,c", "0,4,1"):
        monkeypatch.setenv("SPARSEDSL_SELECT_TILE", bad)
        with pytest.raises(ValueError, match="SPARSEDSL_SELECT_TILE"):
            layer(data.q.float(), data.k.float(), data.v.float())
    monkeypatch.delenv("SPARSEDSL_SELECT_TILE")
    for var, bad in (("SPLIT", "2,16,4,16"), ("SPLIT", "2,16,3,16,1"), ("SPLIT", "on"),
                     ("SCRATCH", "0"), ("SCRATCH", "lots")):
        monkeypatch.setenv("SPARSEDSL_SELECT_" + var, bad)
        with pytest.raises(ValueError, match="SPARSEDSL_SELECT_" + var):
            layer(data.q.float(), data.k.float(), data.v.float())
        monkeypatch.delenv("SPARSEDSL_SELECT_" + var)


def test_select_ints_need_dot_sized_chunks_on_a_gpu():
    """On a GPU a chunk of blocks is a tl.dot operand (at least 16); the interpreter takes
    smaller ones (the tests above cut the grids with them)."""
    ns = {}
    exec(layer_source_helpers(), ns)
    assert ns["_select_ints"]("2,4,1", "2,4,1", "", ("BQ", "C", "WARPS"), False) == (2, 4, 1)
    with pytest.raises(ValueError, match="C must be at least 16 on a GPU"):
        ns["_select_ints"]("2,4,1", "2,4,1", "", ("BQ", "C", "WARPS"), True)
    with pytest.raises(ValueError, match="QC must be at least 16 on a GPU"):
        ns["_select_ints"]("x", "2,16,4,8,1", "", ("BQ", "C", "WARPS", "QC", "QWARPS"), True)


def layer_source_helpers() -> str:
    from sparsedsl.codegen.emit import SELECT_HOST
    return SELECT_HOST


TIE_CASES = [  # (id, params, tiles): one free slot after the forced blocks, four
    ("k3", dict(NSA, topn=3, init_blocks=1, local_blocks=1), ("query", "2,4,1")),
    ("k6", dict(NSA, topn=6, init_blocks=1, local_blocks=1),
     ("query", "query,4,1", None, "4,16,2", "split:4,4,1,4,1")),
]


@pytest.mark.parametrize("case", TIE_CASES, ids=[c[0] for c in TIE_CASES])
def test_exact_ties_go_to_the_lowest_index(case, monkeypatch):
    """Zero queries make every compressed block equally likely: the remapped scores tie in
    runs, and each list must be the reference's (the lowest indices among equals), from
    the per-query and the tiled kernel, at chunk sizes that split the runs of ties."""
    _, params, tiles = case
    shape = Shape(batch=1, seq=100, kv_heads=1, group=4, head_dim=8, d_model=8)
    layer, data = _layer("nsa", params, shape)
    q = torch.zeros_like(data.q)
    ref = layer.reference(q, data.k, data.v, return_details=True, **data.tensors)
    zero = dataclasses.replace(data, q=q)
    for tile in tiles:
        got = _lists(layer, zero, torch.float64, tile, monkeypatch)["sel"]
        want = ref.selections["sel"]
        nb = int(max(got.max(), want.max())) + 1
        assert torch.equal(_as_sets(got, nb), _as_sets(want, nb)), tile


# the plain router (`tile` kernel) with forced blocks: rows force one to three blocks, some
# not started yet (they do not count against k), so the rows' free slots differ
FORCE_SPEC = """pattern tile_force "a plain router with forced blocks that count or not"
let blk = blocks(6, stride=4)
let sel = topk(dot(q, pool(blk, mean)), 4, force=first(blk, 1) | recent(blk, 2), forbid=~past(blk))
out = attend(tokens(sel) & causal)
"""
TILE_CASES = [  # (id, spec, params, tiles)
    ("moba", "moba", dict(block=8, topk=3), ("2,4,1", "4,2,1", "8,16,2")),
    ("moba-k1", "moba", dict(block=8, topk=1), ("2,4,1",)),
    ("force", FORCE_SPEC, {}, ("2,4,1", "4,2,1", "8,16,2")),
]


@pytest.mark.parametrize("case", TILE_CASES, ids=[c[0] for c in TILE_CASES])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_tile_router_capped_at_the_free_slots(case, ties, monkeypatch):
    """The plain router's buffer holds only each row's free slots (K less the forced blocks
    that have started): its lists equal the per-query kernel's exactly (float64), at chunk
    sizes that cut the grid at odd places, and with zero queries (every score ties) they are
    the reference's, the lowest indices among equals."""
    _, spec, params, tiles = case
    shape = Shape(batch=2, seq=53, kv_heads=2, group=2, head_dim=8, d_model=8)
    layer, data = _layer(spec, params, shape)
    st = next(s for s in layer.plan.stages if s.kind == "select")
    assert select_kernel(layer.ir, Exprs(layer.ir, layer.plan), st) == "tile"
    kernel = layer.source.split("def select_sel_fwd_kernel(")[1].split("@triton.jit")[0]
    assert "k_steps = tl.max(n_cap, 0)" in kernel
    if ties:
        data = dataclasses.replace(data, q=torch.zeros_like(data.q))
    want = _lists(layer, data, torch.float64, "query", monkeypatch)
    for tile in tiles:
        got = _lists(layer, data, torch.float64, tile, monkeypatch)
        assert torch.equal(got["sel"], want["sel"]), tile
    if ties:
        ref = layer.reference(data.q, data.k, data.v, return_details=True)
        nb = int(max(want["sel"].max(), ref.selections["sel"].max())) + 1
        assert torch.equal(_as_sets(want["sel"], nb), _as_sets(ref.selections["sel"], nb))


# the plain router's merge: unrolled steps for k <= UNROLL_K (capped by the forced blocks, or
# as many as the row with the most candidates needs), a loop beyond; blocks of 3 make many
# chunks, so each chunk's candidates outnumber the buffer's free slots
MERGE_SPEC = """pattern tile_merge "a plain router, k={k}{force_note}"
let blk = blocks(3)
let sel = topk(dot(q, pool(blk, mean)), {k}, {rule})
out = attend(tokens(sel) & causal)
"""
MERGE_CASES = [  # (id, k, forced, unrolled)
    ("k3-free", 3, False, True),
    ("k4-forced", 4, True, True),
    ("k5-forced", 5, True, False),
    ("k6-free", 6, False, False),
]


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_tile_router_merge_unrolled_or_looped(case, monkeypatch):
    """The plain router's merge steps, unrolled under a test the tile takes alike or in a
    loop with a data-dependent count: either way its lists equal the per-query kernel's
    exactly (float64), at chunk sizes that cut the grid at odd places."""
    _, k, forced, unrolled = case
    spec = MERGE_SPEC.format(k=k, rule="force=current(blk), forbid=future(blk)" if forced
                             else "forbid=~past(blk)",
                             force_note=", own block forced" if forced else "")
    layer, data = _layer(spec, {}, Shape(batch=1, seq=61, kv_heads=2, group=1, head_dim=8))
    st = next(s for s in layer.plan.stages if s.kind == "select")
    assert select_kernel(layer.ir, Exprs(layer.ir, layer.plan), st) == "tile"
    kernel = layer.source.split("def select_sel_fwd_kernel(")[1].split("@triton.jit")[0]
    assert ("for _s in tl.static_range(K):" in kernel) == unrolled
    assert ("if _s < k_steps:" in kernel) == (unrolled and forced)
    assert ("if _s < n_steps:" in kernel) == (unrolled and not forced)
    want = _lists(layer, data, torch.float64, "query", monkeypatch)
    assert (want["sel"] >= 0).sum(-1).max() == k  # rows with k blocks listed
    for tile in ("2,4,1", "4,2,1", "8,16,2"):
        got = _lists(layer, data, torch.float64, tile, monkeypatch)
        assert torch.equal(got["sel"], want["sel"]), tile
