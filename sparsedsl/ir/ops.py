"""The constructs of the language: one table that the IR builder, the passes and
the reference read.

Value kinds (`Kind`):

  keys     a set of real key positions per query: M[i, j]
  grid     keys cut into blocks: block n covers tokens [n*stride, n*stride + len)
  blocks   a set of blocks of one grid per query: B[i, n]
  pool     one virtual key/value per block of a grid (mean or learned compression)
  score    a number per (query, block of a grid)
  branch   an attention over its own key set: output o_b[i] (and its probabilities)
  logits   linear(x): a number per (query, q head)
  gate     a weight per (query, q head) in [0, 1]
  mix      a gated sum of branch outputs
  tensor   a declared input (the layer input x, or a gate given as a tensor)
  query    the queries q

Constant kinds (`int`, `float`, `method`) are folded from parameters by the
`resolve-params` pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Kind(str, Enum):
    KEYS = "keys"
    GRID = "grid"
    BLOCKS = "blocks"
    POOL = "pool"
    SCORE = "score"
    BRANCH = "branch"
    LOGITS = "logits"
    GATE = "gate"
    MIX = "mix"
    TENSOR = "tensor"
    QUERY = "query"
    # constants
    INT = "int"
    FLOAT = "float"
    METHOD = "method"

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.value

    @property
    def is_const(self) -> bool:
        return self in (Kind.INT, Kind.FLOAT, Kind.METHOD)

    def article(self) -> str:
        return {
            Kind.KEYS: "a key set", Kind.GRID: "a block grid", Kind.BLOCKS: "a block set",
            Kind.POOL: "pooled blocks", Kind.SCORE: "a block score", Kind.BRANCH: "a branch",
            Kind.LOGITS: "gate logits", Kind.GATE: "a gate", Kind.MIX: "a gated sum",
            Kind.TENSOR: "an input tensor", Kind.QUERY: "the queries", Kind.INT: "an integer",
            Kind.FLOAT: "a number", Kind.METHOD: "a method name",
        }[self]


POOL_METHODS = ("mean", "mlp")


@dataclass(frozen=True)
class Arg:
    name: str
    kinds: tuple[Kind, ...]
    default: object = None  # None: required; a value: optional constant; "<same:x>": copies arg x
    minimum: float | None = None  # for int/float constants
    choices: tuple[str, ...] = ()  # for method constants
    optional_node: bool = False  # a node-valued argument that may be omitted


@dataclass(frozen=True)
class OpDef:
    name: str  # the name in the language
    args: tuple[Arg, ...]
    result: Kind
    summary: str
    formula: str
    variadic: Kind | None = None  # union(a, b, ...)
    ir_name: str | None = None  # name of the IR op when it differs from the call name

    @property
    def op(self) -> str:
        return self.ir_name or self.name


def _a(name, *kinds, **kw) -> Arg:
    return Arg(name, tuple(kinds), **kw)


K = Kind
OPS: dict[str, OpDef] = {}


def _def(*args, **kw) -> None:
    d = OpDef(*args, **kw)
    OPS[d.name] = d


# token-level rules -------------------------------------------------------------
_def("window", (_a("size", K.INT, minimum=1),), K.KEYS,
     "the `size` most recent tokens, the query's own included", "0 <= i - j < size")
_def("sink", (_a("n", K.INT, minimum=1),), K.KEYS,
     "the first `n` tokens (attention sinks)", "j < n")
_def("global", (_a("n", K.INT, minimum=1),), K.KEYS,
     "the first `n` tokens are global: every query sees them and they see every key",
     "j < n or i < n")
_def("strided", (_a("step", K.INT, minimum=1), _a("offset", K.INT, default=0, minimum=0)), K.KEYS,
     "every `step`-th token back from the query (Sparse Transformer strided)",
     "(i - j) mod step == offset")
_def("summary", (_a("step", K.INT, minimum=1), _a("width", K.INT, default=1, minimum=1)), K.KEYS,
     "the last `width` tokens of every `step`-token stretch (Sparse Transformer fixed)",
     "j mod step >= step - width")
_def("tokens", (_a("blocks", K.BLOCKS),), K.KEYS,
     "every token of the selected blocks", "exists n: B[i, n] and j in block n")

# blocks ------------------------------------------------------------------------
_def("blocks", (_a("len", K.INT, minimum=1), _a("stride", K.INT, default="<same:len>", minimum=1)),
     K.GRID, "keys cut into blocks of `len` tokens starting every `stride` tokens",
     "block n = [n*stride, n*stride + len), n = 0 .. ceil(T/stride) - 1")
_def("past", (_a("grid", K.GRID),), K.BLOCKS,
     "blocks whose every token is at or before the query", "n*stride + len - 1 <= i")
_def("current", (_a("grid", K.GRID),), K.BLOCKS,
     "blocks that contain the query", "n*stride <= i < n*stride + len")
_def("future", (_a("grid", K.GRID),), K.BLOCKS,
     "blocks that start after the query", "n*stride > i")
_def("first", (_a("grid", K.GRID), _a("n", K.INT, minimum=1)), K.BLOCKS,
     "the first `n` blocks", "n' < n")
_def("recent", (_a("grid", K.GRID), _a("n", K.INT, minimum=1)), K.BLOCKS,
     "the `n` most recent blocks that have started", "c(i) - n < n' <= c(i), c(i) = floor(i / stride)")
_def("random", (_a("grid", K.GRID), _a("n", K.INT, minimum=1), _a("seed", K.INT, default=0, minimum=0)),
     K.BLOCKS,
     "`n` blocks drawn by a seeded hash among those that end before the query's block starts",
     "the n blocks m with end(m) < start(c(i)) of largest hash(seed, c(i), m)")
_def("topk", (_a("score", K.SCORE), _a("k", K.INT, minimum=1),
              _a("force", K.BLOCKS, optional_node=True), _a("forbid", K.BLOCKS, optional_node=True)),
     K.BLOCKS,
     "the forced blocks, then the best-scoring allowed blocks until `k` are selected (ties: lower index)",
     "force[i] + top_(k - |force[i]|) { n not in force[i] or forbid[i] } by score[i, n]")

# pooling, scores ---------------------------------------------------------------
_def("pool", (_a("grid", K.GRID), _a("method", K.METHOD, choices=POOL_METHODS),
              _a("hidden", K.INT, default=0, minimum=0)), K.POOL,
     "one virtual key and value per block: the mean of its tokens, or a learned MLP over them "
     "with an intra-block position encoding (NSA Eq. 7); `hidden` = MLP width (0: head dim)",
     "K~[n] = phi(k[block n]), V~[n] = phi(v[block n])")
_def("dot", (_a("q", K.QUERY), _a("pool", K.POOL), _a("scale", K.FLOAT, default=1.0)), K.SCORE,
     "query against pooled keys", "s[i, n] = scale * q_i . K~[n]")
_def("probs", (_a("branch", K.BRANCH),), K.SCORE,
     "the attention probabilities of a branch over pooled blocks", "s[i, n] = p_b[i, n]")
_def("remap", (_a("score", K.SCORE), _a("grid", K.GRID)), K.SCORE,
     "a score moved onto another grid, weighted by token overlap in units of the source stride "
     "(NSA Eq. 9)", "s'[i, m] = sum_n |block n & block' m| / stride * s[i, n]")
_def("groupsum", (_a("score", K.SCORE),), K.SCORE,
     "a score summed over the query heads of a GQA group, so the group shares one selection",
     "s'[i, n] = sum_(h in group) s_h[i, n]")

# branches ----------------------------------------------------------------------
_def("attend", (_a("keys", K.KEYS, K.POOL), _a("blocks", K.BLOCKS, optional_node=True),
                _a("scale", K.FLOAT, default=0.0, minimum=0.0)), K.BRANCH,
     "softmax attention over a key set (real tokens), or over pooled blocks restricted to a block "
     "set; `scale` 0 means 1/sqrt(head dim)",
     "o[i] = sum_j softmax_j(scale q_i . k_j | M[i, j]) v_j")
_def("union", (), K.BRANCH,
     "one softmax over the union of the branches' keys", "o[i] = softmax over all keys of all branches",
     variadic=K.BRANCH)

# gates -------------------------------------------------------------------------
_def("linear", (_a("x", K.TENSOR),), K.LOGITS,
     "a learned projection of the layer input to one number per query head", "W x_i + b")
_def("sigmoid", (_a("logits", K.LOGITS),), K.GATE,
     "the logistic function", "1 / (1 + exp(-z))")

# names that are values, not calls
NAMES = {
    "q": Kind.QUERY,
    "causal": Kind.KEYS,
}
CAUSAL_FORMULA = "j <= i"
