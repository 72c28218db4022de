"""FlexAttention interop: `layer.to_block_mask(seq_len)` for every static example.

Each static example's BlockMask is compared with `create_block_mask` over a `mask_mod`
written here by hand from the example's header comment (block level, `to_dense()`, and
element level, `create_mask`), and `flex_attention` with it must give the layer's output
(generated kernels, Triton's interpreter on the CPU). Specs with data-dependent selection,
pooled keys or gated sums get a NotAMaskError that says why.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

import sparsedsl
from sparsedsl.integrations.flex import NotAMaskError, flex_attend, key_mask

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
T = 20  # not a multiple of the block size: the last query and key blocks are partial
BLOCK = 8
OUT_TOL = 1e-4  # float32, relative to the output's scale


def _hash24(seed, c, m):
    """docs/language.md, `random`: murmur3's finaliser over a mix, top 24 bits."""
    mask = 0xFFFFFFFF
    h = (seed * 0x9E3779B1 + c * 0x85EBCA77 + m * 0xC2B2AE3D) & mask
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    h ^= h >> 16
    return h >> 8


def _bigbird(block, random_blocks, window_blocks, global_blocks, seed):
    """BigBird's mask, by the loops of its description (docs/language.md, `random`)."""
    n = -(-T // block)
    chosen = torch.zeros(n, n, dtype=torch.bool)  # [query block, key block]
    for c in range(n):
        eligible = [m for m in range(n) if m * block + block - 1 < c * block]
        best = sorted(eligible, key=lambda m: (-_hash24(seed, c, m), m))[:random_blocks]
        for m in best:
            chosen[c, m] = True
        for m in range(max(0, c - window_blocks + 1), c + 1):
            chosen[c, m] = True

    def mask_mod(b, h, q, kv):
        return (chosen[q // block, kv // block] | (kv < global_blocks * block)
                | (q < global_blocks * block)) & (kv <= q)
    return mask_mod


# example -> (parameters, its mask written from the header comment)
STATIC = {
    "dense_causal": ({}, lambda b, h, q, kv: kv <= q),
    "sliding_window": ({"window": 5}, lambda b, h, q, kv: (q - kv >= 0) & (q - kv < 5)),
    "streaming_llm": ({"sinks": 2, "window": 5},
                      lambda b, h, q, kv: ((kv < 2) | (q - kv < 5)) & (kv <= q)),
    "sparse_transformer_strided": (
        {"stride": 4}, lambda b, h, q, kv: ((q - kv < 4) | ((q - kv) % 4 == 0)) & (kv <= q)),
    "dilated": ({"window": 3, "dilation": 2},
                lambda b, h, q, kv: (q - kv >= 0) & (q - kv < 6) & ((q - kv) % 2 == 0)),
    "longformer": ({"window": 5, "globals": 3},
                   lambda b, h, q, kv: ((kv < 3) | (q < 3) | (q - kv < 5)) & (kv <= q)),
    "bigbird": ({"block": 4, "random_blocks": 2, "window_blocks": 2, "global_blocks": 1},
                _bigbird(4, 2, 2, 1, seed=0)),
}
# why each other example has no mask (the start of its error message)
NOT_STATIC = {
    "moba": r"`moba` has no fixed mask: `sel` \(topk\) selects blocks by a score computed "
            r"from q and k",
    "nsa": r"`nsa` has no single attention mask: its output is a sum of 3 separately "
           r"normalised branches",
    "moba_window_sinks": r"`moba_window_sinks` has no single attention mask: its output is "
                         r"a sum of 2",
}


def test_every_example_is_covered():
    assert sorted(p.stem for p in EXAMPLES.glob("*.attn")) == sorted({**STATIC, **NOT_STATIC})


@pytest.mark.parametrize("name", sorted(STATIC))
def test_block_mask_matches_an_independent_mask_mod(name):
    params, mask_mod = STATIC[name]
    layer = sparsedsl.compile(str(EXAMPLES / f"{name}.attn"), **params)
    ours = layer.to_block_mask(T, device="cpu", block_size=BLOCK)
    theirs = create_block_mask(mask_mod, None, None, T, T, device="cpu", BLOCK_SIZE=BLOCK)
    assert ours.shape == theirs.shape == (1, 1, T, T)
    assert torch.equal(ours.to_dense(), theirs.to_dense())  # which blocks are visited
    for a, b in ((ours.kv_num_blocks, theirs.kv_num_blocks),
                 (ours.full_kv_num_blocks, theirs.full_kv_num_blocks)):
        assert torch.equal(a, b)  # and which of them are full
    expected = create_mask(mask_mod, 1, 1, T, T, device="cpu")[0, 0]
    assert torch.equal(key_mask(layer, T, "cpu"), expected)  # element by element


@pytest.mark.parametrize("name", sorted(STATIC))
def test_flex_attention_equals_the_layer(name):
    params, _ = STATIC[name]
    layer = sparsedsl.compile(str(EXAMPLES / f"{name}.attn"), **params)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, h, 8, generator=g) for h in (2, 1, 1))  # GQA: 2 q heads, 1 kv
    with warnings.catch_warnings():  # flex_attention outside torch.compile warns that it is slow
        warnings.simplefilter("ignore")
        theirs = flex_attend(layer, q, k, v, layer.to_block_mask(T, "cpu", BLOCK))
    ours = layer(q, k, v)
    err = float((theirs - ours).abs().max() / ours.abs().max())
    assert err < OUT_TOL, err


@pytest.mark.parametrize("name", sorted(NOT_STATIC))
def test_data_dependent_specs_say_why(name):
    layer = sparsedsl.compile(str(EXAMPLES / f"{name}.attn"), head_dim=8, q_heads=2, d_model=8)
    with pytest.raises(NotAMaskError, match=NOT_STATIC[name]) as info:
        layer.to_block_mask(T, device="cpu")
    assert str(info.value).startswith(f"{EXAMPLES / name}.attn:")  # points at the construct


@pytest.mark.parametrize("spec, match", [
    ("let c = blocks(4)\nout = attend(pool(c, mean), past(c))", r"attends pooled keys"),
    ("out = union(attend(window(3)), attend(sink(2) & causal))",
     r"does not handle `union\(...\)` yet"),
    ("let c = blocks(4)\nlet s = topk(dot(q, pool(c, mean)), 1, forbid=~past(c))\n"
     "out = attend(tokens(s) & causal)", r"`s` \(topk\) selects blocks"),
], ids=["pooled", "union", "topk"])
def test_other_refusals(spec, match):
    with pytest.raises(NotAMaskError, match=match):
        sparsedsl.compile(spec).to_block_mask(T, device="cpu")


@pytest.mark.parametrize("seq_len", [0, -3, 2.5, True])
def test_bad_seq_len(seq_len):
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        sparsedsl.compile("out = attend(causal)").to_block_mask(seq_len, device="cpu")


def test_the_example_runs(capsys):
    import importlib.util
    path = EXAMPLES / "flex_fallback.py"
    spec = importlib.util.spec_from_file_location("flex_fallback_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--seq", "40"]) == 0
    assert "longformer at 40 tokens: BlockMask keeps" in capsys.readouterr().out
    assert module.main(["--spec", "moba"]) == 2  # no fixed mask: the error says why
    assert "has no fixed mask" in capsys.readouterr().out
