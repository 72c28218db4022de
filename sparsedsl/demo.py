"""`make demo`: check the built-in specs, print their IR, and evaluate the dense
reference on random inputs, reporting how dense each pattern is."""
from __future__ import annotations

import time

import torch

from . import builtin_names, init_params, lower, reference


def main() -> None:
    torch.manual_seed(0)
    rows = []
    for name in builtin_names():
        ir = lower(name)
        print(f"== {name}: IR after {', '.join(ir.passes_run)}")
        print(ir.format(spans=False))
    B, T, Hq, Hkv, D, dmodel = 1, 256, 4, 2, 32, 64
    q = torch.randn(B, T, Hq, D)
    k = torch.randn(B, T, Hkv, D)
    v = torch.randn(B, T, Hkv, D)
    x = torch.randn(B, T, dmodel)
    small = {"moba": {"block": 32, "topk": 3},
             "nsa": {"cmp_len": 16, "cmp_stride": 8, "sel_len": 32, "topn": 4, "window": 64}}
    for name in builtin_names():
        over = small.get(name, {})
        ir = lower(name, over)
        params = init_params(ir, head_dim=D, q_heads=Hq, d_model=dmodel)
        inputs = {"x": x} if "x" in ir.inputs else {}
        t0 = time.perf_counter()
        d = reference(name, q, k, v, params=params, return_details=True, **inputs, **over)
        dt = time.perf_counter() - t0
        ok = bool(torch.isfinite(d.out).all())
        rows.append((name, ", ".join(f"{a}={b}" for a, b in over.items()),
                     f"[{B},{T},{Hq}/{Hkv},{D}]", f"{d.density:.3f}", "yes" if ok else "NO",
                     f"{dt * 1e3:.0f} ms"))
    head = ("spec", "overrides", "shape [B,T,Hq/Hkv,D]", "density", "finite", "reference time")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    print("Dense reference on random inputs (density = attended / causal (query, key) pairs):")
    for r in [head] + rows:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
