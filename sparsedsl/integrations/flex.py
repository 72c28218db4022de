"""FlexAttention interop: a spec without data-dependent selection as a `BlockMask`.

    block_mask = layer.to_block_mask(seq_len)            # or to_block_mask(spec, seq_len)
    out = flex_attend(layer, q, k, v, block_mask)         # q, k, v: [batch, seq, heads, dim]

A spec is one FlexAttention mask when its output is a single `attend` over real keys whose
key set is `static` (the `heads` pass: the same for every head and input; token rules,
block grids and block rules other than `topk`, `random` included, since its hash is
seeded). The mask is the dense reference's own key mask (`sparsedsl/reference/evaluate.py`,
evaluated on the key-set nodes only, no attention is computed), so the BlockMask means what
the reference and the kernels compute. It is materialised as a [seq, seq] boolean tensor
that the BlockMask's `mask_mod` indexes: fine for comparisons and moderate lengths, O(T^2)
memory for long ones.

Everything else gets a `NotAMaskError` (a `SpecError`, pointing at the construct) saying why:
`topk` selections depend on q and k; pooled keys are virtual keys, not positions a mask can
name; a gated sum mixes separately normalised branches, which no single softmax gives.
"""
from __future__ import annotations

import math

import torch

from .. import runtime  # noqa: F401  (chooses Triton's interpreter off the GPU before torch._dynamo imports Triton)
from ..errors import SpecError
from ..ir.graph import IR
from ..ir.ops import Kind


class NotAMaskError(SpecError):
    """A spec whose output no single FlexAttention mask expresses."""


def _ir(spec) -> IR:
    from ..runtime.layer import SparseAttention
    if isinstance(spec, SparseAttention):
        return spec.ir
    if isinstance(spec, IR):
        return spec
    from ..pipeline import lower
    return lower(spec)


def _subtree(ir: IR, root: int) -> set[int]:
    seen, stack = set(), [root]
    while stack:
        nid = stack.pop()
        if nid not in seen:
            seen.add(nid)
            stack.extend(ir.operands(nid).values())
    return seen


def _static_branch(ir: IR) -> int:
    """The output's `attend_tokens` node, or a NotAMaskError saying why there is none."""
    out = ir.out
    node = ir.node(out)
    if node["op"] == "mix":
        terms = node["args"]["terms"]
        raise NotAMaskError(
            f"`{ir.spec_name}` has no single attention mask: its output is a sum of {terms} "
            f"separately normalised branches (gated or not), which one softmax over one key set "
            f"cannot give", ir.out_span or node["span"],
            note="to compare a branch on its own, write a spec whose `out` is that branch")
    if node["op"] == "attend_pooled":
        raise NotAMaskError(
            f"`{ir.spec_name}` attends pooled keys (one virtual key per block), not positions "
            f"a mask over the sequence can name", node["span"])
    if node["op"] == "union":
        raise NotAMaskError(
            f"`{ir.spec_name}`: to_block_mask does not handle `union(...)` yet", node["span"],
            note="for one softmax over several key sets, write `attend(a | b)`")
    assert node["op"] == "attend_tokens", node["op"]
    keys = ir.operand(out, "keys")
    if ir.node(keys)["facts"].get("heads") != "static":
        # the first construct that makes the key set depend on the data
        sub = _subtree(ir, keys)
        culprit = next(n for op in ("topk", "dot", "probs", "pool") for n in ir.order()
                       if n in sub and ir.node(n)["op"] == op)
        c = ir.node(culprit)
        what = {"topk": "selects blocks by a score computed from q and k",
                "dot": "scores blocks from q and k", "probs": "scores blocks from attention "
                "probabilities", "pool": "pools keys"}[c["op"]]
        raise NotAMaskError(
            f"`{ir.spec_name}` has no fixed mask: `{ir.label(culprit)}` ({c['op']}) {what}, so "
            f"which keys a query sees depends on the data", c["span"],
            note="FlexAttention's BlockMask is fixed before q and k are known; compare "
                 "with the reference (`layer.reference`) instead")
    return out


def key_mask(spec, seq_len: int, device=None) -> torch.Tensor:
    """The boolean key mask [seq_len, seq_len] (query i, key j) of a static spec, as the dense
    reference computes it."""
    from ..reference.evaluate import _Evaluator
    from ..reference.params import Dims
    ir = _ir(spec)
    branch = _static_branch(ir)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    keys = ir.operand(branch, "keys")
    needed = _subtree(ir, keys)
    z = torch.zeros(1, seq_len, 1, 1, dtype=torch.float64, device=device)
    ev = _Evaluator(ir, z, z, z, {}, {}, Dims(1, 1, 1))
    for nid in ir.order():
        if nid in needed:
            ev.env[nid] = ev.eval(nid)
    mask = ev.env[keys]  # [1, 1, T, T] (static: one batch entry, one head)
    assert ir.node(keys)["kind"] is Kind.KEYS and mask.shape[-2:] == (seq_len, seq_len)
    return mask.reshape(seq_len, seq_len)


def attention_scale(spec, head_dim: int) -> float:
    """The softmax scale of a static spec's attention (`scale=` of its `attend`, or
    1/sqrt(head_dim)), to pass to `flex_attention(..., scale=...)`."""
    ir = _ir(spec)
    return ir.node(_static_branch(ir))["args"].get("scale") or 1.0 / math.sqrt(head_dim)


def to_block_mask(spec, seq_len: int, device=None, block_size: int | tuple[int, int] = 128):
    """A FlexAttention `BlockMask` equal to a static spec's key mask at `seq_len` (queries and
    keys), broadcast over batch and heads. `spec`: a layer, an IR, or a spec (name, path,
    text). Raises NotAMaskError for specs with data-dependent selection, pooled keys or
    gated sums."""
    from torch.nn.attention.flex_attention import create_block_mask
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    mask = key_mask(spec, seq_len, device)

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]

    return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device,
                             BLOCK_SIZE=block_size)


def flex_attend(spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask=None,
                **flex_kwargs) -> torch.Tensor:
    """`flex_attention` in sparsedsl's layout: q, k, v [batch, seq, heads, head_dim] (GQA
    allowed) -> [batch, seq, q_heads, head_dim_v], with the spec's mask (`to_block_mask`
    at q's length on q's device unless given) and scale."""
    from torch.nn.attention.flex_attention import flex_attention
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim], got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if block_mask is None:
        block_mask = to_block_mask(spec, q.shape[1], q.device)
    flex_kwargs.setdefault("scale", attention_scale(spec, q.shape[-1]))
    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                         block_mask=block_mask, enable_gqa=q.shape[2] != k.shape[2],
                         **flex_kwargs)
    return out.transpose(1, 2)
