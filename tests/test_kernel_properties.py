"""Property: for random valid specs and shapes, the generated kernels equal the reference.

The strategy (`sparsedsl.testing.strategies.cases`) generates whole specs across the
language (blocks, pooling, gates, branches, windows, sinks, unions, gated sums) with
random shapes, parameters and inputs. Failing examples shrink to a small spec; each bug
found is kept as a `.attn` file in `tests/regressions/` and replayed below.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import sparsedsl
from sparsedsl.testing import Shape, spec_inputs
from sparsedsl.testing.oracle import check_layer
from sparsedsl.testing.strategies import cases

DEVICE = os.environ.get("SPARSEDSL_TEST_DEVICE", "cpu")
DTYPE = getattr(torch, os.environ.get("SPARSEDSL_TEST_DTYPE",
                                      "float32" if DEVICE == "cpu" else "bfloat16"))
OUT_TOL = 1e-4 if DTYPE == torch.float32 else 2e-2
SCORE_TOL = 1e-4 if DTYPE == torch.float32 else 3e-2
# the interpreter runs every program in Python: small shapes, few examples on the CPU
# (on a GPU each example compiles its own kernels: a few seconds each)
EXAMPLES = int(os.environ.get("SPARSEDSL_KERNEL_EXAMPLES", "20" if DEVICE == "cpu" else "40"))
SHAPES = dict(max_seq=28 if DEVICE == "cpu" else 300, max_batch=2, kv_heads=(1, 2),
              groups=(1, 2, 4), head_dims=(4, 16) if DEVICE == "cpu" else (16, 64))
REGRESSIONS = sorted((Path(__file__).parent / "regressions").glob("*.attn"))


def check_spec(ir_text: str, shape: Shape, seed: int):
    ir = sparsedsl.lower(ir_text)
    data = spec_inputs(ir, shape, seed, dtype=torch.float32)
    layer = sparsedsl.compile(ir_text, head_dim=shape.head_dim, q_heads=shape.q_heads,
                              head_dim_v=shape.dv, d_model=shape.d_model)
    with torch.no_grad():
        for name, p in layer.learnable().items():
            p.copy_(data.params[name])
    layer = layer.to(DEVICE)
    to = lambda t: t.to(DEVICE, DTYPE)  # noqa: E731
    inputs = {n: to(t) for n, t in data.tensors.items()}
    rep = check_layer(layer, to(data.q), to(data.k), to(data.v), inputs, OUT_TOL, SCORE_TOL)
    assert rep.finite, f"non-finite output\n{ir_text}"
    assert rep.error < OUT_TOL, f"error {rep.error:.3g} >= {OUT_TOL}\n{ir_text}"
    return rep


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(shape_options=SHAPES))
def test_generated_kernels_match_reference(case):
    check_spec(case.text, case.shape, case.seed)


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.stem for p in REGRESSIONS])
def test_regression_files(path):
    """Every `.attn` regression file, at a shape its header may give (`# shape: B T Hkv G D`)."""
    text = path.read_text()
    shape = Shape(batch=1, seq=23, kv_heads=1, group=2, head_dim=8, d_model=8)
    for line in text.splitlines():
        if line.startswith("# shape:"):
            b, t, hk, g, d = (int(x) for x in line.split(":", 1)[1].split())
            shape = Shape(batch=b, seq=t, kv_heads=hk, group=g, head_dim=d, d_model=d)
    check_spec(text, shape, seed=0)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(shape_options=SHAPES))
def test_static_specs_reach_the_tile_kernels(case):
    """A generated spec's tile-layout stages (static patterns) get the tile kernels: a dk/dv
    kernel by key tiles for token branches, and no atomic adds at all when no stage attends
    pooled keys or block lists (the header then says the backward is deterministic)."""
    from hypothesis import event

    from sparsedsl.codegen.emit import deterministic_bwd
    shape = case.shape
    layer = sparsedsl.compile(case.text, head_dim=shape.head_dim, q_heads=shape.q_heads,
                              head_dim_v=shape.dv, d_model=shape.d_model)
    src = layer.source
    for st in layer.plan.stages:
        if st.kind == "attend" and st.layout == "tile":
            event("tile stage")
            tokens = any(not b.pooled and not b.precomputed for g in st.groups for b in g)
            assert (f"attend_{st.name}_bwd_dkdv_kernel" in src) == tokens
            if any(b.full for g in st.groups for b in g):
                event("tile stage with full ranges")
    if deterministic_bwd(layer.plan):
        event("deterministic backward")
        assert "atomic_add" not in src and "backward yes" in src
    else:
        assert "backward no" in src
