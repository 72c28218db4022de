"""`verify`: the IR's own invariants, checked between passes.

A failure here is a bug in sparsedsl, not in the spec: it raises
`InternalError`, never a `SpecError`.
"""
from __future__ import annotations

import networkx as nx

from ..ir.graph import IR, Const
from ..ir.ops import OPS, Kind


class InternalError(AssertionError):
    pass


_EXTRA_OPS = {"q": Kind.QUERY, "causal": Kind.KEYS, "input": None, "attend_tokens": Kind.BRANCH,
              "attend_pooled": Kind.BRANCH, "and": None, "or": None, "not": None, "mix": Kind.MIX}


class Verify:
    name = "verify"

    def __init__(self, resolved: bool = False):
        self.resolved = resolved

    def apply(self, ir: IR) -> None:
        def fail(msg):
            raise InternalError(f"IR verification failed after {ir.passes_run[-1:]}: {msg}")

        if not nx.is_directed_acyclic_graph(ir.g):
            fail("the graph has a cycle")
        if ir.out is None or ir.out not in ir.g:
            fail("no out node")
        if ir.node(ir.out)["kind"] not in (Kind.BRANCH, Kind.MIX):
            fail("out is not a branch or a mix")
        for nid in ir.g.nodes:
            n = ir.node(nid)
            op = n["op"]
            if op not in OPS and op not in _EXTRA_OPS:
                fail(f"%{nid}: unknown op {op}")
            want = OPS[op].result if op in OPS else _EXTRA_OPS[op]
            if want is not None and n["kind"] is not want:
                fail(f"%{nid}: {op} has kind {n['kind']}, expected {want}")
            if n["kind"] in (Kind.BLOCKS, Kind.SCORE, Kind.POOL) and "grid" not in n["facts"]:
                fail(f"%{nid}: {op} has no grid")
            if self.resolved and any(isinstance(v, Const) for v in n["args"].values()):
                fail(f"%{nid}: unresolved constant")
