"""Checking a compiled layer's gradients against the dense reference's autograd.

Both sides in float64: the layer's generated backward kernels against
`torch.autograd` through the reference, evaluated on the kernels' own block
selections (the top-k itself is not differentiated). Every gradient is
compared: q, k, v, the declared input tensors and each learnable tensor.
"""
from __future__ import annotations

import torch

F64 = torch.float64


def _grads(out, leaves, do):
    gs = torch.autograd.grad(out, leaves, do, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, leaves)]


def gradient_errors(layer, data, seed: int = 0) -> dict[str, float]:
    """Relative error of every gradient of `layer` (float64, params already set) on
    `data` (a float64 `SpecInputs`): max |mine - ref| / max(max |ref|, 1e-3 * scale), with
    `scale` the largest of the q, k, v gradients."""
    from ..reference import reference
    q, k, v = (t.clone().requires_grad_() for t in (data.q, data.k, data.v))
    ins = {n: t.clone().requires_grad_() for n, t in data.tensors.items()}
    names = [n for n, _ in layer.named_parameters()]
    out, lists = layer(q, k, v, return_lists=True, **ins)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    do = do.to(out.device)
    mine = _grads(out, [q, k, v] + list(ins.values()) + list(layer.parameters()), do)

    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (data.q, data.k, data.v))
    ins2 = {n: t.detach().clone().requires_grad_() for n, t in data.tensors.items()}
    p2 = {n: p.detach().clone().requires_grad_() for n, p in layer.learnable().items()}
    ref = reference(layer.ir, q2, k2, v2, params=p2, **ins2,
                    selections={n: s.long() for n, s in lists.items()})
    by_safe = {safe: n for n, safe in layer._param_names.items()}
    theirs = _grads(ref, [q2, k2, v2] + list(ins2.values()) + [p2[by_safe[n]] for n in names],
                    do)
    labels = ["q", "k", "v"] + list(ins) + names
    scale = max(float(t.abs().max()) for t in theirs[:3]) or 1.0
    return {label: float((a - b).abs().max()) / max(float(b.abs().max()), 1e-3 * scale)
            for label, a, b in zip(labels, mine, theirs)}
