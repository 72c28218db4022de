"""sparsedsl: a compiler for sparse attention patterns.

    import sparsedsl
    ir = sparsedsl.lower("moba", {"block": 256})           # text -> checked graph IR
    out = sparsedsl.reference("nsa", q, k, v, x=x, params=p)  # the dense oracle
"""
from .errors import (CausalityError, SpecError, SpecSyntaxError, SpecTypeError, StructureError,
                     UnknownNameError, UnknownSpecError, ValueRangeError)
from .frontend.load import builtin_names
from .frontend.parser import parse
from .frontend.printer import format_spec
from .pipeline import lower, parse_spec
from .reference import Details, init_params, reference
from .runtime.layer import SparseAttention, compile

__version__ = "0.1.0"

__all__ = ["CausalityError", "Details", "SparseAttention", "compile", "SpecError", "SpecSyntaxError", "SpecTypeError",
           "StructureError", "UnknownNameError", "UnknownSpecError", "ValueRangeError",
           "builtin_names", "format_spec", "init_params", "lower", "parse", "parse_spec",
           "reference"]
