"""Syntax tree -> canonical text (what `sparsedsl fmt` prints).

Canonical form: a `pattern` header, then params, inputs, lets and `out` in the
order written, one statement per line, single spaces around binary operators,
no redundant parentheses, comments kept where they were.
"""
from __future__ import annotations

from . import ast

_PREC = {"|": 1, "&": 2, "+": 3, "-": 3, "*": 4, "/": 4, "//": 4, "%": 4}
_UNARY = 5
_ATOM = 6


def _prec(e: ast.Expr) -> int:
    if isinstance(e, ast.BinOp):
        return _PREC[e.op]
    if isinstance(e, ast.UnOp):
        return _UNARY
    return _ATOM


def format_number(v: float) -> str:
    text = repr(float(v))
    if "e" in text or "E" in text:
        mant, exp = text.lower().split("e")
        if "." not in mant:
            mant += ".0"
        return f"{mant}e{exp}"
    return text


def format_expr(e: ast.Expr) -> str:
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Int):
        return str(e.value)
    if isinstance(e, ast.Float):
        return format_number(e.value)
    if isinstance(e, ast.Call):
        parts = [format_expr(a) for a in e.args]
        parts += [f"{k}={format_expr(v)}" for k, v in e.kwargs]
        return f"{e.fn}({', '.join(parts)})"
    if isinstance(e, ast.UnOp):
        inner = format_expr(e.operand)
        if _prec(e.operand) < _UNARY:
            inner = f"({inner})"
        return f"{e.op}{inner}"
    if isinstance(e, ast.BinOp):
        p = _PREC[e.op]
        left = format_expr(e.left)
        if _prec(e.left) < p:
            left = f"({left})"
        right = format_expr(e.right)
        if _prec(e.right) <= p:
            right = f"({right})"
        return f"{left} {e.op} {right}"
    raise TypeError(f"not an expression: {e!r}")


def format_statement(s: ast.Statement) -> str:
    if isinstance(s, ast.Param):
        ty = f": {s.type}" if s.type else ""
        return f"param {s.name}{ty} = {format_expr(s.value)}"
    if isinstance(s, ast.Input):
        return f"input {s.name}" + (f" = {format_expr(s.default)}" if s.default is not None else "")
    if isinstance(s, ast.Let):
        return f"let {s.name} = {format_expr(s.value)}"
    if isinstance(s, ast.Out):
        return f"out = {format_expr(s.value)}"
    raise TypeError(f"not a statement: {s!r}")


def format_spec(spec: ast.Spec) -> str:
    lines: list[str] = list(spec.comments)
    if spec.name is not None:
        lines.append(f"pattern {spec.name}" + (f' "{spec.doc}"' if spec.doc else ""))
    # paragraphs: a blank line where the kind of statement changes or the source had one;
    # trailing comments of a paragraph are aligned two spaces after its longest statement
    paragraphs: list[list] = []
    prev_kind = "header" if spec.name is not None else None
    for s in spec.statements:
        kind = type(s).__name__
        if not paragraphs or kind != prev_kind or s.blank_before or s.comments:
            paragraphs.append([])
        paragraphs[-1].append(s)
        prev_kind = kind
    for idx, para in enumerate(paragraphs):
        if idx > 0 or spec.name is not None:
            lines.append("")
        texts = [format_statement(s) for s in para]
        col = max(len(t) for t, s in zip(texts, para) if s.trailing) + 2 \
            if any(s.trailing for s in para) else 0
        for t, s in zip(texts, para):
            lines.extend(s.comments)
            lines.append(t.ljust(col) + s.trailing if s.trailing else t)
    if spec.end_comments:
        lines.append("")
        lines.extend(spec.end_comments)
    return "\n".join(lines) + "\n"
