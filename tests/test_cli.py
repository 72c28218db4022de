"""The `sparsedsl` command line: check, ir, fmt; exit codes; diagnostics without tracebacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sparsedsl
from sparsedsl.cli import main

ROOT = Path(__file__).resolve().parent.parent

LEAK = "pattern leak\n\nlet a = attend(sink(4) | window(64))\nout = a\n"
UGLY = "pattern ugly\nparam   w=8 # the window\nlet a=attend( window( w )&causal )\nout=a\n"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def leak(tmp_path):
    p = tmp_path / "leak.attn"
    p.write_text(LEAK)
    return p


@pytest.fixture
def ugly(tmp_path):
    p = tmp_path / "ugly.attn"
    p.write_text(UGLY)
    return p


# ------------------------------------------------------------------------ check
def test_check_builtins(capsys):
    code, out, err = run(capsys, "check", "moba", "nsa")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("ok  moba: pattern moba(block=512, topk=3), ")
    assert lines[0].endswith("IR nodes, causality proved")
    assert lines[1].startswith("ok  nsa: pattern nsa(cmp=mlp, cmp_len=32, cmp_stride=16, "
                               "sel_len=64, topn=16, init_blocks=1, local_blocks=2, window=512)")


def test_check_file(capsys, tmp_path):
    p = tmp_path / "sw.attn"
    p.write_text("pattern sw\nparam w = 16\nout = attend(window(w))\n")
    code, out, err = run(capsys, "check", str(p))
    assert code == 0 and err == ""
    assert out.startswith(f"ok  {p}: pattern sw(w=16), 2 IR nodes, causality proved")


def test_check_warns_about_unused(capsys, tmp_path):
    p = tmp_path / "unused.attn"
    p.write_text("pattern u\nlet extra = window(8)\nout = attend(causal)\n")
    code, out, _ = run(capsys, "check", str(p))
    assert code == 0
    assert "warning: `extra` is defined but `out` does not use it" in out


def test_check_set(capsys):
    code, out, _ = run(capsys, "check", "moba", "--set", "block=64", "--set", "topk=2")
    assert code == 0
    assert "pattern moba(block=64, topk=2)" in out


def test_check_set_applies_to_every_spec(capsys):
    code, out, err = run(capsys, "check", "moba", "nsa", "--set", "block=64")
    # nsa has no `block`: moba passes, nsa fails, the status says so
    assert code == 1
    assert "ok  moba: pattern moba(block=64, topk=3)" in out
    assert "spec `nsa` has no parameter `block` (from --set)" in err


def test_check_set_bad_value(capsys):
    code, out, err = run(capsys, "check", "moba", "--set", "block=abc")
    assert code == 1 and out == ""
    assert err.startswith("<builtin moba>:7:1: error: parameter `block` is an int; got 'abc' "
                          "(from --set)")


def test_check_set_out_of_range(capsys):
    code, _, err = run(capsys, "check", "moba", "--set", "topk=0")
    assert code == 1
    assert "argument `k` of `topk` must be >= 1, got 0 (topk = 0 from --set)" in err


def test_check_set_unknown_name(capsys):
    code, _, err = run(capsys, "check", "moba", "--set", "blok=3")
    assert code == 1
    assert "error: spec `moba` has no parameter `blok` (from --set)" in err
    assert "note: did you mean `block`?" in err


def test_check_set_without_equals(capsys):
    code, _, err = run(capsys, "check", "moba", "--set", "block")
    assert code == 1
    assert err.strip() == "error: --set takes NAME=VALUE, got `block`"


def test_check_json(capsys):
    code, out, err = run(capsys, "check", "moba", "nsa", "--set", "topk=2", "--json")
    # nsa has no `topk` parameter
    assert code == 1
    data = json.loads(out)
    assert [d["spec"] for d in data] == ["moba", "nsa"]
    assert data[0]["ok"] is True and data[0]["params"] == {"block": 512, "topk": 2}
    assert data[0]["nodes"] == 11 and data[0]["inputs"] == {} and data[0]["unused"] == []
    assert data[1]["ok"] is False and "has no parameter `topk`" in data[1]["error"]
    assert data[1]["line"] is None
    assert "has no parameter `topk`" in err


def test_check_json_ok(capsys):
    code, out, _ = run(capsys, "check", "nsa", "--json")
    assert code == 0
    (entry,) = json.loads(out)
    assert entry["name"] == "nsa" and entry["ok"]
    assert entry["inputs"] == {"x": "x", "g_cmp": "gate", "g_slc": "gate", "g_swa": "gate"}


def test_check_bad_spec(capsys, leak):
    code, out, err = run(capsys, "check", str(leak))
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[0] == (f"{leak}:3:16: error: queries can see future keys: `sink(4)`: keys j < n "
                        "include keys after early queries")
    assert lines[1] == "    let a = attend(sink(4) | window(64))"
    assert lines[2] == "    " + " " * 15 + "^~~~~~~"
    assert lines[3].startswith("note: intersect with `causal`")
    assert "Traceback" not in err


def test_check_bad_spec_json(capsys, leak):
    code, out, _ = run(capsys, "check", str(leak), "--json")
    assert code == 1
    (entry,) = json.loads(out)
    assert entry == {"spec": str(leak), "ok": False, "line": 3, "col": 16,
                     "error": "queries can see future keys: `sink(4)`: keys j < n include keys "
                              "after early queries"}


def test_check_several_with_one_bad(capsys, leak):
    code, out, err = run(capsys, "check", "moba", str(leak), "nsa")
    assert code == 1
    assert out.count("ok  ") == 2
    assert err.count("error:") == 1


def test_check_unknown_spec(capsys):
    code, out, err = run(capsys, "check", "nosuch")
    assert code == 1 and out == ""
    assert err.strip() == "error: `nosuch` is neither a .attn file nor a built-in spec (moba, nsa)"


def test_check_empty_file(capsys, tmp_path):
    p = tmp_path / "empty.attn"
    p.write_text("")
    code, _, err = run(capsys, "check", str(p))
    assert code == 1
    assert err.startswith(f"{p}:1:1: error: the spec is empty")


def test_no_verb_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


# --------------------------------------------------------------------------- ir
def test_ir_text(capsys):
    code, out, err = run(capsys, "ir", "moba")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "spec moba(block=512, topk=3)"
    assert lines[1] == "  # passes: build, resolve-params, causality, heads, dce"
    assert lines[-1] == "  out %10"
    assert any("= topk(" in l and "k=3" in l and "[sel]" in l for l in lines)
    # every node line ends with its source position
    node_lines = [l for l in lines if l.startswith("  %")]
    assert len(node_lines) == 11
    assert all(l.rstrip().rsplit("# ", 1)[1].count(":") == 1 for l in node_lines)


def test_ir_set(capsys):
    code, out, _ = run(capsys, "ir", "moba", "--set", "block=128")
    assert code == 0
    assert out.startswith("spec moba(block=128, topk=3)")
    assert "blocks(len=128, stride=128)" in out


def test_ir_after_build_vs_full(capsys):
    _, built, _ = run(capsys, "ir", "moba", "--after", "build")
    _, full, _ = run(capsys, "ir", "moba")
    assert "# passes: build\n" in built
    assert "blocks(len=$block, stride=$block)" in built  # constants not folded yet
    assert "causal=" not in built and "heads=" not in built  # no facts from later passes
    assert "blocks(len=512, stride=512)" in full
    assert "causal=True" in full and "heads=head" in full
    assert built != full


@pytest.mark.parametrize("after", ["resolve-params", "causality", "heads", "dce"])
def test_ir_after_each_pass(capsys, after):
    code, out, _ = run(capsys, "ir", "nsa", "--after", after)
    assert code == 0
    passes = out.splitlines()[1]
    assert passes.endswith(after)


def test_ir_dce_removes_unused(capsys, tmp_path):
    p = tmp_path / "unused.attn"
    p.write_text("pattern u\nlet extra = window(8)\nout = attend(causal)\n")
    _, before, _ = run(capsys, "ir", str(p), "--after", "heads")
    _, after, _ = run(capsys, "ir", str(p))
    assert "[extra]" in before and "[extra]" not in after


def test_ir_dot(capsys):
    code, out, _ = run(capsys, "ir", "nsa", "--dot")
    assert code == 0
    assert out.startswith('digraph "nsa" {')
    assert out.rstrip().endswith("}")
    assert "->" in out and "style=bold" in out


def test_ir_json(capsys):
    code, out, _ = run(capsys, "ir", "moba", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["spec"] == "moba"
    assert data["params"] == {"block": 512, "topk": 3}
    assert data["passes"] == ["build", "resolve-params", "causality", "heads", "dce"]
    ops = {n["op"] for n in data["nodes"]}
    assert {"blocks", "pool", "dot", "topk", "tokens", "and", "attend_tokens"} <= ops
    out_node = next(n for n in data["nodes"] if n["id"] == data["out"])
    assert out_node["op"] == "attend_tokens" and out_node["kind"] == "branch"
    topk = next(n for n in data["nodes"] if n["op"] == "topk")
    assert topk["args"] == {"k": "3"} and set(topk["operands"]) == {"score", "force", "forbid"}


def test_ir_bad_spec(capsys, leak):
    code, out, err = run(capsys, "ir", str(leak))
    assert code == 1 and out == ""
    assert err.startswith(f"{leak}:3:16: error:")


def test_ir_bad_spec_after_build_is_fine(capsys, leak):
    # the leak is found by the causality pass, which `--after build` does not run
    code, out, _ = run(capsys, "ir", str(leak), "--after", "build")
    assert code == 0 and "sink(n=4)" in out


def test_ir_is_deterministic(capsys):
    for name in ("moba", "nsa"):
        a = sparsedsl.lower(name).format()
        b = sparsedsl.lower(name).format()
        assert a == b
        assert sparsedsl.lower(name).to_dot() == sparsedsl.lower(name).to_dot()
        _, c, _ = run(capsys, "ir", name)
        assert c == a


def test_ir_deterministic_across_processes():
    # a fixed hash seed in the child, a random one here: set/dict order must not leak into the IR
    env = dict(os.environ, PYTHONHASHSEED="0")
    r = subprocess.run([sys.executable, "-m", "sparsedsl.cli", "ir", "nsa"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout == sparsedsl.lower("nsa").format()


# -------------------------------------------------------------------------- fmt
def test_fmt_prints_canonical(capsys, ugly):
    code, out, _ = run(capsys, "fmt", str(ugly))
    assert code == 0
    assert out == ("pattern ugly\n\nparam w = 8  # the window\n\nlet a = attend(window(w) & causal)\n"
                   "\nout = a\n")
    # canonical text is a fixed point and means the same
    assert sparsedsl.format_spec(sparsedsl.parse(out)) == out
    assert sparsedsl.parse(out) == sparsedsl.parse(UGLY)


def test_fmt_check_non_canonical(capsys, ugly):
    code, out, err = run(capsys, "fmt", str(ugly), "--check")
    assert code == 1 and out == ""
    assert err.strip() == f"{ugly}: not in canonical form (run `sparsedsl fmt {ugly}`)"


def test_fmt_check_canonical_file(capsys, ugly, tmp_path):
    run(capsys, "fmt", str(ugly))
    p = tmp_path / "pretty.attn"
    p.write_text(sparsedsl.format_spec(sparsedsl.parse(UGLY)))
    code, out, _ = run(capsys, "fmt", str(p), "--check")
    assert code == 0 and out.strip() == f"{p}: canonical"


@pytest.mark.parametrize("name", sparsedsl.builtin_names())
def test_fmt_check_builtins(capsys, name):
    code, out, err = run(capsys, "fmt", name, "--check")
    assert code == 0, err
    assert out.strip() == f"<builtin {name}>: canonical"
    code, out, _ = run(capsys, "fmt", name)
    assert out == sparsedsl.parse_spec(name)[1].text


def test_fmt_syntax_error(capsys, tmp_path):
    p = tmp_path / "broken.attn"
    p.write_text("out = attend(causal\n")
    code, out, err = run(capsys, "fmt", str(p))
    assert code == 1 and out == ""
    assert err.startswith(f"{p}:1:20: error: unexpected end of file")


# ------------------------------------------------------------------- subprocess
def test_subprocess_errors_have_no_traceback(leak, tmp_path):
    specs = [str(leak)]
    for i, text in enumerate(["", "\x00\x01", "out = attend(" + "~" * 3000 + "causal)\n",
                              "out = attend(window(" + "9" * 5000 + "))\n", "😀\n"]):
        p = tmp_path / f"m{i}.attn"
        p.write_text(text, encoding="utf-8")
        specs.append(str(p))
    r = subprocess.run([sys.executable, "-m", "sparsedsl.cli", "check", "moba", *specs, "nosuch"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith(f"{leak}:3:16: error: queries can see future keys")
    assert r.stderr.count("error:") == len(specs) + 1
    assert r.stdout.startswith("ok  moba: pattern moba(block=512, topk=3)")
