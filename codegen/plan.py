"""Kernel plan: the small IR between the graph and the Triton source.

`plan_kernels(ir)` reads the verified graph and decides

  * which kernels run, in order (`stages`):
      pool     one per pooled grid: mean or MLP compression of key/value blocks
      attend   an attention kernel; a branch whose probabilities feed a gate runs
               in its own `attend` stage first (it must finish before the gate), and
               so does a gated term of one branch without block lists beside terms
               with lists (NSA's window: query tiles load its keys once, where the
               final stage's programs, one per query, would each load them)
      select   one per data-dependent block set (`topk`, `random`): fused gate
               scores + top-k, writing block index lists [B, T, H, KS]
      attend   the final kernel: every remaining branch, combined (one softmax
               over a union, or a gated sum), loading each query once
  * how each attention kernel walks the sparsity (`layout`):
      tile     BM consecutive queries of one head; key tiles are skipped by
               interval bounds derived from the pattern (static patterns)
      row      one query position and the query heads that share its block
               lists: the whole GQA group when selections are per group (NSA's
               kernel design), one head when selections are per head
      grouped  the entries of one top-k list sorted by the block they name: a
               tile is up to BM queries that chose one block (MoBA's design,
               codegen/grouped.py)
  * where keys come from (`sources` of each branch): token ranges with bounds
    that are affine in the query position, block ranges, or block index lists;
    and, for a token branch, which keys every query of a tile attends (`full`:
    token ranges inside the mask for every row of the tile; in a grouped stage,
    given that the tile's queries chose the block), so the kernels can run the key
    tiles inside them without masks.

Every bound is written in the tile's first query `i_lo` and its end `i_hi` (and
`T`, the block counts `NB<g>`) and is nondecreasing as the tile moves right (each
rule's bounds are, and max/min keep it): the key-major backward relies on this to
find, by bisection, the query tiles that can see a key tile.

Everything here is plain data and prints as text (`KernelPlan.format`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from sparsedsl.ir.graph import IR
from sparsedsl.ir.ops import Kind


# ------------------------------------------------------------------ key sources
@dataclass(frozen=True)
class TokenRange:
    """Keys [lo, hi) for a query tile [i_lo, i_hi): `lo`/`hi` are source expressions."""
    lo: str
    hi: str


@dataclass(frozen=True)
class BlockRange:
    """Blocks [lo, hi) of a grid for a query tile (expressions)."""
    grid: int
    lo: str
    hi: str


@dataclass(frozen=True)
class BlockList:
    """The blocks listed by a select stage for the query (row layout only)."""
    grid: int
    select: int  # the select stage's node


Source = TokenRange | BlockRange | BlockList


@dataclass(frozen=True)
class Grid:
    node: int
    length: int
    stride: int

    @property
    def overlap(self) -> int:
        """The most blocks one token can lie in."""
        return math.ceil(self.length / self.stride)


# ------------------------------------------------------------------------ stages
@dataclass(frozen=True)
class PoolStage:
    node: int
    grid: Grid
    method: str  # "mean" | "mlp"
    owner: str | None
    name: str

    kind = "pool"


@dataclass(frozen=True)
class SelectStage:
    node: int
    grid: Grid
    op: str  # "topk" | "random"
    k: int
    heads: str  # "head" | "group": one list per query head or per kv head
    slots: str  # expression for the list length KS (may depend on the block count NB)
    name: str

    kind = "select"


@dataclass(frozen=True)
class BranchPlan:
    node: int
    name: str
    pooled: bool
    sources: tuple[Source, ...]
    scale: float  # 0: 1/sqrt(head_dim)
    grid: Grid | None = None  # pooled branches
    precomputed: bool = False  # computed by an earlier attend stage (its probs feed a gate)
    # keys every query of a tile attends (token branches; grouped: given the list's block)
    full: tuple[TokenRange, ...] = ()


@dataclass(frozen=True)
class AttendStage:
    name: str
    layout: str  # "tile" | "row"
    rows: str  # "group" | "head": with the row layout, heads per program
    combine: str  # "single" | "union" | "mix"
    groups: tuple[tuple[BranchPlan, ...], ...]  # each group shares one softmax (a union)
    gates: tuple  # per group: the gate's key (`g<node>`) in the host's `gates`, or None
    writes_lse: bool  # an earlier stage: writes o and lse for later stages
    node: int  # the IR node whose value this stage produces

    kind = "attend"


@dataclass
class KernelPlan:
    spec: str
    params: dict
    passes: list[str]
    stages: list = field(default_factory=list)
    grids: dict[int, Grid] = field(default_factory=dict)
    strategy: str = ""

    @property
    def final(self) -> "AttendStage":
        """The last attention stage: its output is the layer's (earlier ones feed it)."""
        return [s for s in self.stages if s.kind == "attend"][-1]

    def format(self) -> str:
        lines = [f"plan {self.spec}({', '.join(f'{k}={v}' for k, v in self.params.items())})",
                 f"  strategy: {self.strategy}"]
        for s in self.stages:
            if s.kind == "pool":
                lines.append(f"  pool   {s.name}: {s.method} over blocks(len={s.grid.length}, "
                             f"stride={s.grid.stride})")
            elif s.kind == "select":
                lines.append(f"  select {s.name}: {s.op} k={s.k} per {s.heads} over blocks("
                             f"len={s.grid.length}, stride={s.grid.stride}), slots={s.slots}")
            else:
                br = " + ".join(
                    (f"{gate} * " if gate else "") + "union(" * (len(grp) > 1) + ", ".join(
                        f"{b.name}{'*' if b.precomputed else ''}[{_fmt_sources(b.sources)}]"
                        + (f" full[{_fmt_sources(b.full)}]"
                           if s.layout in ("tile", "grouped") and b.full else "")
                        for b in grp) + ")" * (len(grp) > 1)
                    for grp, gate in zip(s.groups, s.gates))
                lines.append(f"  attend {s.name}: layout={s.layout}"
                             f"{'/' + s.rows if s.layout == 'row' else ''} combine={s.combine} "
                             f"branches: {br}")
        return "\n".join(lines) + "\n"


def _fmt_sources(sources) -> str:
    out = []
    for s in sources:
        if isinstance(s, TokenRange):
            out.append(f"tokens[{s.lo}, {s.hi})")
        elif isinstance(s, BlockRange):
            out.append(f"blocks%{s.grid}[{s.lo}, {s.hi})")
        else:
            out.append(f"list%{s.select}")
    return " + ".join(out)


# ---------------------------------------------------------------------- analysis
class Planner:
    """Derives the stages, layouts and key sources from a verified IR."""

    def __init__(self, ir: IR):
        self.ir = ir
        self.grids: dict[int, Grid] = {}
        for nid in ir.order():
            n = ir.node(nid)
            if n["op"] == "blocks":
                self.grids[nid] = Grid(nid, n["args"]["len"], n["args"]["stride"])

    def grid_of(self, nid: int) -> Grid:
        return self.grids[int(self.ir.node(nid)["facts"]["grid"][1:])]

    def name(self, nid: int) -> str:
        return self.ir.label(nid)

    # dynamic block sets: topk and random produce lists
    def is_list(self, nid: int) -> bool:
        return self.ir.node(nid)["op"] in ("topk", "random")

    # ---- sources: where the keys of a key set / the blocks of a block set can be
    def token_sources(self, nid: int) -> list[Source]:
        n = self.ir.node(nid)
        op, a = n["op"], n["args"]
        ops = self.ir.operands(nid)
        if op == "causal":
            return [TokenRange("0", "i_hi")]
        if op == "window":
            return [TokenRange(f"i_lo - {a['size'] - 1}", "i_hi")]
        if op == "sink":
            return [TokenRange("0", str(a["n"]))]
        if op in ("global", "strided", "summary", "not"):
            return [TokenRange("0", "T")]
        if op == "tokens":
            g = self.grid_of(ops["blocks"])
            out = []
            for s in self.block_sources(ops["blocks"]):
                if isinstance(s, BlockRange):
                    out.append(TokenRange(f"({s.lo}) * {g.stride}",
                                          f"({s.hi} - 1) * {g.stride} + {g.length}"))
                else:
                    out.append(s)
            return out
        if op == "or":
            return self.token_sources(ops["0"]) + self.token_sources(ops["1"])
        if op == "and":
            return _intersect(self.token_sources(ops["0"]), self.token_sources(ops["1"]))
        raise AssertionError(op)  # pragma: no cover

    def block_sources(self, nid: int) -> list[Source]:
        n = self.ir.node(nid)
        op, a = n["op"], n["args"]
        ops = self.ir.operands(nid)
        g = self.grid_of(nid)
        L, S = g.length, g.stride
        if op == "past":
            return [BlockRange(g.node, "0", f"_fdiv(i_hi - {L}, {S}) + 1")]
        if op == "current":
            return [BlockRange(g.node, f"_fdiv(i_lo - {L}, {S}) + 1", f"_fdiv(i_hi - 1, {S}) + 1")]
        if op == "future":
            return [BlockRange(g.node, f"_fdiv(i_lo, {S}) + 1", f"NB{g.node}")]
        if op == "first":
            return [BlockRange(g.node, "0", str(a["n"]))]
        if op == "recent":
            return [BlockRange(g.node, f"_fdiv(i_lo, {S}) - {a['n'] - 1}",
                               f"_fdiv(i_hi - 1, {S}) + 1")]
        if op in ("topk", "random"):
            return [BlockList(g.node, nid)]
        if op == "not":
            return [BlockRange(g.node, "0", f"NB{g.node}")]
        if op == "or":
            return self.block_sources(ops["0"]) + self.block_sources(ops["1"])
        if op == "and":
            return _intersect(self.block_sources(ops["0"]), self.block_sources(ops["1"]))
        raise AssertionError(op)  # pragma: no cover

    # ---- keys (blocks) that every query of the tile [i_lo, i_hi) has: inner bounds
    def full_ranges(self, nid: int, given: frozenset = frozenset()) -> list[TokenRange]:
        """Token ranges inside the key set for every query of the tile (an under-approximation:
        a rule without a simple inner bound gives none). `given`: lists whose membership is
        known to hold (a grouped tile's queries all chose the block it attends)."""
        n = self.ir.node(nid)
        op, a = n["op"], n["args"]
        ops = self.ir.operands(nid)
        if op == "causal":
            return [TokenRange("0", "i_lo + 1")]
        if op == "window":
            return [TokenRange(f"i_hi - {a['size']}", "i_lo + 1")]
        if op in ("sink", "global"):
            return [TokenRange("0", str(a["n"]))]
        if op == "tokens":
            g = self.grid_of(ops["blocks"])
            if g.stride != g.length:  # overlapping or gapped blocks: no simple inner bound
                return []
            return [TokenRange(f"({r.lo}) * {g.stride}", f"({r.hi}) * {g.stride}")
                    for r in self.block_full(ops["blocks"], given)]
        if op == "or":
            return _dedup(self.full_ranges(ops["0"], given) + self.full_ranges(ops["1"], given))
        if op == "and":
            return _intersect(self.full_ranges(ops["0"], given),
                              self.full_ranges(ops["1"], given))
        return []  # strided, summary, not

    def block_full(self, nid: int, given: frozenset = frozenset()) -> list[BlockRange]:
        """Block ranges in the block set for every query of the tile."""
        n = self.ir.node(nid)
        op, a = n["op"], n["args"]
        ops = self.ir.operands(nid)
        g = self.grid_of(nid)
        L, S = g.length, g.stride
        if op == "past":
            return [BlockRange(g.node, "0", f"_fdiv(i_lo - {L - 1}, {S}) + 1")]
        if op == "current":
            return [BlockRange(g.node, f"_fdiv(i_hi - {L + 1}, {S}) + 1", f"_fdiv(i_lo, {S}) + 1")]
        if op == "future":
            return [BlockRange(g.node, f"_fdiv(i_hi - 1, {S}) + 1", f"NB{g.node}")]
        if op == "first":
            return [BlockRange(g.node, "0", str(a["n"]))]
        if op == "recent":
            return [BlockRange(g.node, f"_fdiv(i_hi - 1, {S}) - {a['n'] - 1}",
                               f"_fdiv(i_lo, {S}) + 1")]
        if op in ("topk", "random") and nid in given:
            return [BlockRange(g.node, "0", f"NB{g.node}")]
        if op == "or":
            return _dedup(self.block_full(ops["0"], given) + self.block_full(ops["1"], given))
        if op == "and":
            return _intersect(self.block_full(ops["0"], given), self.block_full(ops["1"], given))
        return []  # other lists, not

    # ---- the count bound of a block set (list slots for forced blocks)
    def max_count(self, nid: int) -> str:
        n = self.ir.node(nid)
        op, a = n["op"], n["args"]
        ops = self.ir.operands(nid)
        g = self.grid_of(nid)
        if op == "current":
            return str(g.overlap)
        if op in ("first", "recent", "random"):
            return str(a["n"])
        if op == "topk":
            return f"max({a['k']}, {self.max_count(ops['force'])})" if "force" in ops else str(a["k"])
        if op == "or":
            return f"({self.max_count(ops['0'])} + {self.max_count(ops['1'])})"
        if op == "and":
            return f"min({self.max_count(ops['0'])}, {self.max_count(ops['1'])})"
        return "NB"

    def lists_in(self, nid: int) -> set[int]:
        """Select nodes whose lists a value depends on (through masks and block sets)."""
        out = set()
        stack = list(self.ir.operands(nid).values())
        while stack:
            u = stack.pop()
            if self.is_list(u):
                out.add(u)
                continue
            if self.ir.node(u)["kind"] in (Kind.KEYS, Kind.BLOCKS):
                stack.extend(self.ir.operands(u).values())
        return out

    # ---- the plan
    def plan(self) -> KernelPlan:
        ir = self.ir
        plan = KernelPlan(ir.spec_name, ir.param_values(), list(ir.passes_run), grids=self.grids)
        order = ir.order()
        # branches whose probabilities feed a score run first, in their own stage
        early = {ir.operand(n, "branch") for n in order if ir.node(n)["op"] == "probs"}
        for nid in order:
            n = ir.node(nid)
            if n["op"] == "pool":
                plan.stages.append(PoolStage(nid, self.grid_of(nid), n["args"]["method"],
                                             n["facts"].get("params"), self.name(nid)))
        emitted_early = set()
        for nid in order:
            n = ir.node(nid)
            if n["op"] in ("topk", "random"):
                for b in sorted(self._early_deps(nid, early) - emitted_early):
                    self._early_stage(plan, b, emitted_early)
                heads = n["facts"].get("heads", "static")
                if n["op"] == "random":
                    heads = "group"  # the same for every head; one list per kv head
                slots = f"min({self.max_count(nid)}, NB)"
                plan.stages.append(SelectStage(nid, self.grid_of(nid), n["op"], n["args"].get(
                    "k", n["args"].get("n")), "group" if heads in ("group", "static") else "head",
                    slots, self.name(nid)))
        out = ir.out
        on = ir.node(out)
        if on["op"] == "mix":
            terms = on["args"]["terms"]
            groups = [self._flatten(ir.operand(out, f"branch.{t}")) for t in range(terms)]
            gates = tuple(self._gate_key(ir.operand(out, f"gate.{t}")) for t in range(terms))
            for b in self._static_terms(groups, emitted_early):
                self._early_stage(plan, b, emitted_early)
            stage = self._attend_stage(groups, "mix", gates, False, out, precomputed=emitted_early)
        else:
            groups = [self._flatten(out)]
            stage = self._attend_stage(groups, "union" if len(groups[0]) > 1 else "single",
                                       (None,), False, out, precomputed=emitted_early)
        plan.stages.append(stage)
        plan.strategy = self._describe(plan) + self._describe_selects(plan)
        return plan

    def _early_stage(self, plan: KernelPlan, b: int, emitted: set) -> None:
        """Branch b in a stage of its own before the final one, writing its output and
        log-sum-exp (which the final stage merges, and a probability reads)."""
        plan.stages.append(self._attend_stage([[b]], "single", (None,), writes_lse=True, node=b))
        emitted.add(b)

    def _static_terms(self, groups, early) -> list[int]:
        """Branches of a gated mix that run as their own tile-layout stages before the
        final one: the terms that are one branch reading no block list, when another term
        reads lists (the final stage is then row layout: one program per query walks its
        lists, and would walk such a branch's keys per query too, where a tile of queries
        loads them once: NSA's sliding window)."""
        if not any(self.lists_in(b) for grp in groups for b in grp if b not in early):
            return []
        return [grp[0] for grp in groups
                if len(grp) == 1 and grp[0] not in early and not self.lists_in(grp[0])]

    def _describe_selects(self, plan: KernelPlan) -> str:
        """Which select kernel each list gets (codegen/emit.py, `select_kernel`)."""
        from .emit import Exprs, select_kernel
        ex = Exprs(self.ir, plan)
        words = {"tile": "query-tiled (BQ queries of one head per program)",
                 "tree": "split: the score tree evaluated by query tiles (BQ queries x the "
                         "head set per program, once per chunk of each grid) into a scratch "
                         "buffer, then the top-k one query per program",
                 "deps": "one query per program (it reads other lists)",
                 "random": "one query per program"}
        return "".join(f"; select `{st.name}`: {words[select_kernel(self.ir, ex, st)]}"
                       for st in plan.stages if st.kind == "select")

    def _early_deps(self, select: int, early: set) -> set:
        import networkx as nx
        return {b for b in early if b in nx.ancestors(self.ir.g, select)}

    def _flatten(self, nid: int) -> list[int]:
        """The attend nodes of a branch: itself, or every branch under a (nested) union."""
        if self.ir.node(nid)["op"] == "union":
            out = []
            for u in self.ir.operands(nid).values():
                out.extend(b for b in self._flatten(u) if b not in out)
            return out
        return [nid]

    def _gate_key(self, nid):
        """Gates reach the kernels as [B, T, H] tensors named by their IR node."""
        return None if nid is None else f"g{nid}"

    def _branch(self, nid: int, precomputed: bool) -> BranchPlan:
        n = self.ir.node(nid)
        ops = self.ir.operands(nid)
        if n["op"] == "attend_tokens":
            return BranchPlan(nid, self.name(nid), False, tuple(self.token_sources(ops["keys"])),
                              n["args"]["scale"], precomputed=precomputed,
                              full=tuple(self.full_ranges(ops["keys"])))
        if n["op"] == "attend_pooled":
            return BranchPlan(nid, self.name(nid), True, tuple(self.block_sources(ops["blocks"])),
                              n["args"]["scale"], grid=self.grid_of(nid), precomputed=precomputed)
        raise AssertionError(n["op"])  # unions inside unions are flattened by the builder

    def _attend_stage(self, groups, combine, gates, writes_lse, node, precomputed=()):
        plans = tuple(tuple(self._branch(b, b in precomputed) for b in grp) for grp in groups)
        lists = set()
        for grp in groups:
            for b in grp:
                if b not in precomputed:
                    lists |= self.lists_in(b)
        per_head = any(self.ir.node(s)["facts"].get("heads") == "head" and
                       self.ir.node(s)["op"] == "topk" for s in lists)
        layout = "row" if lists else "tile"
        rows = "head" if per_head else "group"
        name = self.name(node) if writes_lse else "out"
        stage = AttendStage(name, layout, rows, combine, plans, tuple(gates), writes_lse, node)
        from .grouped import grouped_list
        src = grouped_list(self.ir, self.grids, stage, lists) if lists else None
        if src:
            br = stage.groups[0][0]  # keys that every query of a tile (all chose the block) has
            full = self.full_ranges(self.ir.operand(br.node, "keys"), frozenset({src.select}))
            stage = dataclasses.replace(stage, layout="grouped", groups=(
                (dataclasses.replace(br, full=tuple(full)),),))
        return stage

    def _describe(self, plan: KernelPlan) -> str:
        final = plan.final
        sel = [s for s in plan.stages if s.kind == "select"]
        if final.layout == "tile":
            return ("static pattern: query tiles of one head walk key tiles between interval "
                    "bounds derived from the pattern; fully masked tiles are skipped")
        if final.layout == "grouped":
            from .grouped import own_block
            src = final.groups[0][0].sources[0]
            merge = ("each query's own block (the forced current one) is attended by tiles of "
                     "contiguous queries, which merge in the other blocks by log-sum-exp"
                     if own_block(self.ir, plan.grids[src.grid], src) else
                     "a combine kernel merges each query's blocks by log-sum-exp")
            return ("grouped by selected block (MoBA's strategy): the list entries are sorted by "
                    "key block; a program attends a tile of queries that chose one block to it, "
                    f"and {merge}")
        early = [s for s in plan.stages if s.kind == "attend" and s is not final]
        before = ("; earlier stages, merged by the final one: " + ", ".join(
            f"`{s.name}` ({s.layout} layout)" for s in early) if early else "")
        if final.rows == "group":
            return ("selection shared by each GQA group: one program per (query, kv head) loads "
                    f"the group's query heads together and walks {len(sel)} block list(s)"
                    + before)
        return ("per-head selection: one program per (query, head) walks its own block list(s)"
                + before)


def _intersect(a: list, b: list) -> list:
    """Sources of A & B: every pair intersected (lists stay lists: they are short)."""
    out = []
    for x in a:
        for y in b:
            if isinstance(x, BlockList):
                out.append(x)
            elif isinstance(y, BlockList):
                out.append(y)
            elif isinstance(x, TokenRange) and isinstance(y, TokenRange):
                out.append(TokenRange(f"max({x.lo}, {y.lo})", f"min({x.hi}, {y.hi})"))
            elif isinstance(x, BlockRange) and isinstance(y, BlockRange):
                out.append(BlockRange(x.grid, f"max({x.lo}, {y.lo})", f"min({x.hi}, {y.hi})"))
            else:  # pragma: no cover - kinds never mix
                raise AssertionError((x, y))
    # identical sources visit the same keys: keep one
    return _dedup(out)


def _dedup(out: list) -> list:
    seen, uniq = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            uniq.append(s)
    return uniq


def plan_kernels(ir: IR) -> KernelPlan:
    return Planner(ir).plan()
