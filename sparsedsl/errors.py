"""Everything a user can trigger is a `SpecError`: a diagnostic with a source span.

A diagnostic renders like a compiler's::

    examples/leak.attn:7:16: error: keys after the query are visible: `sink(4)` admits j > i
        let a = attend(sink(4) | window(64))
                       ^~~~~~~
    note: intersect with `causal`

Spans are carried from the parse tree to the AST to the IR nodes, so any pass
can point at the text that caused a problem.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """The text of one spec and the name it is reported under."""

    name: str
    text: str

    def line(self, lineno: int) -> str:
        # split at "\n" only, as the lexer counts lines (not at form feeds, U+2028, ...)
        lines = self.text.split("\n")
        return lines[lineno - 1].removesuffix("\r") if 0 < lineno <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    """A range of a source: 1-based line/column of the first and last character."""

    source: Source
    line: int
    col: int
    end_line: int
    end_col: int  # exclusive

    @property
    def text(self) -> str:
        if self.line != self.end_line:
            return self.source.line(self.line)[self.col - 1:]
        return self.source.line(self.line)[self.col - 1:self.end_col - 1]

    def location(self) -> str:
        return f"{self.source.name}:{self.line}:{self.col}"

    def render_context(self) -> str:
        """The source line and a caret line under the span."""
        src = self.source.line(self.line)
        end = self.end_col if self.end_line == self.line else len(src) + 1
        width = max(1, end - self.col)
        carets = "^" + "~" * (width - 1)
        # keep the tabs of the line, so that the caret lands under the column on any tab width
        pad = "".join(c if c == "\t" else " " for c in src[:self.col - 1])
        return f"    {src}\n    {pad}{carets}"


class SpecError(Exception):
    """Base of every error a spec, a parameter or a CLI argument can cause."""

    kind = "error"

    def __init__(self, message: str, span: Span | None = None, note: str | None = None):
        super().__init__(message)
        self.message = message
        self.span = span
        self.note = note

    @property
    def line(self) -> int | None:
        return self.span.line if self.span else None

    @property
    def col(self) -> int | None:
        return self.span.col if self.span else None

    def render(self) -> str:
        parts = []
        if self.span is not None:
            parts.append(f"{self.span.location()}: {self.kind}: {self.message}")
            parts.append(self.span.render_context())
        else:
            parts.append(f"{self.kind}: {self.message}")
        if self.note:
            parts.append(f"note: {self.note}")
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.render()


class SpecSyntaxError(SpecError):
    """The text does not follow the grammar."""


class UnknownNameError(SpecError):
    """A name that is neither declared in the spec nor a built-in construct."""


class SpecTypeError(SpecError):
    """A value of the wrong kind: a parameter of the wrong type, blocks where keys are expected, ..."""


class ValueRangeError(SpecError):
    """A value of the right type that cannot work: block size 0, topk < 1, stride > length, ..."""


class CausalityError(SpecError):
    """The causality analysis could not prove that no query sees a future token."""


class StructureError(SpecError):
    """A spec whose statements do not make one layer: no `out`, two `out`s, a redefined name, ..."""


class UnknownSpecError(SpecError):
    """A spec argument that is neither a file nor a built-in name."""
