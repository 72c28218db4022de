"""Hypothesis strategies: random valid `.attn` specs, shapes, and inputs to run them on.

    from hypothesis import given, strategies as st
    from sparsedsl.testing.strategies import specs, shapes, spec_inputs

    @given(spec=specs(), shape=shapes(), seed=st.integers(0, 2**16))
    def test_something(spec, shape, seed):
        ir = sparsedsl.lower(sparsedsl.format_spec(spec))
        data = spec_inputs(ir, shape, seed)
        out = data.reference(ir)            # [B, T, Hq, Dv], float64

Public API:

    specs(**options)            random valid specs as `sparsedsl.frontend.ast.Spec` objects: every
                                one passes `sparsedsl.lower(format_spec(spec))`, causality included
    spec_texts(**options)       the same, printed (canonical text)
    shapes(...)                 random `Shape`s (small: batch 1-2, seq 1..70, ...)
    cases(...)                  `Case`s: a spec, its text, its lowered IR, a shape and a seed
    spec_inputs(ir, shape, seed)  random q, k, v, declared inputs and learnable params (`SpecInputs`)
    FEATURES                    the feature names `specs(exclude=...)` understands
    Shape, SpecInputs, poison_empty   re-exported from `sparsedsl.testing`

Hypothesis is an optional dependency of sparsedsl (`pip install sparsedsl[test]`);
only this module imports it.

What the spec generator covers: token rules (causal, window, sink, global,
strided, summary, dilated windows `window(w) & strided(s)`, complements, unions
and intersections, always made causal where attended); block grids with
overlapping blocks (stride <= len); block rules past / current / future /
first / recent / random and their `~ & |` combinations; tokens(...); pooling
(mean, mlp with or without `hidden`, the method given literally or by a
`method` param); top-k gates over `dot(q, pool(g, m))` (with force / forbid
sets the causality proof accepts), over `probs(attend(pool(g1, m), past(g1)))`
directly, through `remap(..., g2)` and/or `groupsum(...)`; branches over real
tokens and over pooled blocks (any block set proven past-only, a top-k
included); `out` as one branch, a `union(...)` of branches (token branches
sharing one scale), or a sum of branches, each optionally gated by an inline
`sigmoid(linear(x))`, an `input g = sigmoid(linear(x))`, a `let` gate, or a
plain gate tensor `input g`; params of every type (int, float, method, bool)
used in arguments, directly or through constant arithmetic (`w * 2`,
`(b + 1) // 2`, `s - -1`, `let w2 = w * 2`); lets (or inline expressions)
for every value; positional and keyword arguments in any keyword order;
optional arguments omitted or given; unions nested in unions; one node used as
both operands (`m & m`, `p | p`, one gate on several terms); a header with and
without a doc string; comments (leading, trailing, trailing the file) and blank
lines; unused declarations (dead code).

Not covered: a top-k `force` set holding blocks that start after the query
(`future(g)`, `~...`, another top-k): the reference counts them against k, so the
output would depend on the sequence length (tests/regressions/
topk_forced_future_blocks.attn); `first(g, n)` is covered, it is harmless.
Nor: top-k over `remap(dot(...))` (rightly rejected by the causality proof);
parameter overrides at lowering; bool params used in arguments (only declared);
`let` aliases of `q`; comments on the header line (the syntax tree has no place
for them); non-canonical layout (statements over several lines, odd spacing:
the text is always `format_spec`'s); invalid specs and their diagnostics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hypothesis import strategies as st

from ..frontend import ast
from ..frontend.printer import format_spec
from ..ir.graph import IR
from . import Shape, SpecInputs, poison_empty, spec_inputs

__all__ = ["FEATURES", "Case", "Shape", "SpecInputs", "cases", "poison_empty", "shapes",
           "spec_inputs", "spec_texts", "specs"]

#: Features `specs(exclude=...)` can switch off. Construct names switch off that construct
#: (and whatever cannot be built without it); the others are syntax or structure.
FEATURES = frozenset({
    # token rules
    "window", "sink", "global", "strided", "summary", "tokens", "not",
    # blocks
    "past", "current", "future", "first", "recent", "random", "topk", "overlap",
    # pooling and scores
    "mean", "mlp", "dot", "probs", "remap", "groupsum",
    # branches and their combination
    "pooled",  # attend(pool(g, m), blocks)
    "union", "sum", "linear", "gate_tensor", "scale",
    # syntax
    "params", "arithmetic", "lets", "kwargs", "comments", "header",
})

_RESERVED = {"q", "causal", "mean", "mlp", "k", "v", "true", "false",
             "pattern", "param", "input", "let", "out"}
# names that are also construct names: legal for values (`param topk = 3` beside `topk(...)`)
_CONSTRUCT_NAMES = ("window", "topk", "block", "blocks", "sink", "stride", "pool", "union")
_PARAM_NAMES = ("w", "n", "b", "block", "len", "size", "stride", "step", "s", "width", "kk")
_LET_NAMES = ("g", "blk", "sel", "score", "keys", "kv", "br", "a", "gate", "x_", "cmp", "slc")

_COMMENT_ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp"))
_DOC_ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp"),
                              exclude_characters='"')

# ------------------------------------------------------------------ generated values


@dataclass
class _Grid:
    length: int
    stride: int
    expr: ast.Expr  # a Name bound by `let`, or one inline call written identically at every use


@dataclass
class _Blocks:
    expr: ast.Expr
    grid: _Grid
    past_only: bool = False
    cur: bool = False  # covers the current blocks
    fut: bool = False  # covers the future blocks
    nofut: bool = True  # holds no block that starts after the query

    def satisfies(self, want: str) -> bool:
        return {"past": self.past_only, "cur": self.cur, "fut": self.fut,
                "both": self.cur and self.fut, "any": True}[want]


@dataclass
class _Score:
    expr: ast.Expr
    grid: _Grid
    safe: str  # "all", "past" or "none", as the causality pass computes it


@dataclass
class _Keys:
    expr: ast.Expr
    causal: bool


@dataclass
class _Branch:
    expr: ast.Expr
    pooled: bool
    scale: float  # resolved attention scale (0.0: the default)
    let: str | None = None  # the let it is bound to, if any


class _Gen:
    """One spec being drawn. Every method returns something valid by construction."""

    def __init__(self, draw, exclude: frozenset, max_depth: int):
        self.draw = draw
        self.exclude = exclude
        self.max_depth = max_depth
        self.stmts: list[ast.Statement] = []
        self.names: set[str] = set()
        self.int_params: dict[str, int] = {}
        self.float_params: dict[str, float] = {}
        self.method_params: dict[str, str] = {}
        self.grids: list[_Grid] = []
        self.pools: dict[int, list[ast.Expr]] = {}  # id(grid) -> let-bound pools on it
        self.free_branches: list[_Branch] = []  # let-bound branches `out` may still use
        self.x_name: str | None = None
        self.gates: list[ast.Expr] = []  # gate names (inputs or lets) declared so far
        self.topks = 0  # top-k selections drawn so far (bounds the nesting)

    # -- helpers ---------------------------------------------------------------------
    def ok(self, *features: str) -> bool:
        return not any(f in self.exclude for f in features)

    def flip(self, p_true: int = 1, out_of: int = 2) -> bool:
        """True with probability about p_true / out_of; shrinks to False."""
        return self.draw(st.integers(0, out_of - 1)) >= out_of - p_true

    def choose_w(self, weights: dict):
        """A key of `weights`, drawn with those weights (shrinks towards the first key)."""
        options = [k for k, n in weights.items() for _ in range(n)]
        return self.choose(options)

    def choose(self, options: list):
        """One of `options` (shrinks towards the first)."""
        return options[self.draw(st.integers(0, len(options) - 1))]

    def fresh(self, pool: tuple[str, ...]) -> str:
        base = self.choose(list(_CONSTRUCT_NAMES)) if self.flip(1, 8) else self.choose(list(pool))
        name = base
        i = 0
        while name in self.names or name in _RESERVED:
            i += 1
            name = f"{base}{i}"
        self.names.add(name)
        return name

    def call(self, fn: str, params: list[tuple[str, ast.Expr | None]]) -> ast.Call:
        """A call with `params` (in the construct's argument order; None = omitted), written
        positionally or by keyword as drawn."""
        args, kwargs = [], []
        positional = True
        for name, e in params:
            if e is None:
                positional = False
                continue
            if positional and not (self.ok("kwargs") and self.flip(1, 5)):
                args.append(e)
            else:
                positional = False
                kwargs.append((name, e))
        if len(kwargs) > 1 and self.flip(1, 3):
            kwargs = self.draw(st.permutations(kwargs))
        return ast.Call(fn, tuple(args), tuple(kwargs))

    def bind(self, expr: ast.Expr, pool=_LET_NAMES, force: bool = False) -> ast.Expr:
        """Maybe bind `expr` to a new `let` and return its name; else return `expr`."""
        if force or (self.ok("lets") and self.flip(1, 3)):
            name = self.fresh(pool)
            self.stmts.append(ast.Let(name, expr))
            return ast.Name(name)
        return expr

    # -- constants -------------------------------------------------------------------
    def int_arg(self, lo: int, hi: int) -> tuple[ast.Expr, int]:
        v = self.draw(st.integers(lo, hi))
        return self.int_expr(v), v

    def int_param(self, v: int) -> ast.Expr:
        same = sorted(n for n, x in self.int_params.items() if x == v)
        if same and self.flip(1, 2):
            return ast.Name(self.choose(same))
        name = self.fresh(_PARAM_NAMES)
        ty = "int" if self.flip(1, 4) else None
        self.stmts.append(ast.Param(name, ty, ast.Int(v)))
        self.int_params[name] = v
        return ast.Name(name)

    def int_expr(self, v: int, depth: int = 2) -> ast.Expr:
        """An integer-valued constant expression equal to v (v >= 0)."""
        w = {"lit": 4}
        if self.ok("params"):
            w["param"] = 3
        if self.ok("arithmetic"):
            w.update(mul=1, add=1, sub=1, floordiv=1, mod=1, negsub=1)
            if self.ok("lets"):
                w["let"] = 1
        if depth <= 0 or len(w) == 1:
            return ast.Int(v)
        how = self.choose_w(w)
        sub = lambda x: self.int_expr(x, depth - 1)  # noqa: E731
        if how == "param":
            return self.int_param(v)
        if how == "mul":
            m = self.draw(st.integers(2, 3))
            if v % m == 0:
                left, right = sub(v // m), ast.Int(m)
                return ast.BinOp("*", left, right) if self.flip() else ast.BinOp("*", right, left)
        elif how == "add":
            c = self.draw(st.integers(1, 3))
            if v - c >= 0:
                return ast.BinOp("+", sub(v - c), ast.Int(c))
        elif how == "sub":
            c = self.draw(st.integers(1, 3))
            return ast.BinOp("-", sub(v + c), ast.Int(c))
        elif how == "floordiv":
            d = self.draw(st.integers(2, 3))
            r = self.draw(st.integers(0, d - 1))
            return ast.BinOp("//", sub(v * d + r), ast.Int(d))
        elif how == "mod":
            m = v + self.draw(st.integers(1, 3))
            return ast.BinOp("%", sub(v + m), ast.Int(m))
        elif how == "negsub":
            c = self.draw(st.integers(1, 2))
            if v - c >= 0:
                return ast.BinOp("-", sub(v - c), ast.UnOp("-", ast.Int(c)))
        elif how == "let":
            return self.bind(sub(v), _PARAM_NAMES, force=True)
        return ast.Int(v)

    def float_expr(self, v: float) -> ast.Expr:
        """A float constant expression equal to v >= 0 (v a multiple of 1/8)."""
        opts = ["lit"]
        if v.is_integer():
            opts.append("int")
        if self.ok("params"):
            opts.append("param")
            if self.ok("arithmetic"):
                opts.append("div")
        how = self.choose(opts)
        if how == "int":
            return ast.Int(int(v))
        if how == "param":
            same = sorted(n for n, x in self.float_params.items() if x == v)
            if same and self.flip():
                return ast.Name(self.choose(same))
            name = self.fresh(("s", "scale", "temp"))
            if v.is_integer() and self.flip():
                self.stmts.append(ast.Param(name, "float", ast.Int(int(v))))
            else:
                self.stmts.append(ast.Param(name, "float" if self.flip(1, 4) else None,
                                            ast.Float(v)))
            self.float_params[name] = v
            return ast.Name(name)
        if how == "div":
            d = self.choose([2, 4, 8, 1])
            if (v * d).is_integer():
                return ast.BinOp("/", self.int_expr(int(v * d), 1), ast.Int(d))
        return ast.Float(v)

    def scale_value(self, allow_zero=True) -> float:
        vals = [0.5, 0.25, 1.0, 0.125, 0.75, 2.0]
        return self.choose(([0.0] if allow_zero else []) + vals)

    def method_expr(self, method: str) -> ast.Expr:
        if self.ok("params") and self.flip(1, 4):
            same = sorted(n for n, m in self.method_params.items() if m == method)
            if same and self.flip():
                return ast.Name(self.choose(same))
            name = self.fresh(("cmp", "method", "pooling"))
            self.stmts.append(ast.Param(name, "method" if self.flip() else None, ast.Name(method)))
            self.method_params[name] = method
            return ast.Name(name)
        return ast.Name(method)

    # -- grids and block sets ----------------------------------------------------------
    def grid(self) -> _Grid:
        if self.grids and self.flip(1, 2):
            return self.choose(self.grids)
        le, length = self.int_arg(1, 16)
        if self.ok("overlap") and self.flip(1, 2):
            se, stride = self.int_arg(1, length)
            expr = self.call("blocks", [("len", le), ("stride", se)])
        elif self.flip(1, 6):  # stride given, equal to len
            expr = self.call("blocks", [("len", le), ("stride", self.int_expr(length))])
            stride = length
        else:
            stride = length
            expr = self.call("blocks", [("len", le)])
        g = _Grid(length, stride, self.bind(expr))
        self.grids.append(g)
        return g

    def blocks(self, g: _Grid, want: str, depth: int, nofut: bool = False) -> _Blocks | None:
        """A block set on grid g with the wanted causality facts: past (past_only), cur / fut /
        both (covers the current / future / both), or any. `nofut`: one that holds no block
        starting after the query (what a top-k's `force` needs: see `topk`). None if impossible
        with the features allowed."""
        b = self._blocks(g, want, depth, nofut)
        assert b is None or (b.satisfies(want) and (b.nofut or not nofut)), (want, nofut, b)
        return b

    def _blocks(self, g: _Grid, want: str, depth: int, nofut: bool) -> _Blocks | None:
        if nofut and want in ("fut", "both"):
            return None
        c = math.ceil(g.length / g.stride)
        atoms = []
        if want in ("past", "any"):
            atoms += [a for a in ("past", "random") if self.ok(a)]
        if want in ("cur", "any"):
            atoms += [a for a in ("current",) if self.ok(a)]
            if self.ok("recent"):
                atoms.append("recent_cover")
        if want in ("fut", "any") and not nofut:
            atoms += [a for a in ("future",) if self.ok(a)]
        if want in ("cur", "fut", "both") and self.ok("not", "past") and not nofut:
            atoms.append("notpast")
        if want == "both" and self.ok("current", "future"):
            atoms.append("current|future")
        if want == "cur" and self.ok("first", "current", "recent"):
            atoms.append("first|recent")  # NSA's forced blocks
        if want == "any":
            atoms += [a for a in ("first", "recent") if self.ok(a)]
        compound = []
        if depth > 0:
            compound = ["or", "and"]
            if self.ok("lets"):
                compound.append("same")
            if self.ok("not") and want != "past" and not nofut:
                compound.append("not")
            if self.ok("topk") and want in ("past", "any") and not nofut:
                compound.append("topk")
        if not atoms and not compound:
            return None
        how = self.choose(atoms + compound) if atoms and (not compound or self.flip(2, 3)) \
            else self.choose(compound or atoms)
        if how == "past":
            return _Blocks(self.call("past", [("grid", g.expr)]), g, past_only=True)
        if how == "random":
            ne, _ = self.int_arg(1, 4)
            seed = self.int_expr(self.draw(st.integers(0, 1000))) if self.flip(1, 3) else None
            return _Blocks(self.call("random", [("grid", g.expr), ("n", ne), ("seed", seed)]), g,
                           past_only=True)
        if how == "current":
            return _Blocks(self.call("current", [("grid", g.expr)]), g, cur=True)
        if how == "recent_cover":
            ne = self.int_expr(self.draw(st.integers(c, c + 2)))
            return _Blocks(self.call("recent", [("grid", g.expr), ("n", ne)]), g, cur=True)
        if how == "recent":
            ne, n = self.int_arg(1, 4)
            return _Blocks(self.call("recent", [("grid", g.expr), ("n", ne)]), g, cur=n >= c)
        if how == "future":
            return _Blocks(self.call("future", [("grid", g.expr)]), g, fut=True, nofut=False)
        if how == "notpast":
            return self._not(_Blocks(self.call("past", [("grid", g.expr)]), g, past_only=True))
        if how == "current|future":
            return self._binop("|", _Blocks(self.call("current", [("grid", g.expr)]), g, cur=True),
                               _Blocks(self.call("future", [("grid", g.expr)]), g, fut=True,
                                       nofut=False))
        if how == "first|recent":
            ne = self.int_expr(self.draw(st.integers(c, c + 2)))
            first = _Blocks(self.call("first", [("grid", g.expr), ("n", self.int_arg(1, 3)[0])]), g)
            recent = _Blocks(self.call("recent", [("grid", g.expr), ("n", ne)]), g, cur=True)
            return self._binop("|", first, recent)
        if how == "first":
            # first(g, n) may hold blocks after the query, but only while it holds every block
            # up to the query's: counted or not, they change no top-k (see `topk`)
            ne, _ = self.int_arg(1, 3)
            return _Blocks(self.call("first", [("grid", g.expr), ("n", ne)]), g)
        if how == "not":
            inner_want = "past" if want != "any" else self.choose(["past", "any"])
            inner = self.blocks(g, inner_want, depth - 1)
            if inner is None:
                return self.blocks(g, want, 0, nofut)
            return self._not(inner)
        if how == "topk":
            return self.topk(g, want, depth - 1) or self.blocks(g, want, 0, nofut)
        if how == "same":  # `p | p`, `p & p`: one node feeding both operands
            inner = self.blocks(g, want, depth - 1, nofut)
            if inner is None:
                return None
            name = self.bind(inner.expr, ("sel", "blk_set"), force=True)
            a = _Blocks(name, g, inner.past_only, inner.cur, inner.fut, inner.nofut)
            return self._binop(self.choose(["|", "&"]), a, a)
        # or / and: which sides need what
        if want == "past":
            sides = [("past", "past")] if how == "or" else [("past", "any"), ("any", "past")]
        elif want in ("cur", "fut"):
            sides = [(want, "any"), ("any", want)] if how == "or" else [(want, want)]
        elif want == "both":
            sides = [("cur", "fut"), ("fut", "cur"), ("both", "any")] if how == "or" \
                else [("both", "both")]
        else:
            sides = [("any", "any")]
        wa, wb = self.choose(sides)
        a, b = self.blocks(g, wa, depth - 1, nofut), self.blocks(g, wb, depth - 1, nofut)
        if a is None or b is None:
            return self.blocks(g, want, 0, nofut)
        return self._binop("|" if how == "or" else "&", a, b)

    def _not(self, a: _Blocks) -> _Blocks:
        return _Blocks(ast.UnOp("~", a.expr), a.grid, cur=a.past_only, fut=a.past_only,
                       nofut=False)

    def _binop(self, op: str, a: _Blocks, b: _Blocks) -> _Blocks:
        if op == "|":
            return _Blocks(ast.BinOp("|", a.expr, b.expr), a.grid, a.past_only and b.past_only,
                           a.cur or b.cur, a.fut or b.fut, a.nofut and b.nofut)
        return _Blocks(ast.BinOp("&", a.expr, b.expr), a.grid, a.past_only or b.past_only,
                       a.cur and b.cur, a.fut and b.fut, a.nofut or b.nofut)

    def topk(self, g: _Grid, want: str, depth: int) -> _Blocks | None:
        """topk(score, k, force, forbid) on grid g; want "past" (a past-only result) or "any".

        Unless the score is safe everywhere (probs, remapped probs), `force | forbid` covers the
        current and the future blocks, as the causality proof demands. `force` never holds
        blocks that start after the query: the reference counts every forced block against k,
        so forced future blocks would make the selection depend on the sequence length (see
        tests/regressions/topk_forced_future_blocks.attn)."""
        if self.topks >= 3:
            return None
        self.topks += 1
        score = self.score(g, 3)
        if score is None:
            return None
        ke, _ = self.int_arg(1, 5)
        force = forbid = None
        if score.safe != "all" or want == "past":
            # force covers the current blocks and forbid the future, or forbid covers both
            patterns = ["cur/fut", "-/both"] if want == "any" else ["-/both"]
            for pat in self.draw(st.permutations(patterns)):
                fw, bw = pat.split("/")
                if fw == "-" and self.flip(1, 3):
                    fw = "past" if want == "past" else "any"
                force = self.blocks(g, fw, depth, nofut=True) if fw != "-" else None
                forbid = self.blocks(g, bw, depth) if bw != "-" else None
                if (fw == "-" or force is not None) and (bw == "-" or forbid is not None):
                    break
            else:
                return None
        else:
            force = self.blocks(g, "any", depth, nofut=True) if self.flip() else None
            forbid = self.blocks(g, "any", depth) if self.flip() else None
        cov_f = any(s is not None and s.fut for s in (force, forbid))
        cov_c = any(s is not None and s.cur for s in (force, forbid))
        free_is_past = cov_f and cov_c
        assert score.safe == "all" or free_is_past
        past_only = (force is None or force.past_only) and free_is_past
        assert want != "past" or past_only
        assert force is None or force.nofut
        expr = self.call("topk", [("score", score.expr), ("k", ke),
                                  ("force", force.expr if force else None),
                                  ("forbid", forbid.expr if forbid else None)])
        return _Blocks(self.bind(expr), g, past_only=past_only,
                       cur=bool(force and force.cur), fut=bool(force and force.fut), nofut=False)

    # -- pooling, scores -----------------------------------------------------------------
    def pool(self, g: _Grid) -> ast.Expr | None:
        methods = [m for m in ("mean", "mlp") if self.ok(m)]
        if not methods:
            return None
        existing = self.pools.get(id(g), [])
        if existing and self.flip(1, 2):
            return self.choose(existing)
        method = self.choose(methods)
        hidden = None
        if self.flip(1, 4 if method == "mlp" else 12):
            hidden = self.int_expr(self.draw(st.integers(0, 8)))
        expr = self.call("pool", [("grid", g.expr), ("method", self.method_expr(method)),
                                  ("hidden", hidden)])
        bound = self.bind(expr, ("kv", "ckv", "pooled"))
        if isinstance(bound, ast.Name):
            self.pools.setdefault(id(g), []).append(bound)
        return bound

    def score(self, g: _Grid, depth: int, need_all: bool = False) -> _Score | None:
        """A score on grid g; `need_all`: one the causality proof finds safe everywhere
        (the source of a `remap` must be: a remapped `dot` can read the future)."""
        w = {}
        if self.ok("dot") and not need_all:
            w["dot"] = 3
        if depth > 0:
            if depth > 1 or not need_all:  # what they wrap must still be possible
                w.update({o: 2 for o in ("groupsum", "remap") if self.ok(o)})
            if self.ok("probs", "pooled"):
                w["probs"] = 2
        if not w:
            return None
        how = self.choose_w(w)
        if how == "dot":
            pool = self.pool(g)
            if pool is None:
                return None
            scale = None
            if self.ok("scale") and self.flip(1, 4):
                v = self.scale_value(allow_zero=False)
                scale = self.float_expr(v)
                if self.flip(1, 4):
                    scale = ast.UnOp("-", scale)
            expr = self.call("dot", [("q", ast.Name("q")), ("pool", pool), ("scale", scale)])
            return _Score(self.bind(expr), g, "past")
        if how == "groupsum":
            s = self.score(g, depth - 1, need_all)
            if s is None:
                return None
            return _Score(self.bind(self.call("groupsum", [("score", s.expr)])), g, s.safe)
        if how == "remap":
            src = self.grid()
            s = self.score(src, depth - 1, need_all=True)
            if s is None:
                return None
            expr = self.call("remap", [("score", s.expr), ("grid", g.expr)])
            return _Score(self.bind(expr), g, "all")
        # probs of a branch over pooled blocks of g
        b = self.pooled_branch(g, 1, may_bind=True)
        if b is None:
            return None
        return _Score(self.bind(self.call("probs", [("branch", b.expr)])), g, "all")

    # -- keys and branches ----------------------------------------------------------------
    def keys(self, causal: bool, depth: int) -> _Keys:
        """A key set; `causal`: one the causality proof accepts as j <= i."""
        w = {"causal": 1}
        if self.ok("window"):
            w["window"] = 2
        if self.ok("window", "strided"):
            w["dilated"] = 1
        if not causal:
            w.update({o: 2 for o in ("sink", "global", "strided", "summary") if self.ok(o)})
        if self.ok("tokens"):
            w["tokens"] = 2 if causal else 1
            if self.ok("topk") and (depth > 0 or not causal):
                w["topk"] = 3  # tokens(topk(...)) (& causal when not past-only)
        if depth > 0:
            w.update({"and": 4 if causal else 1, "or": 1})
            if not causal and self.ok("not"):
                w["not"] = 1
            if self.ok("lets"):
                w["same"] = 1  # `m & m` / `m | m`: one node feeding both operands
        how = self.choose_w(w)
        if how == "topk":
            g = self.grid()
            b = self.topk(g, "any", max(depth - 1, 0))
            if b is None:
                return _Keys(ast.Name("causal"), True)
            keys = _Keys(self.call("tokens", [("blocks", b.expr)]), b.past_only)
            if causal and not keys.causal:
                c = self.keys(True, 0)
                keys = _Keys(ast.BinOp("&", keys.expr, c.expr) if self.flip(3, 4)
                             else ast.BinOp("&", c.expr, keys.expr), True)
            return keys
        if how == "same":
            inner = self.keys(causal, depth - 1)
            name = self.bind(inner.expr, ("keys", "m"), force=True)
            return _Keys(ast.BinOp(self.choose(["&", "|"]), name, name), inner.causal)
        if how == "causal":
            return _Keys(ast.Name("causal"), True)
        if how == "window":
            return _Keys(self.call("window", [("size", self.int_arg(1, 32)[0])]), True)
        if how == "dilated":
            w = self.call("window", [("size", self.int_arg(1, 32)[0])])
            s = self.strided()
            return _Keys(ast.BinOp("&", w, s) if self.flip() else ast.BinOp("&", s, w), True)
        if how == "sink":
            return _Keys(self.call("sink", [("n", self.int_arg(1, 8)[0])]), False)
        if how == "global":
            return _Keys(self.call("global", [("n", self.int_arg(1, 8)[0])]), False)
        if how == "strided":
            return _Keys(self.strided(), False)
        if how == "summary":
            se, step = self.int_arg(1, 8)
            width = self.int_expr(self.draw(st.integers(1, step))) if self.flip(1, 2) else None
            return _Keys(self.call("summary", [("step", se), ("width", width)]), False)
        if how == "tokens":
            g = self.grid()
            want = "past" if causal else self.choose(["any", "past"])
            b = self.blocks(g, want, max(depth, 1))
            if b is None:
                return _Keys(ast.Name("causal"), True)
            return _Keys(self.call("tokens", [("blocks", b.expr)]), b.past_only)
        if how == "not":
            inner = self.keys(False, depth - 1)
            return _Keys(ast.UnOp("~", inner.expr), False)
        if how == "and":
            a = self.keys(False, depth - 1)
            b = self.keys(causal, depth - 1)
            if self.flip():
                a, b = b, a
            return _Keys(self.bind(ast.BinOp("&", a.expr, b.expr), ("keys", "m")),
                         a.causal or b.causal)
        a, b = self.keys(causal, depth - 1), self.keys(causal, depth - 1)
        return _Keys(self.bind(ast.BinOp("|", a.expr, b.expr), ("keys", "m")),
                     a.causal and b.causal)

    def strided(self) -> ast.Expr:
        se, step = self.int_arg(1, 8)
        offset = self.int_expr(self.draw(st.integers(0, step - 1))) if self.flip(1, 2) else None
        return self.call("strided", [("step", se), ("offset", offset)])

    def scale_arg(self, scale: float | None) -> tuple[ast.Expr | None, float]:
        """The `scale=` argument of an attend resolving to `scale` (None: draw one), and the
        value it resolves to (0.0: the default, 1/sqrt(head dim))."""
        if not self.ok("scale"):
            return None, 0.0
        if scale is None:
            scale = self.scale_value() if self.flip(1, 4) else 0.0
        if scale == 0.0 and not self.flip(1, 8):
            return None, 0.0
        return self.float_expr(scale), scale

    def token_branch(self, depth: int, scale: float | None = None) -> _Branch:
        keys = self.keys(True, depth)
        assert keys.causal
        s, resolved = self.scale_arg(scale)
        expr = self.call("attend", [("keys", keys.expr), ("blocks", None), ("scale", s)])
        return _Branch(expr, False, resolved)

    def pooled_branch(self, g: _Grid | None, depth: int, may_bind: bool = False) -> _Branch | None:
        if not self.ok("pooled"):
            return None
        g = g or self.grid()
        pool = self.pool(g)
        blocks = self.blocks(g, "past", max(depth, 0))
        if pool is None or blocks is None:
            return None
        assert blocks.past_only
        s, resolved = self.scale_arg(None)
        expr = self.call("attend", [("keys", pool), ("blocks", blocks.expr), ("scale", s)])
        b = _Branch(expr, True, resolved)
        if may_bind and self.ok("lets") and self.flip(1, 2):
            name = self.fresh(("cmp_out", "br", "o"))
            self.stmts.append(ast.Let(name, expr))
            b = _Branch(ast.Name(name), True, resolved, let=name)
            self.free_branches.append(b)
        return b

    def branch(self, depth: int, scale: float | None = None) -> _Branch:
        """A token branch (with the given resolved scale) or a pooled one, maybe let-bound."""
        usable = [b for b in self.free_branches if b.pooled or scale is None or b.scale == scale]
        if usable and self.flip(1, 3):
            b = self.choose(usable)
            self.free_branches.remove(b)
            return b
        b = None
        if self.flip(1, 3):
            b = self.pooled_branch(None, depth)
        if b is None:
            b = self.token_branch(depth, scale)
        if self.ok("lets") and self.flip(1, 4):
            name = self.fresh(("br", "o", "swa_out", "slc_out"))
            self.stmts.append(ast.Let(name, b.expr))
            b = _Branch(ast.Name(name), b.pooled, b.scale, let=name)
        return b

    def union(self, depth: int, scale: float | None = None) -> _Branch:
        """union(a, b, ...): its token branches share one scale; a part may be a union."""
        if scale is None:
            scale = self.scale_value() if self.ok("scale") and self.flip(1, 4) else 0.0
        n = self.draw(st.integers(2, 3))
        parts = [self.union(depth - 1, scale) if depth > 0 and self.flip(1, 8)
                 else self.branch(depth, scale) for _ in range(n)]
        return _Branch(ast.Call("union", tuple(p.expr for p in parts)), False, scale)

    # -- gates and out ------------------------------------------------------------------
    def x_input(self) -> ast.Name:
        if self.x_name is None:
            self.x_name = self.fresh(("x", "h", "hidden_in"))
            self.stmts.append(ast.Input(self.x_name, None))
        return ast.Name(self.x_name)

    def learned_gate(self) -> ast.Expr:
        x = self.x_input()
        lin = self.call("linear", [("x", x)])
        return self.call("sigmoid", [("logits", lin)])

    def gate(self) -> ast.Expr | None:
        opts = []
        if self.ok("linear"):
            opts += ["inline", "input_default", "let"]
        if self.ok("gate_tensor"):
            opts.append("tensor")
        if self.gates:
            opts.append("reuse")
        if not opts:
            return None
        how = self.choose(opts)
        if how == "reuse":
            return self.choose(self.gates)
        if how == "inline":
            return self.learned_gate()
        if how == "let" and not self.ok("lets"):
            how = "input_default"
        name = self.fresh(("g", "gate", "g_cmp", "g_swa"))
        if how == "tensor":
            self.stmts.append(ast.Input(name, None))
        elif how == "input_default":
            self.stmts.append(ast.Input(name, self.learned_gate()))
        else:
            self.stmts.append(ast.Let(name, self.learned_gate()))
        self.gates.append(ast.Name(name))
        return ast.Name(name)

    def term(self, depth: int) -> tuple[ast.Expr, bool]:
        """A branch or a gated branch, for a sum; True when gated."""
        b = self.union(depth) if self.ok("union") and self.flip(1, 5) else self.branch(depth)
        gate = self.gate() if self.flip(2, 3) else None
        if gate is None:
            return b.expr, False
        return (ast.BinOp("*", gate, b.expr) if self.flip(3, 4) else ast.BinOp("*", b.expr, gate),
                True)

    def out(self) -> ast.Expr:
        depth = self.max_depth
        shapes = ["single"]
        if self.ok("union"):
            shapes.append("union")
        if self.ok("sum"):
            shapes.append("sum")
        how = self.choose(shapes)
        if how == "single":
            return self.branch(depth).expr
        if how == "union":
            return self.union(depth).expr
        n = self.draw(st.integers(1, 3))
        terms = [self.term(depth) for _ in range(n)]
        if n == 1 and not terms[0][1]:
            gate = self.gate()
            if gate is None:
                terms.append(self.term(depth))
            else:
                terms[0] = (ast.BinOp("*", gate, terms[0][0]), True)
        exprs = [t for t, _ in terms]
        if len(exprs) > 1 and self.ok("lets") and self.flip(1, 6):
            # part of the sum bound to a let: `let m = g * a + b` ... `out = m + c`
            head = exprs[0] if len(exprs) == 2 else ast.BinOp("+", exprs[0], exprs[1])
            exprs = [self.bind(head, ("mix", "m"), force=True)] + exprs[(1 if len(exprs) == 2
                                                                          else 2):]
        if len(exprs) == 1:
            return exprs[0]
        if self.flip(1, 4) and len(exprs) == 3:
            return ast.BinOp("+", exprs[0], ast.BinOp("+", exprs[1], exprs[2]))
        e = exprs[0]
        for t in exprs[1:]:
            e = ast.BinOp("+", e, t)
        return e

    # -- the spec ---------------------------------------------------------------------------
    def unused(self) -> None:
        """Declarations `out` does not use (dead code is legal)."""
        kinds = ["int", "float", "bool"]
        if self.ok("lets"):
            kinds.append("let")
        if self.ok("gate_tensor"):
            kinds.append("input")
        how = self.choose(kinds)
        if how == "int":
            self.int_param(self.draw(st.integers(0, 100)))
        elif how == "float":
            name = self.fresh(("s", "eps"))
            self.stmts.append(ast.Param(name, None, ast.Float(self.draw(
                st.floats(0, 1e6, allow_nan=False, allow_infinity=False)))))
        elif how == "bool":
            name = self.fresh(("flag", "use"))
            self.stmts.append(ast.Param(name, "bool" if self.flip() else None,
                                        ast.Name(self.choose(["true", "false"]))))
        elif how == "let":
            self.bind(self.token_branch(1).expr, force=True)
        else:
            self.stmts.append(ast.Input(self.fresh(("u", "unused")), None))

    def spec(self) -> ast.Spec:
        if self.ok("params") and self.flip(1, 6):
            self.unused()
        out = self.out()
        if self.ok("params") and self.flip(1, 8):
            self.unused()
        stmts = self.stmts
        if self.flip(1, 2):  # canonical grouping: params, inputs, lets (stable)
            order = {ast.Param: 0, ast.Input: 1, ast.Let: 2}
            stmts = sorted(stmts, key=lambda s: order[type(s)])
        stmts = list(stmts) + [ast.Out(out)]
        name = doc = None
        if self.ok("header") and self.flip(3, 4):
            name = self.fresh(("spec", "gen", "pattern_", "moba_like"))
            if self.flip():
                doc = self.draw(st.text(_DOC_ALPHABET, min_size=1, max_size=20))
        comments = end = ()
        if self.ok("comments") and self.flip(1, 3):
            stmts = [self.decorate(s) for s in stmts]
            if self.flip(1, 4):
                comments = tuple(self.comment() for _ in range(self.draw(st.integers(1, 2))))
            if self.flip(1, 4):
                end = (self.comment(),)
        return ast.Spec(name, doc, tuple(stmts), comments=comments, end_comments=end)

    def comment(self) -> str:
        return "#" + self.draw(st.text(_COMMENT_ALPHABET, max_size=20))

    def decorate(self, s: ast.Statement) -> ast.Statement:
        import dataclasses
        lead = tuple(self.comment() for _ in range(self.draw(st.integers(0, 1))))
        trailing = self.comment() if self.flip(1, 3) else None
        return dataclasses.replace(s, comments=lead, trailing=trailing,
                                   blank_before=self.flip(1, 4))


# ------------------------------------------------------------------------- strategies


@st.composite
def _specs(draw, exclude: frozenset, max_depth: int) -> ast.Spec:
    return _Gen(draw, exclude, max_depth).spec()


def specs(*, exclude=(), max_depth: int = 2) -> st.SearchStrategy[ast.Spec]:
    """Random valid specs (`sparsedsl.frontend.ast.Spec`, no spans).

    Every spec this draws lowers: `sparsedsl.lower(format_spec(spec))` succeeds, the
    causality proof included. Sizes are small (block lengths 1..16, windows 1..32,
    top-k 1..5) so the dense reference stays cheap.

    exclude    feature names (see `FEATURES`) the specs must not use, e.g. {"mlp", "union"}
               for a backend that does not support them yet
    max_depth  nesting depth of key-set / block-set / score expressions
    """
    exclude = frozenset(exclude)
    unknown = exclude - FEATURES
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}; known: {sorted(FEATURES)}")
    return _specs(exclude, max_depth)


def spec_texts(**options) -> st.SearchStrategy[str]:
    """Random valid specs as canonical text (`format_spec(spec)`); options as for `specs`."""
    return specs(**options).map(format_spec)


def shapes(*, max_seq: int = 70, max_batch: int = 2, kv_heads=(1, 2), groups=(1, 2, 4),
           head_dims=(4, 16), distinct_dv: bool = True) -> st.SearchStrategy[Shape]:
    """Random small `Shape`s: batch 1..max_batch, seq 1..max_seq (often shorter than a
    block or not a multiple of one), kv heads and GQA group sizes from the given choices,
    head dims in the `head_dims` range (v's head dim may differ when `distinct_dv`)."""
    lo, hi = head_dims
    seq = st.one_of(st.integers(1, min(16, max_seq)), st.integers(1, max_seq))

    @st.composite
    def build(draw):
        d = draw(st.integers(lo, hi))
        dv = draw(st.one_of(st.none(), st.integers(lo, hi))) if distinct_dv else None
        return Shape(batch=draw(st.integers(1, max_batch)), seq=draw(seq),
                     kv_heads=draw(st.sampled_from(kv_heads)), group=draw(st.sampled_from(groups)),
                     head_dim=d, head_dim_v=dv, d_model=draw(st.integers(lo, hi)))

    return build()


@dataclass
class Case:
    """One fuzzing case: a spec, its canonical text, its lowered IR, a shape and a seed."""

    spec: ast.Spec
    text: str
    ir: IR
    shape: Shape
    seed: int

    def inputs(self, **kwargs) -> SpecInputs:
        """`spec_inputs(self.ir, self.shape, self.seed, **kwargs)`."""
        return spec_inputs(self.ir, self.shape, self.seed, **kwargs)

    def __repr__(self) -> str:  # what Hypothesis prints for a failing example
        return f"Case(shape={self.shape}, seed={self.seed}, text=\n{self.text})"


def cases(*, shape_options: dict | None = None, **spec_options) -> st.SearchStrategy[Case]:
    """Random `Case`s: a valid spec (options as for `specs`), lowered, with a shape
    (`shape_options` as for `shapes`) and an input seed."""
    from ..pipeline import lower

    @st.composite
    def build(draw):
        spec = draw(specs(**spec_options))
        text = format_spec(spec)
        return Case(spec, text, lower(text), draw(shapes(**(shape_options or {}))),
                    draw(st.integers(0, 2**31 - 1)))

    return build()
