"""Timing and memory of one prepared implementation, with failures caught as reasons.

Times are medians of `triton.testing.do_bench` (CUDA events, L2 cleared between
runs, gradients reset to None outside the timed region) over at least MIN_REPS calls.
The forward is timed under `torch.no_grad()`; forward+backward times both passes together,
with a fixed random dO. Peak memory is that of one forward+backward:
`torch.cuda.max_memory_allocated()` after a reset, less what was allocated
before, plus the bytes of the implementation's own inputs.

Decode steps (`--decode`) are timed three ways, since at batch 1 launch overhead can
outweigh the kernels: `do_bench` as above (GPU time between CUDA events, L2 cleared;
host overhead shows only where it outlasts the GPU's work queued before the call),
`time_loop` (back-to-back calls timed on the host: Python and launch overhead included)
and `time_graph` (replays of a CUDA graph holding one call: no Python, no L2 flush).
Their memory is the working memory of one step (`peak_forward`).
"""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .options import MIN_REPS


@dataclass
class Prepared:
    """One implementation ready to run on one case's inputs."""

    fwd: Callable[[], torch.Tensor]          # the forward: returns the output
    leaves: list[torch.Tensor]               # what the backward writes .grad into
    dout: torch.Tensor                       # dO, in the output's layout
    to_bthd: Callable[[torch.Tensor], torch.Tensor]  # output -> [batch, seq, heads, dim]
    input_bytes: int                         # bytes of the inputs it holds (q, k, v, gates)
    notes: dict = field(default_factory=dict)
    # further forward-only timings, name -> fn (e.g. FlexAttention's routing and mask build)
    extra: dict[str, Callable[[], object]] = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # what the checks need (layer, selections)


class Unavailable(Exception):
    """The implementation cannot run here (not installed, unsupported shape): a reason."""


def describe_error(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def cuda_alive() -> bool:
    """False when an earlier error (an illegal address, say) broke the CUDA context."""
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return True
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return False


def release() -> None:
    gc.collect()
    try:
        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def do_bench(fn: Callable[[], object], warmup_ms: float, rep_ms: float,
             grad_to_none=None) -> float:
    """The median of `triton.testing.do_bench` over rep_ms of calls, stretched to at least
    MIN_REPS calls (and one warm-up call) from a first timing of one call."""
    import triton.testing
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    one = start.elapsed_time(end)
    return float(triton.testing.do_bench(fn, warmup=max(warmup_ms, one),
                                         rep=max(rep_ms, (MIN_REPS + 1) * one),
                                         grad_to_none=grad_to_none, return_mode="median"))


def _clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


def time_forward(p: Prepared, warmup_ms: float, rep_ms: float) -> float:
    with torch.no_grad():  # (do_bench makes the first, compiling call untimed)
        return do_bench(p.fwd, warmup_ms, rep_ms)


def _step(p: Prepared) -> None:
    p.fwd().backward(p.dout)


def time_fwdbwd(p: Prepared, warmup_ms: float, rep_ms: float) -> float:
    ms = do_bench(lambda: _step(p), warmup_ms, rep_ms, grad_to_none=p.leaves)
    _clear_grads(p.leaves)
    return ms


def peak_fwdbwd(p: Prepared) -> tuple[int, int]:
    """(peak bytes including the implementation's inputs, working bytes alone)."""
    _clear_grads(p.leaves)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(p)
    torch.cuda.synchronize()
    work = torch.cuda.max_memory_allocated() - base
    _clear_grads(p.leaves)
    return work + p.input_bytes, work


def ceilings(warmup_ms: float, rep_ms: float) -> dict:
    """The device's bfloat16 matmul rate and copy bandwidth, measured (METHOD.md: datasheet
    rates are leads; measure the two ceilings once)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup_ms, rep_ms)
    x = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    y = torch.empty_like(x)
    cp_ms = do_bench(lambda: y.copy_(x), warmup_ms, rep_ms)
    nbytes = 2 * x.numel() * x.element_size()  # read + write
    return {"matmul_flops_per_s": 2 * n ** 3 / (mm_ms * 1e-3),
            "copy_bytes_per_s": nbytes / (cp_ms * 1e-3),
            "how": f"bf16 {n}x{n}x{n} torch.matmul; device-to-device copy of 512 MiB "
                   f"(bytes read + written); medians of do_bench"}


# --------------------------------------------------------------------------- decode steps
def _cuda_sync() -> None:
    torch.cuda.synchronize()


def _batches(rep_ms: float, one_ms: float, batches: int = 5) -> int:
    """Calls per timed batch: `batches` batches fill about rep_ms."""
    return max(3, min(20000, int(rep_ms / batches / max(one_ms, 1e-4))))


def time_loop(fn: Callable[[], object], rep_ms: float, sync: Callable[[], None] = _cuda_sync,
              batches: int = 5) -> float:
    """Median ms per call of back-to-back calls timed on the host (perf_counter, one
    synchronize per batch): what a Python decode loop pays, launch overhead included."""
    with torch.no_grad():
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        sync()
        n = _batches(rep_ms, (time.perf_counter() - t0) / 3 * 1e3, batches)
        times = []
        for _ in range(batches):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            times.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(times)


def time_graph(fn: Callable[[], object], rep_ms: float, batches: int = 5) -> float:
    """Median ms per replay of a CUDA graph that holds one call (captured after a warm-up on
    a side stream); replays run back to back, without clearing L2 between them."""
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        try:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            n = _batches(rep_ms, start.elapsed_time(end) / 3, batches)
            times = []
            for _ in range(batches):
                start.record()
                for _ in range(n):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / n)
        finally:
            del graph
    return statistics.median(times)


def peak_forward(p: Prepared) -> tuple[int, int]:
    """(peak bytes of one forward (a decode step) with the implementation's inputs (its
    cache), the working bytes alone)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        p.fwd()
    torch.cuda.synchronize()
    work = torch.cuda.max_memory_allocated() - base
    return work + p.input_bytes, work
