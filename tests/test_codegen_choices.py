"""Code the emitter writes differently by spec, for choices measured on the H100
(docs/perf-notes.md, sessions 10 and 11). The numbers themselves are checked elsewhere
(test_kernels, test_pooled_bwd, test_list_bwd); here: that each spec gets the code its
choice says.
"""
from __future__ import annotations

import re

import pytest
import torch

import sparsedsl

from .test_list_bwd import NSA_FLA, _check
from .test_pooled_bwd import SPECS as POOLED


def _kernel(source: str, name: str) -> str:
    return source.split(f"def {name}(")[1].split("@triton.jit")[0]


def _first_loop(kernel: str) -> int:
    return re.search(r"\n\s+for \w+ in range\(", kernel).start()


def test_pooled_pv_is_one_product_only_where_the_backward_sums_its_own_delta():
    # NSA as fla: the compressed branch is its group alone, its backward sums delta = p . dp
    own = sparsedsl.compile(NSA_FLA, head_dim=8, q_heads=4, d_model=8)
    fwd = _kernel(own.source, "attend_cmp_out_fwd_kernel")
    assert "tl.dot(b_p.to(b_v.dtype), b_v" in fwd and "b_ph" not in fwd
    # one softmax over pooled blocks and tokens: delta comes from o, so p stays a hi + lo pair
    union = sparsedsl.compile(POOLED["union-overlap"], head_dim=8, q_heads=4, d_model=8)
    fwd = [k for k in union.source.split("@triton.jit") if "_fwd_kernel(" in k and "kp" in k]
    assert fwd and all("b_ph = b_p.to(b_v.dtype)" in k for k in fwd)


def _row_forward(spec, **kw) -> str:
    layer = sparsedsl.compile(spec, head_dim=8, q_heads=4, d_model=8, **kw)
    return _kernel(layer.source, "attend_out_fwd_kernel")


# NSA's paper layout with the window in a union with sinks: the row stage walks the selected
# blocks and that union (two walks) after the compressed branch's earlier stage
TWO_WALKS = """\
input g_cmp
input g_slc
input g_win
let cblk = blocks(4, stride=2)
let cmp_out = attend(pool(cblk, mean), past(cblk))
let sblk = blocks(4)
let sel = topk(groupsum(remap(probs(cmp_out), sblk)), 2, force=recent(sblk, 1), forbid=~past(sblk))
let win = union(attend(window(5) & causal), attend(sink(1) & causal))
out = g_cmp * cmp_out + g_slc * attend(tokens(sel) & causal) + g_win * win
"""


def test_an_earlier_stage_output_is_read_after_two_walks_not_one():
    two = _row_forward(TWO_WALKS)
    assert _first_loop(two) < two.index("acc0 = tl.load(o") and "b_pre" not in two
    # NSA as fla: one walk; the compressed output is merged before it
    fla = _row_forward(NSA_FLA)
    assert "b_pre = tl.load(o" in fla and fla.index("b_pre = tl.load(o") < _first_loop(fla)
    # NSA's paper defaults: the window is a tile stage of its own, so the row stage walks
    # the selected blocks alone: one walk, both earlier outputs merged in group order (the
    # compressed one before the walk, the window's after it), none deferred
    paper = _row_forward("nsa")
    assert paper.count("b_pre = tl.load(o") == 2 and "acc0 = tl.load(o" not in paper
    assert paper.index("b_pre = tl.load(o") < _first_loop(paper) < paper.rindex("b_pre = tl.load(o")


@pytest.mark.parametrize("window", ["union", "stage"])
def test_deferred_output_gradients_match_the_reference(window, monkeypatch):
    # the paper's layout (cmp, selected, window) with small blocks, float64 against autograd:
    # the window in a union with sinks walked by the row stage after the earlier output
    # (deferred), or alone, as a tile stage of its own (both earlier outputs merged first)
    spec = TWO_WALKS if window == "union" else TWO_WALKS.replace(
        "union(attend(window(5) & causal), attend(sink(1) & causal))", "attend(window(5) & causal)")
    layer = _check(spec, 1, 37, 4, 1, 8, monkeypatch, "keys")  # dq, dk, dv, d(gates)
    fwd = _kernel(layer.source, "attend_out_fwd_kernel")
    assert ("acc0 = tl.load(o" in fwd) == (window == "union")
    assert [s.layout for s in layer.plan.stages if s.kind == "attend"] == (
        ["tile", "row"] if window == "union" else ["tile", "tile", "row"])
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 37, h, 8, generator=g, dtype=torch.float64) for h in (4, 1, 1))
    gates = {n: torch.rand(2, 37, 4, generator=g, dtype=torch.float64)
             for n in ("g_cmp", "g_slc", "g_win")}
    gates["g_cmp"][:, :5] = 0.  # (rows whose compressed branch sees no block: lse = -inf)
    out = layer(q, k, v, **gates)
    want = sparsedsl.reference(layer.ir, q, k, v, **gates)
    assert torch.isfinite(out).all()
    assert (out - want).abs().max().item() < 1e-10


def test_values_are_pooled_only_where_something_reads_them():
    """MoBA's mean pool feeds only the router's scores: its forward pools the keys alone (no
    values pooled, none saved). NSA's compressed branch attends its pools: keys and values.
    An MLP pool that feeds a router runs a backward, which reads the pooled values."""
    moba = sparsedsl.compile("moba", head_dim=8, q_heads=4).source
    fwd = moba[moba.index("\ndef forward("):moba.index("\ndef backward(")]
    assert fwd.count("pool_n2_fwd_kernel[") == 1 and "vp2" not in fwd
    assert "keys only: no branch attends it" in fwd
    nsa = sparsedsl.compile(NSA_FLA, head_dim=8, q_heads=4, d_model=8).source
    fwd = nsa[nsa.index("\ndef forward("):nsa.index("\ndef backward(")]
    assert "vp3 = torch.empty(" in fwd and "vp3=vp3" in fwd
    mlp = sparsedsl.compile("let b = blocks(4)\nlet s = topk(dot(q, pool(b, mlp)), 1, "
                            "force=current(b), forbid=future(b))\n"
                            "out = attend(tokens(s) & causal)", head_dim=8, q_heads=2,
                            d_model=8).source
    assert "vp2=vp2" in mlp and "saved['vp2']" in mlp
