"""Tuned kernel knobs (sparsedsl/runtime/tuning.py) and their search (sparsedsl/tools/tune.py).

What `sparsedsl tune` records must reach the kernels of later calls with the same device,
dtype, heads and head dims (the entry tuned at the nearest sequence length), lose to the
environment, be ignored under SPARSEDSL_TUNED=0, and never stop a layer: a bad file is
skipped with a warning. The search keeps a setting only when its results equal the
defaults' and it is faster by the margin; settings that fail or compute something else are
reported, not chosen. Timing needs a GPU, so the search's timer is a stand-in here; the
results it compares are the interpreter's real outputs and gradients.
"""
from __future__ import annotations

import json

import pytest
import torch

import sparsedsl
from sparsedsl.cli import main
from sparsedsl.runtime import cache, tuning
from sparsedsl.tools import tune

F64 = torch.float64

# the row layout (its forward reads SPARSEDSL_ROW) beside a window, in one union
UNION = """\
let b = blocks(8)
let sel = topk(dot(q, pool(b, mean)), 2, force=current(b), forbid=future(b))
out = attend((tokens(sel) | window(5)) & causal)
"""
B, T, H, HKV, D = 1, 37, 2, 1, 16


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache directory and in-memory module cache: each test loads its module anew
    (reading its tuning file), and its tuning file goes away with tmp_path."""
    monkeypatch.setenv("SPARSEDSL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_loaded", {})
    for var in tuning.KNOBS + ("SPARSEDSL_TUNED",):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "cache"


def _layer():
    return sparsedsl.compile(UNION, head_dim=D, q_heads=H).double()


def _inputs(T=T, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, H, D, generator=g, dtype=F64),
            torch.randn(B, T, HKV, D, generator=g, dtype=F64),
            torch.randn(B, T, HKV, D, generator=g, dtype=F64))


def _entry(seq, settings, dtype="float64", heads=H):
    return {"device": "cpu", "dtype": dtype, "heads": heads, "kv_heads": HKV, "head_dim": D,
            "head_dim_v": D, "seq": seq, "settings": settings}


class _Spy:
    """Stands in for a generated kernel: records each launch's keyword arguments."""

    def __init__(self, name, kernel, calls):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _spy_kernels(module, monkeypatch) -> list:
    calls = []
    for name in dir(module):
        if name.endswith("_kernel") and hasattr(getattr(module, name), "__getitem__"):
            monkeypatch.setattr(module, name, _Spy(name, getattr(module, name), calls))
    return calls


def _row_launches(calls):
    """(BN, num_warps, num_stages) of the row-layout forward's launches."""
    return [(kw["BN"], kw["num_warps"], kw["num_stages"]) for name, kw in calls
            if name.startswith("attend_") and name.endswith("_fwd_kernel") and "BN" in kw]


def test_tuned_settings_reach_the_kernels(fresh_cache, monkeypatch):
    layer = _layer()
    q, k, v = _inputs()
    module = layer._kernels(q.device)
    tuning.record(layer._op.key, _entry(T, {"SPARSEDSL_ROW": "16,2,1"}), module)
    calls = _spy_kernels(module, monkeypatch)
    with torch.no_grad():
        out = layer(q, k, v)
    assert _row_launches(calls) == [(16, 2, 1)]
    want = sparsedsl.reference(layer.ir, q, k, v)
    assert (out - want).abs().max().item() < 1e-10
    # the environment wins; SPARSEDSL_TUNED=0 leaves the defaults (32 keys, 4 warps, 3 stages
    # in the interpreter)
    calls.clear()
    monkeypatch.setenv("SPARSEDSL_ROW", "32,1,1")
    with torch.no_grad():
        layer(q, k, v)
    monkeypatch.delenv("SPARSEDSL_ROW")
    monkeypatch.setenv("SPARSEDSL_TUNED", "0")
    with torch.no_grad():
        layer(q, k, v)
    assert _row_launches(calls) == [(32, 1, 1), (32, 4, 3)]


def test_a_new_process_reads_the_tuning_file(fresh_cache, monkeypatch):
    """The file is what carries a tuning to later processes: a module loaded afresh (an
    empty in-memory cache) installs it."""
    layer = _layer()
    tuning.record(layer._op.key, _entry(T, {"SPARSEDSL_ROW": "16,1,2"}))
    monkeypatch.setattr(cache, "_loaded", {})
    layer = _layer()
    layer._kernel_modules.clear()
    module = layer._kernels(torch.device("cpu"))
    calls = _spy_kernels(module, monkeypatch)
    with torch.no_grad():
        layer(*_inputs())
    assert _row_launches(calls) == [(16, 1, 2)]
    assert tuning.forget(layer._op.key, module) and module._TUNED == {}
    assert not tuning.forget(layer._op.key)


def test_the_entry_at_the_nearest_length_applies(fresh_cache):
    layer = _layer()
    module = layer._kernels(torch.device("cpu"))
    key = layer._op.key
    tuning.record(key, _entry(32, {"SPARSEDSL_ROW": "16,1,1"}), module)
    tuning.record(key, _entry(128, {"SPARSEDSL_ROW": "32,2,1"}), module)
    tuning.record(key, _entry(128, {"SPARSEDSL_ROW": "64,2,1"}), module)  # replaces the last
    assert len(tuning.read_entries(key)) == 2

    def at(T, dtype=F64, heads=H):
        q = torch.zeros(B, T, heads, D, dtype=dtype)
        kv = torch.zeros(B, T, HKV, D, dtype=dtype)
        return module._tuned(q, kv, kv).get("SPARSEDSL_ROW")
    assert at(40) == at(8) == "16,1,1"
    assert at(100) == at(4096) == "64,2,1"
    assert at(64) == "64,2,1"  # as far from both by ratio: the longer
    assert at(40, dtype=torch.float32) is None and at(40, heads=4) is None


def test_a_bad_tuning_file_is_skipped_with_a_warning(fresh_cache, monkeypatch):
    layer = _layer()
    path = tuning.tuned_path(layer._op.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    monkeypatch.setattr(cache, "_loaded", {})
    with pytest.warns(UserWarning, match="not JSON"):
        module = _layer()._kernels(torch.device("cpu"))
    assert module._TUNED == {}
    good = _entry(T, {"SPARSEDSL_ROW": "16,1,1"})
    path.write_text(json.dumps({"format": 1, "entries": [
        good, _entry(T, {"SPARSEDSL_BOGUS": "1"}), _entry(T, {"SPARSEDSL_ROW": ""}),
        {**good, "seq": 0}, "x"]}))
    with pytest.warns(UserWarning) as caught:
        assert tuning.read_entries(layer._op.key) == [good]
    reasons = " | ".join(str(w.message) for w in caught)
    for why in ("unknown knob `SPARSEDSL_BOGUS`", "must be a non-empty string",
                "`seq` must be a positive integer", "not an object"):
        assert why in reasons
    with pytest.raises(ValueError, match="unknown knob"):
        tuning.record(layer._op.key, _entry(T, {"TILE": "1"}))


# ------------------------------------------------------------------------------ search
ROW, TILE = "SPARSEDSL_ROW", "SPARSEDSL_TILE"


def _fake(times: dict, wrong=(), broken=()):
    """run() and measure() that read the environment: each setting's time from `times`
    (knob=setting -> ms; the defaults 10 ms), wrong results for the settings in `wrong`, an
    error for those in `broken`."""
    import os

    def current():
        return [f"{k}={os.environ[k]}" for k in (ROW, TILE) if os.environ.get(k)]

    def run():
        if any(s in broken for s in current()):
            raise RuntimeError("out of resources: shared memory, required: 300000")
        out = torch.ones(1, 4, 2, 3)
        if any(s in wrong for s in current()):
            out[0, 1, 1, 2] = 1.5
        return [out]

    def measure():
        return min([times.get(s, 10.0) for s in current()] or [10.0])
    return run, measure


def test_search_keeps_the_fastest_setting_that_computes_the_same():
    run, measure = _fake({f"{ROW}=a": 8.0, f"{ROW}=b": 9.0, f"{TILE}=e": 7.9},
                         wrong={f"{TILE}=d"}, broken={f"{TILE}=c"})
    result = tune.search({ROW: ("a", "b"), TILE: ("c", "d", "e")}, run, measure, tol=1e-3)
    assert result.settings == {ROW: "a"}  # e is within the 2% margin of a's 8 ms
    assert (result.default_ms, result.tuned_ms, result.confirmed) == (10.0, 8.0, True)
    by = {(t.knob, t.setting): t for t in result.trials}
    assert by[ROW, "a"].kept and not by[ROW, "b"].kept and by[ROW, "b"].ms == 9.0
    assert "out of resources" in by[TILE, "c"].error and by[TILE, "c"].ms is None
    assert "result 0" in by[TILE, "d"].error and by[TILE, "d"].ms is None
    assert by[TILE, "e"].ms == 7.9 and not by[TILE, "e"].kept
    table = tune.format_result(result)
    assert "SPARSEDSL_ROW" in table and "out of resources" in table and "1.250x" in table


def test_search_keeps_nothing_the_confirming_runs_do_not_bear_out():
    calls = iter([10.0, 5.0] + [10.0, 11.0] * 3)  # defaults, ROW=a, then the confirmation

    def measure():
        return next(calls)
    result = tune.search({ROW: ("a",)}, lambda: [torch.ones(2)], measure, tol=1e-3)
    assert not result.confirmed and result.settings == {} and result.tuned_ms == 10.0
    result = tune.search({ROW: ("a",)}, lambda: [torch.ones(2)], lambda: 1.0, tol=1e-3,
                         budget_s=0.0)
    assert result.stopped_early and result.trials == []


def test_search_stops_when_a_setting_breaks_the_gpu():
    run, measure = _fake({}, broken={f"{ROW}=a"})
    with pytest.raises(RuntimeError, match="SPARSEDSL_ROW=a broke the CUDA context"):
        tune.search({ROW: ("a",)}, run, measure, tol=1e-3, alive=lambda: False)


def test_compare_excuses_only_rows_whose_selection_flipped():
    out = torch.randn(1, 4000, 2, 3, dtype=F64)
    lists = torch.zeros(1, 4000, 1, 2, dtype=torch.int32)
    other, other_lists = out.clone(), lists.clone()
    other[0, 7, 1] += 1.0
    assert "result 0" in tune.compare([other, other_lists], [out, lists], 1e-6, lists_at=1)
    other_lists[0, 7, 0, 1] = 5  # row 7's list differs: its two heads may differ
    assert tune.compare([other, other_lists], [out, lists], 1e-6, lists_at=1) is None
    other_lists[0, :8, 0, 1] = 5  # 0.2% of the rows: more than near-ties explain
    assert "block lists differ" in tune.compare([other, other_lists], [out, lists], 1e-6, 1)
    grad = torch.randn(40, dtype=F64)
    assert tune.compare([out, lists, grad * (1 + 1e-7)], [out, lists, grad], 1e-6, 1) is None
    nan = grad.clone()
    nan[3] = float("nan")
    assert "not finite" in tune.compare([out, lists, nan], [out, lists, grad], 1e-6, 1)


def test_tune_layer_records_what_it_found(fresh_cache, monkeypatch):
    """The search on the interpreter's real results (outputs, lists and gradients of every
    setting compared with the defaults'), with a stand-in timer that favours 16-key steps."""
    import os
    layer = _layer()
    q, k, v = (t.requires_grad_() for t in _inputs())
    dout = torch.randn(B, T, H, D, dtype=F64)

    def measure(fn):
        return 1.0 if os.environ.get(ROW) == "16,1,1" else 2.0
    monkeypatch.setattr(tune, "candidates", lambda knob, cuda: ("16,1,1", "32,2,1"))
    result, entry = tune.tune_layer(layer, q, k, v, {}, dout, knobs=[ROW], measure=measure)
    assert result.knobs == [ROW] and result.settings == {ROW: "16,1,1"}
    assert [t.error for t in result.trials] == [None, None]
    assert entry["settings"] == {ROW: "16,1,1"} and entry["seq"] == T
    assert entry["objective"] == "forward+backward"
    assert tuning.read_entries(layer._op.key) == [entry]
    calls = _spy_kernels(layer._kernels(q.device), monkeypatch)
    with torch.no_grad():
        layer(q, k, v)
    assert _row_launches(calls) == [(16, 1, 1)]
    with pytest.raises(ValueError, match="reads no knob SPARSEDSL_GROUPED"):
        tune.tune_layer(layer, q, k, v, {}, dout, knobs=["SPARSEDSL_GROUPED"], measure=measure)


def test_the_tune_verb(fresh_cache, capsys):
    def run(*argv):
        code = main([str(a) for a in argv])
        return (code, *capsys.readouterr())
    code, out, _ = run("tune", "moba", "--set", "block=16", "--seq", "40", "--heads", "2",
                       "--head-dim", "16", "--dry-run", "--fwd-only")
    assert code == 0 and "reads 3 knob(s)" in out
    assert "SPARSEDSL_SELECT_TILE" in out and "SPARSEDSL_GROUPED_OWN" in out
    if not torch.cuda.is_available():
        code, _, err = run("tune", "moba", "--seq", "40")
        assert code == 1 and "needs" not in err and "CUDA GPU" in err
    code, out, _ = run("tune", "moba", "--show")
    assert code == 0 and "no tuned settings" in out
    code, _, err = run("tune", "--case", "bogus")
    assert code == 1 and "unknown `bogus`" in err
    code, _, err = run("tune", "moba", "--knobs", "TILE", "--dry-run")
    assert code == 1 and "unknown knob `TILE`" in err
    code, _, err = run("tune")
    assert code == 1 and "give a spec" in err


def test_the_pooled_dkdv_default_follows_the_pooled_key_count():
    """The GPU default `sparsedsl tune` found for the pooled keys' dk/dv kernel in bf16: 64
    keys a program from 256 pooled keys a sequence on, 32 below (docs/perf-notes.md,
    session 21). A stand-in for a CUDA q reaches the GPU branch of the generated helper."""
    spec = "let b = blocks(4)\nout = attend(pool(b, mean), past(b))"
    module = sparsedsl.compile(spec, head_dim=D, q_heads=H)._kernels(torch.device("cpu"))

    class CudaQ:
        is_cuda = True
        shape = (1, 4096, H, 128)

        def element_size(self):
            return 2
    pick = lambda n: module._tile_config("dkdvp", CudaQ(), {}, pooled=True, nkeys=n)  # noqa: E731
    assert pick(256) == pick(4096) == (64, 64, 4, 2)
    assert pick(255) == pick(128) == (64, 32, 4, 2)
    assert module._tile_config("dkdvp", CudaQ(), {"SPARSEDSL_TILE_DKDVP": "32,32,4,3"},
                               pooled=True, nkeys=4096) == (32, 32, 4, 3)


def test_the_search_compares_the_inputs_gradients_not_the_parameters():
    """A learned compression's parameters get gradients in the timed call, but `run` hands
    the search the output and the gradients of q, k, v (and tensor inputs) only: the MLP's
    last bias gets a sum that cancels (rounding noise, order-dependent)."""
    spec = "let b = blocks(4)\nout = attend(pool(b, mlp), past(b))"
    layer = sparsedsl.compile(spec, head_dim=D, q_heads=H).double()
    assert any(p.requires_grad for p in layer.parameters())
    q, k, v = (t.requires_grad_() for t in _inputs(T=13))
    run, fn = tune.layer_call(layer, q, k, v, {}, torch.randn(B, 13, H, D, dtype=F64), True)
    res = run()
    assert [tuple(t.shape) for t in res] == [(B, 13, H, D), tuple(q.shape), tuple(k.shape),
                                              tuple(v.shape)]
    assert all(p.grad is None for p in layer.parameters()) and q.grad is None
    fn()
    assert all(p.grad is None for p in layer.parameters())
