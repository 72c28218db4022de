"""Kernel plan -> Triton source text.

The generated module holds, in pipeline order:

  * helpers (`_fdiv`, `_hash24`),
  * one `pool_<name>_fwd_kernel` per pooled grid,
  * one `select_<name>_fwd_kernel` per data-dependent block set (fused gate
    scores + top-k into block index lists),
  * one `attend_<name>_fwd_kernel` per attention stage (online softmax over
    every key source of every branch, combined by union or gated sum),
  * `forward(...)`: the host code that allocates buffers and launches them.

Naming follows flash-linear-attention: `i_` program ids, `o_` offsets, `m_` masks,
`p_` pointers, `b_` blocks, with `# [rows, cols]` shape comments. Masks are
written out from the IR by `Exprs`; everything else is a fixed skeleton.

Gradients that several programs add to use `tl.atomic_add(..., sem='relaxed')`: the adds
only accumulate and nothing reads the sums before the kernel ends, so they need no
ordering (Triton's default, acq_rel, made MoBA's grouped dq 7.2 ms instead of 4.6 at 64k
on the H100).
"""
from __future__ import annotations

import contextlib
import math
import re

from sparsedsl.ir.graph import IR

from .plan import (AttendStage, BlockList, BlockRange, BranchPlan, KernelPlan, PoolStage,
                   SelectStage, TokenRange)

TRITON_PRELUDE = '''
import math

import torch
import triton
import triton.language as tl


@triton.jit
def _fdiv(a, b):
    """Floor division that rounds toward -inf for negative numerators too."""
    return tl.where(a >= 0, a // b, -((-a + b - 1) // b))


@triton.jit
def _hash24(seed, qb, kb):
    """The seeded hash behind `random` (murmur3's finaliser, top 24 bits: exact in float32)."""
    h = (seed * 0x9E3779B1 + qb.to(tl.int64) * 0x85EBCA77 + kb.to(tl.int64) * 0xC2B2AE3D) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (h >> 8).to(tl.float32)


def _p2(x):
    return max(16, triton.next_power_of_2(int(x)))


def _list_bwd():
    """Whether a block list's token keys get dk, dv from the key-major kernel (default) or
    by atomic adds from the per-query kernel: SPARSEDSL_LIST_BWD=keys|query, read at every
    call (for A/B runs)."""
    import os
    env = os.environ.get("SPARSEDSL_LIST_BWD", "keys").strip()
    if env not in ("keys", "query"):
        raise ValueError(f"SPARSEDSL_LIST_BWD={env!r}: expected keys or query")
    return env == "keys"


def _list_index(sel, NB, HKV, G, shared):
    """The block lists inverted (CSR), for the key-major dk/dv kernels: the entries listing
    block n of kv head hk in batch b are ent[off[i]:off[i + 1]], i = (b * HKV + hk) * NB + n,
    in query order; an entry is the query t (one list per group: its G heads' rows) or
    t * G + g (one list per query head: head hk * G + g). Sorted on the GPU: no host sync."""
    B, T, HS, KS = sel.shape
    dev = sel.device
    n = sel.long()
    t = torch.arange(T, device=dev).view(1, T, 1, 1)
    h = torch.arange(HS, device=dev).view(1, 1, HS, 1)
    b = torch.arange(B, device=dev).view(B, 1, 1, 1)
    hk, val, span = (h, t, T) if shared else (h // G, t * G + h % G, T * G)
    nkeys = B * HKV * NB
    key = torch.where(n >= 0, (b * HKV + hk) * NB + n, nkeys).reshape(-1)
    ent = torch.sort(key * span + val.expand_as(n).reshape(-1)).values % span
    cnt = torch.zeros(nkeys + 1, device=dev, dtype=torch.int64)
    cnt.scatter_add_(0, key, torch.ones_like(key))
    off = torch.zeros(nkeys + 1, device=dev, dtype=torch.int32)
    off[1:] = torch.cumsum(cnt[:nkeys], 0)
    return off, ent.to(torch.int32)


def _env_tiles(var, what, tuned, regs=False):
    """The setting "BM,BN,WARPS,STAGES" of knob `var` (`_knob`: the environment, then the
    tuned settings; None when neither sets it), BM and BN powers of two >= 16; `what` names
    the sizes in the error. With `regs`, two more values may follow: a cap on the registers a
    thread uses (`maxnreg`; 0 or absent: Triton's choice) and the persistent programs an SM
    (0 or absent: a program a tile), and the result has six entries."""
    env = _knob(var, tuned)
    if not env:
        return None
    vals = [int(x) for x in env.split(",")]
    if len(vals) not in ((4, 5, 6) if regs else (4,)):
        raise ValueError(f"{var} takes BM,BN,WARPS,STAGES{'[,MAXNREG[,PROGRAMS]]' if regs else ''}"
                         f", got {env!r}")
    bm, bn = vals[:2]
    if min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"{what} must be powers of two >= 16, got {env!r}")
    if min(vals[2:]) < 0 or vals[2] < 1 or vals[3] < 1:
        raise ValueError(f"{var}: warps and stages must be at least 1, the rest at least 0, "
                         f"got {env!r}")
    return tuple(vals) + (0,) * ((6 - len(vals)) if regs else 0)


def _row_config(kernel, q, tuned):
    """(BN, num_warps, num_stages) of a row-layout kernel ('fwd' or 'dq': one query's rows
    against BN keys a step), read at each call: the knobs SPARSEDSL_ROW, SPARSEDSL_ROW_DQ =
    "BN,WARPS,STAGES" (`_knob`) override; else 32 keys in the interpreter (several steps in
    tests); on a GPU the forward 32 keys, 1 warp, 3 stages, the dq kernel 64 keys, 2 warps,
    2 stages."""
    env = _knob({'fwd': 'SPARSEDSL_ROW', 'dq': 'SPARSEDSL_ROW_DQ'}[kernel], tuned)
    if not env:
        # H100 (docs/perf-notes.md): the forward of NSA as fla at 64k 38.1 ms with 64 keys / 4
        # warps / 2 stages, 36.3 with 32 / 1 / 2 (8k: 3.77 -> 3.53; NSA's defaults at 16k:
        # 12.9 -> 11.9); with base-2 softmax 33.8-34.0 at 32 / 1 / 2, 32.5-32.7 at 32 / 1 / 3
        # (8k 3.22 -> 3.06); fwd+bwd 198.8 with the dq kernel at 32 / 4 / 3, 191.5 at 64 / 4 / 2
        # (a sweep of 1-2 warps found nothing better for dq then); with key tiles through
        # tensor descriptors the dq kernel gains from 2 warps: NSA as fla, dq kernel at 8k
        # 2.64 -> 2.20 ms, at 64k 21.5 -> 18.8 (32 / 4 / 3 3.28 and 26.9, 64 / 4 / 3 2.64)
        if not q.is_cuda:
            return 32, 4, 3
        return (32, 1, 3) if kernel == 'fwd' else (64, 2, 2)
    bn, w, s = (int(x) for x in env.split(","))
    if bn < 16 or bn & (bn - 1) or w < 1 or s < 1:
        raise ValueError(f"row tile: BN a power of two >= 16, warps and stages >= 1, got {env!r}")
    return bn, w, s


def _list_chunk(RE, cuda, tuned):
    """Entries a key-major list program walks at most: the knob SPARSEDSL_LIST_CHUNK rows
    (`_knob`; default 16384 on a GPU, 32 in the interpreter) over RE rows per entry."""
    env = _knob("SPARSEDSL_LIST_CHUNK", tuned)
    rows = int(env) if env else (16384 if cuda else 32)
    if rows < 1:
        raise ValueError(f"SPARSEDSL_LIST_CHUNK must be a positive row count, got {env!r}")
    return max(1, rows // RE)


def _list_work(off, n_entries, E):
    """The key-major list programs: a block's entries cut into runs of at most E, so a block
    that every query lists (NSA's forced first block) is walked by T / E programs, not one.
    Returns [U, 2] int32 (key index, run) for U = keys + cdiv(n_entries, E) programs, an
    upper bound of the runs (no host sync); programs past the last run get key index
    len(off) - 1: no entries."""
    nkeys = off.numel() - 1
    runs = (off[1:] - off[:-1] + E - 1) // E
    end = torch.cumsum(runs, 0)
    U = nkeys + triton.cdiv(n_entries, E)
    p = torch.arange(U, device=off.device)
    key = torch.searchsorted(end, p, right=True)
    run = p - (end - runs)[key.clamp(max=nkeys - 1)]
    return torch.stack((key, run), 1).to(torch.int32)
'''


TILE_HELPER = '''

def _tile_config(kernel, q, tuned, pooled=False, nkeys=0):
    """(BM, BN, num_warps, num_stages) of a tile-layout kernel ('fwd', 'dq', 'dkdv' or
    'dkdvp', the pooled keys' dk/dv; BM queries by BN keys), read at each call: the knobs
    SPARSEDSL_TILE (forward), SPARSEDSL_TILE_DQ, SPARSEDSL_TILE_DKDV, SPARSEDSL_TILE_DKDVP =
    "BM,BN,WARPS,STAGES" (`_knob`) override; else small tiles in the interpreter
    (several tiles of each kind in tests) and per-dtype defaults on CUDA (a stage over pooled
    keys has its own; the pooled keys' dk/dv kernel's depends on `nkeys`, pooled keys a
    sequence)."""
    env = _env_tiles({'fwd': 'SPARSEDSL_TILE', 'dq': 'SPARSEDSL_TILE_DQ',
                      'dkdv': 'SPARSEDSL_TILE_DKDV', 'dkdvp': 'SPARSEDSL_TILE_DKDVP'}[kernel],
                     "tile sizes", tuned)
    if env:
        return env
    if not q.is_cuda:
        return 16, 16, 4, 1
    if pooled and q.element_size() > 2:
        return 32, 32, 4, 3
    if pooled:
        # H100, NSA as fla at 64k with pooled keys in bf16 (docs/perf-notes.md): forward 44.8 ms
        # with 64x32/4 warps/3 stages, 45.8 with 128x64/8/2; fwd+bwd 141.4 with a 64x32 dq
        # tile (141.2 with 64x64, 145.5 with 128x32) and 64x32 pooled dk/dv tiles (146.3
        # with 64x64, 153.6 with 64x128/8); with p.v as one product (session 10) the forward
        # tile still wins: 29.24 ms forward, 64x16/4/3 29.66, 128x32/8/3 30.25, 32x32/4/3 33.79.
        # The pooled dk/dv kernel (session 21, found by `sparsedsl tune`): 64 keys a program
        # from 256 pooled keys a sequence on (fwd+bwd, NSA as fla at 16k 15.1 -> 15.0 ms, 32k
        # 33.1 -> 32.1, 64k 80.0 -> 76.8; the paper's defaults at 8k 13.8 -> 13.6, 16k 29.6
        # -> 28.9), 32 below (NSA as fla at 8k, 128 pooled keys: 7.34 against 7.37)
        if kernel == 'dkdvp':
            return (64, 64, 4, 2) if nkeys >= 256 else (64, 32, 4, 2)
        return {'fwd': (64, 32, 4, 3), 'dq': (64, 32, 4, 2), 'dkdv': (32, 32, 4, 3)}[kernel]
    if q.element_size() <= 2:  # bf16 / fp16: tensor-core tiles, fp32 accumulation
        # H100, window 4096 + 64 sinks at 64k (docs/perf-notes.md): forward 64x64/4 warps
        # 6.08 ms, 128x64/8 6.97, 128x128/8 8.05. dq 128 queries x 64 keys / 8 warps / 3
        # stages (FlexAttention's dq tile): fwd+bwd lower than 64x64/4/2 in 6 of 6 back-to-back
        # pairs (window+sinks 0.05-1.4 ms, NSA paper 2.7-3.4 ms). dk/dv 32 queries x 128 keys
        # / 8 warps / 3 stages: window+sinks fwd+bwd 22.2-24.7 ms against 24.4-25.9 with
        # 64x64/4/2 in the same runs (32x128/4 warps 52.3, 64x128/8/3 25.8, 128x128/8/2 30.9),
        # NSA paper 214.7 / 216.8 against 218.2 / 219.1. Both kept to head dims up to 128.
        if q.shape[-1] <= 128:
            return {'fwd': (64, 64, 4, 3), 'dq': (128, 64, 8, 3), 'dkdv': (32, 128, 8, 3)}[kernel]
        return {'fwd': (64, 64, 4, 3), 'dq': (64, 64, 4, 2), 'dkdv': (64, 64, 4, 2)}[kernel]
    if q.element_size() == 4:  # fp32 ('ieee' products): half the tile, twice the bytes
        return {'fwd': (64, 32, 4, 2), 'dq': (32, 32, 4, 2), 'dkdv': (32, 32, 4, 2)}[kernel]
    return 32, 32, 4, 1


def _query_split(NT, programs, tuned):
    """(QT, S): the pooled dk/dv kernels split a key tile's NT query tiles into S runs of QT
    tiles, so that `programs` x S is about 8192 programs (pooled keys are few: at 8k, NSA's
    64-token blocks make 2 key tiles per head). The knob SPARSEDSL_QUERY_SPLIT=QT
    (`_knob`) overrides."""
    env = _knob("SPARSEDSL_QUERY_SPLIT", tuned)
    if env:
        qt = int(env)
        if qt < 1:
            raise ValueError(f"SPARSEDSL_QUERY_SPLIT must be a positive count, got {env!r}")
    else:
        qt = triton.cdiv(NT, max(1, min(NT, 8192 // max(1, programs))))
    return qt, triton.cdiv(NT, qt)
'''


# the kernel knobs' settings: the environment's, else those `sparsedsl tune` measured best on
# this device (sparsedsl/runtime/tuning.py puts them into `_TUNED` when it loads the module)
TUNED_HELPER = '''

_TUNED = {}  # (device, dtype, heads, kv heads, head dims) -> [(seq, {knob: setting})]
_DEVICES = {}  # torch device -> its name, as the tuning records it


def _tuning_key(q, k, v):
    """What a tuning entry is for, besides its sequence length: (device name, dtype, heads,
    kv heads, head dim, head dim of v); `sparsedsl tune` records its entries under it."""
    name = _DEVICES.get(q.device)
    if name is None:
        name = _DEVICES[q.device] = (torch.cuda.get_device_name(q.device) if q.is_cuda
                                     else q.device.type)
    return name, str(q.dtype).split(".")[-1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]


def _tuned(q, k, v):
    """The knob settings `sparsedsl tune` chose for a call on q, k, v: those of the entry
    under its `_tuning_key` tuned at the sequence length nearest q's (by ratio; the longer
    on a tie), or {}: none tuned, SPARSEDSL_TUNED=0, or tensors without data
    (torch.compile's fake tensors: the knobs change no output's shape)."""
    if not _TUNED or type(q).__name__ in ("FakeTensor", "FunctionalTensor"):
        return {}
    import os
    if os.environ.get("SPARSEDSL_TUNED", "1") == "0":
        return {}
    runs = _TUNED.get(_tuning_key(q, k, v))
    if not runs:
        return {}
    T = max(1, q.shape[1])
    return min(runs, key=lambda r: (abs(math.log(r[0] / T)), -r[0]))[1]


def _knob(var, tuned):
    """The setting of kernel knob `var` (docs/design.md lists them), stripped: the
    environment variable when set (read at every call, for sweeps), else the tuned one
    (`_tuned`), else "": the built-in default."""
    import os
    return (os.environ.get(var) or tuned.get(var) or "").strip()
'''


# tensor descriptors of k and v: the key tiles of the tile and row kernels and of the grouped
# forward and dq
KV_DESCS_HELPER = '''

_TMA_DEVICES = {}  # device -> whether its kernels can read through tensor descriptors


def _kv_descs(k, v, BN):
    """(kd, vd, True): tensor descriptors of k and v [B, T, HKV, D] seen as [B, T, HKV * D],
    in boxes of [1, BN, D], through which the kernels read a tile of keys as one bulk
    copy (TMA; Triton's interpreter runs them too), rows past T reading as zeros; or
    (k, v, False) where TMA does not apply: a GPU of compute capability below 9, a head dim
    that is not a power of two from 16 to 256 (a box holds whole rows of a head), a tensor
    that is not contiguous or not 16-byte aligned, or SPARSEDSL_TMA=0; and for tensors
    without data (torch.compile's fake tensors, when it runs this host code for the outputs'
    shapes and launches nothing)."""
    import os
    env = os.environ.get("SPARSEDSL_TMA", "1")
    if env not in ("0", "1"):
        raise ValueError(f"SPARSEDSL_TMA takes 0 (off) or 1 (on where it applies), got {env!r}")
    if type(k).__name__ in ("FakeTensor", "FunctionalTensor"):
        return k, v, False
    ok = env == "1"
    if ok and k.is_cuda:  # compute capability 9 or more (looked up once a device)
        ok = _TMA_DEVICES.get(k.device)
        if ok is None:
            ok = _TMA_DEVICES[k.device] = torch.cuda.get_device_capability(k.device)[0] >= 9
    for t in (k, v):
        W = t.shape[-1]
        ok = (ok and 16 <= W <= 256 and W & (W - 1) == 0 and t.is_contiguous()
              and t.data_ptr() % 16 == 0)
    if not ok:
        return k, v, False
    from triton.tools.tensor_descriptor import TensorDescriptor

    def desc(t):
        B, T, HK, W = t.shape
        return TensorDescriptor(t, shape=[B, T, HK * W], strides=[T * HK * W, HK * W, 1],
                                block_shape=[1, BN, W])
    return desc(k), desc(v), True
'''


class Code:
    """Indented lines with fresh temporaries."""

    def __init__(self, indent: int = 1):
        self.lines: list[str] = []
        self.level = indent
        self._n = 0

    def __call__(self, line: str = "") -> None:
        self.lines.append(("    " * self.level + line) if line else "")

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def indent(self):
        code = self

        class _Ctx:
            def __enter__(self):
                code.level += 1

            def __exit__(self, *a):
                code.level -= 1
        return _Ctx()

    def text(self) -> str:
        return "\n".join(self.lines)


def _tl(expr: str) -> str:
    """Plan bound expressions use max/min; in a kernel they are tl.maximum/tl.minimum."""
    return expr.replace("max(", "tl.maximum(").replace("min(", "tl.minimum(")


class Exprs:
    """Boolean masks and scores of the IR, written as Triton expressions."""

    def __init__(self, ir: IR, plan: KernelPlan, given: frozenset = frozenset()):
        self.ir = ir
        self.plan = plan
        self.given = given  # lists whose membership is known to hold (grouped kernels)

    def with_given(self, lists) -> "Exprs":
        return Exprs(self.ir, self.plan, frozenset(lists))

    def grid(self, nid: int):
        return self.plan.grids[int(self.ir.node(nid)["facts"]["grid"][1:])]

    # keys: [rows, BN] booleans from I ([rows, 1] query positions) and J ([1, BN] key positions)
    def keys(self, nid: int, I: str, J: str) -> str:
        n = self.ir.node(nid)
        op, a = n["op"], n["args"]
        ops = self.ir.operands(nid)
        if op == "causal":
            return f"({J} <= {I})"
        if op == "window":
            return f"(({I} - {J} >= 0) & ({I} - {J} < {a['size']}))"
        if op == "sink":
            return f"({J} < {a['n']})"
        if op == "global":
            return f"(({J} < {a['n']}) | ({I} < {a['n']}))"
        if op == "strided":
            s = a["step"]
            return f"(((({I} - {J}) % {s}) + {s}) % {s} == {a['offset']})"
        if op == "summary":
            return f"({J} % {a['step']} >= {a['step'] - a['width']})"
        if op == "tokens":
            g = self.grid(ops["blocks"])
            if g.overlap == 1:
                return self.blocks(ops["blocks"], I, f"({J} // {g.stride})")
            parts = []
            for r in range(g.overlap):
                nb = f"({J} // {g.stride} - {r})"
                parts.append(f"(({nb} >= 0) & ({J} < {nb} * {g.stride} + {g.length}) & "
                             f"{self.blocks(ops['blocks'], I, nb)})")
            return "(" + " | ".join(parts) + ")"
        if op == "and":
            return f"({self.keys(ops['0'], I, J)} & {self.keys(ops['1'], I, J)})"
        if op == "or":
            return f"({self.keys(ops['0'], I, J)} | {self.keys(ops['1'], I, J)})"
        if op == "not":
            return f"(~{self.keys(ops['0'], I, J)})"
        raise AssertionError(op)  # pragma: no cover

    def union_keys(self, branches, I: str = "I", J: str = "J") -> str:
        """The keys of a union of token branches: a real token counts once, so the OR of
        the branches' masks."""
        masks = [self.keys(self.ir.operand(b.node, "keys"), I, J) for b in branches]
        return masks[0] if len(masks) == 1 else "(" + " | ".join(masks) + ")"

    # blocks: [rows, BN] booleans from I and N (block indices)
    def blocks(self, nid: int, I: str, N: str) -> str:
        n = self.ir.node(nid)
        op, a = n["op"], n["args"]
        ops = self.ir.operands(nid)
        g = self.grid(nid)
        L, S = g.length, g.stride
        if op == "past":
            return f"({N} * {S} + {L - 1} <= {I})"
        if op == "current":
            return f"(({N} * {S} <= {I}) & ({I} < {N} * {S} + {L}))"
        if op == "future":
            return f"({N} * {S} > {I})"
        if op == "first":
            return f"({N} < {a['n']})"
        if op == "recent":
            return f"(({N} <= {I} // {S}) & ({N} > {I} // {S} - {a['n']}))"
        if op in ("topk", "random"):
            if nid in self.given:
                return f"({N} >= 0)"
            return f"(tl.sum(({N}[:, :, None] == b_sel{nid}[None, None, :]).to(tl.int32), 2) > 0)"
        if op == "and":
            return f"({self.blocks(ops['0'], I, N)} & {self.blocks(ops['1'], I, N)})"
        if op == "or":
            return f"({self.blocks(ops['0'], I, N)} | {self.blocks(ops['1'], I, N)})"
        if op == "not":
            return f"(~{self.blocks(ops['0'], I, N)})"
        raise AssertionError(op)  # pragma: no cover

    def blocks_end(self, nid: int, I: str, negated: bool = False) -> str | None:
        """An end for the block mask `nid` (or its negation) at query positions I: an
        expression E with the mask false for every block N >= E, or None where no such
        bound follows from the mask alone (future blocks, list membership). Lets a select
        kernel stop its walk over the grid at the last block a query can force or pick."""
        n = self.ir.node(nid)
        op, a = n["op"], n["args"]
        ops = self.ir.operands(nid)
        if op == "not":
            return self.blocks_end(ops["0"], I, not negated)
        if op in ("and", "or"):
            ends = [self.blocks_end(ops[k], I, negated) for k in ("0", "1")]
            if (op == "and") != negated:  # both must hold: either end bounds it
                known = [e for e in ends if e is not None]
                if not known:
                    return None
                return known[0] if len(known) == 1 else f"tl.minimum({known[0]}, {known[1]})"
            if None in ends:  # either may hold: both ends needed
                return None
            return f"tl.maximum({ends[0]}, {ends[1]})"
        g = self.grid(nid)
        L, S = g.length, g.stride
        if negated:  # ~future: blocks that have started
            return f"({I} // {S} + 1)" if op == "future" else None
        if op == "past":  # N * S + L - 1 <= I
            return f"(_fdiv({I} - {L - 1}, {S}) + 1)"
        if op in ("current", "recent"):  # N * S <= I
            return f"({I} // {S} + 1)"
        if op == "first":
            return f"{a['n']}"
        return None  # future, list membership

    def lists(self, nid: int) -> set[int]:
        """Select stages a mask expression reads."""
        out, stack = set(), list(self.ir.operands(nid).values()) + [nid]
        while stack:
            u = stack.pop()
            if self.ir.node(u)["op"] in ("topk", "random"):
                out.add(u)
            elif self.ir.node(u)["op"] not in ("blocks", "q"):
                stack.extend(self.ir.operands(u).values())
        return out


def _p2(x: int) -> int:
    return max(16, 1 << max(0, math.ceil(math.log2(max(1, x)))))


# ------------------------------------------------------------------------- header
def deterministic_bwd(plan: KernelPlan) -> bool:
    """Whether the backward has no atomics: every attention stage in the tile layout over
    token keys only (pooled keys add their gradients atomically; so do the row and grouped
    layouts)."""
    attends = [st for st in plan.stages if st.kind == "attend"]
    return all(st.layout == "tile" and not any(b.pooled for grp in st.groups for b in grp)
               for st in attends) and not any(st.kind == "pool" for st in plan.stages)


def header(ir: IR, plan: KernelPlan) -> str:
    src = ir.source
    lines = [
        f"# Generated by sparsedsl from spec `{ir.spec_name}` ({src.name}) -- do not edit.",
        f"# parameters: {', '.join(f'{k}={v}' for k, v in plan.params.items())}",
        f"# passes: {', '.join(plan.passes)}",
        f"# strategy: {plan.strategy}",
        "# kernel plan:",
    ]
    lines += ["#   " + ln for ln in plan.format().splitlines()[2:]]
    grouped = any(st.kind == "attend" and st.layout == "grouped" for st in plan.stages)
    if deterministic_bwd(plan):
        lines += ["# deterministic: forward yes and backward yes (each output and gradient "
                  "element is written by one program, no atomics: dq by query tiles, dk and dv "
                  "by key tiles summing the GQA group's heads in order)", "#", "# spec source:"]
        lines += ["#   " + ln if ln else "#" for ln in src.text.splitlines()]
        return "\n".join(lines) + "\n"
    lines += ["# deterministic: forward yes (each output element is written by one program, no "
              f"atomics); backward no ({'dq, ' if grouped else ''}dk, dv and parameter gradients "
              "are accumulated with atomic adds, whose order varies)",
              "#", "# spec source:"]
    lines += ["#   " + ln if ln else "#" for ln in src.text.splitlines()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- pool
def emit_pool(st: PoolStage) -> str:
    g = st.grid
    if st.method == "mean":
        return f'''
@triton.jit
def pool_{st.name}_fwd_kernel(
    x, xp, T, NB,
    HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BNB: tl.constexpr, BL: tl.constexpr,
):
    """Mean of the tokens of each block of blocks(len={g.length}, stride={g.stride}):
    xp[b, n, h] = mean(x[b, j, h] for j in [n*{g.stride}, n*{g.stride} + {g.length}) and j < T)."""
    i_n, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_n = i_n * BNB + tl.arange(0, BNB)  # [BNB]
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_acc = tl.zeros([BNB, BD], dtype=tl.float32)
    b_cnt = tl.zeros([BNB], dtype=tl.float32)
    for l0 in range(0, {g.length}, BL):
        o_l = l0 + tl.arange(0, BL)
        o_j = o_n[:, None] * {g.stride} + o_l[None, :]  # [BNB, BL]
        m_j = (o_l[None, :] < {g.length}) & (o_j < T) & (o_n[:, None] < NB)
        p_x = x + ((i_b * T + o_j).to(tl.int64) * HKV + i_h)[:, :, None] * D + o_d[None, None, :]
        b_x = tl.load(p_x, mask=m_j[:, :, None] & m_d[None, None, :], other=0.).to(tl.float32)
        b_acc += tl.sum(b_x, 1)
        b_cnt += tl.sum(m_j.to(tl.float32), 1)
    b_acc = b_acc / tl.maximum(b_cnt, 1.0)[:, None]
    p_o = xp + ((i_b * NB + o_n).to(tl.int64) * HKV + i_h)[:, None] * D + o_d[None, :]
    tl.store(p_o, b_acc.to(xp.dtype.element_ty), mask=(o_n < NB)[:, None] & m_d[None, :])
'''
    return f'''
@triton.jit
def pool_{st.name}_fwd_kernel(
    x, pe, w1, b1, w2, b2, xp, T, NB, HID,
    HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BNB: tl.constexpr, BK: tl.constexpr,
    BH: tl.constexpr,
):
    """Learned compression (NSA Eq. 7) of blocks(len={g.length}, stride={g.stride}):
    xp[b, n, h] = w2 . gelu(w1 . flatten(x[b, block n, h] + pe) + b1) + b2, tokens past T as 0."""
    i_n, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_n = i_n * BNB + tl.arange(0, BNB)  # [BNB]
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_out = tl.zeros([BNB, BD], dtype=tl.float32)
    for h0 in range(0, HID, BH):
        o_hid = h0 + tl.arange(0, BH)
        m_hid = o_hid < HID
        b_hid = tl.zeros([BNB, BH], dtype=tl.float32)
        for f0 in range(0, {g.length} * D, BK):
            o_f = f0 + tl.arange(0, BK)  # flat (token, dim) of the block
            m_f = o_f < {g.length} * D
            o_l = o_f // D
            o_dd = o_f % D
            o_j = o_n[:, None] * {g.stride} + o_l[None, :]  # [BNB, BK]
            m_x = m_f[None, :] & (o_j < T) & (o_n[:, None] < NB)
            p_x = x + ((i_b * T + o_j).to(tl.int64) * HKV + i_h) * D + o_dd[None, :]
            b_x = tl.load(p_x, mask=m_x, other=0.).to(tl.float32)
            b_pe = tl.load(pe + o_f, mask=m_f, other=0.).to(tl.float32)
            b_x = tl.where(m_x, b_x + b_pe[None, :], 0.)
            b_w1 = tl.load(w1 + o_f[:, None] * HID + o_hid[None, :],
                           mask=m_f[:, None] & m_hid[None, :], other=0.).to(tl.float32)  # [BK, BH]
            b_hid += tl.dot(b_x, b_w1, input_precision="ieee")
        b_hid += tl.load(b1 + o_hid, mask=m_hid, other=0.).to(tl.float32)[None, :]
        b_hid = 0.5 * b_hid * (1.0 + tl.erf(b_hid * 0.7071067811865476))  # exact gelu
        b_w2 = tl.load(w2 + o_hid[:, None] * D + o_d[None, :], mask=m_hid[:, None] & m_d[None, :],
                       other=0.).to(tl.float32)  # [BH, BD]
        b_out += tl.dot(b_hid, b_w2, input_precision="ieee")
    b_out += tl.load(b2 + o_d, mask=m_d, other=0.).to(tl.float32)[None, :]
    p_o = xp + ((i_b * NB + o_n).to(tl.int64) * HKV + i_h)[:, None] * D + o_d[None, :]
    tl.store(p_o, b_out.to(xp.dtype.element_ty), mask=(o_n < NB)[:, None] & m_d[None, :])
'''


# ------------------------------------------------------------------------ select
def score_chain(ir: IR, nid: int) -> tuple[list[int], int, int]:
    """A score as a chain (scores have one score operand at most): its `remap` nodes from
    the top down, how many `groupsum`s, and the leaf (`dot` or `probs`)."""
    remaps, sums = [], 0
    while ir.node(nid)["op"] in ("remap", "groupsum"):
        if ir.node(nid)["op"] == "remap":
            remaps.append(nid)
        else:
            sums += 1
        nid = ir.operand(nid, "score")
    return remaps, sums, nid


def select_kernel(ir: IR, ex: "Exprs", st: SelectStage) -> str:
    """Which select kernel a stage gets:
      tile   BQ queries of one head per program, a plain `dot(q, pool)` score (MoBA's router)
      tree   any other top-k score (`probs`, `remap`, `groupsum` over `dot`/`probs`: NSA's),
             each score node evaluated once over a chunk of its own grid, BQ queries x the
             head set's heads per program: by default split (`emit_scores` writes the scores,
             the per-query `ScoredSelectEmitter` kernel picks the top-k), else in one kernel
             (`emit_tree`)
      deps   one query per program: the score or masks read other block lists
      random one query per program: `random`"""
    if st.op != "topk":
        return "random"
    if ex.lists(st.node) - {st.node}:
        return "deps"
    score = ir.operand(st.node, "score")
    if st.heads == "head" and ir.node(score)["op"] == "dot":
        return "tile"
    remaps, sums, leaf = score_chain(ir, score)
    if ir.node(leaf)["op"] not in ("dot", "probs") or (sums == 0) != (st.heads == "head"):
        return "query"  # pragma: no cover - every score is such a chain
    return "tree"


def remap_reach(sd: int, ld: int, ss: int, ls: int) -> int:
    """The most source blocks (stride ss, length ls) one target block (stride sd, length ld)
    of a remap overlaps, over the offsets of its start within a source stride: NSA's 64-token
    blocks over 32/16 compressed ones: 5; fla's 64 over 64/64: 1."""
    return max(-(-(r + ld) // ss) - (r - ls) // ss - 1 for r in range(0, ss, math.gcd(sd, ss)))


class SelectEmitter:
    # the row of query position {} in q-shaped tensors (q, block lists, lse); the decode
    # emitters (codegen/decode.py) index a few new queries at positions Q0.. instead
    QROW = "(i_b * T + {})"
    SCALARS = ""  # extra scalar arguments after T ("TQ, Q0, " when decoding)
    WHY = None  # why the per-query kernel, for its docstring (None: from `select_kernel`)
    SCORED = False  # the top-k half of a split select: scores read from `scores`
    #                 (ScoredSelectEmitter)

    def __init__(self, ir: IR, plan: KernelPlan, ex: Exprs, st: SelectStage):
        self.ir, self.plan, self.ex, self.st = ir, plan, ex, st
        self.c = Code()
        self.args: list[str] = []  # extra pointer/scalar arguments, in order
        self.pools: dict[int, str] = {}
        self.branches: dict[int, str] = {}
        self.grids: set[int] = set()  # grids whose block counts the scores read
        self.capped = False  # the query-tiled buffers capped at the rows' free slots (_cap_rows)

    def _pool(self, nid: int) -> str:
        if nid not in self.pools:
            self.pools[nid] = f"kp{nid}"
            self.args.append(f"kp{nid}")
        return self.pools[nid]

    def score(self, nid: int, N: str) -> str:
        """Emit lines computing the score node at block indices N ([C]); return the name of
        a [RP, C] float32 block (rows: query heads; equal rows once summed over a group).
        A `probs` leaf reads b_lse, the rows' lse that `emit` loads before its walk."""
        c, ir = self.c, self.ir
        n = ir.node(nid)
        op, a = n["op"], n["args"]
        ops = ir.operands(nid)
        if op == "dot":
            pool = ops["pool"]
            kp = self._pool(pool)
            v = c.fresh("b_s")
            grid = self.ex.grid(pool).node
            c(f"m_nb = ({N} >= 0) & ({N} < NB{grid})  # [C]")
            c(f"b_kp = tl.load({kp} + ((i_b * NB{grid} + {N}).to(tl.int64) * HKV + i_hk)[:, None] "
              f"* D + o_d[None, :], mask=m_nb[:, None] & m_d[None, :], other=0.)  # [C, BD]")
            c(f"{v} = tl.dot(b_q.to(b_kp.dtype), tl.trans(b_kp), input_precision='ieee' if IEEE else 'tf32') * "
              f"{float(a['scale'])!r}  # [RP, C]")
            return v
        if op == "probs":
            br = ops["branch"]
            bn = ir.node(br)
            pool = ir.operand(br, "keys")
            blocks = ir.operand(br, "blocks")
            kp = self._pool(pool)
            if br not in self.branches:
                self.branches[br] = f"lse{br}"
                self.args += [f"lse{br}", f"scale{br}"]
            grid = self.ex.grid(pool).node
            v = c.fresh("b_p")
            c(f"m_nb = ({N} >= 0) & ({N} < NB{grid})  # [C]")
            c(f"b_kp = tl.load({kp} + ((i_b * NB{grid} + {N}).to(tl.int64) * HKV + i_hk)[:, None]"
              f" * D + o_d[None, :], mask=m_nb[:, None] & m_d[None, :], other=0.)  # [C, BD]")
            vis = self.ex.blocks(blocks, "o_i[:, None]", f"{N}[None, :]")
            c(f"{v} = tl.dot(b_q.to(b_kp.dtype), tl.trans(b_kp), input_precision='ieee' if IEEE else 'tf32') * "
              f"scale{br}")
            c(f"{v} = tl.where(m_nb[None, :] & m_r[:, None] & {vis}, tl.exp({v} - b_lse[:, None]),"
              f" 0.)  # [RP, C] probabilities of `{bn['name'] or br}`")
            return v
        if op == "remap":
            src = ops["score"]
            if self._identity(nid):
                return self.score(src, N)
            gs, gd = self.ex.grid(src), self.ex.grid(nid)
            self.grids.add(gs.node)
            reach = remap_reach(gd.stride, gd.length, gs.stride, gs.length)
            v = c.fresh("b_r")
            r, w = c.fresh("r"), c.fresh("b_w")  # fresh names: remaps can nest
            c(f"{v} = tl.zeros([RP, C], dtype=tl.float32)")
            first = c.fresh("o_first")
            c(f"{first} = _fdiv({N} * {gd.stride} - {gs.length}, {gs.stride}) + 1  # [C]")
            c(f"for {r} in tl.static_range({reach}):")
            with c.indent():
                ns = c.fresh("o_src")
                c(f"{ns} = {first} + {r}")
                c(f"{w} = (tl.minimum({ns} * {gs.stride} + {gs.length}, {N} * {gd.stride} + "
                  f"{gd.length}) - tl.maximum({ns} * {gs.stride}, {N} * {gd.stride}))"
                  f".to(tl.float32) / {gs.stride}")
                c(f"{w} = tl.where(({ns} >= 0) & ({ns} < NB{gs.node}), tl.maximum({w}, 0.), 0.)")
                inner = self.score(src, ns)
                c(f"{v} += {w}[None, :] * {inner}")
            return v
        if op == "groupsum":
            inner = self.score(ops["score"], N)
            v = c.fresh("b_g")
            c(f"{v} = tl.sum(tl.where(m_r[:, None], {inner}, 0.), 0)[None, :] + "
              f"tl.zeros([RP, C], dtype=tl.float32)  # [RP, C], equal rows: the group's sum")
            return v
        raise AssertionError(op)  # pragma: no cover

    def _pids(self) -> None:
        self.c("i_t, i_hs, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)")

    @property
    def tiled(self) -> bool:
        """A tile of queries per program (one head): for a per-head top-k over a plain
        `dot(q, pool)` score, the common router (MoBA's). The scores of BQ queries against
        C blocks are one [BQ, C] product, and the top-k runs row-wise."""
        return select_kernel(self.ir, self.ex, self.st) == "tile"

    @property
    def tree_tiled(self) -> bool:
        """A tile of queries per program for any other top-k score (`probs`, `remap`,
        `groupsum` over `dot`/`probs`: NSA's): `emit_tree`."""
        return select_kernel(self.ir, self.ex, self.st) == "tree"

    def _init_rows(self, g, head: str) -> None:
        """The query-tiled kernels' start: each row's list cleared to -1 (p_sel: the list of
        query o_i and head set `head`), no forced blocks yet, an empty best-K buffer."""
        c = self.c
        c(f"p_sel = sel + ((i_b * T + o_i).to(tl.int64) * HS + {head}) * KS  # [BQ]")
        c("o_ks = tl.arange(0, KSP)")
        c("tl.store(p_sel[:, None] + o_ks[None, :], tl.full([BQ, KSP], -1, tl.int32), "
          "mask=m_r[:, None] & (o_ks[None, :] < KS))")
        c(f"NB = NB{g.node}")
        c("n_forced = tl.zeros([BQ], dtype=tl.int32)")
        c("n_counted = tl.zeros([BQ], dtype=tl.int32)")
        c("b_val = tl.full([BQ, KB], float('-inf'), tl.float32)  # each row's best free blocks")
        c("b_idx = 2147483000 + tl.arange(0, KB)[None, :] + tl.zeros([BQ, KB], dtype=tl.int32)")

    def _walk_rows(self, ops, step: str, note: str = "", g=None) -> None:
        """The query-tiled kernels' loop over the grid's chunks, up to the last block a row
        of the tile can force or pick (`_walk_end`). With the list's grid `g` and forced
        blocks, the rows' buffers are first capped at their free slots (`_cap_rows`)."""
        end = self._walk_end(ops, "o_i")
        if end is not None:
            self.c(f"n_end = tl.minimum(NB, tl.max({end} + tl.zeros([BQ], dtype=tl.int32), 0))"
                   "  # past the last block a row can force or pick")
        stop = "NB" if end is None else "n_end"
        if g is not None and "force" in ops:
            self._cap_rows(ops, g, stop, step)
        self.c(f"for n0 in range(0, {stop}, {step}):{note}")

    def _cap_rows(self, ops, g, stop: str, step: str) -> None:
        """Each row's best-free buffer capped at the row's free slots, K less the forced
        blocks that count against k (n_counted, from a walk over the chunks' forced masks, no
        scores; the main walk then leaves it alone): the slots past the cap hold +inf (never
        the worst, never stored), so a chunk's merge takes at most k_steps candidates and its
        bar is the row's n_cap-th best so far. (MoBA, own block forced, top-3: two steps a
        chunk instead of three; H100 at 64k: the router 0.44 -> 0.38 ms,
        docs/perf-notes.md.)"""
        c = self.c
        force = self.ex.blocks(ops["force"], "I", "N")
        c(f"for n0 in range(0, {stop}, {step}):")
        with c.indent():
            c(f"o_n = n0 + tl.arange(0, {step})")
            c("N = o_n[None, :]")
            c("m_force = (o_n < NB)[None, :] & m_r[:, None] & " + force)
            self._count_forced(g)
        c("n_cap = tl.maximum(K - n_counted, 0)  # [BQ] each row's free slots")
        c("b_val = tl.where(tl.arange(0, KB)[None, :] < n_cap[:, None], b_val, float('inf'))")
        c("k_steps = tl.max(n_cap, 0)  # merge steps a chunk, at most")
        self.capped = True

    def _force_rows(self, ops, g) -> None:
        """The query-tiled kernels' forced and forbidden blocks of a chunk ([BQ, C]): forced
        ones stored at once, in order, the rest left as candidates (m_cand)."""
        c = self.c
        force = self.ex.blocks(ops["force"], "I", "N") if "force" in ops else None
        forbid = self.ex.blocks(ops["forbid"], "I", "N") if "forbid" in ops else None
        c(f"m_force = m_n[None, :] & m_r[:, None] & {force if force else 'False'}")
        c(f"m_forbid = {forbid if forbid else '(N < 0)'}")
        c("m_cand = m_n[None, :] & m_r[:, None] & ~m_force & ~m_forbid  # [BQ, C]")
        c("o_pos = n_forced[:, None] + tl.cumsum(m_force.to(tl.int32), 1) - 1")
        c("tl.store(p_sel[:, None] + o_pos, o_n[None, :] + tl.zeros([BQ, C], dtype=tl.int32), "
          "mask=m_force & (o_pos < KS))")
        c("n_forced += tl.sum(m_force.to(tl.int32), 1)")
        if not self.capped:  # (else counted before the walk: _cap_rows)
            self._count_forced(g)

    def _count_forced(self, g) -> None:
        """n_counted += the chunk's forced blocks (m_force, [BQ, C]) that count against k."""
        self.c(f"n_counted += tl.sum((m_force & (N * {g.stride} <= I)).to(tl.int32), 1)"
               "  # forced blocks that have started count against k")

    # k up to which the query-tiled merge's steps are unrolled (tl.static_range), each under a
    # test the whole tile takes alike, instead of a loop with a data-dependent trip count
    # (H100, MoBA at 64k: the router 0.373 -> 0.304 ms, docs/perf-notes.md, session 22)
    UNROLL_K = 4

    def _merge_rows(self) -> None:
        """The query-tiled kernels' merge of a chunk's candidates into each row's best-K
        buffer: the best candidate a step (lowest index first among equals), at most K steps
        (k_steps with capped buffers); uncapped, as many as the row with the most candidates
        above its buffer's worst has. For k <= UNROLL_K the steps are unrolled, each run when
        the tile needs it (a step without candidates, or with one below the worst, changes
        nothing, so capped buffers skip the pruning of the candidates below the worst). (A
        merge by rank, every block's place counted in [BQ, KB, C] and [BQ, C, C] comparisons,
        ran NSA's forward at 64k 67.4 -> 103.5 ms on the H100: docs/perf-notes.md.)"""
        c = self.c
        unrolled = self.st.k <= self.UNROLL_K
        if not (unrolled and self.capped):  # (there a step's test drops them: no count needed)
            c("m_cand = m_cand & (b_score >= tl.min(b_val, 1)[:, None])  # (the worst only rises)")
        count = "tl.max(tl.sum(m_cand.to(tl.int32), 1), 0)"
        if unrolled:
            if self.capped:
                steps = "k_steps"
            else:
                c(f"n_steps = tl.minimum({count}, K)  # the row with the most candidates")
                steps = "n_steps"
            c("for _s in tl.static_range(K):  # the chunk's best candidates, row by row")
            with c.indent():
                c(f"if _s < {steps}:")
                with c.indent():
                    self._merge_step()
        else:
            steps = "k_steps" if self.capped else "K"
            c(f"for _ in range(tl.minimum({count}, {steps})):"
              "  # the chunk's best candidates, row by row")
            with c.indent():
                self._merge_step()

    def _merge_step(self) -> None:
        """One step of `_merge_rows`: each row's best candidate replaces its buffer's worst
        when it beats it."""
        c = self.c
        c("c_val = tl.max(tl.where(m_cand, b_score, float('-inf')), 1)  # [BQ]")
        c("c_idx = tl.min(tl.where(m_cand & (b_score == c_val[:, None]), N, 2147483647), 1)")
        c("w_val = tl.min(b_val, 1)")
        c("w_idx = tl.max(tl.where(b_val == w_val[:, None], b_idx, -1), 1)")
        c("better = (c_idx < 2147483647) & ((c_val > w_val) | ((c_val == w_val) & "
          "(c_idx < w_idx)))")
        c("m_slot = (b_idx == w_idx[:, None]) & better[:, None]")
        c("b_val = tl.where(m_slot, c_val[:, None], b_val)")
        c("b_idx = tl.where(m_slot, c_idx[:, None], b_idx)")
        c("m_cand = m_cand & (N != c_idx[:, None])")

    def _store_rows(self) -> None:
        """The query-tiled kernels' final store: forced blocks first, then each row's best
        free blocks by rank while slots remain."""
        c = self.c
        c("# forced blocks first, then the best free blocks while slots remain")
        c("n_free = tl.maximum(K - n_counted, 0)  # [BQ]")
        c("b_beats = ((b_val[:, :, None] > b_val[:, None, :]) | ((b_val[:, :, None] == "
          "b_val[:, None, :]) & (b_idx[:, :, None] < b_idx[:, None, :])))"
          + (" & (b_idx[:, :, None] < 2147483000)  # [BQ, KB, KB] (blocks only: the capped "
             "slots' +inf beats none)" if self.capped else "  # [BQ, KB, KB]"))
        c("b_rank = tl.sum(b_beats.to(tl.int32), 1)  # [BQ, KB]")
        c("m_keep = (b_idx < 2147483000) & (b_rank < n_free[:, None]) & m_r[:, None]")
        c("o_pos = n_forced[:, None] + b_rank")
        c("tl.store(p_sel[:, None] + o_pos, b_idx, mask=m_keep & (o_pos < KS))")

    def _merge_loop(self) -> None:
        """Merge a chunk's candidates (m_cand, b_score over o_n) into the best-K buffer (b_val,
        b_idx): the best candidate a step, lowest index first among equals. A candidate below
        the buffer's worst can never enter (the worst only rises), so only the others are
        walked, at most K of them."""
        c = self.c
        c("m_cand = m_cand & (b_score >= tl.min(b_val, 0))")
        c("for _ in range(tl.minimum(tl.sum(m_cand.to(tl.int32), 0), K)):")
        with c.indent():
            c("c_val = tl.max(tl.where(m_cand, b_score, float('-inf')), 0)")
            c("c_idx = tl.min(tl.where(m_cand & (b_score == c_val), o_n, 2147483647), 0)")
            c("w_val = tl.min(b_val, 0)")
            c("w_idx = tl.max(tl.where(b_val == w_val, b_idx, -1), 0)")
            c("better = (c_idx < 2147483647) & ((c_val > w_val) | ((c_val == w_val) & "
              "(c_idx < w_idx)))")
            c("m_slot = (b_idx == w_idx) & better")
            c("b_val = tl.where(m_slot, c_val, b_val)")
            c("b_idx = tl.where(m_slot, c_idx, b_idx)")
            c("m_cand = m_cand & (o_n != c_idx)")

    def _walk_end(self, ops, I: str) -> str | None:
        """Where a select kernel's walk over the grid may stop for queries I: past the last
        block any of them can force or pick (`Exprs.blocks_end` of the forced blocks and of
        the blocks not forbidden), or None: walk the whole grid."""
        if "forbid" not in ops:
            return None
        end = self.ex.blocks_end(ops["forbid"], I, negated=True)
        if end is not None and "force" in ops:
            fe = self.ex.blocks_end(ops["force"], I)
            end = None if fe is None else f"tl.maximum({fe}, {end})"
        return end

    def emit(self) -> str:
        if self.tiled:
            return self.emit_tiled()
        if self.tree_tiled:
            return self.emit_tree()
        st, ir, c = self.st, self.ir, self.c
        n = ir.node(st.node)
        ops = ir.operands(st.node)
        g = st.grid
        kname = f"select_{st.name}_fwd_kernel"
        if self.SCORED:
            self.args.append("scores")
        self._pids()
        c("# rows: the query heads this list serves (one head, or the GQA group)")
        c("o_r = tl.arange(0, RP)")
        c("m_r = o_r < R")
        c("o_h = i_hs * R + o_r  # [RP] query heads")
        c("i_hk = (i_hs * R) // G")
        c("o_i = tl.zeros([RP], dtype=tl.int32) + i_t")
        c("o_d = tl.arange(0, BD)")
        c("m_d = o_d < D")
        row = self.QROW.format("i_t")
        if not self.SCORED:
            c(f"p_q = q + ({row}.to(tl.int64) * H + o_h)[:, None] * D + o_d[None, :]")
            c("b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.)  # [RP, BD]")
        c(f"p_sel = sel + ({row}.to(tl.int64) * HS + i_hs) * KS")
        c("tl.store(p_sel + tl.arange(0, KSP), tl.full([KSP], -1, tl.int32), "
          "mask=tl.arange(0, KSP) < KS)")
        for dep in sorted(self.ex.lists(st.node) - {st.node}):
            c(f"p_sel{dep} = sel{dep} + ({row}.to(tl.int64) * HS{dep} + "
              f"(i_hk if SH{dep} else i_hs * R)) * KS{dep}")
            c(f"b_sel{dep} = tl.load(p_sel{dep} + tl.arange(0, KSP{dep}), "
              f"mask=tl.arange(0, KSP{dep}) < KS{dep}, other=-1)")
            self.args += [f"sel{dep}"]
        c(f"NB = NB{g.node}")
        if self.SCORED:
            c("p_s = scores + ((i_b * TS + i_t - Q0).to(tl.int64) * HS + i_hs) * NB  # this "
              "row's scores")
        c("n_forced = 0")
        c("n_counted = 0")
        c("b_val = tl.full([KB], float('-inf'), tl.float32)  # the best free blocks so far")
        c("b_idx = 2147483000 + tl.arange(0, KB)  # (distinct sentinels: empty slots)")
        end = self._walk_end(ops, "i_t") if st.op == "topk" else None
        if end is not None:
            c(f"n_end = tl.minimum(NB, {end})  # past the last block this query can force or pick")
        leaf = score_chain(ir, ops["score"])[2] if st.op == "topk" and not self.SCORED else None
        if leaf is not None and ir.node(leaf)["op"] == "probs":  # the rows' lse, for `score`
            br = ir.operand(leaf, "branch")
            c(f"b_lse = tl.load(lse{br} + {row}.to(tl.int64) * H + o_h, mask=m_r, other=0.)  "
              f"# [RP] the rows' lse of `{ir.node(br)['name'] or br}`")
        c(f"for n0 in range(0, {'NB' if end is None else 'n_end'}, C):")
        with c.indent():
            c("o_n = n0 + tl.arange(0, C)")
            c("N = o_n[None, :]  # [1, C]")
            c("m_n = o_n < NB")
            if st.op == "topk":
                force = self.ex.blocks(ops["force"], "i_t", "N") if "force" in ops else None
                forbid = self.ex.blocks(ops["forbid"], "i_t", "N") if "forbid" in ops else None
                c(f"m_force = m_n & {'tl.sum(' + force + '.to(tl.int32), 0) > 0' if force else 'False'}")
                c(f"m_forbid = {'tl.sum(' + forbid + '.to(tl.int32), 0) > 0' if forbid else 'o_n < 0'}")
            else:  # random: n blocks by hash among those ending before the query's block starts
                a = n["args"]
                c(f"i_qb = i_t // {g.stride}")
                c("m_force = o_n < 0")
                c(f"m_forbid = ~(o_n * {g.stride} + {g.length - 1} < i_qb * {g.stride})")
            c("m_cand = m_n & ~m_force & ~m_forbid")
            c("o_pos = n_forced + tl.cumsum(m_force.to(tl.int32), 0) - 1")
            c("tl.store(p_sel + o_pos, o_n, mask=m_force & (o_pos < KS))")
            c("n_forced += tl.sum(m_force.to(tl.int32), 0)")
            c(f"n_counted += tl.sum((m_force & (o_n * {g.stride} <= i_t)).to(tl.int32), 0)"
              "  # forced blocks that have started count against k")
            c("if tl.sum(m_cand.to(tl.int32), 0) > 0:  # score only chunks with candidates "
              "(not the future's)")
            with c.indent():
                if self.SCORED:
                    c("b_score = tl.load(p_s + o_n, mask=m_cand, other=float('-inf'))  # [C]")
                elif st.op == "topk" and ir.node(ops["score"])["op"] == "groupsum":
                    inner = self.score(ir.operand(ops["score"], "score"), "o_n")
                    c(f"b_score = tl.sum(tl.where(m_r[:, None], {inner}, 0.), 0)  # [C] the "
                      f"group's sum")
                elif st.op == "topk":
                    score = self.score(ops["score"], "o_n")
                    c(f"b_score = tl.sum(tl.where(o_r[:, None] == 0, {score}, 0.), 0)  # [C] "
                      f"(row 0: the head, or the group once summed)")
                else:
                    c(f"b_score = _hash24({n['args']['seed']}, i_qb, o_n)")
                self._merge_loop()
        c("# forced blocks first, then the best free blocks while slots remain")
        c("n_free = tl.maximum(K - n_counted, 0)")
        c("b_beats = ((b_val[:, None] > b_val[None, :]) | ((b_val[:, None] == b_val[None, :]) & "
          "(b_idx[:, None] < b_idx[None, :])))  # [KB, KB]: row beats column")
        c("b_rank = tl.sum(b_beats.to(tl.int32), 0)")
        c("m_keep = (b_idx < 2147483000) & (b_rank < n_free)")
        c("tl.store(p_sel + n_forced + b_rank, b_idx, mask=m_keep & (n_forced + b_rank < KS))")
        body = c.text()
        extra = "".join(f"{x}, " for x in self.args)
        pools = {p: self.ex.grid(p).node for p in self.pools}
        nbs = sorted({g.node} | set(pools.values()) | self.grids | {
            self.ex.grid(ir.operand(b, "keys")).node for b in self.branches})
        list_deps = sorted(self.ex.lists(st.node) - {st.node})
        consts = "".join(f"HS{d}: tl.constexpr, SH{d}: tl.constexpr, KS{d}, KSP{d}: tl.constexpr, "
                         for d in list_deps)
        sig = (f"q, sel, {extra}T, {self.SCALARS}{''.join(f'NB{x}, ' for x in nbs)}{consts}"
               f"H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, HS: tl.constexpr, "
               f"R: tl.constexpr, RP: tl.constexpr, SHARED: tl.constexpr, D: tl.constexpr, "
               f"BD: tl.constexpr, K: tl.constexpr, KB: tl.constexpr, KS, KSP: tl.constexpr, "
               f"C: tl.constexpr, IEEE: tl.constexpr")
        why = self.WHY if self.WHY is not None else {"deps": " (it reads other block lists)"}.get(
            select_kernel(self.ir, self.ex, st), "")
        doc = (f'    """Gate scores and top-k for `{st.name}` ({st.op}, k={st.k}, one list per '
               f'{st.heads}; one query per program{why}): writes the selected block indices of '
               f'blocks(len={g.length}, stride={g.stride}) to sel[b, t, h, :KS], -1 padded."""')
        self.signature = sig
        self.nbs = nbs
        self.list_deps = list_deps
        return f"\n@triton.jit\ndef {kname}(\n    {sig},\n):\n{doc}\n{body}\n"

    def emit_tiled(self) -> str:
        st, ir, c = self.st, self.ir, self.c
        ops = ir.operands(st.node)
        g = st.grid
        score = ir.operand(st.node, "score")
        pool = ir.operand(score, "pool")
        kp = self._pool(pool)
        pg = self.ex.grid(pool).node
        c("i_tq, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)")
        c("# rows: BQ consecutive queries of one head")
        c("o_i = i_tq * BQ + tl.arange(0, BQ)  # [BQ]")
        c("m_r = o_i < T")
        c("I = o_i[:, None]  # [BQ, 1]")
        c("i_hk = i_h // G")
        c("o_d = tl.arange(0, BD)")
        c("m_d = o_d < D")
        c("p_q = q + ((i_b * T + o_i).to(tl.int64) * H + i_h)[:, None] * D + o_d[None, :]")
        c("b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.)  # [BQ, BD]")
        self._init_rows(g, "i_h")
        self._walk_rows(ops, "C", g=g)
        with c.indent():
            c("o_n = n0 + tl.arange(0, C)")
            c("N = o_n[None, :]  # [1, C]")
            c("m_n = o_n < NB")
            c(f"m_nb = (o_n >= 0) & (o_n < NB{pg})")
            c(f"b_kp = tl.load({kp} + ((i_b * NB{pg} + o_n).to(tl.int64) * HKV + i_hk)[:, None] "
              f"* D + o_d[None, :], mask=m_nb[:, None] & m_d[None, :], other=0.)  # [C, BD]")
            c(f"b_score = tl.dot(b_q.to(b_kp.dtype), tl.trans(b_kp), input_precision='ieee' if IEEE else "
              f"'tf32') * {float(ir.node(score)['args']['scale'])!r}  # [BQ, C]")
            self._force_rows(ops, g)
            self._merge_rows()
        self._store_rows()
        body = c.text()
        extra = "".join(f"{x}, " for x in self.args)
        nbs = sorted({g.node, pg})
        sig = (f"q, sel, {extra}T, {''.join(f'NB{x}, ' for x in nbs)}"
               f"H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, HS: tl.constexpr, "
               f"D: tl.constexpr, BD: tl.constexpr, K: tl.constexpr, KB: tl.constexpr, KS, "
               f"KSP: tl.constexpr, BQ: tl.constexpr, C: tl.constexpr, IEEE: tl.constexpr")
        doc = (f'    """Gate scores and top-k for `{st.name}` (topk, k={st.k}, one list per head; '
               f'a tile of BQ queries per program): writes the selected block indices of '
               f'blocks(len={g.length}, stride={g.stride}) to sel[b, t, h, :KS], -1 padded."""')
        self.signature = sig
        self.nbs = nbs
        self.list_deps = []
        return f"\n@triton.jit\ndef select_{st.name}_fwd_kernel(\n    {sig},\n):\n{doc}\n{body}\n"


    def emit_tree(self) -> str:
        """The query-tiled select kernel for a score tree (`remap`s and `groupsum`s over a
        `dot` or `probs`). Rows: BQ consecutive queries, each with the RP heads of its head
        set (BR = BQ * RP rows for per-head values). For each chunk of the list's grid (C
        columns, CV of them real), the leaf is evaluated once over the source chunk that the
        remaps need ([BR, CW] from one product of the pooled keys), summed over the group's
        heads ([BQ, CW]: groupsum commutes with remap, so the remaps run on query rows), then
        each remap is one product with its [CW_src, CW_dst] overlap weights."""
        st, c = self.st, self.c
        ops, g, remaps, sums, leaf = self._tree_chain()
        self._tree_rows(leaf, "i_tq * BQ", "T")
        self._init_rows(g, "i_hs")
        self._tree_walk(ops)
        with c.indent():
            self._force_rows(ops, g)
            c("if tl.max(tl.sum(m_cand.to(tl.int32), 1), 0) > 0:  # score chunks with candidates")
            with c.indent():
                self._tree_score(ops["score"], remaps, sums, leaf)
                self._merge_rows()
        self._store_rows()
        body, sig = self._tree_kernel(g, remaps, "q, sel, ", "",
                                      "K: tl.constexpr, KB: tl.constexpr, KS, KSP: tl.constexpr, ")
        doc = (f'    """Gate scores and top-k for `{st.name}` (topk, k={st.k}, one list per '
               f'{st.heads}; query-tiled: BQ queries x {"the group" if sums else "one head"} '
               f'per program, the score tree evaluated once per chunk of each grid, remaps as '
               f'products with overlap weights): writes the selected block indices of '
               f'blocks(len={g.length}, stride={g.stride}) to sel[b, t, h, :KS], -1 padded."""')
        self.signature = sig
        return f"\n@triton.jit\ndef select_{st.name}_fwd_kernel(\n    {sig},\n):\n{doc}\n{body}\n"

    def _tree_chain(self):
        """The stage's operands, grid, and its score as a chain: the remaps that move scores
        (identities dropped), the number of group sums, the leaf."""
        ops = self.ir.operands(self.st.node)
        remaps, sums, leaf = score_chain(self.ir, ops["score"])
        return ops, self.st.grid, [r for r in remaps if not self._identity(r)], sums, leaf

    def _tree_kernel(self, g, remaps: list[int], ptrs: str, scalars: str,
                     topk: str) -> tuple[str, str]:
        """The body and signature of a tree kernel (`emit_tree`, `emit_scores`): pointers
        `ptrs`, the score's own arguments, T, `scalars`, the grids' block counts, the sizes
        (`topk`: the top-k's) and chunk widths; sets `nbs`, `list_deps` (none: a tree reads
        no other lists) and `remap_shapes` for the host."""
        ir = self.ir
        self.list_deps = []
        extra = "".join(f"{x}, " for x in self.args)
        self.nbs = sorted({g.node} | set(self._tree_nbs))
        widths = "".join(f"CW{i + 1}: tl.constexpr, " for i in range(len(remaps)))
        sig = (f"{ptrs}{extra}T, {scalars}{''.join(f'NB{x}, ' for x in self.nbs)}"
               f"H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, HS: tl.constexpr, "
               f"R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, "
               f"{topk}BQ: tl.constexpr, C: tl.constexpr, CV: tl.constexpr, {widths}"
               f"IEEE: tl.constexpr")
        self.remap_shapes = [(self.ex.grid(r).stride, self.ex.grid(r).length,
                              self.ex.grid(ir.operand(r, "score")).stride,
                              self.ex.grid(ir.operand(r, "score")).length) for r in remaps]
        return self.c.text(), sig

    def _tree_rows(self, leaf: int, first: str, end: str) -> None:
        """The query-tiled tree kernels' rows: BQ consecutive queries from `first` (those
        before `end` real), their q rows and, for a `probs` leaf, their lse."""
        c, ir = self.c, self.ir
        c("i_tq, i_hs, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)")
        c("# rows: BQ consecutive queries (o_i); per-head values have BQ * RP rows (o_iq, o_h)")
        c(f"o_i = {first} + tl.arange(0, BQ)  # [BQ]")
        c(f"m_r = o_i < {end}")
        c("I = o_i[:, None]  # [BQ, 1]")
        c("o_row = tl.arange(0, BQ * RP)")
        c(f"o_iq = {first} + o_row // RP  # [BR] the query of each row")
        c("o_h = i_hs * R + o_row % RP  # [BR] its head")
        c(f"m_rq = (o_row % RP < R) & (o_iq < {end})")
        c("i_hk = (i_hs * R) // G")
        c("o_d = tl.arange(0, BD)")
        c("m_d = o_d < D")
        c("p_q = q + ((i_b * T + o_iq).to(tl.int64) * H + o_h)[:, None] * D + o_d[None, :]")
        c("b_q = tl.load(p_q, mask=m_rq[:, None] & m_d[None, :], other=0.)  # [BR, BD]")
        if ir.node(leaf)["op"] == "probs":  # the rows' lse, for the leaf's probabilities
            br = ir.operand(leaf, "branch")
            c(f"b_lse = tl.load(lse{br} + (i_b * T + o_iq).to(tl.int64) * H + o_h, mask=m_rq, "
              f"other=0.)  # [BR]")

    def _tree_walk(self, ops) -> None:
        """The query-tiled tree kernels' loop over chunks of CV blocks (o_n, m_n)."""
        c = self.c
        c("o_c = tl.arange(0, C)")
        self._walk_rows(ops, "CV", "  # chunks of CV blocks (C columns, the last C - CV unused)")
        with c.indent():
            c("o_n = n0 + o_c")
            c("N = o_n[None, :]  # [1, C]")
            c("m_n = (o_c < CV) & (o_n < NB)")

    def emit_scores(self) -> str:
        """The scoring half of a split select (a tree score): BQ queries x the head set's
        heads per program, as `emit_tree` scores them, every block a row can force or pick
        written to `scores` [B, TS, HS, NB] (float32) for the queries [Q0, Q0 + TQ); the
        per-query top-k kernel (ScoredSelectEmitter) reads them. Split so that the products
        run on query tiles while the top-k's dependent steps run one query a program."""
        st, c = self.st, self.c
        ops, g, remaps, sums, leaf = self._tree_chain()
        self._tree_rows(leaf, "Q0 + i_tq * BQ", "Q0 + TQ")
        c(f"NB = NB{g.node}")
        c("p_s = scores + ((i_b * TS + o_i - Q0).to(tl.int64) * HS + i_hs) * NB  # [BQ] rows")
        self._tree_walk(ops)
        with c.indent():
            self._tree_score(ops["score"], remaps, sums, leaf)
            c("tl.store(p_s[:, None] + N, b_score, mask=m_r[:, None] & m_n[None, :])")
        body, sig = self._tree_kernel(g, remaps, "q, scores, ", "Q0, TQ, TS, ", "")
        doc = (f'    """Gate scores of `{st.name}` (one list per {st.heads}) for queries [Q0, '
               f'Q0 + TQ): BQ queries x {"the group" if sums else "one head"} per program, '
               f'written to scores[b, t - Q0, h, n] for the blocks n of blocks(len={g.length}, '
               f'stride={g.stride}) a query can force or pick; the top-k kernel reads them."""')
        return f"\n@triton.jit\ndef select_{st.name}_score_kernel(\n    {sig},\n):\n{doc}\n{body}\n"

    def _identity(self, remap: int) -> bool:
        """A remap between two grids of equal blocks that do not overlap (NSA as fla: one
        block size for compression and selection) moves every score onto itself."""
        gs, gd = self.ex.grid(self.ir.operand(remap, "score")), self.ex.grid(remap)
        return gs.length == gs.stride == gd.length == gd.stride

    def _tree_score(self, top: int, remaps: list[int], sums: int, leaf: int) -> None:
        """Lines computing b_score [BQ, C] for the chunk at n0 (see emit_tree)."""
        c, ir = self.c, self.ir
        self._tree_nbs = set()
        # chunk starts, top down: level 0 is the list's grid (n0, C columns); level i + 1 the
        # source of remap i, starting at the first source block overlapping level i's start.
        # Starts can be negative: floor division on non-negative numbers by an offset `off`
        # (a multiple of the stride) keeps to integer arithmetic that means the same in the
        # interpreter and compiled (Triton's // truncates).
        starts, widths, low = ["n0"], ["C"], 0  # low: a bound on -start
        for i, r in enumerate(remaps):
            gs, gd = self.ex.grid(ir.operand(r, "score")), self.ex.grid(r)
            self._tree_nbs |= {gs.node, gd.node}
            k = (low * gd.stride + gs.length) // gs.stride + 2
            c(f"i_s{i + 1} = ({starts[-1]} * {gd.stride} - {gs.length} + {k * gs.stride}) // "
              f"{gs.stride} - {k - 1}  # first block of blocks(len={gs.length}, "
              f"stride={gs.stride}) overlapping the chunk")
            starts.append(f"i_s{i + 1}")
            widths.append(f"CW{i + 1}")
            low = k
        o_s, W = f"o_s{len(remaps)}", widths[-1]
        c(f"{o_s} = {starts[-1]} + tl.arange(0, {W})" if remaps else f"{o_s} = o_n")
        n = ir.node(leaf)
        lops = ir.operands(leaf)
        if n["op"] == "dot":
            pool = lops["pool"]
            scale = f"{float(n['args']['scale'])!r}"
        else:
            br = lops["branch"]
            pool = ir.operand(br, "keys")
            if br not in self.branches:
                self.branches[br] = f"lse{br}"
                self.args += [f"lse{br}", f"scale{br}"]
            scale = f"scale{br}"
        kp = self._pool(pool)
        pg = self.ex.grid(pool).node
        self._tree_nbs.add(pg)
        c(f"m_nb = ({o_s} >= 0) & ({o_s} < NB{pg})  # [{W}]")
        c(f"b_kp = tl.load({kp} + ((i_b * NB{pg} + {o_s}).to(tl.int64) * HKV + i_hk)[:, None] "
          f"* D + o_d[None, :], mask=m_nb[:, None] & m_d[None, :], other=0.)  # [{W}, BD]")
        c(f"b_x = tl.dot(b_q.to(b_kp.dtype), tl.trans(b_kp), input_precision='ieee' if IEEE else 'tf32') * "
          f"{scale}  # [BR, {W}]")
        if n["op"] == "probs":
            br = lops["branch"]
            vis = self.ex.blocks(ir.operand(br, "blocks"), "o_iq[:, None]", f"{o_s}[None, :]")
            c(f"b_x = tl.where(m_nb[None, :] & m_rq[:, None] & {vis}, tl.exp(b_x - "
              f"b_lse[:, None]), 0.)  # [BR, {W}] probabilities of "
              f"`{ir.node(br)['name'] or br}`")
        if sums:
            c(f"b_x = tl.sum(tl.reshape(tl.where(m_rq[:, None], b_x, 0.), [BQ, RP, {W}]), 1)"
              f"  # [BQ, {W}]: summed over the group's heads")
            for _ in range(sums - 1):
                c("b_x = b_x * R  # a group sum of a group sum: R equal rows")
        for i in reversed(range(len(remaps))):
            r = remaps[i]
            gs, gd = self.ex.grid(ir.operand(r, "score")), self.ex.grid(r)
            src, dst = f"o_s{i + 1}", ("o_n" if i == 0 else f"o_s{i}")
            if i > 0:
                c(f"{dst} = {starts[i]} + tl.arange(0, {widths[i]})")
            c(f"b_w = (tl.minimum({src}[:, None] * {gs.stride} + {gs.length}, {dst}[None, :] * "
              f"{gd.stride} + {gd.length}) - tl.maximum({src}[:, None] * {gs.stride}, "
              f"{dst}[None, :] * {gd.stride})).to(tl.float32) / {gs.stride}")
            c(f"b_w = tl.where((({src} >= 0) & ({src} < NB{gs.node}))[:, None], "
              f"tl.maximum(b_w, 0.), 0.)  # [{widths[i + 1]}, {widths[i]}] token overlap")
            c(f"b_x = tl.dot(b_x, b_w, input_precision='ieee')  # [BQ, {widths[i]}] "
              f"remapped onto blocks(len={gd.length}, stride={gd.stride})")
        c("b_score = b_x  # [BQ, C]")


class QuerySelectEmitter(SelectEmitter):
    """The per-query select kernel of a stage that has a query-tiled one: launched instead
    with SPARSEDSL_SELECT_TILE=query."""
    tiled = tree_tiled = False
    WHY = ": the query-tiled kernel's fallback, run with SPARSEDSL_SELECT_TILE=query"


class ScoredSelectEmitter(SelectEmitter):
    """The top-k half of a split select: the per-query kernel for queries Q0 + program 0,
    its scores read from the scratch that the score kernel (`emit_scores`) wrote."""
    tiled = tree_tiled = False
    SCORED = True
    SCALARS = "Q0, TS, "
    WHY = ": scores read from `scores`, written by the score kernel for queries Q0.. (row t - Q0)"

    def _pids(self) -> None:
        self.c("i_t, i_hs, i_b = Q0 + tl.program_id(0), tl.program_id(1), tl.program_id(2)")


# ------------------------------------------------------------------------ attend
# Every attention kernel keeps scores and running maxima in log2 units (scores times
# scale * log2 e, then exp2: one multiply a score fewer than exp) and stores log-sum-exps in
# natural log; the constant in the kernels' accumulator dtype (exact in float64 kernels)
L2E_DEF = ("L2E = tl.full([], 1.4426950408889634, tl.float32)  # log2(e): softmax in base 2, "
           "exp(x) = exp2(x * L2E)")


def dout_gate(plan: KernelPlan, st: AttendStage, gi: int) -> str | None:
    """The gate g of do_g = g * dO, the gradient reaching softmax group gi of stage `st`
    (None: do_g = dO). An earlier stage's group gets the gate of the final stage's group
    that holds its output: its backward scales dO itself, no do_g buffer."""
    if st.writes_lse:
        for fgi, grp in enumerate(plan.final.groups):
            if any(b.precomputed and b.node == st.node for b in grp):
                return dout_gate(plan, plan.final, fgi)
        return None
    return st.gates[gi] if st.combine == "mix" else None


def own_delta(plan: KernelPlan, st: AttendStage) -> bool:
    """Whether earlier stage `st` computes its own delta (and its gate's gradient): the final
    stage's group holding its output holds nothing else (saved_outputs: ("stage", n)), so
    delta = rowsum(do_g * o) = rowsum(p * dp) over this stage's keys alone."""
    return st.writes_lse and ("stage", st.node) in saved_outputs(plan.final)


def saved_outputs(st: AttendStage) -> list[tuple]:
    """Where the backward finds each softmax group's normalised output o_g (for delta_g =
    rowsum(do_g * o_g) and the gates' gradients), for the final stage `st`:
      ("stage", n): the group is the earlier stage n's branch alone: nothing is kept;
                    that stage's backward sums delta_g = rowsum(p * dp) over its own keys
                    (`own_delta`), and the gate's gradient with it;
      ("out",):     one group, no gate: the stage's output itself, as FlashAttention keeps;
      ("f32",):     written in float32: the group has pooled keys, whose shared bias gets no
                    gradient only if delta matches p . dp summed over them (rowsum(ds) = 0);
      ("native",):  written in q's dtype."""
    plans = []
    for grp in st.groups:
        if len(grp) == 1 and grp[0].precomputed:
            plans.append(("stage", grp[0].node))
        elif len(st.groups) == 1 and st.combine != "mix" and not any(b.pooled for b in grp):
            plans.append(("out",))
        else:
            plans.append(("f32",) if any(b.pooled for b in grp) else ("native",))
    return plans


class AttendEmitter:
    """The forward attention kernel of a stage: online softmax over every key source."""

    mode = "fwd"
    head_args = "o"
    extra_consts = ", SAVE: tl.constexpr"
    QROW, SCALARS = SelectEmitter.QROW, SelectEmitter.SCALARS

    def __init__(self, ir: IR, plan: KernelPlan, ex: Exprs, st: AttendStage):
        self.ir, self.plan, self.ex, self.st = ir, plan, ex, st
        self.c = Code()
        self.args: list[str] = []
        self.nbs: set[int] = set()
        self.lists: set[int] = set()
        self.deferred: list = []  # (group, branch) whose output `_finish` reads
        # while a walk's keys are the token run j0 + [0, BN) (not a gather): `_load_kv` may
        # read them as one tile (the tile layout: through a tensor descriptor, `tma_used`)
        self.from_j0 = False
        # while a walk's keys are the BN-key chunk t0 of a block list's slots
        # (list, block length, stride): the row layout may read a chunk inside one block as
        # one tile (`_run_keys`)
        self.list_run = None
        self.tma_used = False

    # a group that is one earlier stage's output is read at the end (`_deferred_group`)
    defer_outputs = True

    def _doc(self, combine: str) -> str:
        st = self.st
        extra = (" Also writes the log-sum-exp for the gates that read its probabilities."
                 if st.writes_lse else
                 " With SAVE, also writes each group's output and log-sum-exp for the backward.")
        return f'    """Attention `{st.name}` ({st.layout} layout): {combine}.{extra}"""'

    def _prologue(self) -> None:
        pass

    def _arg(self, name: str) -> None:
        if name not in self.args:
            self.args.append(name)

    def emit(self) -> str:
        st, c, ir = self.st, self.c, self.ir
        tile = st.layout == "tile"
        self._pids()
        if tile:
            c("# a tile of BM consecutive queries of one head")
            c("o_i = i_t * BM + tl.arange(0, RP)  # [RP] query positions")
            c("m_r = o_i < T")
            c("o_h = tl.zeros([RP], dtype=tl.int32) + i_h")
            c("i_hk = i_h // G")
            c("i_lo = i_t * BM")
            c("i_hi = tl.minimum(i_lo + BM, T)")
        else:
            c("# one query position; rows are the heads that share its block lists")
            c("o_r = tl.arange(0, RP)")
            c("m_r = o_r < R")
            c("o_h = i_h * R + o_r  # [RP] query heads")
            c("i_hk = (i_h * R) // G")
            c("o_i = tl.zeros([RP], dtype=tl.int32) + i_t")
            c("i_lo = i_t")
            c("i_hi = i_t + 1")
        c("o_d = tl.arange(0, BD)")
        c("m_d = o_d < D")
        c("o_dv = tl.arange(0, BDV)")
        c("m_dv = o_dv < DV")
        c(f"p_q = q + ({self.QROW.format('o_i')}.to(tl.int64) * H + o_h)[:, None] * D + "
          f"o_d[None, :]")
        c("b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.)  # [RP, BD]")
        c("I = o_i[:, None]  # [RP, 1]")
        c(L2E_DEF)
        # block lists read by this stage
        for grp in st.groups:
            for br in grp:
                if not br.precomputed:
                    self.lists |= self.ex.lists(br.node)
        for s in sorted(self.lists):
            self._arg(f"sel{s}")
            c(f"p_sel{s} = sel{s} + ({self.QROW.format('i_t')}.to(tl.int64) * HS{s} + "
              f"(i_hk if SH{s} else i_h * R)) * KS{s}")
            c(f"b_sel{s} = tl.load(p_sel{s} + tl.arange(0, KSP{s}), "
              f"mask=tl.arange(0, KSP{s}) < KS{s}, other=-1)  # [KSP{s}] listed blocks")
        self._prologue()
        for gi, grp in enumerate(st.groups):
            self._group(gi, grp)
        self._finish()
        body = c.text()
        name = f"attend_{st.name}_{self.mode}_kernel"
        consts = "".join(f"HS{s}: tl.constexpr, SH{s}: tl.constexpr, KS{s}, KSP{s}: tl.constexpr, "
                         for s in sorted(self.lists))
        sig = (f"q, k, v, {self.head_args}, {''.join(a + ', ' for a in self.args)}T, {self.SCALARS}"
               f"{''.join(f'NB{x}, ' for x in sorted(self.nbs))}{consts}"
               f"H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, R: tl.constexpr, "
               f"RP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, "
               f"BDV: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr"
               f"{self.extra_consts}")
        self.signature = sig
        combine = {"single": "one branch", "union": "one softmax over the union of the branches",
                   "mix": "a gated sum of separately normalised branches"}[st.combine]
        doc = self._doc(combine)
        return f"\n@triton.jit\ndef {name}(\n    {sig},\n):\n{doc}\n{body}\n"

    # one softmax group: online softmax over every source of every branch in it
    def _group(self, gi: int, grp: tuple[BranchPlan, ...]) -> None:
        c, ir = self.c, self.ir
        c("")
        c(f"# ---- softmax group {gi}: {' + '.join(b.name for b in grp)}")
        if self._defers(gi):
            self._deferred_group(gi, grp[0])
            return
        c(f"m{gi} = tl.full([RP], float('-inf'), tl.float32)")
        c(f"l{gi} = tl.zeros([RP], dtype=tl.float32)")
        c(f"acc{gi} = tl.zeros([RP, BDV], dtype=tl.float32)")
        tokens = [b for b in grp if not b.pooled and not b.precomputed]
        if tokens:
            mask = self.ex.union_keys(tokens)
            self.tokens = tokens  # (a block list's keys: `_walk` knows they are listed)
            sources = []
            for b in tokens:
                sources += [s for s in b.sources if s not in sources]
            scale = f"scale{tokens[0].node}"
            self._arg(scale)
            full = tuple(f for b in tokens for f in b.full)
            self._walk(gi, sources, mask, scale, pooled=None, full=full)
        for b in grp:
            if b.pooled and not b.precomputed:
                blocks = ir.operand(b.node, "blocks")
                pool = ir.operand(b.node, "keys")
                self._arg(f"kp{pool}")
                self._arg(f"vp{pool}")
                self._arg(f"scale{b.node}")
                self.nbs.add(b.grid.node)
                mask = self.ex.blocks(blocks, "I", "J")
                self._walk(gi, list(b.sources), mask, f"scale{b.node}", pooled=(pool, b.grid))
        for b in grp:
            if b.precomputed:
                c(f"# `{b.name}` was computed by an earlier stage: merge its (output, lse)")
                self._pre_lse(b, "p_pre")
                c(f"b_pre = tl.load(o{b.node} + p_pre[:, None] * DV + o_dv[None, :], "
                  f"mask=m_r[:, None] & m_dv[None, :], other=0.)")
                c(f"m_new = tl.maximum(m{gi}, b_lse * L2E)")
                c(f"m_use = tl.where(m_new == float('-inf'), 0., m_new)")
                c(f"b_a = tl.exp2(m{gi} - m_use)")
                c(f"b_b = tl.exp2(b_lse * L2E - m_use)")
                c(f"acc{gi} = acc{gi} * b_a[:, None] + b_pre * b_b[:, None]")
                c(f"l{gi} = l{gi} * b_a + b_b")
                c(f"m{gi} = m_new")

    def _defers(self, gi: int) -> bool:
        """Whether group gi, one earlier stage's branch alone (saved_outputs: "stage"), is
        read at the end: when at least two other groups walk keys, its [RP, BDV] accumulator
        would be live across both walks beside theirs. H100, 64k forward: the NSA paper
        defaults (two walks after it) 61.2 -> 58.5 ms; NSA as fla (one walk) 29.5 -> 31.1 ms
        if read at the end too (its load then waits after the walk), so it is not
        (docs/perf-notes.md)."""
        kinds = [how[0] for how in saved_outputs(self.st)]
        walks = len(kinds) - kinds.count("stage")
        return self.defer_outputs and kinds[gi] == "stage" and walks >= 2

    def _pre_lse(self, b: BranchPlan, ptr: str) -> None:
        """`ptr`, the rows of earlier stage b's output and lse, and b_lse, its lse."""
        self._arg(f"o{b.node}")
        self._arg(f"lse{b.node}")
        self.c(f"{ptr} = ({self.QROW.format('o_i')}.to(tl.int64) * H + o_h)")
        self.c(f"b_lse = tl.load(lse{b.node} + {ptr}, mask=m_r, other=float('-inf'))")
        self._merge_once("b_lse")

    def _deferred_group(self, gi: int, b: BranchPlan) -> None:
        """A group that is one earlier stage's branch (`_defers`): its normalised output is
        that stage's output, read when the groups are combined (`_finish`)."""
        c = self.c
        c(f"# `{b.name}` was computed by an earlier stage: its lse now, its output when the "
          "groups are combined")
        self._pre_lse(b, f"p_pre{gi}")
        c(f"m{gi} = b_lse * L2E")
        c(f"l{gi} = tl.where(b_lse > float('-inf'), 1., 0.).to(tl.float32)")
        self.deferred.append((gi, b))

    def _read_deferred(self) -> None:
        for gi, b in self.deferred:
            self.c(f"acc{gi} = tl.load(o{b.node} + p_pre{gi}[:, None] * DV + o_dv[None, :], "
                   f"mask=m_r[:, None] & m_dv[None, :] & (l{gi} > 0)[:, None], other=0.)"
                   ".to(tl.float32)  # `" + b.name + "`, normalised")

    def _walk(self, gi, sources, mask, scale, pooled, full=()) -> None:
        """Loops over each source's keys, each key visited once across sources (`full`, the
        keys every row attends, is used by the tile layout's walk: TileWalk)."""
        c = self.c
        seen: list = []
        for si, s in enumerate(sources):
            excl = self._exclusion(seen, pooled)
            if isinstance(s, (TokenRange, BlockRange)):
                lo, hi = _tl(s.lo), _tl(s.hi)
                # block counts the bounds read (the tokens of `future(g)`: up to NB<g>)
                self.nbs.update(int(x) for x in re.findall(r"\bNB(\d+)\b", s.lo + s.hi))
                limit = "T" if isinstance(s, TokenRange) else f"NB{s.grid}"
                if isinstance(s, BlockRange):
                    self.nbs.add(s.grid)
                    c(f"NB = NB{s.grid}")
                c(f"# source {si}: {'keys' if pooled is None else 'blocks'} [{s.lo}, {s.hi})")
                c(f"lo{si} = tl.maximum({lo}, 0)")
                c(f"hi{si} = tl.minimum({hi}, {limit})")
                c(f"for j0 in {self._range(f'(lo{si} // BN) * BN', f'hi{si}')}:")
                with c.indent():
                    c("o_j = j0 + tl.arange(0, BN)")
                    c("J = o_j[None, :]  # [1, BN]")
                    c(f"m_s = (J >= lo{si}) & (J < hi{si}) & m_r[:, None]{excl}")
                    self.from_j0 = pooled is None and isinstance(s, TokenRange)
                    self._update(gi, mask, scale, pooled, "o_j")
                    self.from_j0 = False
            else:
                self.lists.add(s.select)
                g = self.plan.grids[s.grid]
                if pooled is None:
                    c(f"# source {si}: tokens of the blocks listed by `{self.ex.ir.node(s.select)['name'] or s.select}`")
                    c(f"for t0 in {self._range('0', f'KS{s.select} * {g.length}')}:")
                    with c.indent():
                        c("o_t = t0 + tl.arange(0, BN)")
                        c(f"o_s = o_t // {g.length}")
                        c(f"b_n = tl.load(p_sel{s.select} + o_s, mask=o_s < KS{s.select}, other=-1)"
                          f"  # [BN] block of each slot")
                        c(f"o_j = tl.where(b_n >= 0, b_n * {g.stride} + o_t % {g.length}, 0)")
                        c("J = o_j[None, :]")
                        dup = ""
                        if g.overlap > 1:
                            dup = (f" & ~(tl.sum(((b_sel{s.select}[None, :] >= 0) & (tl.arange(0, "
                                   f"KSP{s.select})[None, :] < o_s[:, None]) & (b_sel{s.select}"
                                   f"[None, :] * {g.stride} <= o_j[:, None]) & (o_j[:, None] < "
                                   f"b_sel{s.select}[None, :] * {g.stride} + {g.length}))"
                                   f".to(tl.int32), 1) > 0)[None, :]")
                        c(f"m_s = (b_n >= 0)[None, :] & (J < T) & m_r[:, None]{dup}{excl}")
                        # these keys are in a listed block: the mask need not look them up
                        listed = self.ex.with_given({s.select}).union_keys(self.tokens)
                        self.list_run = (s.select, g.length, g.stride)
                        self._update(gi, listed, scale, pooled, "o_j")
                        self.list_run = None
                else:
                    self.nbs.add(s.grid)
                    c(f"# source {si}: the blocks listed by `{self.ex.ir.node(s.select)['name'] or s.select}`")
                    c(f"NB = NB{s.grid}")
                    c(f"for t0 in {self._range('0', f'KS{s.select}')}:")
                    with c.indent():
                        c("o_t = t0 + tl.arange(0, BN)")
                        c(f"o_j = tl.load(p_sel{s.select} + o_t, mask=o_t < KS{s.select}, other=-1)")
                        c("J = o_j[None, :]")
                        c(f"m_s = (J >= 0) & (J < NB) & m_r[:, None]{excl}")
                        self._update(gi, mask, scale, pooled, "tl.maximum(o_j, 0)")
            seen.append((si, s))

    # hooks the decode emitter (codegen/decode.py) overrides
    def _pids(self) -> None:
        self.c("i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)")

    def _range(self, start: str, stop: str) -> str:
        """The loop over one source's key tiles."""
        return f"range({start}, {stop}, BN)"

    def _merge_once(self, lse: str) -> None:
        """An earlier stage's (output, lse) is merged by one program per row (all do here)."""

    def _exclusion(self, seen, pooled) -> str:
        parts = []
        for si, s in seen:
            if isinstance(s, (TokenRange, BlockRange)):
                parts.append(f" & ~((J >= lo{si}) & (J < hi{si}))")
            else:
                g = self.plan.grids[s.grid]
                if pooled is None:
                    parts.append(f" & ~(tl.sum(((b_sel{s.select}[None, None, :] >= 0) & "
                                 f"(b_sel{s.select}[None, None, :] * {g.stride} <= J[:, :, None]) & "
                                 f"(J[:, :, None] < b_sel{s.select}[None, None, :] * {g.stride} + "
                                 f"{g.length})).to(tl.int32), 2) > 0)")
                else:
                    parts.append(f" & ~(tl.sum((J[:, :, None] == b_sel{s.select}[None, None, :])"
                                 f".to(tl.int32), 2) > 0)")
        return "".join(parts)

    def _load_kv(self, pooled, idx) -> None:
        """b_k, b_v: the keys idx (token positions, or pooled blocks of `pooled`) of the tile,
        zeros past the end."""
        c = self.c
        if pooled is None:
            c("p_k = k + ((i_b * T + " + idx + ").to(tl.int64) * HKV + i_hk)[:, None] * D + o_d[None, :]")
            c("p_v = v + ((i_b * T + " + idx + ").to(tl.int64) * HKV + i_hk)[:, None] * DV + o_dv[None, :]")
            c("m_k = (" + idx + " < T)[:, None]")
        else:
            pool, g = pooled
            c(f"p_k = kp{pool} + ((i_b * NB{g.node} + {idx}).to(tl.int64) * HKV + i_hk)[:, None] * D "
              f"+ o_d[None, :]")
            c(f"p_v = vp{pool} + ((i_b * NB{g.node} + {idx}).to(tl.int64) * HKV + i_hk)[:, None] "
              f"* DV + o_dv[None, :]")
            c(f"m_k = ({idx} < NB{g.node})[:, None]")
        c("b_k = tl.load(p_k, mask=m_k & m_d[None, :], other=0.)  # [BN, BD]")
        c("b_v = tl.load(p_v, mask=m_k & m_dv[None, :], other=0.)  # [BN, BDV]")

    def _update(self, gi, mask, scale, pooled, idx) -> None:
        c = self.c
        self._load_kv(pooled, idx)
        if pooled is None:
            c("b_s = tl.dot(b_q, tl.trans(b_k), input_precision='ieee' if IEEE else 'tf32') * "
              f"({scale} * L2E)  # [RP, BN] log2 units")
        else:
            c(f"b_s = tl.dot(b_q.to(b_k.dtype), tl.trans(b_k), input_precision='ieee' if IEEE "
              f"else 'tf32') * ({scale} * L2E)")
        c(f"m_a = m_s & {mask}")
        c("b_s = tl.where(m_a, b_s, float('-inf'))")
        c(f"m_new = tl.maximum(m{gi}, tl.max(b_s, 1))")
        c("m_use = tl.where(m_new == float('-inf'), 0., m_new)")
        c(f"b_alpha = tl.exp2(m{gi} - m_use)")
        c("b_p = tl.exp2(b_s - m_use[:, None])  # [RP, BN]")
        c(f"l{gi} = l{gi} * b_alpha + tl.sum(b_p, 1)")
        # p rounded to the values' dtype: token keys, and pooled keys whose backward sums its
        # own delta = rowsum(p * dp) (NSA as fla on the H100 at 64k: compressed forward 4.77
        # -> 3.39 ms, docs/perf-notes.md)
        if pooled is None or own_delta(self.plan, self.st):
            c(f"acc{gi} = acc{gi} * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, "
              "input_precision='ieee' if IEEE else 'tf32')")
        else:  # pooled keys in a group whose delta = rowsum(dO * o) must match its sum over
            # them (their shared bias gets no gradient: rowsum(ds) = 0), so p is not rounded
            # to 16 bits: a pair hi + lo of the keys' dtype (about 16 bits of mantissa, at
            # the speed of 16-bit products; float32 products took 10 ms more for NSA at 64k)
            c("if IEEE:")
            with c.indent():
                c("b_pv = tl.dot(b_p.to(b_v.dtype), b_v, input_precision='ieee')")
            c("else:")
            with c.indent():
                c("b_ph = b_p.to(b_v.dtype)")
                c("b_pv = tl.dot(b_ph, b_v) + tl.dot((b_p - b_ph.to(tl.float32)).to(b_v.dtype), "
                  "b_v)")
            c(f"acc{gi} = acc{gi} * b_alpha[:, None] + b_pv")
        c(f"m{gi} = m_new")

    def _finish(self) -> None:
        st, c = self.st, self.c
        c("")
        c("# ---- combine and write")
        self._read_deferred()
        c(f"p_o = ({self.QROW.format('o_i')}.to(tl.int64) * H + o_h)  # [RP]")
        if not st.writes_lse:
            self._arg("lsave")
            c("if SAVE:  # each group's log-sum-exp and (where no tensor holds it already) its")
            with c.indent():  # normalised output, for the backward (saved_outputs)
                c("n_rows = T * H * tl.num_programs(2)  # B * T * H rows per group")
                for gi, how in enumerate(saved_outputs(st)):
                    if how[0] in ("f32", "native"):
                        self._arg(f"osave{gi}")
                        c(f"b_og = tl.where(l{gi}[:, None] > 0, acc{gi} / tl.where(l{gi} > 0, "
                          f"l{gi}, 1.)[:, None], 0.)")
                        c(f"tl.store(osave{gi} + p_o[:, None] * DV + o_dv[None, :], "
                          f"b_og.to(osave{gi}.dtype.element_ty), mask=m_r[:, None] & m_dv[None, :])")
                    c(f"tl.store(lsave + {gi} * n_rows + p_o, tl.where(l{gi} > 0, (m{gi} + "
                      f"tl.log2(tl.where(l{gi} > 0, l{gi}, 1.))) / L2E, float('-inf')), mask=m_r)")
        if st.combine == "mix":
            c("b_o = tl.zeros([RP, BDV], dtype=tl.float32)")
            for gi, gate in enumerate(st.gates):
                c(f"b_og = tl.where(l{gi}[:, None] > 0, acc{gi} / tl.where(l{gi} > 0, l{gi}, 1.)"
                  f"[:, None], 0.)")
                if gate is None:
                    c("b_o += b_og")
                else:
                    self._arg(f"gate_{gate}")
                    c(f"b_g = tl.load(gate_{gate} + p_o, mask=m_r, other=0.).to(tl.float32)")
                    c("b_o += b_g[:, None] * b_og")
        else:
            c("b_o = tl.where(l0[:, None] > 0, acc0 / tl.where(l0 > 0, l0, 1.)[:, None], 0.)")
        c("tl.store(o + p_o[:, None] * DV + o_dv[None, :], b_o.to(o.dtype.element_ty), "
          "mask=m_r[:, None] & m_dv[None, :])")
        if st.writes_lse:
            self._arg("lse")
            c("b_lse = tl.where(l0 > 0, (m0 + tl.log2(tl.where(l0 > 0, l0, 1.))) / L2E, "
              "float('-inf'))  # natural log")
            c("tl.store(lse + p_o, b_lse, mask=m_r)")


class AttendBwdEmitter(AttendEmitter):
    """The backward of an attention stage: the same walk over the same key sources.

    Per softmax group g (do_g = gate_g * dO in a gated sum, else dO; o_g, lse_g saved by
    the forward; delta_g = rowsum(do_g * o_g)), for each key tile:
        p = exp(scale * q.k - lse_g),  dp = do_g . v,  ds = p * (dp - delta_g)
        dq += scale * ds . k          (this program owns its rows: plain stores)
        dk += scale * ds^T . q,  dv += p^T . do_g   (keys are shared: atomic adds)
    A branch computed by an earlier stage gets (do_g, lse_g, delta_g) written out for its
    own backward. The top-k selections are not differentiated.
    """

    mode = "bwd"
    head_args = "do, dq, dk, dv"
    extra_consts = ""
    _prepass = False  # emitting _own_delta's walk
    pooled_atomics = True  # pooled keys' dk, dv added here (the tile layout: by key tiles)

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        # softmax groups whose keys come from one block list: their dk, dv are computed by
        # key blocks in a second kernel (emit_list_dkdv); gi -> (list source, token branches)
        # (an earlier stage's branch feeds `probs`, which reads pooled keys: never a list)
        self.by_keys: dict[int, tuple] = {}
        self.list_dkdv_args: dict[int, list[str]] = {}  # gi -> the key-major kernel's arguments
        if self.st.layout == "row" and not self.st.writes_lse:
            for gi, grp in enumerate(self.st.groups):
                src = self._list_source(grp)
                if src is not None:
                    self.by_keys[gi] = src
        if self.by_keys:
            self.extra_consts += "".join(f", KM{gi}: tl.constexpr" for gi in self.by_keys)
        # row-layout groups of token-range keys: dk, dv by key tiles (emit_dkdv)
        self.tok_keys = ({gi for gi, _ in self._token_groups()} if self.st.layout == "row"
                         else set())

    def _list_source(self, grp):
        """(the BlockList, the token branches) when a group's token keys are exactly the
        tokens of one block list's blocks (blocks that do not overlap, a mask reading no other
        list): the case a key-major dk/dv kernel covers."""
        tokens = [b for b in grp if not b.pooled and not b.precomputed]
        sources = []
        for b in tokens:
            sources += [x for x in b.sources if x not in sources]
        if len(sources) != 1 or not isinstance(sources[0], BlockList):
            return None
        src = sources[0]
        if self.plan.grids[src.grid].overlap != 1 or any(b.full for b in tokens):
            return None
        if any(self.ex.lists(self.ir.operand(b.node, "keys")) != {src.select} for b in tokens):
            return None
        return src, tokens

    def _doc(self, combine: str) -> str:
        st = self.st
        keys = "".join(f"; group {gi}'s block-list keys: attend_{st.name}_bwd_dkdv{gi}_kernel "
                       f"when KM{gi}" for gi in self.by_keys)
        keys += "".join(f"; group {gi}'s token keys: attend_{st.name}_bwd_dkdv_kernel"
                        for gi in sorted(self.tok_keys))
        return (f'    """Backward of attention `{st.name}` ({st.layout} layout, {combine}): dq, and '
                f'dk, dv (and pooled dk, dv) by atomic adds{keys}: not deterministic."""')

    def _prologue(self) -> None:
        c = self.c
        c("p_row = ((i_b * T + o_i).to(tl.int64) * H + o_h)  # [RP]")
        c("b_dq = tl.zeros([RP, BD], dtype=tl.float32)")
        c("# q, k, v and dO enter the products in their own dtype (FlashAttention's precision)")
        c("b_do = tl.load(do + p_row[:, None] * DV + o_dv[None, :], mask=m_r[:, None] & "
          "m_dv[None, :], other=0.)  # [RP, BDV] dO")
        c("b_dof = b_do.to(tl.float32)  # for delta and the gates' gradients")
        if not self.st.writes_lse:
            c("n_rows = T * H * tl.num_programs(2)")

    def _group(self, gi: int, grp) -> None:
        c, st = self.c, self.st
        c("")
        c(f"# ---- softmax group {gi}: {' + '.join(b.name for b in grp)}")
        gate = dout_gate(self.plan, st, gi)
        alone = not st.writes_lse and saved_outputs(st)[gi][0] == "stage"
        if gate is not None and not alone:  # do_g = g * dO: g scales dp (and p for dv)
            self._arg(f"gate_{gate}")
            c(f"b_g{gi} = tl.load(gate_{gate} + p_row, mask=m_r, other=0.).to(tl.float32)")
        if alone:  # an earlier stage's output alone: its backward needs only the lse
            b = grp[0]
            self._arg("lsave")
            self._arg(f"xlse{b.node}")
            c(f"# `{b.name}` runs its own backward (its delta and gate gradient too) with this "
              f"group's lse")
            c(f"b_lse{gi} = tl.load(lsave + {gi} * n_rows + p_row, mask=m_r, other=float('-inf'))")
            c(f"tl.store(xlse{b.node} + p_row, b_lse{gi}, mask=m_r)")
            return
        if st.writes_lse:  # an earlier stage: lse (and delta) from the stage that used it
            self._arg("xlse")
            self._arg("xdelta")
            c(f"b_lse{gi} = tl.load(xlse + p_row, mask=m_r, other=float('-inf'))")
            c(f"b_l2{gi} = b_lse{gi} * L2E  # in log2 units, once (the key loop's exp2)")
            if own_delta(self.plan, st):
                self._own_delta(gi, grp, gate)
            else:
                c(f"b_delta{gi} = tl.load(xdelta + p_row, mask=m_r, other=0.)")
        else:
            self._arg(f"osave{gi}")
            self._arg("lsave")
            c(f"b_o{gi} = tl.load(osave{gi} + p_row[:, None] * DV + o_dv[None, :], "
              f"mask=m_r[:, None] & m_dv[None, :], other=0.).to(tl.float32)")
            c(f"b_lse{gi} = tl.load(lsave + {gi} * n_rows + p_row, mask=m_r, other=float('-inf'))")
            c(f"b_l2{gi} = b_lse{gi} * L2E  # in log2 units, once (the key loop's exp2)")
            if gate is not None:
                self._arg(f"dgate_{gate}")
                c(f"b_od = tl.sum(b_dof * b_o{gi}, 1)  # rowsum(dO * o_g)")
                c(f"tl.store(dgate_{gate} + p_row, b_od, mask=m_r)  # d(gate)")
                c(f"b_delta{gi} = b_od * b_g{gi}  # rowsum(do_g * o_g)")
            else:
                c(f"b_delta{gi} = tl.sum(b_dof * b_o{gi}, 1)  # [RP]")
            for b in grp:
                if b.precomputed:
                    for kind in ("lse", "delta"):
                        self._arg(f"x{kind}{b.node}")
                    c(f"# `{b.name}` runs its own backward with this group's lse, delta (and "
                      f"do, from dO and the gate)")
                    c(f"tl.store(xlse{b.node} + p_row, b_lse{gi}, mask=m_r)")
                    c(f"tl.store(xdelta{b.node} + p_row, b_delta{gi}, mask=m_r)")
        if gi in self.by_keys:
            self._arg("ksave")
            c(f"tl.store(ksave + {gi} * n_rows + p_row, b_delta{gi}, mask=m_r)  "
              f"# delta, for the key-major dk/dv kernel")
        if gi in self.tok_keys:
            self._arg("dsave")
            c(f"tl.store(dsave + {gi} * n_rows + p_row, b_delta{gi}, mask=m_r)  "
              f"# delta, for the dk/dv kernel by key tiles")
        self._walk_group(gi, grp)

    def _walk_group(self, gi: int, grp) -> None:
        """The walks over a group's token and pooled keys (`_update` per key tile)."""
        tokens = [b for b in grp if not b.pooled and not b.precomputed]
        if tokens:
            mask = self.ex.union_keys(tokens)
            self.tokens = tokens  # (a block list's keys: `_walk` knows they are listed)
            sources = []
            for b in tokens:
                sources += [x for x in b.sources if x not in sources]
            scale = f"scale{tokens[0].node}"
            self._arg(scale)
            full = tuple(f for b in tokens for f in b.full)
            self._walk(gi, sources, mask, scale, pooled=None, full=full)
        for b in grp:
            if b.pooled and not b.precomputed:
                blocks = self.ir.operand(b.node, "blocks")
                pool = self.ir.operand(b.node, "keys")
                grads = (f"dkp{pool}", f"dvp{pool}") if self.pooled_atomics else ()
                for a in (f"kp{pool}", f"vp{pool}", *grads, f"scale{b.node}"):
                    self._arg(a)
                self.nbs.add(b.grid.node)
                mask = self.ex.blocks(blocks, "I", "J")
                self._walk(gi, list(b.sources), mask, f"scale{b.node}", pooled=(pool, b.grid))

    def _own_delta(self, gi: int, grp, gate: str | None) -> None:
        """delta_g = rowsum(p * dp) by a first walk over this stage's keys (FlashAttention
        takes rowsum(dO * o); the sum over the same p and dp the gradients use makes rowsum(ds)
        vanish to float32 rounding, so pooled keys' shared bias gets no gradient), the gate's
        gradient rowsum(dO * o) = rowsum(p * (dO . v)) with it; stored for the dk/dv kernels."""
        c = self.c
        c("# delta = rowsum(p * dp) over this stage's keys: a first walk (no output is kept)")
        c(f"b_pdp{gi} = tl.zeros([RP], dtype=tl.float32)  # rowsum(p * (dO . v))")
        self._prepass = True
        self._walk_group(gi, grp)
        self._prepass = False
        if gate is not None:
            self._arg(f"dgate_{gate}")
            c(f"tl.store(dgate_{gate} + p_row, b_pdp{gi}, mask=m_r)  # d(gate) = rowsum(dO * o)")
            c(f"b_delta{gi} = b_pdp{gi} * b_g{gi}  # rowsum(do_g * o)")
        else:
            c(f"b_delta{gi} = b_pdp{gi}")
        c(f"tl.store(xdelta + p_row, b_delta{gi}, mask=m_r)  # for the dk/dv kernels")

    def _update(self, gi, mask, scale, pooled, idx) -> None:
        c = self.c
        if pooled is None:
            base = f"((i_b * T + {idx}).to(tl.int64) * HKV + i_hk)"
            kptr, vptr, dkptr, dvptr = "k", "v", "dk", "dv"
            c(f"m_k = ({idx} < T)[:, None]")
        else:
            pool, g = pooled
            base = f"((i_b * NB{g.node} + {idx}).to(tl.int64) * HKV + i_hk)"
            kptr, vptr, dkptr, dvptr = f"kp{pool}", f"vp{pool}", f"dkp{pool}", f"dvp{pool}"
            c(f"m_k = ({idx} < NB{g.node})[:, None]")
        c(f"o_kv = {base}  # [BN]")

        def load():
            c(f"b_k = tl.load({kptr} + o_kv[:, None] * D + o_d[None, :], mask=m_k & m_d[None, :], "
              f"other=0.)")
            c(f"b_v = tl.load({vptr} + o_kv[:, None] * DV + o_dv[None, :], mask=m_k & "
              f"m_dv[None, :], other=0.)")
        self._kv_loads(pooled, load)
        c(f"b_s = tl.dot(b_q, tl.trans(b_k), input_precision='ieee' if IEEE else 'tf32') * "
          f"({scale} * L2E)  # log2 units")
        c(f"m_a = m_s & {mask}")
        c(f"m_a = m_a & (b_lse{gi} > float('-inf'))[:, None]  # a row that saw no key has none")
        c(f"b_p = tl.where(m_a, tl.exp2(b_s - b_l2{gi}[:, None]), 0.)  # [RP, BN]")
        self._dq(gi, scale)
        if self._prepass or (pooled is None and gi in self.tok_keys):  # (dk, dv by key tiles)
            return
        by_keys = pooled is None and gi in self.by_keys  # the group's token keys: KM<gi> decides
        if by_keys:
            c(f"if not KM{gi}:  # else dk, dv come from the key-major kernel")
        with c.indent() if by_keys else contextlib.nullcontext():
            self._kv_atomics(gi, scale, dkptr, dvptr, pooled is not None)

    def _kv_loads(self, pooled, load) -> None:
        """b_k, b_v of the walk's key tile by `load()` (the row layout's backward may read
        them through descriptors: RowAttendBwdEmitter)."""
        load()

    def _dq(self, gi, scale) -> None:
        """dp = do_g . v, ds = p (dp - delta_g), dq += scale ds . k (ds rounded to k's dtype
        for the product, as FlashAttention's dq)."""
        c = self.c
        c("b_dp = tl.dot(b_do, tl.trans(b_v), input_precision='ieee' if IEEE else 'tf32')")
        if self._prepass:  # _own_delta's walk: the sum only
            c(f"b_pdp{gi} += tl.sum(b_p * b_dp, 1)")
            return
        if dout_gate(self.plan, self.st, gi) is not None:
            c(f"b_dp = b_dp * b_g{gi}[:, None]  # do_g . v")
        c(f"b_ds = b_p * (b_dp - b_delta{gi}[:, None])")
        if self._dq_scale() is not None:  # one scale: applied once, in _finish
            c("b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision='ieee' if IEEE else "
              "'tf32')")
            return
        c(f"b_dq += tl.dot((b_ds * {scale}).to(b_k.dtype), b_k, input_precision='ieee' if IEEE "
          "else 'tf32')  # several scales: ds scaled, the product adds in place")

    def _dq_scale(self) -> str | None:
        """The scale every key this kernel walks shares, or None when its branches have
        several. With one, dq accumulates ds . k and is scaled once at the end: the product
        then adds into the accumulator in place (a scaled product needs a second [RP, BD]
        float32 tile, a multiply and an add a step)."""
        scales = set()
        for grp in self.st.groups:
            tokens = [b for b in grp if not b.pooled and not b.precomputed]
            if tokens:
                scales.add(f"scale{tokens[0].node}")
            scales |= {f"scale{b.node}" for b in grp if b.pooled and not b.precomputed}
        return scales.pop() if len(scales) == 1 else None

    def _kv_atomics(self, gi, scale, dkptr, dvptr, pooled=False) -> None:
        """dk, dv of this tile's keys, added atomically. Pooled keys take ds, p and the rows
        in float32 (tf32 products): their dk sums ds over every later query, and rowsum(ds) = 0
        must survive the sum (the compressed keys' shared bias gets no gradient)."""
        c = self.c
        pg = "b_p"
        if dout_gate(self.plan, self.st, gi) is not None:
            c(f"b_pg = b_p * b_g{gi}[:, None]  # p scaled by the gate: dv = p^T . do_g")
            pg = "b_pg"
        if pooled:
            ds, q, p, do = "b_ds", "b_q.to(tl.float32)", pg, "b_dof"
        else:
            ds, q, p, do = "b_ds.to(b_q.dtype)", "b_q", f"{pg}.to(b_do.dtype)", "b_do"
        c(f"b_dk = tl.dot(tl.trans({ds}), {q}, input_precision='ieee' if IEEE else 'tf32') * {scale}")
        c(f"b_dv = tl.dot(tl.trans({p}), {do}, input_precision='ieee' if IEEE else 'tf32')")
        c(f"m_w = m_k & (tl.sum(m_a.to(tl.int32), 0) > 0)[:, None]  # keys some row attended")
        c(f"tl.atomic_add({dkptr} + o_kv[:, None] * D + o_d[None, :], b_dk, "
          f"mask=m_w & m_d[None, :], sem='relaxed')")
        c(f"tl.atomic_add({dvptr} + o_kv[:, None] * DV + o_dv[None, :], b_dv, "
          f"mask=m_w & m_dv[None, :], sem='relaxed')")

    def emit_list_dkdv(self) -> list[str]:
        """For each group in `by_keys`, a kernel computing its dk, dv by key blocks: one
        program per (BN keys of a block of the list's grid, batch and kv head, run of at most
        E entries) walks the rows whose block list holds its block (the lists inverted on the
        GPU by `_list_index`, cut into runs by `_list_work`, BT entries a step: queries with
        the kv head's G heads, or single query heads), and adds its keys' gradients once
        (other runs and branches may add to the same keys, so the add is atomic) instead of
        one atomic add per (query, key) from the per-query kernel. The runs balance the load:
        a block every query lists (NSA's forced first block) has T entries, an average one
        about T * k / NB. The math is the per-query kernel's: p = exp(scale q.k - lse_g),
        ds = p (do_g . v - delta_g), dk = scale ds^T q, dv = p^T do_g."""
        st, out = self.st, []
        for gi, (src, tokens) in self.by_keys.items():
            g = self.plan.grids[src.grid]
            L, S, sel = g.length, g.stride, src.select
            mask = self.ex.with_given({sel}).union_keys(tokens)
            scale = f"scale{tokens[0].node}"
            gate = dout_gate(self.plan, st, gi)
            args = []
            c = Code()
            c("i_c, i_w = tl.program_id(0), tl.program_id(1)")
            c("# the run of entries this program walks (_list_work): block i_n of batch i_b, kv "
              "head i_hk")
            c("i_key = tl.load(work + 2 * i_w)")
            c("i_run = tl.load(work + 2 * i_w + 1)")
            c(f"i_ok = i_key < B * HKV * NB{g.node}  # else past the last run: nothing to do")
            c(f"i_key = tl.where(i_ok, i_key, 0)")
            c(f"i_bh, i_n = i_key // NB{g.node}, i_key % NB{g.node}")
            c("i_b, i_hk = i_bh // HKV, i_bh % HKV")
            c("n_rows = T * H * B")
            c(L2E_DEF)
            c("o_d = tl.arange(0, BD)")
            c("m_d = o_d < D")
            c("o_dv = tl.arange(0, BDV)")
            c("m_dv = o_dv < DV")
            c(f"o_jj = i_c * BN + tl.arange(0, BN)  # [BN] keys of block i_n")
            c(f"o_j = i_n * {S} + o_jj")
            c(f"m_k = (o_jj < {L}) & (o_j < T) & i_ok")
            c("J = o_j[:, None]  # [BN, 1]: keys down the rows of s^T")
            c("p_kv = (i_b * T + o_j).to(tl.int64) * HKV + i_hk  # [BN]")
            c("b_k = tl.load(k + p_kv[:, None] * D + o_d[None, :], mask=m_k[:, None] & "
              "m_d[None, :], other=0.)  # [BN, BD]")
            c("b_v = tl.load(v + p_kv[:, None] * DV + o_dv[None, :], mask=m_k[:, None] & "
              "m_dv[None, :], other=0.)  # [BN, BDV]")
            c("b_dk = tl.zeros([BN, BD], dtype=tl.float32)")
            c("b_dv = tl.zeros([BN, BDV], dtype=tl.float32)")
            c(f"# run i_run of the entries listing block i_n (_list_index), E at most: BT a "
              f"step, RE rows each (the group's RP heads, or one head)")
            c("e_lo = tl.load(loff + i_key) + i_run * E")
            c("e_hi = tl.where(i_ok, tl.minimum(tl.load(loff + i_key + 1), e_lo + E), e_lo)")
            c("o_row = tl.arange(0, BT * RE)")
            c("for e0 in range(e_lo, e_hi, BT):")
            with c.indent():
                c("o_e = e0 + o_row // RE  # [BR] the entry of each row")
                c("b_ent = tl.load(lent + o_e, mask=o_e < e_hi, other=0)")
                c("if RE > 1:  # one list per group: an entry is a query, its rows the heads")
                with c.indent():
                    c("o_iq = b_ent")
                    c("o_h = i_hk * G + o_row % RE")
                    c("m_in = (o_e < e_hi) & (o_row % RE < G)")
                c("else:  # one list per query head: an entry is t * G + g, one row")
                with c.indent():
                    c("o_iq = b_ent // G")
                    c("o_h = i_hk * G + b_ent % G")
                    c("m_in = o_e < e_hi")
                c("p_row = (i_b * T + o_iq).to(tl.int64) * H + o_h  # [BR]")
                c("I = o_iq[None, :]  # [1, BR]")
                c("b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask=m_in[:, None] & "
                  "m_d[None, :], other=0.)  # [BR, BD]")
                args += ["do", "lsave", "ksave"]
                c("b_do = tl.load(do + p_row[:, None] * DV + o_dv[None, :], mask=m_in[:, "
                  "None] & m_dv[None, :], other=0.)  # [BR, BDV]")
                c(f"b_lse = tl.load(lsave + {gi} * n_rows + p_row, mask=m_in, "
                  f"other=float('-inf'))")
                c(f"b_delta = tl.load(ksave + {gi} * n_rows + p_row, mask=m_in, other=0.)")
                c("# keys by rows (s^T = k q^T): p^T and ds^T are the left operands of dv and dk")
                c(f"b_st = tl.dot(b_k, tl.trans(b_q), input_precision='ieee' if IEEE else "
                  f"'tf32') * ({scale} * L2E)  # [BN, BR] log2 units")
                c(f"m_a = m_k[:, None] & m_in[None, :] & {mask} & "
                  f"(b_lse > float('-inf'))[None, :]")
                c("b_pt = tl.where(m_a, tl.exp2(b_st - (b_lse * L2E)[None, :]), 0.)")
                c("b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision='ieee' if IEEE else "
                  "'tf32')")
                pg = "b_pt"
                if gate is not None:  # do_g = g * dO: g scales p^T and dp^T, dO stays as it is
                    args.append(f"gate_{gate}")
                    c(f"b_g = tl.load(gate_{gate} + p_row, mask=m_in, other=0.).to(tl.float32)")
                    c("b_dpt = b_dpt * b_g[None, :]  # v . do_g")
                    c("b_pgt = b_pt * b_g[None, :]")
                    pg = "b_pgt"
                c("b_dst = b_pt * (b_dpt - b_delta[None, :])")
                c(f"b_dv += tl.dot({pg}.to(b_v.dtype), b_do, input_precision='ieee' if IEEE "
                  "else 'tf32')")
                c("b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision='ieee' if IEEE else "
                  "'tf32')")
            c(f"b_dk = b_dk * {scale}  # dk = scale ds^T q")
            c("if e_hi > e_lo:  # other runs and branches may add to the same keys")
            with c.indent():
                c("tl.atomic_add(dk + p_kv[:, None] * D + o_d[None, :], b_dk, mask=m_k[:, None] "
                  "& m_d[None, :], sem='relaxed')")
                c("tl.atomic_add(dv + p_kv[:, None] * DV + o_dv[None, :], b_dv, mask=m_k[:, None] "
                  "& m_dv[None, :], sem='relaxed')")
            self.list_dkdv_args[gi] = args
            sig = (f"q, k, v, dk, dv, loff, lent, work, {''.join(a + ', ' for a in args)}{scale}, "
                   f"T, NB{g.node}, B, E, H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, "
                   f"RE: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, BD: tl.constexpr, "
                   f"BDV: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr")
            names = " + ".join(b.name for b in tokens)
            doc = (f'    """dk, dv of `{names}` (softmax group {gi} of `{st.name}`) by key blocks of '
                   f'blocks(len={L}, stride={S}): each program walks the rows whose list '
                   f'`{self.ir.node(sel)["name"] or sel}` holds its block (the lists inverted by '
                   f'_list_index), E of them at most (_list_work); one atomic add per key and '
                   f'run: not deterministic."""')
            out.append(f"\n@triton.jit\ndef attend_{st.name}_bwd_dkdv{gi}_kernel(\n    {sig},\n):"
                       f"\n{doc}\n{c.text()}\n")
        return out

    def _token_groups(self):
        """The row layout's softmax groups whose token keys all come from token ranges (a
        sliding window, sinks): their dk, dv by key tiles (`emit_dkdv`), not by atomic adds
        from every query (at 64k with NSA's 512-token window the row backward took 260 ms
        that way, 34 ms now, plus 12.8 ms for the kernel by key tiles)."""
        if self.st.layout != "row" or self.st.writes_lse:
            return []
        out = []
        for gi, grp in enumerate(self.st.groups):
            tokens = [b for b in grp if not b.pooled and not b.precomputed]
            if (gi not in self.by_keys and tokens
                    and all(isinstance(x, TokenRange) for b in tokens for x in b.sources)):
                out.append((gi, tokens))
        return out

    # ---------------------------------------------------------------- dk, dv by key tiles
    def emit_dkdv(self) -> str:
        """The key-major dk/dv kernel ("" when the stage has no token branch)."""
        st, ir = self.st, self.ir
        groups = self._token_groups()
        if not groups:
            self.dkdv = None
            return ""
        c = Code()
        args: list[str] = []
        nbs: set[int] = set()

        def arg(a):
            if a not in args:
                args.append(a)

        # kv heads vary fastest: every head's first key tile (the longest walk under causal
        # or sink patterns) starts first, not the last head's at the end (window + sinks on
        # the H100 at 64k: dk/dv 13.3-13.8 -> 12.3-12.4 ms, docs/perf-notes.md)
        c("i_n, i_hk, i_b = tl.program_id(0) // HKV, tl.program_id(0) % HKV, tl.program_id(2)")
        c("# a tile of BN consecutive keys of one kv head; dk, dv accumulate in registers over")
        c("# the query tiles that can see it, for each of the kv head's G query heads")
        c("j0 = i_n * BN")
        c("j1 = tl.minimum(j0 + BN, T)")
        c("o_j = j0 + tl.arange(0, BN)  # [BN] key positions")
        c("m_j = o_j < T")
        c("J = o_j[:, None]  # [BN, 1]: keys down the rows of s^T")
        c("o_d = tl.arange(0, BD)")
        c("m_d = o_d < D")
        c("o_dv = tl.arange(0, BDV)")
        c("m_dv = o_dv < DV")
        c(L2E_DEF)
        c("p_kv = ((i_b * T + o_j).to(tl.int64) * HKV + i_hk)  # [BN]")
        c("b_k = tl.load(k + p_kv[:, None] * D + o_d[None, :], mask=m_j[:, None] & m_d[None, :], "
          "other=0.)  # [BN, BD]")
        c("b_v = tl.load(v + p_kv[:, None] * DV + o_dv[None, :], mask=m_j[:, None] & "
          "m_dv[None, :], other=0.)  # [BN, BDV]")
        c("b_dk = tl.zeros([BN, BD], dtype=tl.float32)")
        c("b_dv = tl.zeros([BN, BDV], dtype=tl.float32)")
        c("NT = tl.cdiv(T, BM)  # query tiles")
        c("NF = T // BM  # query tiles without rows past T")
        if not st.writes_lse:
            c("n_rows = T * H * tl.num_programs(2)  # B * T * H rows per group")
        plans = {}
        for gi, tokens in groups:
            mask = self.ex.union_keys(tokens)
            sources: list = []
            for b in tokens:
                sources += [x for x in b.sources if x not in sources]
            full = [f for b in tokens for f in b.full]
            scale = f"scale{tokens[0].node}"
            arg(scale)
            plans[gi] = (sources, mask, scale)
            c("")
            c(f"# ---- softmax group {gi}: {' + '.join(b.name for b in tokens)}")
            c(f"# the query tiles [ta{gi}, tb{gi}) whose source bounds reach keys [j0, j1)")
            c(f"ta{gi} = NT")
            c(f"tb{gi} = NT * 0")
            for si, s in enumerate(sources):
                nbs.update(_nbs_in(s.lo, s.hi))
                c(f"# source {si}: keys [{s.lo}, {s.hi})")
                _bisect(c, "t_lo", f"tl.minimum({_tl(s.hi)}, T) > j0")
                _bisect(c, "t_hi", f"tl.maximum({_tl(s.lo)}, 0) >= j1")
                c(f"ta{gi} = tl.where(t_lo < t_hi, tl.minimum(ta{gi}, t_lo), ta{gi})")
                c(f"tb{gi} = tl.where(t_lo < t_hi, tl.maximum(tb{gi}, t_hi), tb{gi})")
            c(f"tb{gi} = tl.maximum(tb{gi}, ta{gi})")
            c(f"# the query tiles [fa{gi}, fb{gi}) that attend every key of the tile: no masks")
            c(f"fa{gi} = ta{gi}")
            c(f"fb{gi} = ta{gi}")
            for f in full:
                nbs.update(_nbs_in(f.lo, f.hi))
                c(f"# inner range [{f.lo}, {f.hi})")
                _bisect(c, "t_lo", f"{_tl(f.hi)} >= j0 + BN")
                _bisect(c, "t_hi", f"{_tl(f.lo)} > j0")
                c(f"t_lo = tl.maximum(t_lo, ta{gi})")
                c(f"t_hi = tl.minimum(tl.minimum(t_hi, tb{gi}), NF)")
                c(f"f_w = t_hi - t_lo > fb{gi} - fa{gi}")
                c(f"fa{gi} = tl.where(f_w, t_lo, fa{gi})")
                c(f"fb{gi} = tl.where(f_w, t_hi, fb{gi})")
            c(f"f_ok = (fb{gi} > fa{gi}) & (j1 - j0 == BN)")
            c(f"fa{gi} = tl.where(f_ok, fa{gi}, ta{gi})")
            c(f"fb{gi} = tl.where(f_ok, fb{gi}, ta{gi})")
        c("")
        scales = {plans[gi][2] for gi, _ in groups}
        c("for i_g in range(G):  # the query heads of this kv head, in order")
        with c.indent():
            c("i_h = i_hk * G + i_g")
            for gi, _ in groups:
                sources, mask, scale = plans[gi]
                for unmasked in _edge_full_edge(c, "for t in range({a}, {b}):", f"ta{gi}",
                                                f"fa{gi}", f"fb{gi}", f"tb{gi}"):
                    self._dkdv_tile(c, gi, sources, mask, scale, unmasked, arg,
                                    ds_scale=len(scales) > 1)
        if len(scales) == 1:
            c(f"b_dk = b_dk * {scales.pop()}  # dk = scale ds^T q")
        c("")
        own = sole_writer(self.ir, self.plan, st, "dkdv")
        if own:
            c("# written once: this program owns these keys, no other kernel writes dk, dv")
        else:
            c("# written once: this program owns these keys (other stages ran before: add)")
        c("p_dk = dk + p_kv[:, None] * D + o_d[None, :]")
        c("m_dk = m_j[:, None] & m_d[None, :]")
        c("tl.store(p_dk, b_dk, mask=m_dk)" if own else
          "tl.store(p_dk, tl.load(p_dk, mask=m_dk, other=0.) + b_dk, mask=m_dk)")
        c("p_dv = dv + p_kv[:, None] * DV + o_dv[None, :]")
        c("m_dv2 = m_j[:, None] & m_dv[None, :]")
        c("tl.store(p_dv, b_dv, mask=m_dv2)" if own else
          "tl.store(p_dv, tl.load(p_dv, mask=m_dv2, other=0.) + b_dv, mask=m_dv2)")
        sig = (f"q, k, v, do, dk, dv, {''.join(a + ', ' for a in args)}T, "
               f"{''.join(f'NB{x}, ' for x in sorted(nbs))}"
               "H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, "
               "DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, "
               "BN: tl.constexpr, IEEE: tl.constexpr")
        self.dkdv = (args, sorted(nbs))
        doc = (f'    """dk, dv of the token keys of attention `{st.name}` by key tiles: each program '
               f'walks the query tiles that see its keys and adds their gradients once, no '
               f'atomics: deterministic."""')
        return (f"\n@triton.jit\ndef attend_{st.name}_bwd_dkdv_kernel(\n    {sig},\n):\n{doc}\n"
                f"{c.text()}\n")

    def _dkdv_tile(self, c, gi, sources, mask, scale, unmasked, arg, limit="T",
                   f32_ds=False, ds_scale=False) -> None:
        """One query tile t's contribution to the key tile's dk, dv (keys up to `limit`: T,
        or NB<g> for pooled keys), computed keys-by-queries as FlashAttention-2's backward
        does: s^T = k q^T is [BN, BM], so p^T and ds^T are already the left operands of
        dv += p^T dO and dk += ds^T q (no transpose of a register tile through shared
        memory), q and dO the right operands straight from memory. The mask reads J as
        [BN, 1] key positions and I as [1, BM] query positions. dO enters the dots as it is
        (its own dtype: exact products); a gate g of do_g = g * dO scales the tiles p^T and
        dp^T instead. dk's scale is applied once after the walk, or here to ds (`ds_scale`,
        when groups of different scales add into one dk). `f32_ds`: dk's product takes ds as
        a pair hi + lo of q's dtype (about 16 bits of mantissa, where a rounded ds keeps 8):
        pooled keys sum ds over every later query, and rowsum(ds) = 0 must survive the sum
        (the compressed keys' shared bias gets no gradient)."""
        st = self.st
        c("i_lo = t * BM")
        c("i_hi = tl.minimum(i_lo + BM, T)")
        c("o_i = i_lo + tl.arange(0, BM)  # [BM] query positions")
        c("p_row = ((i_b * T + o_i).to(tl.int64) * H + i_h)  # [BM]")
        if unmasked:
            m_q, m_o, m_row = "m_d[None, :]", "m_dv[None, :]", None
        else:
            c("m_r = o_i < T")
            c("I = o_i[None, :]  # [1, BM]")
            m_q, m_o, m_row = "m_r[:, None] & m_d[None, :]", "m_r[:, None] & m_dv[None, :]", "m_r"
        rmask = f", mask={m_row}" if m_row else ""
        other = lambda x: f", other={x}" if m_row else ""  # noqa: E731
        NEG_INF = "float('-inf')"
        c(f"b_q = tl.load(q + p_row[:, None] * D + o_d[None, :], mask={m_q}, other=0.)  # [BM, BD]")
        c(f"b_do = tl.load(do + p_row[:, None] * DV + o_dv[None, :], mask={m_o}, other=0.)")
        gate = dout_gate(self.plan, st, gi)
        if gate is not None:
            arg(f"gate_{gate}")
            c(f"b_g = tl.load(gate_{gate} + p_row{rmask}{other('0.')}).to(tl.float32)  "
              f"# do_g = g * dO")
        if st.writes_lse:
            for a in ("xlse", "xdelta"):
                arg(a)
            c(f"b_lse = tl.load(xlse + p_row{rmask}{other(NEG_INF)})")
            c(f"b_delta = tl.load(xdelta + p_row{rmask}{other('0.')})")
        else:
            arg("lsave")
            arg("dsave")
            c(f"b_lse = tl.load(lsave + {gi} * n_rows + p_row{rmask}{other(NEG_INF)})")
            c(f"b_delta = tl.load(dsave + {gi} * n_rows + p_row{rmask}{other('0.')})")
        c(f"b_st = tl.dot(b_k, tl.trans(b_q), input_precision='ieee' if IEEE else 'tf32') * "
          f"({scale} * L2E)  # [BN, BM] log2 units")
        c("b_l2 = b_lse * L2E")
        if unmasked:
            c("b_pt = tl.exp2(b_st - b_l2[None, :])")
        else:
            for si, s in enumerate(sources):
                c(f"lo{si} = tl.maximum({_tl(s.lo)}, 0)")
                c(f"hi{si} = tl.minimum({_tl(s.hi)}, {limit})")
            m_s = " | ".join(f"((J >= lo{si}) & (J < hi{si}))" for si in range(len(sources)))
            c(f"m_a = m_j[:, None] & m_r[None, :] & ({m_s}) & {mask}")
            c("m_a = m_a & (b_lse > float('-inf'))[None, :]  # a row that saw no key has none")
            c("b_pt = tl.where(m_a, tl.exp2(b_st - b_l2[None, :]), 0.)  # [BN, BM]")
        c("b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision='ieee' if IEEE else 'tf32')")
        pg = "b_pt"
        if gate is not None:
            c("b_dpt = b_dpt * b_g[None, :]  # v . do_g")
            c("b_pgt = b_pt * b_g[None, :]")
            pg = "b_pgt"
        c("b_dst = b_pt * (b_dpt - b_delta[None, :])" + (f" * {scale}" if ds_scale else ""))
        c(f"b_dv += tl.dot({pg}.to(b_q.dtype), b_do, "
          "input_precision='ieee' if IEEE else 'tf32')  # p^T . do_g")
        if not f32_ds:
            c("b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision='ieee' if IEEE else "
              "'tf32')")
            return
        c("if IEEE:")
        with c.indent():
            c("b_dk += tl.dot(b_dst, b_q, input_precision='ieee')")
        c("else:  # ds as a pair hi + lo of q's dtype: about 16 bits of mantissa, 16-bit products")
        with c.indent():
            c("b_dsh = b_dst.to(b_q.dtype)")
            c("b_dk += tl.dot(b_dsh, b_q) + tl.dot((b_dst - b_dsh.to(tl.float32)).to(b_q.dtype), "
              "b_q)")

    def _finish(self) -> None:
        c = self.c
        c("")
        c("p_dq = dq + p_row[:, None] * D + o_d[None, :]")
        c("m_dq = m_r[:, None] & m_d[None, :]")
        scale = self._dq_scale()
        if scale is not None:
            c(f"b_dq = b_dq * {scale}  # dq = scale ds . k")
        if sole_writer(self.ir, self.plan, self.st, "dq"):
            c("tl.store(p_dq, b_dq, mask=m_dq)  # the only writer of these rows")
        else:
            c("tl.store(p_dq, tl.load(p_dq, mask=m_dq, other=0.) + b_dq, mask=m_dq)")

# ------------------------------------------------------------------- tile layout
def _nbs_in(*exprs: str) -> set[int]:
    return {int(x) for e in exprs for x in re.findall(r"\bNB(\d+)\b", e)}


def _edge_full_edge(c: "Code", head: str, lo: str, fa: str, fb: str, hi: str):
    """The three loops over a range [lo, hi) whose tiles in [fa, fb) are full: masked edge
    tiles, unmasked full tiles, masked edge tiles. `head` is the loop line, formatted with
    the run's bounds a, b; yields `unmasked` once per loop, its body indented."""
    for a, b, unmasked in ((lo, fa, False), (fa, fb, True), (fb, hi, False)):
        c(head.format(a=a, b=b)
          + ("  # full tiles: no masks" if unmasked else "  # edge tiles: masked"))
        with c.indent():
            yield unmasked


def _bisect(c: "Code", var: str, pred: str) -> None:
    """var = the first query tile t in [0, NT) with pred(t), NT if none (pred is false then
    true as t grows: the plan's bounds are nondecreasing in the tile)."""
    c(f"{var} = NT * 0")
    c("t_b = NT")
    c(f"while {var} < t_b:")
    with c.indent():
        c(f"t_m = ({var} + t_b) // 2")
        c("i_lo = t_m * BM")
        c("i_hi = tl.minimum(i_lo + BM, T)")
        c(f"t_ok = {pred}")
        c("t_b = tl.where(t_ok, t_m, t_b)")
        c(f"{var} = tl.where(t_ok, {var}, t_m + 1)")


class TileWalk:
    """The tile layout's walk over a token source: its key tiles in three runs, masked edge
    tiles, then the tiles inside a `full` range (every row of the tile attends every key of
    them, and no earlier source has them: no masks at all), then masked edge tiles again.
    The full range is the widest of the pattern's inner ranges (`BranchPlan.full`) within
    the source, less the keys of earlier sources, rounded inward to whole key tiles; a tile
    with rows past T has none."""

    def _walk(self, gi, sources, mask, scale, pooled, full=()) -> None:
        if pooled is not None or not full:
            return AttendEmitter._walk(self, gi, sources, mask, scale, pooled)
        c = self.c
        seen: list = []
        for si, s in enumerate(sources):
            excl = self._exclusion(seen, pooled)
            self.nbs.update(_nbs_in(s.lo, s.hi))
            c(f"# source {si}: keys [{s.lo}, {s.hi})")
            c(f"lo{si} = tl.maximum({_tl(s.lo)}, 0)")
            c(f"hi{si} = tl.minimum({_tl(s.hi)}, T)")
            self._full_span(si, seen, full)
            for unmasked in _edge_full_edge(c, "for j0 in range({a}, {b}, BN):", f"js{si}",
                                            f"fa{si}", f"fb{si}", f"hi{si}"):
                c("o_j = j0 + tl.arange(0, BN)")
                if unmasked:
                    self._update_full(gi, scale)
                else:
                    c("J = o_j[None, :]  # [1, BN]")
                    c(f"m_s = (J >= lo{si}) & (J < hi{si}) & m_r[:, None]{excl}")
                    self.from_j0 = True
                    self._update(gi, mask, scale, pooled, "o_j")
                    self.from_j0 = False
            seen.append((si, s))

    def _keys(self, pooled, idx, load) -> None:
        """b_k, b_v of the tile's keys by `load(pooled, idx)`, or through the descriptors
        (`_run_keys`)."""
        _run_keys(self, self.c, pooled, lambda: load(pooled, idx))

    def _full_span(self, si: int, seen: list, full) -> None:
        """fa<si>, fb<si>: the run of full key tiles of source si; js<si>: its first tile."""
        c = self.c
        c("# the keys of this source every row attends: the widest inner range, less the keys")
        c("# of earlier sources, rounded inward to whole key tiles")
        for fi, f in enumerate(full):
            self.nbs.update(_nbs_in(f.lo, f.hi))
            lo, hi = f"tl.maximum({_tl(f.lo)}, lo{si})", f"tl.minimum({_tl(f.hi)}, hi{si})"
            if fi == 0:
                c(f"fl = {lo}")
                c(f"fh = {hi}")
            else:
                c(f"f_a = {lo}")
                c(f"f_b = {hi}")
                c("f_w = f_b - f_a > fh - fl")
                c("fl = tl.where(f_w, f_a, fl)")
                c("fh = tl.where(f_w, f_b, fh)")
        for sp, _ in seen:
            c(f"f_o = (lo{sp} < hi{sp}) & (lo{sp} < fh) & (hi{sp} > fl)  # source {sp} overlaps")
            c(f"fh = tl.where(f_o & (lo{sp} > fl), lo{sp}, fh)")
            c(f"fl = tl.where(f_o & (lo{sp} <= fl), hi{sp}, fl)")
        c("fl = (fl + BN - 1) // BN * BN")
        c("fh = fh // BN * BN")
        c(f"js{si} = lo{si} // BN * BN")
        c("f_ok = (fh > fl) & (i_hi - i_lo == BM)")
        c(f"fa{si} = tl.where(f_ok, fl, js{si})")
        c(f"fb{si} = tl.where(f_ok, fh, js{si})")


# b_k, b_v of the token keys j0 + [0, BN) through kd, vd ([B, T, HKV * D] descriptors of
# [1, BN, BD] boxes: a head's row is whole, BD == D, which the host checks): the test and
# the loads under it (the tile kernels' `_tma_or`, the grouped ones' `_tma_kv`)
TMA_KV = ("if TMA:  # the tile as one bulk copy (rows past T read as zeros)",
          ("b_k = kd.load([i_b, j0, i_hk * D]).reshape(BN, BD)  # [BN, BD]",
           "b_v = vd.load([i_b, j0, i_hk * DV]).reshape(BN, BDV)  # [BN, BDV]"))


def _tma_or(em, c: "Code", load) -> None:
    """b_k, b_v of the token keys j0 + [0, BN): through kd, vd when TMA (`TMA_KV`), else by
    the loads `load()` writes."""
    em.tma_used = True  # the host makes the descriptors
    head, loads = TMA_KV
    c(head)
    with c.indent():
        for x in loads:
            c(x)
    c("else:")
    with c.indent():
        load()


def _full_kv(c: "Code") -> None:
    """The loads of a full tile of token keys o_j (every one before T: no row mask)."""
    c("o_kv = ((i_b * T + o_j).to(tl.int64) * HKV + i_hk)  # [BN]")
    c("b_k = tl.load(k + o_kv[:, None] * D + o_d[None, :], mask=m_d[None, :], other=0.)")
    c("b_v = tl.load(v + o_kv[:, None] * DV + o_dv[None, :], mask=m_dv[None, :], other=0.)")


def _run_keys(em, c: "Code", pooled, load) -> None:
    """b_k, b_v of a tile or row kernel's key tile: through kd, vd when TMA for a run of token
    keys from j0 (`from_j0`: a token range) or for a chunk t0 + [0, BN) of a block list's
    slots that lies inside one block (`list_run`, when BN divides the block length: BN is a
    constant, so the test is compiled out), else (pooled keys, gathers) by the loads `load()`
    writes. An empty slot (-1) reads block 0's keys, which its mask drops, as the gathered
    loads read key 0."""
    if pooled is not None:
        load()
    elif em.from_j0:
        _tma_or(em, c, load)
    elif em.list_run is not None:
        sel, length, stride = em.list_run
        em.tma_used = True  # the host makes the descriptors
        c(f"if TMA and {length} % BN == 0:  # the chunk lies in one listed block: one bulk "
          f"copy each")
        with c.indent():
            c(f"j0 = tl.maximum(tl.load(p_sel{sel} + t0 // {length}), 0) * {stride} + t0 % "
              f"{length}  # its first key")
            for x in TMA_KV[1]:
                c(x)
        c("else:")
        with c.indent():
            load()
    else:
        load()


class RowAttendEmitter(AttendEmitter):
    """The row layout's forward: AttendEmitter's kernel with key tiles that are a run of
    token keys (a token range, or a chunk of one listed block) read through tensor
    descriptors (TMA) when TMA."""

    head_args = "o, kd, vd"
    extra_consts = ", SAVE: tl.constexpr, TMA: tl.constexpr"

    def _load_kv(self, pooled, idx) -> None:
        _run_keys(self, self.c, pooled,
                  lambda: super(RowAttendEmitter, self)._load_kv(pooled, idx))


class RowAttendBwdEmitter(AttendBwdEmitter):
    """The row layout's backward, its token key tiles read as the forward reads them
    (`_run_keys`)."""

    head_args = "do, dq, dk, dv, kd, vd"
    extra_consts = ", TMA: tl.constexpr"

    def _kv_loads(self, pooled, load) -> None:
        _run_keys(self, self.c, pooled, load)


class TileAttendEmitter(TileWalk, AttendEmitter):
    """The tile layout's forward: AttendEmitter's kernel with full key tiles unmasked, and a
    tile of token keys read through tensor descriptors (TMA) when TMA."""

    head_args = "o, kd, vd"
    extra_consts = ", SAVE: tl.constexpr, TMA: tl.constexpr"

    def _load_kv(self, pooled, idx) -> None:
        self._keys(pooled, idx, super()._load_kv)

    def _update_full(self, gi, scale) -> None:
        c = self.c
        _tma_or(self, c, lambda: _full_kv(c))
        c("b_s = tl.dot(b_q, tl.trans(b_k), input_precision='ieee' if IEEE else 'tf32') * "
          f"({scale} * L2E)  # [RP, BN] log2 units")
        c(f"m_new = tl.maximum(m{gi}, tl.max(b_s, 1))")
        c(f"b_alpha = tl.exp2(m{gi} - m_new)")
        c("b_p = tl.exp2(b_s - m_new[:, None])")
        c(f"l{gi} = l{gi} * b_alpha + tl.sum(b_p, 1)")
        c(f"acc{gi} = acc{gi} * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, "
          "input_precision='ieee' if IEEE else 'tf32')")
        c(f"m{gi} = m_new")


class TileAttendBwdEmitter(TileWalk, AttendBwdEmitter):
    """The tile layout's backward, without atomics for token keys (FlashAttention-2's split):

      * `attend_<name>_bwd_kernel` (this emitter's `emit`): dq per query tile, walking the
        forward's key tiles (full tiles unmasked); it writes each softmax group's delta =
        rowsum(do_g * o_g) for the second kernel. Pooled keys (blocks) still get their
        gradients by atomic adds here.
      * `attend_<name>_bwd_dkdv_kernel` (`emit_dkdv`): one program per (key tile, kv head)
        walks the query tiles that can see it, for each query head of the kv head, and
        writes dk, dv once. The query tiles are found by bisection on the source bounds
        (nondecreasing in the tile); the full ones, by bisection on the inner bounds.
    """

    pooled_atomics = False
    head_args = "do, dq, dk, dv, kd, vd"
    extra_consts = ", TMA: tl.constexpr"

    def _doc(self, combine: str) -> str:
        st = self.st
        pooled = "".join(f"; pooled dk, dv of `{b.name}`: attend_{st.name}_bwd_dkdvp{b.node}"
                         "_kernel" for _, b in self._pooled_branches())
        tail = (f"{pooled} (atomic adds: not deterministic)" if pooled else ": deterministic")
        tokens = (f" (token dk, dv: attend_{st.name}_bwd_dkdv_kernel)"
                  if self._token_groups() else "")
        return (f'    """Backward of attention `{st.name}` (tile layout, {combine}): dq of a tile '
                f'of queries, written by this program alone{tokens}{tail}."""')

    def _token_groups(self):
        return [(gi, [b for b in grp if not b.pooled and not b.precomputed])
                for gi, grp in enumerate(self.st.groups)
                if any(not b.pooled and not b.precomputed for b in grp)]

    def _update(self, gi, mask, scale, pooled, idx) -> None:
        c = self.c
        self._keys(pooled, idx, self._load_kv)
        c(f"b_s = tl.dot(b_q, tl.trans(b_k), input_precision='ieee' if IEEE else 'tf32') * "
          f"({scale} * L2E)  # log2 units")
        c(f"m_a = m_s & {mask} & (b_lse{gi} > float('-inf'))[:, None]")
        c(f"b_p = tl.where(m_a, tl.exp2(b_s - b_l2{gi}[:, None]), 0.)  # [RP, BN]")
        self._dq(gi, scale)

    def _load_kv(self, pooled, idx) -> None:
        c = self.c
        if pooled is None:
            c(f"o_kv = ((i_b * T + {idx}).to(tl.int64) * HKV + i_hk)  # [BN]")
            c(f"m_k = ({idx} < T)[:, None]")
            kptr, vptr = "k", "v"
        else:  # pooled keys: their dk, dv come from attend_<name>_bwd_dkdvp<n>_kernel
            pool, g = pooled
            c(f"o_kv = ((i_b * NB{g.node} + {idx}).to(tl.int64) * HKV + i_hk)  # [BN]")
            c(f"m_k = ({idx} < NB{g.node})[:, None]")
            kptr, vptr = f"kp{pool}", f"vp{pool}"
        c(f"b_k = tl.load({kptr} + o_kv[:, None] * D + o_d[None, :], mask=m_k & m_d[None, :], "
          "other=0.)")
        c(f"b_v = tl.load({vptr} + o_kv[:, None] * DV + o_dv[None, :], mask=m_k & m_dv[None, :], "
          "other=0.)")

    def _update_full(self, gi, scale) -> None:
        c = self.c
        _tma_or(self, c, lambda: _full_kv(c))
        c(f"b_s = tl.dot(b_q, tl.trans(b_k), input_precision='ieee' if IEEE else 'tf32') * "
          f"({scale} * L2E)  # log2 units")
        c(f"b_p = tl.exp2(b_s - b_l2{gi}[:, None])  # [RP, BN]")
        self._dq(gi, scale)

    def delta_groups(self) -> list[int]:
        """The softmax groups whose delta the key-major kernels read (token or pooled keys)."""
        return sorted({gi for gi, _ in self._token_groups()}
                      | {gi for gi, _ in self._pooled_branches()})

    def _finish(self) -> None:
        if not self.st.writes_lse and self.delta_groups():
            self._arg("dsave")
            self.c("")
            self.c("# each group's delta, for the dk/dv kernels")
            for gi in self.delta_groups():
                self.c(f"tl.store(dsave + {gi} * n_rows + p_row, b_delta{gi}, mask=m_r)")
        super()._finish()

    # ------------------------------------------------------- pooled dk, dv by key tiles
    def _pooled_branches(self):
        return [(gi, b) for gi, grp in enumerate(self.st.groups) for b in grp
                if b.pooled and not b.precomputed]

    def emit_pooled_dkdv(self) -> list[str]:
        """For each pooled branch, its pooled keys' dk, dv by key tiles: one program per (BN
        blocks, query head, batch and query split) walks its split's query tiles that reach
        those blocks (found by bisection on the source bounds, as `emit_dkdv`), accumulates
        in registers and adds once per key tile (the heads of a kv head and the splits share
        the pooled keys: atomic). Before, every (query tile, head) of the dq kernel added into
        the few pooled keys: at 64k with NSA's 64-token blocks, 1024 query tiles x 64 heads
        onto 1024 blocks."""
        st, ir = self.st, self.ir
        self.pdkdv = []
        kernels = []
        for gi, b in self._pooled_branches():
            c = Code()
            args: list[str] = []

            def arg(a):
                if a not in args:
                    args.append(a)

            pool = ir.operand(b.node, "keys")
            g = b.grid.node
            nbs = {g}
            scale = f"scale{b.node}"
            arg(scale)
            mask = self.ex.blocks(ir.operand(b.node, "blocks"), "I", "J")
            c("i_n, i_h, i_bs = tl.program_id(0), tl.program_id(1), tl.program_id(2)")
            c("i_b, i_s = i_bs // S, i_bs % S  # batch, query split")
            c("i_hk = i_h // G")
            c("# BN consecutive pooled keys (blocks) of one kv head, seen by query head i_h in")
            c("# the query tiles [i_s * QT, i_s * QT + QT)")
            c("j0 = i_n * BN")
            c(f"j1 = tl.minimum(j0 + BN, NB{g})")
            c("o_j = j0 + tl.arange(0, BN)  # [BN] block indices")
            c(f"m_j = o_j < NB{g}")
            c("J = o_j[:, None]  # [BN, 1]: blocks down the rows of s^T")
            c("o_d = tl.arange(0, BD)")
            c("m_d = o_d < D")
            c("o_dv = tl.arange(0, BDV)")
            c("m_dv = o_dv < DV")
            c(L2E_DEF)
            c(f"p_kv = ((i_b * NB{g} + o_j).to(tl.int64) * HKV + i_hk)  # [BN]")
            c(f"b_k = tl.load(kp{pool} + p_kv[:, None] * D + o_d[None, :], mask=m_j[:, None] & "
              "m_d[None, :], other=0.)  # [BN, BD]")
            c(f"b_v = tl.load(vp{pool} + p_kv[:, None] * DV + o_dv[None, :], mask=m_j[:, None] & "
              "m_dv[None, :], other=0.)  # [BN, BDV]")
            c("b_dk = tl.zeros([BN, BD], dtype=tl.float32)")
            c("b_dv = tl.zeros([BN, BDV], dtype=tl.float32)")
            c("NT = tl.cdiv(T, BM)  # query tiles")
            if not st.writes_lse:
                c("n_rows = T * H * (tl.num_programs(2) // S)  # B * T * H rows per group")
            c(f"# ---- softmax group {gi}: `{b.name}`; the query tiles [ta, tb) whose source "
              "bounds reach blocks [j0, j1)")
            c("ta = NT")
            c("tb = NT * 0")
            for si, src in enumerate(b.sources):
                nbs.update(_nbs_in(src.lo, src.hi))
                c(f"# source {si}: blocks [{src.lo}, {src.hi})")
                _bisect(c, "t_lo", f"tl.minimum({_tl(src.hi)}, NB{g}) > j0")
                _bisect(c, "t_hi", f"tl.maximum({_tl(src.lo)}, 0) >= j1")
                c("ta = tl.where(t_lo < t_hi, tl.minimum(ta, t_lo), ta)")
                c("tb = tl.where(t_lo < t_hi, tl.maximum(tb, t_hi), tb)")
            c("ta = tl.maximum(ta, i_s * QT)")
            c("tb = tl.minimum(tb, i_s * QT + QT)")
            c("for t in range(ta, tb):")
            with c.indent():
                self._dkdv_tile(c, gi, list(b.sources), mask, scale, False, arg,
                                limit=f"NB{g}", f32_ds=True)
            c(f"b_dk = b_dk * {scale}  # dk = scale ds^T q")
            c("")
            c("# once per program: the other heads of the kv head and the other splits add to "
              "the same blocks")
            c("m_w = m_j & (tb > ta)")
            c(f"tl.atomic_add(dkp{pool} + p_kv[:, None] * D + o_d[None, :], b_dk, "
              "mask=m_w[:, None] & m_d[None, :], sem='relaxed')")
            c(f"tl.atomic_add(dvp{pool} + p_kv[:, None] * DV + o_dv[None, :], b_dv, "
              "mask=m_w[:, None] & m_dv[None, :], sem='relaxed')")
            name = f"attend_{st.name}_bwd_dkdvp{b.node}_kernel"
            sig = (f"q, do, kp{pool}, vp{pool}, dkp{pool}, dvp{pool}, "
                   f"{''.join(a + ', ' for a in args)}T, "
                   f"{''.join(f'NB{x}, ' for x in sorted(nbs))}S, QT, "
                   "H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, "
                   "DV: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, "
                   "BN: tl.constexpr, IEEE: tl.constexpr")
            doc = (f'    """dk, dv of the pooled keys of `{b.name}` in attention `{st.name}` '
                   f'(tile layout), by key tiles: each program walks the query tiles of its '
                   f'split that see its blocks and adds their gradients once: atomic adds, '
                   f'not deterministic."""')
            self.pdkdv.append((b, pool, args, sorted(nbs)))
            kernels.append(f"\n@triton.jit\ndef {name}(\n    {sig},\n):\n{doc}\n{c.text()}\n")
        return kernels


def emit_pool_bwd(st: PoolStage) -> str:
    g = st.grid
    if st.method == "mean":
        return f'''
@triton.jit
def pool_{st.name}_bwd_kernel(
    dxp, dx, T, NB,
    HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr,
):
    """Backward of the mean over blocks(len={g.length}, stride={g.stride}): each token gathers
    dxp[n] / |block n| from the blocks that hold it (deterministic)."""
    i_j, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_j = i_j * BT + tl.arange(0, BT)  # [BT]
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_dx = tl.zeros([BT, BD], dtype=tl.float32)
    for r in tl.static_range({g.overlap}):
        o_n = o_j // {g.stride} - r
        m_n = (o_n >= 0) & (o_n < NB) & (o_j < o_n * {g.stride} + {g.length}) & (o_j < T)
        b_cnt = tl.minimum({g.length}, T - o_n * {g.stride}).to(tl.float32)
        p = dxp + ((i_b * NB + tl.maximum(o_n, 0)).to(tl.int64) * HKV + i_h)[:, None] * D + o_d[None, :]
        b_g = tl.load(p, mask=m_n[:, None] & m_d[None, :], other=0.)
        b_dx += b_g / tl.where(m_n, b_cnt, 1.)[:, None]
    p_dx = dx + ((i_b * T + o_j).to(tl.int64) * HKV + i_h)[:, None] * D + o_d[None, :]
    m_x = (o_j < T)[:, None] & m_d[None, :]
    tl.store(p_dx, tl.load(p_dx, mask=m_x, other=0.) + b_dx, mask=m_x)
'''
    return f'''
@triton.jit
def pool_{st.name}_bwd_kernel(
    x, pe, w1, b1, w2, dxp, dx, dpe, dw1, db1, dw2, db2, dh, T, NB, HID,
    HKV: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BNB: tl.constexpr, BK: tl.constexpr,
    BH: tl.constexpr,
):
    """Backward of the learned compression of blocks(len={g.length}, stride={g.stride}):
    recomputes the hidden layer, then dW2, db2, db1, dW1, dpe (atomic adds over blocks) and
    dx scattered to the tokens of each block (atomic: blocks may overlap)."""
    i_n, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_n = i_n * BNB + tl.arange(0, BNB)  # [BNB]
    m_n = o_n < NB
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    o_row = ((i_b * NB + o_n).to(tl.int64) * HKV + i_h)  # [BNB]
    b_dy = tl.load(dxp + o_row[:, None] * D + o_d[None, :], mask=m_n[:, None] & m_d[None, :],
                   other=0.)  # [BNB, BD]
    tl.atomic_add(db2 + o_d, tl.sum(b_dy, 0), mask=m_d, sem="relaxed")
    # pass 1: per hidden chunk, recompute h, then dW2, db1 and dh (kept in a scratch buffer)
    for h0 in range(0, HID, BH):
        o_hid = h0 + tl.arange(0, BH)
        m_hid = o_hid < HID
        b_h = tl.zeros([BNB, BH], dtype=tl.float32)
        for f0 in range(0, {g.length} * D, BK):
            o_f = f0 + tl.arange(0, BK)
            m_f = o_f < {g.length} * D
            o_j = o_n[:, None] * {g.stride} + (o_f // D)[None, :]
            m_x = m_f[None, :] & (o_j < T) & m_n[:, None]
            b_x = tl.load(x + ((i_b * T + o_j).to(tl.int64) * HKV + i_h) * D + (o_f % D)[None, :],
                          mask=m_x, other=0.).to(tl.float32)
            b_pe = tl.load(pe + o_f, mask=m_f, other=0.)
            b_x = tl.where(m_x, b_x + b_pe[None, :], 0.)
            b_w1 = tl.load(w1 + o_f[:, None] * HID + o_hid[None, :],
                           mask=m_f[:, None] & m_hid[None, :], other=0.)
            b_h += tl.dot(b_x, b_w1, input_precision="ieee")
        b_h += tl.load(b1 + o_hid, mask=m_hid, other=0.)[None, :]
        b_cdf = 0.5 * (1.0 + tl.erf(b_h * 0.7071067811865476))
        b_a = b_h * b_cdf
        b_gelu1 = b_cdf + b_h * tl.exp(-0.5 * b_h * b_h) * 0.3989422804014327  # gelu'(h)
        b_w2 = tl.load(w2 + o_hid[:, None] * D + o_d[None, :], mask=m_hid[:, None] & m_d[None, :],
                       other=0.)  # [BH, BD]
        tl.atomic_add(dw2 + o_hid[:, None] * D + o_d[None, :],
                      tl.dot(tl.trans(b_a), b_dy, input_precision="ieee"),
                      mask=m_hid[:, None] & m_d[None, :], sem="relaxed")
        b_dh = tl.dot(b_dy, tl.trans(b_w2), input_precision="ieee") * b_gelu1
        b_dh = tl.where(m_n[:, None], b_dh, 0.)
        tl.atomic_add(db1 + o_hid, tl.sum(b_dh, 0), mask=m_hid, sem="relaxed")
        tl.store(dh + o_row[:, None] * HID + o_hid[None, :], b_dh, mask=m_n[:, None] & m_hid[None, :])
    # pass 2: per input chunk, dW1 += x^T dh, dx = dh W1^T -> dpe and the tokens
    for f0 in range(0, {g.length} * D, BK):
        o_f = f0 + tl.arange(0, BK)
        m_f = o_f < {g.length} * D
        o_j = o_n[:, None] * {g.stride} + (o_f // D)[None, :]
        m_x = m_f[None, :] & (o_j < T) & m_n[:, None]
        p_x = ((i_b * T + o_j).to(tl.int64) * HKV + i_h) * D + (o_f % D)[None, :]
        b_x = tl.load(x + p_x, mask=m_x, other=0.).to(tl.float32)
        b_pe = tl.load(pe + o_f, mask=m_f, other=0.)
        b_x = tl.where(m_x, b_x + b_pe[None, :], 0.)
        b_dx = tl.zeros([BNB, BK], dtype=tl.float32)
        for h0 in range(0, HID, BH):
            o_hid = h0 + tl.arange(0, BH)
            m_hid = o_hid < HID
            b_dh = tl.load(dh + o_row[:, None] * HID + o_hid[None, :],
                           mask=m_n[:, None] & m_hid[None, :], other=0.)
            b_w1 = tl.load(w1 + o_f[:, None] * HID + o_hid[None, :],
                           mask=m_f[:, None] & m_hid[None, :], other=0.)
            tl.atomic_add(dw1 + o_f[:, None] * HID + o_hid[None, :],
                          tl.dot(tl.trans(b_x), b_dh, input_precision="ieee"),
                          mask=m_f[:, None] & m_hid[None, :], sem="relaxed")
            b_dx += tl.dot(b_dh, tl.trans(b_w1), input_precision="ieee")
        b_dx = tl.where(m_x, b_dx, 0.)
        tl.atomic_add(dpe + o_f, tl.sum(b_dx, 0), mask=m_f, sem="relaxed")
        tl.atomic_add(dx + p_x, b_dx, mask=m_x, sem="relaxed")
'''


# -------------------------------------------------------------------------- host
def pool_launch(st: PoolStage, side: str, x: str, out: str, nb: str) -> str:
    """The launch of a pool kernel over the T tokens of `x` into `out` ([B, nb, HKV, dim])."""
    g = st.grid
    d, bd = ("D", "BD") if side == "k" else ("DV", "BDV")
    if st.method == "mean":
        # on a GPU one block per program: MoBA's 512-token blocks at 8k are 16 blocks per head,
        # and 16 blocks per program left 16 programs for the whole GPU (0.38 ms a pool on the
        # H100); tiles of 32768 elements (256 tokens of a head dim of 128): MoBA's key pool
        # 0.040 -> 0.023 ms at 8k and 0.130 -> 0.105 at 64k against 64 tokens a step
        # (docs/perf-notes.md, session 15). The interpreter keeps 16 blocks per program
        bnb = f"(1 if {x}.is_cuda else 16)"
        return (f"pool_{st.name}_fwd_kernel[(triton.cdiv({nb}, {bnb}), HKV, B)]({x}, {out}, T, "
                f"{nb}, HKV=HKV, D={d}, BD={bd}, BNB={bnb}, "
                f"BL=min(32768 // {bd} if {x}.is_cuda else 16, "
                f"triton.next_power_of_2({g.length})))")
    pre = f"'{st.owner}.{side}."
    return (f"pool_{st.name}_fwd_kernel[(triton.cdiv({nb}, 16), HKV, B)]({x}, "
            f"params[{pre}pe'], params[{pre}w1'], params[{pre}b1'], params[{pre}w2'], "
            f"params[{pre}b2'], {out}, T, {nb}, params[{pre}w1'].shape[1], "
            f"HKV=HKV, D={d}, BD={bd}, BNB=16, BK=32, BH=32)")


SELECT_HOST = '''


def _select_ints(env, text, usage, names, cuda, var="SPARSEDSL_SELECT_TILE"):
    """The integers of `text` (of the setting `env` of the knob `var`), as
    many as `names` lists, each a power of two, and on a GPU (`cuda`) a block chunk (a name
    ending in C) at least 16, a tl.dot operand; `usage` says what was expected."""
    try:
        vals = tuple(int(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != len(names):
        raise ValueError(f"{var}={env!r}: expected {usage}")
    if min(vals) < 1 or any(x & (x - 1) for x in vals):
        raise ValueError(f"{var}={env!r}: {', '.join(names[:-1])} and "
                         f"{names[-1]} must be powers of two")
    small = [n for n, x in zip(names, vals) if n.endswith("C") and x < 16]
    if small and cuda:
        raise ValueError(f"{var}={env!r}: {small[0]} must be at least 16 on a GPU")
    return vals


def _select_split(q, tuned, cuda):
    """(BQ, C, WARPS, QC, QWARPS) of a split select: the score kernel's BQ queries by C
    blocks and warps, the top-k kernel's blocks a step and warps: the knob
    SPARSEDSL_SELECT_SPLIT="BQ,C,WARPS,QC,QWARPS" (`_knob`), else `cuda` on a GPU and small
    tiles in the interpreter. None (the query-tiled or per-query kernel instead) with
    SPARSEDSL_SELECT_SPLIT=off or when SPARSEDSL_SELECT_TILE names a kernel."""
    env = _knob("SPARSEDSL_SELECT_SPLIT", tuned)
    if env == "off" or _knob("SPARSEDSL_SELECT_TILE", tuned):
        return None
    if not env:
        return cuda if q.is_cuda else (2, 16, 4, 32, 4)
    return _select_ints(env, env, "off or five integers BQ,C,WARPS,QC,QWARPS",
                        ("BQ", "C", "WARPS", "QC", "QWARPS"), q.is_cuda, "SPARSEDSL_SELECT_SPLIT")


def _score_rows(T, BQ, row_bytes):
    """Queries one scores buffer of a split select holds (row_bytes each): all T when they
    fit SPARSEDSL_SELECT_SCRATCH MiB (read at every call; default 256), else the most
    multiples of BQ that do (at least BQ); the select then runs query chunks in turn."""
    import os
    env = os.environ.get("SPARSEDSL_SELECT_SCRATCH", "").strip()
    try:
        mib = float(env) if env else 256.
    except ValueError:
        mib = -1.
    if not mib > 0:
        raise ValueError(f"SPARSEDSL_SELECT_SCRATCH={env!r}: expected a positive size in MiB")
    rows = int(mib * 2 ** 20) // max(1, row_bytes)
    return max(1, min(T, max(BQ, rows // BQ * BQ)))


def _select_tile(q, tuned, cuda, cpu):
    """(BQ, C, num_warps) of a query-tiled select kernel: the knob
    SPARSEDSL_SELECT_TILE="BQ,C,WARPS" (`_knob`), else the default for
    q's device (`cuda` or `cpu`: the interpreter). None, as a default or from
    SPARSEDSL_SELECT_TILE=query, runs the per-query kernel instead."""
    env = _knob("SPARSEDSL_SELECT_TILE", tuned)
    if not env:
        return cuda if q.is_cuda else cpu
    if env == "query" or env.startswith("query,"):  # the per-query kernel (_select_query_cfg)
        return None
    return _select_ints(env, env, "three integers BQ,C,WARPS", ("BQ", "C", "WARPS"), q.is_cuda)


def _select_query_cfg(q, tuned):
    """(C, num_warps) of a per-query select kernel: the knob SPARSEDSL_SELECT_TILE=
    "query,C,WARPS" (`_knob`), else 16 blocks a step and one warp on a GPU (NSA as
    fla on the H100, forward at 64k: 37.2 ms, 45.9 with 32 / 4 (docs/perf-notes.md); one
    warp's reductions are shuffles, no shared memory), 32 / 4 in the interpreter."""
    env = _knob("SPARSEDSL_SELECT_TILE", tuned)
    if not env.startswith("query,"):
        return (16, 1) if q.is_cuda else (32, 4)
    return _select_ints(env, env[len("query,"):], "query,C,WARPS", ("C", "WARPS"), q.is_cuda)


def _select_widths(C, remaps):
    """Chunk sizes of a query-tiled score-tree select kernel: CV target blocks per step (of
    the C columns the top-k merge sees) and, per remap from the top down, the width (a power
    of two, at least 16: a tl.dot operand) of the source chunk covering the previous level's
    blocks (CW1, CW2..). remaps: (target stride, target length, source stride, source length)
    per remap. CV is the one in [C/2, C] with the least leaf width per target block: NSA's
    64-token blocks over compressed blocks of stride 16 need 258 of them for 64 selection
    blocks (a 512-wide leaf), 254 for 63 (256 wide)."""
    best = None
    for cv in range(max(1, C // 2), C + 1):
        n, ws = cv, []
        for sd, ld, ss, ls in remaps:
            n = ((n - 1) * sd + ld + ls - 1) // ss + 1
            ws.append(max(16, 1 << (n - 1).bit_length()))
        cost = (ws[-1] if ws else C) / cv
        if best is None or cost <= best[0]:
            best = (cost, cv, ws)
    return best[1], best[2]
'''


class HostEmitter:
    """The `forward` function of the generated module: buffers and launches."""

    def __init__(self, ir: IR, plan: KernelPlan):
        self.ir, self.plan = ir, plan
        self.c = Code()

    def emit(self, select_emitters: dict, attend_emitters: dict) -> str:
        c, ir, plan = self.c, self.ir, self.plan
        c('"""Run every stage of the plan. q, k, v: contiguous [B, T, heads, head_dim];')
        c("gates: name -> [B, T, H] tensors; params: learnable tensors by name.")
        c("Returns the output [B, T, H, DV] in q's dtype, the selected block lists and, with")
        c('`save`, what `backward` needs."""')
        self._sizes("B, T, H, D = q.shape", "HKV, DV = k.shape[2], v.shape[3]")
        c("tuned = _tuned(q, k, v)  # knob settings `sparsedsl tune` chose for this call")
        for st in plan.stages:
            c("")
            if st.kind == "pool":
                self._pool(st)
            elif st.kind == "select":
                self._select(st, select_emitters[st.node])
            else:
                self._attend(st, attend_emitters[id(st)])
        saved = [f"kp{st.node}" for st in plan.stages if st.kind == "pool"]
        saved += [f"vp{st.node}" for st in plan.stages
                  if st.kind == "pool" and values_pooled(self.ir, plan, st)]
        saved += [f"sel{st.node}" for st in plan.stages if st.kind == "select"]
        saved += [f"osave{gi}" for gi, how in enumerate(saved_outputs(plan.final))
                  if how[0] != "stage"] + ["lsave"]
        for st in plan.stages:
            if st.kind == "attend" and st.layout == "grouped":
                saved += attend_emitters[id(st)].saved()
        c("saved = dict(" + ", ".join(f"{x}={x}" for x in saved) + ") if save else None")
        c("return o, lists, saved")
        return ((SELECT_HOST if select_emitters else "") +
                "\n\ndef forward(q, k, v, gates, params, save=False):\n" + c.text() + "\n")

    def _sizes(self, *shapes: str) -> None:
        """The host prologue: sizes (`shapes`), dtypes, and each grid's block count NB<g>."""
        c = self.c
        for line in shapes:
            c(line)
        c("G = H // HKV")
        c("dev = q.device")
        c("BD, BDV = _p2(D), _p2(DV)")
        c("IEEE = q.dtype in (torch.float32, torch.float64)")
        c("f32 = torch.float32")
        c("lists = {}")
        for gid, g in sorted(self.plan.grids.items()):
            c(f"NB{gid} = triton.cdiv(T, {g.stride})  # blocks(len={g.length}, stride={g.stride})")

    def _scale(self, node: int) -> str:
        s = self.ir.node(node)["args"]["scale"]
        return f"{s!r}" if s else "D ** -0.5"

    def _pool(self, st: PoolStage) -> None:
        c = self.c
        g = st.grid
        values = values_pooled(self.ir, self.plan, st)
        c(f"# pool `{st.name}`: {st.method} over blocks(len={g.length}, stride={g.stride})"
          + ("" if values else
             "; keys only: no branch attends it (a router's scores read the keys)"))
        sides = (("k", "D"), ("v", "DV")) if values else (("k", "D"),)
        for side, d in sides:
            c(f"{side}p{st.node} = torch.empty(B, NB{g.node}, HKV, {d}, device=dev, dtype=q.dtype)")
            c(pool_launch(st, side, side, f"{side}p{st.node}", f"NB{g.node}"))

    def _select_setup(self, st: SelectStage, em: SelectEmitter, rows: str,
                      quiet: bool = False) -> tuple[list, str]:
        """The list buffer of a select stage ([B, rows, HS, KS]) and its kernel's extra
        arguments and list dependencies (the decode host shares this); `quiet`: only those."""
        extra = [self._scale(int(a[5:])) if a.startswith("scale") else a for a in em.args]
        deps = "".join(f"HS{d}=HS{d}, SH{d}={self._shared(d)}, KS{d}=KS{d}, "
                       f"KSP{d}=triton.next_power_of_2(KS{d}), " for d in em.list_deps)
        if quiet:
            return extra, deps
        c = self.c
        shared = st.heads == "group"
        c(f"# select `{st.name}`: {st.op} k={st.k}, one list per {st.heads}")
        c(f"NB = NB{st.grid.node}")
        c(f"KS{st.node} = max(1, {st.slots})")
        c(f"HS{st.node} = {'HKV' if shared else 'H'}")
        c(f"R = {'G' if shared else '1'}")
        c(f"sel{st.node} = torch.empty(B, {rows}, HS{st.node}, KS{st.node}, device=dev, "
          f"dtype=torch.int32)")
        return extra, deps

    def _select(self, st: SelectStage, em: SelectEmitter) -> None:
        c = self.c
        extra, deps = self._select_setup(st, em, "T")
        if not (em.tiled or em.tree_tiled):
            self._select_query(st, em, f"select_{st.name}_fwd_kernel", extra, deps)
            c(f"lists[{st.name!r}] = sel{st.node}")
            return
        if em.tree_tiled:
            c("RP = triton.next_power_of_2(R)")
            self._select_split(st, em, extra)
            c("else:")
            with c.indent():
                self._select_tiles(st, em, extra)
        else:
            self._select_tiles(st, em, extra)
        c(f"lists[{st.name!r}] = sel{st.node}")

    def _select_split(self, st: SelectStage, em: SelectEmitter, extra) -> None:
        """The launches of a split select (tree scores): for each chunk of queries the
        score kernel writes their scores, then the per-query top-k kernel reads them."""
        c, n = self.c, st.node
        sc = em.scorer
        overlap = any(remap_reach(*r) > 1 for r in sc.remap_shapes)
        if overlap:
            c("# on a GPU 128 rows (queries x the group's heads) by 16 blocks, 4 warps, then the "
              "top-k 64 blocks a step:")
            c("# NSA's defaults on the H100, forward at 64k 58.0 ms with the query-tiled kernel, "
              "51.3-52.5 (docs/perf-notes.md)")
            c("split = _select_split(q, tuned, (max(1, 128 // RP), 16, 4, 64, 1))")
        else:
            c("# on a GPU 128 rows (queries x the group's heads) by 64 blocks, 8 warps, then the "
              "top-k 64 blocks a step:")
            c("# NSA as fla on the H100, select at 64k 8.4 ms with the per-query kernel, 3.6 split "
              "(docs/perf-notes.md)")
            c("split = _select_split(q, tuned, (max(1, 128 // RP), 64, 8, 64, 1))")
        c("if split is not None:  # scores by query tiles into `scores`, then the top-k per query")
        with c.indent():
            c("SBQ, SC, SW, QC, QW = split")
            c(f"CV, CW = _select_widths(SC, {tuple(sc.remap_shapes)!r})")
            c(f"TS = _score_rows(T, SBQ, B * HS{n} * NB * (8 if f32 == torch.float64 else 4))")
            c(f"scores = torch.empty(B, TS, HS{n}, NB, device=dev, dtype=f32)")
            c("for Q0 in range(0, T, TS):")
            with c.indent():
                c("TQ = min(TS, T - Q0)")
                sextra = self._select_setup(st, sc, "T", quiet=True)[0]
                widths = "".join(f"CW{i + 1}=CW[{i}], " for i in range(len(sc.remap_shapes)))
                c(f"select_{st.name}_score_kernel[(triton.cdiv(TQ, SBQ), HS{n}, B)](q, scores, "
                  f"{''.join(x + ', ' for x in sextra)}T, Q0, TQ, TS, "
                  f"{''.join(f'NB{x}, ' for x in sc.nbs)}H=H, HKV=HKV, G=G, HS=HS{n}, R=R, "
                  f"RP=RP, D=D, BD=BD, BQ=SBQ, C=SC, CV=CV, {widths}IEEE=IEEE, num_warps=SW, "
                  f"num_stages=1)")
                textra, tdeps = self._select_setup(st, em.scored, "T", quiet=True)
                self._select_query(st, em.scored, f"select_{st.name}_topk_kernel", textra, tdeps,
                                   rows="TQ")
            c("del scores")

    def _select_tiles(self, st: SelectStage, em: SelectEmitter, extra) -> None:
        """The launch of a query-tiled select kernel, or of its per-query fallback."""
        c = self.c
        if em.tree_tiled:
            if any(remap_reach(*r) > 1 for r in em.remap_shapes):
                c("# on a GPU 256 rows a program: NSA's defaults on the H100, forward at 64k "
                  "77.9 ms with 16 queries x 16 heads,")
                c("# 90.5 with 4 x 16, 84.1 with the per-query kernel, which scores a compressed "
                  "block once per overlapping")
                c("# selection block (16k: 12.0, 13.0, 12.9 ms; docs/perf-notes.md)")
                c("tile = _select_tile(q, tuned, (max(1, 256 // RP), 16, 4), "
                  "(max(2, 32 // RP), 16, 4))")
            else:
                c("# on a GPU the per-query kernel by default: NSA as fla on the H100, its "
                  "select kernel at 64k 9.83 ms,")
                c("# 9.78 with tiles of 8 queries x 16 heads; forward at 8k 3.06 ms, 3.10-3.22 "
                  "with tiles (docs/perf-notes.md)")
                c("tile = _select_tile(q, tuned, None, (max(2, 32 // RP), 16, 4))")
        else:
            c("tile = _select_tile(q, tuned, (32, 16, 1), (16, 32, 4))  # (H100, MoBA at 64k: "
              "0.44 ms, 16 x 64 / 2 warps 1.21)")
        c("if tile is None:  # SPARSEDSL_SELECT_TILE=query: the per-query kernel")
        with c.indent():
            fb = em.fallback
            fextra, fdeps = self._select_setup(st, fb, "T", quiet=True)
            self._select_query(st, fb, f"select_{st.name}_query_fwd_kernel", fextra, fdeps)
        c("else:")
        with c.indent():
            c("BQ, CB, W = tile")
            grid = f"select_{st.name}_fwd_kernel[(triton.cdiv(T, BQ), HS{st.node}, B)]"
            head = (f"{grid}(q, sel{st.node}, {''.join(x + ', ' for x in extra)}T, "
                    f"{''.join(f'NB{x}, ' for x in em.nbs)}H=H, HKV=HKV, G=G, HS=HS{st.node}, ")
            tail = (f"K={st.k}, KB=max(2, triton.next_power_of_2({st.k})), KS=KS{st.node}, "
                    f"KSP=triton.next_power_of_2(KS{st.node}), BQ=BQ, C=CB, IEEE=IEEE, ")
            if em.tree_tiled:
                c(f"CV, CW = _select_widths(CB, {tuple(em.remap_shapes)!r})")
                widths = "".join(f"CW{i + 1}=CW[{i}], " for i in range(len(em.remap_shapes)))
                c(f"{head}R=R, RP=RP, D=D, BD=BD, {tail}CV=CV, {widths}num_warps=W, "
                  f"num_stages=1)")
            else:
                c(f"{head}D=D, BD=BD, {tail}num_warps=W)")

    def _select_query(self, st: SelectStage, em: SelectEmitter, kname: str, extra, deps,
                      rows: str = "T") -> None:
        """The launch of the per-query select kernel: one program per (query, list), for
        `rows` queries (the split select's top-k: TQ from Q0, QC and QW set by its caller)."""
        if rows == "T":
            self.c("QC, QW = _select_query_cfg(q, tuned)  # (SPARSEDSL_SELECT_TILE=query,C,"
                   "WARPS)")
        self.c(f"{kname}[({rows}, HS{st.node}, B)](q, sel{st.node}, "
               f"{''.join(x + ', ' for x in extra)}T, {em.SCALARS}"
               f"{''.join(f'NB{x}, ' for x in em.nbs)}{deps}"
               f"H=H, HKV=HKV, G=G, HS=HS{st.node}, R=R, RP=_p2(R), "
               f"SHARED={st.heads == 'group'}, D=D, BD=BD, K={st.k}, "
               f"KB=max(2, triton.next_power_of_2({st.k})), KS=KS{st.node}, "
               f"KSP=triton.next_power_of_2(KS{st.node}), C=QC, IEEE=IEEE, num_warps=QW, "
               f"num_stages=1)")

    def _launch(self, st: AttendStage, em: "AttendEmitter", kernel: str = "fwd"):
        """Rows per program, the grid, and the arguments of an attention stage's kernel
        (forward and backward launch alike; `kernel` names the tile layout's block sizes)."""
        c = self.c
        if st.layout == "tile":
            pooled = ", pooled=True" if any(b.pooled for g in st.groups for b in g) else ""
            c(f"BM, BN, W, NS = _tile_config({kernel!r}, q, tuned{pooled})  # (SPARSEDSL_TILE"
              f"{'' if kernel == 'fwd' else '_' + kernel.upper()})")
            c("R, RP = 1, BM")
            grid = "(triton.cdiv(T, BM), H, B)"
        else:
            c(f"R, BM = {'1' if st.rows == 'head' else 'G'}, 1")
            c("RP = _p2(R)")
            grid = "(T, H // R, B)"
        args = self._host_args(st, em.args)
        deps = "".join(f"HS{d}=HS{d}, SH{d}={self._shared(d)}, KS{d}=KS{d}, "
                       f"KSP{d}=triton.next_power_of_2(KS{d}), " for d in sorted(em.lists))
        return grid, args, deps

    def _host_args(self, st: AttendStage, names) -> list[str]:
        """The host expressions for a stage kernel's argument names: scale<n> -> its value,
        gate_<g> -> the gate tensor, xlse/xdelta -> the stage's buffers of them (an earlier
        stage's backward inputs), anything else as it is."""
        return [self._scale(int(a[5:])) if a.startswith("scale") else
                f"gates[{a[5:]!r}]" if a.startswith("gate_") else
                f"{a}{st.node}" if a in ("xlse", "xdelta") else a for a in names]

    def _kv_descs(self, em: "AttendEmitter") -> str:
        """The tile and row kernels' kd, vd arguments (and TMA): descriptors where the kernel
        reads token keys through them (`em.tma_used`) and TMA applies, else k and v themselves."""
        if em.tma_used:
            self.c("kd, vd, TMA = _kv_descs(k, v, BN)  # tensor descriptors, where TMA reads them")
            return ", kd, vd"
        self.c("TMA = False  # no token keys")
        return ", k, v"

    def _shared(self, sel_node: int) -> str:
        st = next(s for s in self.plan.stages if s.kind == "select" and s.node == sel_node)
        return "True" if st.heads == "group" else "False"

    def _attend(self, st: AttendStage, em: AttendEmitter) -> None:
        c = self.c
        if st.layout == "grouped":
            em.host_fwd(c, self._scale(st.groups[0][0].node))
            return
        c(f"# attend `{st.name}`: {st.layout} layout, {st.combine}")
        if st.writes_lse:
            c(f"o = o{st.node} = torch.empty(B, T, H, DV, device=dev, dtype=q.dtype)  # merged "
              f"by the final stage")
            c(f"lse = lse{st.node} = torch.empty(B, T, H, device=dev, dtype=f32)")
        else:
            c("o = torch.empty(B, T, H, DV, device=dev, dtype=q.dtype)")
            c("# each softmax group's output for the backward (saved_outputs)")
            for gi, how in enumerate(saved_outputs(st)):
                names = " + ".join(f"`{b.name}`" for b in st.groups[gi])
                if how[0] == "stage":
                    continue  # its stage's backward sums its delta itself (own_delta)
                if how[0] == "out":
                    c(f"osave{gi} = o  # {names}: the output itself")
                else:
                    dt = "f32" if how[0] == "f32" else "q.dtype"
                    c(f"osave{gi} = torch.empty(B, T, H, DV, device=dev, dtype={dt}) if save else o"
                      f"  # {names}")
            c(f"lsave = torch.empty({len(st.groups)}, B, T, H, device=dev, dtype=f32) if save "
              f"else o")
        grid, args, deps = self._launch(st, em)
        tiles = "BN=BN, IEEE=IEEE, SAVE=save, num_warps=W, num_stages=NS"
        heads = "o"
        if st.layout != "tile":
            c("BN, W, NS = _row_config('fwd', q, tuned)  # (SPARSEDSL_ROW)")
        heads, tiles = heads + self._kv_descs(em), tiles + ", TMA=TMA"
        c(f"attend_{st.name}_fwd_kernel[{grid}](q, k, v, {heads}, "
          f"{''.join(x + ', ' for x in args)}T, "
          f"{''.join(f'NB{x}, ' for x in sorted(em.nbs))}{deps}H=H, HKV=HKV, G=G, R=R, RP=RP, "
          f"D=D, DV=DV, BD=BD, BDV=BDV, BM=BM, {tiles})")


def backward_stages(ir: IR, plan: KernelPlan) -> tuple[list, list]:
    """The attention stages that run a backward, last first (an earlier stage only if the
    output uses its branch: a branch that only feeds a gate's scores gets no gradient, the
    selection is not differentiated) and the pools that do (those with parameters, and mean
    pools a running stage attends: a pool that only feeds a router gets no gradient)."""
    attends = [st for st in plan.stages if st.kind == "attend"]
    used = {b.node for grp in plan.final.groups for b in grp if b.precomputed}
    runs = [st for st in reversed(attends) if not (st.writes_lse and st.node not in used)]
    read = {ir.operand(b.node, "keys") for st in runs for grp in st.groups for b in grp
            if b.pooled and not b.precomputed}
    pools = [x for x in reversed(plan.stages)
             if x.kind == "pool" and (x.method != "mean" or x.node in read)]
    return runs, pools


def values_pooled(ir: IR, plan: KernelPlan, st: PoolStage) -> bool:
    """Whether the forward pools the values too: some branch attends the pooled keys, or the
    pool runs a backward (which reads them). A mean pool that only feeds a router's scores
    (MoBA's) needs its keys alone."""
    return st in backward_stages(ir, plan)[1] or any(
        b.pooled and ir.operand(b.node, "keys") == st.node
        for a in plan.stages if a.kind == "attend" for grp in a.groups for b in grp)


def sole_writer(ir: IR, plan: KernelPlan, st: AttendStage, grad: str) -> bool:
    """Whether stage `st`'s kernel for `grad` ('dq': the tile or row backward, one program
    per query's rows; 'dkdv': the tile layout's key-tile kernel) is the only one to write
    that gradient: `st` is the only stage with a backward and no pool adds in after it. The
    kernel then stores (no read of what was there) and the host leaves the buffer unfilled:
    no zero fill, no read back (at 64k with 16 heads, 768 MiB of each for dq, dk, dv)."""
    runs, pools = backward_stages(ir, plan)
    if runs != [st] or pools:
        return False
    return st.layout in ("tile", "row") if grad == "dq" else st.layout == "tile"


class HostBwdEmitter(HostEmitter):
    """The `backward` function: gradients of everything `forward` read."""

    def emit(self, attend_bwd: dict) -> str:
        c, plan = self.c, self.plan
        c('"""dO [B, T, H, DV] -> (dq, dk, dv, dgates, dparams). Top-k selections are not')
        if deterministic_bwd(plan):
            c('differentiated; dq by query tiles, dk and dv by key tiles: no atomics."""')
        else:
            c('differentiated; the kernels add into shared keys atomically (not deterministic)."""')
        c("B, T, H, D = q.shape")
        c("HKV, DV = k.shape[2], v.shape[3]")
        c("G = H // HKV")
        c("dev = q.device")
        c("BD, BDV = _p2(D), _p2(DV)")
        c("IEEE = q.dtype in (torch.float32, torch.float64)")
        c("f32 = torch.float32")
        c("tuned = _tuned(q, k, v)  # knob settings `sparsedsl tune` chose for this call")
        final = plan.final
        runs, pools = backward_stages(self.ir, plan)
        # gradients written once per element (a single stage whose kernels own their rows or
        # keys, no pool adding in afterwards) go straight into q's dtype: no float32 buffers
        # and no casting copies (MoBA at 64k: 1.5 GiB of float32 dq, dk, dv); and where one
        # program writes each element and nothing adds to it, into buffers left unfilled
        one = runs[0] if len(runs) == 1 and not pools else None
        own_dq = sole_writer(self.ir, plan, runs[0], "dq")
        own_kv = sole_writer(self.ir, plan, runs[0], "dkdv")
        dq_dt = "q.dtype" if own_dq else "f32"
        kv_store = "False"
        dkv_dt = "f32"
        if own_kv:
            dkv_dt = "q.dtype"
        elif one is not None and one.layout == "grouped" and attend_bwd[id(one)].disjoint_blocks:
            kv_store = "G == 1"
            dkv_dt = "q.dtype if G == 1 else f32"
        q_new = "empty" if own_dq else "zeros"
        kv_new = "torch.empty" if own_kv else "torch.zeros"
        c("do = do.contiguous()")
        c(f"dq = torch.{q_new}(B, T, H, D, device=dev, dtype={dq_dt})")
        if kv_store != "False":  # the grouped dk/dv kernel: it stores every key when kv_store
            c(f"new_kv = torch.empty if {kv_store} else torch.zeros  # {kv_store}: the dk/dv "
              "kernel stores every key once")
            kv_new = "new_kv"
        c(f"dk = {kv_new}(B, T, HKV, D, device=dev, dtype={dkv_dt})")
        c(f"dv = {kv_new}(B, T, HKV, DV, device=dev, dtype={dkv_dt})")
        c("dparams = {}")
        osaves = [f"osave{gi}" for gi, how in enumerate(saved_outputs(final))
                  if how[0] != "stage"] + ["lsave"]
        c(f"{', '.join(osaves)} = {', '.join(f'saved[{x!r}]' for x in osaves)}")
        for gid, g in sorted(plan.grids.items()):
            c(f"NB{gid} = triton.cdiv(T, {g.stride})")
        for st in plan.stages:
            if st in pools:  # (a pool without a backward needs no gradient buffers)
                c(f"kp{st.node}, vp{st.node} = saved['kp{st.node}'], saved['vp{st.node}']")
                c(f"dkp{st.node} = torch.zeros(kp{st.node}.shape, device=dev, dtype=f32)")
                c(f"dvp{st.node} = torch.zeros(vp{st.node}.shape, device=dev, dtype=f32)")
            elif st.kind == "select":
                c(f"sel{st.node} = saved['sel{st.node}']")
                c(f"HS{st.node}, KS{st.node} = sel{st.node}.shape[2], sel{st.node}.shape[3]")
        gates = [g for g in final.gates if g is not None] if final.combine == "mix" else []
        for g in gates:
            c(f"dgate_{g} = torch.empty(B, T, H, device=dev, dtype=f32)")
        for st in runs:
            if st.writes_lse:  # every row written by the backward of the stage that reads it
                c(f"xlse{st.node} = torch.empty(B, T, H, device=dev, dtype=f32)")
                c(f"xdelta{st.node} = torch.empty(B, T, H, device=dev, dtype=f32)")
        for st in runs:
            c("")
            self._attend_bwd(st, attend_bwd[id(st)], kv_store)
        for st in pools:
            c("")
            self._pool_bwd(st)
        c("")
        c("# gates: d(gate_g) = sum over v's dims of dO * o_g, written by the last stage's "
          "backward kernel")
        c("dgates = {" + ", ".join(f"{g!r}: dgate_{g}" for g in gates) + "}")
        c("return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dgates, dparams")
        return "\n\ndef backward(q, k, v, gates, params, saved, do):\n" + c.text() + "\n"

    def _attend_bwd(self, st: AttendStage, em: "AttendBwdEmitter", kv_store: str) -> None:
        c = self.c
        if st.layout == "grouped":
            em.host_bwd(c, self._scale(st.groups[0][0].node), kv_store)
            return
        c(f"# backward of attend `{st.name}`")
        tile = st.layout == "tile"
        if ((tile and em.delta_groups()) or em.tok_keys) and not st.writes_lse:
            c(f"dsave = torch.empty({len(st.groups)}, B, T, H, device=dev, dtype=f32)  "
              "# delta per group")
        by_keys = getattr(em, "by_keys", {})
        if by_keys:
            c("KM = _list_bwd()  # block-list keys' dk, dv by key blocks (SPARSEDSL_LIST_BWD)")
            c(f"ksave = torch.empty({len(st.groups)}, B, T, H, device=dev, dtype=f32)  "
              f"# delta per group, for the key-major kernel")
        grid, args, deps = self._launch(st, em, "dq")
        deps = "".join(f"HS{d}=HS{d}, SH{d}={self._shared(d)}, KS{d}=KS{d}, "
                       f"KSP{d}=triton.next_power_of_2(KS{d}), " for d in sorted(em.lists))
        tiles = "BN=BN, IEEE=IEEE, num_warps=W, num_stages=NS"
        heads = "do, dq, dk, dv"
        if not tile:
            c("BN, W, NS = _row_config('dq', q, tuned)  # (SPARSEDSL_ROW_DQ)")
        heads, tiles = heads + self._kv_descs(em), tiles + ", TMA=TMA"
        tiles += "".join(f", KM{gi}=KM" for gi in by_keys)
        c(f"attend_{st.name}_bwd_kernel[{grid}](q, k, v, {heads}, "
          f"{''.join(x + ', ' for x in args)}T, {''.join(f'NB{x}, ' for x in sorted(em.nbs))}"
          f"{deps}H=H, HKV=HKV, G=G, R=R, RP=RP, D=D, DV=DV, BD=BD, BDV=BDV, BM=BM, {tiles})")
        for gi, (src, tokens) in by_keys.items():
            g = self.plan.grids[src.grid]
            sel = src.select
            kargs = self._host_args(st, em.list_dkdv_args[gi])
            c("if KM:")
            with c.indent():
                shared = self._shared(sel) == "True"
                c(f"loff, lent = _list_index(sel{sel}, NB{g.node}, HKV, G, {shared})")
                c(f"RE = {'triton.next_power_of_2(G)' if shared else '1'}  # rows per entry")
                c("E = _list_chunk(RE, q.is_cuda, tuned)  # (SPARSEDSL_LIST_CHUNK)")
                c(f"work = _list_work(loff, sel{sel}.numel(), E)")
                c("# BT entries x RE rows: at least 16, the reduction of the dk/dv dots")
                c("KBT, KBN = (max(1, 64 // RE), 64) if q.is_cuda else (max(1, 16 // RE), 16)")
                c(f"KBN = max(16, min(KBN, triton.next_power_of_2({g.length})))")
                c(f"attend_{st.name}_bwd_dkdv{gi}_kernel[(triton.cdiv({g.length}, KBN), "
                  f"work.shape[0])](q, k, v, dk, dv, loff, lent, work, "
                  f"{''.join(x + ', ' for x in kargs)}{self._scale(tokens[0].node)}, T, "
                  f"NB{g.node}, B, E, H=H, HKV=HKV, G=G, RE=RE, D=D, DV=DV, BD=BD, BDV=BDV, BT=KBT, "
                  f"BN=KBN, IEEE=IEEE)")
        if getattr(em, "dkdv", None):
            dargs, nbs = em.dkdv
            dargs = self._host_args(st, dargs)
            c("BM, BN, W, NS = _tile_config('dkdv', q, tuned)  # (SPARSEDSL_TILE_DKDV)")
            c(f"attend_{st.name}_bwd_dkdv_kernel[(triton.cdiv(T, BN) * HKV, 1, B)](q, k, v, do, "
              f"dk, dv, {''.join(x + ', ' for x in dargs)}T, {''.join(f'NB{x}, ' for x in nbs)}"
              "H=H, HKV=HKV, G=G, D=D, DV=DV, BD=BD, BDV=BDV, BM=BM, BN=BN, IEEE=IEEE, "
              "num_warps=W, num_stages=NS)")
        for b, pool, pargs, nbs in getattr(em, "pdkdv", ()):
            pargs = self._host_args(st, pargs)
            c(f"# pooled dk, dv of `{b.name}` by key tiles")
            c(f"BM, BN, W, NS = _tile_config('dkdvp', q, tuned, pooled=True, "
              f"nkeys=NB{b.grid.node})  # (SPARSEDSL_TILE_DKDVP)")
            c(f"QT, S = _query_split(triton.cdiv(T, BM), triton.cdiv(NB{b.grid.node}, BN) * H * B, "
              "tuned)  # (SPARSEDSL_QUERY_SPLIT)")
            c(f"attend_{st.name}_bwd_dkdvp{b.node}_kernel[(triton.cdiv(NB{b.grid.node}, BN), H, "
              f"B * S)](q, do, kp{pool}, vp{pool}, dkp{pool}, dvp{pool}, "
              f"{''.join(x + ', ' for x in pargs)}T, {''.join(f'NB{x}, ' for x in nbs)}S, QT, "
              "H=H, HKV=HKV, G=G, D=D, DV=DV, BD=BD, BDV=BDV, BM=BM, BN=BN, IEEE=IEEE, "
              "num_warps=W, num_stages=NS)")

    def _pool_bwd(self, st: PoolStage) -> None:
        c = self.c
        g = st.grid
        c(f"# backward of pool `{st.name}` ({st.method})")
        for side, x, d, bd, dx in (("k", "k", "D", "BD", "dk"), ("v", "v", "DV", "BDV", "dv")):
            if st.method == "mean":
                c(f"pool_{st.name}_bwd_kernel[(triton.cdiv(T, 32), HKV, B)](d{side}p{st.node}, {dx}, "
                  f"T, NB{g.node}, HKV=HKV, D={d}, BD={bd}, BT=32)")
            else:
                pre = f"{st.owner}.{side}."
                c(f"w1 = params['{pre}w1']")
                c(f"grads = {{n: torch.zeros_like(params['{pre}' + n], dtype=f32) "
                  f"for n in ('pe', 'w1', 'b1', 'w2', 'b2')}}")
                c(f"dh = torch.empty(B * NB{g.node} * HKV, w1.shape[1], device=dev, dtype=f32)")
                c(f"pool_{st.name}_bwd_kernel[(triton.cdiv(NB{g.node}, 16), HKV, B)]({x}, "
                  f"params['{pre}pe'], w1, params['{pre}b1'], params['{pre}w2'], d{side}p{st.node}, "
                  f"{dx}, grads['pe'], grads['w1'], grads['b1'], grads['w2'], grads['b2'], dh, T, "
                  f"NB{g.node}, w1.shape[1], HKV=HKV, D={d}, BD={bd}, BNB=16, BK=32, BH=32)")
                c(f"dparams.update({{'{pre}' + n: t for n, t in grads.items()}})")


def generate(ir: IR, plan: KernelPlan | None = None) -> tuple[str, KernelPlan]:
    """The whole generated module for a verified IR: header, kernels, host code."""
    from .plan import plan_kernels
    plan = plan or plan_kernels(ir)
    from .grouped import HELPER, GroupedEmitter
    ex = Exprs(ir, plan)
    grouped = any(st.kind == "attend" and st.layout == "grouped" for st in plan.stages)
    tile = any(st.kind == "attend" and st.layout == "tile" for st in plan.stages)
    parts = [header(ir, plan), TRITON_PRELUDE + TUNED_HELPER + (HELPER if grouped else "")
             + (TILE_HELPER if tile else "")]
    kv_descs = tile or grouped  # their kernels take k, v descriptors (KV_DESCS_HELPER)
    selects, attends = {}, {}
    for st in plan.stages:
        if st.kind == "pool":
            parts.append(emit_pool(st))
        elif st.kind == "select":
            em = SelectEmitter(ir, plan, ex, st)
            parts.append(em.emit())
            selects[st.node] = em
            if em.tiled or em.tree_tiled:  # and the per-query kernel, for comparisons
                em.fallback = QuerySelectEmitter(ir, plan, ex, st)
                parts.append(em.fallback.emit().replace(
                    f"def select_{st.name}_fwd_kernel(", f"def select_{st.name}_query_fwd_kernel(",
                    1))
            if em.tree_tiled:  # the split select: a score kernel, then a top-k kernel
                em.scorer = SelectEmitter(ir, plan, ex, st)
                parts.append(em.scorer.emit_scores())
                em.scored = ScoredSelectEmitter(ir, plan, ex, st)
                parts.append(em.scored.emit().replace(
                    f"def select_{st.name}_fwd_kernel(", f"def select_{st.name}_topk_kernel(", 1))
        elif st.layout == "grouped":
            em = GroupedEmitter(ir, plan, ex, st, st.groups[0][0].sources[0])
            parts += em.emit_fwd()
            attends[id(st)] = em
        else:
            em = (TileAttendEmitter if st.layout == "tile" else RowAttendEmitter)(ir, plan, ex, st)
            parts.append(em.emit())
            attends[id(st)] = em
    attends_bwd = {}
    for st in plan.stages:
        if st.kind == "attend" and st.layout == "grouped":
            em = attends[id(st)]
            parts += em.emit_bwd()
            attends_bwd[id(st)] = em
        elif st.kind == "attend" and st.layout == "tile":
            em = TileAttendBwdEmitter(ir, plan, ex, st)
            parts.append(em.emit())
            dkdv = em.emit_dkdv()
            if dkdv:
                parts.append(dkdv)
            parts += em.emit_pooled_dkdv()
            attends_bwd[id(st)] = em
        elif st.kind == "attend":
            em = RowAttendBwdEmitter(ir, plan, ex, st)
            parts.append(em.emit())
            parts += em.emit_list_dkdv()
            dkdv = em.emit_dkdv()
            if dkdv:
                parts.append(dkdv)
                if not tile:  # (its launch reads _tile_config)
                    tile = True
                    parts[1] += TILE_HELPER
            attends_bwd[id(st)] = em
        elif st.kind == "pool":
            parts.append(emit_pool_bwd(st))
    # row-layout kernels take them when a walk reads runs of keys (`_run_keys`)
    if kv_descs or any(getattr(em, "tma_used", False)
                       for em in (*attends.values(), *attends_bwd.values())):
        parts[1] += KV_DESCS_HELPER
    kernels = [_with_acc(x) for x in parts[2:]]
    host = [HostEmitter(ir, plan).emit(selects, attends),
            HostBwdEmitter(ir, plan).emit(attends_bwd)]
    return "".join(parts[:2] + kernels + [_launch_acc(h) for h in host]), plan


def _with_acc(kernel: str) -> str:
    """Accumulate in ACC: float32, or float64 for float64 inputs (exact gradient checks)."""
    kernel = kernel.replace("tl.float32", "ACC")
    return kernel.replace(",\n):\n", ", ACC: tl.constexpr,\n):\n", 1)


def _launch_acc(host: str) -> str:
    lines = []
    for line in host.splitlines():
        if "_kernel[" in line and line.rstrip().endswith(")"):
            line = line.rstrip()[:-1] + ", ACC=ACC)"
        lines.append(line)
    text = "\n".join(lines) + "\n"
    return text.replace("    f32 = torch.float32\n",
                        "    f32 = torch.float64 if q.dtype == torch.float64 else torch.float32\n"
                        "    ACC = tl.float64 if q.dtype == torch.float64 else tl.float32\n")
