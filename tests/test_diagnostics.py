"""Every diagnostic a user can trigger: its class, where it points (line, column), what it
says, and how it renders. Also: malformed input of any kind raises a `SpecError`, never
another exception (no Python traceback is reachable from spec text)."""
from __future__ import annotations

import random

import pytest

import sparsedsl
from sparsedsl import (CausalityError, SpecError, SpecSyntaxError, SpecTypeError, StructureError,
                       UnknownNameError, UnknownSpecError, ValueRangeError)
from sparsedsl.frontend.parser import MAX_DEPTH
from sparsedsl.passes.resolve import MAX_INT

# a topk that the causality proof accepts, to build specs around
SEL = "topk(dot(q, pool(g, mean)), 2, force=current(g), forbid=future(g))"


def diag(text, params=None) -> SpecError:
    with pytest.raises(SpecError) as info:
        sparsedsl.lower(text, params)
    return info.value


# id, spec text, class, line, col, message substring, note substring (or None)
CASES = [
    # ----------------------------------------------------------------- syntax
    ("unexpected-token", "out = attend(causal causal)\n",
     SpecSyntaxError, 1, 21, "unexpected `causal`; expected", None),
    ("unexpected-character", "out = attend(causal) $\n",
     SpecSyntaxError, 1, 22, "unexpected character `$`", None),
    ("unexpected-nul", "out = attend(causal)\x00\n",
     SpecSyntaxError, 1, 21, "unexpected character U+0000", None),
    ("missing-rpar-at-eof", "let w = window(8)\nout = attend(w\n",
     SpecSyntaxError, 2, 15, "unexpected end of file; expected", None),
    ("missing-rpar-then-comments", "out = attend(causal\n\n# a comment\n",
     SpecSyntaxError, 1, 20, "unexpected end of file", None),
    ("missing-value-at-eof", "out =",
     SpecSyntaxError, 1, 6, "unexpected end of file", None),
    ("positional-after-keyword", "let g = blocks(len=4, 2)\nout = attend(tokens(past(g)))\n",
     SpecSyntaxError, 1, 23, "a positional argument cannot follow a keyword argument", None),
    ("keyword-twice", "out = attend(window(size=3, size=4))\n",
     SpecSyntaxError, 1, 29, "keyword argument `size` given twice", None),
    ("statement-expected", "\"hello\"\nout = attend(causal)\n",
     SpecSyntaxError, 1, 1, "unexpected `\"hello\"`; expected `input`, `let`, `out`", None),
    ("no-power-operator", "param a = 2\nout = attend(window(a ** 3))\n",
     SpecSyntaxError, 2, 24, "unexpected `*`", None),
    ("second-header", "pattern a\npattern b\nout = attend(causal)\n",
     SpecSyntaxError, 2, 1, "unexpected `pattern`", None),
    # ------------------------------------------------------------------ names
    ("unknown-construct", "out = attend(windw(8))\n",
     UnknownNameError, 1, 14, "unknown construct `windw`", "did you mean `window`?"),
    ("unknown-construct-no-suggestion", "out = attend(zzzzzz(8))\n",
     UnknownNameError, 1, 14, "unknown construct `zzzzzz`", None),
    ("unknown-name", "out = attend(casual)\n",
     UnknownNameError, 1, 14, "unknown name `casual`", "did you mean `causal`?"),
    ("unknown-name-suggests-let", "let local = window(8)\nout = attend(locl & causal)\n",
     UnknownNameError, 2, 14, "unknown name `locl`", "did you mean `local`?"),
    ("name-used-before-definition", "out = attend(a)\nlet a = causal\n",
     UnknownNameError, 1, 14, "unknown name `a`", None),
    ("k-used-directly", "out = attend(k)\n",
     UnknownNameError, 1, 14, "`k` cannot be used directly", None),
    ("unknown-keyword-argument", "out = attend(window(size=8, foo=1))\n",
     UnknownNameError, 1, 29, "`window` has no argument `foo`", "its arguments are: size"),
    # -------------------------------------------------------------- arguments
    ("too-many-arguments", "out = attend(window(8, 9))\n",
     SpecTypeError, 1, 24, "`window` takes at most 1 argument, got 2", None),
    ("too-many-arguments-plural", "let g = blocks(4, 4, 4)\nout = attend(tokens(past(g)))\n",
     SpecTypeError, 1, 22, "`blocks` takes at most 2 arguments, got 3", None),
    ("missing-required-argument", "out = attend(window())\n",
     SpecTypeError, 1, 14, "`window` needs its `size` argument", "window(size)"),
    ("missing-topk-k", "let g = blocks(4)\nout = attend(tokens(topk(dot(q, pool(g, mean)), "
     "force=current(g), forbid=future(g))) & causal)\n",
     SpecTypeError, 2, 21, "`topk` needs its `k` argument", None),
    ("argument-given-twice", "out = attend(window(3, size=4))\n",
     SpecTypeError, 1, 24, "argument `size` of `window` given twice", None),
    ("blocks-where-keys-expected", "let g = blocks(4)\nout = attend(past(g))\n",
     SpecTypeError, 2, 14, "argument `keys` of `attend` must be a key set or pooled blocks, "
     "got a block set", None),
    ("keys-and-blocks", "let g = blocks(4)\nout = attend(causal & past(g))\n",
     SpecTypeError, 2, 14, "`&` cannot combine a key set with a block set",
     "turn blocks into keys with `tokens(...)`"),
    ("or-of-number", "out = attend(causal | 3)\n",
     SpecTypeError, 1, 23, "`|` combines key sets or block sets, got an integer", None),
    ("float-where-int", "out = attend(window(2.5))\n",
     SpecTypeError, 1, 21, "argument `size` of `window` must be an integer, got a number", None),
    ("method-where-number", "out = attend(causal, scale=mean)\n",
     SpecTypeError, 1, 28, "argument `scale` of `attend` must be a number, got a method name",
     None),
    ("calling-a-value", "let w = window(8)\nout = attend(w(3))\n",
     SpecTypeError, 2, 14, "`w` is a value, not a construct; it cannot be called", None),
    ("calling-a-param", "param n = 3\nout = attend(n(3))\n",
     SpecTypeError, 2, 14, "`n` is a value, not a construct", None),
    ("construct-not-called", "out = attend(window)\n",
     SpecTypeError, 1, 14, "`window` is a construct and must be called: `window(...)`", None),
    ("gate-times-gate", "input x\nout = sigmoid(linear(x)) * sigmoid(linear(x))\n",
     SpecTypeError, 2, 7, "`*` multiplies a branch by a gate", None),
    ("input-default-not-a-gate", "input g = causal\nout = attend(causal)\n",
     SpecTypeError, 1, 11, "an input's default must be a gate", None),
    ("linear-of-queries", "input g = sigmoid(linear(q))\nout = g * attend(causal)\n",
     SpecTypeError, 1, 26, "argument `x` of `linear` must be an input tensor, got the queries",
     None),
    ("union-of-one", "out = union(attend(causal))\n",
     SpecTypeError, 1, 7, "`union` needs at least two branches", None),
    ("method-arithmetic", "param m = mean\nlet g = blocks(4)\nout = attend(pool(g, m + 1), past(g))\n",
     SpecTypeError, 3, 22, "`+` cannot take a method name", None),
    # -------------------------------------------------------------- structure
    ("redefinition", "let a = window(8)\nlet a = causal\nout = attend(a)\n",
     StructureError, 2, 1, "`a` is already defined", None),
    ("redefine-param-as-let", "param a = 3\nlet a = causal\nout = attend(a)\n",
     StructureError, 2, 1, "`a` is already defined", None),
    ("redefine-builtin", "let causal = window(3)\nout = attend(causal)\n",
     StructureError, 1, 1, "`causal` is a built-in name and cannot be redefined", None),
    ("second-out", "out = attend(causal)\nout = attend(window(4))\n",
     StructureError, 2, 1, "a second `out` statement; a spec has exactly one", None),
    ("missing-out", "let w = window(4)\nlet a = attend(w)\n",
     StructureError, 2, 1, "the spec has no `out` statement", "end the spec with `out ="),
    ("empty-spec-comments-only", "# nothing\n# here\n",
     StructureError, 1, 1, "the spec is empty", "at least an `out` statement"),
    ("empty-spec-header-only", "pattern nothing\n",
     StructureError, 1, 1, "the spec is empty", None),
    ("out-of-wrong-kind", "out = causal\n",
     SpecTypeError, 1, 7, "`out` must be a branch or a gated sum of branches, got a key set", None),
    ("out-of-blocks", "let g = blocks(4)\nout = past(g)\n",
     SpecTypeError, 2, 7, "got a block set", None),
    # ------------------------------------------------------- parameter types
    ("param-int-declared-float-default", "param block: int = 1.5\nout = attend(window(block))\n",
     SpecTypeError, 1, 20, "parameter `block` is declared int but its default is a float", None),
    ("param-int-declared-bool-default", "param block: int = true\nout = attend(window(block))\n",
     SpecTypeError, 1, 20, "declared int but its default is a bool", None),
    ("param-method-declared-int-default", "param m: method = 3\nout = attend(causal)\n",
     SpecTypeError, 1, 19, "declared method but its default is an int", None),
    ("param-unknown-type", "param b: str = 1\nout = attend(causal)\n",
     SpecTypeError, 1, 1, "unknown parameter type `str`", None),
    ("param-unknown-method", "param b = foo\nout = attend(causal)\n",
     SpecTypeError, 1, 11, "unknown method `foo`; expected one of mean, mlp", None),
    ("bool-param-as-size", "param b = true\nout = attend(window(b))\n",
     SpecTypeError, 2, 21, "argument `size` of `window` must be an integer, got True", None),
    # -------------------------------------------------------- impossible values
    ("topk-below-one", f"let g = blocks(4)\nout = attend(tokens({SEL.replace(', 2,', ', 0,')}) & causal)\n",
     ValueRangeError, 2, 49, "argument `k` of `topk` must be >= 1, got 0", None),
    ("topk-below-one-from-param",
     f"param n = 0\nlet g = blocks(4)\nout = attend(tokens({SEL.replace(', 2,', ', n,')}) & causal)\n",
     ValueRangeError, 3, 49, "must be >= 1, got 0 (n = 0 from its default)", None),
    ("block-size-zero", "let g = blocks(0)\nout = attend(tokens(past(g)))\n",
     ValueRangeError, 1, 16, "argument `len` of `blocks` must be >= 1, got 0", None),
    ("stride-larger-than-length", "let g = blocks(4, stride=8)\nout = attend(tokens(past(g)))\n",
     ValueRangeError, 1, 9, "block stride 8 is larger than block length 4", None),
    ("window-below-one", "out = attend(window(0))\n",
     ValueRangeError, 1, 21, "argument `size` of `window` must be >= 1, got 0", None),
    ("window-negative", "out = attend(window(-3))\n",
     ValueRangeError, 1, 21, "must be >= 1, got -3", None),
    ("window-negative-modulo", "param a = 3\nout = attend(window(a % -2))\n",
     ValueRangeError, 2, 21, "must be >= 1, got -1 (a = 3 from its default)", None),
    ("negative-scale", "out = attend(causal, scale=-1)\n",
     ValueRangeError, 1, 28, "argument `scale` of `attend` must be >= 0, got -1", None),
    ("division-by-zero", "param w = 8\nout = attend(window(w // 0))\n",
     ValueRangeError, 2, 21, "division by zero (w = 8 from its default)", None),
    ("modulo-by-zero-param", "param w = 8\nparam z = 0\nout = attend(window(w % z))\n",
     ValueRangeError, 3, 21, "division by zero (w = 8 from its default; z = 0 from its default)",
     None),
    ("integer-too-large", "let g = blocks(99999999999)\nout = attend(tokens(past(g)))\n",
     ValueRangeError, 1, 16, f"argument `len` of `blocks` is too large: 99999999999 > {MAX_INT}",
     None),
    ("product-too-large", "param a = 65536\nout = attend(window(a * a))\n",
     ValueRangeError, 2, 21, "argument `size` of `window` is too large", None),
    ("float-overflow", "out = attend(causal, scale=1e400)\n",
     ValueRangeError, 1, 28, "must be a finite number, got inf", None),
    ("int-division-overflow", "param a = 10\nout = attend(causal, scale=" + "9" * 400 + " / a)\n",
     ValueRangeError, 2, 28, "the result of `/` is out of range", None),
    ("literal-with-too-many-digits", "out = attend(window(" + "9" * 5000 + "))\n",
     ValueRangeError, 1, 21, "integer literal with 5000 digits is too large", None),
    ("different-grids", "let g = blocks(4)\nlet h = blocks(8)\nout = attend(tokens(past(g) | past(h)))\n",
     SpecTypeError, 3, 21, "two different block grids (line 1: `blocks(4)`, line 2: `blocks(8)`)",
     "bind the grid once"),
    ("different-grids-topk-force", "let g = blocks(4)\nlet h = blocks(8)\n"
     "out = attend(tokens(topk(dot(q, pool(g, mean)), 2, force=current(h), forbid=~past(g))) & causal)\n",
     SpecTypeError, 3, 21, "two different block grids", None),
    ("probs-of-token-branch", "let a = attend(causal)\nlet g = blocks(4)\n"
     "out = attend(tokens(topk(probs(a), 2, forbid=~past(g))) & causal)\n",
     SpecTypeError, 3, 32, "`probs` needs a branch over pooled blocks", None),
    ("attend-pool-without-blocks", "let g = blocks(4)\nout = attend(pool(g, mean))\n",
     SpecTypeError, 2, 7, "attending pooled blocks needs the block set to attend", None),
    ("attend-tokens-with-blocks", "let g = blocks(4)\nout = attend(causal, past(g))\n",
     SpecTypeError, 2, 7, "takes a block set only with pooled keys", None),
    ("union-different-scales", "out = union(attend(causal, scale=0.5), attend(window(4), scale=0.25))\n",
     ValueRangeError, 1, 7, "must use the same scale", None),
    # -------------------------------------------------------------- causality
    ("leak-sink-or-window", "out = attend(sink(4) | window(8))\n",
     CausalityError, 1, 14, "queries can see future keys: `sink(4)`", "intersect with `causal`"),
    ("leak-strided", "out = attend(strided(4))\n",
     CausalityError, 1, 14, "`strided(4)`", None),
    ("leak-global", "out = attend(window(8) | global(2))\n",
     CausalityError, 1, 26, "`global(2)`: global tokens see keys after them", None),
    ("leak-tokens-current", "let g = blocks(4)\nout = attend(tokens(current(g)))\n",
     CausalityError, 2, 14, "`tokens(current(g))`: the selected blocks can contain tokens after "
     "the query", None),
    ("leak-pooled-current", "let g = blocks(4)\nout = attend(pool(g, mean), current(g))\n",
     CausalityError, 2, 29, "the pooled blocks `current(g)` may include blocks that are not "
     "wholly in the past", "only through `past(g)`"),
    ("leak-gate", "let g = blocks(4)\nout = attend(tokens(topk(dot(q, pool(g, mean)), 2)) & causal)\n",
     CausalityError, 2, 21, "this selection can depend on future tokens",
     "force=current(g), forbid=future(g)"),
    ("leak-gate-force-only", "let g = blocks(4)\n"
     "out = attend(tokens(topk(dot(q, pool(g, mean)), 2, force=current(g))) & causal)\n",
     CausalityError, 2, 21, "this selection can depend on future tokens", None),
    ("leak-gate-remap", "let cg = blocks(8, stride=4)\nlet sg = blocks(4)\n"
     "let s = remap(dot(q, pool(cg, mean)), sg)\nlet sel = topk(s, 1, forbid=~past(sg))\n"
     "out = attend(tokens(sel) & causal)\n",
     CausalityError, 4, 11, "can read tokens after the query even for blocks wholly in the past",
     "remap(probs(...), g)"),
    ("leak-complement", "out = attend(~causal)\n",
     CausalityError, 1, 14, "`~causal`: a complement contains keys after the query", None),
]


@pytest.mark.parametrize("text,cls,line,col,message,note",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_diagnostic(text, cls, line, col, message, note):
    err = diag(text)
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    assert (err.line, err.col) == (line, col), str(err)
    assert message in err.message, err.message
    if note is not None:
        assert err.note is not None and note in err.note, err.note
    # the rendering always names the place and shows the line
    rendered = str(err)
    assert rendered.startswith(f"<string>:{line}:{col}: error: ")
    assert rendered.splitlines()[1] == "    " + text.splitlines()[line - 1]
    assert rendered.splitlines()[2].index("^") == 4 + col - 1


def test_classes_are_spec_errors():
    for cls in (SpecSyntaxError, UnknownNameError, SpecTypeError, ValueRangeError,
                CausalityError, StructureError, UnknownSpecError):
        assert issubclass(cls, SpecError)


# ---------------------------------------------------------------- overrides
def test_override_wrong_type_string():
    err = diag("moba", {"block": "abc"})
    assert type(err) is SpecTypeError
    assert "parameter `block` is an int; got 'abc' (from compile())" in err.message
    # points at the declaration of the parameter in the built-in
    assert (err.line, err.col) == (7, 1)
    assert err.span.text.startswith("param block = 512")


def test_override_wrong_type_float():
    err = diag("moba", {"block": 1.5})
    assert type(err) is SpecTypeError
    assert "parameter `block` is an int; got 1.5" in err.message
    assert err.line == 7


def test_override_bool_is_not_int():
    err = diag("moba", {"topk": True})
    assert type(err) is SpecTypeError and "got True" in err.message


def test_override_unknown_name():
    err = diag("moba", {"blok": 3})
    assert type(err) is UnknownNameError
    assert "spec `moba` has no parameter `blok`" in err.message
    assert "its parameters are: block, topk" in err.message
    assert err.note == "did you mean `block`?"
    assert err.line is None and str(err).startswith("error: ")


def test_override_out_of_range_names_origin():
    err = diag("moba", {"block": 0})
    assert type(err) is ValueRangeError
    assert "argument `len` of `blocks` must be >= 1, got 0 (block = 0 from compile())" in err.message
    assert (err.line, err.col) == (10, 18)  # `block` in `let blk = blocks(block)`


def test_override_of_method_param():
    err = diag("nsa", {"cmp": "median"})
    assert type(err) is SpecTypeError and "is a method (mean, mlp)" in err.message


def test_override_huge_python_int():
    err = diag("moba", {"block": 10 ** 5000})
    assert type(err) is ValueRangeError
    assert "too large" in err.message


# ---------------------------------------------------------------- rendering
def test_render_format():
    err = diag("let g = blocks(4)\nout = attend(sink(4) | window(8))\n")
    lines = str(err).splitlines()
    assert lines[0] == ("<string>:2:14: error: queries can see future keys: `sink(4)`: keys j < n "
                        "include keys after early queries")
    assert lines[1] == "    out = attend(sink(4) | window(8))"
    assert lines[2] == "    " + " " * 13 + "^~~~~~~"
    assert lines[3] == "note: intersect with `causal`, e.g. `(...) & causal`"
    # the caret sits under the column the error reports
    assert lines[2].index("^") - 4 == err.col - 1
    assert err.render() == str(err)


def test_render_single_caret_at_eof():
    err = diag("out = attend(causal")
    lines = str(err).splitlines()
    assert lines[0].startswith("<string>:1:20: error: unexpected end of file")
    assert lines[2] == "    " + " " * 19 + "^"


def test_render_file_name(tmp_path):
    path = tmp_path / "leak.attn"
    path.write_text("pattern leak\n\nlet a = attend(sink(4) | window(64))\nout = a\n")
    err = diag(str(path))
    assert str(err).startswith(f"{path}:3:16: error: queries can see future keys")
    assert str(err).splitlines()[2] == "    " + " " * 15 + "^~~~~~~"


def test_render_multiline_span_is_cut_at_line_end():
    err = diag("out = attend(causal)\nout = attend(window(4)\n  | window(8))\n")
    assert type(err) is StructureError and err.line == 2
    lines = str(err).splitlines()
    assert lines[1] == "    out = attend(window(4)"
    assert lines[2] == "    ^" + "~" * (len("out = attend(window(4)") - 1)


def test_render_keeps_tabs_under_the_caret():
    err = diag("let a = window(3)\n\tout\t= attend(sink(4) | a)\n")
    assert (err.line, err.col) == (2, 15)
    lines = str(err).splitlines()
    assert lines[1] == "    \tout\t= attend(sink(4) | a)"
    # the caret line repeats the tabs, so it lines up whatever the tab width
    assert lines[2] == "    \t   \t         ^~~~~~~"
    assert lines[1].expandtabs(8).index("sink") == lines[2].expandtabs(8).index("^")


@pytest.mark.parametrize("sep", ["\f", "\x0b", "\x1c", "\u2028", "\r"])
def test_lines_are_counted_at_newlines_only(sep):
    """Form feeds and other Unicode line separators do not start a line: the line shown (and
    the code quoted in the message) is the one the column refers to."""
    text = f"# a{sep} comment\nlet w = window(3)\nout = attend(sink(4) | w)\n"
    err = diag(text)
    assert type(err) is CausalityError
    assert (err.line, err.col) == (3, 14)
    assert "`sink(4)`" in err.message
    assert str(err).splitlines()[1] == "    out = attend(sink(4) | w)"


def test_form_feed_between_statements():
    err = diag("out = attend(causal)\f\nout = attend(window(3))\n")
    assert type(err) is StructureError and (err.line, err.col) == (2, 1)
    assert str(err).splitlines()[1:] == ["    out = attend(window(3))", "    ^" + "~" * 22]


def test_crlf_line_endings():
    err = diag("let w = window(3)\r\nout = attend(sink(4) | w)\r\n")
    assert (err.line, err.col) == (2, 14)
    assert str(err).splitlines()[1] == "    out = attend(sink(4) | w)"


def test_builtin_diagnostic_names_the_builtin():
    err = diag("moba", {"topk": 0})
    assert str(err).startswith("<builtin moba>:12:22: error: argument `k` of `topk` must be >= 1")


def test_unknown_spec_name():
    with pytest.raises(UnknownSpecError) as info:
        sparsedsl.lower("mobaa")
    assert "`mobaa` is neither a .attn file nor a built-in spec (moba, nsa)" in info.value.message


def test_unreadable_spec_file(tmp_path):
    path = tmp_path / "bad.attn"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UnknownSpecError, match="cannot read spec file"):
        sparsedsl.lower(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.attn"
    path.write_text("")
    err = diag(path)
    assert type(err) is StructureError and "the spec is empty" in err.message
    assert str(err).startswith(f"{path}:1:1: error: the spec is empty")


# ---------------------------------------------------------------- robustness
DEEP = [
    "out = attend(" + "~" * 5000 + "causal)\n",
    "out = attend(" + "attend(" * 2000 + "causal" + ")" * 2000 + ")\n",
    "param a = 1\nout = attend(window(" + "+".join(["a"] * 3000) + "))\n",
    "out = attend(window(" + "-" * 3000 + "3))\n",
    "let g = blocks(4)\nout = attend(tokens(" + "~" * 400 + "past(g)) & causal)\n",
]


@pytest.mark.parametrize("text", DEEP, ids=["not", "calls", "sum", "neg", "blocks-not"])
def test_deep_nesting_is_a_diagnostic(text):
    err = diag(text)
    assert type(err) is SpecSyntaxError
    assert f"expression nested too deeply (more than {MAX_DEPTH} levels)" in err.message
    assert err.line == text.count("\n", 0, text.index("out =")) + 1


def test_nesting_below_the_limit_works():
    text = "out = attend(" + "~" * (MAX_DEPTH - 20) + "causal & causal)\n"
    ir = sparsedsl.lower(text)
    assert ir.out is not None
    formatted = sparsedsl.format_spec(sparsedsl.parse(text))
    assert sparsedsl.parse(formatted) == sparsedsl.parse(text)
    # redundant parentheses do not count as nesting
    sparsedsl.lower("out = attend(" + "(" * 3000 + "causal" + ")" * 3000 + ")\n")


MALFORMED = [
    "",
    "\n",
    "   \n\t\n",
    "# only a comment\n",
    "pattern\n",
    "pattern p \"unterminated\nout = attend(causal)\n",
    "out = attend(caüsal)\n",
    "\u00e9\u00e8\u4e2d\u6587 = 1\n",
    "😀😀😀\n",
    "out = attend(causal)\r\nlet x = \u200b\n",
    "\x00\x01\x02\n",
    "out = attend(window(" + "9" * 400 + "))\n",
    "out = attend(window(" + "9" * 400 + ".5))\n",
    "out = attend(causal, scale=" + "9" * 400 + ".0)\n",
    "out = attend(causal, scale=1e-400)\n",
    "out = attend(window(0x10))\n",
    "out = attend(window(1_000))\n",
    "out = attend(window(8,,))\n",
    "out = attend(window(8),)\n",
    "out = attend(window(8)))\n",
    "out = ((((((((((causal\n",
    "out = attend(causal) out = attend(causal)\n",
    "let = 3\nout = attend(causal)\n",
    "param p: = 3\nout = attend(causal)\n",
    "param p = -3\nout = attend(causal)\n",
    "param p = 3 + 4\nout = attend(causal)\n",
    "input\nout = attend(causal)\n",
    "input x = x\nout = attend(causal)\n",
    "input x\ninput g = sigmoid(linear(x))\nout = x * attend(causal) + g * attend(window(4))\n",
    "input x\nout = sigmoid(x) * attend(causal)\n",
    "input x\nout = linear(x) * attend(causal)\n",
    "out = attend(causal) + attend(causal)\n",
    "let a = attend(causal)\nout = a + a\n",
    "let a = attend(causal)\nout = union(a, a)\n",
    "let a = attend(causal)\nout = union(a, scale=2)\n",
    "out = attend(causal) * 2\n",
    "out = attend(causal) - attend(window(3))\n",
    "out = attend(-causal)\n",
    "out = attend(window(3) // 2)\n",
    "let g = blocks(4)\nout = attend(tokens(g))\n",
    "let g = blocks(4)\nout = attend(pool(g, mean), g)\n",
    "let g = blocks(4)\nout = attend(tokens(~g) & causal)\n",
    "let g = blocks(4)\nout = attend(tokens(past(g) | causal))\n",
    "let g = blocks(4)\nout = attend(tokens(topk(q, 2)))\n",
    "let g = blocks(4)\nout = attend(tokens(topk(dot(q, q), 2)))\n",
    "let g = blocks(4)\nout = attend(tokens(remap(past(g), g)))\n",
    "let g = blocks(4)\nout = attend(tokens(first(g, 0)) & causal)\n",
    "let g = blocks(4)\nout = attend(tokens(random(g, 1, seed=-1)) & causal)\n",
    "let g = blocks(4)\nout = attend(pool(g, mlp, hidden=-1), past(g))\n",
    "let g = blocks(4)\nout = attend(pool(g, mlp, hidden=1.5), past(g))\n",
    "out = attend(summary(4, width=0) & causal)\n",
    "out = attend(strided(4, offset=-1) & causal)\n",
    "out = attend(global(0) & causal)\n",
    "out = attend(sink(4.0) & causal)\n",
    "param w: float = 4\nout = attend(window(w))\n",
    "param w: float = 4.5\nout = attend(window(w * 2))\n",
    "param w = 4\nout = attend(window(w / 2))\n",
    "param w = 4\nout = attend(window(q))\n",
    "out = attend(q)\n",
    "out = q\n",
    "out = 3\n",
    "out = mean\n",
    "out = attend(causal, 3, 4)\n",
    "out = attend(keys=causal, keys=causal)\n",
    "out = union()\n",
    "out = attend()\n",
]


@pytest.mark.parametrize("text", MALFORMED, ids=[f"m{i}" for i in range(len(MALFORMED))])
def test_malformed_input_raises_spec_error(text, tmp_path):
    # through a file, so that even "" is read as spec text
    path = tmp_path / "m.attn"
    path.write_text(text, encoding="utf-8")
    try:
        sparsedsl.lower(path)
    except SpecError as e:
        str(e)  # renders
        assert e.message
    # only spec errors escape (anything else fails the test with its traceback)


def _mutations(text: str, n: int, seed: int):
    rng = random.Random(seed)
    alphabet = list("()=,|&~+-*/%:#\"\n _.0123456789") + ["q", "k", "g", "blocks", "causal",
                                                          "topk", "let", "out", "param", "mlp"]
    for _ in range(n):
        s = text
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(s) + 1)
            op = rng.random()
            if op < 0.4:
                s = s[:pos] + s[pos + rng.randint(1, 4):]
            elif op < 0.8:
                s = s[:pos] + rng.choice(alphabet) + s[pos:]
            else:
                a, b = sorted(rng.randrange(len(s) + 1) for _ in range(2))
                s = s[:a] + s[b:] + s[a:b]
        yield s


@pytest.mark.parametrize("name", ["moba", "nsa"])
def test_fuzzed_builtins_raise_only_spec_errors(name, tmp_path):
    text = sparsedsl.parse_spec(name)[1].text
    path = tmp_path / "fuzz.attn"
    ok = failed = 0
    for s in _mutations(text, 300, seed={"moba": 1, "nsa": 2}[name]):
        path.write_text(s, encoding="utf-8")
        try:
            sparsedsl.lower(path)
            ok += 1
        except SpecError as e:
            failed += 1
            if e.span is not None:
                assert 1 <= e.line <= max(1, len(s.splitlines()))
            str(e)
    assert failed > 0


def test_parse_is_memoised_but_errors_are_not():
    """A text parses once per process (a model compiling one spec per layer): the same
    (text, name) gives the same immutable tree, another name its own; a malformed text
    raises its error on every call, never a cached result."""
    from sparsedsl.frontend.parser import parse
    text = "pattern memo\nout = attend(causal)\n"
    assert parse(text, "a.attn") is parse(text, "a.attn")
    assert parse(text, "b.attn") is not parse(text, "a.attn")
    assert parse(text, "b.attn") == parse(text, "a.attn")
    bad = "pattern memo\nout = attend(causal $)\n"
    for _ in range(2):
        with pytest.raises(SpecSyntaxError, match="unexpected character"):
            parse(bad, "bad.attn")
