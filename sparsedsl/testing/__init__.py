"""Test helpers for sparsedsl: random inputs for a lowered spec, and NaN-poisoned allocation.

This module needs only torch. The Hypothesis strategies that generate random
valid specs and shapes live in `sparsedsl.testing.strategies` (which needs the
optional `hypothesis` dependency, `pip install sparsedsl[test]`) and re-export
everything here::

    from sparsedsl.testing.strategies import specs, shapes, spec_inputs

    @given(spec=specs(), shape=shapes(), seed=st.integers(0, 2**16))
    def test_kernel(spec, shape, seed):
        ir = sparsedsl.lower(sparsedsl.format_spec(spec))
        data = spec_inputs(ir, shape, seed)
        torch.testing.assert_close(my_kernel(ir, data), data.reference(ir))

Public API:

    Shape                       the sizes of one layer call (batch, seq, heads, head dims, d_model)
    SpecInputs                  q, k, v, declared input tensors and learnable params for one IR
    spec_inputs(ir, shape, seed)  random SpecInputs (float64 by default)
    poison_empty()              context manager: torch.empty / torch.empty_like return NaN-filled
                                tensors, so outputs a kernel forgets to write cannot pass a test
    gpu_dot_shapes()            make Triton's interpreter refuse the tl.dot shapes a GPU refuses
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch

from ..ir.graph import IR

__all__ = ["Shape", "SpecInputs", "gpu_dot_shapes", "poison_empty", "spec_inputs"]


@dataclass(frozen=True)
class Shape:
    """The sizes of one call of an attention layer.

    q is [batch, seq, q_heads, head_dim], k [batch, seq, kv_heads, head_dim],
    v [batch, seq, kv_heads, head_dim_v]; `x` (the layer input of learned gates)
    is [batch, seq, d_model]; a gate tensor is [batch, seq, q_heads].
    """

    batch: int = 1
    seq: int = 16
    kv_heads: int = 1
    group: int = 1  # query heads per kv head (GQA group size)
    head_dim: int = 8
    head_dim_v: int | None = None  # None: head_dim
    d_model: int = 8

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.group

    @property
    def dv(self) -> int:
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    def __str__(self) -> str:
        return (f"B={self.batch} T={self.seq} Hkv={self.kv_heads} G={self.group} "
                f"D={self.head_dim} Dv={self.dv} d_model={self.d_model}")


@dataclass
class SpecInputs:
    """Everything one call of a lowered spec takes.

    `tensors` holds the spec's declared inputs by name: the layer input (role `x`,
    [B, T, d_model]) and gate tensors (role `gate`, [B, T, q_heads]); `params` the
    learnable tensors (`sparsedsl.init_params`). Pass them on as
    `reference(ir, q, k, v, params=params, **tensors)`; `reference(ir)` does that.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def seq(self) -> int:
        return self.q.shape[1]

    def reference(self, ir: IR, **kwargs):
        """The dense float64 reference on these inputs (keyword arguments go to `reference`)."""
        from ..reference import reference
        return reference(ir, self.q, self.k, self.v, params=self.params, **self.tensors, **kwargs)

    def prefix(self, length: int) -> "SpecInputs":
        """The first `length` positions of every per-position tensor (params unchanged)."""
        cut = lambda t: t[:, :length].clone()  # noqa: E731
        return replace(self, q=cut(self.q), k=cut(self.k), v=cut(self.v),
                       tensors={n: cut(t) for n, t in self.tensors.items()})

    def perturbed_after(self, t: int, seed: int = 1) -> "SpecInputs":
        """A copy whose q, k, v and declared inputs are redrawn at positions > t.

        A causal layer gives the same output rows 0..t on the copy."""
        g = torch.Generator(device="cpu").manual_seed(seed)

        def redraw(x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            tail = x[:, t + 1:]
            if tail.numel():
                new = torch.randn(tail.shape, generator=g, dtype=torch.float64) * 3 + 1
                x[:, t + 1:] = new.to(dtype=x.dtype, device=x.device)
            return x

        return replace(self, q=redraw(self.q), k=redraw(self.k), v=redraw(self.v),
                       tensors={n: redraw(x) for n, x in self.tensors.items()})

    def to(self, dtype=None, device=None) -> "SpecInputs":
        """A copy with every tensor moved/cast (e.g. to a kernel's float16 on cuda)."""
        mv = lambda t: t.to(dtype=dtype or t.dtype, device=device or t.device)  # noqa: E731
        return SpecInputs(mv(self.q), mv(self.k), mv(self.v),
                          {n: mv(t) for n, t in self.tensors.items()},
                          {n: mv(t) for n, t in self.params.items()})


def spec_inputs(ir: IR, shape: Shape, seed: int = 0, *, dtype=torch.float64, device="cpu",
                override_gates: bool = False) -> SpecInputs:
    """Random inputs for a lowered spec at `shape`, deterministic in `seed`.

    q, k, v are standard normal; the layer input `x` (any input used by
    `linear`) is standard normal; a gate tensor is uniform in [0, 1).
    Gates declared with a default (`input g = sigmoid(linear(x))`) are computed
    from it unless `override_gates`, which gives them as tensors too.
    Learnable params come from `sparsedsl.init_params` with the same seed.
    """
    from ..reference import init_params

    g = torch.Generator(device="cpu").manual_seed(seed)
    B, T = shape.batch, shape.seq

    def normal(*size):
        return torch.randn(size, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    q = normal(B, T, shape.q_heads, shape.head_dim)
    k = normal(B, T, shape.kv_heads, shape.head_dim)
    v = normal(B, T, shape.kv_heads, shape.dv)
    tensors: dict[str, torch.Tensor] = {}
    uses_x = False
    for name, info in ir.inputs.items():
        if info.role == "x":
            tensors[name] = normal(B, T, shape.d_model)
            uses_x = True
        elif info.role == "gate" and (info.node is None or override_gates):
            u = torch.rand((B, T, shape.q_heads), generator=g, dtype=torch.float64)
            tensors[name] = u.to(dtype=dtype, device=device)
    params = init_params(ir, shape.head_dim, shape.q_heads, head_dim_v=shape.dv,
                         d_model=shape.d_model if uses_x else None, seed=seed, dtype=dtype,
                         device=device)
    return SpecInputs(q, k, v, tensors, params)


def gpu_dot_shapes() -> bool:
    """Make Triton's interpreter (TRITON_INTERPRET=1) check `tl.dot` operand shapes the way
    the NVIDIA back end does when it compiles: a reduction (K) of at least 16 (32 for 8-bit
    operands). The interpreter accepts any shape, so a generated kernel with, say, an 8-row
    operand on the reduction side passes every CPU test and then fails to compile on a GPU.
    Returns False (and changes nothing) when Triton runs compiled kernels.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - triton is a dependency
        return False
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False

    def min_dot_size(lhs_type, rhs_type):  # (M, N, K), as triton/backends/nvidia/compiler.py
        return (1, 1, 32) if lhs_type.scalar.primitive_bitwidth == 8 else (1, 1, 16)

    interpreter.interpreter_builder.codegen_fns["min_dot_size"] = min_dot_size
    return True


@contextlib.contextmanager
def poison_empty(value: float = float("nan")):
    """Make `torch.empty` and `torch.empty_like` fill floating-point results with `value` (NaN).

    Memory a kernel was meant to write but did not then shows up as NaN instead
    of whatever the allocator left there. Integer and bool tensors are left as
    they are; tensors that require grad are filled without recording the fill.
    """
    orig_empty, orig_like = torch.empty, torch.empty_like

    def fill(t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided and \
                (t.is_floating_point() or t.is_complex()) and t.device.type != "meta":
            with torch.no_grad():
                t.fill_(value)
        return t

    def empty(*args, **kwargs):
        return fill(orig_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return fill(orig_like(*args, **kwargs))

    empty.__doc__, empty_like.__doc__ = orig_empty.__doc__, orig_like.__doc__
    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = orig_empty, orig_like
