"""`make demo`: the main job.

Checks the built-in specs and prints their IR, then compiles MoBA, NSA and one
example to generated Triton kernels, runs them on random inputs (on the GPU
when there is one, else in Triton's interpreter at a small size), checks them
against the dense reference and prints a table: spec, shape, max error,
fraction of keys attended, time.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from . import builtin_names, compile, lower
from .testing.oracle import check_layer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "moba_window_sinks.attn"


def _table(head, rows) -> str:
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    return "\n".join("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
                     for r in [head] + rows)


def main() -> None:
    torch.manual_seed(0)
    for name in builtin_names():
        ir = lower(name)
        print(f"== {name}: IR after {', '.join(ir.passes_run)}")
        print(ir.format(spans=False))
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        B, T, Hq, Hkv, D = 1, 8192, 16, 1, 128
        cases = [("moba", {}), ("nsa", {}), (str(EXAMPLE), {})]
    else:  # the interpreter runs every program in Python: keep it small
        B, T, Hq, Hkv, D = 1, 48, 2, 1, 16
        cases = [("moba", {"block": 8, "topk": 3}),
                 ("nsa", {"cmp_len": 8, "cmp_stride": 4, "sel_len": 8, "topn": 3, "window": 12}),
                 (str(EXAMPLE), {"block": 8, "topk": 2, "window": 8, "sinks": 2})]
    rows = []
    failures = 0
    for spec, params in cases:
        layer = compile(spec, head_dim=D, q_heads=Hq, d_model=64, **params).to(device)
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(B, T, h, D, generator=g).to(device, dtype) for h in (Hq, Hkv, Hkv))
        inputs = {n: torch.randn(B, T, 64, generator=g).to(device, dtype)
                  for n, i in layer.ir.inputs.items() if i.role == "x"}
        layer(q, k, v, **inputs)  # compile / warm up
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        layer(q, k, v, **inputs)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if cuda and T > 2048:  # the dense reference is O(T^2): check a prefix
            Tc = 1024
            q, k, v = q[:, :Tc], k[:, :Tc], v[:, :Tc]
            inputs = {n: t[:, :Tc] for n, t in inputs.items()}
        rep = check_layer(layer, q, k, v, inputs, out_tol=1.0)
        dens = layer.reference(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                               return_details=True,
                               **{n: t.double().cpu() for n, t in inputs.items()}).density
        name = Path(spec).stem if spec.endswith(".attn") else spec
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        ok = rep.finite and rep.error < tol
        failures += not ok
        rows.append((name, ", ".join(f"{a}={b}" for a, b in params.items()) or "defaults",
                     f"[{B},{T},{Hq}/{Hkv},{D}] {str(dtype).replace('torch.', '')}",
                     f"{rep.error:.1e}", "ok" if ok else f"FAIL (> {tol:g})", f"{dens:.3f}",
                     f"{dt * 1e3:.1f} ms"))
    where = "GPU" if cuda else "Triton interpreter (no GPU)"
    print(f"Generated kernels vs the dense reference, on {where}:")
    print("  (max error relative to the output's scale; attended = fraction of causal keys)")
    print(_table(("spec", "params", "shape [B,T,Hq/Hkv,D]", "max error", "check", "attended",
                  "time"), rows))
    if failures:
        raise SystemExit(f"{failures} spec(s) disagree with the reference")


if __name__ == "__main__":
    main()
