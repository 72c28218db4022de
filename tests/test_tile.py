"""The tile layout's kernels (static patterns): forward with unmasked full tiles, dq by query
tiles and dk/dv by key tiles (no atomics), against the float64 reference.

In the interpreter the tile kernels run 16 x 16 tiles (`_tile_config`), so at the odd
lengths below a pattern has several query and key tiles of each kind: full (no masks),
partial at the window's edges and at the sinks, and past T.
"""
from __future__ import annotations

import pytest
import torch

import sparsedsl
from sparsedsl.codegen import emit as emit_mod

F64 = torch.float64
TOL = 1e-10  # float64 kernels against float64 autograd, relative to each tensor's scale

WINDOW_SINKS = "out = attend((sink(5) | window(40)) & causal)"
STATIC_MIX = """\
input g1
input g2
let g = blocks(16)
let a = attend((sink(5) | window(40)) & causal)
let b = attend(tokens(recent(g, 2) | first(g, 1)) & causal)
out = g1 * a + g2 * b
"""


def _data(layer, B, T, Hq, Hkv, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    q, k, v = mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, D)
    gates = {n: torch.rand(B, T, Hq, generator=g, dtype=F64)
             for n, info in layer.ir.inputs.items() if info.role == "gate"}
    do = mk(B, T, Hq, D)
    return q, k, v, gates, do


def _errors(spec, B, T, Hq, Hkv, D):
    """Output and every gradient of the layer against the reference, both float64: the
    largest error of each relative to the reference's scale."""
    layer = sparsedsl.compile(spec, head_dim=D, q_heads=Hq).double()
    q, k, v, gates, do = _data(layer, B, T, Hq, Hkv, D)
    outs, grads = [], []
    for run in (layer, lambda *a, **kw: sparsedsl.reference(layer.ir, *a, **kw)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, *gates.values())]
        out = run(*leaves[:3], **dict(zip(gates, leaves[3:])))
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out, leaves, do))
    errs = {"o": float((outs[0] - outs[1]).abs().max() / outs[1].abs().max())}
    for name, a, b in zip(["q", "k", "v", *gates], *grads):
        errs[name] = float((a - b).abs().max() / max(float(b.abs().max()), 1e-30))
    assert torch.isfinite(outs[0]).all()
    return errs


@pytest.mark.parametrize("B,Hq,Hkv", [(2, 2, 2), (1, 4, 1)], ids=["gqa1", "gqa4"])
def test_window_sinks_causal_odd_length(B, Hq, Hkv):
    """Sinks + window + causal at T = 70 (not a multiple of 16): query tiles 2 and 3 have a
    full key tile between masked ones, the last tile has rows past T."""
    errs = _errors(WINDOW_SINKS, B, 70, Hq, Hkv, 16)
    assert max(errs.values()) < TOL, errs


def test_static_gated_sum_of_two_patterns():
    """Two softmax groups, one per gate, over token and block-token sources (union of
    recent and first blocks: inner ranges from block sets)."""
    errs = _errors(STATIC_MIX, 1, 53, 4, 2, 16)
    assert max(errs.values()) < TOL, errs


def test_tile_sizes_from_the_environment(monkeypatch):
    """SPARSEDSL_TILE / _DQ / _DKDV are read at each call: unequal BM and BN give the same
    results; a bad value is refused."""
    monkeypatch.setenv("SPARSEDSL_TILE", "32,16,4,1")
    monkeypatch.setenv("SPARSEDSL_TILE_DQ", "16,32,4,1")
    monkeypatch.setenv("SPARSEDSL_TILE_DKDV", "32,16,4,1")
    errs = _errors(WINDOW_SINKS, 1, 75, 2, 1, 16)
    assert max(errs.values()) < TOL, errs
    monkeypatch.setenv("SPARSEDSL_TILE", "24,16,4,1")
    layer = sparsedsl.compile(WINDOW_SINKS, head_dim=16, q_heads=2)
    with pytest.raises(ValueError, match="powers of two"):
        layer(*(torch.randn(1, 20, h, 16) for h in (2, 1, 1)))


@pytest.mark.parametrize("tma, D, used", [("1", 16, True), ("0", 16, False), ("1", 24, False)],
                         ids=["tma", "tma-off", "head-dim-24"])
def test_key_tiles_through_tensor_descriptors(monkeypatch, tma, D, used):
    """The forward and dq kernels read a tile of token keys and values through tensor
    descriptors (TMA) where they apply and by masked loads otherwise (SPARSEDSL_TMA=0; a head
    dim that is not a power of two): the same results either way, the tiles past T included
    (zeros both ways)."""
    monkeypatch.setenv("SPARSEDSL_TMA", tma)
    layer = sparsedsl.compile(WINDOW_SINKS, head_dim=D, q_heads=2)
    module = layer._op.kernels(torch.device("cpu"))
    seen = []

    def spy(k, v, BN, real=module._kv_descs):
        out = real(k, v, BN)
        seen.append(out[2])
        return out
    monkeypatch.setattr(module, "_kv_descs", spy)
    errs = _errors(WINDOW_SINKS, 1, 70, 2, 1, D)
    assert max(errs.values()) < TOL, errs
    assert len(seen) == 2 and set(seen) == {used}  # forward, dq
    monkeypatch.setenv("SPARSEDSL_TMA", "yes")
    with pytest.raises(ValueError, match="SPARSEDSL_TMA takes 0"):
        layer(*(torch.randn(1, 20, h, D) for h in (2, 1, 1)))


def test_deterministic_header_and_no_atomics():
    """A static pattern over tokens: no atomic adds anywhere, and the header says so; a
    pattern over pooled keys keeps its atomics and says it is not deterministic."""
    src = sparsedsl.compile(WINDOW_SINKS).source
    assert "atomic_add" not in src
    assert "backward yes" in src and "bwd_dkdv_kernel" in src
    pooled = sparsedsl.compile("let g = blocks(4)\nout = union(attend(pool(g, mean), past(g)), "
                               "attend(window(5)))").source
    assert "backward no" in pooled and "bwd_dkdv_kernel" in pooled


# ----------------------------------------------------- every run of the walks is taken
def _poisoned(monkeypatch, tmp_path, cls, method, line, tag):
    """Compile WINDOW_SINKS with `line` added to the code `cls.method` emits (a fresh spec
    text and cache directory: the poisoned module is never reused)."""
    monkeypatch.setenv("SPARSEDSL_CACHE_DIR", str(tmp_path))
    orig = getattr(cls, method)

    def patched(self, *a, **kw):
        out = orig(self, *a, **kw)
        if method != "_dkdv_tile" or a[5]:  # _dkdv_tile: only its unmasked runs
            self.c(line) if method != "_dkdv_tile" else a[0](line)
        return out
    monkeypatch.setattr(cls, method, patched)
    return sparsedsl.compile(f"# poisoned: {tag}\n" + WINDOW_SINKS, head_dim=16, q_heads=2)


def _run(layer, T=70):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, T, h, 16, generator=g).requires_grad_() for h in (2, 1, 1))
    out = layer(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return out.detach(), dq, dk


def _rows_nan(x):
    return torch.isnan(x)[0].flatten(1).any(-1)  # [T]: a row with a NaN


def test_forward_full_and_edge_runs(monkeypatch, tmp_path):
    """Poisoning the forward's unmasked runs spoils exactly the rows of query tiles that
    have full key tiles: some rows, not all (the first tile and the last, partial one have
    none); poisoning its masked runs spoils every row."""
    out, _, _ = _run(_poisoned(monkeypatch, tmp_path, emit_mod.TileAttendEmitter,
                               "_update_full", "acc0 = acc0 + float('nan')", "fwd-full"))
    bad = _rows_nan(out)
    assert bad.any() and not bad.all(), bad
    assert not bad[:16].any() and not bad[64:].any()  # no full tiles: the first, the last
    monkeypatch.undo()
    out, _, _ = _run(_poisoned(monkeypatch, tmp_path, emit_mod.TileAttendEmitter, "_update",
                               "acc0 = acc0 + float('nan')", "fwd-edge"))
    assert _rows_nan(out).all()


def test_backward_full_runs(monkeypatch, tmp_path):
    """The dq kernel's and the dk/dv kernel's unmasked runs are taken for some tiles only."""
    _, dq, _ = _run(_poisoned(monkeypatch, tmp_path, emit_mod.TileAttendBwdEmitter,
                              "_update_full", "b_dq = b_dq + float('nan')", "dq-full"))
    bad = _rows_nan(dq)
    assert bad.any() and not bad.all(), bad
    monkeypatch.undo()
    _, _, dk = _run(_poisoned(monkeypatch, tmp_path, emit_mod.TileAttendBwdEmitter,
                              "_dkdv_tile", "b_dk = b_dk + float('nan')", "dkdv-full"))
    bad = _rows_nan(dk)
    assert bad.any() and not bad.all(), bad
    assert not bad[64:].any()  # the last, partial key tile has no full query tile
