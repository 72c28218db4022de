"""Decoding with a KV cache (`layer.new_cache`, `layer.decode`; codegen/decode.py).

* Property: over generated specs and shapes, decoding a sequence a few tokens at a time
  (chunks of 1 to 3, the key axis split 1 to 3 ways, a cache that starts too small and
  grows) gives the rows of the full-sequence forward, in float64 to 1e-10, and the dense
  reference's. Buffers the kernels should write are poisoned with NaN.
* The built-ins (MoBA, NSA with its MLP compression and gates) decode token by token with
  GQA and a batch, in float32.
* The cache pools incrementally: its pooled blocks equal the forward's, and blocks the
  appended tokens do not touch are not computed again.
* Bad calls are clear errors.
"""
from __future__ import annotations

import os
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import sparsedsl
from sparsedsl.testing import Shape, poison_empty, spec_inputs
from sparsedsl.testing.strategies import cases

F64 = torch.float64
DEVICE = os.environ.get("SPARSEDSL_TEST_DEVICE", "cpu")
SHAPES = dict(max_seq=16, max_batch=2, kv_heads=(1, 2), groups=(1, 2), head_dims=(4, 8))


def _layer(text_or_name, shape: Shape, data=None, **params):
    layer = sparsedsl.compile(text_or_name, head_dim=shape.head_dim, q_heads=shape.q_heads,
                              head_dim_v=shape.dv, d_model=shape.d_model, **params)
    if data is not None:
        with torch.no_grad():
            for name, p in layer.learnable().items():
                p.copy_(data.params[name])
    return layer


def _decode_all(layer, data, shape, dtype, *, chunks, splits, capacity):
    """Decode every position of `data` in the given chunk sizes; [B, T, H, DV]."""
    cache = layer.new_cache(shape.batch, shape.kv_heads, shape.head_dim, shape.dv,
                            capacity=capacity, dtype=dtype, device=data.q.device)
    outs, t = [], 0
    for n, s in zip(chunks, splits):
        cut = slice(t, t + n)
        outs.append(layer.decode(data.q[:, cut].to(dtype), cache, data.k[:, cut].to(dtype),
                                 data.v[:, cut].to(dtype), splits=s,
                                 **{name: x[:, cut].to(dtype) for name, x in
                                    data.tensors.items()}))
        t += n
    assert cache.length == data.seq
    return torch.cat(outs, 1), cache


def _chunks(T: int, rng: random.Random, most: int = 3) -> list[int]:
    out = []
    while sum(out) < T:
        out.append(min(T - sum(out), rng.randint(1, most)))
    return out


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(shape_options=SHAPES))
def test_decoding_equals_the_full_forward(case):
    shape, rng = case.shape, random.Random(case.seed)
    data = spec_inputs(case.ir, shape, case.seed, dtype=F64)
    layer = _layer(case.text, shape, data).double()
    chunks = _chunks(shape.seq, rng)
    splits = [rng.randint(1, 3) for _ in chunks]
    with torch.no_grad(), poison_empty():
        full = layer(data.q, data.k, data.v, **data.tensors)
        dec, _ = _decode_all(layer, data, shape, F64, chunks=chunks, splits=splits,
                             capacity=rng.choice([1, 4, 64]))
    ref = data.reference(case.ir)
    assert torch.isfinite(dec).all(), f"unwritten or non-finite rows\n{case.text}"
    err = (dec - full).abs().max().item()
    assert err < 1e-10, f"decode differs from the forward by {err:.3g} ({chunks}, {splits})\n" \
                        f"{case.text}"
    assert (dec - ref).abs().max().item() < 1e-9, case.text


# on the CPU (the interpreter): small blocks, every token decoded alone; on a GPU
# (SPARSEDSL_TEST_DEVICE=cuda, `make gpu-test`): the built-ins' defaults, a long prompt
# prefilled in one chunk, then 64 tokens one at a time (the default split count included)
BUILTINS = [
    ("moba", dict(block=8, topk=2), Shape(batch=2, seq=33, kv_heads=2, group=2, head_dim=16)),
    ("nsa", dict(cmp_len=8, cmp_stride=4, sel_len=8, topn=3, window=12),
     Shape(batch=2, seq=26, kv_heads=1, group=4, head_dim=16, d_model=16)),
] if DEVICE == "cpu" else [
    ("moba", {}, Shape(batch=2, seq=4160, kv_heads=2, group=8, head_dim=128)),
    ("nsa", {}, Shape(batch=1, seq=4160, kv_heads=2, group=16, head_dim=128, d_model=256)),
]


@pytest.mark.parametrize("spec,params,shape", BUILTINS, ids=["moba", "nsa"])
def test_builtins_decode_token_by_token(spec, params, shape):
    ir = sparsedsl.lower(spec, params)
    data = spec_inputs(ir, shape, seed=3, dtype=torch.float32, device=DEVICE)
    layer = _layer(spec, shape, data, **params).to(DEVICE)
    tail = shape.seq if DEVICE == "cpu" else 64
    chunks = ([shape.seq - tail] if tail < shape.seq else []) + [1] * tail
    splits = [None if DEVICE != "cpu" and i % 2 else 1 + i % 3 for i in range(len(chunks))]
    with torch.no_grad(), poison_empty():
        full = layer(data.q, data.k, data.v, **data.tensors)
        dec, cache = _decode_all(layer, data, shape, torch.float32, chunks=chunks,
                                 splits=splits, capacity=16)
    assert torch.isfinite(dec).all()
    assert (dec - full).abs().max().item() < 1e-5
    if DEVICE == "cpu":
        ref = data.reference(ir)
        assert (dec - ref.to(dec.dtype)).abs().max().item() < 1e-4
    assert cache.capacity >= shape.seq and cache.length == shape.seq


def test_lists_of_a_decode_step_are_the_forwards():
    shape = Shape(batch=1, seq=30, kv_heads=1, group=2, head_dim=8)
    data = spec_inputs(sparsedsl.lower("moba", dict(block=4, topk=3)), shape, seed=1)
    layer = _layer("moba", shape, data, block=4, topk=3).double()
    with torch.no_grad():
        _, lists = layer(data.q, data.k, data.v, return_lists=True)
        cache = layer.new_cache(1, 1, 8, dtype=F64)
        cache.append(data.k[:, :-2], data.v[:, :-2])
        _, got = layer.decode(data.q[:, -2:], cache, data.k[:, -2:], data.v[:, -2:],
                              return_lists=True)
    (name, want), = lists.items()
    assert torch.equal(got[name], want[:, -2:])


def test_the_cache_pools_incrementally():
    """Pooled blocks equal the forward's at every length, and an append pools only the
    blocks its tokens touch: earlier blocks are not read again."""
    spec, params = "nsa", dict(cmp_len=8, cmp_stride=4, sel_len=8, topn=2, window=4)
    shape = Shape(batch=1, seq=37, kv_heads=1, group=2, head_dim=8, d_model=8)
    ir = sparsedsl.lower(spec, params)
    data = spec_inputs(ir, shape, seed=2, dtype=F64)
    layer = _layer(spec, shape, data, **params).double()
    kernels = layer._kernels(torch.device("cpu"))
    learn = {n: p.detach() for n, p in layer.learnable().items()}
    cache = layer.new_cache(1, 1, 8, dtype=F64, capacity=8)
    for t in range(shape.seq):
        cache.append(data.k[:, t:t + 1], data.v[:, t:t + 1])
        if t % 6 == 5 or t == shape.seq - 1:
            pre = data.prefix(t + 1)
            gates = {g.key: torch.ones(1, t + 1, shape.q_heads, dtype=F64)
                     for g in layer._gate_plan}
            _, _, saved = kernels.forward(pre.q, pre.k, pre.v, gates,
                                          {n: learn[n] for n in layer._op.param_names},
                                          save=True)
            for name, buf in cache.pooled().items():
                assert torch.allclose(buf, saved[name], atol=1e-12, rtol=0), (t, name)
    # poison every stored key but the last block's: appending one token must not read them
    stride = 4
    before = {n: b.clone() for n, b in cache.pooled().items()}
    keep = (cache.length // stride - 1) * stride
    cache._k[:, :keep] = float("nan")
    cache._v[:, :keep] = float("nan")
    cache.append(data.k[:, :1], data.v[:, :1])
    after = cache.pooled()
    for name, old in before.items():
        n_old = old.shape[1]
        untouched = max(0, (cache.length - 1 - 8) // stride + 1)  # blocks ending before it
        assert torch.equal(after[name][:, :untouched], old[:, :untouched]), name
        assert torch.isfinite(after[name][:, untouched:]).all(), name
        assert after[name].shape[1] >= n_old


def test_bfloat16_cache_on_the_cpu():
    shape = Shape(batch=1, seq=12, kv_heads=1, group=2, head_dim=16)
    data = spec_inputs(sparsedsl.lower("moba", dict(block=4, topk=2)), shape, seed=0,
                       dtype=torch.float32)
    layer = _layer("moba", shape, data, block=4, topk=2)
    bf = torch.bfloat16
    with torch.no_grad():
        full = layer(data.q.to(bf), data.k.to(bf), data.v.to(bf))
        dec, _ = _decode_all(layer, data, shape, bf, chunks=[5, 1, 6], splits=[1, 2, 1],
                             capacity=4)
    assert dec.dtype == bf
    assert (dec.float() - full.float()).abs().max().item() < 2e-2


def test_decode_errors():
    layer = sparsedsl.compile("moba", block=4, topk=2)
    other = sparsedsl.compile("moba", block=4, topk=2)
    cache = layer.new_cache(2, 1, 8)
    q = torch.randn(2, 1, 2, 8)
    kv = torch.randn(2, 1, 1, 8)
    with pytest.raises(ValueError, match="append their keys"):
        layer.decode(q, cache)
    with pytest.raises(ValueError, match="made by this layer"):
        other.decode(q, cache, kv, kv)
    with pytest.raises(ValueError, match="both k_new and v_new"):
        layer.decode(q, cache, kv)
    with pytest.raises(ValueError, match=r"k_new must be \[batch=2"):
        cache.append(torch.randn(2, 1, 2, 8), kv)
    with pytest.raises(ValueError, match="v_new must be"):
        cache.append(kv, torch.randn(2, 2, 1, 8))
    with pytest.raises(ValueError, match="cache's dtype"):
        cache.append(kv.double(), kv.double())
    with pytest.raises(ValueError, match="q_new must be"):
        layer.decode(torch.randn(2, 1, 2, 4), cache, kv, kv)
    assert cache.length == 0  # failed calls append nothing (q is checked first)
    with pytest.raises(ValueError, match="splits"):
        layer.decode(q, cache, kv, kv, splits=0)
    with pytest.raises(ValueError, match="has no input"):
        layer.decode(q, cache, kv, kv, g=q[..., 0])
    assert cache.length == 0
    with pytest.raises(ValueError, match="batch, kv_heads"):
        layer.new_cache(0, 1, 8)


def test_the_example_runs(capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parent.parent / "examples" / "decode.py"
    spec = importlib.util.spec_from_file_location("decode_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--spec", "moba", "--prompt", "9", "--new", "3", "--chunk", "5"]) == 0
    out = capsys.readouterr().out
    assert "worst error" in out and "prefill positions    0..   4" in out


def test_emit_decode_prints_the_decode_module(capsys):
    from sparsedsl.cli import main
    assert main(["emit", "nsa", "--decode", "--set", "topn=4"]) == 0
    out = capsys.readouterr().out
    compile(out, "<emit nsa --decode>", "exec")  # valid Python
    for name in ("def update_pools(", "def decode(", "select_sel_dec_kernel",
                 "attend_out_dec_kernel", "combine_out_dec_kernel", "(decode module)"):
        assert name in out, name
    from sparsedsl.codegen.decode import generate_decode
    ir = sparsedsl.lower("nsa", {"topn": 4})
    assert out == generate_decode(ir)  # what `layer.decode` runs
