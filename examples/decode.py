"""Decoding with a KV cache: a prompt prefilled in chunks, then tokens one at a time, each
step checked against the full-sequence forward.

    python examples/decode.py [--spec nsa|moba|FILE] [--prompt 24] [--new 12]
                              [--splits S] [--device cpu|cuda]

A toy "model" stands in for a transformer layer: q, k, v and the layer input x of each new
token are random projections of a random embedding. The cache (`layer.new_cache`) keeps
keys, values and the spec's pooled blocks (NSA's compressed blocks) and re-pools only the
blocks each appended token touches; `layer.decode` runs the generated decode kernels on the
new positions. Without a GPU the kernels run in Triton's interpreter: sizes are small.
"""
from __future__ import annotations

import argparse
import time

import torch

import sparsedsl

SMALL = {  # block sizes that make a short CPU run cross many blocks
    "moba": dict(block=8, topk=2),
    "nsa": dict(cmp_len=8, cmp_stride=4, sel_len=8, topn=3, window=12),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="nsa", help="built-in name or .attn file")
    ap.add_argument("--prompt", type=int, default=24, help="prompt tokens, prefilled in chunks")
    ap.add_argument("--new", type=int, default=12, help="tokens decoded one at a time")
    ap.add_argument("--chunk", type=int, default=8, help="prefill chunk")
    ap.add_argument("--splits", type=int, default=None, help="key splits per decode step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    B, Hkv, G, D, dm = 1, 2, 4, 32, 64
    H = Hkv * G
    params = SMALL.get(args.spec, {}) if args.device == "cpu" else {}
    layer = sparsedsl.compile(args.spec, head_dim=D, q_heads=H, d_model=dm, **params)
    layer = layer.to(args.device)
    gen = torch.Generator().manual_seed(0)
    proj = {n: torch.randn(dm, h * D, generator=gen) / dm ** 0.5
            for n, h in (("q", H), ("k", Hkv), ("v", Hkv))}
    T = args.prompt + args.new
    x = torch.randn(B, T, dm, generator=gen)
    q, k, v = ((x @ proj[n]).view(B, T, -1, D).to(args.device) for n in ("q", "k", "v"))
    x = x.to(args.device)
    inputs = {"x": x} if "x" in layer.ir.inputs else {}

    with torch.no_grad():
        full = layer(q, k, v, **inputs)  # what decoding must reproduce, row for row
        cache = layer.new_cache(B, Hkv, D, capacity=16, device=args.device)
        worst, t, times = 0.0, 0, []
        while t < T:
            n = min(args.chunk, args.prompt - t) if t < args.prompt else 1
            cut = slice(t, t + n)
            start = time.perf_counter()
            out = layer.decode(q[:, cut], cache, k[:, cut], v[:, cut], splits=args.splits,
                               **{name: x_[:, cut] for name, x_ in inputs.items()})
            if args.device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            err = (out - full[:, cut]).abs().max().item()
            worst = max(worst, err)
            kind = "prefill" if t < args.prompt else "decode"
            if kind == "decode":
                times.append(elapsed)
            if kind == "prefill" or t + 1 == T or (t - args.prompt) % 8 == 0:
                print(f"{kind:7s} positions {t:4d}..{t + n - 1:4d}  max |decode - forward| "
                      f"= {err:.2e}  ({elapsed * 1e3:.1f} ms)")
            t += n
    times.sort()
    print(f"{layer.spec_name}: {T} positions ({cache}); worst error {worst:.2e}; median decode "
          f"step {times[len(times) // 2] * 1e3:.1f} ms on {args.device}"
          f"{' (interpreter)' if args.device == 'cpu' else ''}")
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
