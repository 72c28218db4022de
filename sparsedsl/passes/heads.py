"""`heads`: how each value varies over heads, for the reference and the lowering.

  static  the same for every head and every input (a fixed pattern)
  group   one per GQA group: shared by the query heads of a kv head (`groupsum`)
  head    one per query head (data-dependent: `dot`, `probs`)

A selection shared by a group is what lets a kernel load the group's queries
together (NSA's kernel design); a static pattern needs no selection at all.
"""
from __future__ import annotations

from ..ir.graph import IR
from ..ir.ops import Kind

_RANK = {"static": 0, "group": 1, "head": 2}


class Heads:
    name = "heads"

    def apply(self, ir: IR) -> None:
        for nid in ir.order():
            n = ir.node(nid)
            if n["kind"] not in (Kind.KEYS, Kind.BLOCKS, Kind.SCORE, Kind.BRANCH, Kind.MIX):
                continue
            ops = ir.operands(nid)
            if n["op"] in ("dot", "probs"):
                heads = "head"
            elif n["op"] == "groupsum":
                heads = "group"
            else:
                subs = [ir.node(u)["facts"].get("heads") for u in ops.values()]
                subs = [s for s in subs if s is not None]
                heads = max(subs, key=_RANK.__getitem__) if subs else "static"
            n["facts"]["heads"] = heads
