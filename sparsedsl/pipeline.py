"""The pipeline from text to a checked IR, one named stage at a time:

    load -> parse -> build -> verify -> resolve-params -> causality -> heads -> dce

(code generation continues from the IR: see `codegen/`).
Each stage's output can be printed: `sparsedsl ir --after PASS`.
"""
from __future__ import annotations

from .errors import Source
from .frontend import ast
from .frontend.load import load_source
from .frontend.parser import parse
from .ir.build import build
from .ir.graph import IR
from .passes import default_passes, run_passes

STAGES = ("parse", "build", "resolve-params", "causality", "heads", "dce")


def parse_spec(spec) -> tuple[ast.Spec, Source]:
    source = load_source(spec)
    return parse(source.text, source.name), source


def lower(spec, params: dict | None = None, origin: str = "compile()",
          stop_after: str | None = None) -> IR:
    """Spec (name, path or text) -> verified IR with parameters resolved."""
    tree, source = parse_spec(spec)
    ir = build(tree, source)
    ir.passes_run.append("build")
    if stop_after == "build":
        return ir
    return run_passes(ir, default_passes(params, origin), stop_after=stop_after)
