"""sparsedsl: a compiler for sparse attention patterns.

    import sparsedsl
    ir = sparsedsl.lower("moba", {"block": 256})              # text -> checked graph IR
    layer = sparsedsl.compile("moba", block=256)              # -> torch.nn.Module (Triton kernels)
    out = sparsedsl.reference("nsa", q, k, v, x=x, params=p)  # the dense oracle

The front end and the IR need no torch; the reference and the layer import it
when first used (so `sparsedsl check` starts fast).
"""
from .errors import (CausalityError, SpecError, SpecSyntaxError, SpecTypeError, StructureError,
                     UnknownNameError, UnknownSpecError, ValueRangeError)
from .frontend.load import builtin_names
from .frontend.parser import parse
from .frontend.printer import format_spec
from .pipeline import lower, parse_spec
from .reference import init_params, reference  # (torch is imported on first use)

__version__ = "0.1.0"

_LAZY = {
    "Details": ("sparsedsl.reference.evaluate", "Details"),
    "compile": ("sparsedsl.runtime.layer", "compile"),
    "SparseAttention": ("sparsedsl.runtime.layer", "SparseAttention"),
    "KVCache": ("sparsedsl.runtime.decode", "KVCache"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparsedsl' has no attribute {name!r}")


__all__ = ["CausalityError", "Details", "KVCache", "SparseAttention", "SpecError", "SpecSyntaxError",
           "SpecTypeError", "StructureError", "UnknownNameError", "UnknownSpecError",
           "ValueRangeError", "builtin_names", "compile", "format_spec", "init_params", "lower",
           "parse", "parse_spec", "reference"]
