"""A packed batch of sequences of different lengths (flash-attn's `cu_seqlens`), forward
and backward, each sequence checked against running it alone.

    python examples/packed_batch.py [--spec moba|nsa|FILE] [--lengths 9,1,0,3,12]
                                    [--device cpu|cuda]

The sequences lie one after the other in batch row 0 (q, k, v [1, total, heads, dim], the
layer input x [1, total, d_model]); `cu_seqlens` (int32) says where each starts. The layer
attends every sequence alone: no block, pooled key, window or selection crosses into the
next one. It runs them as a padded batch [num_seqs, max_seqlen] in one call of its kernels,
so the cost is that of num_seqs x max_seqlen tokens. Without a GPU the kernels run in
Triton's interpreter: sizes are small.
"""
from __future__ import annotations

import argparse
import time

import torch

import sparsedsl

SMALL = {  # block sizes that make short sequences cross several blocks
    "moba": dict(block=4, topk=2),
    "nsa": dict(cmp_len=4, cmp_stride=2, sel_len=4, topn=2, window=6),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="moba", help="built-in name or .attn file")
    ap.add_argument("--lengths", default="9,1,0,3,12", help="comma-separated sequence lengths")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]

    Hkv, G, D, dm = 1, 2, 16, 32
    H = Hkv * G
    params = SMALL.get(args.spec, {}) if args.device == "cpu" else {}
    layer = sparsedsl.compile(args.spec, head_dim=D, q_heads=H, d_model=dm, **params)
    layer = layer.to(args.device)
    dev = args.device

    # the packed batch: offsets from 0 to total, int32, on q's device
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(),
                              dtype=torch.int32, device=dev)
    total, longest = int(cu_seqlens[-1]), max(lengths)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dev).requires_grad_()

    q, k, v = rand(1, total, H, D), rand(1, total, Hkv, D), rand(1, total, Hkv, D)
    x = rand(1, total, dm)
    inputs = {"x": x} if "x" in layer.ir.inputs else {}

    t0 = time.perf_counter()
    # max_seqlen (a Python int) spares reading the longest length from cu_seqlens
    out = layer(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=longest, **inputs)
    out.square().sum().backward()
    print(f"{layer.spec_name} {dict(params)}: {len(lengths)} sequences {lengths}, packed "
          f"[1, {total}] -> out {list(out.shape)}, forward + backward "
          f"{time.perf_counter() - t0:.1f} s on {dev}")

    print(f"{'sequence':>10} {'tokens':>6}  {'max |out - alone|':>17}  {'max |dq - alone|':>16}")
    c = cu_seqlens.tolist()
    worst = 0.0
    for i, (a, b) in enumerate(zip(c[:-1], c[1:])):
        if a == b:
            print(f"{i:>10} {0:>6}  {'(empty)':>17}")
            continue
        qa, ka, va = (t.detach()[:, a:b].clone().requires_grad_() for t in (q, k, v))
        alone = layer(qa, ka, va, **{n: t[:, a:b] for n, t in inputs.items()})
        alone.square().sum().backward()
        err = (out[:, a:b] - alone).abs().max().item()
        derr = (q.grad[:, a:b] - qa.grad).abs().max().item()
        print(f"{i:>10} {b - a:>6}  {err:>17.2e}  {derr:>16.2e}")
        worst = max(worst, err / max(alone.abs().max().item(), 1e-6))
    print(f"worst error relative to the output's scale: {worst:.2e}")
    return 0 if worst < 1e-4 else 1  # float32 rounding, not a different result


if __name__ == "__main__":
    raise SystemExit(main())
