"""`sparsedsl tune`: measure a layer's kernel knobs on this GPU and keep the fastest settings.

The generated host code takes each kernel's tile shape, warps and stages from a knob
(`sparsedsl.runtime.tuning.KNOBS`): the environment variable, else the tuned setting, else a
built-in default measured on an H100. On another GPU, or at a sequence length where the
defaults were not measured, other settings can be faster. This tool:

  1. runs the layer once and records which knobs the call reads (`discover`), in the order
     its kernels run: the forward's, then the backward's;
  2. searches them one at a time (coordinate descent, `search`): each candidate setting of
     a knob (`candidates`) is set through the environment, the call is run and its outputs
     (and the inputs' gradients) compared with the defaults' (a setting that computes
     something else is rejected and reported: that would be a compiler bug), then timed
     (the GPU time of its kernels, `kernel_ms`); a setting is kept only if it beats the
     best so far by `margin`, so noise does not move a knob;
  3. times the defaults and the chosen settings again, alternately, and records the choice
     only if it is faster (`runtime/tuning.py` stores it beside the generated module, where
     every later process on this device finds it).

A setting that fails (Triton's OutOfResources on a GPU with less shared memory, a tile a
kernel refuses) is skipped and reported. The search needs a CUDA GPU (`tune_layer`); its core
takes the run and the timer as functions, which is how the tests drive it without one.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..bench.measure import cuda_alive, describe_error
from ..reference.evaluate import needed_inputs
from ..runtime import tuning
from ..runtime.tuning import KNOBS

# Candidate settings per knob on a GPU (the built-in default is always tried too: the search
# starts from it). Tile-layout knobs: "BM,BN,WARPS,STAGES"; grouped: with a register cap
# and persistent programs an SM; row: "BN,WARPS,STAGES"; select: "BQ,C,WARPS" and
# "BQ,C,WARPS,QC,QWARPS" (docs/design.md). The lists hold the settings that won or came
# close in the H100 sweeps of docs/perf-notes.md and their neighbours in each direction.
GPU_CANDIDATES = {
    "SPARSEDSL_TILE": ("64,64,4,3", "64,64,4,2", "64,32,4,3", "128,64,8,3", "128,32,8,3",
                       "64,128,4,2", "128,128,8,2", "32,64,4,3"),
    "SPARSEDSL_TILE_DQ": ("128,64,8,3", "64,64,4,2", "64,64,4,3", "128,32,8,3", "64,32,4,2",
                          "128,128,8,2", "64,128,8,2"),
    "SPARSEDSL_TILE_DKDV": ("32,128,8,3", "32,128,8,4", "64,64,4,2", "64,128,8,2", "32,64,4,3",
                            "16,128,8,3", "64,64,8,3"),
    "SPARSEDSL_TILE_DKDVP": ("64,32,4,2", "32,32,4,3", "64,64,4,2", "32,64,4,2", "128,32,8,2"),
    "SPARSEDSL_QUERY_SPLIT": ("1", "2", "4", "8", "16", "32"),
    "SPARSEDSL_ROW": ("32,1,3", "32,1,2", "32,1,4", "64,1,3", "64,2,3", "16,1,3", "32,2,3",
                      "64,4,2"),
    "SPARSEDSL_ROW_DQ": ("64,2,2", "64,2,3", "32,2,2", "32,4,3", "64,4,2", "64,1,2", "128,4,2"),
    "SPARSEDSL_LIST_CHUNK": ("4096", "8192", "16384", "32768", "65536"),
    "SPARSEDSL_GROUPED": ("64,32,4,3,168,3", "64,64,4,3,0,2", "64,32,4,3,0,2", "128,64,8,3,0,1",
                          "64,64,4,2,168,3", "64,32,4,2,168,3", "64,32,4,4,168,2"),
    "SPARSEDSL_GROUPED_OWN": ("64,64,4,1,168", "64,64,4,2,168", "64,64,4,3,0", "64,32,4,2,168",
                              "128,64,8,2,0", "64,128,4,1,168", "128,128,8,1,0"),
    "SPARSEDSL_GROUPED_DQ": ("64,32,4,2,168", "64,64,4,2,168", "64,32,4,3,168", "64,32,4,2,0",
                             "128,32,8,2,0", "64,64,4,3,0"),
    "SPARSEDSL_GROUPED_DKDV": ("128,32,4,2", "128,32,8,2", "64,32,4,2", "128,64,8,2",
                               "64,64,4,2", "128,32,4,3", "64,32,4,3"),
    "SPARSEDSL_SELECT_TILE": ("32,16,1", "64,16,2", "16,16,1", "32,32,1", "128,16,4",
                              "64,16,1", "query"),
    "SPARSEDSL_SELECT_SPLIT": ("8,16,4,64,1", "8,16,4,32,1", "8,32,8,64,1", "4,16,4,64,1",
                               "16,16,8,64,1", "8,16,8,64,1", "8,16,4,128,1", "8,16,4,64,2",
                               "off"),
}
assert set(GPU_CANDIDATES) == set(KNOBS)

# relative error (of the largest magnitude) a setting's results may differ by from the
# defaults': rounding from another order of accumulation, nothing more
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3,
             torch.float64: 1e-9}
# where block selections differ (near-ties of the top-k scores broken the other way by a
# different order of accumulation), rows may differ: at most this share of the rows
FLIPPED_ROWS = 1e-3


@dataclass
class Trial:
    knob: str
    setting: str
    ms: float | None = None     # median time of the call with it (None: not timed)
    error: str | None = None    # why it was skipped or rejected
    kept: bool = False          # the best setting of its knob when it was tried


@dataclass
class Tuning:
    """A search's outcome: the chosen settings (knobs left at their default are absent)."""

    knobs: list[str]
    settings: dict[str, str]
    default_ms: float
    tuned_ms: float
    trials: list[Trial] = field(default_factory=list)
    confirmed: bool = True      # whether the final alternating timing kept the choice
    stopped_early: bool = False  # the time budget ran out before every candidate was tried

    @property
    def speedup(self) -> float:
        return self.default_ms / self.tuned_ms if self.tuned_ms else 1.0


def candidates(knob: str, cuda: bool = True) -> tuple[str, ...]:
    """The settings `search` tries for `knob` (GPU_CANDIDATES); in Triton's interpreter,
    small tiles (tests and `--dry-run`)."""
    if knob not in GPU_CANDIDATES:
        raise ValueError(f"unknown kernel knob `{knob}`; the knobs are {', '.join(KNOBS)}")
    if cuda:
        return GPU_CANDIDATES[knob]
    small = {"SPARSEDSL_ROW": ("16,1,1", "32,2,1"), "SPARSEDSL_ROW_DQ": ("16,1,1", "32,2,1"),
             "SPARSEDSL_SELECT_TILE": ("16,16,1", "query"),
             "SPARSEDSL_SELECT_SPLIT": ("2,16,1,16,1", "off"),
             "SPARSEDSL_QUERY_SPLIT": ("1", "2"), "SPARSEDSL_LIST_CHUNK": ("16", "64")}
    return small.get(knob, ("16,16,1,1", "32,16,2,1"))


def _set_environment(values: dict[str, str | None]) -> None:
    """Set environment variables, unsetting those whose value is None."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def _environment(values: dict[str, str | None]):
    """Environment variables set (or, for None, unset) inside the block, restored after."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        _set_environment(values)
        yield
    finally:
        _set_environment(saved)


def discover(module, run: Callable[[], object]) -> list[str]:
    """The knobs a call reads, in the order it reads them: `run` once with the generated
    module's `_knob` recording (and every knob unset, so that each reads its default)."""
    seen: list[str] = []
    knob = module._knob

    def recording(var, tuned):
        if var not in seen:
            seen.append(var)
        return knob(var, tuned)
    module._knob = recording
    try:
        with _environment({k: None for k in KNOBS}):
            run()
    finally:
        module._knob = knob
    return [k for k in seen if k in KNOBS]


def compare(outs: list, ref: list, tol: float, lists_at: int = 0) -> str | None:
    """Why results `outs` are not those of `ref` up to rounding, or None. Both are lists of
    tensors: first the output [B, T, H, DV], then its `lists_at` block lists [B, T, HS, KS]
    (selections), then gradients. Where a row's block lists differ (a near-tie of the top-k
    broken the other way), its output may differ, in at most FLIPPED_ROWS of the rows, and
    then so may the gradients (in as small a share of their elements)."""
    if len(outs) != len(ref):
        return f"{len(outs)} results against {len(ref)}"
    flipped = None  # [B, T, H]: rows whose block lists differ
    if lists_at:
        B, T, H = ref[0].shape[:3]
        flipped = torch.zeros(B, T, H, dtype=torch.bool, device=ref[0].device)
        for a, b in zip(outs[1:1 + lists_at], ref[1:1 + lists_at]):
            rows = (a != b).any(-1)  # [B, T, HS]
            flipped |= rows.repeat_interleave(H // rows.shape[2], dim=2)
        share = float(flipped.float().mean())
        if share > FLIPPED_ROWS:
            return f"block lists differ in {share:.2%} of the rows"
    flips = flipped is not None and bool(flipped.any())
    for i, (a, b) in enumerate(zip(outs, ref)):
        if 1 <= i <= lists_at:
            continue
        a, b = a.double(), b.double()
        if a.shape != b.shape:
            return f"result {i}: shape {tuple(a.shape)} against {tuple(b.shape)}"
        if not torch.isfinite(a).all():
            return f"result {i}: not finite"
        scale = max(float(b.abs().max()), 1e-30)
        bad = (a - b).abs() > tol * scale
        if i == 0 and flipped is not None:
            bad = bad & ~flipped[..., None]
        share = float(bad.double().mean())
        if share > (FLIPPED_ROWS if flips and i > 0 else 0.0):
            err = float((a - b).abs().max()) / scale
            return f"result {i}: {share:.3%} of its elements off by up to {err:.2e} of its scale"
    return None


def search(knobs: dict[str, tuple[str, ...]], run: Callable[[], list],
           measure: Callable[[], float], *, tol: float, lists_at: int = 0, rounds: int = 1,
           margin: float = 0.02, confirm: int = 3, budget_s: float | None = None,
           alive: Callable[[], bool] = lambda: True, log=None) -> Tuning:
    """Coordinate descent over `knobs` (name -> candidate settings), from the defaults.

    `run()` computes the call's results (see `compare`) under the current environment,
    `measure()` times it (ms); a candidate is kept when its results match the defaults'
    (within `tol`) and it is faster than the best so far by `margin`. `rounds` passes at most
    (a pass that keeps nothing ends it). Then `confirm` alternating timings of the defaults
    and the choice: the choice stands only if its median is lower. `alive()` is asked after
    a failed candidate (a broken CUDA context ends the search with an error); `budget_s`
    bounds the search's wall time (what was found by then is kept)."""
    log = log or (lambda msg: None)
    start = time.perf_counter()
    names = list(knobs)
    chosen: dict[str, str] = {}
    trials: list[Trial] = []
    stopped = False
    with _environment({k: None for k in KNOBS}):
        ref = run()
        best = default_ms = measure()
        log(f"defaults: {default_ms:.4f} ms")
        for _ in range(max(1, rounds)):
            changed = False
            for knob in names:
                for setting in knobs[knob]:
                    if setting == chosen.get(knob):
                        continue
                    if budget_s is not None and time.perf_counter() - start > budget_s:
                        stopped = True
                        break
                    trial = Trial(knob, setting)
                    trials.append(trial)
                    with _environment({knob: setting}):
                        try:
                            trial.error = compare(run(), ref, tol, lists_at)
                            if trial.error is None:
                                trial.ms = measure()
                        except Exception as e:  # noqa: BLE001 - reported, the search goes on
                            trial.error = describe_error(e)
                            if not alive():
                                raise RuntimeError(f"{knob}={setting} broke the CUDA context "
                                                   f"({trial.error}); the search stopped") from e
                    if trial.ms is not None and trial.ms < best * (1 - margin):
                        best, chosen[knob], trial.kept, changed = trial.ms, setting, True, True
                    log(f"{knob}={setting}: " + (f"{trial.ms:.4f} ms" if trial.ms is not None
                                                 else trial.error)
                        + ("  (kept)" if trial.kept else ""))
                _set_environment({knob: chosen.get(knob)})
                if stopped:
                    break
            if stopped or not changed:
                break
        tuned_ms, confirmed = best, True
        if chosen and confirm:
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(confirm):
                for tuned in (False, True):
                    with _environment({k: (chosen.get(k) if tuned else None) for k in KNOBS}):
                        times[tuned].append(measure())
            default_ms, tuned_ms = statistics.median(times[False]), statistics.median(times[True])
            confirmed = tuned_ms < default_ms
            log(f"confirm: defaults {default_ms:.4f} ms, tuned {tuned_ms:.4f} ms")
            if not confirmed:
                chosen, tuned_ms = {}, default_ms
    return Tuning(names, chosen, default_ms, tuned_ms, trials, confirmed, stopped)


# ------------------------------------------------------------------------ a layer's call
def layer_call(layer, q, k, v, inputs: dict, dout: torch.Tensor | None, backward: bool):
    """(run, fn): `run()` returns the call's results for `compare`: the output, the block
    lists, and with `backward` the gradients of q, k, v and of the tensor inputs; `fn()` is
    the call to time (nothing kept, gradients cleared after; the learnable parameters'
    gradients are computed in both).

    The parameters' gradients are not compared. Some are sums that cancel exactly in
    arithmetic: the last bias of NSA's key-compression MLP gets the sum of the pooled keys'
    gradients, and the dk of one softmax group sums to zero over its keys. So their values
    are rounding left over, and its size follows the order of accumulation. On the H100,
    at 64k, even the defaults run twice differed there by 3e-2 of its largest element. They
    are computed from the same kernels' results as the inputs' gradients (dk takes the MLP
    pool's backward of the pooled keys' gradients), so a setting that computes something
    else shows in those."""
    grads = [t for t in (q, k, v, *inputs.values()) if t.is_floating_point()]
    params = [p for p in layer.parameters() if p.requires_grad]

    def clear():
        for t in (*grads, *params):
            t.grad = None

    def fn():
        if not backward:
            with torch.no_grad():
                return layer(q, k, v, **inputs)
        out = layer(q, k, v, **inputs)
        out.backward(dout)
        clear()

    def run():
        clear()
        with torch.set_grad_enabled(backward):
            out, lists = layer(q, k, v, return_lists=True, **inputs)
            if backward:
                out.backward(dout)
        res = [out.detach().clone(), *(lists[n].clone() for n in sorted(lists))]
        if backward:
            res += [t.grad.clone() if t.grad is not None else torch.zeros_like(t)
                    for t in grads]
            clear()
        return res
    return run, fn


def random_inputs(layer, batch: int, seq: int, heads: int, kv_heads: int, head_dim: int,
                  head_dim_v: int, d_model: int | None, dtype, device, seed: int = 0,
                  backward: bool = True, gates: tuple[str, ...] = ()):
    """q, k, v, the spec's tensor inputs (a layer input `x` [B, T, d_model] where a learned
    gate reads one; gates without a default, and those named in `gates`, as [B, T, heads]
    in [0, 1)) and dO, on `device` in `dtype`; leaves that take gradients when
    `backward`."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)
    q, k, v = (randn(batch, seq, heads, head_dim), randn(batch, seq, kv_heads, head_dim),
               randn(batch, seq, kv_heads, head_dim_v))
    given = tuple(n for n, info in layer.ir.inputs.items()
                  if n in gates or (info.role == "gate" and info.node is None))
    inputs = {n: torch.rand(batch, seq, heads, generator=g, device=device,
                            dtype=torch.float32).to(dtype) for n in given}
    for name in sorted(needed_inputs(layer.ir, given) - set(given)):
        if layer.ir.inputs[name].role == "x":
            if d_model is None:
                raise ValueError(f"spec `{layer.spec_name}` reads a layer input `{name}`: "
                                 f"give --d-model")
            inputs[name] = randn(batch, seq, d_model)
    dout = randn(batch, seq, heads, head_dim_v)
    if backward:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
        inputs = {n: t.requires_grad_(True) for n, t in inputs.items()}
    return q, k, v, inputs, dout


def kernel_ms(fn: Callable[[], object], rep_ms: float = 100.0) -> float:
    """The GPU time of one call of `fn`: its kernels' durations summed (torch.profiler, CUDA
    activity), over as many calls as fill about `rep_ms`. Host time and the gaps between
    launches are left out: no knob changes them, and at short sequence lengths an eager
    call's host time (0.4-1 ms on the H100's host for MoBA at 8k, varying from call to
    call) would drown the kernels' differences, as it did in the first GPU run of the
    tuner's wall-clock timing (the same setting 1.79 and 2.00 ms)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one_ms = (time.perf_counter() - t0) * 1e3
    n = max(3, min(500, int(rep_ms / max(one_ms, 1e-3))))
    with warnings.catch_warnings():  # (torch's note that a profile keeps one cycle's events)
        warnings.filterwarnings("ignore", message=".*clears events at the end of each cycle")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
    us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type != DeviceType.CPU)
    return us / n / 1e3


def tune_layer(layer, q, k, v, inputs: dict, dout: torch.Tensor | None, *, backward: bool = True,
               knobs: list[str] | None = None, rounds: int = 1, rep_ms: float = 100.0,
               margin: float = 0.02, budget_s: float | None = None,
               measure: Callable[[Callable], float] | None = None, save: bool = True,
               log=None) -> tuple[Tuning, dict]:
    """Tune `layer`'s knobs for a call on q, k, v (and `inputs`): forward and backward
    (`backward`), or the forward alone. Returns the search's `Tuning` and the tuning entry
    (recorded beside the generated module when `save` and the choice was confirmed). Any
    settings tuned before for these shapes are set aside while searching. `measure(fn)`
    times a call (default `kernel_ms`: its GPU time over about `rep_ms` of calls)."""
    module = layer._kernels(q.device)
    cuda = q.is_cuda
    run, fn = layer_call(layer, q, k, v, inputs, dout, backward)
    if measure is None:
        measure = lambda f: kernel_ms(f, rep_ms)  # noqa: E731
    saved_table = dict(module._TUNED)
    module._TUNED.clear()
    try:
        found = discover(module, run)
        names = [n for n in found if knobs is None or n in knobs]
        if knobs is not None:
            missing = [n for n in knobs if n not in found]
            if missing:
                raise ValueError(f"this call reads no knob {', '.join(missing)}; it reads "
                                 f"{', '.join(found) or 'none'}")
        alive = cuda_alive if cuda else (lambda: True)
        n_lists = sum(1 for st in layer.plan.stages if st.kind == "select")
        result = search({n: candidates(n, cuda) for n in names}, run, lambda: measure(fn),
                        tol=TOLERANCE.get(q.dtype, 3e-2), lists_at=n_lists, rounds=rounds,
                        margin=margin, budget_s=budget_s, alive=alive, log=log)
    finally:
        module._TUNED.clear()
        module._TUNED.update(saved_table)
    import triton
    entry = {**dict(zip(tuning.SHAPE_FIELDS, module._tuning_key(q, k, v))), "seq": q.shape[1],
             "batch": q.shape[0],
             "objective": "forward+backward" if backward else "forward",
             "settings": result.settings, "default_ms": round(result.default_ms, 5),
             "tuned_ms": round(result.tuned_ms, 5),
             "date": datetime.date.today().isoformat(), "torch": torch.__version__,
             "triton": triton.__version__}
    if save and result.confirmed:
        tuning.record(layer._op.key, entry, module)
    return result, entry


def format_result(result: Tuning, width: int = 26) -> str:
    """The search as a table: each knob, the setting chosen (or `default`), and every
    candidate's time or why it was skipped."""
    lines = [f"a call's time: defaults {result.default_ms:.4f} ms -> tuned "
             f"{result.tuned_ms:.4f} ms "
             f"({result.speedup:.3f}x)" + ("" if result.confirmed else
                                          "; the confirming runs were not faster: nothing kept")
             + ("; stopped at the time budget" if result.stopped_early else "")]
    for knob in result.knobs:
        chosen = result.settings.get(knob, "default")
        lines.append(f"  {knob:<{width}} {chosen}")
        for t in (t for t in result.trials if t.knob == knob):
            what = f"{t.ms:.4f} ms" if t.ms is not None else t.error
            lines.append(f"      {t.setting:<18} {what}{'  *' if t.kept else ''}")
    return "\n".join(lines)

