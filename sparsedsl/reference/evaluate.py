"""The dense reference: evaluate the IR exactly, in float64, with full masks.

This is the oracle every kernel is tested against. It is written for clarity,
not speed: every key set is a [B, H, T, T] boolean mask, every block set a
[B, H, T, N] one. Layout of q, k, v: [batch, seq, heads, head_dim]; GQA allowed
(query head h reads kv head h // G, G = q_heads / kv_heads).

Semantics of each construct, over query position i and key position j
(docs/language.md has the same table with examples):

  causal                j <= i
  window(w)             0 <= i - j < w
  sink(n)               j < n
  global(n)             j < n or i < n
  strided(s, o)         (i - j) mod s == o
  summary(s, c)         j mod s >= s - c
  tokens(B)             j lies in a block of B[i]
  blocks(l, d)          block n = [n d, n d + l), n < ceil(T / d); tokens past T are absent
  past / current / future / first / recent / random / topk: see `_blockset`
  pool(g, mean)         mean of a block's tokens that exist (a final block may be partial)
  pool(g, mlp)          w2 . gelu(w1 . flatten(k[block] + pe) + b1) + b2; tokens past T are 0
  attend(M)             softmax over keys in M of scale * q.k, then . v; a row with no key is 0
  attend(P, B)          the same over pooled keys/values of the blocks in B
  union(a, b, ...)      one softmax over all keys of all branches (a real token counts once)
  g * a + b             gated sum of separately normalised outputs
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..ir.graph import IR
from ..ir.ops import Kind
from .params import Dims, param_shapes

F64 = torch.float64


@dataclass
class Details:
    """What the reference can return besides the output, for tests and tools."""

    out: torch.Tensor
    branches: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, T, Hq, Dv]
    selections: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, T, H, S], -1 pad
    blocksets: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> bool [B, Hq, T, N]
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # branch -> bool [B, Hq, T, T]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # top-k -> [B, Hq, T, N]
    density: float = 0.0  # attended (query, real key) pairs / causal pairs, averaged over heads


@dataclass
class _Grid:
    length: int
    stride: int
    n: int
    start: torch.Tensor  # [N]
    member: torch.Tensor  # bool [N, T]: token j lies in block n


@dataclass
class _Branch:
    out: torch.Tensor  # [B, T, Hq, Dv]
    logits: torch.Tensor  # [B, Hq, T, K] before masking
    values: torch.Tensor  # [B, Hq, K, Dv]
    mask: torch.Tensor  # bool [B|1, Hq|1, T, K]
    pooled: bool
    scale: float
    probs: torch.Tensor | None = None  # [B, Hq, T, K]


def _softmax_rows(logits: torch.Tensor, mask: torch.Tensor):
    """Masked softmax that gives all-zero rows where nothing is visible."""
    logits = logits.masked_fill(~mask, float("-inf"))
    m = logits.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logits - m) * mask
    denom = p.sum(dim=-1, keepdim=True)
    return torch.where(denom > 0, p / torch.where(denom > 0, denom, torch.ones_like(denom)),
                       torch.zeros_like(p)), logits


def hash24(seed: int, qblock: torch.Tensor, kblock: torch.Tensor) -> torch.Tensor:
    """The seeded hash behind `random`: murmur3's finaliser over a mix of the three numbers,
    top 24 bits (exact in float32, so kernels rank blocks exactly as the reference does)."""
    mask = 0xFFFFFFFF
    h = (seed * 0x9E3779B1 + qblock * 0x85EBCA77 + kblock * 0xC2B2AE3D) & mask
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & mask
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & mask
    h = h ^ (h >> 16)
    return h >> 8


class _Evaluator:
    def __init__(self, ir: IR, q, k, v, tensors: dict, params: dict, dims: Dims,
                 selections: dict | None = None):
        self.ir = ir
        self.B, self.T, self.Hq, self.Dk = q.shape
        self.Hkv = k.shape[2]
        self.G = self.Hq // self.Hkv
        self.Dv = v.shape[-1]
        self.q, self.k, self.v = q.to(F64), k.to(F64), v.to(F64)
        self.tensors = {n: t.to(F64) for n, t in tensors.items()}
        self.params = {n: t.to(F64) for n, t in params.items()}
        self.dims = dims
        self.device = q.device
        self.i = torch.arange(self.T, device=self.device)
        self.env: dict[int, object] = {}
        self.given = dict(selections or {})  # name -> [B, T, H, S] indices that replace a top-k
        self.details = Details(out=None)

    # helpers ----------------------------------------------------------------------
    def kv_heads(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Repeat kv heads so that query head h reads kv head h // G."""
        return t.repeat_interleave(self.G, dim=dim)

    def name(self, nid: int) -> str:
        return self.ir.label(nid)

    def run(self) -> Details:
        needed = needed_nodes(self.ir, self.tensors)
        for nid in self.ir.order():
            if nid in needed:
                self.env[nid] = self.eval(nid)
        self.details.out = self.env[self.ir.out] if self.ir.node(self.ir.out)["kind"] is Kind.MIX \
            else self.env[self.ir.out].out
        return self.details

    def arg(self, nid: int, name: str):
        src = self.ir.operand(nid, name)
        return None if src is None else self.env[src]

    # evaluation ---------------------------------------------------------------------
    def eval(self, nid: int):
        n = self.ir.node(nid)
        op, a = n["op"], n["args"]
        i = self.i[:, None]
        j = self.i[None, :]
        if op == "q":
            return self.q
        if op == "input":
            name = a["name"]
            if name in self.tensors:
                return self.tensors[name]
            if n["kind"] is Kind.GATE:
                return self.arg(nid, "default")
            raise AssertionError(name)  # checked in `reference`
        if n["kind"] is Kind.KEYS:
            return self.keys(nid, op, a, i, j)
        if op == "blocks":
            return self.grid(a["len"], a["stride"])
        if n["kind"] is Kind.BLOCKS:
            out = self._blockset(nid, op, a)
            self.details.blocksets[self.name(nid)] = out.expand(self.B, self.Hq, -1, -1)
            if op in ("topk", "random"):
                self.details.selections[self.name(nid)] = self._indices(nid, out)
            return out
        if op == "pool":
            return self.pool(nid, a)
        if n["kind"] is Kind.SCORE:
            return self.score(nid, op, a)
        if op in ("attend_tokens", "attend_pooled", "union"):
            br = self.branch(nid, op, a)
            self.details.branches[self.name(nid)] = br.out
            return br
        if op == "linear":
            x = self.arg(nid, "x")
            owner = n["facts"]["params"]
            w, b = self.params[f"{owner}.weight"], self.params[f"{owner}.bias"]
            return x @ w.T + b  # [B, T, Hq]
        if op == "sigmoid":
            return torch.sigmoid(self.arg(nid, "logits"))
        if op == "mix":
            out = torch.zeros(self.B, self.T, self.Hq, self.Dv, dtype=F64, device=self.device)
            for idx in range(a["terms"]):
                br = self.arg(nid, f"branch.{idx}")
                gate = self.arg(nid, f"gate.{idx}")
                out = out + (br.out if gate is None else br.out * gate[..., None])
            return out
        raise AssertionError(f"reference: no rule for {op}")  # pragma: no cover

    def keys(self, nid, op, a, i, j) -> torch.Tensor:
        if op == "causal":
            m = j <= i
        elif op == "window":
            m = (i - j >= 0) & (i - j < a["size"])
        elif op == "sink":
            m = (j < a["n"]).expand(self.T, self.T)
        elif op == "global":
            m = (j < a["n"]) | (i < a["n"])
        elif op == "strided":
            m = torch.remainder(i - j, a["step"]) == a["offset"]
        elif op == "summary":
            m = (torch.remainder(j, a["step"]) >= a["step"] - a["width"]).expand(self.T, self.T)
        elif op == "tokens":
            bs = self.arg(nid, "blocks")  # [B|1, H|1, T, N]
            grid = self.grid_of(self.ir.operand(nid, "blocks"))
            return (bs.to(F64) @ grid.member.to(F64)) > 0
        elif op == "and":
            return self.arg(nid, "0") & self.arg(nid, "1")
        elif op == "or":
            return self.arg(nid, "0") | self.arg(nid, "1")
        elif op == "not":
            return ~self.arg(nid, "0")
        else:  # pragma: no cover
            raise AssertionError(op)
        return m[None, None]

    def grid(self, length: int, stride: int) -> _Grid:
        n = math.ceil(self.T / stride)
        start = torch.arange(n, device=self.device) * stride
        j = self.i[None, :]
        member = (j >= start[:, None]) & (j < start[:, None] + length)
        return _Grid(length, stride, n, start, member)

    def grid_of(self, nid: int) -> _Grid:
        ref = self.ir.node(nid)["facts"]["grid"]
        return self.env[int(ref[1:])]

    def _blockset(self, nid, op, a) -> torch.Tensor:
        g = self.grid_of(nid)
        i = self.i[:, None]
        start = g.start[None, :]
        idx = torch.arange(g.n, device=self.device)[None, :]
        if op == "past":
            m = start + g.length - 1 <= i
        elif op == "current":
            m = (start <= i) & (i < start + g.length)
        elif op == "future":
            m = start > i
        elif op == "first":
            m = (idx < a["n"]).expand(self.T, g.n)
        elif op == "recent":
            c = torch.div(i, g.stride, rounding_mode="floor")
            m = (idx <= c) & (idx > c - a["n"])
        elif op == "random":
            m = self._random(g, a["n"], a["seed"])
        elif op == "topk" and self.name(nid) in self.given:
            return self._from_indices(nid, self.given[self.name(nid)], g)
        elif op == "topk":
            return self._topk(nid, a, g)
        elif op in ("and", "or"):
            x, y = self.arg(nid, "0"), self.arg(nid, "1")
            return (x & y) if op == "and" else (x | y)
        elif op == "not":
            return ~self.arg(nid, "0")
        else:  # pragma: no cover
            raise AssertionError(op)
        return m[None, None]

    def _random(self, g: _Grid, count: int, seed: int) -> torch.Tensor:
        c = torch.div(self.i, g.stride, rounding_mode="floor")[:, None]  # query's block [T, 1]
        m = torch.arange(g.n, device=self.device)[None, :]
        eligible = m * g.stride + g.length - 1 < c * g.stride
        h = hash24(seed, c, m).to(F64)
        score = torch.where(eligible, h, torch.full_like(h, -1.0))
        return self._take_best(score, eligible, torch.full((self.T,), count, device=self.device))

    @staticmethod
    def _take_best(score, candidates, count) -> torch.Tensor:
        """The `count` best candidates per row (ties: lower index first)."""
        masked = torch.where(candidates, score, torch.full_like(score, float("-inf")))
        order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                      .expand_as(order).contiguous())
        return candidates & (rank < count[..., None])

    def _from_indices(self, nid: int, idx: torch.Tensor, g: _Grid) -> torch.Tensor:
        """A block set from index lists [B, T, H, S] (-1 padded), H = q or kv heads."""
        idx = idx.to(self.device).long()
        if idx.shape[2] != self.Hq:
            idx = idx.repeat_interleave(self.Hq // idx.shape[2], dim=2)
        m = torch.zeros(self.B, self.T, self.Hq, g.n + 1, dtype=torch.bool, device=self.device)
        m.scatter_(-1, torch.where(idx >= 0, idx, g.n), True)
        return m[..., : g.n].permute(0, 2, 1, 3)

    def _topk(self, nid, a, g: _Grid) -> torch.Tensor:
        score = self.arg(nid, "score")  # [B, Hq, T, N]
        self.details.scores[self.name(nid)] = score
        shape = score.shape
        force = self.arg(nid, "force")
        forbid = self.arg(nid, "forbid")
        force = torch.zeros(shape, dtype=torch.bool, device=self.device) if force is None \
            else force.expand(shape)
        forbid = torch.zeros(shape, dtype=torch.bool, device=self.device) if forbid is None \
            else forbid.expand(shape)
        cand = ~force & ~forbid
        # k counts the forced blocks that have started (start <= i): how many forced blocks
        # lie in the future depends on the sequence length, and must not change a selection
        started = g.start[None, :] <= self.i[:, None]  # [T, N]
        left = (a["k"] - (force & started).sum(-1)).clamp(min=0)
        return force | self._take_best(score, cand, left)

    def _indices(self, nid: int, sel: torch.Tensor) -> torch.Tensor:
        """Selected blocks as ascending index lists [B, T, H, S], -1 padded (H = kv heads when the
        selection is shared by a GQA group)."""
        sel = sel.expand(self.B, self.Hq, -1, -1)
        if self.ir.node(nid)["facts"].get("heads") in ("group", "static"):
            sel = sel[:, :: self.G]  # one list per kv head
        n = sel.shape[-1]
        s = max(int(sel.sum(-1).max().item()), 1)
        idx = torch.arange(n, device=self.device).expand_as(sel)
        keyed = torch.where(sel, idx, idx + n)
        ordered = torch.sort(keyed, dim=-1).values[..., :s]
        ordered = torch.where(ordered < n, ordered, torch.full_like(ordered, -1))
        return ordered.permute(0, 2, 1, 3).contiguous()

    def pool(self, nid, a):
        g = self.grid_of(nid)
        if a["method"] == "mean":
            member = g.member.to(F64)  # [N, T]
            count = member.sum(-1).clamp(min=1)
            kp = torch.einsum("nt,bthd->bnhd", member, self.k) / count[None, :, None, None]
            vp = torch.einsum("nt,bthd->bnhd", member, self.v) / count[None, :, None, None]
            return kp, vp
        owner = self.ir.node(nid)["facts"]["params"]
        return self._mlp(owner, "k", self.k, g), self._mlp(owner, "v", self.v, g)

    def _mlp(self, owner: str, side: str, x: torch.Tensor, g: _Grid) -> torch.Tensor:
        p = lambda s: self.params[f"{owner}.{side}.{s}"]  # noqa: E731
        B, T, H, D = x.shape
        pad = g.start[-1].item() + g.length - T if g.n else 0
        xp = torch.cat([x, x.new_zeros(B, max(pad, 0), H, D)], dim=1)
        tok = g.start[:, None] + torch.arange(g.length, device=self.device)[None, :]  # [N, L]
        blocks = xp[:, tok]  # [B, N, L, H, D]
        exists = (tok < T)[None, :, :, None, None]  # tokens past the end contribute 0
        blocks = torch.where(exists, blocks + p("pe")[None, None, :, None, :], 0.0)
        flat = blocks.permute(0, 1, 3, 2, 4).reshape(B, g.n, H, g.length * D)
        hidden = torch.nn.functional.gelu(flat @ p("w1") + p("b1"))
        return hidden @ p("w2") + p("b2")  # [B, N, H, D]

    def score(self, nid, op, a) -> torch.Tensor:
        if op == "dot":
            kp, _ = self.arg(nid, "pool")
            kp = self.kv_heads(kp, 2)  # [B, N, Hq, D]
            return a["scale"] * torch.einsum("bthd,bnhd->bhtn", self.q, kp)
        if op == "probs":
            return self.arg(nid, "branch").probs
        if op == "remap":
            src = self.grid_of(self.ir.operand(nid, "score"))
            dst = self.grid_of(nid)
            s0, s1 = src.start[:, None], dst.start[None, :]
            overlap = (torch.minimum(s0 + src.length, s1 + dst.length)
                       - torch.maximum(s0, s1)).clamp(min=0)
            return self.arg(nid, "score") @ (overlap.to(F64) / src.stride)
        if op == "groupsum":
            s = self.arg(nid, "score")
            B, H, T, N = s.shape
            summed = s.view(B, self.Hkv, self.G, T, N).sum(2)
            return self.kv_heads(summed, 1)
        raise AssertionError(op)  # pragma: no cover

    def branch(self, nid, op, a) -> _Branch:
        scale = a.get("scale") or 1.0 / math.sqrt(self.Dk)
        if op == "attend_tokens":
            mask = self.arg(nid, "keys")
            k = self.kv_heads(self.k, 2)
            v = self.kv_heads(self.v, 2)
            logits = scale * torch.einsum("bthd,bshd->bhts", self.q, k)
            values = v.permute(0, 2, 1, 3)
            pooled = False
            self.details.keys[self.name(nid)] = mask.expand(self.B, self.Hq, -1, -1)
        elif op == "attend_pooled":
            kp, vp = self.arg(nid, "keys")
            mask = self.arg(nid, "blocks")
            logits = scale * torch.einsum("bthd,bnhd->bhtn", self.q, self.kv_heads(kp, 2))
            values = self.kv_heads(vp, 2).permute(0, 2, 1, 3)
            pooled = True
        else:  # union
            parts = [self.env[u] for u in self.ir.operands(nid).values()]
            tok = [p for p in parts if not p.pooled]
            pool = [p for p in parts if p.pooled]
            logits, values, masks = [], [], []
            if tok:
                m = tok[0].mask
                for p in tok[1:]:
                    m = m | p.mask
                logits.append(tok[0].logits)
                values.append(tok[0].values)
                masks.append(m.expand(self.B, self.Hq, -1, -1))
                self.details.keys[self.name(nid)] = masks[-1]
            for p in pool:
                logits.append(p.logits)
                values.append(p.values)
                masks.append(p.mask.expand(self.B, self.Hq, -1, -1))
            logits = torch.cat(logits, -1)
            values = torch.cat(values, -2)
            mask = torch.cat(masks, -1)
            pooled = False
            scale = parts[0].scale
        mask_full = mask.expand(*logits.shape)
        probs, _ = _softmax_rows(logits, mask_full)
        out = (probs @ values).permute(0, 2, 1, 3)  # [B, T, Hq, Dv]
        return _Branch(out, logits, values, mask, pooled, scale, probs)


def needed_nodes(ir: IR, given: dict) -> set[int]:
    """Nodes `out` depends on, not descending into the default of a gate given as a tensor."""
    seen, stack = set(), [ir.out]
    while stack:
        nid = stack.pop()
        if nid in seen:
            continue
        seen.add(nid)
        n = ir.node(nid)
        if n["op"] == "input" and n["args"]["name"] in given:
            continue
        stack.extend(ir.operands(nid).values())
    return seen


def needed_inputs(ir: IR, given) -> frozenset[str]:
    """Names of the inputs `out` reads when the inputs named in `given` are given as tensors
    (a gate given as a tensor replaces its default, and what only that default reads)."""
    return frozenset(ir.node(n)["args"]["name"] for n in needed_nodes(ir, given)
                     if ir.node(n)["op"] == "input")


def check_inputs(ir: IR, q, k, v, tensors: dict, needed=needed_inputs) -> None:
    """Shapes and dtypes of everything the layer takes; a clear ValueError otherwise.
    `needed(ir, names)` is `needed_inputs` or a table of its values (the compiled layer
    keeps one, so that `torch.compile` traces no graph walk)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"`{name}` must be a tensor [batch, seq, heads, head_dim], "
                             f"got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"`{name}` must have 4 dimensions [batch, seq, heads, head_dim], "
                             f"got shape {tuple(t.shape)}")
    if 0 in q.shape or 0 in k.shape or 0 in v.shape:
        raise ValueError(f"`q`, `k`, `v` must not be empty, got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, T, Hq, D = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T):
        bad, t = ("k", k) if k.shape[:2] != (B, T) else ("v", v)
        raise ValueError(f"`{bad}` must be [batch={B}, seq={T}, kv_heads, head_dim] like `q`, "
                         f"got {tuple(t.shape)}")
    if k.shape[3] != D:
        raise ValueError(f"`k` must have head_dim {D} like `q`, got {tuple(k.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"`v` must have {k.shape[2]} heads like `k`, got {tuple(v.shape)}")
    if k.shape[2] == 0 or Hq % k.shape[2] != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of kv heads ({k.shape[2]})")
    dtypes = {q.dtype, k.dtype, v.dtype}
    if len(dtypes) > 1:
        raise ValueError(f"`q`, `k`, `v` must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    devices = {q.device, k.device, v.device}
    if len(devices) > 1:
        raise ValueError(f"`q`, `k`, `v` must be on one device, got {sorted(map(str, devices))}")
    for name, info in ir.inputs.items():
        t = tensors.get(name)
        if t is None:
            if info.role == "gate" and info.node is not None:
                continue  # computed from its default unless given
            if name not in needed(ir, tuple(n for n in ir.inputs if n in tensors)):
                continue  # only feeds defaults that given gates replace
            raise ValueError(f"spec `{ir.spec_name}` needs input `{name}` "
                             f"({'[batch, seq, d_model]' if info.role == 'x' else '[batch, seq, q_heads]'})")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"input `{name}` must be a tensor, got {type(t).__name__}")
        if info.role == "x":
            if t.dim() != 3 or t.shape[:2] != (B, T):
                raise ValueError(f"input `{name}` must be [batch={B}, seq={T}, d_model], "
                                 f"got {tuple(t.shape)}")
        elif t.shape != (B, T, Hq):
            raise ValueError(f"gate `{name}` must be [batch={B}, seq={T}, q_heads={Hq}], "
                             f"got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"input `{name}` is on {t.device}, `q` on {q.device}")
