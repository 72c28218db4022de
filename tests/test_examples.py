"""The specs in `examples/`: each lowers, is in canonical form, passes `check`, and runs
through the dense reference. The static patterns are compared against masks written
out here with explicit loops over (i, j) and an attention computed here row by row."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

import sparsedsl
from sparsedsl.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
BUILTINS = ROOT / "sparsedsl" / "builtins"

F64 = torch.float64
B, T, HQ, HKV, D, DMODEL = 2, 77, 4, 2, 8, 12

# small sizes for every example, so that T = 77 covers several blocks / windows
SMALL = {
    "dense_causal": {},
    "sliding_window": {"window": 10},
    "streaming_llm": {"sinks": 3, "window": 8},
    "sparse_transformer_strided": {"stride": 6},
    "dilated": {"window": 5, "dilation": 3},
    "longformer": {"window": 9, "globals": 5},
    "bigbird": {"block": 8, "random_blocks": 2, "window_blocks": 2, "global_blocks": 1, "seed": 3},
    "moba": {"block": 16, "topk": 3},
    "nsa": {"cmp_len": 8, "cmp_stride": 4, "sel_len": 16, "topn": 4, "init_blocks": 1,
            "local_blocks": 2, "window": 16},
    "moba_window_sinks": {"block": 16, "topk": 3, "sinks": 2, "window": 8},
}
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.attn"))


def path(name: str) -> Path:
    return EXAMPLES / f"{name}.attn"


def qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HQ, D, generator=g, dtype=F64)
    k = torch.randn(B, T, HKV, D, generator=g, dtype=F64)
    v = torch.randn(B, T, HKV, D, generator=g, dtype=F64)
    x = torch.randn(B, T, DMODEL, generator=g, dtype=F64)
    return q, k, v, x


def run(name: str, over: dict | None = None, seed: int = 0, **tensors):
    """The reference on random float64 inputs, with learnable params at small sizes."""
    over = dict(SMALL[name] if over is None else over)
    ir = sparsedsl.lower(path(name), over)
    params = sparsedsl.init_params(ir, head_dim=D, q_heads=HQ, d_model=DMODEL, dtype=F64)
    q, k, v, x = qkv(seed)
    if "x" in ir.inputs:
        tensors.setdefault("x", x)
    d = sparsedsl.reference(path(name), q, k, v, params=params, return_details=True,
                            **tensors, **over)
    return d, (q, k, v)


# ------------------------------------------------------------------ the file set
def test_every_listed_example_exists():
    assert set(NAMES) == set(SMALL), "SMALL must list exactly the files in examples/"


@pytest.mark.parametrize("name", NAMES)
def test_lowers_at_defaults_and_small_sizes(name):
    ir = sparsedsl.lower(path(name))
    assert ir.spec_name == name
    assert ir.params or name == "dense_causal", "sizes must be parameters with defaults"
    assert not ir.unused
    small = sparsedsl.lower(path(name), SMALL[name])
    assert small.param_values() == {**ir.param_values(), **SMALL[name]}


@pytest.mark.parametrize("name", NAMES)
def test_canonical_form(name):
    text = path(name).read_text()
    assert sparsedsl.format_spec(sparsedsl.parse(text, str(path(name)))) == text


@pytest.mark.parametrize("name", NAMES)
def test_cli_check_and_fmt_check(name, capsys):
    assert cli_main(["check", str(path(name))]) == 0
    assert cli_main(["fmt", "--check", str(path(name))]) == 0
    assert "causality proved" in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_header_comment(name):
    lines = path(name).read_text().splitlines()
    assert lines[0].startswith("# "), "an example starts with a comment saying what it is"
    header = next(i for i, ln in enumerate(lines) if ln.startswith("pattern "))
    assert header >= 2 and all(ln.startswith("#") for ln in lines[:header])
    spec = sparsedsl.parse(path(name).read_text())
    assert len(spec.comments) == header


@pytest.mark.parametrize("name", ["moba", "nsa"])
def test_builtin_copies_are_identical(name):
    assert path(name).read_text() == (BUILTINS / f"{name}.attn").read_text()
    assert name in sparsedsl.builtin_names()


@pytest.mark.parametrize("name", NAMES)
def test_reference_runs(name):
    d, _ = run(name)
    assert d.out.shape == (B, T, HQ, D)
    assert d.out.dtype == F64
    assert torch.isfinite(d.out).all()
    assert 0.0 < d.density <= 1.0 + 1e-12
    for br in d.branches.values():
        assert torch.isfinite(br).all()


def test_nsa_with_mean_compression_runs():
    d, _ = run("nsa", {**SMALL["nsa"], "cmp": "mean"})
    assert d.out.shape == (B, T, HQ, D) and torch.isfinite(d.out).all()


# ------------------------------------------------------- independent masks (loops)
def mask_dense(i, j, p):
    return j <= i


def mask_sliding(i, j, p):
    return 0 <= i - j < p["window"]


def mask_streaming(i, j, p):
    return j <= i and (j < p["sinks"] or i - j < p["window"])


def mask_strided(i, j, p):
    l = p["stride"]
    return j <= i and (i - j < l or (i - j) % l == 0)


def mask_dilated(i, j, p):
    w, r = p["window"], p["dilation"]
    return any(j == i - n * r for n in range(w))


def mask_longformer(i, j, p):
    g = p["globals"]
    return j <= i and (i - j < p["window"] or j < g or i < g)


def _hash24(seed: int, a: int, b: int) -> int:
    """murmur3's 32-bit finaliser over seed * 0x9E3779B1 + a * 0x85EBCA77 + b * 0xC2B2AE3D,
    top 24 bits."""
    h = (seed * 0x9E3779B1 + a * 0x85EBCA77 + b * 0xC2B2AE3D) % 2**32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % 2**32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % 2**32
    h ^= h >> 16
    return h >> 8


@functools.lru_cache(maxsize=None)
def _bigbird_blocks(c: int, bl: int, seed: int, n_random: int, n_window: int) -> frozenset:
    """Blocks a query in block c attends: random ones (largest hash first, ties to the lower
    index) among the blocks that end before block c starts, and the window blocks."""
    earlier = [m for m in range(c) if m * bl + bl - 1 < c * bl]
    rnd = sorted(earlier, key=lambda m: (-_hash24(seed, c, m), m))[:n_random]
    return frozenset(rnd) | {m for m in range(c - n_window + 1, c + 1) if m >= 0}


def mask_bigbird(i, j, p):
    bl = p["block"]
    blocks = _bigbird_blocks(i // bl, bl, p["seed"], p["random_blocks"], p["window_blocks"])
    g = p["global_blocks"] * bl
    in_block = any(m * bl <= j < m * bl + bl for m in blocks)
    return j <= i and (in_block or j < g or i < g)


STATIC = {
    "dense_causal": mask_dense,
    "sliding_window": mask_sliding,
    "streaming_llm": mask_streaming,
    "sparse_transformer_strided": mask_strided,
    "dilated": mask_dilated,
    "longformer": mask_longformer,
    "bigbird": mask_bigbird,
}


def loop_mask(fn, p) -> torch.Tensor:
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            m[i, j] = bool(fn(i, j, p))
    return m


def loop_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention, one (batch, head, query) row at a time; empty rows are 0."""
    G = q.shape[2] // k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[-1], dtype=F64)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            for i in range(q.shape[1]):
                js = [j for j in range(k.shape[1]) if mask[i, j]]
                if not js:
                    continue
                s = scale * (k[b, js, h // G] @ q[b, i, h])
                p = torch.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ v[b, js, h // G]
    return out


@pytest.mark.parametrize("name", sorted(STATIC))
def test_static_mask_and_output_match_loops(name):
    d, (q, k, v) = run(name)
    expected = loop_mask(STATIC[name], SMALL[name])
    assert len(d.keys) == 1
    (mask,) = d.keys.values()
    assert mask.shape == (B, HQ, T, T)
    for b in range(B):
        for h in range(HQ):
            assert torch.equal(mask[b, h], expected), (b, h)
    assert expected.any(-1).all(), "no example leaves a query without keys"
    torch.testing.assert_close(d.out, loop_attention(q, k, v, expected), rtol=1e-10, atol=1e-10)


def test_static_masks_at_other_sizes():
    """The masks also agree at the examples' own defaults, cut to T = 77 where it matters."""
    for name, over in [("sliding_window", {"window": 1}), ("streaming_llm", {"sinks": 1, "window": 1}),
                       ("sparse_transformer_strided", {"stride": 1}),
                       ("dilated", {"window": 40, "dilation": 2}),
                       ("longformer", {"window": 3, "globals": 20}),
                       ("bigbird", {"block": 5, "random_blocks": 4, "window_blocks": 1,
                                    "global_blocks": 2, "seed": 11})]:
        d, _ = run(name, over)
        (mask,) = d.keys.values()
        assert torch.equal(mask[0, 0], loop_mask(STATIC[name], over)), name


# ------------------------------------------------------------- the hybrid example
def test_hybrid_is_moba_plus_streaming_llm():
    """moba_window_sinks = g_routed * MoBA + g_local * StreamingLLM, each normalised alone;
    gate tensors given by name replace the learned gates."""
    p = SMALL["moba_window_sinks"]
    gen = torch.Generator().manual_seed(5)
    g_r = torch.rand(B, T, HQ, generator=gen, dtype=F64)
    g_l = torch.rand(B, T, HQ, generator=gen, dtype=F64)
    d, (q, k, v) = run("moba_window_sinks", g_routed=g_r, g_local=g_l)
    moba, _ = run("moba", {"block": p["block"], "topk": p["topk"]})
    local, _ = run("streaming_llm", {"sinks": p["sinks"], "window": p["window"]})
    torch.testing.assert_close(d.branches["routed"], moba.out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d.branches["local"], local.out, rtol=1e-12, atol=1e-12)
    expected = g_r[..., None] * moba.out + g_l[..., None] * local.out
    torch.testing.assert_close(d.out, expected, rtol=1e-12, atol=1e-12)
    # with the learned gates: sigmoid(x W^T + b), one weight row per query head
    ir = sparsedsl.lower(path("moba_window_sinks"), p)
    params = sparsedsl.init_params(ir, head_dim=D, q_heads=HQ, d_model=DMODEL, dtype=F64)
    assert params["g_routed.weight"].shape == (HQ, DMODEL)
    d2, _ = run("moba_window_sinks")
    x = qkv(0)[3]
    gr = torch.sigmoid(x @ params["g_routed.weight"].T + params["g_routed.bias"])
    gl = torch.sigmoid(x @ params["g_local.weight"].T + params["g_local.bias"])
    torch.testing.assert_close(d2.out, gr[..., None] * moba.out + gl[..., None] * local.out,
                               rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ docs in sync
DOCS = ROOT / "docs" / "language.md"


def test_docs_cover_every_construct():
    from sparsedsl.ir.ops import NAMES as VALUE_NAMES
    from sparsedsl.ir.ops import OPS
    text = DOCS.read_text()
    for name in OPS:
        assert f"`{name}(" in text, f"docs/language.md does not document `{name}(...)`"
    for name in VALUE_NAMES:
        assert f"### The name `{name}`" in text
    for word in ("param", "input", "let", "out", "pattern"):
        assert f"| `{word}` |" in text


@pytest.mark.parametrize("name", ["moba", "nsa"])
def test_docs_quote_the_builtins(name):
    """The built-in listed in the docs is the built-in's text without its header."""
    body = (BUILTINS / f"{name}.attn").read_text().split("\n\n", 1)[1]
    assert f"```\n{body}```" in DOCS.read_text()
