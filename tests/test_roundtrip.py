"""Printer and parser agree: every generated spec, builtin, example and regression spec
prints to text that parses back to the same syntax tree, prints the same again, and
lowers to the same IR."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

from hypothesis import given, note  # noqa: E402

import sparsedsl  # noqa: E402
from sparsedsl import format_spec, parse  # noqa: E402
from sparsedsl.ir.build import build  # noqa: E402
from sparsedsl.passes import default_passes, run_passes  # noqa: E402
from sparsedsl.errors import Source  # noqa: E402
from sparsedsl.testing.strategies import specs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUILTINS = sorted((ROOT / "sparsedsl" / "builtins").glob("*.attn"))
EXAMPLES = sorted((ROOT / "examples").glob("*.attn"))
REGRESSIONS = sorted((ROOT / "tests" / "regressions").glob("*.attn"))


def _ir_text(spec_text: str) -> str:
    return sparsedsl.lower(spec_text).format(spans=False)


@given(specs())
def test_generated_spec_round_trips(spec):
    text = format_spec(spec)
    note(f"printed:\n{text}")
    again = parse(text)
    assert again == spec, text
    # idempotent: the comments, blank lines and paragraphs survive a second round
    assert format_spec(again) == text
    # the printed text means what the tree means: the same IR as building the tree itself
    ir_text = _ir_text(text)
    assert _ir_text(format_spec(again)) == ir_text
    built = build(spec, Source("<ast>", text))
    built.passes_run.append("build")
    direct = run_passes(built, default_passes())
    assert direct.format(spans=False) == ir_text, text


def _check_file(path: Path, canonical: bool) -> None:
    text = path.read_text()
    tree = parse(text, str(path))
    printed = format_spec(tree)
    assert parse(printed) == tree
    assert format_spec(parse(printed)) == printed
    if canonical:
        assert printed == text, f"{path.name} is not in canonical form"
    assert _ir_text(printed) == _ir_text(text)


@pytest.mark.parametrize("path", BUILTINS, ids=lambda p: p.stem)
def test_builtin_round_trips(path):
    _check_file(path, canonical=False)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_round_trips(path):
    _check_file(path, canonical=False)


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: p.stem)
def test_regression_round_trips(path):
    _check_file(path, canonical=True)
