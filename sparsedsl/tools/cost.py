"""`sparsedsl cost`: what a pattern costs at a sequence length, from the IR alone.

Keys per branch come from `keysets.count_keys` (exact per query; top-k counted
structurally, see there). From them, for one forward pass of one layer:

FLOPs (a multiply-add is 2):
  attention   per query, q head and key: 2 * (Dk + Dv)  (q.k and p.v; softmax not counted)
  pooling     mean: (Dk + Dv) adds per token of each block, per kv head;
              mlp: 2 * (L*D*hidden + hidden*D) per block, kv head and side (k and v)
  scores      a top-k over `dot(q, pool)`: 2 * Dk per query, q head and free candidate
              block (a score from `probs` comes with its branch; remap, groupsum and the
              sort are not counted)
  gates       `linear(x)`: 2 * d_model per query and q head

bytes (at `dtype`):
  q read and the output written once: T * Hq * (Dk + Dv)
  keys and values: every query loads each key it attends, Dk + Dv values per key, once
    per kv head when the branch's key set is shared by the GQA group (static patterns,
    `groupsum` selections), once per q head otherwise; no reuse between queries
    (the decoding view; a kernel that tiles queries loads less)
  pooling: reads the tokens of every block, writes one key and value per block
  scores: the pooled keys of the free candidates, per query and kv head
  gates: x, per query

Dense causal attention, on the same model: query i attends keys 0..i.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..ir.graph import IR
from .keysets import KeyCounts, branch_name, count_keys

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class Dims:
    batch: int = 1
    heads: int = 1  # q heads
    kv_heads: int = 1
    head_dim: int = 128
    head_dim_v: int = 128
    d_model: int = 128
    dtype: str = "bfloat16"

    @property
    def elt(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass
class BranchCost:
    name: str
    kind: str  # tokens | pooled | union
    last_tokens: int
    last_pooled: int
    mean_tokens: float
    mean_pooled: float

    @property
    def last(self) -> int:
        return self.last_tokens + self.last_pooled

    @property
    def mean(self) -> float:
        return self.mean_tokens + self.mean_pooled


@dataclass
class Cost:
    spec: str
    params: dict
    seq: int
    dims: Dims
    branches: list[BranchCost]
    last_total: int
    mean_total: float
    dense_last: int
    dense_mean: float
    flops: dict[str, int]  # attention, pooling, scores, gates, total
    dense_flops: int
    bytes: dict[str, int]  # qo, kv, pooling, scores, gates, total
    dense_bytes: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        d["ratio_last"] = self.seq / self.last_total if self.last_total else None
        d["ratio_mean"] = self.seq / self.mean_total if self.mean_total else None
        d["flops_ratio"] = self.dense_flops / self.flops["total"] if self.flops["total"] else None
        d["bytes_ratio"] = self.dense_bytes / self.bytes["total"] if self.bytes["total"] else None
        return d


def cost(ir: IR, T: int, dims: Dims = Dims(), progress=None, counts: KeyCounts | None = None
         ) -> Cost:
    """Keys, FLOPs and bytes of one forward pass of `ir` at sequence length T."""
    if T < 1:
        raise ValueError("the sequence length must be at least 1")
    kc = counts or count_keys(ir, T, progress=progress)
    Hq, Hkv, Dk, Dv, B = dims.heads, dims.kv_heads, dims.head_dim, dims.head_dim_v, dims.batch
    rows = []
    attn_flops = kv_bytes = 0
    for b in kc.branches:
        tok, pooled = kc.tokens[b.name], kc.pooled[b.name]
        kind = "union" if b.op == "union" else ("pooled" if b.op == "attend_pooled" else "tokens")
        rows.append(BranchCost(b.name, kind, tok[-1], pooled[-1], sum(tok) / T, sum(pooled) / T))
        keys = sum(tok) + sum(pooled)
        attn_flops += keys * Hq * 2 * (Dk + Dv)
        kv_bytes += keys * (Dk + Dv) * (Hkv if b.heads in ("static", "group") else Hq)
    pool_flops = pool_bytes = 0
    for nid in ir.nodes_with("pool"):
        g = ir.node(ir.operand(nid, "grid"))["args"]
        L, S = g["len"], g["stride"]
        n = -(-T // S)
        tokens = sum(min(L, T - m * S) for m in range(n))
        if ir.node(nid)["args"]["method"] == "mean":
            pool_flops += tokens * Hkv * (Dk + Dv)
        else:
            hidden = ir.node(nid)["args"]["hidden"] or Dk
            pool_flops += n * Hkv * sum(2 * (L * D * hidden + hidden * D) for D in (Dk, Dv))
        pool_bytes += (tokens + n) * Hkv * (Dk + Dv)
    score_flops = score_bytes = 0
    for nid in ir.nodes_with("topk"):
        if _reads_dot(ir, ir.operand(nid, "score")):
            free = sum(kc.candidates[branch_name(ir, nid)])
            score_flops += free * Hq * 2 * Dk
            score_bytes += free * Hkv * Dk
    linears = len(ir.nodes_with("linear"))
    gate_flops = linears * T * Hq * 2 * dims.d_model
    gate_bytes = (T * dims.d_model) if linears else 0
    qo = T * Hq * (Dk + Dv)
    flops = dict(attention=attn_flops, pooling=pool_flops, scores=score_flops, gates=gate_flops)
    flops = {k: v * B for k, v in flops.items()}
    flops["total"] = sum(flops.values())
    nbytes = dict(qo=qo, kv=kv_bytes, pooling=pool_bytes, scores=score_bytes, gates=gate_bytes)
    nbytes = {k: v * B * dims.elt for k, v in nbytes.items()}
    nbytes["total"] = sum(nbytes.values())
    dense_keys = T * (T + 1) // 2
    dense_flops = B * dense_keys * Hq * 2 * (Dk + Dv)
    dense_bytes = B * dims.elt * (qo + dense_keys * Hkv * (Dk + Dv))
    return Cost(ir.spec_name, ir.param_values(), T, dims, rows,
                kc.total(T - 1), sum(kc.total(i) for i in range(T)) / T, T, (T + 1) / 2,
                flops, dense_flops, nbytes, dense_bytes, list(kc.notes))


def _reads_dot(ir: IR, nid: int) -> bool:
    n = ir.node(nid)
    if n["op"] == "dot":
        return True
    if n["op"] in ("remap", "groupsum"):
        return _reads_dot(ir, ir.operand(nid, "score"))
    return False


# ------------------------------------------------------------------------ printing
def _num(x: float) -> str:
    if isinstance(x, int) or float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:,.1f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def format_cost(c: Cost, stream=None) -> str:
    from .term import paint, si, table
    d = c.dims
    pv = ", ".join(f"{k}={v}" for k, v in c.params.items())
    plural = lambda n, w: f"{n} {w}" + ("" if n == 1 else "s")  # noqa: E731
    head = (f"{c.spec}({pv}) at N = {c.seq:,}: {plural(d.heads, 'query head')}, "
            f"{plural(d.kv_heads, 'kv head')}, "
            f"head dim {d.head_dim}" + (f"/{d.head_dim_v}" if d.head_dim_v != d.head_dim else "")
            + f", {d.dtype}, batch {d.batch}")
    out = [paint(head, "1", stream), ""]
    rows = []
    for b in c.branches:
        rows.append([b.name, b.kind, _num(b.last_tokens), _num(b.last_pooled), _num(b.last),
                     _num(round(b.mean_tokens, 1)), _num(round(b.mean_pooled, 1)),
                     _num(round(b.mean, 1))])
    rows.append(["total", "", "", "", _num(c.last_total), "", "", _num(round(c.mean_total, 1))])
    rows.append(["dense causal", "", "", "", _num(c.dense_last), "", "",
                 _num(round(c.dense_mean, 1))])
    rows.append(["N / total", "", "", "", _ratio(c.seq, c.last_total), "", "",
                 _ratio(c.seq, c.mean_total)])
    out.append(f"keys attended per query (last query i = {c.seq - 1:,}; average over all "
               f"{c.seq:,} queries)")
    out.append(table(rows, ["branch", "kind", "last: tokens", "pooled", "total",
                            "avg: tokens", "pooled", "total"], "ll", stream))
    out.append("")
    f, nb = c.flops, c.bytes
    rows = [["FLOPs", si(f["total"]), si(c.dense_flops), _ratio(c.dense_flops, f["total"])]]
    for k in ("attention", "pooling", "scores", "gates"):
        if f[k]:
            rows.append([f"  {k}", si(f[k]), "", ""])
    rows.append(["bytes", si(nb["total"], "B"), si(c.dense_bytes, "B"),
                 _ratio(c.dense_bytes, nb["total"])])
    for k, label in (("qo", "q and output"), ("kv", "keys and values"), ("pooling", "pooling"),
                     ("scores", "scores"), ("gates", "gate input")):
        if nb[k]:
            rows.append([f"  {label}", si(nb[k], "B"), "", ""])
    out.append("one forward pass of the layer")
    out.append(table(rows, ["", "sparse", "dense causal", "dense / sparse"], "l", stream))
    notes = list(c.notes) + [
        "bytes: each query loads every key it attends (no reuse between queries; a GQA group "
        "shares the loads of a shared key set); see `sparsedsl/tools/cost.py`"]
    out.append("")
    out.extend(f"note: {n}" for n in notes)
    return "\n".join(out) + "\n"
