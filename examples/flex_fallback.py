"""A static spec as a FlexAttention BlockMask: compare sparsedsl's kernels with
FlexAttention on the same pattern, or fall back to it.

    python examples/flex_fallback.py [--spec examples/longformer.attn] [--seq 96]
                                     [--set NAME=VALUE ...] [--device cpu|cuda]

`layer.to_block_mask(T)` builds the BlockMask from the dense reference's own key mask, so
it means what the kernels compute; `flex_attend` runs `flex_attention` in sparsedsl's
[batch, seq, heads, dim] layout with the spec's scale. Specs with data-dependent selection
(top-k), pooled keys or gated sums are no single mask: they get an error saying which
construct is why (try `--spec moba`).
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

import sparsedsl
from sparsedsl.integrations.flex import NotAMaskError, flex_attend

HERE = Path(__file__).parent
SMALL = {"longformer": dict(window=16, globals=4), "bigbird": dict(block=8)}  # CPU sizes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(HERE / "longformer.attn"))
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    params = dict(SMALL.get(Path(args.spec).stem, {}) if args.device == "cpu" else {})
    params.update(s.split("=", 1) for s in args.set)
    layer = sparsedsl.compile(args.spec, **params)
    T, block = args.seq, 16 if args.device == "cpu" else 128
    try:
        block_mask = layer.to_block_mask(T, args.device, block_size=block)
    except NotAMaskError as e:
        print(e)
        return 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, h, 32, generator=g).to(args.device) for h in (4, 2, 2))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention outside torch.compile warns it is slow
        ours = layer(q, k, v)
        theirs = flex_attend(layer, q, k, v, block_mask)
    err = ((ours - theirs).abs().max() / ours.abs().max()).item()
    kept = block_mask.kv_num_blocks.sum().item()  # partial tiles, then full ones
    if block_mask.full_kv_num_blocks is not None:
        kept += block_mask.full_kv_num_blocks.sum().item()
    total = (-(-T // block)) ** 2
    print(f"{layer.spec_name} at {T} tokens: BlockMask keeps {kept} of {total} "
          f"{block}x{block} tiles; max |sparsedsl - flex| / max |sparsedsl| = {err:.2e}")
    return 0 if err < 1e-4 else 1


if __name__ == "__main__":
    raise SystemExit(main())
