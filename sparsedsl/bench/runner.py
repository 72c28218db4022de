"""`sparsedsl bench`: the run, one case and length at a time, every peer on the same inputs.

For each case: compile the sparsedsl layer once (timing spec -> layer), then for
each length: make the inputs, run sparsedsl (its output and block lists become
the reference the peers are checked against), the dense SDPA backends, then the
peers that express the same pattern. A failure (out of memory, an unsupported
backend, a missing package) becomes a row with its reason; only a lost CUDA
context stops the remaining rows. With --json the file is rewritten after every
row, so an interrupted run keeps what it measured.

With --decode the same loop runs one decode step per case and cache length
(`decode.py`): the inputs are a cache's keys and values and one new token, rows are
timed by `_measure_decode`, and the peers are checked against sparsedsl's decode output.
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from .cases import Case, make_cases
from .options import BenchOptions, UsageError, options_from_args
from .report import Results, Row, format_floors, format_table, write_png


def _err(msg: str) -> None:
    print(f"sparsedsl bench: {msg}", file=sys.stderr, flush=True)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args) -> int:
    try:
        opts = options_from_args(args)
    except UsageError as e:
        _err(f"error: {e}")
        return 2
    if opts.plot_from:
        return _replot(opts)
    if opts.floors_only:
        res = Results(options=_options_json(opts))
        _add_floors(res, make_cases(opts), opts, None)
        print("Analytic floor per case (FLOPs and bytes; no GPU measured)"
              + (", one decode step at the last position of each cache length:" if opts.decode
                 else ":"))
        print(format_floors(res))
        return 0
    problem = _no_gpu_reason()
    if problem:
        _err(f"error: {problem}")
        return 3
    return _bench(opts)


def _no_gpu_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA (a CPU build)"
        return (f"needs a CUDA GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"built with {built}). Nothing was measured. Without a GPU, "
                f"`--floors-only` prints each case's analytic floor.")
    import importlib.util
    if importlib.util.find_spec("sparsedsl.codegen") is None:  # a package mapping: pyproject.toml
        return ("sparsedsl.codegen cannot be imported: install the package (`pip install "
                "--no-deps --no-build-isolation -e .` in the repository) before benchmarking")
    return None


# --------------------------------------------------------------------------- environment
def _version(dist: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import pynvml
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - the driver version is informative only
        return None


def _git() -> dict:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {}


def environment() -> dict:
    import torch
    import triton
    from .impls import fla_version
    props = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_bytes": props.total_memory,
        "sm_count": props.multi_processor_count,
        "driver": _driver(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fla": fla_version(),
        "sparsedsl": _version("sparsedsl"),
        "git": _git(),
        "python": platform.python_version(),
        "dtype": "bfloat16",
        "batch": 1,
    }


def _options_json(opts: BenchOptions) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts).items()}


# --------------------------------------------------------------------------------- floors
def _add_floors(res: Results, cases: list[Case], opts: BenchOptions, ceil: dict | None) -> None:
    from .floor import decode_work, dense_decode_work, dense_work, work
    for case in cases:
        if case.describe() not in res.cases:
            res.cases.append(case.describe())
        for T in opts.seqs:
            if case.decode:
                w = decode_work(case, T)
                dense = dense_decode_work(T, case.q_heads, case.kv_heads, case.head_dim)
                f = {"case": case.label, "seq": T, **w.to_json(), "dense_flops_fwd": dense.flops,
                     "dense_bytes_fwd": dense.bytes}
                if ceil:
                    f.update(w.floor_ms(ceil["matmul_flops_per_s"], ceil["copy_bytes_per_s"]))
                res.floors.append(f)
                continue
            w = work(case, T)
            f = {"case": case.label, "seq": T, **w.to_json(),
                 "dense_flops_fwd": dense_work(T, case.q_heads, case.kv_heads,
                                               case.head_dim).flops_fwd}
            if ceil:
                f.update(w.floor_ms(ceil["matmul_flops_per_s"], ceil["copy_bytes_per_s"]))
            res.floors.append(f)


# ---------------------------------------------------------------------------------- bench
def _bench(opts: BenchOptions, device: str = "cuda") -> int:
    """Every case and length on `device` (the tests run the decode loop on the CPU, in the
    interpreter, with the GPU timers replaced)."""
    import torch

    from . import decode, impls
    from .measure import Unavailable, ceilings, cuda_alive, describe_error, release

    torch.backends.cuda.matmul.allow_tf32 = False  # the router's float32 scores stay float32
    on_gpu = torch.device(device).type == "cuda"
    cases = make_cases(opts)
    res = Results(meta=environment(), options=_options_json(opts))
    _progress(f"sparsedsl bench on {res.meta['gpu']} (torch {res.meta['torch']}, triton "
              f"{res.meta['triton']}, {res.meta['fla'] or 'fla not installed'})")
    if opts.ceilings:
        try:
            res.ceilings = ceilings(opts.warmup_ms, opts.rep_ms)
            _progress(f"ceilings: {res.ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s bf16 "
                      f"matmul, {res.ceilings['copy_bytes_per_s'] / 1e9:.0f} GB/s copy")
        except Exception as e:  # noqa: BLE001 - the floor is then in FLOPs and bytes only
            _progress(f"ceilings not measured: {describe_error(e)}")
        release()
    _add_floors(res, cases, opts, res.ceilings)

    def save():
        if opts.json:
            res.write_json(opts.json)

    # the grammar and passes load once per process: keep that out of every spec's cold time
    import sparsedsl
    sparsedsl.lower("pattern warm\nout = attend(causal)\n")
    lost = None
    layers: dict = {}  # one layer per spec, parameters and q heads (kv heads come with q, k, v)
    for case in cases:
        wanted = [i for i in ("sparsedsl", *impls.DENSE, *case.peers) if i in opts.impls]
        key = (case.spec, case.params, case.q_heads, case.head_dim)
        if "sparsedsl" in wanted and not lost and key not in layers:
            try:
                layers[key] = (impls.compile_layer(case, device), None)
            except Exception as e:  # noqa: BLE001 - a row says why
                layers[key] = (None, describe_error(e))
        compiled, compile_err = layers.get(key, (None, None))
        for T in opts.seqs:
            if lost:
                for impl in wanted:
                    res.rows.append(Row(case.label, T, impl, _kind(impl), status="skipped",
                                        reason=lost))
                continue
            _progress(f"[{case.label} {'L' if case.decode else 'T'}={T}]")
            try:
                inp = (decode if case.decode else impls).make_inputs(case, T, opts.seed, device)
            except Exception as e:  # noqa: BLE001
                reason = f"inputs: {describe_error(e)}"
                for impl in wanted:
                    res.rows.append(Row(case.label, T, impl, _kind(impl), status="error",
                                        reason=reason))
                release()
                save()
                continue
            ref = None  # sparsedsl's output and lists, for the peers' checks
            for impl in wanted:
                row = Row(case.label, T, impl, _kind(impl))
                prep = None
                try:
                    if impl == "sparsedsl" and compiled is None:
                        raise RuntimeError(f"compile: {compile_err}")
                    if case.decode:
                        prep = _prepare_decode(impl, case, inp, compiled, on_gpu)
                    elif impl == "sparsedsl":
                        prep = impls.prepare_sparsedsl(case, inp, compiled)
                    elif impl in impls.DENSE:
                        prep = impls.prepare_sdpa(case, inp, impl)
                    elif impl in ("flex", "flex+routing"):
                        prep = impls.prepare_flex(case, inp, impl)
                    elif impl == "fla":
                        prep = impls.prepare_fla(case, inp)
                    row.extra["notes"] = prep.notes
                    (_measure_decode if case.decode else _measure)(row, prep, opts)
                    if opts.check:
                        mod = decode if case.decode else impls
                        if impl == "sparsedsl" and any(p in wanted for p in case.peers):
                            ref = _attempt(mod.sparsedsl_reference_output, prep)
                        elif row.kind == "peer" and row.status == "ok" and row.fwd_ms:
                            row.extra["check"] = (
                                _attempt(decode.check, case, prep, ref) if case.decode
                                else _check(case, prep, ref, impls))
                except Unavailable as e:
                    row.status, row.reason = "n/a", str(e)
                except Exception as e:  # noqa: BLE001 - OOM, compile failures: a row each
                    row.status, row.reason = "error", describe_error(e)
                finally:
                    del prep
                    release()
                if row.status != "ok" or row.reason:
                    if on_gpu and not cuda_alive():
                        lost = f"CUDA context lost after {case.label} T={T} {impl}: {row.reason}"
                _progress(f"  {impl:<13} " + _summary(row))
                res.rows.append(row)
                if lost:
                    res.rows += [Row(case.label, T, i, _kind(i), status="skipped", reason=lost)
                                 for i in wanted[wanted.index(impl) + 1:]]
                save()
                if lost:
                    break
            del inp, ref
            release()
    print(format_table(res))
    if opts.json:
        save()
        print(f"\nwrote {opts.json}")
    code = 0
    if opts.png:
        code = max(code, _png(res, opts.png))
    bad = [r for r in res.rows if r.impl == "sparsedsl" and r.status not in ("ok",)]
    if bad:
        _err(f"{len(bad)} sparsedsl row(s) did not complete (see the table)")
        code = 1
    if lost:
        _err(lost)
        code = 1
    return code


def _kind(impl: str) -> str:
    from .impls import DENSE
    return "sparsedsl" if impl == "sparsedsl" else "dense" if impl in DENSE else "peer"


def _attempt(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - a check that cannot run is reported, not fatal
        from .measure import describe_error
        return describe_error(e)


def _measure(row: Row, prep, opts: BenchOptions) -> None:
    """Fill a row: forward, forward+backward, peak memory, extra timings, and the forward
    replayed from a CUDA graph (last: a capture that fails must not disturb the others);
    each part's failure is noted and the others still run."""
    import torch

    from .measure import (describe_error, do_bench, peak_fwdbwd, time_forward, time_fwdbwd,
                          time_graph)
    failures: dict[str, str] = {}  # part -> why
    try:
        row.fwd_ms = time_forward(prep, opts.warmup_ms, opts.rep_ms)
    except Exception as e:  # noqa: BLE001
        failures["fwd"] = describe_error(e)
    for name, fn in prep.extra.items():
        try:
            with torch.no_grad():
                fn()
                torch.cuda.synchronize()
                row.extra.setdefault("timings_ms", {})[name] = do_bench(fn, opts.warmup_ms,
                                                                        opts.rep_ms)
        except Exception as e:  # noqa: BLE001
            row.extra.setdefault("timings_ms", {})[name] = describe_error(e)
    try:
        row.fwdbwd_ms = time_fwdbwd(prep, opts.warmup_ms, opts.rep_ms)
        row.peak_bytes, row.work_bytes = peak_fwdbwd(prep)
    except Exception as e:  # noqa: BLE001
        failures["fwd+bwd"] = describe_error(e)
    if opts.graphs and row.fwd_ms is not None:  # the forward's GPU time without the host's
        try:
            row.extra.setdefault("timings_ms", {})["graph"] = time_graph(prep.fwd, opts.rep_ms)
        except Exception as e:  # noqa: BLE001 - e.g. a forward that syncs with the host
            row.extra.setdefault("timings_ms", {})["graph"] = describe_error(e)
    if len(set(failures.values())) == 1 and len(failures) == 2:  # one cause for both
        row.reason = next(iter(failures.values()))
    else:
        row.reason = "; ".join(f"{part}: {why}" for part, why in failures.items())
    if row.fwd_ms is None and row.fwdbwd_ms is None:
        row.status = "error"


def _prepare_decode(impl: str, case: Case, inp, compiled, on_gpu: bool):
    from . import decode
    from .impls import DENSE
    if impl == "sparsedsl":
        return decode.prepare_sparsedsl(case, inp, compiled)
    if impl in DENSE:
        return decode.prepare_sdpa(case, inp, impl)
    if impl in ("flex", "flex+routing"):
        return decode.prepare_flex(case, inp, impl, compiled=on_gpu)
    return decode.prepare_fla(case, inp)


def _measure_decode(row: Row, prep, opts: BenchOptions) -> None:
    """Fill a decode row: the step (do_bench: fwd_ms), the prepared extra timings (append,
    routing), the step in a host loop and from a CUDA graph, the step's working memory; each
    part's failure is noted and the others still run."""
    import torch

    from .measure import (describe_error, do_bench, peak_forward, time_forward, time_graph,
                          time_loop)
    failures: dict[str, str] = {}
    try:
        row.fwd_ms = time_forward(prep, opts.warmup_ms, opts.rep_ms)
    except Exception as e:  # noqa: BLE001
        row.status, row.reason = "error", describe_error(e)
        return
    timings = row.extra.setdefault("timings_ms", {})
    for name, fn in prep.extra.items():
        try:
            with torch.no_grad():
                timings[name] = do_bench(fn, opts.warmup_ms, opts.rep_ms)
        except Exception as e:  # noqa: BLE001
            timings[name] = describe_error(e)
    parts = [("loop", time_loop)] + ([("graph", time_graph)] if opts.graphs else [])
    for name, timer in parts:
        try:
            timings[name] = timer(prep.fwd, opts.rep_ms)
        except Exception as e:  # noqa: BLE001
            timings[name] = describe_error(e)
    try:
        row.peak_bytes, row.work_bytes = peak_forward(prep)
    except Exception as e:  # noqa: BLE001
        failures["memory"] = describe_error(e)
    row.reason = "; ".join(f"{part}: {why}" for part, why in failures.items())


def _check(case: Case, prep, ref, impls):
    """A peer's output against sparsedsl's on the same inputs."""
    import torch
    from .cases import Moba
    if ref is None:
        return "no sparsedsl output to compare with"
    if isinstance(ref, str):
        return f"sparsedsl output unavailable ({ref})"
    ref_out, lists = ref

    def go():
        with torch.no_grad():
            out = prep.to_bthd(prep.fwd())
        if isinstance(case.pattern, Moba) and "sel" in prep.state:
            return impls.compare_moba(ref_out, lists, out, prep.state["sel"], case.pattern.block)
        return impls.compare(ref_out, out)
    return _attempt(go)


def _summary(row: Row) -> str:
    if row.status != "ok":
        return f"{row.status}: {row.reason}"
    f = lambda x: "-" if x is None else f"{x:.3f} ms"  # noqa: E731
    if row.fwdbwd_ms is None and "loop" in row.extra.get("timings_ms", {}):  # a decode step
        t = row.extra["timings_ms"]
        g = lambda k: f(t[k]) if isinstance(t.get(k), float) else "-"  # noqa: E731
        s = f"step {f(row.fwd_ms)}, loop {g('loop')}, graph {g('graph')}"
        if "append" in t:
            s += f", append {g('append')}"
        return s + (f" ({row.reason})" if row.reason else "")
    peak = "-" if row.peak_bytes is None else f"{row.peak_bytes / 2 ** 30:.2f} GiB"
    s = f"fwd {f(row.fwd_ms)}, fwd+bwd {f(row.fwdbwd_ms)}, peak {peak}"
    return s + (f" ({row.reason})" if row.reason else "")


def _png(res: Results, path: str) -> int:
    try:
        write_png(res, path)
    except ImportError:
        _err(f"matplotlib is not installed: no plot written to {path} (the JSON has every "
             f"number; `python -m sparsedsl.bench --plot-from FILE.json --png {path}` draws it "
             f"where matplotlib is)")
        return 1
    except Exception as e:  # noqa: BLE001
        _err(f"plot failed: {type(e).__name__}: {e}")
        return 1
    print(f"wrote {path}")
    return 0


def _replot(opts: BenchOptions) -> int:
    """The table and plot of earlier runs (several JSON files are merged: a run split by
    --case is drawn as one)."""
    import json
    parts = []
    for path in (p for p in opts.plot_from.split(",") if p):
        try:
            parts.append(Results.from_json(json.loads(Path(path).read_text())))
        except (OSError, ValueError, TypeError) as e:
            _err(f"error: cannot read {path}: {e}")
            return 2
    res = Results.merge(parts)
    print(format_table(res))
    return _png(res, opts.png)

