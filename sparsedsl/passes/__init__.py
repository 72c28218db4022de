"""The pass pipeline over the graph IR.

    verify -> resolve-params -> verify -> causality -> heads -> dce -> verify

Each pass is a small class with a `name` and one `apply(ir)`; `run_passes`
runs them in order, verifies the IR between them and records their names in
`ir.passes_run` (printed in the IR text and in every generated kernel header).
"""
from __future__ import annotations

from ..ir.graph import IR
from .causality import Causality
from .dce import DeadCode
from .heads import Heads
from .resolve import ResolveParams
from .verify import InternalError, Verify

PASS_NAMES = ("resolve-params", "causality", "heads", "dce")


def default_passes(overrides: dict | None = None, origin: str = "compile()") -> list:
    return [ResolveParams(overrides, origin), Causality(), Heads(), DeadCode()]


def run_passes(ir: IR, passes: list, stop_after: str | None = None) -> IR:
    Verify().apply(ir)
    for p in passes:
        p.apply(ir)
        ir.passes_run.append(p.name)
        Verify(resolved=True).apply(ir)
        if stop_after == p.name:
            break
    return ir


__all__ = ["Causality", "DeadCode", "Heads", "InternalError", "PASS_NAMES", "ResolveParams",
           "Verify", "default_passes", "run_passes"]
