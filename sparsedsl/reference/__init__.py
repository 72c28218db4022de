"""The dense reference: the oracle every kernel is tested against.

    reference(spec, q, k, v, ...)   evaluate a spec exactly (float64, full masks)  -> api.py
    init_params(spec, ...)          fresh learnable tensors for a spec             -> params.py

The evaluator itself is `evaluate.py`. This file imports no torch, so that
`import sparsedsl` (and the CLI's `check`, `ir`, `fmt`) start fast.
"""
from __future__ import annotations


def reference(spec, q, k, v, **kwargs):
    from .api import reference as _reference
    return _reference(spec, q, k, v, **kwargs)


def init_params(spec, *args, **kwargs):
    from .params import init_params as _init_params
    return _init_params(spec, *args, **kwargs)


reference.__doc__ = """Evaluate a spec exactly (float64, full masks); see `sparsedsl.reference.api`."""


def __getattr__(name):
    if name in ("Details", "check_inputs"):
        from . import evaluate
        return getattr(evaluate, name)
    if name in ("Dims", "param_shapes"):
        from . import params
        return getattr(params, name)
    raise AttributeError(name)
