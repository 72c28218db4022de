"""Decode kernels: a few new queries against a KV cache, split over the key axis.

`generate_decode(ir, plan)` writes a second module beside the training one (same plan, same
masks, same key sources), for `layer.decode` (sparsedsl/runtime/decode.py):

  * `pool_<name>_fwd_kernel`, and `update_pools(...)`: the cache re-pools only the blocks
    that the appended tokens touch (a block is pooled again while it fills);
  * `select_<name>_dec_kernel`: the select kernel of the plan for query positions
    Q0 .. Q0 + TQ - 1 (its q, block lists and log-sum-exps hold TQ rows);
  * `attend_<name>_dec_kernel`: every attention stage in the row layout (one program per
    query position and the heads that share its block lists), with the key tiles of every
    source dealt round-robin to S programs (flash-decoding's split): each writes its
    partial (max, sum, unnormalised output) per softmax group;
  * `combine_<name>_dec_kernel`: merges the S partials of each group by log-sum-exp and
    combines the groups (one softmax, or the gated sum), as the training kernel's epilogue;
  * `decode(...)`: the host code.

The cache's buffers have room for `T` (its capacity) tokens and the kernels are given T as
both the row stride and the bound; positions past the cache's length are never read as keys
because the causality pass proved every key a query attends (and every block a gate may
choose freely) lies at or before the query.
"""
from __future__ import annotations

import dataclasses

from sparsedsl.ir.graph import IR

from .emit import (L2E_DEF, TRITON_PRELUDE, AttendEmitter, Code, Exprs, HostEmitter,
                   SelectEmitter, _launch_acc, _with_acc, emit_pool, header, pool_launch)
from .plan import AttendStage, KernelPlan, PoolStage, SelectStage

DECODE_QROW = "(i_b * TQ + {} - Q0)"  # query row of position {}: TQ new queries from Q0
DECODE_SCALARS = "TQ, Q0, "


class DecodeSelectEmitter(SelectEmitter):
    """The plan's select kernel (one program per query position) for the new queries."""

    QROW, SCALARS = DECODE_QROW, DECODE_SCALARS

    @property
    def tiled(self) -> bool:  # a handful of queries: one program each
        return False

    @property
    def tree_tiled(self) -> bool:
        return False

    def _pids(self) -> None:
        self.c("i_q, i_hs, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)")
        self.c("i_t = Q0 + i_q  # the query's position in the cache")

    def emit(self) -> str:
        return super().emit().replace("_fwd_kernel(", "_dec_kernel(", 1)


class DecodeAttendEmitter(AttendEmitter):
    """An attention stage for the new queries, its key tiles split S ways."""

    mode = "dec"
    defer_outputs = False  # its partials keep every group's (m, l, acc) for the merge kernel
    head_args = "opart, mpart, lpart"
    extra_consts = ", S: tl.constexpr"
    QROW, SCALARS = DECODE_QROW, DECODE_SCALARS

    def __init__(self, ir: IR, plan: KernelPlan, ex: Exprs, st: AttendStage):
        # every layout decodes in the row layout: a query position per program
        super().__init__(ir, plan, ex, dataclasses.replace(st, layout="row"))
        self.stage = st

    def _doc(self, combine: str) -> str:
        return (f'    """Decode attention `{self.st.name}` ({combine}): program (query, split) '
                f'walks every S-th key tile of each source and writes its partial max, sum and '
                f'unnormalised output per softmax group."""')

    def _pids(self) -> None:
        c = self.c
        c("i_p, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)")
        c("i_q, i_s = i_p // S, i_p % S  # new query, key split")
        c("i_t = Q0 + i_q  # the query's position in the cache")

    def _range(self, start: str, stop: str) -> str:
        return f"range({start} + i_s * BN, {stop}, BN * S)"

    def _merge_once(self, lse: str) -> None:
        self.c(f"{lse} = tl.where(i_s == 0, {lse}, float('-inf'))  # merged by split 0 only")

    def _finish(self) -> None:
        c = self.c
        c("")
        c("# ---- this split's partials: [groups, S, B * TQ * H] rows")
        c(f"p_o = ({self.QROW.format('o_i')}.to(tl.int64) * H + o_h)  # [RP]")
        c("n_rows = TQ * H * tl.num_programs(2)")
        for gi in range(len(self.st.groups)):
            c(f"p_part = ({gi} * S + i_s) * n_rows + p_o")
            c(f"tl.store(mpart + p_part, m{gi}, mask=m_r)")
            c(f"tl.store(lpart + p_part, l{gi}, mask=m_r)")
            c(f"tl.store(opart + p_part[:, None] * DV + o_dv[None, :], acc{gi}, "
              f"mask=m_r[:, None] & m_dv[None, :])")


def emit_combine(st: AttendStage) -> str:
    """Merge the S partials of each softmax group; then one group, or the gated sum."""
    c = Code()
    ng = len(st.groups)
    gates = [g for g in st.gates if g is not None] if st.combine == "mix" else []
    c("i_r = tl.program_id(0)  # a (batch, query, head) row")
    c("n_rows = tl.num_programs(0)")
    c("o_s = tl.arange(0, SP)")
    c("m_s = o_s < S")
    c("o_dv = tl.arange(0, BDV)")
    c("m_dv = o_dv < DV")
    c("b_o = tl.zeros([BDV], dtype=tl.float32)")
    c(L2E_DEF)  # the partials' maxima are in base 2
    for gi in range(ng):
        c(f"# group {gi}")
        c(f"p_part = ({gi} * S + o_s).to(tl.int64) * n_rows + i_r  # [SP]")
        c("b_m = tl.load(mpart + p_part, mask=m_s, other=float('-inf'))")
        c("b_l = tl.load(lpart + p_part, mask=m_s, other=0.)")
        c("b_acc = tl.load(opart + p_part[:, None] * DV + o_dv[None, :], mask=m_s[:, None] & "
          "m_dv[None, :], other=0.)  # [SP, BDV]")
        c("b_max = tl.max(b_m, 0)")
        c("b_max = tl.where(b_max == float('-inf'), 0., b_max)")
        c("b_w = tl.where(m_s, tl.exp2(b_m - b_max), 0.)")
        c("b_sum = tl.sum(b_l * b_w, 0)")
        c("b_og = tl.sum(b_acc * b_w[:, None], 0) / tl.where(b_sum > 0, b_sum, 1.)")
        c("b_og = tl.where(b_sum > 0, b_og, 0.)")
        gate = st.gates[gi] if st.combine == "mix" else None
        if gate is not None:
            c(f"b_o += tl.load(gate_{gate} + i_r).to(tl.float32) * b_og")
        else:
            c("b_o += b_og")
    c("tl.store(o + i_r * DV + o_dv, b_o.to(o.dtype.element_ty), mask=m_dv)")
    if st.writes_lse:
        c("tl.store(lse + i_r, tl.where(b_sum > 0, (b_max + tl.log2(tl.where(b_sum > 0, b_sum, "
          "1.))) / L2E, float('-inf')))  # natural log")
    args = "".join(f"gate_{g}, " for g in gates) + ("lse, " if st.writes_lse else "")
    sig = (f"opart, mpart, lpart, o, {args}S, SP: tl.constexpr, DV: tl.constexpr, "
           f"BDV: tl.constexpr")
    doc = (f'    """The decode output of `{st.name}`: each softmax group\'s S partials merged by '
           f'log-sum-exp{", then the gated sum" if st.combine == "mix" else ""}."""')
    return (f"\n@triton.jit\ndef combine_{st.name}_dec_kernel(\n    {sig},\n):\n{doc}\n"
            f"{c.text()}\n")


class DecodeHostEmitter(HostEmitter):
    """`update_pools` and `decode`: the host code of the decode module."""

    def emit(self, selects: dict, attends: dict) -> str:
        # blocks are pooled in float32 (float64 for a float64 cache), then stored in the pools'
        # dtype (the cache's on a GPU, as the forward stores them)
        pools = _launch_acc(self._update_pools()).replace("q.dtype", "k.dtype")
        return pools + _launch_acc(self._decode(selects, attends))

    def _update_pools(self) -> str:
        c = Code()
        c('"""Pool again the blocks that tokens [lo, hi) of the cache touch. k, v: the')
        c("cache's [B, capacity, HKV, dim] buffers, filled up to hi; pools: name -> pooled")
        c('[B, capacity blocks, HKV, dim] buffers, updated in place."""')
        c("B, HKV, D, DV = k.shape[0], k.shape[2], k.shape[3], v.shape[3]")
        c("dev = k.device")
        c("BD, BDV = _p2(D), _p2(DV)")
        c("f32 = torch.float32")
        for st in self.plan.stages:
            if st.kind != "pool":
                continue
            g = st.grid
            c(f"# `{st.name}`: blocks(len={g.length}, stride={g.stride}) that end after lo "
              f"and start before hi")
            c(f"n_lo = max(0, (lo - {g.length}) // {g.stride} + 1)")
            c(f"n_hi = triton.cdiv(hi, {g.stride})")
            c("if n_hi > n_lo:")
            with c.indent():
                c(f"j_lo, j_hi = n_lo * {g.stride}, min(hi, (n_hi - 1) * {g.stride} + {g.length})")
                c("T, NBC = j_hi - j_lo, n_hi - n_lo")
                for side, d in (("k", "D"), ("v", "DV")):
                    c(f"x = {side}[:, j_lo:j_hi].contiguous()")
                    c(f"xp = torch.empty(B, NBC, HKV, {d}, device=dev, dtype=f32)")
                    c(pool_launch(st, side, "x", "xp", "NBC"))
                    c(f"pools['{side}p{st.node}'][:, n_lo:n_hi] = xp")
        return "\n\ndef update_pools(k, v, params, pools, lo, hi):\n" + c.text()

    def _decode(self, selects: dict, attends: dict) -> str:
        c, plan = self.c, self.plan
        c('"""Attention of q [B, TQ, H, D], the queries at positions Q0 .. Q0 + TQ - 1, over')
        c("the cache: k, v [B, T, HKV, dim] buffers (T: capacity) and pooled buffers `pools`.")
        c('S splits the key axis. Returns [B, TQ, H, DV] in q\'s dtype and the block lists."""')
        self._sizes("B, TQ, H, D = q.shape", "T, HKV, DV = k.shape[1], k.shape[2], v.shape[3]")
        for st in plan.stages:
            if st.kind == "pool":
                c(f"kp{st.node}, vp{st.node} = pools['kp{st.node}'], pools['vp{st.node}']")
        for st in plan.stages:
            c("")
            if st.kind == "select":
                self._select_dec(st, selects[st.node])
            elif st.kind == "attend":
                self._attend_dec(st, attends[id(st)])
        c("return o, lists")
        return "\n\ndef decode(q, k, v, gates, params, pools, Q0, S=1):\n" + c.text() + "\n"

    def _select_dec(self, st: SelectStage, em: DecodeSelectEmitter) -> None:
        c = self.c
        extra, deps = self._select_setup(st, em, "TQ")
        c("# one program per (query, list): chunks of 64 blocks and 8 warps (H100, NSA at 32k:"
          " 2.3 ms against 5.8 with 32 and 4)")
        c("CS, WS = (64, 8) if q.is_cuda else (32, 4)")
        c(f"select_{st.name}_dec_kernel[(TQ, HS{st.node}, B)](q, sel{st.node}, "
          f"{''.join(x + ', ' for x in extra)}T, TQ, Q0, {''.join(f'NB{x}, ' for x in em.nbs)}"
          f"{deps}H=H, HKV=HKV, G=G, HS=HS{st.node}, R=R, RP=_p2(R), "
          f"SHARED={st.heads == 'group'}, D=D, BD=BD, K={st.k}, "
          f"KB=max(2, triton.next_power_of_2({st.k})), KS=KS{st.node}, "
          f"KSP=triton.next_power_of_2(KS{st.node}), C=CS, IEEE=IEEE, num_warps=WS, "
          f"num_stages=1)")
        c(f"lists[{st.name!r}] = sel{st.node}")

    def _attend_dec(self, st: AttendStage, em: DecodeAttendEmitter) -> None:
        c = self.c
        ng = len(st.groups)
        c(f"# attend `{st.name}` (trained in the {st.layout} layout; decoded by rows), "
          f"{st.combine}")
        _, args, deps = self._launch(em.st, em)  # em.st: the stage in the row layout
        c(f"mpart = torch.empty({ng}, S, B, TQ, H, device=dev, dtype=f32)")
        c(f"lpart = torch.empty({ng}, S, B, TQ, H, device=dev, dtype=f32)")
        c(f"opart = torch.empty({ng}, S, B, TQ, H, DV, device=dev, dtype=f32)")
        c(f"attend_{st.name}_dec_kernel[(TQ * S, H // R, B)](q, k, v, opart, mpart, lpart, "
          f"{''.join(x + ', ' for x in args)}T, TQ, Q0, "
          f"{''.join(f'NB{x}, ' for x in sorted(em.nbs))}{deps}H=H, HKV=HKV, G=G, R=R, RP=RP, "
          f"D=D, DV=DV, BD=BD, BDV=BDV, BM=1, BN=32, IEEE=IEEE, S=S)")
        if st.writes_lse:
            c(f"o = o{st.node} = torch.empty(B, TQ, H, DV, device=dev, dtype=f32)")
            c(f"lse = lse{st.node} = torch.empty(B, TQ, H, device=dev, dtype=f32)")
            extra = "lse, "
        else:
            c("o = torch.empty(B, TQ, H, DV, device=dev, dtype=q.dtype)")
            gates = [g for g in st.gates if g is not None] if st.combine == "mix" else []
            extra = "".join(f"gates[{g!r}], " for g in gates)
        c(f"combine_{st.name}_dec_kernel[(B * TQ * H,)](opart, mpart, lpart, o, {extra}S, "
          f"SP=max(2, triton.next_power_of_2(S)), DV=DV, BDV=BDV)")


def generate_decode(ir: IR, plan: KernelPlan | None = None) -> str:
    """The decode module of a verified IR: header, kernels, `update_pools`, `decode`."""
    from .plan import plan_kernels
    plan = plan or plan_kernels(ir)
    ex = Exprs(ir, plan)
    parts = [header(ir, plan).replace("-- do not edit.", "(decode module) -- do not edit.", 1),
             TRITON_PRELUDE]
    selects, attends = {}, {}
    for st in plan.stages:
        if isinstance(st, PoolStage):
            parts.append(emit_pool(st))
        elif isinstance(st, SelectStage):
            em = DecodeSelectEmitter(ir, plan, ex, st)
            parts.append(em.emit())
            selects[st.node] = em
        else:
            em = DecodeAttendEmitter(ir, plan, ex, st)
            parts.append(em.emit())
            parts.append(emit_combine(st))
            attends[id(st)] = em
    kernels = [_with_acc(x) for x in parts[2:]]
    host = DecodeHostEmitter(ir, plan).emit(selects, attends)
    return "".join(parts[:2] + kernels) + host
