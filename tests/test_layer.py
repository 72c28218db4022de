"""`sparsedsl.compile` and the `SparseAttention` layer: input checks, compile errors,
learnable parameters, given gates, half precision, odd shapes, and the `emit` verb.

Kernels run in Triton's interpreter without a GPU, so shapes are tiny. Input checks are
tested to fail before anything is launched: the layer's `_kernels` is replaced by a function
that fails the test, its `_kernel_modules` stays empty and the (fresh) cache directory stays empty.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

import sparsedsl
from sparsedsl.cli import main
from sparsedsl.testing.oracle import check_layer

DEVICE = os.environ.get("SPARSEDSL_TEST_DEVICE", "cpu")
INTERPRETED = DEVICE == "cpu"
OUT_TOL = 1e-4  # float32, relative to the output's scale
HALF_TOL = 2e-2  # float16 / bfloat16
D_MODEL = 8
# small NSA: compressed blocks of 8 every 4, selection blocks of 8, window 4 (cmp=mlp, the default)
NSA = dict(cmp_len=8, cmp_stride=4, sel_len=8, topn=2, window=4)
MOBA = dict(block=4, topk=2)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("SPARSEDSL_CACHE_DIR", str(d))
    return d


def _nsa(**kw):
    args = dict(head_dim=16, q_heads=2, d_model=D_MODEL, **NSA)
    args.update(kw)
    return sparsedsl.compile("nsa", **args)


def _moba():
    return sparsedsl.compile("moba", **MOBA)


def _randn(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def _qkvx(B=1, T=6, Hq=2, Hkv=1, D=16, DV=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (_randn(B, T, Hq, D, g=g, dtype=dtype), _randn(B, T, Hkv, D, g=g, dtype=dtype),
            _randn(B, T, Hkv, DV or D, g=g, dtype=dtype), _randn(B, T, D_MODEL, g=g, dtype=dtype))


def _rel_err(out, ref):
    ref = ref.detach().double().cpu()
    return float((out.detach().double().cpu() - ref).abs().max() / ref.abs().max().clamp(min=1e-6))


def _double(*ts):
    return tuple(t.detach().double().cpu() for t in ts)


class _Recorder:
    """The layer as `check_layer` sees it, keeping the output of its (one) kernel run."""

    def __init__(self, layer):
        self.layer, self.out = layer, None

    def __call__(self, *args, **kwargs):
        res = self.layer(*args, **kwargs)
        self.out = res[0]
        return res

    def reference(self, *args, **kwargs):
        return self.layer.reference(*args, **kwargs)


def _check(layer, q, k, v, inputs, out_tol, score_tol):
    """check_layer's report (selections and output against the reference) and the output."""
    rec = _Recorder(layer)
    rep = check_layer(rec, q, k, v, inputs, out_tol, score_tol)
    return rep, rec.out


# ------------------------------------------------------------------ input checks
def _guard(layer, monkeypatch):
    def no_launch():
        raise AssertionError("kernels were loaded before the inputs were checked")
    monkeypatch.setattr(layer, "_kernels", no_launch)
    return layer


def _expect_error(layer, monkeypatch, cache_dir, match, *args, **inputs):
    _guard(layer, monkeypatch)
    with pytest.raises(ValueError, match=match):
        layer(*args, **inputs)
    assert layer._kernel_modules == {}
    assert not cache_dir.exists() or not any(cache_dir.iterdir())


def _cases():
    """(id, layer factory, call arguments from (q, k, v, x), expected message)."""
    r = lambda *s: torch.randn(*s).to(DEVICE)  # noqa: E731
    return [
        ("q-rank", _moba, lambda q, k, v, x: ((q[0], k, v), {}),
         r"`q` must have 4 dimensions \[batch, seq, heads, head_dim\], got shape \(6, 2, 16\)"),
        ("k-rank", _moba, lambda q, k, v, x: ((q, k[..., None], v), {}),
         r"`k` must have 4 dimensions \[batch, seq, heads, head_dim\], "
         r"got shape \(1, 6, 1, 16, 1\)"),
        ("q-not-a-tensor", _moba, lambda q, k, v, x: ((q.tolist(), k, v), {}),
         r"`q` must be a tensor \[batch, seq, heads, head_dim\], got list"),
        ("k-batch", _moba, lambda q, k, v, x: ((q, r(2, 6, 1, 16), v), {}),
         r"`k` must be \[batch=1, seq=6, kv_heads, head_dim\] like `q`, got \(2, 6, 1, 16\)"),
        ("v-seq", _moba, lambda q, k, v, x: ((q, k, r(1, 7, 1, 16)), {}),
         r"`v` must be \[batch=1, seq=6, kv_heads, head_dim\] like `q`, got \(1, 7, 1, 16\)"),
        ("k-head-dim", _moba, lambda q, k, v, x: ((q, r(1, 6, 1, 8), v), {}),
         r"`k` must have head_dim 16 like `q`, got \(1, 6, 1, 8\)"),
        ("v-heads", _moba, lambda q, k, v, x: ((q, k, r(1, 6, 2, 16)), {}),
         r"`v` must have 1 heads like `k`, got \(1, 6, 2, 16\)"),
        ("q-heads-not-multiple", _moba,
         lambda q, k, v, x: ((r(1, 6, 3, 16), r(1, 6, 2, 16), r(1, 6, 2, 16)), {}),
         r"q heads \(3\) must be a multiple of kv heads \(2\)"),
        ("mixed-dtypes", _moba, lambda q, k, v, x: ((q, k.half(), v), {}),
         r"`q`, `k`, `v` must share one dtype, got torch.float32, torch.float16, torch.float32"),
        ("mixed-devices-meta", _moba, lambda q, k, v, x: ((q, k.to("meta"), v), {}),
         r"`q`, `k`, `v` must be on one device"),
        ("int32", _moba, lambda q, k, v, x: ((q.int(), k.int(), v.int()), {}),
         r"`q` must be float32, float16, bfloat16 or float64, got torch.int32"),
        ("head-dim-over-256", _moba,
         lambda q, k, v, x: ((r(1, 6, 1, 300), r(1, 6, 1, 300), r(1, 6, 1, 300)), {}),
         r"head dims up to 256 are supported, got 300, 300"),
        ("unknown-input", _moba, lambda q, k, v, x: ((q, k, v), {"x": x}),
         r"spec `moba` has no input 'x'; its inputs are: none"),
        ("unknown-input-nsa", _nsa, lambda q, k, v, x: ((q, k, v), {"x": x, "gate": x}),
         r"spec `nsa` has no input 'gate'; its inputs are: x, g_cmp, g_slc, g_swa"),
        ("nsa-without-x", _nsa, lambda q, k, v, x: ((q, k, v), {}),
         r"spec `nsa` needs input `x` \(\[batch, seq, d_model\]\)"),
        ("nsa-some-gates-without-x", _nsa,
         lambda q, k, v, x: ((q, k, v), {"g_cmp": r(1, 6, 2), "g_slc": r(1, 6, 2)}),
         r"spec `nsa` needs input `x` \(\[batch, seq, d_model\]\)"),
        ("gate-shape", _nsa, lambda q, k, v, x: ((q, k, v), {"x": x, "g_cmp": r(1, 6, 3)}),
         r"gate `g_cmp` must be \[batch=1, seq=6, q_heads=2\], got \(1, 6, 3\)"),
        ("gate-device-meta", _nsa,
         lambda q, k, v, x: ((q, k, v), {"x": x, "g_swa": r(1, 6, 2).to("meta")}),
         r"input `g_swa` is on meta, `q` on " + DEVICE),
        ("x-seq", _nsa, lambda q, k, v, x: ((q, k, v), {"x": r(1, 5, D_MODEL)}),
         r"input `x` must be \[batch=1, seq=6, d_model\], got \(1, 5, 8\)"),
        ("x-d-model", _nsa, lambda q, k, v, x: ((q, k, v), {"x": r(1, 6, D_MODEL + 1)}),
         r"input `x` must be \[batch=1, seq=6, d_model=8\] .*got \(1, 6, 9\)"),
        ("x-dtype", _nsa, lambda q, k, v, x: ((q, k, v), {"x": x.double()}),
         r"input `x` must have q's dtype torch.float32, got torch.float64"),
        ("nsa-head-dim-32-for-16", _nsa,
         lambda q, k, v, x: ((r(1, 6, 2, 32), r(1, 6, 1, 32), r(1, 6, 1, 32)), {"x": x}),
         r"compiled for q \[batch, seq, 2, 16\] and v head_dim 16; got q \(1, 6, 2, 32\)"),
        ("nsa-q-heads", _nsa, lambda q, k, v, x: ((r(1, 6, 4, 16), k, v), {"x": x}),
         r"compiled for q \[batch, seq, 2, 16\] .*got q \(1, 6, 4, 16\)"),
        ("nsa-v-head-dim", _nsa, lambda q, k, v, x: ((q, k, r(1, 6, 1, 8)), {"x": x}),
         r"and v head_dim 16; got q \(1, 6, 2, 16\), v \(1, 6, 1, 8\)"),
        ("nsa-float16-int-x", _nsa,
         lambda q, k, v, x: ((q, k, v), {"x": x.int()}),
         r"input `x` must have q's dtype torch.float32, got torch.int32"),
    ]


CASES = _cases()


@pytest.mark.parametrize("make,call,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_input_checks_fail_before_launch(make, call, match, monkeypatch, cache_dir):
    q, k, v, x = _qkvx()
    args, inputs = call(q, k, v, x)
    _expect_error(make(), monkeypatch, cache_dir, match, *args, **inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_cuda(monkeypatch, cache_dir):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2, 16, generator=g) for _ in range(3))
    _expect_error(_moba(), monkeypatch, cache_dir, r"`q`, `k`, `v` must be on one device",
                  q, k.cuda(), v)
    x = torch.randn(1, 6, D_MODEL).cuda()
    _expect_error(_nsa(), monkeypatch, cache_dir, r"input `x` is on cuda:0, `q` on cpu",
                  q, k, v, x=x)


# ---------------------------------------------------------------- compile errors
@pytest.mark.parametrize("given,missing", [
    ({}, "head_dim, q_heads, d_model"),
    ({"head_dim": 16}, "q_heads, d_model"),
    ({"head_dim": 16, "q_heads": 2}, "d_model"),
    ({"q_heads": 2, "d_model": 8}, "head_dim"),
])
def test_compile_nsa_needs_sizes(given, missing):
    message = f"spec `nsa` has learnable parts; give {missing} to sparsedsl.compile(...)"
    with pytest.raises(ValueError, match=re.escape(message)):
        sparsedsl.compile("nsa", **given)


def test_compile_without_learnable_parts_needs_no_sizes():
    layer = sparsedsl.compile("moba")
    assert layer.dims is None and list(layer.parameters()) == []


def test_compile_unknown_spec():
    with pytest.raises(sparsedsl.UnknownSpecError, match="`no_such_spec` is neither a .attn file "
                                                         "nor a built-in spec"):
        sparsedsl.compile("no_such_spec")


@pytest.mark.parametrize("spec,overrides,match", [
    ("moba", {"blok": 3}, r"spec `moba` has no parameter `blok` \(from compile\(\)\)"),
    ("moba", {"block": "abc"}, r"parameter `block` is an int; got 'abc' \(from compile\(\)\)"),
    ("moba", {"topk": 0}, r"argument `k` of `topk` must be >= 1, got 0"),
    ("nsa", {"cmp": "bogus", "head_dim": 16, "q_heads": 2, "d_model": 8}, r"cmp"),
])
def test_compile_bad_override(spec, overrides, match):
    with pytest.raises(sparsedsl.SpecError, match=match):
        sparsedsl.compile(spec, **overrides)


# ---------------------------------------------------------- learnable parameters
def test_nsa_parameters():
    layer = _nsa(head_dim_v=8)
    params = dict(layer.named_parameters())
    expected = {}
    for gate in ("g_cmp", "g_slc", "g_swa"):
        expected[f"{gate}__weight"] = (2, D_MODEL)
        expected[f"{gate}__bias"] = (2,)
    for side, d in (("k", 16), ("v", 8)):  # compression MLP: hidden = head_dim (16)
        expected[f"ckv__{side}__pe"] = (8, d)
        expected[f"ckv__{side}__w1"] = (8 * d, 16)
        expected[f"ckv__{side}__b1"] = (16,)
        expected[f"ckv__{side}__w2"] = (16, d)
        expected[f"ckv__{side}__b2"] = (d,)
    assert {n: tuple(p.shape) for n, p in params.items()} == expected
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in params.values())
    # biases start at zero, weights do not
    assert all(params[n].abs().max() == 0 for n in expected if n.endswith(("bias", "b1", "b2")))
    assert all(params[n].abs().max() > 0 for n in expected
               if n.endswith(("weight", "w1", "w2", "pe")))
    # learnable() names them as the spec does, and hands out the parameters themselves
    learn = layer.learnable()
    assert set(learn) == {n.replace("__", ".") for n in expected}
    assert learn["ckv.v.w2"] is params["ckv__v__w2"]


def test_nsa_mean_compression_has_only_gate_parameters():
    layer = _nsa(cmp="mean")
    assert sorted(n for n, _ in layer.named_parameters()) == sorted(
        f"{g}__{p}" for g in ("g_cmp", "g_slc", "g_swa") for p in ("weight", "bias"))


def test_parameters_seeded_and_state_dict_round_trip():
    a, b, c = _nsa(seed=0), _nsa(seed=0), _nsa(seed=1)
    for (n, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(),
                                         c.named_parameters()):
        assert torch.equal(pa, pb), n
        if not n.endswith(("bias", "b1", "b2")):
            assert not torch.equal(pa, pc), n
    c.load_state_dict(a.state_dict())
    assert all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_moba_has_no_parameters():
    layer = _moba()
    assert list(layer.parameters()) == [] and layer.learnable() == {}
    assert layer.state_dict() == {}


def test_changing_a_parameter_changes_kernels_and_reference_alike():
    layer = _nsa().to(DEVICE)
    q, k, v, x = _qkvx(T=9)
    qd, kd, vd, xd = _double(q, k, v, x)
    out0, ref0 = layer(q, k, v, x=x), layer.reference(qd, kd, vd, x=xd)
    assert _rel_err(out0, ref0) < OUT_TOL
    with torch.no_grad():
        layer.ckv__v__w2.mul_(-3.0)  # compressed values (the cmp branch)
        layer.g_swa__weight.add_(1.0)  # the window branch's gate
        layer.g_slc__bias.fill_(-2.0)  # the selection branch's gate
    out1, ref1 = layer(q, k, v, x=x), layer.reference(qd, kd, vd, x=xd)
    assert _rel_err(out1, ref1) < OUT_TOL
    assert _rel_err(ref1, ref0) > 0.05  # the change matters ...
    assert _rel_err(out1, out0) > 0.05  # ... to the kernels too


# ------------------------------------------------------------------ given gates
def test_given_gates_replace_linear_x():
    layer = _nsa().to(DEVICE)
    q, k, v, x = _qkvx(T=9, seed=1)
    g = torch.Generator().manual_seed(7)
    gates = {n: torch.rand(1, 9, 2, generator=g).to(DEVICE) for n in ("g_cmp", "g_slc", "g_swa")}
    rep, out = _check(layer, q, k, v, gates, OUT_TOL, OUT_TOL)  # no x at all
    assert rep.finite and rep.error < OUT_TOL, rep
    qd, kd, vd, xd = _double(q, k, v, x)
    gd = {n: t.double().cpu() for n, t in gates.items()}
    # given gates win over sigmoid(linear(x)) in the reference as well, x or no x
    assert torch.equal(layer.reference(qd, kd, vd, x=xd, **gd), layer.reference(qd, kd, vd, **gd))
    # and they are not what the layer's own gates would give
    assert _rel_err(out, layer.reference(qd, kd, vd, x=xd)) > 0.05


# ------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("spec", ["moba", "nsa"])
def test_half_precision(spec, dtype):
    """Off the GPU, bfloat16 is computed in float32 (Triton 3.6's interpreter multiplies
    bf16 bit patterns in tl.dot, triton-lang/triton#11584) and rounded back."""
    layer = (_moba() if spec == "moba" else _nsa()).to(DEVICE)
    q, k, v, x = _qkvx(T=12, seed=2, dtype=dtype)
    inputs = {"x": x} if spec == "nsa" else {}
    rep, out = _check(layer, q, k, v, inputs, HALF_TOL, 3e-2)
    assert out.dtype == dtype and out.shape == (1, 12, 2, 16)
    assert rep.finite and rep.error < HALF_TOL, rep


# -------------------------------------------------------------------- odd shapes
@pytest.mark.parametrize("spec,T,Hq,Hkv,D,DV", [
    ("moba", 1, 2, 1, 16, None),
    ("moba", 3, 2, 1, 16, None),  # shorter than one block (4)
    ("moba", 10, 2, 2, 32, None),  # 10: not a multiple of the block
    ("moba", 10, 2, 1, 24, None),  # head_dim not a power of two
    ("moba", 10, 2, 1, 16, 8),  # v narrower than q/k
    ("nsa", 1, 2, 1, 16, None),
    ("nsa", 3, 2, 1, 16, None),  # shorter than every block (8, stride 4, 8)
    ("nsa", 13, 2, 1, 24, 8),  # 13: no multiple of 4 or 8; D=24, DV=8 with learned compression
], ids=["moba-T1", "moba-T3", "moba-T10-D32-gqa1", "moba-T10-D24", "moba-T10-DV8", "nsa-T1",
        "nsa-T3", "nsa-T13-D24-DV8"])
def test_shapes(spec, T, Hq, Hkv, D, DV):
    layer = (_moba() if spec == "moba" else _nsa(head_dim=D, head_dim_v=DV, q_heads=Hq)).to(DEVICE)
    q, k, v, x = _qkvx(T=T, Hq=Hq, Hkv=Hkv, D=D, DV=DV, seed=T)
    inputs = {"x": x} if spec == "nsa" else {}
    rep, out = _check(layer, q, k, v, inputs, OUT_TOL, OUT_TOL)
    assert out.shape == (1, T, Hq, DV or D) and out.dtype == torch.float32
    assert rep.finite and rep.error < OUT_TOL, rep


def test_kernels_loaded_before_the_first_call(tmp_path):
    """In a fresh process (TRITON_INTERPRET unset), `_kernels()` before any forward gives
    kernels the first forward can run: the runtime picks the backend before Triton loads."""
    import os
    import subprocess
    import sys
    code = (
        "import torch, sparsedsl\n"
        "layer = sparsedsl.compile('out = attend(window(3))')\n"
        "layer._kernels()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 5, 1, 16, generator=g) for _ in range(3))\n"
        "err = (layer(q, k, v).double() - layer.reference(q.double(), k.double(), v.double()))\n"
        "print(float(err.abs().max()))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["SPARSEDSL_CACHE_DIR"] = str(tmp_path)
    if DEVICE != "cpu":
        pytest.skip("about machines without a GPU")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert float(res.stdout.strip()) < OUT_TOL


# ------------------------------------------------------------------------ emit verb
def _emit(capsys, *argv):
    code = main(["emit", *argv])
    out, err = capsys.readouterr()
    assert code == 0 and err == "", err
    return out


def test_emit_prints_the_module(capsys):
    out = _emit(capsys, "nsa")
    lines = out.splitlines()
    assert lines[0] == "# Generated by sparsedsl from spec `nsa` (<builtin nsa>) -- do not edit."
    assert lines[1] == ("# parameters: cmp=mlp, cmp_len=32, cmp_stride=16, sel_len=64, topn=16, "
                        "init_blocks=1, local_blocks=2, window=512")
    assert lines[2].startswith("# passes: build, ")
    assert "@triton.jit" in out
    assert "\ndef forward(q, k, v, gates, params, save=False):\n" in out
    assert "\ndef backward(q, k, v, gates, params, saved, do):\n" in out
    for kernel in ("pool_", "select_sel_fwd_kernel", "attend_out_fwd_kernel"):
        assert f"def {kernel}" in out
    compile(out, "<emit nsa>", "exec")  # valid Python
    # what the layer runs is what `emit` prints
    assert out == sparsedsl.compile("nsa", head_dim=16, q_heads=2, d_model=D_MODEL).source


def test_emit_plan(capsys):
    out = _emit(capsys, "nsa", "--plan")
    assert out.startswith("plan nsa(cmp=mlp, cmp_len=32, cmp_stride=16, sel_len=64, topn=16, ")
    assert "\n  pool   ckv: mlp over blocks(len=32, stride=16)" in out
    assert "\n  select sel: topk k=16 per group" in out
    assert "@triton.jit" not in out and "def forward" not in out


def test_emit_set(capsys):
    out = _emit(capsys, "nsa", "--set", "topn=4")
    assert "# parameters: cmp=mlp, cmp_len=32, cmp_stride=16, sel_len=64, topn=4, " in out
    assert "#     select sel: topk k=4 per group" in out
    assert "K=4, KB=max(2, triton.next_power_of_2(4))" in out
    assert "select sel: topk k=4 per group" in _emit(capsys, "nsa", "--set", "topn=4", "--plan")


def test_emit_bad_set(capsys):
    code = main(["emit", "nsa", "--set", "topk=4"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert "spec `nsa` has no parameter `topk` (from --set)" in err
