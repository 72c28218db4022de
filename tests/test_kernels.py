"""Generated kernels against the dense reference.

On a machine without a GPU the kernels run in Triton's interpreter in float32
(tolerance 1e-4 of the output's scale). `make gpu-test` runs this file on a
CUDA GPU in bfloat16 (tolerance 2e-2): SPARSEDSL_TEST_DEVICE=cuda,
SPARSEDSL_TEST_DTYPE=bfloat16. Outputs are poisoned with NaN (conftest), so an
element no kernel writes fails.
"""
from __future__ import annotations

import os

import pytest
import torch

import sparsedsl
from sparsedsl.testing.oracle import check_layer

DEVICE = os.environ.get("SPARSEDSL_TEST_DEVICE", "cpu")
DTYPE = getattr(torch, os.environ.get("SPARSEDSL_TEST_DTYPE",
                                      "float32" if DEVICE == "cpu" else "bfloat16"))
OUT_TOL = 1e-4 if DTYPE == torch.float32 else 2e-2
SCORE_TOL = 1e-4 if DTYPE == torch.float32 else 3e-2


def _inputs(B, T, Hq, Hkv, D, layer, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEVICE, DTYPE)  # noqa: E731
    q, k, v = mk(B, T, Hq, D), mk(B, T, Hkv, D), mk(B, T, Hkv, dv or D)
    extra = {}
    for name, info in layer.ir.inputs.items():
        if info.role == "x":
            extra[name] = mk(B, T, layer.dims.d_model if layer.dims else 16)
    return q, k, v, extra


def _run(spec, B, T, Hq, Hkv, D, seed=0, exact=True, **params):
    layer = sparsedsl.compile(spec, head_dim=D, q_heads=Hq, d_model=16, **params).to(DEVICE)
    q, k, v, extra = _inputs(B, T, Hq, Hkv, D, layer, seed)
    rep = check_layer(layer, q, k, v, extra, OUT_TOL, SCORE_TOL)
    assert rep.finite
    assert rep.error < OUT_TOL, rep
    if exact and DTYPE == torch.float32:
        assert all(rep.exact_selections.values()), rep
    return rep


MOBA_SHAPES = [  # (B, T, Hq, Hkv, D, block, topk)
    (1, 1, 2, 2, 16, 8, 3),
    (1, 63, 4, 1, 16, 16, 3),
    (2, 40, 2, 2, 32, 8, 2),
    (1, 50, 16, 1, 16, 16, 2),
    (1, 200, 1, 1, 16, 32, 3),
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,block,topk", MOBA_SHAPES,
                         ids=[f"B{s[0]}-T{s[1]}-H{s[2]}/{s[3]}-D{s[4]}-blk{s[5]}-top{s[6]}"
                              for s in MOBA_SHAPES])
def test_moba_builtin(B, T, Hq, Hkv, D, block, topk):
    _run("moba", B, T, Hq, Hkv, D, block=block, topk=topk)


NSA_SHAPES = [  # (B, T, Hq, Hkv, D, params)
    (1, 1, 4, 1, 16, dict(cmp="mean", cmp_len=8, cmp_stride=8, sel_len=8, topn=3, window=4)),
    (1, 63, 4, 1, 16, dict(cmp="mean", cmp_len=8, cmp_stride=8, sel_len=8, topn=3, window=8)),
    (1, 45, 16, 1, 16, dict(cmp="mean", cmp_len=16, cmp_stride=16, sel_len=16, topn=3, window=8)),
    (1, 50, 2, 2, 16, dict(cmp="mlp", cmp_len=8, cmp_stride=4, sel_len=16, topn=3, window=12)),
    (1, 200, 1, 1, 16, dict(cmp="mean", cmp_len=32, cmp_stride=16, sel_len=32, topn=3,
                            window=16)),
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,params", NSA_SHAPES,
                         ids=[f"B{s[0]}-T{s[1]}-H{s[2]}/{s[3]}-{s[5]['cmp']}{s[5]['cmp_len']}"
                              for s in NSA_SHAPES])
def test_nsa_builtin(B, T, Hq, Hkv, D, params):
    _run("nsa", B, T, Hq, Hkv, D, **params)


STATIC = [
    "out = attend(causal)",
    "out = attend(window(7))",
    "out = attend((sink(3) & causal) | window(5))",
    "out = attend((strided(4) | window(3)) & causal)",
    "out = attend(global(2) & causal)",
    "let g = blocks(8, stride=4)\nout = attend(tokens(recent(g, 2) | first(g, 1)) & causal)",
    "let g = blocks(4)\nout = union(attend(pool(g, mean), past(g)), attend(window(5)))",
]


@pytest.mark.parametrize("spec", STATIC, ids=[s.replace("\n", "; ")[:60] for s in STATIC])
def test_static_patterns(spec):
    _run(spec, 1, 37, 2, 1, 16)


def test_rows_without_keys_are_zero():
    """Early queries see no complete compressed block: zeros, never NaN."""
    spec = "let g = blocks(8)\nout = attend(pool(g, mean), past(g))"
    layer = sparsedsl.compile(spec)
    q, k, v, _ = _inputs(1, 20, 2, 1, 16, layer)
    out = layer(q, k, v)
    assert torch.isfinite(out).all()
    assert out[:, :7].abs().max() == 0
    assert out[:, 7:].abs().max() > 0


def test_non_contiguous_inputs():
    layer = sparsedsl.compile("moba", block=8, topk=2)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 2, 30, 16, generator=g).to(DEVICE, DTYPE)
    q = base.transpose(1, 2)  # [1, 30, 2, 16], not contiguous
    k = torch.randn(1, 30, 4, 16, generator=g).to(DEVICE, DTYPE)[:, :, ::2]
    v = torch.randn(1, 30, 2, 16, generator=g).to(DEVICE, DTYPE)
    assert not q.is_contiguous() and not k.is_contiguous()
    rep = check_layer(layer, q, k, v, {}, OUT_TOL, SCORE_TOL)
    assert rep.error < OUT_TOL


# ------------------------------------------------------------------------ gradients
# relative to each gradient's scale, with a floor at 1% of the q/k/v gradients' scale: some
# gradients are zero in theory and only rounding noise here (the compressed keys' output
# bias: a softmax does not change when every logit of a row moves by the same amount)
GRAD_TOL = 1e-4 if DTYPE == torch.float32 else 5e-2


def _grad_errors(spec, B, T, Hq, Hkv, D, **params):
    """Kernel gradients (at the test dtype) against float64 autograd of the reference on the
    kernels' own selections: the largest error relative to each gradient's scale."""
    layer = sparsedsl.compile(spec, head_dim=D, q_heads=Hq, d_model=16, **params).to(DEVICE)
    q, k, v, extra = _inputs(B, T, Hq, Hkv, D, layer, seed=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    extra = {n: t.requires_grad_() for n, t in extra.items()}
    out, lists = layer(q, k, v, return_lists=True, **extra)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE, DTYPE)
    leaves = [q, k, v, *extra.values(), *layer.parameters()]
    mine = torch.autograd.grad(out, leaves, do, allow_unused=True)
    cpu = lambda t: t.detach().double().cpu().requires_grad_()  # noqa: E731
    q2, k2, v2 = cpu(q), cpu(k), cpu(v)
    ex2 = {n: cpu(t) for n, t in extra.items()}
    p2 = {n: cpu(p) for n, p in layer.learnable().items()}
    ref = sparsedsl.reference(layer.ir, q2, k2, v2, params=p2, **ex2,
                              selections={n: s.long().cpu() for n, s in lists.items()})
    by_safe = {safe: n for n, safe in layer._param_names.items()}
    names = [n for n, _ in layer.named_parameters()]
    theirs = torch.autograd.grad(ref, [q2, k2, v2, *ex2.values(), *[p2[by_safe[n]] for n in names]],
                                 do.double().cpu(), allow_unused=True)
    scale = max(float(t.abs().max()) for t in theirs[:3])
    errs = {}
    for label, a, b in zip(["q", "k", "v", *extra, *names], mine, theirs):
        a = torch.zeros_like(b) if a is None else a.detach().double().cpu()
        b = torch.zeros_like(a) if b is None else b
        errs[label] = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-2 * scale)
    return errs


GRAD_CASES = {
    "moba-gqa4": ("moba", (1, 40, 4, 1, 16), dict(block=8, topk=3)),
    "nsa-mlp": ("nsa", (1, 40, 4, 2, 16), dict(cmp_len=8, cmp_stride=4, sel_len=8, topn=3,
                                                window=8)),
    "static-sink-window": ("out = attend((sink(3) & causal) | window(6))", (2, 33, 2, 1, 16), {}),
    # long enough for the GPU's default tiles (64-128 keys or queries) to run whole tiles
    # and key chunks without masks, with partial ones at the edges and a partial last block
    "moba-full-chunks": ("moba", (1, 300, 2, 1, 16), dict(block=128, topk=2)),
    "static-full-tiles": ("out = attend((sink(8) | window(300)) & causal)", (1, 700, 2, 1, 16),
                          {}),
}


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients(name):
    spec, shape, params = GRAD_CASES[name]
    errs = _grad_errors(spec, *shape, **params)
    worst = max(errs, key=errs.get)
    assert errs[worst] < GRAD_TOL, f"worst: d{worst} {errs[worst]:.3g}; all: " + \
        ", ".join(f"{k}={v:.2g}" for k, v in errs.items())
