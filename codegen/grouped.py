"""The `grouped` strategy: queries grouped by the key block they selected (MoBA's own
implementation strategy, Lu et al. 2025).

It applies to an output that is one attention branch over the tokens of the blocks a top-k
lists, such as MoBA's `attend(tokens(sel) & causal)`. The row strategies walk each query's
list with one program per query: every key block is loaded once per query and the matrix
units see one row. Here every (query, head, selected block) entry of the lists is sorted by
its block, so a program takes up to BM queries that all chose one block and attends them to
that block as one [BM, BN] tile per step, as dense attention does:

    forward   group   each list entry's group id (batch, head, block), a stable torch.sort
                      of them, their bounds (torch.searchsorted) and one table kernel: each
                      group's tiles and each tile's group                    (no host sync)
              fwd     per tile of BM entries of one group: o and lse of the block  [E, DV]
                      (persistent programs walk the tiles; key tiles through tensor
                      descriptors where TMA applies; when every other pick is a past block
                      and the keys' rule holds on it, a tile walks its block unmasked)
              combine per (query, head): merge its KS partial (o, lse) by their lse
         or   own     when the top-k forces exactly the current block (MoBA), every list
                      starts with the query's own block, and a group's first entries are
                      that block's own queries: fwd takes the other entries only, and a
                      kernel per tile of BM contiguous queries of one head attends their
                      own block and merges the KS - 1 partials in (no combine kernel)
    backward  dq      per tile: dq of the block's keys, atomically added (KS adds a row;
                      key tiles through tensor descriptors as the forward's; persistent
                      programs by configuration)
              dkdv    per (group, key chunk of BNK), a group's chunks side by side (they read
                      the same query rows, from L2): walks the group's queries, accumulates
                      dk, dv in registers, adds them once (GQA heads share kv: atomic); with
                      few programs the groups go block by block (longest first), else head
                      by head

Keys inside a block are masked by the branch's own key expression with the grouped list's
membership known to hold (the tile's queries chose the block), so any extra mask term of the
spec (causal in the query's own block, a window, ...) still applies. The causality pass has
proved j <= i for every attended key, so a tile walks keys only up to its last query, and a
key chunk's dk/dv skips the group's queries before its first key. Key chunks that every query
of the tile attends (the branch's inner ranges, `BranchPlan.full`, given the list) run
without masks: for MoBA every chunk of a past block, and the own block's below the diagonal.
"""
from __future__ import annotations

import re

from sparsedsl.ir.graph import IR

from .emit import L2E_DEF, TMA_KV, _nbs_in, _tl
from .plan import AttendStage, BlockList, KernelPlan


def grouped_list(ir: IR, plan_grids: dict, st: AttendStage, mask_lists: set) -> BlockList | None:
    """The block list a final attention stage can be grouped by, or None.

    Conditions: one branch of real tokens whose only key source is one top-k list over
    disjoint blocks (each key lies in at most one block, a list names a block at most once),
    and whose mask reads no other list."""
    if st.writes_lse or st.combine != "single" or len(st.groups) != 1 or len(st.groups[0]) != 1:
        return None
    br = st.groups[0][0]
    if br.pooled or br.precomputed or len(br.sources) != 1:
        return None
    src = br.sources[0]
    if not isinstance(src, BlockList) or ir.node(src.select)["op"] != "topk":
        return None
    if plan_grids[src.grid].overlap != 1 or mask_lists != {src.select}:
        return None
    return src


def own_block(ir: IR, grid, src: BlockList) -> bool:
    """Whether every query lists its own block, first: the top-k forces exactly the current
    block of the list's grid (forced blocks come first in a list; a query's own block has
    always started, so it is always kept), and the blocks tile the keys without overlap."""
    force = ir.operand(src.select, "force")
    return (force is not None and ir.node(force)["op"] == "current"
            and ir.node(force)["facts"].get("grid") == f"%{src.grid}"
            and grid.stride == grid.length)


def picks_past_blocks(ir: IR, grid, src: BlockList) -> bool:
    """Whether every block a list names besides its forced current block lies wholly before
    the query's block: the top-k forbids the future blocks of its grid (or every block not
    past), so with the current block forced (`own_block`) the other picks are past blocks."""
    forbid = ir.operand(src.select, "forbid")
    if forbid is None:
        return False
    f = ir.node(forbid)
    if f["op"] == "not":
        forbid = ir.operand(forbid, "0")
        f = ir.node(forbid)
        if f["op"] != "past":
            return False
    elif f["op"] != "future":
        return False
    return f["facts"].get("grid") == f"%{src.grid}" and grid.stride == grid.length


def keys_hold_before_block(ir: IR, nid: int, sel: int) -> bool:
    """Whether key set `nid` holds for every key of a block wholly before the query's block,
    given membership of list `sel`: causal does (j < the block's start <= i), the list's own
    tokens do; other rules (windows, sinks, other lists) are not assumed to."""
    op = ir.node(nid)["op"]
    ops = ir.operands(nid)
    if op == "causal":
        return True
    if op == "tokens":
        return ops.get("blocks") == sel
    if op == "and":
        return all(keys_hold_before_block(ir, x, sel) for x in ops.values())
    if op == "or":
        return any(keys_hold_before_block(ir, x, sel) for x in ops.values())
    return False


HELPER = '''

def _group_by_block(sel, H, NB):
    """Every (query, head, slot) entry of block lists sel [B, T, HS, KS] (-1 padded), sorted
    by the block it names: groups are (batch, head, block), entries inside a group in query
    order. Entry e = ((b * T + t) * H + h) * KS + s. Returns the sorted group ids (NG =
    B * H * NB for an empty slot, last) and the entries in that order (no host sync)."""
    B, T, HS, KS = sel.shape
    NG = B * H * NB
    # the narrowest integers that hold every group id and NG (the padding's): the radix sort
    # makes fewer passes
    narrow = torch.int16 if NG < 2 ** 15 else torch.int32 if NG < 2 ** 31 else torch.int64
    n = B * T * H * KS
    gid = torch.empty(n, device=sel.device, dtype=narrow)
    _group_ids_kernel[(max(1, triton.cdiv(n, 1024)),)](sel, gid, n, T, NB, NG, H=H, HS=HS, KS=KS,
                                                       BE=1024)
    return torch.sort(gid, stable=True)


def _group_bounds(key, NG, BM, n, own=None):
    """Each group's bounds in the sorted ids `key` (`_group_by_block`) and its tiles of BM
    entries (no host sync). With own = (T, L, NB), every query listing its own block first,
    a group's first min(L, T - m L) entries (block m = group % NB: the block's own queries)
    are left out of its tiles. n: at least the entries tiled. Returns the groups' offsets
    and sizes, the tiled entries' offsets and counts (the same tensors without own), each
    group's first tile and each tile's group (NG past the last; `_group_tiles`)."""
    bound = torch.searchsorted(key, torch.arange(NG + 1, device=key.device, dtype=key.dtype))
    return _group_table(bound, NG, BM, n, True, own)


def _group_tiles(gcnt, BM, n):
    """The tiles of BM entries of groups of gcnt entries (n in all, an upper bound of the
    sum): each group's first tile and each tile's group (NG past the last), for a grid of
    n // BM + NG programs at most (no host sync)."""
    return _group_table(gcnt, gcnt.numel(), BM, n, False, None)[4:]


def _group_table(src, NG, BM, n, from_bounds, own):
    """The table kernel's launch: from the groups' NG + 1 bounds in the sorted ids
    (`from_bounds`) or their sizes, what `_group_bounds` returns (offsets and sizes are
    `src` itself when given as sizes)."""
    dev = src.device
    if from_bounds:
        goff, gcnt = (torch.empty(NG, device=dev, dtype=torch.int64) for _ in range(2))
    else:
        goff = gcnt = src
    toff, tcnt = (torch.empty_like(goff), torch.empty_like(goff)) if own else (goff, gcnt)
    first = torch.empty(NG, device=dev, dtype=torch.int64)
    tgroup = torch.empty(max(1, n // BM + min(NG, n)), device=dev, dtype=torch.int32)
    T, L, NBO = own or (0, 0, 1)
    _group_table_kernel[(_table_programs(tgroup.numel()),)](
        src, goff, gcnt, toff, tcnt, first, tgroup, NG, tgroup.numel(), BM, T, L, NBO,
        FROM_BOUNDS=from_bounds, OWN=own is not None, BG=2048, BT=512, num_warps=4)
    return goff, gcnt, toff, tcnt, first, tgroup


_TABLE_PROGRAMS = 1024  # at most: each computes the whole group table (see the kernel)
# dk/dv launched block by block up to this many programs (a short grid, whose tail counts),
# head by head beyond (programs running together share a head's query rows in L2); H100,
# MoBA 512 / top-3, 16 heads: block by block 2.6% faster at 8k (4096 programs), 0.5-1.2%
# slower at 16k to 64k
_BLOCK_MAJOR_PROGRAMS = 4096


def _table_programs(NT):
    """Programs of the table kernel for NT tiles: one a chunk of 512, at most
    _TABLE_PROGRAMS (then each walks several chunks)."""
    return min(triton.cdiv(NT, 512), _TABLE_PROGRAMS)


@triton.jit
def _group_ids_kernel(sel, gid, n, T, NB, NG, H: tl.constexpr, HS: tl.constexpr, KS: tl.constexpr,
                      BE: tl.constexpr):
    """gid[e] = (b * H + h) * NB + sel[b, t, h // (H / HS), s] for entry
    e = ((b * T + t) * H + h) * KS + s, or NG for an empty slot (-1), in gid's integer type."""
    o_e = tl.program_id(0).to(tl.int64) * BE + tl.arange(0, BE)
    m_e = o_e < n
    i_s = o_e % KS
    i_h = (o_e // KS) % H
    i_bt = o_e // (KS * H)  # b * T + t
    blk = tl.load(sel + (i_bt * HS + i_h // (H // HS)) * KS + i_s, mask=m_e, other=-1)
    g = tl.where(blk >= 0, ((i_bt // T) * H + i_h) * NB + blk, NG)
    tl.store(gid + o_e, g.to(gid.dtype.element_ty), mask=m_e)


@triton.jit
def _group_table_kernel(bound, goff, gcnt, toff, tcnt, first, tgroup, NG, NT, BM, T, L, NB,
                        FROM_BOUNDS: tl.constexpr, OWN: tl.constexpr, BG: tl.constexpr,
                        BT: tl.constexpr):
    """Per group: its offset and size (FROM_BOUNDS: from NG + 1 bounds in the sorted ids;
    else its size from gcnt), the entries it tiles (OWN: past its own block's first
    min(L, T - m L) queries, m = group % NB) and the first of its tiles of BM entries. Per
    tile (chunks of BT, every num_programs-th a program): its group, by binary search of the
    groups' first tiles (NG past the last). Every program computes the groups' table (the
    same values, from coalesced loads), so no program waits for another; the host caps the
    programs (`_table_programs`), which bounds that repeated work for many groups."""
    o_c = tl.arange(0, BG)
    done = tl.zeros([BG], dtype=tl.int64)  # tiles of the groups before the chunk
    for g0 in range(0, NG, BG):
        o_g = g0 + o_c
        m_g = o_g < NG
        if FROM_BOUNDS:
            c_off = tl.load(bound + o_g, mask=m_g, other=0)
            c_cnt = tl.load(bound + o_g + 1, mask=m_g, other=0) - c_off
            tl.store(goff + o_g, c_off, mask=m_g)
            tl.store(gcnt + o_g, c_cnt, mask=m_g)
        else:
            c_off = tl.zeros([BG], dtype=tl.int64)
            c_cnt = tl.load(gcnt + o_g, mask=m_g, other=0).to(tl.int64)
        if OWN:
            n_own = tl.minimum(L, T - (o_g % NB) * L).to(tl.int64)
            c_off, c_cnt = c_off + n_own, c_cnt - n_own
            tl.store(toff + o_g, c_off, mask=m_g)
            tl.store(tcnt + o_g, c_cnt, mask=m_g)
        n_t = tl.where(m_g, (c_cnt + BM - 1) // BM, 0)
        tl.store(first + o_g, done + tl.cumsum(n_t, 0) - n_t, mask=m_g)
        done += tl.sum(n_t, 0)
    tl.debug_barrier()  # this program's stores of `first` are visible to its threads
    # tile t < (all tiles) lies in the last group whose first tile is at most t: the number
    # of groups whose first tile is at most t, less one
    steps = 1
    while (NG >> steps) > 0:
        steps += 1
    for t0 in range(tl.program_id(0) * BT, NT, tl.num_programs(0) * BT):
        o_t = t0 + tl.arange(0, BT)
        lo = tl.zeros([BT], dtype=tl.int32)
        hi = lo + NG
        for _ in range(steps):
            act = lo < hi
            mid = (lo + hi) // 2
            right = act & (tl.load(first + mid, mask=act, other=0) <= o_t)
            lo, hi = tl.where(right, mid + 1, lo), tl.where(act & ~right, mid, hi)
        tl.store(tgroup + o_t, tl.where(o_t < tl.max(done, 0), lo - 1, NG), mask=o_t < NT)


@triton.jit
def _rowdot_kernel(a, b, out, N, DV: tl.constexpr, BDV: tl.constexpr, BR: tl.constexpr):
    """out[r] = sum_d a[r, d] * b[r, d] in out's dtype (float32, or float64 for float64
    inputs), for N contiguous rows of DV."""
    o_row = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    o_d = tl.arange(0, BDV)
    m = (o_row < N)[:, None] & (o_d < DV)[None, :]
    p = o_row[:, None] * DV + o_d[None, :]
    b_a = tl.load(a + p, mask=m, other=0.).to(out.dtype.element_ty)
    b_b = tl.load(b + p, mask=m, other=0.).to(out.dtype.element_ty)
    tl.store(out + o_row, tl.sum(b_a * b_b, 1), mask=o_row < N)


def _grouped_config(q, kernel, tuned):
    """Tile sizes (entries or queries BM, keys BN), warps, pipeline stages, a register cap
    (maxnreg, 0: none) and persistent programs an SM (0: a program a tile; the forward and dq
    kernels only) of a grouped kernel ('fwd', 'own', 'dq' or 'dkdv'), read at each call:
    SPARSEDSL_GROUPED (forward), SPARSEDSL_GROUPED_OWN (own-block forward),
    SPARSEDSL_GROUPED_DQ, SPARSEDSL_GROUPED_DKDV = "BM,BN,WARPS,STAGES[,MAXNREG[,PROGRAMS]]"
    (knobs: `_knob`) override."""
    env = _env_tiles({'fwd': 'SPARSEDSL_GROUPED', 'own': 'SPARSEDSL_GROUPED_OWN',
                      'dq': 'SPARSEDSL_GROUPED_DQ', 'dkdv': 'SPARSEDSL_GROUPED_DKDV'}[kernel],
                     "grouped tile sizes", tuned, regs=True)
    if env:
        return env
    if q.is_cuda and q.shape[-1] > 64:  # H100, bf16, D = 128, MoBA at 64k (docs/perf-notes.md)
        # the forward: three persistent programs an SM (168 registers) walk the tiles,
        # reading key tiles through tensor descriptors 3 stages deep (kernel 2.09 -> 1.66
        # ms); dq and the own block capped at 168 registers with one or two stages: three
        # programs an SM instead of two (dq's key tiles through descriptors too: 4.14 -> 3.52)
        return {'fwd': (64, 32, 4, 3, 168, 3), 'own': (64, 64, 4, 1, 168, 0),
                'dq': (64, 32, 4, 2, 168, 0), 'dkdv': (128, 32, 4, 2, 0, 0)}[kernel]
    if q.is_cuda:
        return 64, 64, 4, 3, 0, (2 if kernel == 'fwd' else 0)
    # Triton's interpreter: small tiles run fastest; a few persistent programs, each walking
    # several tiles
    return 16, 16, 1, 1, 0, (1 if kernel in ('fwd', 'dq') else 0)


_SMS = {}  # device -> its multiprocessor count


def _grouped_programs(q, P, NT):
    """The grid of a persistent grouped kernel over NT tile slots: P programs an SM (4 SMs
    in the interpreter), at most NT; 0: one program a slot."""
    if not P:
        return max(1, NT)
    sms = _SMS.get(q.device)
    if sms is None:
        sms = _SMS[q.device] = (torch.cuda.get_device_properties(q.device).multi_processor_count
                                if q.is_cuda else 4)
    return max(1, min(NT, P * sms))


def _launch(W, S, R):
    """num_warps, num_stages and, when R, maxnreg (a register cap) as launch options."""
    return dict(num_warps=W, num_stages=S, **({'maxnreg': R} if R else {}))
'''


class GroupedEmitter:
    """Kernels and host code of a grouped final attention stage."""

    # a tile's rows after the walk (running max b_m and sum b_l in log2 units, b_acc): their
    # output, and their log-sum-exp in natural log (-inf for a row that attended nothing)
    NORMED = "b_o = tl.where(b_l[:, None] > 0, b_acc / tl.where(b_l > 0, b_l, 1.)[:, None], 0.)"
    LSE = "tl.where(b_l > 0, (b_m + tl.log2(tl.where(b_l > 0, b_l, 1.))) / L2E, float('-inf'))"

    def __init__(self, ir: IR, plan: KernelPlan, ex, st: AttendStage, src: BlockList):
        self.ir, self.plan, self.st, self.src = ir, plan, st, src
        self.grid = plan.grids[src.grid]
        self.sel = src.select
        # a query's own block by tiles of contiguous queries (no partial, no combine kernel)
        self.own = own_block(ir, self.grid, src)
        br = st.groups[0][0]
        self.branch = br
        # the forward's tiles (the other picks) attend past blocks whole: no bounds, no masks
        # but a partial last chunk (MoBA's)
        self.past = (self.own and picks_past_blocks(ir, self.grid, src)
                     and keys_hold_before_block(ir, ir.operand(br.node, "keys"), self.sel))
        # the branch's mask, the grouped list's membership known to hold
        self.mask = ex.with_given({self.sel}).keys(ir.operand(br.node, "keys"), "I", "J")
        self.scale = br.node
        self.lists = {self.sel}
        self.nbs = {src.grid}
        # inner ranges in the kernels' names (NB: this grid's block count); a range that
        # reads another grid's count is not used (it is an under-approximation anyway)
        self.full = [(self._nb(f.lo), self._nb(f.hi)) for f in br.full
                     if _nbs_in(f.lo, f.hi) <= {src.grid}]

    def _nb(self, expr: str) -> str:
        return re.sub(rf"\bNB{self.grid.node}\b", "NB", _tl(expr))

    # ------------------------------------------------------------------ kernels
    def _rows(self, c: list, ind: str, past: bool = False) -> None:
        """The program's tile i_x, one of the real tiles (`_persistent`): entries [e0, e1) of
        one group; rows are their queries. With `past`, the block lies wholly before every
        query of the tile (`self.past`): its keys are [j_lo, j_hi), all attended."""
        c += [
            f"{ind}i_g = tl.load(tgroup + i_x)",
            f"{ind}i_n = i_g % NB  # the key block",
            f"{ind}i_h = (i_g // NB) % H",
            f"{ind}i_b = i_g // (NB * H)",
            f"{ind}i_hk = i_h // G",
            f"{ind}e0 = tl.load(goff + i_g) + (i_x - tl.load(toff + i_g)) * BM",
            f"{ind}e1 = tl.load(goff + i_g) + tl.load(gcnt + i_g)",
            f"{ind}o_e = e0 + tl.arange(0, BM)",
            f"{ind}m_r = o_e < e1",
            f"{ind}o_ent = tl.load(order + o_e, mask=m_r, other=0)  # [BM] entries",
            f"{ind}o_i = ((o_ent // (H * KS)) % T).to(tl.int32)  # [BM] query positions",
        ]
        if not past:
            self._bounds(c, ind)
            return
        L, S = self.grid.length, self.grid.stride
        c += self._row_ids(ind) + [
            f"{ind}j_lo = i_n * {S}",
            f"{ind}j_hi = j_lo + {L}  # a past block: whole, before every query (and T)",
        ]

    @staticmethod
    def _row_ids(ind: str) -> list:
        """I (the query positions as a column) and p_row, the tile's rows of q and o."""
        return [f"{ind}I = o_i[:, None]",
                f"{ind}p_row = (i_b * T + o_i).to(tl.int64) * H + i_h  # [BM] rows of q, o"]

    def _bounds(self, c: list, ind: str) -> None:
        """From the tile's query positions o_i (valid where m_r) of block i_n: its rows, the
        keys it walks [j_lo, j_hi) and the run of them it attends in full [fa, fb)."""
        L, S = self.grid.length, self.grid.stride
        c += self._row_ids(ind) + [
            f"{ind}i_lo = tl.min(tl.where(m_r, o_i, T), 0)  # the tile's first query",
            f"{ind}i_hi = tl.max(tl.where(m_r, o_i, -1), 0) + 1  # past its last",
            f"{ind}j_lo = i_n * {S}",
            f"{ind}# keys of the block up to the tile's last query (causality is proved)",
            f"{ind}j_hi = tl.minimum(tl.minimum(j_lo + {L}, T), i_hi)",
        ]
        self._full_chunks(c, ind)

    def _full_chunks(self, c: list, ind: str) -> None:
        """fa, fb: the run of key chunks from j_lo that every query of the tile attends (the
        widest inner range within [j_lo, j_hi), rounded inward to whole chunks); empty at j_lo
        when there is none."""
        c.append(f"{ind}# the block's keys every query of the tile attends: no masks there")
        if not self.full:
            c += [f"{ind}fa = j_lo", f"{ind}fb = j_lo"]
            return
        for fi, (lo, hi) in enumerate(self.full):
            a, b = ("fl", "fh") if fi == 0 else ("f_a", "f_b")
            c += [f"{ind}{a} = tl.maximum({lo}, j_lo)", f"{ind}{b} = tl.minimum({hi}, j_hi)"]
            if fi:
                c += [f"{ind}f_w = f_b - f_a > fh - fl", f"{ind}fl = tl.where(f_w, f_a, fl)",
                      f"{ind}fh = tl.where(f_w, f_b, fh)"]
        c += [
            f"{ind}fl = j_lo + (fl - j_lo + BN - 1) // BN * BN  # (fl >= j_lo already)",
            f"{ind}fh = j_lo + (tl.maximum(fh, j_lo) - j_lo) // BN * BN",
            f"{ind}fa = tl.where(fh > fl, fl, j_lo)",
            f"{ind}fb = tl.where(fh > fl, fh, j_lo)",
        ]

    @staticmethod
    def _runs(c: list, ind: str, var: str, lo: str, fa: str, fb: str, hi: str, step: str,
              body) -> None:
        """The loops over [lo, hi) in steps: masked edge runs around the unmasked [fa, fb);
        body(indent, unmasked) gives each loop's lines."""
        for a, b, unmasked in ((lo, fa, False), (fa, fb, True), (fb, hi, False)):
            c.append(f"{ind}for {var} in range({a}, {b}, {step}):"
                     + ("  # full: no masks" if unmasked else "  # edge: masked"))
            c += body(ind + "    ", unmasked)

    def _head(self, name: str, args: str, doc: str) -> list:
        return ["", "@triton.jit", f"def attend_{self.st.name}_{name}_kernel(",
                f"    {args},", "):", f'    """{doc}"""']

    @staticmethod
    def _q_tile(ind: str) -> list:
        """The head dims' offsets and masks, and b_q: the tile's query rows p_row (mask m_r)."""
        return [
            f"{ind}o_d = tl.arange(0, BD)",
            f"{ind}m_d = o_d < D",
            f"{ind}o_dv = tl.arange(0, BDV)",
            f"{ind}m_dv = o_dv < DV",
            f"{ind}b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_r[:, None] & "
            f"m_d[None, :], other=0.)  # [BM, BD]",
        ]

    def _attend_block(self, c: list, ind: str, tma: bool = False, past: bool = False) -> None:
        """The tile's rows (o_i, mask m_r, rows p_row) attended to keys [j_lo, j_hi) of the
        block: b_m, b_l, b_acc (log2 units) after the walk, in three runs (masked edges
        around the full chunks [fa, fb)); with `tma`, key tiles through kd, vd when TMA. With
        `past` (a past block, `_rows`), its whole chunks unmasked and a partial last one
        masked, which a block of whole chunks compiles out."""
        c += self._q_tile(ind) + [
            f"{ind}{L2E_DEF}",
            f"{ind}b_m = tl.full([BM], float('-inf'), tl.float32)",
            f"{ind}b_l = tl.zeros([BM], dtype=tl.float32)",
            f"{ind}b_acc = tl.zeros([BM, BDV], dtype=tl.float32)",
        ]

        def step(ind2, unmasked):
            m_use = "m_new" if unmasked else "m_use"
            return self._scores(ind2, unmasked, tma) + ([] if unmasked else [
                f"{ind2}b_s = tl.where(m_a, b_s, float('-inf'))"]) + [
                f"{ind2}m_new = tl.maximum(b_m, tl.max(b_s, 1))",
                *([] if unmasked else [
                    f"{ind2}m_use = tl.where(m_new == float('-inf'), 0., m_new)"]),
                f"{ind2}b_alpha = tl.exp2(b_m - {m_use})",
                f"{ind2}b_p = tl.exp2(b_s - {m_use}[:, None])  # [BM, BN]",
                f"{ind2}b_l = b_l * b_alpha + tl.sum(b_p, 1)",
                f"{ind2}b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, "
                f"input_precision='ieee' if IEEE else 'tf32')",
                f"{ind2}b_m = m_new",
            ]
        if not past:
            self._runs(c, ind, "j0", "j_lo", "fa", "fb", "j_hi", "BN", step)
            return
        L = self.grid.length
        c.append(f"{ind}for j0 in range(j_lo, j_lo + {L} // BN * BN, BN):  # full: no masks")
        c += step(ind + "    ", True)
        c.append(f"{ind}if {L} % BN != 0:  # (a constant) the block's last, partial chunk")
        c.append(f"{ind}    for j0 in range(j_lo + {L} // BN * BN, j_hi, BN):  # edge: masked")
        c += step(ind + "        ", False)

    def _emit_own(self, consts: str) -> str:
        """The own-block kernel: a query's own block (its list's first slot, the forced
        current block) by tiles of BM contiguous queries of one head, then the row's other
        listed blocks merged in from their partials; writes o (and, with SAVE, the row's
        log-sum-exp). It replaces the combine kernel, and the own block's entries get no
        partial output."""
        L, S = self.grid.length, self.grid.stride
        ind = "    "
        c = self._head("own", f"q, k, v, po, pl, sel, o, lsave, scale, T, NB, {consts}, "
                       f"HS: tl.constexpr, SAVE: tl.constexpr",
                       f"Attention `{self.st.name}` over each query's own block (the forced "
                       f"current block, first in its list) by tiles of BM contiguous queries, "
                       f"merged by log-sum-exp with the partial outputs of the row's other "
                       f"listed blocks (po, pl: KS - 1 a row): writes o, and with SAVE the "
                       f"row's log-sum-exp.")
        c += [
            f"{ind}i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)",
            f"{ind}i_n = i_t // (({L} + BM - 1) // BM)  # the block the tile lies in",
            f"{ind}o_r = i_t % (({L} + BM - 1) // BM) * BM + tl.arange(0, BM)  # [BM] offsets "
            f"in it",
            f"{ind}o_i = i_n * {S} + o_r  # [BM] query positions",
            f"{ind}m_r = (o_r < {L}) & (o_i < T)",
            f"{ind}i_hk = i_h // G",
        ]
        self._bounds(c, ind)
        self._attend_block(c, ind)
        c += [
            f"{ind}# the row's other listed blocks: merge their partials (o, lse) in",
            f"{ind}p_sel = sel + ((i_b * T + o_i).to(tl.int64) * HS + i_h // (H // HS)) * KS",
            f"{ind}for s in range(1, KS):",
            f"{ind}    m_s = m_r & (tl.load(p_sel + s, mask=m_r, other=-1) >= 0)",
            f"{ind}    o_pe = p_row * (KS - 1) + s - 1  # [BM] the entries' partials",
            f"{ind}    b_pl = tl.load(pl + o_pe, mask=m_s, other=float('-inf')) * L2E  # log2 "
            f"units",
            f"{ind}    b_po = tl.load(po + o_pe[:, None] * DV + o_dv[None, :], mask=m_s[:, None] "
            f"& m_dv[None, :], other=0.).to(tl.float32)",
            f"{ind}    m_new = tl.maximum(b_m, b_pl)",
            f"{ind}    m_use = tl.where(m_new == float('-inf'), 0., m_new)",
            f"{ind}    b_alpha = tl.exp2(b_m - m_use)",
            f"{ind}    b_beta = tl.exp2(b_pl - m_use)  # the partial's weight (its own sum is 1)",
            f"{ind}    b_l = b_l * b_alpha + b_beta",
            f"{ind}    b_acc = b_acc * b_alpha[:, None] + b_beta[:, None] * b_po",
            f"{ind}    b_m = m_new",
            f"{ind}{self.NORMED}",
            f"{ind}tl.store(o + p_row[:, None] * DV + o_dv[None, :], b_o.to(o.dtype.element_ty), "
            f"mask=m_r[:, None] & m_dv[None, :])",
            f"{ind}if SAVE:",
            f"{ind}    tl.store(lsave + p_row, {self.LSE}, mask=m_r)  # natural log",
        ]
        return "\n".join(c) + "\n"

    def emit_fwd(self) -> list[str]:
        consts = ("H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, KS, D: tl.constexpr, "
                  "DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, "
                  "BN: tl.constexpr, IEEE: tl.constexpr")
        which = "other than its own" if self.own else "that"
        c = self._head("fwd", f"q, k, v, kd, vd, po, pl, order, goff, gcnt, toff, tgroup, scale, "
                       f"T, NG, NB, {consts}, TMA: tl.constexpr",
                       f"Attention `{self.st.name}` grouped by selected block: for each tile of "
                       f"up to BM entries {which} chose one block, each entry's output and "
                       f"log-sum-exp over that block's keys (po [E, DV], pl [E]); key tiles "
                       f"through the descriptors kd, vd when TMA.")
        ind = self._persistent(c, "    ")
        self._rows(c, ind, self.past)
        self._attend_block(c, ind, tma=True, past=self.past)
        pe = "o_ent"
        if self.own:  # entries of slots 1 .. KS - 1 only: partials stored KS - 1 a row
            pe = "o_pe"
            c.append(f"{ind}o_pe = o_ent - o_ent // KS - 1  # (row, slot s) -> row * (KS - 1) "
                     f"+ s - 1")
        c += [
            f"{ind}{self.NORMED}",
            f"{ind}tl.store(po + {pe}.to(tl.int64)[:, None] * DV + o_dv[None, :], "
            f"b_o.to(po.dtype.element_ty), mask=m_r[:, None] & m_dv[None, :])",
            f"{ind}tl.store(pl + {pe}, {self.LSE}, mask=m_r)  # natural log",
        ]
        fwd = "\n".join(c) + "\n"
        if self.own:
            return [fwd, self._emit_own(consts)]
        ind = "    "
        c = self._head("combine", "po, pl, sel, o, lsave, N, H: tl.constexpr, "
                        "HS: tl.constexpr, KS, KSP: tl.constexpr, DV: tl.constexpr, "
                        "BDV: tl.constexpr, BR: tl.constexpr, SAVE: tl.constexpr",
                        f"Merges each (query, head) row's partial outputs of `{self.st.name}` "
                        f"(one per listed block) by their log-sum-exp; with SAVE also writes the "
                        f"row's log-sum-exp for the backward (which reads o itself).")
        c += [
            f"{ind}o_row = tl.program_id(0) * BR + tl.arange(0, BR)  # [BR] (b, t, h) rows",
            f"{ind}m_row = o_row < N",
            f"{ind}o_row = o_row.to(tl.int64)",
            f"{ind}o_s = tl.arange(0, KSP)",
            f"{ind}o_dv = tl.arange(0, BDV)",
            f"{ind}m_dv = o_dv < DV",
            f"{ind}p_sel = sel + ((o_row // H) * HS + (o_row % H) // (H // HS))[:, None] * KS "
            f"+ o_s[None, :]",
            f"{ind}m_s = m_row[:, None] & (o_s[None, :] < KS)",
            f"{ind}b_n = tl.load(p_sel, mask=m_s, other=-1)  # [BR, KSP] listed blocks",
            f"{ind}m_s = m_s & (b_n >= 0)",
            f"{ind}o_ent = o_row[:, None] * KS + o_s[None, :]",
            f"{ind}b_lse = tl.load(pl + o_ent, mask=m_s, other=float('-inf'))",
            f"{ind}b_max = tl.max(b_lse, 1)",
            f"{ind}b_use = tl.where(b_max == float('-inf'), 0., b_max)",
            f"{ind}b_w = tl.where(m_s, tl.exp(b_lse - b_use[:, None]), 0.)  # [BR, KSP]",
            f"{ind}b_sum = tl.sum(b_w, 1)",
            f"{ind}b_o = tl.zeros([BR, BDV], dtype=tl.float32)",
            f"{ind}for s in range(0, KS):",
            f"{ind}    m_1 = m_s & (o_s[None, :] == s)",
            f"{ind}    w_1 = tl.sum(tl.where(m_1, b_w, 0.), 1)  # [BR]",
            f"{ind}    m_1r = tl.sum(m_1.to(tl.int32), 1) > 0",
            f"{ind}    b_p = tl.load(po + (o_row * KS + s)[:, None] * DV + o_dv[None, :], "
            f"mask=m_1r[:, None] & m_dv[None, :], other=0.).to(tl.float32)",
            f"{ind}    b_o += w_1[:, None] * b_p",
            f"{ind}b_o = tl.where(b_sum[:, None] > 0, b_o / tl.where(b_sum > 0, b_sum, 1.)"
            f"[:, None], 0.)",
            f"{ind}tl.store(o + o_row[:, None] * DV + o_dv[None, :], b_o.to(o.dtype.element_ty), "
            f"mask=m_row[:, None] & m_dv[None, :])",
            f"{ind}if SAVE:",
            f"{ind}    tl.store(lsave + o_row, tl.where(b_sum > 0, b_use + tl.log(tl.where("
            f"b_sum > 0, b_sum, 1.)), float('-inf')), mask=m_row)",
        ]
        return [fwd, "\n".join(c) + "\n"]

    def _scores(self, ind: str, unmasked: bool, tma: bool = False) -> list:
        """One key chunk [j0, j0 + BN) of the block: k, v and the scores; with their mask m_a
        unless the chunk is full (every key valid and attended by every row: a padded row
        reads q = 0 and is never stored). With `tma`, k and v through kd, vd when TMA."""
        return [
            f"{ind}o_j = j0 + tl.arange(0, BN)",
            *([] if unmasked else [f"{ind}J = o_j[None, :]  # [1, BN]", f"{ind}m_k = o_j < j_hi"]),
            *(self._tma_kv(ind, unmasked) if tma else self._load_kv(ind, unmasked)),
            f"{ind}b_s = tl.dot(b_q, tl.trans(b_k), input_precision='ieee' if IEEE else "
            f"'tf32') * (scale * L2E)  # [BM, BN] log2 units",
            *([] if unmasked else [f"{ind}m_a = m_r[:, None] & m_k[None, :] & {self.mask}"]),
        ]

    def emit_bwd(self) -> list[str]:
        consts = ("H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, KS, D: tl.constexpr, "
                  "DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, "
                  "BN: tl.constexpr, IEEE: tl.constexpr")
        c = self._head("bwd_dq", f"q, k, v, kd, vd, do, dq, lse, delta, order, goff, gcnt, toff, "
                       f"tgroup, scale, T, NG, NB, {consts}, TMA: tl.constexpr",
                       f"Backward of `{self.st.name}`, grouped: dq of each tile's queries over "
                       f"the block's keys, added atomically (a query gets one add per listed "
                       f"block): not deterministic. Key tiles through kd, vd when TMA.")
        ind = self._persistent(c, "    ")
        self._rows(c, ind)
        c += self._q_tile(ind)
        c += [f"{ind}{L2E_DEF}"]
        c += self._bwd_rows(ind)
        c += [f"{ind}b_dq = tl.zeros([BM, BD], dtype=tl.float32)"]
        self._runs(c, ind, "j0", "j_lo", "fa", "fb", "j_hi", "BN", lambda ind2, unmasked: [
            *self._scores(ind2, unmasked, tma=True), *self._grads(ind2, unmasked),
            f"{ind2}b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision='ieee' if IEEE "
            f"else 'tf32')"])
        c += [  # scaled once (the product adds into the accumulator in place)
            f"{ind}tl.atomic_add(dq + p_row[:, None] * D + o_d[None, :], b_dq * scale, "
            f"mask=m_r[:, None] & m_d[None, :], sem='relaxed')",
        ]
        dq = "\n".join(c) + "\n"
        ind, ind2 = "    ", "        "
        L, S = self.grid.length, self.grid.stride
        c = self._head("bwd_dkdv", f"q, k, v, do, dk, dv, lse, delta, order, goff, gcnt, "
                        f"scale, T, NG, NB, {consts}, STORE: tl.constexpr, "
                        f"BLOCK_MAJOR: tl.constexpr",
                        f"Backward of `{self.st.name}`, grouped: dk, dv of BN keys of one "
                        f"group's block, accumulated over the group's queries in registers and "
                        f"added once (the heads of a GQA group share kv: atomic adds), or "
                        f"stored in dk's dtype when STORE (this program is the keys' only "
                        f"writer: one head per kv head, blocks that do not overlap).")
        c += [
            f"{ind}# a group's key chunks are neighbouring programs: they read its query rows",
            f"{ind}# together (from L2)",
            f"{ind}i_x = tl.program_id(0) // (({L} + BN - 1) // BN)",
            f"{ind}i_c = tl.program_id(0) % (({L} + BN - 1) // BN)",
            f"{ind}if BLOCK_MAJOR:  # groups block by block, every head's first block first:",
            f"{ind}    # under causal routing the early blocks have the most choosers, so the",
            f"{ind}    # longest programs start first and short ones fill the tail",
            f"{ind}    i_n = i_x // (NG // NB)  # the key block",
            f"{ind}    i_g = (i_x % (NG // NB)) * NB + i_n",
            f"{ind}else:  # head by head: programs running together share a head's query rows",
            f"{ind}    i_g = i_x",
            f"{ind}    i_n = i_g % NB  # the key block",
            f"{ind}i_h = (i_g // NB) % H",
            f"{ind}i_b = i_g // (NB * H)",
            f"{ind}i_hk = i_h // G",
            f"{ind}o_d = tl.arange(0, BD)",
            f"{ind}m_d = o_d < D",
            f"{ind}o_dv = tl.arange(0, BDV)",
            f"{ind}m_dv = o_dv < DV",
            f"{ind}o_j = i_n * {S} + i_c * BN + tl.arange(0, BN)  # [BN] keys",
            f"{ind}J = o_j[None, :]",
            f"{ind}m_k = (i_c * BN + tl.arange(0, BN) < {L}) & (o_j < T)",
            *self._load_kv(ind),
            f"{ind}{L2E_DEF}",
            f"{ind}b_dk = tl.zeros([BN, BD], dtype=tl.float32)",
            f"{ind}b_dv = tl.zeros([BN, BDV], dtype=tl.float32)",
            f"{ind}e_lo = tl.load(goff + i_g)",
            f"{ind}e_hi = e_lo + tl.load(gcnt + i_g)",
            f"{ind}# the group's tiles of BM entries (queries ascending) that end before the",
            f"{ind}# chunk's first key see none of its keys (causality is proved): the walk",
            f"{ind}# starts at the first other tile, e_a (a bisection over tiles: few loads)",
            f"{ind}j_c = i_n * {S} + i_c * BN",
            f"{ind}n_t = (e_hi - e_lo + BM - 1) // BM",
        ]
        self._tile_bisect(c, ind, "t_a", "e_lo", "i_hi > j_c")
        c.append(f"{ind}e_a = e_lo + t_a * BM")
        self._full_tiles(c, ind, f"(i_c * BN + BN <= {L}) & (j_c + BN <= T)")

        def step(ind2, unmasked):
            return [
                f"{ind2}o_e = e0 + tl.arange(0, BM)",
                f"{ind2}m_r = o_e < e_hi",
                f"{ind2}o_ent = tl.load(order + o_e, mask=m_r, other=0)",
                f"{ind2}o_i = ((o_ent // (H * KS)) % T).to(tl.int32)",
                *([] if unmasked else [f"{ind2}I = o_i[:, None]"]),
                f"{ind2}p_row = (i_b * T + o_i).to(tl.int64) * H + i_h",
                f"{ind2}b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_r[:, None] & "
                f"m_d[None, :], other=0.)  # [BM, BD]",
                *self._bwd_rows(ind2),
                f"{ind2}b_s = tl.dot(b_q, tl.trans(b_k), input_precision='ieee' if IEEE else "
                f"'tf32') * (scale * L2E)  # [BM, BN] log2 units",
                *([] if unmasked else [f"{ind2}m_a = m_r[:, None] & m_k[None, :] & {self.mask}"]),
                *self._grads(ind2, unmasked),
                f"{ind2}b_dv += tl.dot(tl.trans(b_p).to(b_do.dtype), b_do, input_precision="
                f"'ieee' if IEEE else 'tf32')",
                f"{ind2}b_dk += tl.dot(tl.trans(b_ds).to(b_q.dtype), b_q, input_precision="
                f"'ieee' if IEEE else 'tf32')",
            ]
        self._runs(c, ind, "e0", "e_a", "ea", "eb", "e_hi", "BM", step)
        c += [
            f"{ind}b_dk = b_dk * scale  # dk = scale ds^T q, once",
            f"{ind}if STORE:  # every key of the chunk (zeros if no query chose the block)",
            f"{ind2}tl.store(dk + p_kv[:, None] * D + o_d[None, :], "
            f"b_dk.to(dk.dtype.element_ty), mask=m_k[:, None] & m_d[None, :])",
            f"{ind2}tl.store(dv + p_kv[:, None] * DV + o_dv[None, :], "
            f"b_dv.to(dv.dtype.element_ty), mask=m_k[:, None] & m_dv[None, :])",
            f"{ind}else:",
            f"{ind2}m_w = m_k & (e_hi > e_lo)",
            f"{ind2}tl.atomic_add(dk + p_kv[:, None] * D + o_d[None, :], b_dk, "
            f"mask=m_w[:, None] & m_d[None, :], sem='relaxed')",
            f"{ind2}tl.atomic_add(dv + p_kv[:, None] * DV + o_dv[None, :], b_dv, "
            f"mask=m_w[:, None] & m_dv[None, :], sem='relaxed')",
        ]
        return [dq, "\n".join(c) + "\n"]

    def _full_tiles(self, c: list, ind: str, keys_ok: str) -> None:
        """ea, eb: the run of entry tiles (BM entries from e_a) whose queries all attend every
        key of the chunk j_c + [0, BN), found by bisection on the inner ranges' bounds (the
        tiles' queries grow along the group, and the bounds with them); none unless
        `keys_ok` (the chunk's keys are all valid)."""
        c.append(f"{ind}# the entry tiles from e_a whose queries attend every key of the chunk: "
                 f"no masks")
        if not self.full:
            c += [f"{ind}ea = e_a", f"{ind}eb = e_a"]
            return
        c.append(f"{ind}n_t = (e_hi - e_a + BM - 1) // BM")
        for fi, (lo, hi) in enumerate(self.full):
            self._tile_bisect(c, ind, "t_lo", "e_a", f"{hi} >= j_c + BN")
            self._tile_bisect(c, ind, "t_hi", "e_a", f"{lo} > j_c")
            if fi == 0:
                c += [f"{ind}f_lo = t_lo", f"{ind}f_hi = t_hi"]
            else:
                c += [f"{ind}f_w = t_hi - t_lo > f_hi - f_lo",
                      f"{ind}f_lo = tl.where(f_w, t_lo, f_lo)",
                      f"{ind}f_hi = tl.where(f_w, t_hi, f_hi)"]
        c += [f"{ind}f_ok = (f_hi > f_lo) & {keys_ok}",
              f"{ind}ea = tl.where(f_ok, e_a + f_lo * BM, e_a)",
              f"{ind}eb = tl.where(f_ok, e_a + f_hi * BM, e_a)"]

    @staticmethod
    def _tile_bisect(c: list, ind: str, var: str, first: str, pred: str) -> None:
        """var = the first of the n_t entry tiles (BM entries from `first`, queries ascending
        along the group) for which pred holds, n_t if none (pred is false, then true). pred
        reads the tile's first query i_lo and its end i_hi, loaded only where it reads them;
        a pred that reads neither is the same for every tile (no loop)."""
        if not re.search(r"\bi_(lo|hi)\b", pred):
            c.append(f"{ind}{var} = tl.where({pred}, n_t * 0, n_t)")
            return
        ind2 = ind + "    "
        bounds = {
            "i_lo": "((tl.load(order + t_e) // (H * KS)) % T).to(tl.int32)",
            "i_hi": "((tl.load(order + tl.minimum(t_e + BM, e_hi) - 1) // (H * KS)) % T)"
                    ".to(tl.int32) + 1"}
        c += [f"{ind}{var} = n_t * 0", f"{ind}t_b = n_t", f"{ind}while {var} < t_b:",
              f"{ind2}t_m = ({var} + t_b) // 2",
              f"{ind2}t_e = {first} + t_m * BM",
              *(f"{ind2}{x} = {e}" for x, e in bounds.items() if re.search(rf"\b{x}\b", pred)),
              f"{ind2}t_ok = {pred}",
              f"{ind2}t_b = tl.where(t_ok, t_m, t_b)",
              f"{ind2}{var} = tl.where(t_ok, {var}, t_m + 1)"]

    @staticmethod
    def _load_kv(ind: str, unmasked: bool = False) -> list:
        """The keys o_j (mask m_k, none in a full chunk) of the kv head: their k and v rows."""
        m_k = "" if unmasked else "m_k[:, None] & "
        return [
            f"{ind}p_kv = (i_b * T + o_j).to(tl.int64) * HKV + i_hk  # [BN]",
            f"{ind}b_k = tl.load(k + p_kv[:, None] * D + o_d[None, :], mask={m_k}"
            f"m_d[None, :], other=0.)  # [BN, BD]",
            f"{ind}b_v = tl.load(v + p_kv[:, None] * DV + o_dv[None, :], mask={m_k}"
            f"m_dv[None, :], other=0.)  # [BN, BDV]",
        ]

    def _tma_kv(self, ind: str, unmasked: bool) -> list:
        """k and v of the keys o_j as one bulk copy each through the descriptors kd, vd when
        TMA (rows past T read as zeros; a masked key's score is -inf, so its v row gets p =
        0), else `_load_kv`'s loads."""
        head, loads = TMA_KV
        return [f"{ind}{head}", *(f"{ind}    {x}" for x in loads), f"{ind}else:",
                *self._load_kv(ind + "    ", unmasked)]

    @staticmethod
    def _persistent(c: list, ind: str) -> str:
        """The persistent loop of the forward and dq kernels: program p walks tiles p,
        p + num_programs, ... of the n_t real tiles (group g's first[g] = toff[g] onwards:
        up to the last group's end; later slots of tgroup are padding). Returns the body's
        indent."""
        c += [
            f"{ind}# persistent: program p walks tiles p, p + P, ... (a grid of one program a",
            f"{ind}# tile slot walks one); slots past the last group's tiles are padding",
            f"{ind}n_t = (tl.load(toff + NG - 1) + (tl.load(gcnt + NG - 1) + BM - 1) // BM)"
            f".to(tl.int32)",
            f"{ind}for i_x in tl.range(tl.program_id(0), n_t, tl.num_programs(0)):",
        ]
        return ind + "    "

    def _bwd_rows(self, ind: str) -> list:
        """What the backward reads per query row: dO, the row's lse (and times log2 e) and
        delta = sum(dO * O)."""
        return [
            f"{ind}b_do = tl.load(do + p_row[:, None] * DV + o_dv[None, :], mask=m_r[:, None] & "
            f"m_dv[None, :], other=0.)  # [BM, BDV]",
            f"{ind}b_lse = tl.load(lse + p_row, mask=m_r, other=float('inf'))  # a padded row: "
            f"p = 0",
            f"{ind}b_l2 = b_lse * L2E  # in log2 units",
            f"{ind}b_delta = tl.load(delta + p_row, mask=m_r, other=0.)",
        ]

    def _grads(self, ind: str, unmasked: bool) -> list:
        """p from the saved lse (masked by m_a unless the chunk is full), dp = dO v^T,
        ds = p (dp - delta)."""
        return [
            *([f"{ind}b_p = tl.exp2(b_s - b_l2[:, None])  # [BM, BN]"] if unmasked else [
                f"{ind}m_a = m_a & (b_lse > float('-inf'))[:, None]",
                f"{ind}b_p = tl.where(m_a, tl.exp2(b_s - b_l2[:, None]), 0.)  # [BM, BN]"]),
            f"{ind}b_dp = tl.dot(b_do, tl.trans(b_v), input_precision='ieee' if IEEE else "
            f"'tf32')",
            f"{ind}b_ds = b_p * (b_dp - b_delta[:, None])",
        ]

    # ------------------------------------------------------------------- host code
    def _common(self, scale: str) -> str:
        return (f"{scale}, T, NG, NB{self.grid.node}, H=H, HKV=HKV, G=G, KS=KS{self.sel}, D=D, "
                f"DV=DV, BD=BD, BDV=BDV")

    def host_fwd(self, c, scale: str) -> None:
        s, nb, name = self.sel, f"NB{self.grid.node}", self.st.name
        c(f"# attend `{name}`: grouped by selected block"
          + ("; each query's own block by tiles of contiguous queries" if self.own else ""))
        c("GBM, GBN, GW, GS, GR, GP = _grouped_config(q, 'fwd', tuned)  # (SPARSEDSL_GROUPED)")
        c(f"NG = B * H * {nb}")
        c(f"gkey, gorder = _group_by_block(sel{s}, H, {nb})")
        if self.own:
            L = self.grid.length
            c(f"# a group's first entries are its own block's queries (slot 0): tiles of the "
              f"others")
            c(f"ggoff, ggcnt, gpoff, gpcnt, gtoff, gtgroup = _group_bounds(gkey, NG, GBM, "
              f"B * T * H * (KS{s} - 1), own=(T, {L}, {nb}))")
            offs, cnts, slots = "gpoff", "gpcnt", f"(KS{s} - 1)"  # partials of slots 1 .. only
        else:
            c(f"ggoff, ggcnt, _, _, gtoff, gtgroup = _group_bounds(gkey, NG, GBM, "
              f"B * T * H * KS{s})  # tiles of GBM entries")
            offs, cnts, slots = "ggoff", "ggcnt", f"KS{s}"
        c("del gkey")
        c(f"po = torch.empty(B * T * H * {slots}, DV, device=dev, dtype=q.dtype)  # partial "
          f"outputs")
        c(f"pl = torch.empty(B * T * H * {slots}, device=dev, dtype=f32)")
        c("kd, vd, TMA = _kv_descs(k, v, GBN)  # tensor descriptors, where TMA reads them")
        c(f"attend_{name}_fwd_kernel[(_grouped_programs(q, GP, gtgroup.numel()),)](q, k, v, kd, "
          f"vd, po, pl, gorder, {offs}, {cnts}, gtoff, gtgroup, {self._common(scale)}, BM=GBM, "
          f"BN=GBN, IEEE=IEEE, TMA=TMA, **_launch(GW, GS, GR))")
        c("o = torch.empty(B, T, H, DV, device=dev, dtype=q.dtype)")
        c("osave0 = o  # the backward's delta reads the output itself, as FlashAttention's does")
        c("lsave = torch.empty(1, B, T, H, device=dev, dtype=f32) if save else o")
        if self.own:
            c("OBM, OBN, OW, OS, OR, _ = _grouped_config(q, 'own', tuned)  "
              "# (SPARSEDSL_GROUPED_OWN)")
            c(f"attend_{name}_own_kernel[({nb} * triton.cdiv({L}, OBM), H, B)](q, k, v, po, pl, "
              f"sel{s}, o, lsave, {scale}, T, {nb}, H=H, HKV=HKV, G=G, KS=KS{s}, D=D, DV=DV, "
              f"BD=BD, BDV=BDV, BM=OBM, BN=OBN, IEEE=IEEE, HS=HS{s}, SAVE=save, "
              f"**_launch(OW, OS, OR))")
        else:
            c(f"attend_{name}_combine_kernel[(triton.cdiv(B * T * H, 16),)](po, pl, sel{s}, o, "
              f"lsave, B * T * H, H=H, HS=HS{s}, KS=KS{s}, KSP=triton.next_power_of_2(KS{s}), "
              f"DV=DV, BDV=BDV, BR=16, SAVE=save)")
        c("del po, pl")

    def saved(self) -> list[str]:
        return ["gorder", "ggoff", "ggcnt"]

    @property
    def disjoint_blocks(self) -> bool:
        """Whether each key lies in one block of the grid (the language refuses gaps between
        blocks, so then in exactly one): with one head per kv head, one dk/dv program writes
        it, zeros where no query chose its block."""
        return self.grid.stride >= self.grid.length

    def host_bwd(self, c, scale: str, store: str = "False") -> None:
        """`store`: a host expression, true when dk and dv hold only this stage's gradients
        and may be stored in place of atomic adds (the caller decides, from
        `disjoint_blocks`, and allocates them to match)."""
        c(f"# backward of attend `{self.st.name}`: grouped by selected block")
        c("gorder, ggoff, ggcnt = saved['gorder'], saved['ggoff'], saved['ggcnt']")
        c(f"NG = B * H * NB{self.grid.node}")
        c("glse = lsave[0]")
        c("gdelta = torch.empty(B, T, H, device=dev, dtype=f32)")
        c("_rowdot_kernel[(triton.cdiv(B * T * H, 16),)](do, osave0, gdelta, B * T * H, DV=DV, "
          "BDV=BDV, BR=16)  # delta = rowsum(dO * o), accumulated in f32, no temporaries")
        c("GBM, GBN, GW, GS, GR, GP = _grouped_config(q, 'dq', tuned)  # (SPARSEDSL_GROUPED_DQ)")
        c("gtoff, gtgroup = _group_tiles(ggcnt, GBM, gorder.numel())  # tiles of GBM entries")
        c("kd, vd, TMA = _kv_descs(k, v, GBN)  # tensor descriptors, where TMA reads them")
        c(f"attend_{self.st.name}_bwd_dq_kernel[(_grouped_programs(q, GP, gtgroup.numel()),)]("
          f"q, k, v, kd, vd, do, dq, glse, gdelta, gorder, ggoff, ggcnt, gtoff, gtgroup, "
          f"{self._common(scale)}, BM=GBM, BN=GBN, IEEE=IEEE, TMA=TMA, **_launch(GW, GS, GR))")
        c("GBM, GBN, GW, GS, GR, _ = _grouped_config(q, 'dkdv', tuned)  "
          "# (SPARSEDSL_GROUPED_DKDV)")
        c(f"NP = NG * triton.cdiv({self.grid.length}, GBN)  # dk/dv programs")
        c(f"attend_{self.st.name}_bwd_dkdv_kernel[(NP,)]("
          f"q, k, v, do, dk, dv, glse, gdelta, gorder, ggoff, ggcnt, {self._common(scale)}, "
          f"BM=GBM, BN=GBN, IEEE=IEEE, STORE={store}, "
          f"BLOCK_MAJOR=NP <= _BLOCK_MAJOR_PROGRAMS, "
          f"**_launch(GW, GS, GR))")
