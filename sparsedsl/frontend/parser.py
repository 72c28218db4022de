"""Text -> syntax tree, with lark (LALR, positions propagated).

The grammar lives in `grammar/attn.lark` (shipped as `sparsedsl.grammar`).
Lark's errors become `SpecSyntaxError`s pointing at the offending token.
"""
from __future__ import annotations

import functools
from importlib import resources

import lark
from lark import Lark, Token, Transformer, v_args

from ..errors import Source, Span, SpecError, SpecSyntaxError, ValueRangeError
from . import ast

# Deepest expression nesting accepted: later stages walk expressions recursively, and a
# deeper tree would exhaust Python's stack (a RecursionError instead of a diagnostic).
MAX_DEPTH = 100

# Human names for the grammar's terminals, used in "expected ..." messages.
_TERMINALS = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "STRING": "a string",
    "LPAR": "`(`", "RPAR": "`)`", "COMMA": "`,`", "EQUAL": "`=`", "COLON": "`:`",
    "VBAR": "`|`", "AMPERSAND": "`&`", "PLUS": "`+`", "MINUS": "`-`", "STAR": "`*`",
    "SLASH": "`/`", "DOUBLESLASH": "`//`", "PERCENT": "`%`", "TILDE": "`~`",
    "PARAM": "`param`", "INPUT": "`input`", "LET": "`let`", "OUT": "`out`",
    "PATTERN": "`pattern`", "$END": "end of file",
}


def grammar_text() -> str:
    return resources.files("sparsedsl.grammar").joinpath("attn.lark").read_text()


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(grammar_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _span(source: Source, meta) -> Span:
    return Span(source, meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(source: Source, tok: Token) -> Span:
    return Span(source, tok.line, tok.column, tok.end_line, tok.end_column)


class _ToAst(Transformer):
    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def _s(self, meta):
        return _span(self.source, meta)

    # expressions
    @v_args(meta=True)
    def name(self, meta, children):
        return ast.Name(str(children[0]), span=self._s(meta))

    @v_args(meta=True)
    def int(self, meta, children):
        try:
            value = int(children[0])
        except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
            raise ValueRangeError(f"integer literal with {len(children[0])} digits is too large",
                                  self._s(meta)) from None
        return ast.Int(value, span=self._s(meta))

    @v_args(meta=True)
    def float(self, meta, children):
        return ast.Float(float(children[0]), span=self._s(meta))

    @v_args(meta=True)
    def call(self, meta, children):
        fn, *rest = children
        args, kwargs, kw_spans = [], [], []
        for item in rest:
            if item is None:
                continue
            if isinstance(item, tuple) and len(item) == 3 and item[0] == "__kw__":
                kwargs.append(item[1])
                kw_spans.append(item[2])
            else:
                if kwargs:
                    raise SpecSyntaxError("a positional argument cannot follow a keyword argument",
                                          item.span)
                args.append(item)
        seen = set()
        for (k, _), sp in zip(kwargs, kw_spans):
            if k in seen:  # point at the repetition, not at the first use
                raise SpecSyntaxError(f"keyword argument `{k}` given twice", sp)
            seen.add(k)
        return ast.Call(str(fn), tuple(args), tuple(kwargs), span=self._s(meta),
                        fn_span=_tok_span(self.source, fn), kw_spans=tuple(kw_spans))

    @v_args(meta=True)
    def kwarg(self, meta, children):
        key, value = children
        return ("__kw__", (str(key), value), _tok_span(self.source, key))

    def _bin(op):
        @v_args(meta=True)
        def f(self, meta, children):
            return ast.BinOp(op, children[0], children[1], span=self._s(meta))
        return f

    or_ = _bin("|")
    and_ = _bin("&")
    add = _bin("+")
    sub = _bin("-")
    mul = _bin("*")
    div = _bin("/")
    floordiv = _bin("//")
    mod = _bin("%")

    @v_args(meta=True)
    def not_(self, meta, children):
        return ast.UnOp("~", children[0], span=self._s(meta))

    @v_args(meta=True)
    def neg(self, meta, children):
        return ast.UnOp("-", children[0], span=self._s(meta))

    # statements
    @v_args(meta=True)
    def param_stmt(self, meta, children):
        name, type_, value = children
        return ast.Param(str(name), str(type_) if type_ is not None else None, value,
                         span=self._s(meta))

    @v_args(meta=True)
    def input_stmt(self, meta, children):
        name, default = children
        return ast.Input(str(name), default, span=self._s(meta))

    @v_args(meta=True)
    def let_stmt(self, meta, children):
        name, value = children
        return ast.Let(str(name), value, span=self._s(meta))

    @v_args(meta=True)
    def out_stmt(self, meta, children):
        return ast.Out(children[0], span=self._s(meta))

    @v_args(meta=True)
    def header(self, meta, children):
        name, doc = children
        return ("__header__", str(name), str(doc)[1:-1] if doc is not None else None, self._s(meta))

    @v_args(meta=True)
    def start(self, meta, children):
        name = doc = None
        span = None
        stmts = []
        for c in children:
            if isinstance(c, tuple) and c[0] == "__header__":
                _, name, doc, span = c
            else:
                stmts.append(c)
        return ast.Spec(name, doc, tuple(stmts), span=span)


def _attach_comments(spec: ast.Spec, comments: list[Token]) -> ast.Spec:
    """Keep comments: those on a statement's own line trail it, the rest lead the next one."""
    import dataclasses

    items = list(spec.statements)
    by_line = {}
    for c in comments:
        by_line.setdefault(c.line, []).append(str(c))
    starts = [s.span.line for s in items]
    ends = [s.span.end_line for s in items]
    header_line = spec.span.line if spec.span else None
    used = set()
    new_items = []
    prev_end = header_line or 0
    head_comments = []
    for idx, st in enumerate(items):
        leading = []
        for line in sorted(by_line):
            if prev_end < line < starts[idx] and line not in used:
                leading.append(by_line[line][0])
                used.add(line)
        trailing = None
        if ends[idx] in by_line and ends[idx] not in used:
            trailing = by_line[ends[idx]][0]
            used.add(ends[idx])
        first_line = min([starts[idx]] + [ln for ln in by_line if prev_end < ln < starts[idx]])
        blank = idx > 0 and first_line > prev_end + 1 and _has_blank(spec, prev_end, first_line)
        new_items.append(dataclasses.replace(st, comments=tuple(leading), trailing=trailing,
                                             blank_before=blank))
        prev_end = ends[idx]
    for line in sorted(by_line):
        if header_line is not None and line < header_line and line not in used:
            head_comments.append(by_line[line][0])
            used.add(line)
    tail = tuple(by_line[l][0] for l in sorted(by_line) if l not in used)
    return dataclasses.replace(spec, statements=tuple(new_items), comments=tuple(head_comments),
                               end_comments=tail)


def _has_blank(spec: ast.Spec, after: int, before: int) -> bool:
    """Whether an empty line lies strictly between two source lines."""
    # the source comes from a statement: `spec.span` is the header's, None without a header;
    # lines are split at "\n" only, as the lexer counts them (not at U+2028 and the like)
    source = next((s.span.source for s in spec.statements if s.span is not None), None)
    lines = source.text.split("\n") if source is not None else []
    return any(not lines[ln - 1].strip() for ln in range(after + 1, before) if ln - 1 < len(lines))


def parse(text: str, name: str = "<spec>") -> ast.Spec:
    """Parse the text of a spec; raise `SpecSyntaxError` on malformed input. Memoised by
    (text, name): the tree is immutable (frozen nodes), and a model that compiles one spec
    for each of its layers parses it once (errors are raised afresh, never cached)."""
    return _parse(text, name)


@functools.lru_cache(maxsize=64)
def _parse(text: str, name: str) -> ast.Spec:
    source = Source(name, text)
    try:
        tree = _lark().parse(text)
    except lark.exceptions.UnexpectedCharacters as e:
        span = Span(source, e.line, e.column, e.line, e.column + 1)
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else "?"
        what = f"`{ch}`" if ch.isprintable() else f"U+{ord(ch):04X}"
        raise SpecSyntaxError(f"unexpected character {what}", span) from None
    except lark.exceptions.UnexpectedToken as e:
        tok = e.token
        expected = sorted({_TERMINALS.get(t, t) for t in e.expected if not t.startswith("__")})
        if tok.type == "$END":
            if getattr(tok, "end_line", None):  # lark places $END at the last token: point after it
                span = Span(source, tok.end_line, tok.end_column, tok.end_line, tok.end_column + 1)
            else:
                lines = text.splitlines() or [""]
                ln = len(lines)
                span = Span(source, ln, len(lines[-1]) + 1, ln, len(lines[-1]) + 2)
            what = "end of file"
        else:
            span = _tok_span(source, tok)
            what = f"`{tok}`"
        exp = ", ".join(expected[:6]) + (", ..." if len(expected) > 6 else "")
        raise SpecSyntaxError(f"unexpected {what}; expected {exp}", span) from None
    except lark.exceptions.UnexpectedEOF as e:  # pragma: no cover - LALR reports UnexpectedToken
        lines = text.splitlines() or [""]
        span = Span(source, len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)
        raise SpecSyntaxError("unexpected end of file", span) from None
    _check_depth(tree, source)
    try:
        spec = _ToAst(source).transform(tree)
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, SpecError):
            raise e.orig_exc from None
        raise
    return _attach_comments(spec, _comments(text))


def _check_depth(tree: lark.Tree, source: Source) -> None:
    """Reject expressions nested deeper than `MAX_DEPTH` (checked without recursion)."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SpecSyntaxError(f"expression nested too deeply (more than {MAX_DEPTH} levels)",
                                  _span(source, node.meta),
                                  note="split it into `let` statements")
        stack.extend((c, depth + 1) for c in reversed(node.children) if isinstance(c, lark.Tree))


def _comments(text: str) -> list[Token]:
    """The comment tokens of a text (the parser ignores them; `fmt` keeps them)."""
    out = []
    for tok in _comment_lexer().lex(text):
        if tok.type == "COMMENT":
            out.append(tok)
    return out


@functools.lru_cache(maxsize=1)
def _comment_lexer() -> Lark:
    # STRING outranks OTHER so that a `#` inside a doc string is not a comment; any Unicode
    # whitespace is skipped (the main grammar accepts it inside strings and comments)
    return Lark(r"""
        start: (COMMENT | STRING | OTHER)*
        COMMENT: /#[^\n]*/
        STRING.2: /"[^"\n]*"/
        OTHER: /[^#"\s]+/ | /"/
        %ignore /\s+/
    """, parser="lalr", lexer="basic")
