"""Where one bench case's time goes on a GPU: torch.profiler over a few forward (and
forward+backward) calls of sparsedsl's layer, the kernels sorted by GPU time, and the host
time per call next to the GPU time, so launch- and Python-bound cases show as such.

    python scripts/profile_case.py --case moba --seq 8k [--group 16] [--fwd-only] [--calls 5]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch


def main(argv=None) -> int:
    from torch.profiler import ProfilerActivity, profile

    from sparsedsl.bench.cases import make_cases
    from sparsedsl.bench.impls import compile_layer, make_inputs, prepare_sparsedsl
    from sparsedsl.bench.options import add_arguments, options_from_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", required=True)
    ap.add_argument("--seq", default="8k")
    ap.add_argument("--group", default=None)
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_case.py needs a CUDA GPU", file=sys.stderr)
        return 2
    bp = argparse.ArgumentParser()
    add_arguments(bp)
    opts = options_from_args(bp.parse_args(
        ["--case", args.case, "--seq", args.seq] + (["--group", args.group] if args.group else [])))
    for case in make_cases(opts):
        compiled = compile_layer(case)
        for T in opts.seqs:
            p = prepare_sparsedsl(case, make_inputs(case, T, 0), compiled)
            modes = [("fwd", lambda: p.fwd())]
            if not args.fwd_only:
                modes.append(("fwd+bwd", lambda: p.fwd().backward(p.dout)))
            for name, fn in modes:
                grad = torch.enable_grad() if name != "fwd" else torch.no_grad()
                with grad:
                    fn()
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        fn()
                    host = (time.perf_counter() - t0) / args.calls  # until the last launch
                    torch.cuda.synchronize()
                    wall = (time.perf_counter() - t0) / args.calls
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        for _ in range(args.calls):
                            fn()
                        torch.cuda.synchronize()
                events = [e for e in prof.key_averages() if e.device_time_total > 0]
                gpu = sum(e.device_time_total for e in events) / args.calls / 1e3
                print(f"\n{case.label} T={T} {name}: wall {wall * 1e3:.3f} ms/call, host "
                      f"(launching) {host * 1e3:.3f} ms/call, GPU busy {gpu:.3f} ms/call")
                for e in sorted(events, key=lambda e: -e.device_time_total)[:args.top]:
                    print(f"  {e.device_time_total / args.calls / 1e3:8.3f} ms  "
                          f"x{e.count // args.calls:<3} {e.key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
