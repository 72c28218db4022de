"""The compiled layer under `torch.compile`: one custom operator, no graph breaks.

The layer runs its kernels through `torch.library` custom operators
(`sparsedsl/runtime/custom_op.py`) with fake-tensor shape functions and autograd. Here a
small model using the layer compiles with `fullgraph=True` (a graph break would be an
error) and gives the eager outputs and gradients: with inductor (which needs a C++ compiler
on the CPU) for MoBA, with `aot_eager` (the same fake-tensor tracing and autograd, without
code generation) for NSA's learnable parts and for dynamic shapes; `torch.library.opcheck`
checks the operator's registrations (schema, fake tensors, autograd, AOT dispatch). Plain
eager calls skip the operators' dispatch (`AttendOp.run`); a dispatch mode sees the operators.
Kernels run in Triton's interpreter, so sizes are tiny.
"""
from __future__ import annotations

import contextlib
import shutil

import pytest
import torch

import sparsedsl
import sparsedsl.runtime  # noqa: F401  (chooses Triton's interpreter before torch._dynamo loads Triton)

D_MODEL, HEADS, KV_HEADS, HEAD_DIM = 8, 2, 1, 8
MOBA = dict(block=4, topk=2)
NSA = dict(cmp_len=4, cmp_stride=2, sel_len=4, topn=2, window=3)


class Block(torch.nn.Module):
    """Projections around the compiled attention, as in the README."""

    def __init__(self, spec, **params):
        super().__init__()
        self.qkv = torch.nn.Linear(D_MODEL, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        self.attn = sparsedsl.compile(spec, head_dim=HEAD_DIM, q_heads=HEADS, d_model=D_MODEL,
                                      **params)
        self.out = torch.nn.Linear(HEADS * HEAD_DIM, D_MODEL)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM,
                                     KV_HEADS * HEAD_DIM], -1)
        q, k, v = (t.view(B, T, -1, HEAD_DIM) for t in (q, k, v))
        inputs = {"x": x} if "x" in self.attn.ir.inputs else {}
        return self.out(self.attn(q, k, v, **inputs).flatten(2))


def _eager_and_compiled(model, x, **compile_kwargs):
    """Loss and gradients (model parameters and x) of the eager and the compiled model."""
    results = []
    for fn in (model, torch.compile(model, fullgraph=True, **compile_kwargs)):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y.detach(), xi.grad, {n: p.grad.clone() for n, p in
                                               model.named_parameters()}))
    return results


def _assert_same(eager, compiled, tol):
    (y0, gx0, g0), (y1, gx1, g1) = eager, compiled
    torch.testing.assert_close(y1, y0, rtol=tol, atol=tol)
    torch.testing.assert_close(gx1, gx0, rtol=tol, atol=tol)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=tol, atol=tol, msg=name)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on the CPU needs a C++ compiler")
def test_moba_fullgraph_inductor():
    torch.manual_seed(0)
    model = Block("moba", **MOBA)
    x = torch.randn(1, 12, D_MODEL)
    eager, compiled = _eager_and_compiled(model, x)
    # inductor fuses the projections differently: float32 rounding, not a different result
    _assert_same(eager, compiled, 1e-5)


def test_nsa_fullgraph_one_graph_with_the_operator():
    """Learnable compression MLPs and gates from x: one graph, the operator in it, the
    eager gradients of every parameter."""
    torch.manual_seed(0)
    model = Block("nsa", **NSA)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    eager, compiled = _eager_and_compiled(model, torch.randn(1, 10, D_MODEL), backend=backend)
    _assert_same(eager, compiled, 1e-6)
    assert len(graphs) == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any(t.startswith("sparsedsl.nsa_") for t in targets), targets


def test_dynamic_sequence_length():
    """The shape functions run the generated host code on symbolic sizes."""
    layer = sparsedsl.compile("moba", **MOBA)
    f = torch.compile(lambda q, k, v: layer(q, k, v), fullgraph=True, backend="aot_eager",
                      dynamic=True)
    g = torch.Generator().manual_seed(0)
    for T in (9, 14):
        q, k, v = (torch.randn(1, T, h, HEAD_DIM, generator=g) for h in (2, 1, 1))
        torch.testing.assert_close(f(q, k, v), layer(q, k, v), rtol=1e-6, atol=1e-6)


def test_static_pattern_compiled():
    """A static pattern's tile kernels read key tiles through tensor descriptors; torch.compile
    runs the host code on fake tensors for the shapes (no descriptors then): the compiled
    layer's output and gradients equal the eager ones, and the operator passes opcheck."""
    D = 16  # a head dim that descriptors apply to
    layer = sparsedsl.compile("out = attend((sink(3) | window(6)) & causal)", head_dim=D,
                              q_heads=HEADS)
    f = torch.compile(lambda q, k, v: layer(q, k, v), fullgraph=True, backend="aot_eager",
                      dynamic=True)
    g = torch.Generator().manual_seed(0)
    for T in (9, 40):
        q, k, v = (torch.randn(1, T, h, D, generator=g) for h in (2, 1, 1))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        eager = [t.clone().requires_grad_() for t in (q, k, v)]
        out, ref = f(*leaves), layer(*eager)
        do = torch.randn(out.shape, generator=g)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        for a, b in zip(torch.autograd.grad(out, leaves, do), torch.autograd.grad(ref, eager, do)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    q, k, v = (torch.randn(1, 6, h, D, generator=g) for h in (2, 1, 1))
    torch.library.opcheck(layer.op, (q, k, v, [], [], True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("save", [True, False], ids=["save", "no-save"])
def test_opcheck(save):
    """Schema (no mutation, no aliasing) and fake tensors (the shape functions give the real
    outputs' shapes, strides and dtypes) of the forward and the backward operator."""
    layer = sparsedsl.compile("nsa", head_dim=HEAD_DIM, q_heads=HEADS, d_model=D_MODEL, **NSA)
    g = torch.Generator().manual_seed(0)
    T = 6
    q, k, v = (torch.randn(1, T, h, HEAD_DIM, generator=g) for h in (2, 1, 1))
    gates = [torch.rand(1, T, HEADS, generator=g) for _ in layer._op.gate_names]
    learnable = layer.learnable()
    params = [learnable[n].detach().clone() for n in layer._op.param_names]
    assert layer._op.param_names and len(gates) == 3
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(layer.op, (q, k, v, gates, params, save), test_utils=checks)
    if save:
        outs = layer.op(q, k, v, gates, params, True)
        saved = [outs[i] for _, i in layer._op._saved_at[True]]
        do = torch.randn(outs[0].shape, generator=g)
        torch.library.opcheck(layer._op.backward_op, (q, k, v, gates, params, saved, do),
                              test_utils=checks)


def test_return_lists_compiled():
    layer = sparsedsl.compile("moba", **MOBA)
    f = torch.compile(lambda q, k, v: layer(q, k, v, return_lists=True), fullgraph=True,
                      backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 9, h, HEAD_DIM, generator=g) for h in (2, 1, 1))
    out, lists = f(q, k, v)
    out0, lists0 = layer(q, k, v, return_lists=True)
    torch.testing.assert_close(out, out0, rtol=0, atol=0)
    assert lists.keys() == lists0.keys() == {"sel"}
    assert torch.equal(lists["sel"], lists0["sel"])


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operators dispatched under it and runs them unchanged."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec, params", [("moba", MOBA), ("nsa", NSA)])
def test_eager_calls_skip_the_operators_dispatch(monkeypatch, spec, params):
    """A plain eager call runs the host code without the custom operators, with the same
    outputs and gradients as the operators give (under a dispatch mode, which sees them)."""
    torch.manual_seed(0)
    model = Block(spec, **params)
    x = torch.randn(2, 11, D_MODEL, dtype=torch.float64)
    model = model.double()
    op = model.attn._op

    def run(mode):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        with mode:
            y = model(xi)
            (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        with torch.no_grad(), mode:
            y2 = model(x)
        return y.detach(), y2, xi.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    log = _OpLog()
    via_ops = run(log)
    ours = [n for n in log.names if n.startswith("sparsedsl.")]
    assert any(n.endswith("_bwd.default") for n in ours) and len(ours) == 3, ours

    def refuse(*args, **kwargs):
        raise AssertionError("a plain eager call dispatched the custom operator")
    monkeypatch.setattr(op, "forward", refuse)
    monkeypatch.setattr(op, "backward_op", refuse)
    eager = run(contextlib.nullcontext())
    for a, b in zip(via_ops[:3], eager[:3]):
        assert torch.equal(a, b)
    assert via_ops[3].keys() == eager[3].keys()
    for n in eager[3]:
        assert torch.equal(via_ops[3][n], eager[3][n]), n


def test_eager_ok():
    """What counts as a plain eager call: plain tensors and parameters, no dispatch mode, no
    tensor subclass, no functorch transform."""
    from sparsedsl.runtime.custom_op import eager_ok
    t = torch.zeros(2)
    assert eager_ok(t, torch.nn.Parameter(t))
    with _OpLog():
        assert not eager_ok(t)

    class Sub(torch.Tensor):
        pass
    assert not eager_ok(t, t.as_subclass(Sub))
    seen = []

    def f(u):
        seen.append(eager_ok(u))
        return u
    torch.func.vmap(f)(torch.zeros(3, 2))
    assert seen == [False]
