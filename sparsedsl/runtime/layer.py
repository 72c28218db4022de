"""`sparsedsl.compile(spec, **params)`: a spec as a trainable `torch.nn.Module`.

The layer owns the learnable tensors the spec declares (compression MLPs,
gate projections) as `nn.Parameter`s, checks its inputs before any launch,
and runs the generated kernels: natively on a CUDA GPU, in Triton's
interpreter on a machine without one (`TRITON_INTERPRET=1` is set then).
"""
from __future__ import annotations

import math
import os

import torch

from ..ir.graph import IR
from ..reference.evaluate import check_inputs
from ..reference.params import Dims, init_param, param_shapes


def _ensure_backend(device: torch.device) -> None:
    """Off the GPU, the generated kernels run in Triton's interpreter."""
    if device.type == "cuda":
        return
    os.environ["TRITON_INTERPRET"] = "1"
    from .interp import install_speedups
    install_speedups()
    import numpy
    major, minor = (int(x) for x in numpy.__version__.split(".")[:2])
    if (major, minor) >= (2, 3):
        raise RuntimeError(f"Triton's interpreter (used without a GPU) needs numpy < 2.3, found "
                           f"{numpy.__version__}: pip install 'numpy<2.3' (or sparsedsl[cpu])")


class SparseAttention(torch.nn.Module):
    """A compiled spec. forward(q, k, v, **inputs) -> [batch, seq, q_heads, head_dim_v]."""

    def __init__(self, ir: IR, spec_text: str, head_dim: int | None, q_heads: int | None,
                 head_dim_v: int | None, d_model: int | None, seed: int):
        super().__init__()
        self.ir = ir
        self.spec_name = ir.spec_name
        self._spec_text = spec_text
        from ..codegen.plan import plan_kernels
        self.plan = plan_kernels(ir)
        self._module = None
        self.dims = None
        self._param_names: dict[str, str] = {}
        needs_dims = bool(param_shapes_needed(ir))
        if needs_dims:
            missing = [n for n, v in (("head_dim", head_dim), ("q_heads", q_heads)) if v is None]
            if any(ir.node(n)["op"] == "linear" for n in ir.g.nodes) and d_model is None:
                missing.append("d_model")
            if missing:
                raise ValueError(f"spec `{ir.spec_name}` has learnable parts; give "
                                 f"{', '.join(missing)} to sparsedsl.compile(...)")
            self.dims = Dims(head_dim, head_dim_v or head_dim, q_heads, d_model)
            g = torch.Generator().manual_seed(seed)
            for name, shape in param_shapes(ir, self.dims).items():
                safe = name.replace(".", "__")
                self._param_names[name] = safe
                self.register_parameter(safe, torch.nn.Parameter(init_param(name, shape, g)))

    # ---- what the compiled path runs
    @property
    def source(self) -> str:
        """The generated Triton source of this layer."""
        from ..codegen.emit import generate
        return generate(self.ir, self.plan)[0]

    def _kernels(self):
        if self._module is None:
            from .cache import cache_key, load_module
            key = cache_key(self._spec_text, self.ir.param_values())
            self._module = load_module(key, lambda: self.source)
        return self._module

    def learnable(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, safe) for name, safe in self._param_names.items()}

    def _inputs(self, inputs: dict) -> dict:
        unknown = sorted(set(inputs) - set(self.ir.inputs))
        if unknown:
            raise ValueError(f"spec `{self.spec_name}` has no input {', '.join(map(repr, unknown))};"
                             f" its inputs are: {', '.join(self.ir.inputs) or 'none'}")
        return inputs

    def _check(self, q, k, v, inputs):
        check_inputs(self.ir, q, k, v, inputs)
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"`q` must be float32, float16 or bfloat16, got {q.dtype}")
        for name, t in inputs.items():
            if t.dtype != q.dtype and name in self.ir.inputs and self.ir.inputs[name].role == "x":
                raise ValueError(f"input `{name}` must have q's dtype {q.dtype}, got {t.dtype}")
        if self.dims is not None:
            if q.shape[-1] != self.dims.head_dim or q.shape[2] != self.dims.q_heads or \
                    v.shape[-1] != self.dims.head_dim_v:
                raise ValueError(
                    f"this layer was compiled for q [batch, seq, {self.dims.q_heads}, "
                    f"{self.dims.head_dim}] and v head_dim {self.dims.head_dim_v}; got q "
                    f"{tuple(q.shape)}, v {tuple(v.shape)}")
        if not 1 <= q.shape[-1] <= 256 or not 1 <= v.shape[-1] <= 256:
            raise ValueError(f"head dims up to 256 are supported, got {q.shape[-1]}, {v.shape[-1]}")

    def _gates(self, q, inputs: dict) -> dict:
        """Gate tensors [B, T, H] (fp32): given ones, else sigmoid(linear(x)) with our weights."""
        gates = {}
        for name, info in self.ir.inputs.items():
            if info.role != "gate":
                continue
            if name in inputs:
                gates[name] = inputs[name].float().contiguous()
                continue
            node = self.ir.node(info.node) if info.node is not None else None
            if node is None:
                continue
            lin = self.ir.operand(self.ir.operand(info.node, "default"), "logits")
            owner = self.ir.node(lin)["facts"]["params"]
            x = inputs[self.ir.node(self.ir.operand(lin, "x"))["args"]["name"]]
            w, b = self.learnable()[f"{owner}.weight"], self.learnable()[f"{owner}.bias"]
            gates[name] = torch.sigmoid(x.float() @ w.float().T + b.float()).contiguous()
        return gates

    def forward(self, q, k, v, return_lists: bool = False, **inputs):
        inputs = self._inputs(inputs)
        self._check(q, k, v, inputs)
        _ensure_backend(q.device)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        gates = self._gates(q, inputs)
        params = {n: p.detach().float().contiguous() for n, p in self.learnable().items()}
        out, lists = self._kernels().forward(q, k, v, gates, params)
        return (out, lists) if return_lists else out

    def reference(self, q, k, v, return_details: bool = False, selections=None, **inputs):
        """The dense float64 reference with this layer's own parameters."""
        from ..reference import reference
        return reference(self.ir, q, k, v, params={n: p.detach().to(q.device) for n, p in
                                                   self.learnable().items()},
                         return_details=return_details, selections=selections, **inputs)

    def extra_repr(self) -> str:
        pv = ", ".join(f"{k}={v}" for k, v in self.ir.param_values().items())
        return f"spec={self.spec_name}({pv}), strategy={self.plan.strategy.split(':')[0]!r}"


def param_shapes_needed(ir: IR) -> bool:
    return any(ir.node(n)["op"] == "linear" or (ir.node(n)["op"] == "pool" and
                                               ir.node(n)["args"]["method"] == "mlp")
               for n in ir.g.nodes)


def compile(spec, *, head_dim: int | None = None, q_heads: int | None = None,
            head_dim_v: int | None = None, d_model: int | None = None, seed: int = 0,
            **params) -> SparseAttention:
    """Compile a spec (built-in name, path or text) with parameter overrides to a layer."""
    from ..frontend.load import load_source
    from ..pipeline import lower
    source = load_source(spec)
    ir = lower(source, params)
    return SparseAttention(ir, source.text, head_dim, q_heads, head_dim_v, d_model, seed)


del math
