"""The graph IR: a networkx MultiDiGraph of operations.

Each node is an operation with attributes:

  op      the IR operation (`blocks`, `topk`, `attend_tokens`, ...)
  kind    the value kind it produces (`ops.Kind`)
  args    constant arguments (a `Const` expression before `resolve-params`, a value after)
  span    the source span it came from
  name    the `let`/`input` name bound to it, if any
  facts   what passes proved about it (causality, heads, grid, ...)

Edges carry data flow from operand to user, with `arg` = the argument it feeds
(`"score"`, `"force"`, or `"0"`, `"1"`, ... for variadic operands).
The IR prints as deterministic text (`format`) and as Graphviz dot (`to_dot`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from ..errors import Source, Span
from .ops import Kind


# ---------------------------------------------------------------- constants
@dataclass(frozen=True)
class Const:
    """A constant expression over literals and parameters, folded by `resolve-params`."""

    op: str  # "lit", "param", "neg", or a binary operator
    value: object = None  # literal value or parameter name
    left: "Const | None" = None
    right: "Const | None" = None
    span: Span | None = field(default=None, compare=False)

    def __str__(self) -> str:
        if self.op == "lit":
            return str(self.value)
        if self.op == "param":
            return f"${self.value}"
        if self.op == "neg":
            return f"-({self.left})"
        return f"({self.left} {self.op} {self.right})"

    def params(self) -> set[str]:
        if self.op == "param":
            return {self.value}
        out = set()
        for c in (self.left, self.right):
            if c is not None:
                out |= c.params()
        return out


@dataclass
class ParamInfo:
    name: str
    type: str  # "int", "float", "bool", "method"
    default: object
    span: Span
    value: object = None
    origin: str = "default"  # "default", or where an override came from


@dataclass
class InputInfo:
    name: str
    span: Span
    role: str | None = None  # "x" (layer input) or "gate" (given gate tensor)
    node: int | None = None  # the node of its default computation, if any


# ----------------------------------------------------------------------- IR
class IR:
    def __init__(self, source: Source, spec_name: str | None, doc: str | None = None):
        # a multigraph: one node can feed two arguments of another (`a & a`, `g * x + g * y`)
        self.g = nx.MultiDiGraph()
        self.source = source
        self.spec_name = spec_name or "spec"
        self.doc = doc
        self.params: dict[str, ParamInfo] = {}
        self.inputs: dict[str, InputInfo] = {}
        self.out: int | None = None
        self.out_span: Span | None = None
        self.passes_run: list[str] = []
        self.unused: list[str] = []  # names `dce` removed (warned about by `check`)
        self._next = 0

    # construction -------------------------------------------------------------
    def add(self, op: str, kind: Kind, span: Span | None, operands: dict[str, int] | None = None,
            args: dict | None = None, name: str | None = None) -> int:
        nid = self._next
        self._next += 1
        self.g.add_node(nid, op=op, kind=kind, args=dict(args or {}), span=span, name=name, facts={})
        for arg, src in (operands or {}).items():
            self.g.add_edge(src, nid, arg=arg)
        return nid

    # access -------------------------------------------------------------------
    def node(self, nid: int) -> dict:
        return self.g.nodes[nid]

    def operands(self, nid: int) -> dict[str, int]:
        """Operand node ids by argument name, in argument order."""
        items = [(d["arg"], u) for u, _, d in self.g.in_edges(nid, data=True)]
        return dict(sorted(items, key=lambda t: (_arg_order(t[0]), t[0])))

    def operand(self, nid: int, arg: str) -> int | None:
        return self.operands(nid).get(arg)

    def label(self, nid: int) -> str:
        """A node's name for people and for result dictionaries: its `let` name, or n<id>."""
        return self.g.nodes[nid]["name"] or f"n{nid}"

    def users(self, nid: int) -> list[int]:
        return sorted(self.g.successors(nid))

    def order(self) -> list[int]:
        """Nodes in a deterministic topological order (operands before users)."""
        return list(nx.lexicographical_topological_sort(self.g))

    def nodes_with(self, op: str) -> list[int]:
        return [n for n in self.order() if self.g.nodes[n]["op"] == op]

    def param_values(self) -> dict[str, object]:
        return {p.name: p.value if p.value is not None else p.default for p in self.params.values()}

    # printing -----------------------------------------------------------------
    def format(self, spans: bool = True) -> str:
        """Deterministic text: one line per node, operands before users."""
        head = f"spec {self.spec_name}"
        pv = ", ".join(f"{k}={_fmt(v)}" for k, v in self.param_values().items())
        lines = [f"{head}({pv})"]
        if self.passes_run:
            lines.append(f"  # passes: {', '.join(self.passes_run)}")
        for name, info in self.inputs.items():
            lines.append(f"  input {name}" + (f" : {info.role}" if info.role else ""))
        width = 0
        body = []
        for nid in self.order():
            n = self.g.nodes[nid]
            ops = self.operands(nid)
            parts = [f"{a}=%{u}" if not a.isdigit() else f"%{u}" for a, u in ops.items()]
            parts += [f"{k}={_fmt(v)}" for k, v in n["args"].items()]
            text = f"  %{nid} = {n['op']}({', '.join(parts)}) : {n['kind'].value}"
            if n["name"]:
                text += f"  [{n['name']}]"
            facts = n["facts"]
            if facts:
                text += "  {" + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(facts.items())) + "}"
            loc = f"{n['span'].line}:{n['span'].col}" if spans and n["span"] is not None else ""
            body.append((text, loc))
            width = max(width, len(text))
        for text, loc in body:
            lines.append(f"{text.ljust(width)}  # {loc}" if loc else text)
        if self.out is not None:
            lines.append(f"  out %{self.out}")
        return "\n".join(lines) + "\n"

    def to_dot(self) -> str:
        lines = [f'digraph "{self.spec_name}" {{', "  rankdir=TB;",
                 '  node [shape=box, fontname="monospace", fontsize=10];']
        for nid in self.order():
            n = self.g.nodes[nid]
            label = f"%{nid} {n['op']}"
            if n["args"]:
                label += "\\n" + ", ".join(f"{k}={_fmt(v)}" for k, v in n["args"].items())
            label += f"\\n: {n['kind'].value}"
            if n["name"]:
                label += f" [{n['name']}]"
            style = ', style=bold' if nid == self.out else ""
            lines.append(f'  n{nid} [label="{_esc(label)}"{style}];')
        for u, v, d in sorted(self.g.edges(data=True), key=lambda e: (e[0], e[1], e[2]["arg"])):
            lines.append(f'  n{u} -> n{v} [label="{_esc(d["arg"])}"];')
        lines.append("}")
        return "\n".join(lines) + "\n"


def _arg_order(arg: str) -> int:
    return int(arg) if arg.isdigit() else 1000


def _fmt(v) -> str:
    if isinstance(v, float):
        from ..frontend.printer import format_number
        return format_number(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _esc(s: str) -> str:
    return s.replace('"', '\\"')
