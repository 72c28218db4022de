"""Results of a benchmark run: rows, speedups, the table, JSON and the plot."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .options import MIN_REPS

DENSE = ("sdpa-cudnn", "sdpa-flash")
GIB = 1 << 30


@dataclass
class Row:
    case: str             # case label (group size included)
    seq: int
    impl: str
    kind: str             # "sparsedsl", "dense" or "peer"
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    peak_bytes: int | None = None  # one forward+backward, its own inputs included
    work_bytes: int | None = None  # the same without the inputs
    status: str = "ok"    # ok | error | n/a | skipped
    reason: str = ""
    extra: dict = field(default_factory=dict)  # further timings (ms), checks, notes


@dataclass
class Results:
    meta: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    ceilings: dict | None = None
    cases: list[dict] = field(default_factory=list)
    floors: list[dict] = field(default_factory=list)  # per case and length
    rows: list[Row] = field(default_factory=list)

    # ---- derived numbers
    def group(self, case: str, seq: int) -> list[Row]:
        return [r for r in self.rows if r.case == case and r.seq == seq]

    def speedups(self, row: Row) -> dict:
        """x_dense: fastest dense backend's time / this row's; over_floor: this row's time / the
        case's floor (sparse rows: the floor is the sparse pattern's); vs: for sparsedsl rows,
        each peer's time / sparsedsl's (above 1: sparsedsl is faster)."""
        rows = self.group(row.case, row.seq)
        out: dict = {}
        f = self.floor(row.case, row.seq) or {}
        for key in ("fwd", "fwdbwd"):
            mine = getattr(row, f"{key}_ms")
            if row.kind != "dense" and mine and f.get(f"floor_{key}_ms"):
                out[f"over_floor_{key}"] = mine / f[f"floor_{key}_ms"]
        for key in ("fwd_ms", "fwdbwd_ms"):
            dense = [getattr(r, key) for r in rows if r.impl in DENSE and getattr(r, key)]
            mine = getattr(row, key)
            if dense and mine:
                out[f"x_dense_{key[:-3]}"] = min(dense) / mine
        if row.kind == "sparsedsl":
            for r in rows:
                if r.kind != "peer":
                    continue
                for key in ("fwd_ms", "fwdbwd_ms"):
                    if getattr(r, key) and getattr(row, key):
                        out.setdefault("vs", {}).setdefault(r.impl, {})[key[:-3]] = \
                            getattr(r, key) / getattr(row, key)
        return out

    def floor(self, case: str, seq: int) -> dict | None:
        return next((f for f in self.floors if f["case"] == case and f["seq"] == seq), None)

    # ---- JSON
    def to_json(self) -> dict:
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["speedup"] = self.speedups(r)
            rows.append(d)
        return {"meta": self.meta, "options": self.options, "ceilings": self.ceilings,
                "cases": self.cases, "floors": self.floors, "rows": rows}

    def write_json(self, path: str) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1, default=_jsonable) + "\n")
        tmp.replace(p)

    @classmethod
    def merge(cls, parts: list["Results"]) -> "Results":
        """Several runs' results as one (environment and options of the first)."""
        out = cls(parts[0].meta, parts[0].options, parts[0].ceilings) if parts else cls()
        for p in parts:
            out.cases += [c for c in p.cases if c not in out.cases]
            out.floors += [f for f in p.floors if out.floor(f["case"], f["seq"]) is None]
            out.rows += p.rows
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Results":
        fields = Row.__dataclass_fields__
        rows = [Row(**{k: v for k, v in r.items() if k in fields}) for r in data.get("rows", [])]
        return cls(data.get("meta", {}), data.get("options", {}), data.get("ceilings"),
                   data.get("cases", []), data.get("floors", []), rows)


def _jsonable(x):
    if isinstance(x, (set, tuple)):
        return list(x)
    if hasattr(x, "item"):
        return x.item()
    return str(x)


# ------------------------------------------------------------------------------ table
def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def _x(d: dict, a: str, b: str) -> str:
    if a not in d and b not in d:
        return "-"
    f = lambda k: f"{d[k]:.2f}" if k in d else "-"  # noqa: E731
    return f"{f(a)}/{f(b)}"


def _sci(x) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1e}"


def _notes(r: Row) -> str:
    e = r.extra
    parts = []
    if r.status != "ok":
        parts.append(f"{r.status.upper()}: {r.reason}")
    elif r.reason:
        parts.append(r.reason)
    notes = e.get("notes", {})
    if "cold_spec_to_layer_s" in notes:
        parts.append(f"spec->layer cold {notes['cold_spec_to_layer_s'] * 1e3:.0f} ms, cached "
                     f"{notes['cached_spec_to_layer_s'] * 1e3:.0f} ms")
    if notes.get("tuned"):
        parts.append("tuned " + ", ".join(f"{k.replace('SPARSEDSL_', '')}={v}"
                                          for k, v in notes["tuned"].items()))
    for name, ms in e.get("timings_ms", {}).items():
        parts.append(f"{name} {_ms(ms)} ms" if isinstance(ms, (int, float)) else f"{name}: {ms}")
    c = e.get("check")
    if isinstance(c, dict) and "max_abs_err" in c:
        s = f"vs sparsedsl max|d| {_sci(c['max_abs_err'])} (rel {_sci(c.get('rel_err'))}"
        if "rows_over_tol" in c:
            s += f", {c['rows_over_tol']}/{c['rows']} rows over {c.get('row_tol', 0):g} of it"
        s += ")"
        if "selection_rows_differ" in c:
            s += (f", selection differs in {c['selection_rows_differ']}/{c['selection_rows']} "
                  f"rows, max|d| where equal {_sci(c.get('max_abs_err_same_selection'))}")
        parts.append(s)
    elif isinstance(c, str):
        parts.append(f"check: {c}")
    if "kv" in notes:
        parts.append("kv heads repeated")
    return "; ".join(parts)


def _grid(head: list[str], rows: list[list[str]], indent: str = "    ") -> list[str]:
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    right = {1, 2, 3}
    out = []
    for x in [head] + rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(x, widths))]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


def _us(ms: float) -> str:
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{_ms(ms)} ms"


def floor_line(f: dict) -> str:
    if f.get("mode") == "decode":
        return decode_floor_line(f)
    dense = f" (dense causal {f['dense_flops_fwd'] / 1e9:.1f})" if "dense_flops_fwd" in f else ""
    s = (f"floor: {f['keys_per_query']:.0f} keys/query, {f['flops_fwd'] / 1e9:.1f} GFLOP fwd{dense}, "
         f"{(f['flops_fwd'] + f['flops_bwd']) / 1e9:.1f} fwd+bwd, "
         f"{f['bytes_fwd'] / 2 ** 20:.0f} MiB fwd, "
         f"{(f['bytes_fwd'] + f['bytes_bwd']) / 2 ** 20:.0f} fwd+bwd")
    if "floor_fwd_ms" in f:
        s += (f" -> {_ms(f['floor_fwd_ms'])} ms fwd ({f['floor_fwd_bound']}), "
              f"{_ms(f['floor_fwdbwd_ms'])} ms fwd+bwd ({f['floor_fwdbwd_bound']})")
    return s


def decode_floor_line(f: dict) -> str:
    dense = ""
    if "dense_flops_fwd" in f:
        dense = (f" (dense {f['dense_flops_fwd'] / 1e6:.1f} MFLOP, "
                 f"{f['dense_bytes_fwd'] / 2 ** 20:.1f} MiB)")
    s = (f"floor of one step: {f['keys_per_query']:.0f} keys/query, {f['keys_read']:.0f} read "
         f"per kv head, {f['flops_fwd'] / 1e6:.1f} MFLOP, "
         f"{f['bytes_fwd'] / 2 ** 20:.2f} MiB{dense}")
    if "floor_fwd_ms" in f:
        s += f" -> {_us(f['floor_fwd_ms'])} ({f['floor_fwd_bound']})"
    return s


def _timing(r: Row, name: str) -> str:
    t = r.extra.get("timings_ms", {}).get(name)
    return _ms(t) if isinstance(t, (int, float)) else "-"


def _column_notes(r: Row) -> str:
    """Notes of a row: the timings not in a column (loop, graph), then what _notes says."""
    e = dict(r.extra)
    e["timings_ms"] = {k: v for k, v in e.get("timings_ms", {}).items()
                       if k not in ("loop", "graph") or not isinstance(v, (int, float))}
    return _notes(Row(r.case, r.seq, r.impl, r.kind, status=r.status, reason=r.reason, extra=e))


DECODE_HEAD = ["impl", "step ms", "loop ms", "graph ms", "held GiB", "x dense", "/floor",
               "x peer", "notes"]
DECODE_LEGEND = ("Decode (--decode): one new query at the last position of a KV cache of L "
                 "tokens, batch 1. step: median of do_bench (CUDA events, L2 cleared); loop: "
                 "per call of back-to-back calls timed on the host (Python and launch overhead "
                 "included); graph: per replay of a CUDA graph of one call (no L2 flush); held: "
                 "the row's cache (or K/V copy) plus one step's working memory; x dense, "
                 "/floor, x peer: on the step column. sparsedsl's append: cache.append of one "
                 "token; append+decode: layer.decode(q1, cache, k1, v1).")


def _decode_cases(res: Results) -> set:
    return {c["label"] for c in res.cases if c.get("mode") == "decode"}


def format_table(res: Results) -> str:
    head = ["impl", "fwd ms", "graph ms", "fwd+bwd ms", "peak GiB", "x dense", "/floor",
            "x peer", "notes"]
    lines = [f"Times: medians of triton.testing.do_bench (ms) over at least {MIN_REPS} calls; "
             "graph: the forward replayed from a CUDA graph (its GPU time without Python's "
             "launch overhead, no L2 flush; '-' where it cannot be captured or with --no-graph); "
             "fwd+bwd: one forward and backward together; peak: one fwd+bwd, own inputs "
             "included; x dense: fastest SDPA backend / this (fwd/fwd+bwd); /floor: time / "
             "the pattern's floor; x peer: the peer's time / sparsedsl's (above 1: sparsedsl "
             "faster). flex: the mask given (its routing and mask build timed apart); "
             "flex+routing: routing, mask build and attention timed together."]
    titles = {c["label"]: c for c in res.cases}
    decoding = _decode_cases(res)
    seen = []
    for r in res.rows:
        if (r.case, r.seq) not in seen:
            seen.append((r.case, r.seq))
    if decoding:
        if all(case in decoding for case, _ in seen):
            lines = []
        lines.append(DECODE_LEGEND)
    for case, seq in seen:
        c = titles.get(case, {})
        lines.append("")
        desc = f"{c.get('title', '')}; {c.get('q_heads', '?')}/{c.get('kv_heads', '?')} heads, " \
               f"head dim {c.get('head_dim', '?')}" if c else ""
        dec = case in decoding
        lines.append(f"== {case}, {'L' if dec else 'T'}={seq}: {desc}")
        f = res.floor(case, seq)
        if f:
            lines.append("   " + floor_line(f))
        rows = []
        for r in res.group(case, seq):
            sp = res.speedups(r)
            peer = ", ".join(f"{p} {_x(v, 'fwd', 'fwdbwd')}" for p, v in sp.get("vs", {}).items())
            if dec:
                vs = ", ".join(f"{p} {v['fwd']:.2f}" for p, v in sp.get("vs", {}).items()
                               if "fwd" in v)
                rows.append([r.impl, _ms(r.fwd_ms), _timing(r, "loop"),
                             _timing(r, "graph"),
                             "-" if r.peak_bytes is None else f"{r.peak_bytes / GIB:.2f}",
                             f"{sp['x_dense_fwd']:.2f}" if "x_dense_fwd" in sp else "-",
                             f"{sp['over_floor_fwd']:.1f}" if "over_floor_fwd" in sp else "-",
                             vs or "-", _column_notes(r)])
                continue
            rows.append([r.impl, _ms(r.fwd_ms), _timing(r, "graph"), _ms(r.fwdbwd_ms),
                         "-" if r.peak_bytes is None else f"{r.peak_bytes / GIB:.2f}",
                         _x(sp, "x_dense_fwd", "x_dense_fwdbwd"),
                         _x(sp, "over_floor_fwd", "over_floor_fwdbwd"), peer or "-",
                         _column_notes(r)])
        lines.extend(_grid(DECODE_HEAD if dec else head, rows))
    return "\n".join(lines)


def format_floors(res: Results) -> str:
    lines = []
    for f in res.floors:
        axis = "L" if f.get("mode") == "decode" else "T"
        lines.append(f"  {f['case']:<16} {axis}={f['seq']:<6} {floor_line(f)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- plot
def write_png(res: Results, path: str) -> None:
    """Time vs sequence length per case (log-log): fwd+bwd solid, fwd dashed, floor dotted."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = list(dict.fromkeys(r.case for r in res.rows))
    if not cases:
        raise ValueError("no rows to plot")
    ncols = min(2, len(cases))
    nrows = -(-len(cases) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False)
    impls = list(dict.fromkeys(r.impl for r in res.rows))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(impls)}
    decoding = _decode_cases(res)
    for ax, case in zip(axes.flat, cases):
        if case in decoding:
            _plot_decode(ax, res, case, impls, colors)
            continue
        for impl in impls:
            rows = sorted((r for r in res.rows if r.case == case and r.impl == impl),
                          key=lambda r: r.seq)
            for key, style, label in (("fwdbwd_ms", "-", f"{impl} fwd+bwd"),
                                      ("fwd_ms", "--", f"{impl} fwd")):
                pts = [(r.seq, getattr(r, key)) for r in rows if getattr(r, key)]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[impl], label=label)
        fl = sorted((f for f in res.floors if f["case"] == case and "floor_fwdbwd_ms" in f),
                    key=lambda f: f["seq"])
        if fl:
            ax.plot([f["seq"] for f in fl], [f["floor_fwdbwd_ms"] for f in fl], ":", color="k",
                    label="floor fwd+bwd")
        _style_axes(ax, res, case, "sequence length", "ms (median)")
    for ax in list(axes.flat)[len(cases):]:
        ax.set_visible(False)
    gpu = res.meta.get("gpu", "")
    what = "causal" if not decoding else "decode steps" if set(cases) <= decoding else \
        "causal; decode steps"
    fig.suptitle(f"sparsedsl bench, bfloat16, batch 1, {what} ({gpu})", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_decode(ax, res: Results, case: str, impls: list[str], colors: dict) -> None:
    """Decode latency vs cache length: the step (do_bench) solid, from a CUDA graph dashed,
    sparsedsl's append+decode dash-dotted, the floor dotted."""
    for impl in impls:
        rows = sorted((r for r in res.rows if r.case == case and r.impl == impl),
                      key=lambda r: r.seq)
        lines = [("step", "-", lambda r: r.fwd_ms),
                 ("graph", "--", lambda r: r.extra.get("timings_ms", {}).get("graph")),
                 ("append+decode", "-.",
                  lambda r: r.extra.get("timings_ms", {}).get("append+decode"))]
        for name, style, get in lines:
            pts = [(r.seq, get(r)) for r in rows if isinstance(get(r), (int, float)) and get(r)]
            if pts:
                ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[impl],
                        label=f"{impl} {name}")
    fl = sorted((f for f in res.floors if f["case"] == case and "floor_fwd_ms" in f),
                key=lambda f: f["seq"])
    if fl:
        ax.plot([f["seq"] for f in fl], [f["floor_fwd_ms"] for f in fl], ":", color="k",
                label="floor (one step)")
    _style_axes(ax, res, case, "cache length (one new token, batch 1)",
                "ms per decode step (median)")


def _style_axes(ax, res: Results, case: str, xlabel: str, ylabel: str) -> None:
    """Log-log axes with the case's lengths as ticks (8k, 16k, ...), labels, title, legend."""
    import matplotlib.ticker
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    seqs = sorted({r.seq for r in res.rows if r.case == case})
    ax.set_xticks(seqs, [f"{s // 1024}k" if s % 1024 == 0 else str(s) for s in seqs])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    title = next((c["title"] for c in res.cases if c["label"] == case), "")
    ax.set_title(f"{case}: {title}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
