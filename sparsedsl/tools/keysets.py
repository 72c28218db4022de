"""Which keys each query attends, counted from the IR: no tensors, no inputs.

For one query position `i`, every key set of the language is a boolean
combination of *intervals* of key positions (`causal`, `window`, `sink`,
`global`, `tokens(B)`) and of *residue classes* (`strided`, `summary`: whether
`j` belongs depends on `j mod step`). Block sets are intervals of block
indices (`past`, `current`, `future`, `first`, `recent`), a few single blocks
(`random`) and their combinations. So a key set for one query is counted
exactly without a `[T, T]` mask:

  * interval-only sets are combined as sorted interval lists (`_and`, `_or`,
    `_not`) and their size summed;
  * sets with residue classes are cut into segments between the intervals'
    end points; inside a segment every interval is constant and membership
    depends only on `j mod P` (`P` the lcm of the steps), kept as a P-bit
    integer, so a segment's count is popcounts.

`random(g, n, seed)` is evaluated exactly with the reference's hash (it
depends only on the query's block, so each block's choice is computed once).

`topk` is data-dependent: it is counted *structurally*, as the semantics fix
its size. Per query: the forced blocks; then `k` minus the forced blocks that
have started, of the free candidates (neither forced nor forbidden), as many as
exist. Which candidates the scores pick is not known without data; the count
takes the most recent wholly past candidates first, then those holding the
query, then later ones. When every free candidate is a full past block of a
grid whose blocks do not overlap (MoBA, NSA) that count is the same for every
selection the scores could make; `KeyCounts.notes` says when it is a choice.

`count_keys(ir, T)` returns, for every attention branch (`branches(ir)`), the
number of real keys and of pooled keys each query attends.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass, field

from ..ir.graph import IR

Intervals = tuple  # sorted, disjoint, non-adjacent half-open (a, b) pairs
EMPTY: Intervals = ()

BRANCH_OPS = ("attend_tokens", "attend_pooled", "union")


# ---------------------------------------------------------------- interval lists
def _norm(pairs) -> Intervals:
    out: list[list[int]] = []
    for a, b in sorted(p for p in pairs if p[0] < p[1]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _and(x: Intervals, y: Intervals) -> Intervals:
    out, p, r = [], 0, 0
    while p < len(x) and r < len(y):
        a, b = max(x[p][0], y[r][0]), min(x[p][1], y[r][1])
        if a < b:
            out.append((a, b))
        if x[p][1] < y[r][1]:
            p += 1
        else:
            r += 1
    return tuple(out)


def _or(x: Intervals, y: Intervals) -> Intervals:
    if not x:
        return y
    if not y:
        return x
    return _norm(x + y)


def _not(x: Intervals, lo: int, hi: int) -> Intervals:
    out, at = [], lo
    for a, b in x:
        if a > at:
            out.append((at, min(a, hi)))
        at = max(at, b)
    if at < hi:
        out.append((at, hi))
    return tuple((a, b) for a, b in out if a < b)


def _size(x: Intervals) -> int:
    return sum(b - a for a, b in x)


def _clip(x: Intervals, lo: int, hi: int) -> Intervals:
    return _and(x, ((lo, hi),)) if lo < hi else EMPTY


# ------------------------------------------------------ key sets with residue classes
@dataclass(frozen=True)
class _Mod:
    """Keys j with `j mod step` in a set of residues, given as a predicate over residues."""
    step: int
    kind: str  # "strided" | "summary"
    a: int  # strided: the residue (i - offset) mod step; summary: the width

    def bits(self, period: int) -> int:
        """The P-bit mask over residues r of j mod P (P a multiple of step)."""
        s = self.step
        every = ((1 << period) - 1) // ((1 << s) - 1)  # bits 0, s, 2s, ...
        if self.kind == "strided":
            return every << self.a
        w = min(self.a, s)
        return (((1 << w) - 1) << (s - w)) * every


@dataclass(frozen=True)
class _Op:
    op: str  # "and" | "or" | "not"
    args: tuple


def _combine(op: str, *args):
    """Key-set terms: interval lists when every operand is one, else a tree."""
    if all(isinstance(a, tuple) for a in args):
        if op == "and":
            return _and(*args)
        if op == "or":
            return _or(*args)
    return _Op(op, args)


def count_term(term, T: int) -> int:
    """Number of key positions in [0, T) of a key-set term."""
    if isinstance(term, tuple):
        return _size(_clip(term, 0, T))
    points, steps = {0, T}, set()
    _collect(term, points, steps)
    period = 1
    for s in steps:
        period = period * s // math.gcd(period, s)
    points = sorted(p for p in points if 0 <= p <= T)
    full = (1 << period) - 1
    total = 0
    for a, b in zip(points, points[1:]):
        if a >= b:
            continue
        mask = _bits_at(term, a, period, full)
        if mask:
            total += _count_residues(mask, period, a, b)
    return total


def _collect(term, points: set, steps: set) -> None:
    if isinstance(term, tuple):
        for a, b in term:
            points.add(a)
            points.add(b)
    elif isinstance(term, _Mod):
        steps.add(term.step)
    else:
        for t in term.args:
            _collect(t, points, steps)


def _bits_at(term, j: int, period: int, full: int) -> int:
    """The residue mask of `term` inside the segment starting at key j."""
    if isinstance(term, tuple):
        k = bisect_right(term, (j, math.inf)) - 1
        return full if k >= 0 and term[k][0] <= j < term[k][1] else 0
    if isinstance(term, _Mod):
        return term.bits(period)
    vals = [_bits_at(t, j, period, full) for t in term.args]
    if term.op == "not":
        return full ^ vals[0]
    if term.op == "and":
        return vals[0] & vals[1]
    return vals[0] | vals[1]


def _count_residues(mask: int, period: int, a: int, b: int) -> int:
    """Number of j in [a, b) whose residue j mod period is set in `mask`."""
    per = mask.bit_count()

    def upto(x: int) -> int:  # j in [0, x)
        q, r = divmod(x, period)
        return q * per + (mask & ((1 << r) - 1)).bit_count()

    return upto(b) - upto(a)


# --------------------------------------------------------------------- branches
@dataclass(frozen=True)
class Branch:
    """One attention the layer computes: a branch of `out`, or one whose probabilities a
    gate reads. A `union` is one branch; the branches it joins are its parts."""
    node: int
    name: str
    op: str  # attend_tokens | attend_pooled | union
    token_parts: tuple[int, ...]  # attend_tokens nodes whose keys it attends
    pooled_parts: tuple[int, ...]  # attend_pooled nodes
    heads: str  # static | group | head: how its key set varies over heads


def branch_name(ir: IR, nid: int) -> str:
    n = ir.node(nid)
    if n["name"]:
        return n["name"]
    return "out" if nid == ir.out else f"n{nid}"


def branches(ir: IR) -> list[Branch]:
    """The attention branches in IR order: every branch node that is `out` or has a user
    other than a `union` (unions count as one branch over all their parts' keys)."""
    out = []
    for nid in ir.order():
        n = ir.node(nid)
        if n["op"] not in BRANCH_OPS:
            continue
        users = [ir.node(u)["op"] for u in ir.users(nid)]
        if nid != ir.out and users and all(u == "union" for u in users):
            continue
        tok, pooled = [], []
        _parts(ir, nid, tok, pooled)
        out.append(Branch(nid, branch_name(ir, nid), n["op"], tuple(tok), tuple(pooled),
                          n["facts"].get("heads", "static")))
    return out


def _parts(ir: IR, nid: int, tok: list, pooled: list) -> None:
    op = ir.node(nid)["op"]
    if op == "union":
        for src in ir.operands(nid).values():
            _parts(ir, src, tok, pooled)
    elif op == "attend_tokens":
        if nid not in tok:
            tok.append(nid)
    elif nid not in pooled:
        pooled.append(nid)


# ------------------------------------------------------------------ the counter
@dataclass
class KeyCounts:
    """Per-query key counts of every branch of one IR at one sequence length."""
    seq: int
    branches: list[Branch]
    tokens: dict[str, list[int]]  # branch name -> real keys attended by query i
    pooled: dict[str, list[int]]  # branch name -> pooled keys attended by query i
    candidates: dict[str, list[int]] = field(default_factory=dict)  # top-k -> free blocks at i
    notes: list[str] = field(default_factory=list)

    def total(self, i: int) -> int:
        return sum(self.tokens[b.name][i] + self.pooled[b.name][i] for b in self.branches)


class _Grid:
    def __init__(self, length: int, stride: int, T: int):
        self.length, self.stride = length, stride
        self.n = math.ceil(T / stride)

    def tokens(self, blocks: Intervals, T: int) -> Intervals:
        """The token positions of a block set (a run of blocks is one run of tokens:
        stride <= length)."""
        return _norm((a * self.stride, min((b - 1) * self.stride + self.length, T))
                     for a, b in blocks)


class Counter:
    """Evaluates the key sets and block sets of an IR one query at a time."""

    def __init__(self, ir: IR, T: int):
        self.ir, self.T = ir, T
        self.order = [n for n in ir.order() if ir.node(n)["kind"].value in ("keys", "blocks")]
        self.ops = {n: ir.operands(n) for n in self.order}
        self.is_keys = {n: ir.node(n)["kind"].value == "keys" for n in self.order}
        self.grids: dict[int, _Grid] = {}
        for nid in ir.nodes_with("blocks"):
            a = ir.node(nid)["args"]
            self.grids[nid] = _Grid(a["len"], a["stride"], T)
        self._random: dict[tuple[int, int], Intervals] = {}
        self.candidates: dict[int, int] = {}  # top-k node -> free candidates at the last query

    def grid(self, nid: int) -> _Grid:
        return self.grids[int(self.ir.node(nid)["facts"]["grid"][1:])]

    def at(self, i: int) -> dict:
        """Every key set (a term) and block set (intervals of block indices) at query i."""
        env: dict[int, object] = {}
        ir, T = self.ir, self.T
        for nid in self.order:
            n = ir.node(nid)
            op, a = n["op"], n["args"]
            ops = self.ops[nid]
            if self.is_keys[nid]:
                env[nid] = self._keys(nid, op, a, ops, env, i)
            else:
                env[nid] = self._blocks(nid, op, a, ops, env, i)
        return env

    def _keys(self, nid, op, a, ops, env, i):
        T = self.T
        if op == "causal":
            return ((0, i + 1),)
        if op == "window":
            return ((max(0, i - a["size"] + 1), i + 1),)
        if op == "sink":
            return ((0, min(a["n"], T)),)
        if op == "global":
            return ((0, T),) if i < a["n"] else ((0, min(a["n"], T)),)
        if op == "strided":
            if a["offset"] >= a["step"]:  # (i - j) mod step is always below step
                return EMPTY
            return _Mod(a["step"], "strided", (i - a["offset"]) % a["step"])
        if op == "summary":
            return _Mod(a["step"], "summary", a["width"])
        if op == "tokens":
            src = ops["blocks"]
            return self.grid(src).tokens(env[src], T)
        if op == "not":
            x = env[ops["0"]]
            return _not(x, 0, T) if isinstance(x, tuple) else _Op("not", (x,))
        if op in ("and", "or"):
            return _combine(op, env[ops["0"]], env[ops["1"]])
        raise NotImplementedError(f"keysets: no counting rule for the key set `{op}`")

    def _blocks(self, nid, op, a, ops, env, i) -> Intervals:
        g = self.grid(nid)
        S, L, N = g.stride, g.length, g.n
        c = i // S
        if op == "past":  # n*S + L - 1 <= i
            return _clip(((0, (i - L + 1) // S + 1),), 0, N) if i - L + 1 >= 0 else EMPTY
        if op == "current":  # n*S <= i <= n*S + L - 1
            return _clip(((-((L - 1 - i) // S), c + 1),), 0, N)
        if op == "future":
            return _clip(((c + 1, N),), 0, N)
        if op == "first":
            return _clip(((0, a["n"]),), 0, N)
        if op == "recent":
            return _clip(((c - a["n"] + 1, c + 1),), 0, N)
        if op == "random":
            return self._random_at(nid, g, a["n"], a["seed"], c)
        if op == "topk":
            return self._topk(nid, g, a["k"], ops, env, i)
        if op == "not":
            return _not(env[ops["0"]], 0, N)
        if op in ("and", "or"):
            return _combine(op, env[ops["0"]], env[ops["1"]])
        raise NotImplementedError(f"keysets: no counting rule for the block set `{op}`")

    def _random_at(self, nid, g: _Grid, count: int, seed: int, c: int) -> Intervals:
        key = (nid, c)
        if key not in self._random:
            # eligible blocks end before the query's block starts: m*S + L - 1 < c*S
            eligible = max(0, min(g.n, -((g.length - 1 - c * g.stride) // g.stride)))
            if eligible <= count:
                chosen = range(eligible)
            else:
                import torch

                from ..reference.evaluate import hash24
                h = hash24(seed, torch.tensor(c), torch.arange(eligible))
                # largest hash first, ties to the lower block index (a stable sort)
                order = torch.sort(h, descending=True, stable=True).indices[:count]
                chosen = order.tolist()
            self._random[key] = _norm((m, m + 1) for m in chosen)
        return self._random[key]

    def _topk(self, nid, g: _Grid, k: int, ops, env, i) -> Intervals:
        N = g.n
        force = env[ops["force"]] if "force" in ops else EMPTY
        forbid = env[ops["forbid"]] if "forbid" in ops else EMPTY
        free = _not(_or(force, forbid), 0, N)
        started = _clip(((0, i // g.stride + 1),), 0, N)
        need = max(k - _size(_and(force, started)), 0)
        self.candidates[nid] = _size(free)
        take = min(need, _size(free))
        if not take:
            return force
        past = _clip(((0, (i - g.length + 1) // g.stride + 1),), 0, N) \
            if i - g.length + 1 >= 0 else EMPTY
        picks = []
        # wholly past candidates, most recent first; then the started ones, earliest start
        # first (more of their tokens are visible); then later ones
        for a, b in reversed(_and(free, past)):
            n = min(take, b - a)
            picks.append((b - n, b))
            take -= n
            if not take:
                break
        for a, b in _and(free, _not(past, 0, N)):
            if not take:
                break
            n = min(take, b - a)
            picks.append((a, a + n))
            take -= n
        return _or(force, _norm(picks))


def count_keys(ir: IR, T: int, queries=None, progress=None) -> KeyCounts:
    """Real and pooled keys each branch attends, for the queries in `queries`
    (default: every query 0 .. T-1). `progress(done, total)` is called now and then."""
    counter = Counter(ir, T)
    bs = branches(ir)
    qs = list(range(T)) if queries is None else list(queries)
    tokens = {b.name: [] for b in bs}
    pooled = {b.name: [] for b in bs}
    topks = ir.nodes_with("topk")
    cands = {branch_name(ir, t): [] for t in topks}
    key_of = {}  # attend_tokens node -> its keys node
    blocks_of = {}  # attend_pooled node -> its blocks node
    for b in bs:
        for p in b.token_parts:
            key_of[p] = ir.operand(p, "keys")
        for p in b.pooled_parts:
            blocks_of[p] = ir.operand(p, "blocks")
    for done, i in enumerate(qs):
        if progress is not None and done % 512 == 0:
            progress(done, len(qs))
        env = counter.at(i)
        for b in bs:
            term = None
            for p in b.token_parts:
                t = env[key_of[p]]
                term = t if term is None else _combine("or", term, t)
            tokens[b.name].append(0 if term is None else count_term(term, T))
            pooled[b.name].append(sum(_size(env[blocks_of[p]]) for p in b.pooled_parts))
        for t in topks:
            cands[branch_name(ir, t)].append(counter.candidates.get(t, 0))
    if progress is not None:
        progress(len(qs), len(qs))
    notes = []
    for t in topks:
        notes.append(_topk_note(ir, t, counter))
    return KeyCounts(T, bs, tokens, pooled, cands, notes)


def _topk_note(ir: IR, nid: int, counter: Counter) -> str:
    g = counter.grid(nid)
    name = branch_name(ir, nid)
    text = (f"top-k `{name}` (k={ir.node(nid)['args']['k']}) depends on the data: counted "
            f"structurally, k blocks of {g.length} tokens (the forced ones included, as many "
            f"as exist at each query), free picks taken as the most recent past blocks")
    if g.stride < g.length:
        text += ("; its blocks overlap (stride < length), so a selection of blocks further "
                 "apart attends more distinct keys than counted")
    return text
