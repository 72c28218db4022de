"""Sweep a kernel configuration knob for one bench case on a GPU: sparsedsl's forward and
forward+backward times (medians of do_bench, ms) and peak memory for each value.

    python scripts/tune.py --case nsa-fla --seq 8k --env SPARSEDSL_SELECT_TILE \
        --values "4,32,4" "4,64,4" "8,32,8" [--group 16] [--fwd-only]

The knobs are environment variables the generated host code reads at every call
(`SPARSEDSL_SELECT_TILE`, `SPARSEDSL_TILE`; docs/perf-notes.md says what each holds), so
one process can try every value: Triton compiles each new set of constants once. A value of
`-` leaves the variable unset (the built-in default). The chosen defaults go into the host
code; the sweep's table goes into docs/perf-notes.md with its date, GPU and command.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def main(argv=None) -> int:
    from sparsedsl.bench.cases import make_cases
    from sparsedsl.bench.impls import compile_layer, make_inputs, prepare_sparsedsl
    from sparsedsl.bench.measure import peak_fwdbwd, time_forward, time_fwdbwd
    from sparsedsl.bench.options import add_arguments, options_from_args

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", required=True)
    ap.add_argument("--seq", default="8k")
    ap.add_argument("--group", default=None)
    ap.add_argument("--env", required=True, help="the environment variable to sweep")
    ap.add_argument("--values", nargs="+", required=True)
    ap.add_argument("--fwd-only", action="store_true")
    ap.add_argument("--rep", type=float, default=50.0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune.py needs a CUDA GPU", file=sys.stderr)
        return 2
    bench_args = ["--case", args.case, "--seq", args.seq] + (
        ["--group", args.group] if args.group else [])
    bp = argparse.ArgumentParser()
    add_arguments(bp)
    opts = options_from_args(bp.parse_args(bench_args))
    rows = []
    for case in make_cases(opts):
        compiled = compile_layer(case)
        for T in opts.seqs:
            inp = make_inputs(case, T, 0)
            for value in args.values:
                if value == "-":
                    os.environ.pop(args.env, None)
                else:
                    os.environ[args.env] = value
                try:
                    p = prepare_sparsedsl(case, inp, compiled)
                    fwd = time_forward(p, 10, args.rep)
                    both = peak = None
                    if not args.fwd_only:
                        both = time_fwdbwd(p, 10, args.rep)
                        peak = peak_fwdbwd(p)[0] / 2**30
                    rows.append((case.label, T, value, fwd, both, peak, ""))
                except Exception as e:  # a configuration Triton cannot build: say so, go on
                    rows.append((case.label, T, value, None, None, None,
                                 f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
                torch.cuda.empty_cache()
                r = rows[-1]
                print(f"{r[0]:<16} {r[1]:>6} {args.env}={r[2]:<12} fwd "
                      f"{'-' if r[3] is None else f'{r[3]:8.3f}'}  fwd+bwd "
                      f"{'-' if r[4] is None else f'{r[4]:8.3f}'}  peak "
                      f"{'-' if r[5] is None else f'{r[5]:.2f} GiB'} {r[6]}", flush=True)
    os.environ.pop(args.env, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
