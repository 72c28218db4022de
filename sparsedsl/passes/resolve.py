"""`resolve-params`: apply parameter overrides, fold constants, check their ranges.

After this pass every constant argument of every node is a plain Python value.
A value that cannot work (block size 0, topk < 1, stride > length, window < 1)
is reported at the argument that received it, with where the value came from.
"""
from __future__ import annotations

import difflib
import math

from ..errors import SpecTypeError, UnknownNameError, ValueRangeError
from ..ir.graph import IR, Const
from ..ir.ops import OPS, POOL_METHODS

# Largest integer argument: kernels (and the reference's index tensors) use 32-bit integers.
MAX_INT = 2**31 - 1


def coerce_param(ir: IR, name: str, raw, origin: str):
    """Convert an override (a Python value, or a string from the CLI) to the parameter's type."""
    if name not in ir.params:
        known = ", ".join(ir.params) or "none"
        close = difflib.get_close_matches(str(name), list(ir.params), n=1, cutoff=0.6)
        raise UnknownNameError(f"spec `{ir.spec_name}` has no parameter `{name}` ({origin}); "
                               f"its parameters are: {known}",
                               note=f"did you mean `{close[0]}`?" if close else None)
    p = ir.params[name]
    bad = SpecTypeError(f"parameter `{name}` is {_article(p.type)}; got {_repr(raw)} ({origin})",
                        p.span)
    if p.type == "int":
        if isinstance(raw, bool):
            raise bad
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                raise bad from None
        raise bad
    if p.type == "float":
        if isinstance(raw, bool):
            raise bad
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw.strip())
            except ValueError:
                raise bad from None
        raise bad
    if p.type == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false", "1", "0"):
            return raw.strip().lower() in ("true", "1")
        raise bad
    if p.type == "method":
        if isinstance(raw, str) and raw.strip() in POOL_METHODS:
            return raw.strip()
        raise SpecTypeError(f"parameter `{name}` is a method ({', '.join(POOL_METHODS)}); got "
                            f"{_repr(raw)} ({origin})", p.span)
    raise AssertionError(p.type)  # pragma: no cover


def _article(ty: str) -> str:
    return {"int": "an int", "float": "a float", "bool": "a bool", "method": "a method"}[ty]


class ResolveParams:
    name = "resolve-params"

    def __init__(self, overrides: dict | None = None, origin: str = "compile()"):
        self.overrides = dict(overrides or {})
        self.origin = origin

    def apply(self, ir: IR) -> None:
        for name, raw in self.overrides.items():
            value = coerce_param(ir, name, raw, f"from {self.origin}")
            ir.params[name].value = value
            ir.params[name].origin = self.origin
        values = ir.param_values()
        for nid in ir.order():
            n = ir.node(nid)
            d = OPS.get(_call_name(n["op"]))
            for key, c in list(n["args"].items()):
                if not isinstance(c, Const):
                    continue
                v = self._eval(ir, c, values)
                arg = next((a for a in d.args if a.name == key), None) if d else None
                if arg is not None:
                    v = self._check(ir, n, arg, v, c)
                n["args"][key] = v
            if n["op"] == "strided" and n["args"]["offset"] >= n["args"]["step"]:
                raise ValueRangeError(f"`strided` offset {n['args']['offset']} must be smaller than "
                                      f"its step {n['args']['step']}: no key would match",
                                      n["span"])
            if n["op"] == "summary" and n["args"]["width"] > n["args"]["step"]:
                raise ValueRangeError(f"`summary` width {n['args']['width']} is larger than its "
                                      f"step {n['args']['step']}", n["span"])
            if n["op"] == "union":
                scales = {ir.node(u)["args"].get("scale") for u in ir.operands(nid).values()
                          if ir.node(u)["op"] == "attend_tokens"}
                if len(scales) > 1:
                    raise ValueRangeError("branches over real tokens in one `union` must use the "
                                          "same scale: a token they share has one logit", n["span"])
            if n["op"] == "blocks" and n["args"]["stride"] > n["args"]["len"]:
                c = n["span"]
                raise ValueRangeError(
                    f"block stride {n['args']['stride']} is larger than block length "
                    f"{n['args']['len']}: tokens between blocks would belong to no block", c)

    def _check(self, ir: IR, n, arg, v, c: Const):
        from ..ir.ops import Kind
        where = f"argument `{arg.name}` of `{_call_name(n['op'])}`"
        origin = self._origin(ir, c)
        if Kind.METHOD in arg.kinds:
            if v not in arg.choices:
                raise SpecTypeError(f"{where} must be one of {', '.join(arg.choices)}, got `{v}`"
                                    f"{origin}", c.span)
            return v
        if Kind.INT in arg.kinds and Kind.FLOAT not in arg.kinds:
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                else:
                    raise SpecTypeError(f"{where} must be an integer, got {v!r}{origin}", c.span)
        elif Kind.FLOAT in arg.kinds:
            try:
                v = float(v)
            except OverflowError:
                v = math.inf
            if not math.isfinite(v):
                raise ValueRangeError(f"{where} must be a finite number, got {v}{origin}", c.span)
        if isinstance(v, int) and v > MAX_INT:
            raise ValueRangeError(f"{where} is too large: {_num(v)} > {MAX_INT}{origin}", c.span)
        if arg.minimum is not None and v < arg.minimum:
            raise ValueRangeError(f"{where} must be >= {_num(arg.minimum)}, got {_num(v)}{origin}",
                                  c.span)
        return v

    def _origin(self, ir: IR, c: Const) -> str:
        names = sorted(c.params())
        if not names:
            return ""
        parts = []
        for name in names:
            p = ir.params[name]
            src = "its default" if p.origin == "default" else p.origin
            parts.append(f"{name} = {_num(ir.param_values()[name])} from {src}")
        return " (" + "; ".join(parts) + ")"

    def _eval(self, ir: IR, c: Const, values: dict):
        if c.op == "lit":
            return c.value
        if c.op == "param":
            return values[c.value]
        if c.op == "neg":
            return -self._eval(ir, c.left, values)
        a, b = self._eval(ir, c.left, values), self._eval(ir, c.right, values)
        if c.op in ("/", "//", "%") and b == 0:
            raise ValueRangeError(f"division by zero{self._origin(ir, c)}", c.span)
        try:
            return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                    "/": lambda: a / b, "//": lambda: a // b, "%": lambda: a % b}[c.op]()
        except OverflowError:
            raise ValueRangeError(f"the result of `{c.op}` is out of range{self._origin(ir, c)}",
                                  c.span) from None


def _num(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return _repr(v, str)


def _repr(v, fn=repr) -> str:
    try:
        return fn(v)
    except ValueError:  # an int with more digits than Python prints
        return "a number too large to print"


def _call_name(op: str) -> str:
    return "attend" if op.startswith("attend_") else op
