"""The `sparsedsl` command line.

    sparsedsl check FILE|BUILTIN... [--set NAME=VALUE]   parse and verify
    sparsedsl ir FILE|BUILTIN [--dot] [--after PASS]     print the IR after the pass pipeline
    sparsedsl emit FILE|BUILTIN [--set ...] [--plan]     print the generated Triton source
    sparsedsl fmt FILE|BUILTIN [--check]                 print the spec in canonical form

A spec error prints a compiler-style diagnostic (file:line:col, the line, a
caret) and exits with status 1; no Python traceback is shown.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import SpecError
from .passes import PASS_NAMES


def _color(stream) -> bool:
    return stream.isatty() and os.environ.get("NO_COLOR") is None and os.environ.get("TERM") != "dumb"


def _paint(text: str, code: str, stream) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if _color(stream) else text


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
    else:
        sys.stdout.write(source)
    return 0


def cmd_fmt(args) -> int:
    from .frontend.load import load_source
    from .frontend.parser import parse
    from .frontend.printer import format_spec
    source = load_source(args.spec)
    text = format_spec(parse(source.text, source.name))
    if args.check:
        if text != source.text:
            print(f"{source.name}: not in canonical form (run `sparsedsl fmt {args.spec}`)",
                  file=sys.stderr)
            return 1
        print(f"{source.name}: canonical")
        return 0
    sys.stdout.write(text)
    return 0


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
    sp.set_defaults(fn=cmd_emit)

    sp = sub.add_parser("fmt", help="print a spec in canonical form")
    sp.add_argument("spec", metavar="FILE|BUILTIN")
    sp.add_argument("--check", action="store_true", help="exit 1 if not in canonical form")
    sp.set_defaults(fn=cmd_fmt)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as e:
        _report(e)
        return 1
    except BrokenPipeError:  # `sparsedsl ir nsa | head`
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
