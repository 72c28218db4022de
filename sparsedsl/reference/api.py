"""`reference(spec, q, k, v, ...)`: run the dense evaluator on a spec's IR."""
from __future__ import annotations

import torch

from ..ir.graph import IR
from .evaluate import Details, _Evaluator, check_inputs
from .params import Dims, init_params, param_shapes


def reference(spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, params=None,
              return_details: bool = False, selections: dict | None = None,
              **inputs_and_overrides):
    """Evaluate a spec exactly (float64, full masks) on q, k, v [batch, seq, heads, head_dim].

    Keyword arguments are the spec's declared inputs (tensors such as `x` or `g_cmp`) and
    parameter overrides (`block=256`). `params` maps learnable tensor names
    (see `param_shapes`) to values. Returns the output [batch, seq, q_heads, head_dim_v]
    in q's dtype, or a `Details` (float64) with per-branch outputs, selected block
    indices and masks when `return_details=True`. `selections` (name -> [B, T, H, S]
    block indices) replaces what a `topk` would select: tests use it to evaluate the
    reference on a kernel's own selection.
    """
    from ..pipeline import lower

    if isinstance(spec, IR):
        ir = spec
        if any(not isinstance(t, torch.Tensor) for t in inputs_and_overrides.values()):
            raise ValueError("parameter overrides need a spec, not an already lowered IR")
        tensors = dict(inputs_and_overrides)
    else:
        probe = lower(spec)
        tensors = {n: t for n, t in inputs_and_overrides.items() if n in probe.inputs
                   or isinstance(t, torch.Tensor)}
        overrides = {n: t for n, t in inputs_and_overrides.items() if n not in tensors}
        ir = lower(spec, overrides) if overrides else probe
    unknown = sorted(set(tensors) - set(ir.inputs))
    if unknown:
        raise ValueError(f"spec `{ir.spec_name}` has no input {', '.join(map(repr, unknown))}; "
                         f"its inputs are: {', '.join(ir.inputs) or 'none'}")
    check_inputs(ir, q, k, v, tensors)
    x = next((tensors[n] for n, i in ir.inputs.items() if i.role == "x" and n in tensors), None)
    dims = Dims(q.shape[-1], v.shape[-1], q.shape[2], x.shape[-1] if x is not None else None)
    params = dict(params or {})
    try:
        shapes = param_shapes(ir, dims)
    except ValueError:
        shapes = {n: None for n in params}
    for name, shape in shapes.items():
        if name not in params:
            raise ValueError(f"spec `{ir.spec_name}` needs learnable tensor `{name}` of shape "
                             f"{list(shape) if shape else '?'} in `params` "
                             f"(sparsedsl.init_params makes them)")
        if shape is not None and tuple(params[name].shape) != tuple(shape):
            raise ValueError(f"learnable tensor `{name}` must have shape {list(shape)}, "
                             f"got {list(params[name].shape)}")
    details = _Evaluator(ir, q, k, v, tensors, params, dims, selections).run()
    details.density = _density(details, q.shape[1])
    if return_details:
        return details
    return details.out.to(q.dtype)


def _density(d: Details, T: int) -> float:
    """Fraction of causal (query, key) pairs that some branch attends, averaged over heads."""
    if not d.keys:
        return 0.0
    masks = list(d.keys.values())
    m = masks[0]
    for x in masks[1:]:
        m = m | x
    causal = torch.ones(T, T, dtype=torch.bool, device=m.device).tril()
    return float((m & causal).sum().item() / (causal.sum().item() * m.shape[0] * m.shape[1]))

