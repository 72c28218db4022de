"""Command-line options of `sparsedsl bench`, parsed into one frozen `BenchOptions`."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

CASES = ("moba", "nsa-fla", "nsa", "window-sinks")
IMPLS = ("sparsedsl", "sdpa-cudnn", "sdpa-flash", "flex", "flex+routing", "fla")
DEFAULT_SEQ = (8192, 16384, 32768, 65536)
QUICK_SEQ = (8192,)
DEFAULT_DECODE_SEQ = (8192, 16384, 32768, 65536, 131072)  # cache lengths with --decode
NSA_Q_HEADS = 64  # both NSA cases: 64 query heads, kv heads = 64 / group
DEFAULT_GROUPS = (16,)
# the fewest timed calls a median is taken over (measure.do_bench): do_bench times as many
# calls as fit in --rep ms, at least one, and at 64k one forward+backward can outlast it
MIN_REPS = 10


class UsageError(ValueError):
    """A bad option value: printed as one line, exit code 2."""


@dataclass(frozen=True)
class BenchOptions:
    seqs: tuple[int, ...] = DEFAULT_SEQ
    cases: tuple[str, ...] = CASES
    impls: tuple[str, ...] = IMPLS
    groups: tuple[int, ...] = DEFAULT_GROUPS
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    json: str | None = None
    png: str | None = None
    plot_from: str | None = None
    floors_only: bool = False
    check: bool = True
    ceilings: bool = True
    seed: int = 0
    quick: bool = False
    decode: bool = False  # one new token against a KV cache of each length in `seqs`
    graphs: bool = True   # also time the forward (a decode step) replayed from a CUDA graph


def _ints(text: str, what: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1
        if part.endswith("k"):
            part, mult = part[:-1], 1024
        try:
            value = int(part) * mult
        except ValueError:
            raise UsageError(f"--{what}: expected comma-separated integers (8192 or 8k), "
                             f"got {text!r}") from None
        if value <= 0:
            raise UsageError(f"--{what}: values must be positive, got {value}")
        out.append(value)
    if not out:
        raise UsageError(f"--{what}: no value given")
    return tuple(dict.fromkeys(out))


def _names(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise UsageError(f"--{what}: unknown {', '.join(map(repr, bad)) or 'empty list'}; "
                         f"choose from {', '.join(allowed)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq", metavar="T,...",
                        help="sequence lengths (default 8192,16384,32768,65536; 8k works); "
                             "with --decode, cache lengths (default 8k,16k,32k,64k,128k)")
    parser.add_argument("--decode", action="store_true",
                        help="time one decode step instead of the forward and backward: the "
                             "query at the last position of a KV cache of each --seq length "
                             "(batch 1): sparsedsl's layer.decode (and cache.append), SDPA and "
                             "FlexAttention on one query")
    parser.add_argument("--no-graph", action="store_true",
                        help="do not time the forward (with --decode: the step) replayed from "
                             "a CUDA graph")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 8192 tokens only (unless --seq), fewer repetitions")
    parser.add_argument("--case", metavar="NAME,...",
                        help=f"cases to run (default all): {', '.join(CASES)}")
    parser.add_argument("--impl", metavar="NAME,...",
                        help=f"implementations to run (default all): {', '.join(IMPLS)}")
    parser.add_argument("--group", metavar="G,...",
                        help=f"GQA group sizes for the NSA cases, {NSA_Q_HEADS} query heads and "
                             f"{NSA_Q_HEADS}/G kv heads (default 16; e.g. 1,4,8,16)")
    parser.add_argument("--warmup", type=float, metavar="MS",
                        help="do_bench warm-up time in ms (default 25; 5 with --quick)")
    parser.add_argument("--rep", type=float, metavar="MS",
                        help=f"do_bench repetition time in ms (default 100; 20 with --quick), "
                             f"stretched to at least {MIN_REPS} calls")
    parser.add_argument("--json", metavar="FILE",
                        help="write every result and the environment to FILE (rewritten after "
                             "each measurement, so an interrupted run keeps what it measured)")
    parser.add_argument("--png", metavar="FILE", help="write a plot (time vs sequence length)")
    parser.add_argument("--plot-from", metavar="JSON,...",
                        help="no benchmark: redraw the table and plot (--png) from JSON files "
                             "of earlier runs (several are merged)")
    parser.add_argument("--floors-only", action="store_true",
                        help="no benchmark (no GPU needed): print each case's FLOP/byte floor")
    parser.add_argument("--no-check", action="store_true",
                        help="skip comparing the peers' outputs with sparsedsl's")
    parser.add_argument("--no-ceilings", action="store_true",
                        help="do not measure the GPU's matmul rate and copy bandwidth (the floor "
                             "is then given in FLOPs and bytes only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """Validated options; raises UsageError with a one-line message."""
    quick = bool(getattr(args, "quick", False))
    decode = bool(getattr(args, "decode", False))
    seqs = _ints(args.seq, "seq") if getattr(args, "seq", None) else \
        (QUICK_SEQ if quick else DEFAULT_DECODE_SEQ if decode else DEFAULT_SEQ)
    groups = _ints(args.group, "group") if getattr(args, "group", None) else DEFAULT_GROUPS
    bad = [g for g in groups if NSA_Q_HEADS % g]
    if bad:
        raise UsageError(f"--group: {', '.join(map(str, bad))} does not divide the "
                         f"{NSA_Q_HEADS} query heads")
    cases = _names(args.case, CASES, "case") if getattr(args, "case", None) else CASES
    impls = _names(args.impl, IMPLS, "impl") if getattr(args, "impl", None) else IMPLS
    warmup = args.warmup if getattr(args, "warmup", None) is not None else (5.0 if quick else 25.0)
    rep = args.rep if getattr(args, "rep", None) is not None else (20.0 if quick else 100.0)
    if warmup <= 0 or rep <= 0:
        raise UsageError("--warmup and --rep must be positive (milliseconds)")
    plot_from = getattr(args, "plot_from", None)
    png = getattr(args, "png", None)
    if plot_from and not png:
        raise UsageError("--plot-from needs --png FILE (where to draw the plot)")
    return BenchOptions(seqs=seqs, cases=cases, impls=impls, groups=groups, warmup_ms=warmup,
                        rep_ms=rep, json=getattr(args, "json", None), png=png,
                        plot_from=plot_from, floors_only=bool(getattr(args, "floors_only", False)),
                        check=not getattr(args, "no_check", False),
                        ceilings=not getattr(args, "no_ceilings", False),
                        seed=getattr(args, "seed", 0) or 0, quick=quick, decode=decode,
                        graphs=not getattr(args, "no_graph", False))
