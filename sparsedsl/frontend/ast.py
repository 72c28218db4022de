"""The syntax tree of a spec: what the text says, before any meaning is attached.

Nodes are frozen dataclasses; spans and comments do not take part in equality,
so `parse(print(ast)) == ast` is the round-trip property the tests check.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import Span


@dataclass(frozen=True)
class Node:
    span: Span | None = field(default=None, compare=False, repr=False, kw_only=True)


# ---------------------------------------------------------------- expressions
@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class Int(Node):
    value: int


@dataclass(frozen=True)
class Float(Node):
    value: float


@dataclass(frozen=True)
class Call(Node):
    fn: str
    args: tuple["Expr", ...] = ()
    kwargs: tuple[tuple[str, "Expr"], ...] = ()
    fn_span: Span | None = field(default=None, compare=False, repr=False, kw_only=True)
    kw_spans: tuple = field(default=(), compare=False, repr=False, kw_only=True)


@dataclass(frozen=True)
class BinOp(Node):
    op: str  # one of | & + - * / // %
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True)
class UnOp(Node):
    op: str  # ~ or -
    operand: "Expr"


Expr = Name | Int | Float | Call | BinOp | UnOp


# ----------------------------------------------------------------- statements
@dataclass(frozen=True)
class Param(Node):
    name: str
    type: str | None
    value: Expr  # Int, Float or Name
    comments: tuple[str, ...] = field(default=(), compare=False, kw_only=True)
    trailing: str | None = field(default=None, compare=False, kw_only=True)
    blank_before: bool = field(default=False, compare=False, kw_only=True)


@dataclass(frozen=True)
class Input(Node):
    name: str
    default: Expr | None
    comments: tuple[str, ...] = field(default=(), compare=False, kw_only=True)
    trailing: str | None = field(default=None, compare=False, kw_only=True)
    blank_before: bool = field(default=False, compare=False, kw_only=True)


@dataclass(frozen=True)
class Let(Node):
    name: str
    value: Expr
    comments: tuple[str, ...] = field(default=(), compare=False, kw_only=True)
    trailing: str | None = field(default=None, compare=False, kw_only=True)
    blank_before: bool = field(default=False, compare=False, kw_only=True)


@dataclass(frozen=True)
class Out(Node):
    value: Expr
    comments: tuple[str, ...] = field(default=(), compare=False, kw_only=True)
    trailing: str | None = field(default=None, compare=False, kw_only=True)
    blank_before: bool = field(default=False, compare=False, kw_only=True)


Statement = Param | Input | Let | Out


@dataclass(frozen=True)
class Spec(Node):
    name: str | None
    doc: str | None
    statements: tuple[Statement, ...]
    comments: tuple[str, ...] = field(default=(), compare=False, kw_only=True)
    end_comments: tuple[str, ...] = field(default=(), compare=False, kw_only=True)

    @property
    def params(self) -> list[Param]:
        return [s for s in self.statements if isinstance(s, Param)]

    @property
    def inputs(self) -> list[Input]:
        return [s for s in self.statements if isinstance(s, Input)]
