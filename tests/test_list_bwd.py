"""The row layout's key-major dk/dv kernel for block-list keys (`attend_<stage>_bwd_dkdv<g>_kernel`):
which groups get it, and its gradients against float64 autograd of the reference, with the
per-query kernel's atomic adds (SPARSEDSL_LIST_BWD=query) as the other side of an A/B. A
gated term of one branch of token ranges only (a window, sinks) beside the lists runs as its
own tile-layout stage (`_static_terms` in codegen/plan.py); a term of several such branches
(a `union`) stays in the row stage, which computes its dk, dv by key tiles
(`attend_<stage>_bwd_dkdv_kernel`).

The kernel walks the rows listing its block (the lists inverted by the generated host helper
`_list_index`) in runs of at most SPARSEDSL_LIST_CHUNK rows (32 in the interpreter: several
runs per block here; `_list_work` cuts them), BT = 16 / G entries a step and 16 keys per
program, so the odd lengths below cut blocks, runs, entry tiles and T at different places.
"""
from __future__ import annotations

import pytest
import torch

import sparsedsl

F64 = torch.float64

# NSA as fla computes it: a group-shared list over a gated sum with compressed attention
NSA_FLA = """\
input g_cmp
input g_slc
let cblk = blocks(8)
let cmp_out = attend(pool(cblk, mean), past(cblk))
let sblk = blocks(8)
let sel = topk(groupsum(remap(probs(cmp_out), sblk)), 3, force=first(sblk, 1) | recent(sblk, 1), forbid=~past(sblk))
let slc_out = attend(tokens(sel) & causal)
out = g_cmp * cmp_out + g_slc * slc_out
"""
# one list per query head (no groupsum), beside a window: the window runs as its own tile
# stage, the gated list branch is key-major
PER_HEAD = """\
input g
let b = blocks(8)
let sel = topk(dot(q, pool(b, mean)), 2, force=current(b), forbid=future(b))
let a = attend(tokens(sel) & causal)
let w = attend(window(5) & causal)
out = g * a + w
"""
# a window with sinks beside a list: one branch of token ranges only (two sources), its own
# tile stage
ROW_TOKENS = """\
input g
let b = blocks(8)
let sel = topk(dot(q, pool(b, mean)), 2, force=current(b), forbid=future(b))
let a = attend(tokens(sel) & causal)
let w = attend((sink(3) | window(6)) & causal)
out = g * a + w
"""
# the same keys as two branches in a union: a group of token ranges only that the row stage
# walks, and whose dk, dv it computes by key tiles (attend_out_bwd_dkdv_kernel), not atomically
ROW_UNION = """\
input g
let b = blocks(8)
let sel = topk(dot(q, pool(b, mean)), 2, force=current(b), forbid=future(b))
let a = attend(tokens(sel) & causal)
let w = union(attend(sink(3) & causal), attend(window(6) & causal))
out = g * a + w
"""
UNION = """\
let b = blocks(8)
let sel = topk(dot(q, pool(b, mean)), 2, force=current(b), forbid=future(b))
out = attend((tokens(sel) | window(5)) & causal)
"""


def _grads(layer, q, k, v, gates, do, runner):
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *gates.values())]
    out = runner(*leaves[:3], **dict(zip(gates, leaves[3:])))
    return torch.autograd.grad(out, leaves, do)


def _check(spec, B, T, Hq, Hkv, D, monkeypatch, mode, layer=None):
    """The layer's output and gradients against float64 autograd of the reference."""
    monkeypatch.setenv("SPARSEDSL_LIST_BWD", mode)
    layer = layer or sparsedsl.compile(spec, head_dim=D, q_heads=Hq, d_model=D).double()
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, T, Hq, D, generator=g, dtype=F64)
    k = torch.randn(B, T, Hkv, D, generator=g, dtype=F64)
    v = torch.randn(B, T, Hkv, D, generator=g, dtype=F64)
    gates = {n: torch.rand(B, T, Hq, generator=g, dtype=F64)
             for n, info in layer.ir.inputs.items() if info.role == "gate"}
    do = torch.randn(B, T, Hq, D, generator=g, dtype=F64)
    reference = lambda *a, **kw: sparsedsl.reference(layer.ir, *a, **kw)  # noqa: E731
    with torch.no_grad():
        out, want = layer(q, k, v, **gates), reference(q, k, v, **gates)
    err = (out - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert err < 1e-10, f"o: {err:.3g}"
    got = _grads(layer, q, k, v, gates, do, layer)
    want = _grads(layer, q, k, v, gates, do, reference)
    for name, x, y in zip(["q", "k", "v", *gates], got, want):
        err = (x - y).abs().max().item() / max(1.0, y.abs().max().item())
        assert err < 1e-10, f"d{name}: {err:.3g}"
    return layer


@pytest.mark.parametrize("mode", ["keys", "query"])
@pytest.mark.parametrize("spec, B, T, Hq, Hkv", [
    (NSA_FLA, 1, 45, 4, 1),
    (NSA_FLA, 2, 29, 2, 2),
    (PER_HEAD, 1, 37, 4, 2),
    (ROW_TOKENS, 2, 41, 4, 2),
    (ROW_UNION, 2, 41, 4, 2),
], ids=["nsa-fla-g4", "nsa-fla-g1-b2", "per-head-lists", "window-sinks-beside-a-list",
        "union-of-tokens-beside-a-list"])
def test_list_keys_gradients(spec, B, T, Hq, Hkv, mode, monkeypatch):
    """dq, dk, dv and the gates' gradients equal the reference's with the key-major kernel
    and with the per-query kernel's atomic adds."""
    layer = _check(spec, B, T, Hq, Hkv, 8, monkeypatch, mode)
    assert "_bwd_dkdv1_kernel" in layer.source or "_bwd_dkdv0_kernel" in layer.source


@pytest.mark.parametrize("chunk", ["1", "1000000"])
def test_list_runs_of_any_length(chunk, monkeypatch):
    """One entry per program, or one program for a block's whole list: the same gradients."""
    monkeypatch.setenv("SPARSEDSL_LIST_CHUNK", chunk)
    _check(NSA_FLA, 1, 45, 4, 1, 8, monkeypatch, "keys")
    _check(PER_HEAD, 1, 37, 4, 2, 8, monkeypatch, "keys")


def test_list_work_covers_every_entry_once():
    """`_list_work` gives each block's entries, cut into runs of at most E, to one program
    each; the programs past the last run have no key."""
    from sparsedsl.codegen.emit import TRITON_PRELUDE
    ns: dict = {}
    exec(TRITON_PRELUDE, ns)
    lengths = [0, 5, 1, 0, 0, 12, 3, 4]
    off = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    off[1:] = torch.cumsum(torch.tensor(lengths), 0)
    n_entries = 40  # an upper bound of sum(lengths), as the host passes sel.numel()
    for E in (1, 3, 4, 100):
        work = ns["_list_work"](off, n_entries, E)
        assert work.shape == (len(lengths) + -(-n_entries // E), 2)
        seen = []
        for key, run in work.tolist():
            if key >= len(lengths):
                continue
            lo = int(off[key]) + run * E
            hi = min(int(off[key + 1]), lo + E)
            assert hi > lo, (E, key, run)  # no program gets an empty run of a real key
            seen += range(lo, hi)
        assert sorted(seen) == list(range(int(off[-1]))), E


def test_which_groups_are_key_major():
    """A group whose token keys are one block list's blocks gets the key-major kernel; a
    union of a list and a window (two sources) keeps the per-query kernel's atomic adds; a
    gated window beside a list is a tile stage of its own, a union of token branches is the
    row stage's group of token keys by key tiles."""
    src = sparsedsl.compile(NSA_FLA, head_dim=8, q_heads=4, d_model=8).source
    assert "def attend_out_bwd_dkdv1_kernel(" in src and "KM1=KM" in src
    assert "def attend_out_bwd_dkdv0_kernel(" not in src  # the compressed branch: pooled
    src = sparsedsl.compile(UNION, head_dim=8, q_heads=4).source
    assert "_bwd_dkdv" not in src
    # one branch of token ranges only beside the list (window, sinks): a tile stage
    for spec in (PER_HEAD, ROW_TOKENS):
        layer = sparsedsl.compile(spec, head_dim=8, q_heads=4, d_model=8)
        assert [(s.name, s.layout) for s in layer.plan.stages if s.kind == "attend"] == [
            ("w", "tile"), ("out", "row")]
        assert "def attend_w_bwd_dkdv_kernel(" in layer.source
        assert "def attend_out_bwd_dkdv_kernel(" not in layer.source
    # a union of token branches beside the list: the row stage's group, by key tiles
    src = sparsedsl.compile(ROW_UNION, head_dim=8, q_heads=4, d_model=8).source
    assert "def attend_out_bwd_dkdv_kernel(" in src
    assert "group 1's token keys: attend_out_bwd_dkdv_kernel" in src


# a list of blocks of L tokens (BN = 32 keys a step in the interpreter) and a window in a
# union with sinks (so the row stage walks it): the row layout, whose forward and dq kernels
# read a chunk of a listed block, and the window's keys, through tensor descriptors where
# they apply
ROW_KEYS = """\
input g
let b = blocks({L})
let sel = topk(dot(q, pool(b, mean)), 3, force=current(b), forbid=future(b))
let a = attend(tokens(sel) & causal)
let w = union(attend(window(37) & causal), attend(sink(2) & causal))
out = g * a + w
"""


@pytest.mark.parametrize("L, row, tma, used", [
    (32, None, "1", True),
    (48, "16,4,3", "1", True),
    (48, None, "1", True),
    (32, None, "0", False),
], ids=["block-of-one-chunk", "block-of-three-chunks", "chunks-across-blocks", "tma-off"])
def test_row_key_tiles_through_tensor_descriptors(monkeypatch, L, row, tma, used):
    """The row layout's forward and dq kernels read a BN-key chunk of a listed block as one
    tile through tensor descriptors when BN divides the block length (its first key from the
    list: the chunk's block, where t0 falls in it), else by gathered loads (blocks of 48 in
    chunks of 32: a chunk spans two blocks), and the window's runs of keys likewise. The same
    output and gradients either way: T = 101 ends the last block early (rows past T read as
    zeros), and the first block's queries have empty slots (-1: block 0's keys, masked).
    (Where `_kv_descs` declines, as for SPARSEDSL_TMA=0, test_tile covers its rules.)"""
    if row:
        monkeypatch.setenv("SPARSEDSL_ROW", row)
        monkeypatch.setenv("SPARSEDSL_ROW_DQ", row)
    monkeypatch.setenv("SPARSEDSL_TMA", tma)
    spec = ROW_KEYS.format(L=L)
    layer = sparsedsl.compile(spec, head_dim=16, q_heads=2, d_model=16).double()
    src = layer.source
    assert "(row layout" in src
    assert src.count(f"if TMA and {L} % BN == 0:") == 2  # forward, dq
    module = layer._op.kernels(torch.device("cpu"))
    seen = []

    def spy(k, v, BN, real=module._kv_descs):
        out = real(k, v, BN)
        seen.append((BN, out[2]))
        return out
    monkeypatch.setattr(module, "_kv_descs", spy)
    _check(spec, 1, 101, 2, 1, 16, monkeypatch, "keys", layer)
    bn = int(row.split(",")[0]) if row else 32
    assert seen == [(bn, used)] * 3, seen  # the forward twice (no grad, then saving), dq


def test_list_bwd_knob(monkeypatch):
    with pytest.raises(ValueError, match="SPARSEDSL_LIST_BWD='atomics': expected keys or query"):
        _check(PER_HEAD, 1, 17, 2, 2, 8, monkeypatch, "atomics")


@pytest.mark.parametrize("shared", [True, False])
def test_list_index_inverts_the_lists(shared):
    """`_list_index` (generated host code) lists, for each (batch, kv head, block), exactly the
    entries whose list holds the block, in query order: a query for group lists, t * G + g for
    per-head lists."""
    from sparsedsl.codegen.emit import TRITON_PRELUDE
    ns: dict = {}
    exec(TRITON_PRELUDE, ns)
    B, T, HKV, G, KS, NB = 2, 13, 3, 2, 3, 5
    HS = HKV if shared else HKV * G
    g = torch.Generator().manual_seed(1)
    sel = torch.full((B, T, HS, KS), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            for h in range(HS):
                n = int(torch.randint(0, KS + 1, (1,), generator=g))
                sel[b, t, h, :n] = torch.randperm(NB, generator=g)[:n].to(torch.int32)
    off, ent = ns["_list_index"](sel, NB, HKV, G, shared)
    for b in range(B):
        for hk in range(HKV):
            for n in range(NB):
                i = (b * HKV + hk) * NB + n
                got = ent[off[i]:off[i + 1]].tolist()
                if shared:
                    want = [t for t in range(T) if n in sel[b, t, hk].tolist()]
                else:
                    want = [t * G + j for t in range(T) for j in range(G)
                            if n in sel[b, t, hk * G + j].tolist()]
                assert got == want, (b, hk, n)
    assert int(off[-1]) == int((sel >= 0).sum())
