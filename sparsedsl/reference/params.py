"""Learnable parameters a spec declares: their names, shapes and initial values.

  pool(g, mlp)        `<owner>.k.pe` [len, Dk]  intra-block position encoding (added to keys)
                      `<owner>.k.w1` [len*Dk, hidden], `<owner>.k.b1` [hidden]
                      `<owner>.k.w2` [hidden, Dk],     `<owner>.k.b2` [Dk]
                      and the same under `<owner>.v.` with Dv, for values
  linear(x)           `<owner>.weight` [q_heads, d_model], `<owner>.bias` [q_heads]

`<owner>` is the `let` or `input` the construct appears in. The compression
MLP is shared by all kv heads (as in NSA, Eq. 7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ir.graph import IR


@dataclass(frozen=True)
class Dims:
    head_dim: int
    head_dim_v: int
    q_heads: int
    d_model: int | None = None


def _owner(ir: IR, nid: int) -> str:
    return ir.node(nid)["facts"].get("params") or f"n{nid}"


def param_shapes(ir: IR, dims: Dims) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every learnable tensor the (resolved) IR needs."""
    shapes: dict[str, tuple[int, ...]] = {}
    for nid in ir.order():
        n = ir.node(nid)
        if n["op"] == "pool" and n["args"]["method"] == "mlp":
            owner = _owner(ir, nid)
            grid = ir.node(ir.operand(nid, "grid"))["args"]
            length = grid["len"]
            hidden = n["args"]["hidden"] or dims.head_dim
            for side, d in (("k", dims.head_dim), ("v", dims.head_dim_v)):
                shapes[f"{owner}.{side}.pe"] = (length, d)
                shapes[f"{owner}.{side}.w1"] = (length * d, hidden)
                shapes[f"{owner}.{side}.b1"] = (hidden,)
                shapes[f"{owner}.{side}.w2"] = (hidden, d)
                shapes[f"{owner}.{side}.b2"] = (d,)
        elif n["op"] == "linear":
            owner = _owner(ir, nid)
            if dims.d_model is None:
                raise ValueError("this spec has learnable gates `linear(x)`: give d_model "
                                 "(the last dimension of x)")
            shapes[f"{owner}.weight"] = (dims.q_heads, dims.d_model)
            shapes[f"{owner}.bias"] = (dims.q_heads,)
    return shapes


def init_param(name: str, shape: tuple[int, ...], generator: torch.Generator | None = None,
               dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Initial value of one learnable tensor, by its role (the suffix of its name)."""
    role = name.rsplit(".", 1)[-1]
    if role.startswith("b") or role == "bias":
        return torch.zeros(shape, dtype=dtype, device=device)
    if role == "pe":
        std = 0.02
    else:  # w1, w2, weight: fan-in scaling keeps outputs at the inputs' scale
        fan_in = shape[0] if role != "weight" else shape[1]
        std = 1.0 / math.sqrt(fan_in)
    # drawn in place: no scaled copy (NSA's 2.6M initial values are most of a cached compile)
    t = torch.empty(shape, dtype=torch.float32).normal_(0., std, generator=generator)
    return t.to(dtype=dtype, device=device)


def init_params(spec, head_dim: int, q_heads: int, head_dim_v: int | None = None,
                d_model: int | None = None, seed: int = 0, dtype=torch.float32, device="cpu",
                **overrides) -> dict[str, torch.Tensor]:
    """Fresh learnable tensors for a spec (name, path, text or IR) at the given sizes."""
    from ..pipeline import lower
    ir = spec if isinstance(spec, IR) else lower(spec, overrides)
    dims = Dims(head_dim, head_dim_v or head_dim, q_heads, d_model)
    g = torch.Generator().manual_seed(seed)
    return {name: init_param(name, shape, g, dtype, device)
            for name, shape in param_shapes(ir, dims).items()}
