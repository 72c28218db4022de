"""The `sparsedsl` command line.

    sparsedsl check FILE|BUILTIN... [--set NAME=VALUE]   parse and verify
    sparsedsl ir FILE|BUILTIN [--dot] [--after PASS]     print the IR after the pass pipeline
    sparsedsl emit FILE|BUILTIN [--set ...] [--plan|--decode]  print the generated Triton source
    sparsedsl fmt FILE|BUILTIN... [--check]              print the spec in canonical form
    sparsedsl show FILE|BUILTIN --seq N [--out F.png]    draw which keys each query attends
    sparsedsl cost FILE|BUILTIN --seq N [--heads H ...]  keys, FLOPs and bytes against dense
    sparsedsl fuzz [--examples N | --minutes M]          random specs: kernels against the reference
    sparsedsl tune FILE|BUILTIN --seq N [--heads H ...]  time kernel tiles here, keep the best
    sparsedsl bench ...                                  timings (`sparsedsl.bench`)

Verbs that take a spec accept `--set NAME=VALUE` overrides and `--json`. Output
is coloured on a terminal and plain when piped. A spec error prints a
compiler-style diagnostic (file:line:col, the line, a caret) and exits with
status 1; no Python traceback is shown.

The verbs are thin: `show`, `cost`, `fuzz` and `tune` live in `sparsedsl/tools/`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import SpecError
from .passes import PASS_NAMES
from .tools.term import color as _color
from .tools.term import paint as _paint


def parse_sets(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SpecError(f"--set takes NAME=VALUE, got `{item}`")
        name, value = item.split("=", 1)
        out[name.strip()] = value
    return out


def _lower(spec: str, sets: dict, stop_after=None):
    from .pipeline import lower
    return lower(spec, sets, origin="--set", stop_after=stop_after)


# verbs --------------------------------------------------------------------------------
def cmd_check(args) -> int:
    sets = parse_sets(args.set)
    results = []
    status = 0
    for spec in args.specs:
        try:
            ir = _lower(spec, sets)
        except SpecError as e:
            status = 1
            _report(e)
            results.append({"spec": spec, "ok": False, "error": e.message,
                            "line": e.line, "col": e.col})
            continue
        results.append({"spec": spec, "ok": True, "name": ir.spec_name,
                        "params": ir.param_values(), "nodes": ir.g.number_of_nodes(),
                        "inputs": {n: i.role for n, i in ir.inputs.items()},
                        "unused": ir.unused})
        if not args.json:
            pv = ", ".join(f"{k}={v}" for k, v in ir.param_values().items())
            print(f"{_paint('ok', '32', sys.stdout)}  {spec}: pattern {ir.spec_name}({pv}), "
                  f"{ir.g.number_of_nodes()} IR nodes, causality proved")
            for name in ir.unused:
                print(f"    {_paint('warning', '33', sys.stdout)}: `{name}` is defined but "
                      f"`out` does not use it")
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return status


def cmd_ir(args) -> int:
    ir = _lower(args.spec, parse_sets(args.set), stop_after=args.after)
    if args.json:
        data = {"spec": ir.spec_name, "params": ir.param_values(), "passes": ir.passes_run,
                "out": ir.out, "nodes": [
                    {"id": n, "op": ir.node(n)["op"], "kind": ir.node(n)["kind"].value,
                     "name": ir.node(n)["name"], "args": {k: str(v) for k, v in
                                                          ir.node(n)["args"].items()},
                     "operands": ir.operands(n), "facts": ir.node(n)["facts"],
                     "line": ir.node(n)["span"].line if ir.node(n)["span"] else None}
                    for n in ir.order()]}
        print(json.dumps(data, indent=2, default=str))
    elif args.dot:
        sys.stdout.write(ir.to_dot())
    else:
        sys.stdout.write(ir.format())
    return 0


def cmd_emit(args) -> int:
    from .codegen.emit import generate
    ir = _lower(args.spec, parse_sets(args.set))
    source, plan = generate(ir)
    if args.plan:
        sys.stdout.write(plan.format())
    elif args.decode:
        from .codegen.decode import generate_decode
        sys.stdout.write(generate_decode(ir, plan))
    else:
        sys.stdout.write(source)
    return 0


def cmd_fmt(args) -> int:
    from .frontend.load import load_source
    from .frontend.parser import parse
    from .frontend.printer import format_spec
    if not args.check and len(args.specs) > 1:
        raise SpecError("`fmt` prints one spec; use `--check` to check several")
    status, results = 0, []
    for spec in args.specs:
        source = load_source(spec)
        text = format_spec(parse(source.text, source.name))
        canonical = text == source.text
        results.append({"spec": spec, "source": source.name, "canonical": canonical,
                        "text": text})
        if not args.check:
            continue
        if not canonical:
            status = 1
            if not args.json:
                print(f"{source.name}: not in canonical form (run `sparsedsl fmt {spec}`)",
                      file=sys.stderr)
        elif not args.json:
            print(f"{source.name}: canonical")
    if args.json:
        print(json.dumps(results if args.check else results[0], indent=2))
    elif not args.check:
        sys.stdout.write(results[0]["text"])
    return status


def _spec(args):
    """The source and lowered IR of a verb's spec argument with its `--set` overrides."""
    from .frontend.load import load_source
    from .pipeline import lower
    source = load_source(args.spec)
    return source, lower(source, parse_sets(args.set), origin="--set")


def _seq_list(text: str) -> tuple[int, ...]:
    """--seq of `tune`: comma-separated lengths, 8192 or 8k."""
    from .bench.options import UsageError, _ints
    try:
        return _ints(text, "seq")
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(name: str, value, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise SpecError(f"{name} must be at least {minimum}, got {value}")


def cmd_show(args) -> int:
    from .tools.show import attention_map, render_png, render_text
    from .tools.term import Progress
    _positive("--seq", args.seq)
    _positive("--heads", args.heads)
    _positive("--kv-heads", args.kv_heads)
    _positive("--head-dim", args.head_dim)
    source, ir = _spec(args)
    inputs = _load_inputs(args.inputs) if args.inputs else None
    progress = Progress("show: running the kernels" if ir.nodes_with("topk") else "show")
    progress.update()
    try:
        m = attention_map(ir, source.text, args.seq, heads=args.heads, kv_heads=args.kv_heads,
                          head=args.head, seed=args.seed, head_dim=args.head_dim,
                          inputs=inputs)
    except ValueError as e:
        raise SpecError(str(e)) from None
    finally:
        progress.close()
    if args.out:
        render_png(m, args.out)
    if args.json:
        data = m.to_json()
        data["out"] = str(args.out) if args.out else None
        print(json.dumps(data, indent=2, default=str))
    elif args.out:
        print(f"{args.out}: {m.title}")
    else:
        unicode = (getattr(sys.stdout, "encoding", "") or "").lower().replace("-", "") == "utf8"
        sys.stdout.write(render_text(m, args.tile, color=_color(sys.stdout), unicode=unicode))
    return 0


def _load_inputs(path: str) -> dict:
    import torch
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise SpecError(f"cannot read inputs from `{path}`: {e}") from None
    if not isinstance(data, dict) or not all(n in data for n in ("q", "k", "v")):
        raise SpecError(f"`{path}` must hold a dict of tensors with `q`, `k`, `v` "
                        f"[batch, seq, heads, head_dim] (and the spec's inputs by name)")
    return data


def cmd_cost(args) -> int:
    from .tools.cost import Dims, cost, format_cost
    from .tools.term import Progress
    _positive("--seq", args.seq)
    _positive("--heads", args.heads)
    _positive("--kv-heads", args.kv_heads)
    _positive("--head-dim", args.head_dim)
    _positive("--head-dim-v", args.head_dim_v)
    _positive("--batch", args.batch)
    _positive("--d-model", args.d_model)
    kv = args.kv_heads or args.heads
    if args.heads % kv:
        raise SpecError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({kv})")
    _, ir = _spec(args)
    dims = Dims(batch=args.batch, heads=args.heads, kv_heads=kv, head_dim=args.head_dim,
                head_dim_v=args.head_dim_v or args.head_dim,
                d_model=args.d_model or args.heads * args.head_dim, dtype=args.dtype)
    progress = Progress("cost: counting keys")
    try:
        c = cost(ir, args.seq, dims, progress=progress.update)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(c.to_json(), indent=2, default=str))
    else:
        sys.stdout.write(format_cost(c, sys.stdout))
    return 0


def cmd_fuzz(args) -> int:
    from .tools import fuzz
    from .tools.term import Progress
    if args.replay:
        return _fuzz_replay(args)
    if args.examples is not None and args.minutes is not None:
        raise SpecError("give --examples or --minutes, not both")
    _positive("--examples", args.examples)
    if args.minutes is not None and not args.minutes > 0:
        raise SpecError(f"--minutes must be positive, got {args.minutes}")
    examples = args.examples if args.examples is not None or args.minutes else 20
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    try:
        import hypothesis  # noqa: F401
    except ImportError:
        raise SpecError("`fuzz` needs Hypothesis: pip install 'sparsedsl[test]'") from None
    progress = Progress("fuzz")
    try:
        outcome = fuzz.run(examples, args.minutes, seed, grads=not args.no_grad,
                           out_dir=Path(args.out_dir), progress=progress.update)
    finally:
        progress.close()
    checked = "outputs" + ("" if args.no_grad else " and gradients")
    if args.json:
        print(json.dumps({"examples": outcome.examples, "seconds": round(outcome.seconds, 1),
                          "seed": seed, "checked": checked, "failure": outcome.failure},
                         indent=2))
    elif outcome.failure is None:
        print(f"{_paint('ok', '32', sys.stdout)}  {outcome.examples} generated specs: "
              f"kernels match the reference ({checked}), seed {seed}, "
              f"{outcome.seconds:.0f} s")
    else:
        f = outcome.failure
        print(f"{_paint('FAIL', '1;31', sys.stdout)}  after {outcome.examples} generated specs "
              f"(seed {seed}): {f['reason']}\n"
              f"shrunk to ({f['shape']}, input seed {f['seed']}):\n\n"
              + "".join(f"    {line}\n" for line in f["spec"].splitlines())
              + f"\nwritten to {f['file']}\nreproduce with: {f['command']}")
    return 0 if outcome.failure is None else 1


def _fuzz_replay(args) -> int:
    from .tools.fuzz import CaseFailure, check_case, read_case
    text, shape, seed = read_case(Path(args.replay))
    try:
        check_case(text, shape, seed, grads=not args.no_grad)
    except CaseFailure as e:
        reason = str(e)
    else:
        reason = None
    if args.json:
        print(json.dumps({"file": args.replay, "shape": str(shape), "seed": seed,
                          "ok": reason is None, "reason": reason}, indent=2))
    elif reason is None:
        print(f"{_paint('ok', '32', sys.stdout)}  {args.replay} ({shape}, seed {seed}): "
              f"kernels match the reference")
    else:
        print(f"{_paint('FAIL', '1;31', sys.stdout)}  {args.replay} ({shape}, seed {seed}): "
              f"{reason}")
    return 0 if reason is None else 1


def cmd_tune(args) -> int:
    """`sparsedsl tune`: the layer's kernel knobs timed on this GPU (sparsedsl/tools/tune.py),
    the fastest settings kept beside its generated module (sparsedsl/runtime/tuning.py)."""
    import torch

    from .runtime import tuning
    from .tools import tune
    layer, shape, gates = _tune_layer(args)
    key = layer._op.key
    if args.show or args.forget:
        if args.forget:
            existed = tuning.forget(key)
            print(f"{'removed' if existed else 'no tuned settings at'} {tuning.tuned_path(key)}")
            return 0
        entries = tuning.read_entries(key)
        if args.json:
            print(json.dumps(entries, indent=2))
            return 0
        if not entries:
            print(f"no tuned settings for `{layer.spec_name}` (would be at "
                  f"{tuning.tuned_path(key)})")
        for e in entries:
            settings = ", ".join(f"{k}={v}" for k, v in e["settings"].items()) or "the defaults"
            print(f"{e['device']}, {e['dtype']}, {e['heads']}/{e['kv_heads']} heads, head dim "
                  f"{e['head_dim']}, seq {e['seq']} ({e.get('objective', '?')}, "
                  f"{e.get('date', '?')}): {settings}"
                  + (f"  [{e['default_ms']} -> {e['tuned_ms']} ms]" if "tuned_ms" in e else ""))
        return 0
    if not torch.cuda.is_available() and not args.dry_run:
        raise SpecError("`sparsedsl tune` times kernels on a CUDA GPU and this machine has none "
                        "(--dry-run lists the knobs a call reads without timing them)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layer = layer.to(device)
    dtype = getattr(torch, args.dtype)
    knobs = [k.strip() for k in args.knobs.split(",") if k.strip()] if args.knobs else None
    for k in knobs or ():
        if k not in tuning.KNOBS:
            raise SpecError(f"--knobs: unknown knob `{k}`; the knobs are "
                            f"{', '.join(tuning.KNOBS)}")
    results = []
    for T in args.seq:
        q, k, v, inputs, dout = tune.random_inputs(
            layer, args.batch, T, shape["heads"], shape["kv_heads"], shape["head_dim"],
            shape["head_dim_v"], shape["d_model"], dtype, device, backward=not args.fwd_only,
            gates=gates)
        if args.dry_run:
            run, _ = tune.layer_call(layer, q, k, v, inputs, dout, not args.fwd_only)
            found = tune.discover(layer._kernels(device), run)
            if args.json:
                results.append({"seq": T, "knobs": {n: list(tune.candidates(n, q.is_cuda))
                                                    for n in found}})
                continue
            print(f"seq {T}: this call reads {len(found)} knob(s)")
            for n in found:
                print(f"  {n}: {' | '.join(tune.candidates(n, q.is_cuda))}")
            continue
        log = None if args.json else (lambda m: print(f"  {m}", file=sys.stderr, flush=True))
        print(f"tuning `{layer.spec_name}` at seq {T} on {torch.cuda.get_device_name(device)} "
              f"({'forward' if args.fwd_only else 'forward+backward'}, {args.dtype})",
              file=sys.stderr, flush=True)
        try:
            result, entry = tune.tune_layer(
                layer, q, k, v, inputs, dout, backward=not args.fwd_only, knobs=knobs,
                rounds=args.rounds, rep_ms=args.rep, margin=args.margin,
                budget_s=args.minutes * 60 if args.minutes else None, save=not args.no_save,
                log=log)
        except ValueError as e:  # --knobs naming a knob this call does not read
            raise SpecError(f"--knobs: {e}") from None
        results.append({"entry": entry, "confirmed": result.confirmed,
                        "trials": [t.__dict__ for t in result.trials]})
        if not args.json:
            print(f"seq {T}: " + tune.format_result(result))
            if result.confirmed and not args.no_save:
                print(f"recorded in {tuning.tuned_path(key)}")
        del q, k, v, inputs, dout
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return 0


def _tune_layer(args):
    """The layer `tune` works on and its call's shape: a spec with --set and the shape
    options, or a benchmark case's spec, parameters and shape (--case; the layer then is
    the one `sparsedsl bench` times, so the bench runs on what was tuned)."""
    from .runtime.layer import SparseAttention
    if args.case:
        if args.spec or args.set:
            raise SpecError("give a spec or --case, not both")
        from .bench.cases import make_cases
        from .bench.options import CASES, BenchOptions
        if args.case not in CASES:
            raise SpecError(f"--case: unknown `{args.case}`; choose from {', '.join(CASES)}")
        from .bench.impls import case_layer
        case = make_cases(BenchOptions(cases=(args.case,), groups=(args.group,)))[0]
        return case_layer(case), dict(heads=case.q_heads, kv_heads=case.kv_heads, head_dim=case.head_dim,
                           head_dim_v=case.head_dim, d_model=None), case.gates
    if not args.spec:
        raise SpecError("give a spec (a file or a built-in name) or --case")
    for name in ("--heads", "--kv-heads", "--head-dim", "--head-dim-v", "--batch",
                 "--d-model", "--rounds"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    kv = args.kv_heads or args.heads
    if args.heads % kv:
        raise SpecError(f"--heads ({args.heads}) must be a multiple of --kv-heads ({kv})")
    source, ir = _spec(args)
    d_model = args.d_model or args.heads * args.head_dim
    layer = SparseAttention(ir, source.text, args.head_dim, args.heads, args.head_dim_v,
                            d_model, seed=0)  # (what sparsedsl.compile makes of the lowered IR)
    return layer, dict(heads=args.heads, kv_heads=kv, head_dim=args.head_dim,
                       head_dim_v=args.head_dim_v or args.head_dim, d_model=d_model), ()


def cmd_bench(args, rest: list[str]) -> int:
    """`sparsedsl bench`: its options and work belong to `sparsedsl.bench` (imported only
    when the verb is used): `add_arguments(parser)` and `run(args) -> int`."""
    import importlib
    try:
        bench = importlib.import_module("sparsedsl.bench")
    except ModuleNotFoundError as e:
        if e.name not in ("sparsedsl.bench",):
            raise
        raise SpecError("`sparsedsl bench` is not available: this installation has no "
                        "`sparsedsl.bench` module") from None
    parser = argparse.ArgumentParser(prog="sparsedsl bench",
                                     description=(bench.__doc__ or "").strip().split("\n")[0])
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(rest))


def _report(e: SpecError) -> None:
    text = e.render()
    if _color(sys.stderr):
        text = text.replace(": error:", ": \x1b[1;31merror\x1b[0m:", 1)
    print(text, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsedsl", description="A compiler for sparse attention "
                                "patterns written in the .attn language.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def common(sp, many=False):
        if many:
            sp.add_argument("specs", nargs="+", metavar="FILE|BUILTIN")
        else:
            sp.add_argument("spec", metavar="FILE|BUILTIN")
        sp.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="override a parameter (repeatable)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("check", help="parse and verify specs")
    common(sp, many=True)
    sp.set_defaults(fn=cmd_check)

    sp = sub.add_parser("ir", help="print the IR after the pass pipeline")
    common(sp)
    sp.add_argument("--dot", action="store_true", help="Graphviz dot instead of text")
    sp.add_argument("--after", choices=("build",) + PASS_NAMES,
                    help="stop after this pass (default: all)")
    sp.set_defaults(fn=cmd_ir)

    sp = sub.add_parser("emit", help="print the generated Triton source")
    sp.add_argument("spec", metavar="FILE|BUILTIN")
    sp.add_argument("--set", action="append", metavar="NAME=VALUE",
                    help="override a parameter (repeatable)")
    sp.add_argument("--plan", action="store_true", help="print the kernel plan instead")
    sp.add_argument("--decode", action="store_true",
                    help="print the decode module (KV-cache kernels) instead")
    sp.set_defaults(fn=cmd_emit)

    sp = sub.add_parser("fmt", help="print a spec in canonical form")
    sp.add_argument("specs", nargs="+", metavar="FILE|BUILTIN")
    sp.add_argument("--check", action="store_true",
                    help="exit 1 if a spec is not in canonical form (several specs allowed)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=cmd_fmt)

    sp = sub.add_parser("show", help="draw which keys each query attends",
                        description="Draw which keys each query attends, per branch and "
                        "combined, on random (or given) inputs. With a top-k, the selection "
                        "is the compiled kernels'. Without --out, a block grid of characters.")
    common(sp)
    sp.add_argument("--seq", type=int, required=True, metavar="N", help="sequence length")
    sp.add_argument("--heads", type=int, default=1, metavar="H", help="query heads (default 1)")
    sp.add_argument("--kv-heads", type=int, metavar="G", help="key/value heads (default: --heads)")
    sp.add_argument("--head", type=int, default=0, help="the query head drawn (default 0)")
    sp.add_argument("--head-dim", type=int, default=16, metavar="D",
                    help="head dimension of the random inputs (default 16)")
    sp.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random inputs")
    sp.add_argument("--inputs", metavar="FILE.pt",
                    help="torch.save'd dict with q, k, v (and the spec's inputs) to use instead")
    sp.add_argument("--out", metavar="FILE.png", help="write a picture (needs matplotlib)")
    sp.add_argument("--tile", type=int, metavar="T",
                    help="tokens per character of the text grid (default: the block length)")
    sp.set_defaults(fn=cmd_show)

    sp = sub.add_parser("cost", help="keys, FLOPs and bytes at a sequence length, against dense",
                        description="Keys each branch attends (last query and the average "
                        "over queries), FLOPs and bytes of one forward pass, against dense "
                        "causal attention; counted exactly from the IR (top-k structurally).")
    common(sp)
    sp.add_argument("--seq", type=int, required=True, metavar="N", help="sequence length")
    sp.add_argument("--heads", type=int, default=1, metavar="H", help="query heads (default 1)")
    sp.add_argument("--kv-heads", type=int, metavar="G", help="key/value heads (default: --heads)")
    sp.add_argument("--head-dim", type=int, default=128, metavar="D",
                    help="head dimension of q and k (default 128)")
    sp.add_argument("--head-dim-v", type=int, metavar="DV", help="head dimension of v "
                    "(default: --head-dim)")
    sp.add_argument("--d-model", type=int, help="width of the layer input x, for learned gates "
                    "(default: heads * head dim)")
    sp.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    sp.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32",
                                                            "float64"), help="for bytes")
    sp.set_defaults(fn=cmd_cost)

    sp = sub.add_parser("fuzz", help="random specs: compiled kernels against the reference",
                        description="Generate random specs with the test suite's Hypothesis "
                        "strategy, compile each and check outputs and gradients against the "
                        "dense reference. A failure is shrunk and written as a .attn file.")
    sp.add_argument("--examples", type=int, metavar="N", help="how many specs (default 20)")
    sp.add_argument("--minutes", type=float, metavar="M",
                    help="fuzz for this long instead (no example starts after M minutes; one "
                    "running then finishes, and a failure is still shrunk)")
    sp.add_argument("--seed", type=int, metavar="S", help="random seed (default: a fresh one)")
    sp.add_argument("--no-grad", action="store_true", help="check outputs only")
    sp.add_argument("--out-dir", default=".", metavar="DIR",
                    help="where a failing spec is written (default: here)")
    sp.add_argument("--replay", metavar="FILE.attn",
                    help="check one spec file (a failure this verb wrote, or a regression file)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=cmd_fuzz)

    sp = sub.add_parser("tune", help="time the kernels' tile settings on this GPU, keep the "
                        "fastest", description="Time each kernel knob's candidate settings "
                        "(tile shapes, warps, stages) for one call on this GPU, one knob at a "
                        "time, check each setting's results against the defaults', and keep "
                        "the fastest beside the generated module: later calls on this device "
                        "with these heads and head dims use them (the entry tuned at the "
                        "nearest sequence length). SPARSEDSL_TUNED=0 ignores them.")
    sp.add_argument("spec", nargs="?", metavar="FILE|BUILTIN")
    sp.add_argument("--set", action="append", metavar="NAME=VALUE",
                    help="override a parameter (repeatable)")
    sp.add_argument("--case", metavar="NAME", help="a benchmark case instead of a spec (its "
                    "spec, parameters, heads and gates: moba, nsa-fla, nsa, window-sinks)")
    sp.add_argument("--group", type=int, default=16, help="with --case nsa or nsa-fla: query "
                    "heads per kv head (default 16)")
    sp.add_argument("--seq", type=_seq_list, default=(8192,), metavar="T,...",
                    help="sequence lengths to tune at (default 8192; 64k works)")
    sp.add_argument("--heads", type=int, default=16, metavar="H", help="query heads (default 16)")
    sp.add_argument("--kv-heads", type=int, metavar="G", help="key/value heads (default: --heads)")
    sp.add_argument("--head-dim", type=int, default=128, metavar="D", help="default 128")
    sp.add_argument("--head-dim-v", type=int, metavar="DV", help="default: --head-dim")
    sp.add_argument("--d-model", type=int, help="width of the layer input x, for learned gates "
                    "(default: heads * head dim)")
    sp.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    sp.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    sp.add_argument("--fwd-only", action="store_true",
                    help="time the forward alone (inference) instead of forward+backward")
    sp.add_argument("--knobs", metavar="A,B", help="tune only these knobs (default: every knob "
                    "the call reads)")
    sp.add_argument("--rounds", type=int, default=1, help="passes over the knobs (default 1; "
                    "a pass that changes nothing ends the search)")
    sp.add_argument("--rep", type=float, default=100.0, metavar="MS",
                    help="about how many milliseconds of calls each timing sums the kernels' GPU "
                    "time over (default 100)")
    sp.add_argument("--margin", type=float, default=0.02,
                    help="how much faster a setting must be to be kept (default 0.02: 2%%)")
    sp.add_argument("--minutes", type=float, help="stop trying settings after this long")
    sp.add_argument("--dry-run", action="store_true",
                    help="list the knobs the call reads and their candidates; time nothing")
    sp.add_argument("--no-save", action="store_true", help="report, record nothing")
    sp.add_argument("--show", action="store_true", help="print the tuned settings kept for "
                    "this spec (no GPU needed)")
    sp.add_argument("--forget", action="store_true", help="delete them")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=cmd_tune)

    sp = sub.add_parser("bench", help="time compiled kernels (options: sparsedsl bench --help)",
                        add_help=False)
    sp.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.fn is not cmd_bench and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return cmd_bench(args, rest) if args.fn is cmd_bench else args.fn(args)
    except SpecError as e:
        _report(e)
        return 1
    except BrokenPipeError:  # `sparsedsl ir nsa | head`
        return 0
    except KeyboardInterrupt:  # Ctrl-C during `fuzz`, `cost`, `show`
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
