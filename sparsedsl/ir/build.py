"""Syntax tree -> graph IR: name resolution, argument binding and kinds.

Every error here points at the text that caused it: an unknown name at the
name, a wrong argument at the argument, a missing argument at the call.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import (SpecError, SpecTypeError, StructureError, UnknownNameError)
from ..frontend import ast
from .graph import IR, Const, InputInfo, ParamInfo
from .ops import NAMES, OPS, POOL_METHODS, Kind

PARAM_TYPES = ("int", "float", "bool", "method")


@dataclass(frozen=True)
class _Value:
    """What an expression evaluates to while building: a node or a constant."""

    node: int | None = None
    const: Const | None = None
    kind: Kind | None = None
    term: tuple[int | None, int] | None = None  # (gate node, branch node) of `g * b`
    terms: tuple = ()  # list of terms of a sum


def _suggest(name: str, candidates) -> str | None:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


class _Builder:
    def __init__(self, spec: ast.Spec, ir: IR):
        self.spec = spec
        self.ir = ir
        self.scope: dict[str, _Value] = {}
        self.singletons: dict[str, int] = {}
        self.grid_of: dict[int, int] = {}
        self.owner: str | None = None  # name of the statement being built (names parameters)
        self.owners: dict[str, int] = {}  # learnable-parameter owners used so far

    # ------------------------------------------------------------ statements
    def run(self) -> IR:
        for st in self.spec.statements:
            if isinstance(st, ast.Param):
                self.param(st)
            elif isinstance(st, ast.Input):
                self.input(st)
            elif isinstance(st, ast.Let):
                self.let(st)
            elif isinstance(st, ast.Out):
                self.out(st)
        if self.ir.out is None:
            span = self.spec.statements[-1].span if self.spec.statements else self.spec.span
            raise StructureError("the spec has no `out` statement", span,
                                 note="end the spec with `out = <branch or gated sum>`")
        return self.ir

    def _declare(self, name: str, span) -> None:
        if name in self.scope or name in self.ir.params or name in self.ir.inputs:
            raise StructureError(f"`{name}` is already defined", span)
        # constructs are called, values are named: `param topk = 3` and `topk(...)` coexist
        if name in NAMES or name in POOL_METHODS or name in ("k", "v", "true", "false"):
            raise StructureError(f"`{name}` is a built-in name and cannot be redefined", span)

    def param(self, st: ast.Param) -> None:
        self._declare(st.name, st.span)
        v = st.value
        declared = st.type
        if declared is not None and declared not in PARAM_TYPES:
            raise SpecTypeError(f"unknown parameter type `{declared}`; expected one of "
                                f"{', '.join(PARAM_TYPES)}", st.span)
        if isinstance(v, ast.Int):
            inferred, value = "int", v.value
        elif isinstance(v, ast.Float):
            inferred, value = "float", v.value
        elif isinstance(v, ast.Name) and v.id in ("true", "false"):
            inferred, value = "bool", v.id == "true"
        elif isinstance(v, ast.Name):
            inferred, value = "method", v.id
        else:  # pragma: no cover - the grammar allows only literals here
            raise SpecTypeError("a parameter's default must be a literal", v.span)
        ty = declared or inferred
        if ty != inferred:
            if ty == "float" and inferred == "int":
                value = float(value)
            else:
                raise SpecTypeError(f"parameter `{st.name}` is declared {ty} but its default is "
                                    f"{'a ' + inferred if inferred != 'int' else 'an int'}", v.span)
        if ty == "method" and value not in POOL_METHODS:
            raise SpecTypeError(f"unknown method `{value}`; expected one of {', '.join(POOL_METHODS)}",
                                v.span)
        self.ir.params[st.name] = ParamInfo(st.name, ty, value, st.span)

    def input(self, st: ast.Input) -> None:
        self._declare(st.name, st.span)
        info = InputInfo(st.name, st.span)
        self.ir.inputs[st.name] = info
        if st.default is None:
            nid = self.ir.add("input", Kind.TENSOR, st.span, args={"name": st.name}, name=st.name)
        else:
            self.owner = st.name
            val = self.expr(st.default)
            self.owner = None
            if val.kind is not Kind.GATE:
                raise SpecTypeError(f"an input's default must be a gate such as sigmoid(linear(x)), "
                                    f"got {val.kind.article()}", st.default.span)
            nid = self.ir.add("input", Kind.GATE, st.span, {"default": val.node},
                              args={"name": st.name}, name=st.name)
            info.role = "gate"
            info.node = nid
        self.scope[st.name] = _Value(node=nid, kind=self.ir.node(nid)["kind"])

    def let(self, st: ast.Let) -> None:
        self._declare(st.name, st.span)
        self.owner = st.name
        val = self.expr(st.value)
        self.owner = None
        if val.node is not None and self.ir.node(val.node)["name"] is None:
            self.ir.node(val.node)["name"] = st.name
        self.scope[st.name] = val

    def out(self, st: ast.Out) -> None:
        if self.ir.out is not None:
            raise StructureError("a second `out` statement; a spec has exactly one", st.span)
        self.owner = "out"
        val = self.expr(st.value)
        self.owner = None
        if val.kind is Kind.BRANCH:
            self.ir.out = val.node
        elif val.kind is Kind.MIX:
            self.ir.out = val.node if val.node is not None else self._mix(val, st.value.span)
        else:
            raise SpecTypeError(f"`out` must be a branch or a gated sum of branches, got "
                                f"{val.kind.article()}", st.value.span)
        self.ir.out_span = st.span

    # ----------------------------------------------------------- expressions
    def expr(self, e: ast.Expr) -> _Value:
        if isinstance(e, ast.Int):
            return _Value(const=Const("lit", e.value, span=e.span), kind=Kind.INT)
        if isinstance(e, ast.Float):
            return _Value(const=Const("lit", e.value, span=e.span), kind=Kind.FLOAT)
        if isinstance(e, ast.Name):
            return self.name(e)
        if isinstance(e, ast.Call):
            return self.call(e)
        if isinstance(e, ast.UnOp):
            return self.unop(e)
        if isinstance(e, ast.BinOp):
            return self.binop(e)
        raise TypeError(e)  # pragma: no cover

    def name(self, e: ast.Name) -> _Value:
        if e.id in self.scope:
            return self.scope[e.id]
        if e.id in self.ir.params:
            p = self.ir.params[e.id]
            kind = {"int": Kind.INT, "float": Kind.FLOAT, "bool": Kind.INT, "method": Kind.METHOD}[p.type]
            return _Value(const=Const("param", e.id, span=e.span), kind=kind)
        if e.id in NAMES:
            if e.id not in self.singletons:
                self.singletons[e.id] = self.ir.add(e.id, NAMES[e.id], e.span)
            nid = self.singletons[e.id]
            return _Value(node=nid, kind=NAMES[e.id])
        if e.id in POOL_METHODS:
            return _Value(const=Const("lit", e.id, span=e.span), kind=Kind.METHOD)
        if e.id in OPS:
            raise SpecTypeError(f"`{e.id}` is a construct and must be called: `{e.id}(...)`", e.span)
        if e.id in ("k", "v"):
            raise UnknownNameError(f"`{e.id}` cannot be used directly; keys and values enter through "
                                   f"`attend(...)` and `pool(...)`", e.span)
        names = list(self.scope) + list(self.ir.params) + list(self.ir.inputs) + list(NAMES)
        raise UnknownNameError(f"unknown name `{e.id}`", e.span, note=_suggest(e.id, names))

    def _const(self, val: _Value, span, what: str) -> Const:
        if val.const is None:
            raise SpecTypeError(f"{what} must be a constant, got {val.kind.article()}", span)
        return val.const

    def call(self, e: ast.Call) -> _Value:
        d = OPS.get(e.fn)
        if d is None:
            note = _suggest(e.fn, OPS)
            if e.fn in self.scope or e.fn in self.ir.params or e.fn in self.ir.inputs:
                raise SpecTypeError(f"`{e.fn}` is a value, not a construct; it cannot be called",
                                    e.fn_span)
            raise UnknownNameError(f"unknown construct `{e.fn}`", e.fn_span, note=note)
        if d.variadic is not None:
            return self._variadic(d, e)
        if len(e.args) > len(d.args):
            raise SpecTypeError(f"`{e.fn}` takes at most {len(d.args)} argument"
                                f"{'s' if len(d.args) != 1 else ''}, got {len(e.args)}",
                                e.args[len(d.args)].span)
        bound: dict[str, tuple[ast.Expr, object]] = {}
        for a, x in zip(d.args, e.args):
            bound[a.name] = (x, x.span)
        names = [a.name for a in d.args]
        for (k, x), sp in zip(e.kwargs, e.kw_spans or [None] * len(e.kwargs)):
            if k not in names:
                raise UnknownNameError(f"`{e.fn}` has no argument `{k}`", sp or x.span,
                                       note=f"its arguments are: {', '.join(names)}")
            if k in bound:
                raise SpecTypeError(f"argument `{k}` of `{e.fn}` given twice", sp or x.span)
            bound[k] = (x, x.span)

        operands: dict[str, int] = {}
        args: dict[str, object] = {}
        kinds: dict[str, Kind] = {}
        for a in d.args:
            if a.name not in bound:
                if a.optional_node:
                    continue
                if a.default is None:
                    raise SpecTypeError(f"`{e.fn}` needs its `{a.name}` argument", e.span,
                                        note=f"{e.fn}({', '.join(names)})")
                if isinstance(a.default, str) and a.default.startswith("<same:"):
                    args[a.name] = args[a.default[6:-1]]
                else:
                    args[a.name] = Const("lit", a.default, span=e.span)
                continue
            x, span = bound[a.name]
            val = self.expr(x)
            if val.kind not in a.kinds and not (val.kind is Kind.INT and Kind.FLOAT in a.kinds):
                want = " or ".join(k.article() for k in a.kinds)
                raise SpecTypeError(f"argument `{a.name}` of `{e.fn}` must be {want}, got "
                                    f"{val.kind.article()}", span)
            if val.kind.is_const:
                args[a.name] = val.const
            else:
                operands[a.name] = val.node
                kinds[a.name] = val.kind
        return self._node_for(d, e, operands, args, kinds)

    def _node_for(self, d, e: ast.Call, operands, args, kinds) -> _Value:
        op = d.op
        kind = d.result
        grid = None
        if e.fn == "attend":
            if kinds["keys"] is Kind.POOL:
                if "blocks" not in operands:
                    raise SpecTypeError("attending pooled blocks needs the block set to attend: "
                                        "`attend(pool, blocks)`", e.span)
                self._same_grid(operands["keys"], operands["blocks"], e.span)
                op = "attend_pooled"
                grid = self.grid_of[operands["keys"]]
            else:
                if "blocks" in operands:
                    raise SpecTypeError("`attend(keys, blocks)` takes a block set only with pooled "
                                        "keys; for real tokens use `attend(tokens(blocks) & ...)`",
                                        e.span)
                op = "attend_tokens"
        elif e.fn == "blocks":
            pass
        elif e.fn in ("past", "current", "future", "first", "recent", "random"):
            grid = operands["grid"]
        elif e.fn == "pool":
            grid = operands["grid"]
        elif e.fn == "dot":
            grid = self.grid_of[operands["pool"]]
        elif e.fn == "probs":
            b = operands["branch"]
            if self.ir.node(b)["op"] != "attend_pooled":
                raise SpecTypeError("`probs` needs a branch over pooled blocks, "
                                    "such as `attend(pool(g, mean), past(g))`", e.args[0].span)
            grid = self.grid_of[b]
        elif e.fn == "remap":
            grid = operands["grid"]
        elif e.fn == "groupsum":
            grid = self.grid_of[operands["score"]]
        elif e.fn == "topk":
            grid = self.grid_of[operands["score"]]
            for which in ("force", "forbid"):
                if which in operands:
                    self._same_grid(operands["score"], operands[which], e.span)
        elif e.fn == "linear":
            self._use_input(operands["x"], "x", e.args[0].span if e.args else e.span)
        param_owner = self.owner if e.fn in ("pool", "linear") else None
        nid = self.ir.add(op, kind, e.span, operands, args)
        if param_owner is not None:
            # learnable tensors are named `<owner>.<role>`; a second one in the same statement
            # gets `<owner>.1`, ... (named here, once, so every later stage agrees)
            count = self.owners.get(param_owner, 0)
            self.owners[param_owner] = count + 1
            self.ir.node(nid)["facts"]["params"] = \
                param_owner if count == 0 else f"{param_owner}.{count}"
        if grid is not None:
            self.grid_of[nid] = self.grid_of.get(grid, grid)
        if op == "blocks":
            self.grid_of[nid] = nid
        if grid is not None or op == "blocks":
            self.ir.node(nid)["facts"]["grid"] = f"%{self.grid_of[nid]}"
        return _Value(node=nid, kind=kind)

    def _variadic(self, d, e: ast.Call) -> _Value:
        if e.kwargs:
            raise SpecTypeError(f"`{e.fn}` takes no keyword arguments", e.kw_spans[0] if e.kw_spans
                                else e.span)
        if len(e.args) < 2:
            raise SpecTypeError(f"`{e.fn}` needs at least two branches", e.span)
        operands = {}
        for i, x in enumerate(e.args):
            val = self.expr(x)
            if val.kind is not d.variadic:
                raise SpecTypeError(f"`{e.fn}` combines branches; argument {i + 1} is "
                                    f"{val.kind.article()}", x.span)
            # a union inside a union is the same softmax: splice its branches in
            inner = [val.node]
            if self.ir.node(val.node)["op"] == "union":
                inner = list(self.ir.operands(val.node).values())
            for b in inner:
                if b in operands.values():
                    raise SpecTypeError(f"branch given twice to `{e.fn}`", x.span)
                operands[str(len(operands))] = b
        return _Value(node=self.ir.add(d.op, d.result, e.span, operands), kind=d.result)

    def _same_grid(self, a: int, b: int, span) -> None:
        ga, gb = self.grid_of[a], self.grid_of[b]
        if ga == gb:
            return
        na, nb = self.ir.node(ga), self.ir.node(gb)
        if na["args"] == nb["args"]:
            return
        raise SpecTypeError(
            f"these operands use two different block grids (line {na['span'].line}: "
            f"`{na['span'].text}`, line {nb['span'].line}: `{nb['span'].text}`)", span,
            note="bind the grid once with `let g = blocks(...)` and use it everywhere")

    def _use_input(self, nid: int, role: str, span) -> None:
        n = self.ir.node(nid)
        if n["op"] != "input" or n["kind"] is not Kind.TENSOR:
            raise SpecTypeError("expected a declared input tensor (`input x`)", span)
        info = self.ir.inputs[n["args"]["name"]]
        if info.role is not None and info.role != role:
            what = {"x": "the layer input of `linear`", "gate": "a gate tensor"}
            raise SpecTypeError(f"input `{info.name}` is used both as {what[info.role]} and as "
                                f"{what[role]}", span)
        info.role = role

    def unop(self, e: ast.UnOp) -> _Value:
        val = self.expr(e.operand)
        if e.op == "~":
            if val.kind not in (Kind.KEYS, Kind.BLOCKS):
                raise SpecTypeError(f"`~` takes a key set or a block set, got {val.kind.article()}",
                                    e.span)
            nid = self.ir.add("not", val.kind, e.span, {"0": val.node})
            if val.kind is Kind.BLOCKS:
                self.grid_of[nid] = self.grid_of[val.node]
                self.ir.node(nid)["facts"]["grid"] = f"%{self.grid_of[nid]}"
            return _Value(node=nid, kind=val.kind)
        if val.const is None:
            raise SpecTypeError(f"`-` takes a number, got {val.kind.article()}", e.span)
        return _Value(const=Const("neg", left=val.const, span=e.span), kind=val.kind)

    def binop(self, e: ast.BinOp) -> _Value:
        lv, rv = self.expr(e.left), self.expr(e.right)
        if e.op in ("|", "&"):
            if lv.kind not in (Kind.KEYS, Kind.BLOCKS) or rv.kind not in (Kind.KEYS, Kind.BLOCKS):
                bad = e.left if lv.kind not in (Kind.KEYS, Kind.BLOCKS) else e.right
                badk = lv.kind if bad is e.left else rv.kind
                raise SpecTypeError(f"`{e.op}` combines key sets or block sets, got "
                                    f"{badk.article()}", bad.span)
            if lv.kind is not rv.kind:
                raise SpecTypeError(f"`{e.op}` cannot combine {lv.kind.article()} with "
                                    f"{rv.kind.article()}", e.span,
                                    note="turn blocks into keys with `tokens(...)`")
            op = "or" if e.op == "|" else "and"
            if lv.kind is Kind.BLOCKS:
                self._same_grid(lv.node, rv.node, e.span)
            nid = self.ir.add(op, lv.kind, e.span, {"0": lv.node, "1": rv.node})
            if lv.kind is Kind.BLOCKS:
                self.grid_of[nid] = self.grid_of[lv.node]
                self.ir.node(nid)["facts"]["grid"] = f"%{self.grid_of[nid]}"
            return _Value(node=nid, kind=lv.kind)
        if lv.const is not None and rv.const is not None:
            if lv.kind is Kind.METHOD or rv.kind is Kind.METHOD:
                raise SpecTypeError(f"`{e.op}` cannot take a method name", e.span)
            kind = Kind.INT if (lv.kind is Kind.INT and rv.kind is Kind.INT and e.op != "/") \
                else Kind.FLOAT
            return _Value(const=Const(e.op, left=lv.const, right=rv.const, span=e.span), kind=kind)
        if e.op == "*":
            gate, branch = (lv, rv) if rv.kind is Kind.BRANCH else (rv, lv)
            if branch.kind is not Kind.BRANCH or gate.kind not in (Kind.GATE, Kind.TENSOR):
                raise SpecTypeError(f"`*` multiplies a branch by a gate, got {lv.kind.article()} "
                                    f"and {rv.kind.article()}", e.span)
            if gate.kind is Kind.TENSOR:
                self._use_input(gate.node, "gate", e.span)
            return _Value(kind=Kind.MIX, terms=((gate.node, branch.node),))
        if e.op == "+":
            terms = []
            for v, x in ((lv, e.left), (rv, e.right)):
                if v.kind is Kind.BRANCH:
                    terms.append((None, v.node))
                elif v.kind is Kind.MIX and v.node is None:
                    terms.extend(v.terms)
                else:
                    raise SpecTypeError(f"`+` adds branches or gated branches, got "
                                        f"{v.kind.article()}", x.span)
            seen = [b for _, b in terms]
            if len(set(seen)) != len(seen):
                raise SpecTypeError("the same branch appears twice in a sum", e.span)
            return _Value(kind=Kind.MIX, terms=tuple(terms))
        raise SpecTypeError(f"`{e.op}` takes numbers, got {lv.kind.article()} and "
                            f"{rv.kind.article()}", e.span)

    def _mix(self, val: _Value, span) -> int:
        operands = {}
        for idx, (gate, branch) in enumerate(val.terms):
            operands[f"branch.{idx}"] = branch
            if gate is not None:
                operands[f"gate.{idx}"] = gate
        return self.ir.add("mix", Kind.MIX, span, operands, args={"terms": len(val.terms)})


def build(spec: ast.Spec, source) -> IR:
    """The `build` stage: syntax tree -> graph IR."""
    ir = IR(source, spec.name, spec.doc)
    if not spec.statements:
        from ..errors import Span
        raise StructureError("the spec is empty", spec.span or Span(source, 1, 1, 1, 2),
                             note="a spec needs at least an `out` statement")
    try:
        return _Builder(spec, ir).run()
    except SpecError:
        raise
