"""`examples/train_tiny.py`: a tiny language model trained through the generated kernels.

Runs the script's `main` on the CPU (Triton's interpreter) at a tiny size for the dense
causal example and for MoBA: the loss stays finite and falls, the plot and the JSON summary
are written with the documented keys, and a run repeats exactly with the same seed. The
interpreter runs every kernel program in Python, so the sizes are the smallest that still
train: MoBA with one layer and one head (each step costs about batch * seq * heads kernel
programs per layer).
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "train_tiny.py"
DENSE = str(SCRIPT.parent / "dense_causal.attn")
TINY = ["--device", "cpu", "--size", "cpu", "--seq", "32", "--d-model", "16", "--pairs", "4",
        "--vocab", "32", "--lr", "1e-2", "--seed", "0"]


@pytest.fixture(scope="module")
def train_tiny():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEDSL_CACHE_DIR", str(tmp_path / "cache"))


def _run(train_tiny, tmp_path, spec, extra, name="run"):
    out, js = tmp_path / name, tmp_path / f"{name}.json"
    summary = train_tiny.main([spec, *TINY, *extra, "--out", str(out), "--json", str(js)])
    return summary, out, js


@pytest.mark.parametrize("spec, extra", [
    (DENSE, ["--steps", "8", "--batch", "8", "--heads", "2", "--kv-heads", "1",
             "--layers", "2"]),
    ("moba", ["--steps", "5", "--batch", "2", "--heads", "1", "--kv-heads", "1",
              "--layers", "1", "--set", "block=8", "--set", "topk=2"]),
], ids=["dense_causal", "moba"])
def test_trains_and_writes_outputs(train_tiny, tmp_path, spec, extra):
    summary, out, js = _run(train_tiny, tmp_path, spec, extra)
    steps = int(extra[extra.index("--steps") + 1])
    loss = summary["history"]["loss"]
    assert len(loss) == steps and all(math.isfinite(x) for x in loss), loss
    # from about log(vocab) towards log(#values): the first two steps against the last two
    assert sum(loss[-2:]) < sum(loss[:2]), loss

    png = Path(summary["png"])
    assert png.parent == out and png.is_file() and png.stat().st_size > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert js.is_file() and js.stat().st_size > 0
    data = json.loads(js.read_text())
    missing = set(train_tiny.JSON_KEYS) - set(data)
    assert not missing, missing
    assert data["steps"] == steps and data["device"] == "cpu"
    assert data["final_loss"] == loss[-1] and math.isfinite(data["final_loss"])
    assert 0.0 <= data["acc_last_n"] <= 1.0 and data["last_n"] == min(train_tiny.LAST_N, steps)
    assert data["steps_to_90"] is None or 1 <= data["steps_to_90"] <= steps
    assert data["wall_time_s"] > 0
    assert data["params"]["seq"] == 32 and data["params"]["d_model"] == 16
    if spec == "moba":
        assert data["pattern"] == "moba" and data["spec_params"] == {"block": 8, "topk": 2}


def test_seed_repeats_and_task_layout(train_tiny, tmp_path):
    """Same seed, same losses (the CPU path is deterministic); the batch puts the pairs in
    the first half and the queries (a marker, then a stored key) in the last quarter, the
    last position always one, and answers each with the value stored with its key."""
    import torch
    extra = ["--steps", "2", "--batch", "4", "--layers", "1", "--heads", "2", "--kv-heads", "1"]
    a, _, _ = _run(train_tiny, tmp_path, DENSE, extra, "a")
    b, _, _ = _run(train_tiny, tmp_path, DENSE, extra, "b")
    assert a["history"]["loss"] == b["history"]["loss"]

    for layout, T in [("scattered", 64), ("contiguous", 64), ("scattered", 67)]:
        task = train_tiny.Task(vocab=32, seq=T, pairs=4, layout=layout, queries=5)
        tokens, qpos, answer = task.batch(16, torch.Generator().manual_seed(0))
        assert tokens.shape == (16, T) and qpos.shape == answer.shape == (16, 5)
        for row, pos, ans in zip(tokens.tolist(), qpos.tolist(), answer.tolist()):
            pairs = {row[i]: row[i + 1] for i in range(0, T // 2)
                     if task.key0 <= row[i] < task.value0}
            assert len(pairs) == 4
            if layout == "contiguous":
                at = [i for i in range(T // 2) if row[i] in pairs]
                assert at == list(range(at[0], at[0] + 8, 2))
            assert T - 1 in pos and len(set(pos)) == 5
            assert all(p >= 3 * T // 4 for p in pos)
            for p, a_ in zip(pos, ans):
                assert row[p - 1] == 0 and pairs[row[p]] == a_
            rest = [t for i, t in enumerate(row[T // 2:], T // 2)
                    if i not in pos and i + 1 not in pos]
            assert all(t >= task.filler0 for t in rest)
