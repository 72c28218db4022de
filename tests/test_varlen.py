"""Packed variable-length batches (`cu_seqlens`, flash-attn's convention) on compiled layers.

* Property, over generated specs and random length splits (lengths 0 and 1, sequences
  shorter than one block, a single sequence): the packed output equals, row for row, the
  layer run on each sequence alone (float64), and the dense reference on each sequence
  alone; the returned block lists are each sequence's own. Outputs are allocated NaN-filled
  (`poison_empty`), so a row no kernel writes fails.
* Property: every gradient through the packed path (q, k, v, given gates or `x`, learnable
  tensors) equals the sum over the sequences run alone (float64).
* The built-ins MoBA and NSA packed with odd lengths, outputs and gradients.
* Each validation error, raised before any kernel runs; `torch.compile` with `fullgraph`.

Kernels run in Triton's interpreter without a GPU, so sizes are tiny.
"""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl
import sparsedsl.runtime  # noqa: F401  (chooses Triton's interpreter before torch._dynamo loads Triton)
from sparsedsl.testing import SpecInputs, poison_empty, spec_inputs
from sparsedsl.testing.oracle import _as_sets, _check_near_ties, Report
from sparsedsl.testing.strategies import cases

F64 = torch.float64
OUT_TOL = 1e-9  # float64 kernels against the float64 reference, relative to the output's scale
SAME_TOL = 1e-12  # float64: the packed run against each sequence run alone
GRAD_TOL = 1e-10
# the interpreter runs every program in Python and a packed call runs num_seqs x max_seqlen
# rows: few examples, short sequences, specs nested one level (every construct still drawn;
# deeper nesting is tests/test_kernel_properties.py's); the seq of the drawn shape is unused
EXAMPLES = int(os.environ.get("SPARSEDSL_VARLEN_EXAMPLES", "6"))
GRAD_EXAMPLES = int(os.environ.get("SPARSEDSL_VARLEN_GRAD_EXAMPLES", "3"))
SHAPES = dict(max_seq=1, max_batch=1, kv_heads=(1,), groups=(1, 2), head_dims=(2, 8))
CASES = cases(shape_options=SHAPES, max_depth=1)

# lengths of the packed sequences: empty, one token, short (often under one block), longer
LENGTHS = st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(2, 5), st.integers(1, 10)),
                   min_size=1, max_size=3).filter(lambda ls: sum(ls) > 0)
EXTRA = st.sampled_from([None, 0, 3])  # max_seqlen: not given, the longest, or 3 more


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _spans(cu: torch.Tensor):
    """(start, end) of every non-empty sequence."""
    c = cu.tolist()
    return [(a, b) for a, b in zip(c[:-1], c[1:]) if b > a]


def _sl(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    return t[:, a:b]


def _layer(case_text, shape, data=None):
    layer = sparsedsl.compile(case_text, head_dim=shape.head_dim, q_heads=shape.q_heads,
                              head_dim_v=shape.dv, d_model=shape.d_model).double()
    if data is not None:
        with torch.no_grad():
            for n, p in layer.learnable().items():
                p.copy_(data.params[n])
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))


def _check_against_reference(layer, q, k, v, ins, out, lists, tol, where=""):
    """`out` and `lists` (one sequence's rows of a packed call) against the dense reference
    on that sequence alone: selections equal up to near-ties, outputs given the selections."""
    ref = layer.reference(q, k, v, return_details=True, **ins)
    given = {}
    for name, idx in lists.items():
        n = ref.blocksets[name].shape[-1]
        mine, theirs = _as_sets(idx, n), _as_sets(ref.selections[name], n)
        if not torch.equal(mine, theirs):
            _check_near_ties(name, mine, theirs, ref.scores[name], 1e-9, Report(0.0))
        given[name] = idx.long()
    if given:
        ref = layer.reference(q, k, v, return_details=True, selections=given, **ins)
    err = _rel(out.double(), ref.out)
    assert err < tol, f"{where}: error {err:.3g} against the reference"


# ------------------------------------------------------------------------ the check
def _compare(layer, data, cu, *, max_seqlen=None, grads=False, reference=True, out_tol=OUT_TOL,
             same_tol=SAME_TOL, seed=0, where=""):
    """One packed call against each non-empty sequence run alone: outputs row for row, block
    lists as sets, optionally the dense reference on each sequence, and optionally every
    gradient (q, k, v, inputs, parameters) against the sum over the sequences alone."""
    T = int(cu[-1])
    params = list(layer.parameters())
    names = ["q", "k", "v"] + list(data.tensors) + [n for n, _ in layer.named_parameters()]
    leaves = []
    for _ in range(2):  # the packed call's leaves, then the lone calls'
        q, k, v = (t.clone().requires_grad_(grads) for t in (data.q, data.k, data.v))
        ins = {n: t.clone().requires_grad_(grads) for n, t in data.tensors.items()}
        leaves.append((q, k, v, ins))
    with torch.set_grad_enabled(grads):
        q, k, v, ins = leaves[0]
        with poison_empty():  # a row no kernel writes stays NaN
            out, lists = layer(q, k, v, return_lists=True, cu_seqlens=cu, max_seqlen=max_seqlen,
                               **ins)
        assert out.shape == (1, T, q.shape[2], data.v.shape[-1] if layer.dims is None
                             else layer.dims.head_dim_v)
        assert all(t.shape[:2] == (1, T) for t in lists.values())
        assert torch.isfinite(out).all(), f"rows left unwritten\n{where}"
        q, k, v, ins = leaves[1]
        alone = {}
        for a, b in _spans(cu):
            with poison_empty():
                alone[a, b] = layer(_sl(q, a, b), _sl(k, a, b), _sl(v, a, b), return_lists=True,
                                    **{n: _sl(t, a, b) for n, t in ins.items()})
    for (a, b), (o, ls) in alone.items():
        at = f"sequence [{a}, {b}) of {cu.tolist()}\n{where}"
        assert _rel(_sl(out, a, b).detach(), o.detach()) < same_tol, at
        mine = {n: _sl(t, a, b) for n, t in lists.items()}
        for name, idx in mine.items():  # the same blocks, relative to the sequence's start
            # (none past its end: in the padded batch a top-k may pick blocks of the padding)
            n = max(int(idx.max()), int(ls[name].max()), 0) + 1
            assert torch.equal(_as_sets(idx, n), _as_sets(ls[name], n)), \
                f"selection `{name}` differs, {at}"
        if reference:
            d = lambda t: _sl(t, a, b).detach().double()  # noqa: E731
            _check_against_reference(layer, d(data.q), d(data.k), d(data.v),
                                     {n: d(t) for n, t in data.tensors.items()},
                                     _sl(out, a, b).detach(), mine, out_tol, at)
    if not grads:
        return
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    mine = _grads((out * do).sum(), [*leaves[0][:3], *leaves[0][3].values(), *params])
    loss = sum((o * _sl(do, a, b)).sum() for (a, b), (o, _) in alone.items())
    theirs = _grads(loss, [*leaves[1][:3], *leaves[1][3].values(), *params])
    scale = max(float(t.abs().max()) for t in theirs[:3]) or 1.0
    for name, x, y in zip(names, mine, theirs):
        assert torch.isfinite(x).all(), f"d{name} not finite\n{where}"
        err = float((x - y).abs().max()) / max(float(y.abs().max()), 1e-3 * scale)
        assert err < GRAD_TOL, f"d{name}: error {err:.3g}, {cu.tolist()}\n{where}"


def _grads(loss, leaves):
    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, leaves)]


# ------------------------------------------------------------------------ properties
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=CASES, lengths=LENGTHS, extra=EXTRA)
def test_packed_equals_each_sequence_alone(case, lengths, extra):
    """Outputs and lists against each sequence alone and the reference (float64)."""
    cu = _cu(lengths)
    shape = replace(case.shape, batch=1, seq=int(cu[-1]))
    data = spec_inputs(case.ir, shape, case.seed, dtype=F64)
    _compare(_layer(case.text, shape, data), data, cu, where=case.text,
             max_seqlen=None if extra is None else max(lengths) + extra)


@settings(max_examples=GRAD_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=CASES, lengths=LENGTHS)
def test_packed_gradients_equal_sum_over_sequences(case, lengths):
    """Every gradient (gates given as tensors, so that they get one) against the sum over
    the sequences alone (float64)."""
    cu = _cu(lengths)
    shape = replace(case.shape, batch=1, seq=int(cu[-1]))
    data = spec_inputs(case.ir, shape, case.seed, dtype=F64, override_gates=True)
    _compare(_layer(case.text, shape, data), data, cu, grads=True, reference=False,
             seed=case.seed, where=case.text)


# ----------------------------------------------------------------------- built-ins
BUILTINS = {
    "moba": (dict(block=4, topk=2), [7, 1, 0, 10, 3]),
    "nsa": (dict(cmp_len=4, cmp_stride=2, sel_len=4, topn=2, window=3), [3, 0, 9, 1]),
}


def _builtin(name, dtype=torch.float32):
    params, lengths = BUILTINS[name]
    layer = sparsedsl.compile(name, head_dim=8, q_heads=2, d_model=6, **params).to(dtype)
    cu = _cu(lengths)
    T = int(cu[-1])
    g = torch.Generator().manual_seed(len(name))
    q, k, v = (torch.randn(1, T, h, 8, generator=g, dtype=dtype) for h in (2, 1, 1))
    ins = {}
    if name == "nsa":  # one gate given as a tensor, the other two sigmoid(linear(x))
        ins = {"x": torch.randn(1, T, 6, generator=g, dtype=dtype),
               "g_cmp": torch.rand(1, T, 2, generator=g, dtype=dtype)}
    return layer, cu, SpecInputs(q, k, v, ins)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtin_packed_odd_lengths(name):
    """Float64: outputs, lists, the reference and every gradient (NSA: a given gate tensor,
    x, the learnable compression and gate projections), lengths 0, 1, under and over a
    block, max_seqlen given."""
    layer, cu, data = _builtin(name, F64)
    _compare(layer, data, cu, max_seqlen=10, grads=True, where=name)


def test_one_sequence_is_the_plain_call():
    layer, _, d = _builtin("moba")
    cu = torch.tensor([0, d.q.shape[1]], dtype=torch.int32)
    with torch.no_grad():
        assert torch.equal(layer(d.q, d.k, d.v, cu_seqlens=cu), layer(d.q, d.k, d.v))


def test_reference_packed():
    """`layer.reference(..., cu_seqlens=)`: each sequence's reference, packed back."""
    layer, cu, d = _builtin("nsa", F64)
    ref = layer.reference(d.q, d.k, d.v, cu_seqlens=cu, **d.tensors)
    assert ref.shape == (1, d.q.shape[1], 2, 8)
    for a, b in _spans(cu):
        alone = layer.reference(_sl(d.q, a, b), _sl(d.k, a, b), _sl(d.v, a, b),
                                **{n: _sl(t, a, b) for n, t in d.tensors.items()})
        assert torch.equal(_sl(ref, a, b), alone)
    with pytest.raises(ValueError, match="`return_details` and `selections` are for one batch"):
        layer.reference(d.q, d.k, d.v, cu_seqlens=cu, return_details=True, **d.tensors)


def test_the_example_runs(capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parent.parent / "examples" / "packed_batch.py"
    spec = importlib.util.spec_from_file_location("packed_batch_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--lengths", "5,0,2"]) == 0
    out = capsys.readouterr().out
    assert "3 sequences [5, 0, 2], packed [1, 7]" in out and "(empty)" in out


# ---------------------------------------------------------------------- validation
def _bad_calls():
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    i32 = lambda *xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    return [
        ("int64", dict(cu_seqlens=cu.long()), r"`cu_seqlens` must be int32"),
        ("2-d", dict(cu_seqlens=cu.view(1, -1)), r"`cu_seqlens` must be 1-D"),
        ("one-offset", dict(cu_seqlens=i32(0)), r"`cu_seqlens` must be 1-D with num_seqs \+ 1"),
        ("list", dict(cu_seqlens=[0, 5, 12]), r"`cu_seqlens` must be a tensor, got list"),
        ("device", dict(cu_seqlens=cu.to("meta")), r"`cu_seqlens` must be on q's device cpu"),
        ("start", dict(cu_seqlens=i32(1, 5, 12)), r"`cu_seqlens` must start at 0, got \[1, 5, 12\]"),
        ("decreasing", dict(cu_seqlens=i32(0, 7, 5, 12)), r"must be non-decreasing"),
        ("end", dict(cu_seqlens=i32(0, 5, 11)), r"must end at total = q.shape\[1\] = 12"),
        ("past-end", dict(cu_seqlens=i32(0, 5, 13)), r"must end at total"),
        ("max-seqlen-short", dict(cu_seqlens=cu, max_seqlen=6),
         r"`max_seqlen` = 6 is shorter than the longest sequence 7 of `cu_seqlens` \[0, 5, 5, 12\]"),
        ("max-seqlen-tensor", dict(cu_seqlens=cu, max_seqlen=torch.tensor(7)),
         r"`max_seqlen` must be a Python int >= 1"),
        ("max-seqlen-zero", dict(cu_seqlens=cu, max_seqlen=0), r"`max_seqlen` must be a Python int"),
        ("max-seqlen-alone", dict(max_seqlen=7), r"`max_seqlen` is for packed batches"),
        ("batch-2", dict(cu_seqlens=cu, batch=2), r"batch dimension 1\), got q \(2, 12, 2, 8\)"),
        ("x-not-packed", dict(cu_seqlens=cu, x_shape=(3, 7, 6)),
         r"input `x` must be \[batch=1, seq=12, d_model\], got \(3, 7, 6\)"),
    ]


@pytest.mark.parametrize("kwargs,match", [c[1:] for c in _bad_calls()],
                         ids=[c[0] for c in _bad_calls()])
def test_validation_errors(kwargs, match, monkeypatch):
    layer = sparsedsl.compile("nsa", head_dim=8, q_heads=2, d_model=6,
                              **BUILTINS["nsa"][0])
    monkeypatch.setattr(layer, "_run", lambda *a, **k: pytest.fail("ran before the check"))
    kwargs = dict(kwargs)
    B = kwargs.pop("batch", 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, 12, h, 8, generator=g) for h in (2, 1, 1))
    x = torch.randn(*kwargs.pop("x_shape", (B, 12, 6)), generator=g)
    with pytest.raises(ValueError, match=match):
        layer(q, k, v, x=x, **kwargs)


# ---------------------------------------------------------------------- torch.compile
@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# MoBA's selection with a learned output gate: padded `x` and gate weights in the graph
GATED_MOBA = ("input x\nlet g = blocks(4)\nout = sigmoid(linear(x)) * "
              "attend(tokens(topk(dot(q, pool(g, mean)), 2, current(g), future(g))) & causal)\n")


class _PackedBlock(torch.nn.Module):
    """Projections around the layer, on a packed batch x [1, total, d_model]."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(6, 4 * 8)
        self.attn = sparsedsl.compile(GATED_MOBA, head_dim=8, q_heads=2, d_model=6)

    def forward(self, x, cu_seqlens, max_seqlen):
        q, k, v = self.qkv(x).view(1, x.shape[1], 4, 8).split([2, 1, 1], 2)
        return self.attn(q, k, v, x=x, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).sum(2)


@pytest.mark.usefixtures("_fresh_dynamo")
def test_compiles_fullgraph_with_max_seqlen():
    """One graph holding the operator, reused for other offsets; the eager outputs and
    gradients; offsets checked by device-side asserts; without `max_seqlen` a clear error
    under `fullgraph`."""
    torch.manual_seed(0)
    model = _PackedBlock()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    cu = _cu([5, 0, 1, 3])
    x = torch.randn(1, 9, 6)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    results = []
    for fn in (model, compiled):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi, cu, 5)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y, xi.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert any(t.startswith("sparsedsl.") for t in targets), targets
    other = _cu([2, 4, 0, 3])  # other offsets, same sizes: the same graph
    xg = x.clone().requires_grad_()  # as traced
    torch.testing.assert_close(compiled(xg, other, 5), model(xg, other, 5), rtol=1e-6, atol=1e-6)
    assert len(graphs) == 1
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="has a sequence longer than `max_seqlen`"):
            compiled(x, cu, 4)
        with pytest.raises(Exception, match="pass `max_seqlen`"):
            compiled(x, cu, None)
