"""`sparsedsl bench`: sparsedsl's kernels against dense and sparse peers, on one GPU.

One process runs every case (MoBA, NSA as flash-linear-attention computes it, NSA
at the paper's defaults, a sliding window with sinks) at several sequence lengths
on the same inputs: sparsedsl's compiled layer, torch SDPA (cuDNN and flash),
FlexAttention expressing the same pattern, and fla's `parallel_nsa` when it is
installed. Forward and forward+backward times (medians of
`triton.testing.do_bench`), peak memory, the analytic floor of each case, a table,
JSON and a plot. Nothing here is imported until the verb runs (torch is heavy).

With `--decode` it times one decode step instead (`decode.py`): the query at the last
position of a KV cache of 8k to 128k tokens, sparsedsl's `layer.decode` (and the
`cache.append` of one token) against SDPA and FlexAttention on that one query, with the
floor of one step.

    sparsedsl bench --seq 8192,16384 --json out/bench.json --png out/bench.png
    python -m sparsedsl.bench --quick
    python -m sparsedsl.bench --decode --case moba --json out/decode.json --png out/decode.png

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
