"""Packed variable-length batches: flash-attn's `cu_seqlens` convention on a compiled layer.

A packed batch holds `num_seqs` sequences one after the other in batch row 0: q is
[1, total, heads, dim], and the int32 tensor `cu_seqlens` [num_seqs + 1] gives where each
starts (`cu_seqlens[i]`) and ends (`cu_seqlens[i + 1]`), from 0 to `total`. Every
per-token input (gate tensors [1, total, H], the layer input `x` [1, total, d_model]) is
packed the same way.

The layer runs such a batch as a padded one: `pad` scatters the tokens into
[num_seqs, max_seqlen, ...] (each sequence at the start of its row, zeros after it), the
layer's operators run once on that batch (one launch per kernel stage for all sequences),
and `unpad` gathers the rows back to [1, total, ...]. Every spec is proven causal, so the
zeros after a sequence never change its outputs, and nothing crosses from one sequence to
the next: blocks, pools, windows and selections are those of each sequence alone. Block
indices in returned lists are relative to each sequence's start; entries naming blocks
that start after the sequence's end (a top-k may pick blocks of the padding, which no
query of the sequence attends) are -1. Both moves are index
copies that autograd differentiates (the padded rows get zero gradient), so the backward
operators run unchanged. The index is built on the device from `cu_seqlens` (no loop over
sequences, no host copy of the offsets).

Cost: the kernels run on num_seqs x max_seqlen rows, so very unequal lengths waste work
(one long sequence and many short ones cost like as many long ones); kernels that read the
sequence offsets themselves (an in-kernel varlen) would remove that.
"""
from __future__ import annotations

import torch


def check_cu_seqlens(cu_seqlens, max_seqlen, q: torch.Tensor) -> int:
    """Validate a packed call's `cu_seqlens` and `max_seqlen` against `q` [1, total, H, D];
    returns the padded length (`max_seqlen`, or the longest sequence when it is None).

    The checks of values (starts at 0, non-decreasing, ends at total, no sequence longer
    than `max_seqlen`) read the tensor: in eager mode that is one host sync for all of them
    (and for the longest length when `max_seqlen` is None); under `torch.compile` they are
    device-side asserts (`torch._assert_async`), which need `max_seqlen` to be given."""
    if q.shape[0] != 1:
        raise ValueError(f"with `cu_seqlens`, q, k, v must be packed as [1, total, heads, dim] "
                         f"(batch dimension 1), got q {tuple(q.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"`cu_seqlens` must be a tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"`cu_seqlens` must be 1-D with num_seqs + 1 >= 2 offsets, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"`cu_seqlens` must be int32 (flash-attn's convention), got "
                         f"{cu_seqlens.dtype}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"`cu_seqlens` must be on q's device {q.device}, got "
                         f"{cu_seqlens.device}")
    if max_seqlen is not None and (not isinstance(max_seqlen, int) or
                                   isinstance(max_seqlen, bool) or max_seqlen < 1):
        raise ValueError(f"`max_seqlen` must be a Python int >= 1 (the longest sequence, or "
                         f"more), got {max_seqlen!r}")
    total = q.shape[1]
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    checks = [cu_seqlens[0] == 0, (lengths >= 0).all(), cu_seqlens[-1] == total]
    if max_seqlen is not None:
        checks.append((lengths <= max_seqlen).all())
    if torch.compiler.is_compiling():
        if max_seqlen is None:
            raise ValueError("under torch.compile, pass `max_seqlen` (a Python int) with "
                             "`cu_seqlens`: the padded length must not be read from a tensor")
        # constant messages: max_seqlen may be a symbolic size here
        for ok, what in zip(checks, _WHAT):
            torch._assert_async(ok, f"`cu_seqlens` {what}")
        return max_seqlen
    flags = torch.stack(checks).to(torch.int64)
    if max_seqlen is None:
        flags = torch.cat([flags, lengths.max().to(torch.int64).view(1)])
    values = flags.tolist()  # the one host sync
    for i, (ok, what) in enumerate(zip(values, _WHAT)):
        if not ok:
            if i == 2:
                what += f" = q.shape[1] = {total}"
            if i == 3:
                raise ValueError(f"`max_seqlen` = {max_seqlen} is shorter than the longest "
                                 f"sequence {int(lengths.max())} of `cu_seqlens` {_show(cu_seqlens)}")
            raise ValueError(f"`cu_seqlens` {what}, got {_show(cu_seqlens)}")
    return max_seqlen if max_seqlen is not None else max(int(values[-1]), 1)


_WHAT = ("must start at 0", "must be non-decreasing", "must end at total",
         "has a sequence longer than `max_seqlen`")


def _show(cu_seqlens: torch.Tensor) -> str:
    vals = cu_seqlens.tolist()
    return str(vals) if len(vals) <= 12 else f"[{', '.join(map(str, vals[:12]))}, ...]"


def padded_index(cu_seqlens: torch.Tensor, total: int, max_seqlen: int):
    """Where each packed token goes in the flattened padded batch [num_seqs * max_seqlen],
    and the length of its sequence: two int64 [total] tensors. Token t of sequence i
    (cu[i] <= t < cu[i+1]) goes to i * max_seqlen + t - cu[i]. Built on the device: the
    sequence of each token by a sorted search of the offsets."""
    t = torch.arange(total, device=cu_seqlens.device, dtype=torch.int32)
    # the last offset <= t (empty sequences are skipped); searched in cu_seqlens itself, not
    # a slice or a cast of it: inductor's CUDA lowering of searchsorted needs a real buffer
    seq = torch.searchsorted(cu_seqlens, t, right=True) - 1
    cu = cu_seqlens.to(torch.int64)
    start = cu[seq]
    return seq * max_seqlen + (t - start), cu[seq + 1] - start


def pad(packed: torch.Tensor, index: torch.Tensor, num_seqs: int, max_seqlen: int):
    """[1, total, ...] -> [num_seqs, max_seqlen, ...], zeros after each sequence."""
    rest = packed.shape[2:]
    out = packed.new_zeros(num_seqs * max_seqlen, *rest).index_copy(0, index, packed[0])
    return out.view(num_seqs, max_seqlen, *rest)


def unpad(padded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[num_seqs, max_seqlen, ...] -> [1, total, ...]: the rows `index` names."""
    flat = padded.reshape(padded.shape[0] * padded.shape[1], *padded.shape[2:])
    return flat.index_select(0, index).unsqueeze(0)


def unpad_list(padded: torch.Tensor, index: torch.Tensor, seqlen: torch.Tensor,
               stride: int) -> torch.Tensor:
    """A block list [num_seqs, max_seqlen, heads, KS] -> [1, total, heads, KS], with -1 for
    blocks that start after the token's sequence ends (block n starts at n * stride): in
    the padded batch a top-k without a `future` forbid may pick blocks of the padding, which
    the causal rules then leave unattended; they do not exist in the sequence alone."""
    lst = unpad(padded, index)
    past_end = lst.to(torch.int64) * stride >= seqlen.view(1, -1, 1, 1)
    return torch.where(past_end, torch.full_like(lst, -1), lst)


def run_packed(forward, q, k, v, cu_seqlens, max_seqlen, return_lists: bool, inputs: dict,
               list_strides: dict[str, int]):
    """`forward(q, k, v, return_lists, inputs)` (the layer's batch path) on a packed batch
    whose shapes the layer has checked: pad every per-token tensor, run once, unpad the
    output (and the block lists; `list_strides`: each list's block stride)."""
    length = check_cu_seqlens(cu_seqlens, max_seqlen, q)
    num_seqs, total = cu_seqlens.shape[0] - 1, q.shape[1]
    if num_seqs == 1 and length == total:  # one sequence filling the batch: nothing to move
        return forward(q, k, v, return_lists, inputs)
    index, seqlen = padded_index(cu_seqlens, total, length)
    move = lambda t: pad(t, index, num_seqs, length)  # noqa: E731
    result = forward(move(q), move(k), move(v), return_lists,
                     {n: move(t) for n, t in inputs.items()})
    if return_lists:
        out, lists = result
        return unpad(out, index), {n: unpad_list(t, index, seqlen, list_strides[n])
                                   for n, t in lists.items()}
    return unpad(result, index)


def reference_packed(reference, q, k, v, cu_seqlens, inputs: dict) -> torch.Tensor:
    """`reference(q, k, v, **inputs)` (the dense reference) on each sequence of a packed
    batch alone, the outputs packed back to [1, total, ...]: the oracle of the packed path
    (a loop over sequences, with the offsets read on the host)."""
    check_cu_seqlens(cu_seqlens, None, q)
    c = cu_seqlens.tolist()
    outs = [reference(q[:, a:b], k[:, a:b], v[:, a:b], **{n: t[:, a:b] for n, t in inputs.items()})
            for a, b in zip(c[:-1], c[1:]) if b > a]
    return torch.cat(outs, 1)
