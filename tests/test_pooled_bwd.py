"""The tile layout's key-major dk/dv kernel for pooled keys
(`attend_<stage>_bwd_dkdvp<n>_kernel`): gradients against float64 autograd of the reference,
with the query tiles cut into splits of several sizes (SPARSEDSL_QUERY_SPLIT).

In the interpreter the tiles are 16 queries by 16 blocks, so the lengths below give several
key tiles (blocks of 2 or 4 tokens over 45-70 tokens), several query tiles, splits that end
mid-way and a last query tile cut by T.
"""
from __future__ import annotations

import pytest
import torch

import sparsedsl

from .test_list_bwd import NSA_FLA, _check  # (_check: float64 gradients against the reference's)

SPECS = {
    # an earlier stage feeding a gate's scores (writes its lse: xdo, xlse, xdelta); NSA as
    # fla with 4-token compression blocks: several key tiles of pooled keys
    "nsa-fla": NSA_FLA.replace("let cblk = blocks(8)", "let cblk = blocks(4)"),
    # the final stage: a gated pooled group beside a token group (lsave, dsave, the gate)
    "gated-mix": """\
input g
let c = blocks(2)
out = g * attend(pool(c, mean), past(c)) + attend(window(5) & causal)
""",
    # one softmax over pooled blocks and tokens; overlapping blocks (stride < length)
    "union-overlap": """\
let c = blocks(4, stride=2)
out = union(attend(pool(c, mean), past(c)), attend(window(3)))
""",
}


@pytest.mark.parametrize("split", ["1", "2", "3", "1000"])
@pytest.mark.parametrize("name, B, T, Hq, Hkv", [
    ("nsa-fla", 1, 70, 4, 1),
    ("gated-mix", 2, 45, 2, 2),
    ("union-overlap", 1, 53, 4, 2),
])
def test_pooled_keys_gradients(name, B, T, Hq, Hkv, split, monkeypatch):
    """dq, dk, dv and the gates' gradients equal the reference's whatever the query split:
    one query tile per program, a few, or all of them."""
    monkeypatch.setenv("SPARSEDSL_QUERY_SPLIT", split)
    layer = _check(SPECS[name], B, T, Hq, Hkv, 8, monkeypatch, "keys")
    assert "_bwd_dkdvp" in layer.source


def test_query_split_rejects_nonsense(monkeypatch):
    layer = sparsedsl.compile(SPECS["gated-mix"], head_dim=8, q_heads=2, d_model=8)
    monkeypatch.setenv("SPARSEDSL_QUERY_SPLIT", "0")
    x = torch.randn(1, 20, 2, 8, requires_grad=True)
    out = layer(x, x, x, g=torch.rand(1, 20, 2))
    with pytest.raises(ValueError, match="SPARSEDSL_QUERY_SPLIT"):
        out.sum().backward()
