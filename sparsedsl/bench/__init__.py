"""`sparsedsl bench`: sparsedsl's kernels against dense and sparse peers, on one GPU.

One process runs every case (MoBA, NSA as flash-linear-attention computes it, NSA
at the paper's defaults, a sliding window with sinks) at several sequence lengths
on the same inputs: sparsedsl's compiled layer, torch SDPA (cuDNN and flash),
FlexAttention expressing the same pattern, and fla's `parallel_nsa` when it is
installed. Forward and forward+backward times (medians of
`triton.testing.do_bench`), peak memory, the analytic floor of each case, a table,
JSON and a plot. Nothing here is imported until the verb runs (torch is heavy).

    sparsedsl bench --seq 8192,16384 --json out/bench.json --png out/bench.png
    python -m sparsedsl.bench --quick

The CLI registers the verb with `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    """Add the bench options to an argparse parser (a `sparsedsl bench` sub-parser)."""
    from .options import add_arguments as _add
    _add(parser)


def run(args) -> int:
    """Run the benchmark for parsed arguments; returns the process exit code."""
    from .runner import run as _run
    return _run(args)


__all__ = ["add_arguments", "run"]
