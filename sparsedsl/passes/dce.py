"""`dce`: drop what `out` does not use, and remember it for warnings."""
from __future__ import annotations

import networkx as nx

from ..ir.graph import IR


class DeadCode:
    name = "dce"

    def apply(self, ir: IR) -> None:
        live = nx.ancestors(ir.g, ir.out) | {ir.out}
        dead = [n for n in ir.order() if n not in live]
        ir.unused = sorted({ir.node(n)["name"] for n in dead if ir.node(n)["name"]})
        ir.g.remove_nodes_from(dead)
        for name, info in list(ir.inputs.items()):
            if info.role is None or (info.node is not None and info.node not in live):
                ir.unused.append(name)
                del ir.inputs[name]
