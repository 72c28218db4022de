"""`sparsedsl bench` without a GPU: the FlexAttention masks and the analytic floor against the
dense reference, the NSA-as-fla spec against fla's published definition, option parsing, the
no-GPU exit, one measurement's failure handling, and the table / JSON / plot on fake timings."""
from __future__ import annotations

import argparse
import json
import math
import warnings

import pytest
import torch

import sparsedsl
from sparsedsl.bench import add_arguments, run
from sparsedsl.bench import cases as C
from sparsedsl.bench import flexmasks as fm
from sparsedsl.bench import floor as fl
from sparsedsl.bench import impls
from sparsedsl.bench.measure import Prepared, describe_error
from sparsedsl.bench.options import UsageError, options_from_args
from sparsedsl.bench.report import Results, Row, format_table

from .published.nsa import nsa_naive

F64 = torch.float64


def qkv(T, hq, hkv, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, T, h, D, generator=g, dtype=F64) for h in (hq, hkv, hkv))


def only(d: dict):
    assert len(d) == 1, list(d)
    return next(iter(d.values()))


def parse(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


# ============================================================ FlexAttention masks
# T, block, topk, tile, q heads, kv heads: partial final blocks and tiles, tiles smaller and
# larger than blocks, GQA
MOBA = [(61, 8, 3, 4, 4, 2), (64, 16, 2, 8, 2, 2), (50, 6, 4, 4, 2, 1), (96, 16, 3, 32, 2, 2)]


@pytest.mark.parametrize("T,block,topk,tile,hq,hkv", MOBA,
                         ids=[f"T{c[0]}-b{c[1]}-k{c[2]}-tile{c[3]}-g{c[4] // c[5]}" for c in MOBA])
def test_flex_moba_block_mask_is_the_reference_mask(T, block, topk, tile, hq, hkv):
    q, k, v = qkv(T, hq, hkv, seed=T + block)
    d = sparsedsl.reference("moba", q, k, v, block=block, topk=topk, return_details=True)
    qt, kt = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    sel = fm.moba_route(qt, kt, block, topk)
    # the routing picks the reference's blocks (own block included)
    assert torch.equal(fm.moba_selected(sel, block, T), d.blocksets["sel"])
    mask = fm.moba_block_mask(sel, block, T, tile=tile)
    ref = only(d.keys)
    # tiles skipped, full tiles and mask_mod together give exactly the reference mask
    assert torch.equal(fm.token_mask(mask, 1, hq, T), ref)
    if tile <= block:  # full tiles (no mask_mod) are used, not only partial ones
        assert mask.full_kv_num_blocks.sum() > 0


def test_flex_moba_output_is_the_reference_output():
    T, block, topk = 45, 8, 3
    q, k, v = qkv(T, 4, 2, seed=3)
    ref = sparsedsl.reference("moba", q, k, v, block=block, topk=topk)
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))
    sel = fm.moba_route(qt, kt, block, topk)
    from torch.nn.attention.flex_attention import flex_attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is not compiled
        out = flex_attention(qt, kt, vt, block_mask=fm.moba_block_mask(sel, block, T, tile=8),
                             enable_gqa=True)
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, atol=1e-5, rtol=0)


def test_moba_route_with_fewer_past_blocks_than_topk():
    q, k, _ = qkv(20, 2, 2)
    sel = fm.moba_route(q.transpose(1, 2).float(), k.transpose(1, 2).float(), 8, 4)
    assert sel.shape == (1, 2, 20, 3)
    assert (sel[:, :, :8] == -1).all()  # block 0: nothing in the past
    assert (sel[:, :, 8:16, 1:] == -1).all() and (sel[:, :, 8:16, 0] == 0).all()


@pytest.mark.parametrize("T,window,sinks,tile", [(70, 16, 4, 8), (64, 9, 3, 16), (33, 40, 2, 8)])
def test_flex_window_sinks_mask_is_the_reference_mask(T, window, sinks, tile):
    q, k, v = qkv(T, 2, 2)
    d = sparsedsl.reference(C.WINDOW_SINKS_SPEC, q, k, v, window=window, sinks=sinks,
                            return_details=True)
    ref = only(d.keys)
    i = torch.arange(T)
    zero = torch.tensor(0)
    mod = fm.window_sinks_mask_mod(window, sinks)(zero, zero, i[:, None], i[None, :])
    assert torch.equal(mod.expand(1, 2, T, T), ref)
    mask = fm.window_sinks_block_mask(T, window, sinks, "cpu", tile=tile)
    assert torch.equal(fm.token_mask(mask, 1, 2, T), ref)


# ===================================================================== the floor
def test_floor_keys_are_the_reference_key_counts():
    T = 77
    q, k, v = qkv(T, 4, 2, seed=5)
    d = sparsedsl.reference("moba", q, k, v, block=8, topk=3, return_details=True)
    assert torch.equal(only(d.keys).sum(-1), fl.moba_keys(T, 8, 3).expand(1, 4, T))
    d = sparsedsl.reference(C.WINDOW_SINKS_SPEC, q, k, v, window=10, sinks=3, return_details=True)
    assert torch.equal(only(d.keys).sum(-1), fl.window_sinks_keys(T, 10, 3).expand(1, 4, T))


@pytest.mark.parametrize("over,init,local", [
    (dict(cmp_len=8, cmp_stride=4, sel_len=8, topn=3, window=12), 1, 2),
    (dict(cmp_len=6, cmp_stride=6, sel_len=6, topn=5, window=1, init_blocks=2, local_blocks=1),
     2, 1),
    (dict(cmp_len=4, cmp_stride=2, sel_len=8, topn=2, window=5, local_blocks=3), 1, 3),
])
def test_floor_nsa_keys_are_the_reference_key_counts(over, init, local):
    T = 90
    q, k, v = qkv(T, 4, 2, seed=7)
    g = [torch.rand(1, T, 4, dtype=F64) for _ in range(3)]
    params = dict(cmp="mean", **over)
    d = sparsedsl.reference("nsa", q, k, v, g_cmp=g[0], g_slc=g[1], g_swa=g[2],
                            return_details=True, **params)
    ir = sparsedsl.lower("nsa", params)
    pooled = next(n for n in ir.g.nodes if ir.node(n)["op"] == "attend_pooled")
    visible = d.blocksets[ir.label(ir.operand(pooled, "blocks"))]
    pat = C.Nsa(over["cmp_len"], over["cmp_stride"], over["sel_len"], over["topn"], init, local,
                over["window"], False)
    keys = fl.keys_per_query(pat, T)
    assert torch.equal(visible.sum(-1), keys["cmp"].expand(1, 4, T))
    assert torch.equal(d.keys["slc_out"].sum(-1), keys["slc"].expand(1, 4, T))
    assert torch.equal(d.keys["swa_out"].sum(-1), keys["swa"].expand(1, 4, T))


def test_floor_counts_and_bound():
    w = fl.pattern_work(C.Moba(4, 2), 8, q_heads=2, kv_heads=1, D=16)
    keys = [1, 2, 3, 4, 5, 6, 7, 8]  # own block up to i, plus block 0 for i >= 4
    assert w.keys_per_query == sum(keys) / 8
    router = (0 + 4 * 1) * 2 * 2 * 16  # one candidate block for queries 4..7
    assert w.flops_fwd == sum(keys) * 2 * 4 * 16 + router
    assert w.flops_bwd == 2.5 * sum(keys) * 2 * 4 * 16
    assert w.bytes_fwd == (8 * 2 * 16 + 2 * 8 * 1 * 16 + 8 * 2 * 16) * 2
    f = w.floor_ms(flops_per_s=1e12, bytes_per_s=1e9)
    assert f["floor_fwd_ms"] == pytest.approx(max(w.flops_fwd / 1e9, w.bytes_fwd / 1e6))
    assert f["floor_fwd_bound"] == "memory"
    dense = fl.dense_work(8, 2, 1, 16)
    assert dense.keys_per_query == 4.5


# ========================================================================= cases
def test_nsa_fla_spec_is_fla_definition():
    """The nsa-fla case's spec computes what fla's naive NSA computes with window_size=0."""
    T, bs, topn = 70, 8, 3
    q, k, v = qkv(T, 4, 1, seed=11)
    g = [torch.rand(1, T, 4, dtype=F64) for _ in range(2)]
    out = sparsedsl.reference(C.NSA_FLA_SPEC, q, k, v, g_cmp=g[0], g_slc=g[1], block=bs,
                              topn=topn)
    want = nsa_naive(q, k, v, g[0], g[1], None, topn, bs, 0)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)


def test_cases_follow_the_specs_and_options():
    opts = options_from_args(parse("--group", "1,4,16"))
    cases = {c.label: c for c in C.make_cases(opts)}
    assert list(cases) == ["moba", "nsa-fla g1", "nsa-fla g4", "nsa-fla g16", "nsa g1", "nsa g4",
                           "nsa g16", "window-sinks"]
    assert cases["moba"].pattern == C.Moba(512, 3)
    assert (cases["moba"].q_heads, cases["moba"].kv_heads) == (16, 16)
    assert cases["nsa-fla g4"].kv_heads == 16 and cases["nsa-fla g4"].group == 4
    assert cases["nsa-fla g16"].pattern == C.Nsa(64, 64, 64, 16, 1, 2, 0, False)
    p = sparsedsl.lower("nsa").param_values()
    assert cases["nsa g16"].pattern == C.Nsa(p["cmp_len"], p["cmp_stride"], p["sel_len"],
                                             p["topn"], p["init_blocks"], p["local_blocks"],
                                             p["window"], p["cmp"] == "mlp")
    assert cases["window-sinks"].pattern == C.WindowSinks(4096, 64)
    json.dumps([c.describe() for c in cases.values()])


# ======================================================================= options
def test_options_parse():
    o = options_from_args(parse("--seq", "8k,16384,8192", "--case", "moba,nsa", "--impl",
                                "sparsedsl,flex", "--group", "1,4,8", "--json", "r.json"))
    assert o.seqs == (8192, 16384) and o.cases == ("moba", "nsa")
    assert o.impls == ("sparsedsl", "flex") and o.groups == (1, 4, 8) and o.json == "r.json"
    assert (o.warmup_ms, o.rep_ms, o.check, o.ceilings) == (25.0, 100.0, True, True)
    d = options_from_args(parse())
    assert d.seqs == (8192, 16384, 32768, 65536) and d.groups == (16,) and len(d.cases) == 4
    q = options_from_args(parse("--quick", "--no-check", "--no-ceilings"))
    assert q.seqs == (8192,) and q.rep_ms < d.rep_ms and not q.check and not q.ceilings
    assert options_from_args(parse("--quick", "--seq", "4k")).seqs == (4096,)


@pytest.mark.parametrize("argv,msg", [
    (("--seq", "8x"), "--seq: expected"),
    (("--seq", "0"), "positive"),
    (("--case", "moba,dense"), "unknown 'dense'"),
    (("--impl", "xformers"), "unknown 'xformers'"),
    (("--group", "3"), "does not divide"),
    (("--plot-from", "a.json"), "needs --png"),
    (("--rep", "0"), "positive"),
])
def test_options_reject(argv, msg, capsys):
    with pytest.raises(UsageError, match=msg):
        options_from_args(parse(*argv))
    assert run(parse(*argv)) == 2
    assert msg in capsys.readouterr().err


def test_without_a_gpu_run_says_so(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run(parse("--quick")) == 3
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "Nothing was measured" in err


def test_floors_only_needs_no_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from sparsedsl.bench.__main__ import main
    assert main(["--floors-only", "--case", "moba,window-sinks", "--seq", "8k"]) == 0
    out = capsys.readouterr().out
    assert "moba" in out and "window-sinks" in out and "GFLOP" in out


# =================================================================== measurement
def test_a_failing_backward_keeps_the_forward(monkeypatch):
    from sparsedsl.bench import measure, runner
    monkeypatch.setattr(measure, "time_forward", lambda p, w, r: 1.5)

    def oom(p, w, r):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")
    monkeypatch.setattr(measure, "time_fwdbwd", oom)
    p = Prepared(lambda: None, [], torch.zeros(1), lambda o: o, 0)
    row = Row("moba", 8192, "sdpa-cudnn", "dense")
    monkeypatch.setattr(measure, "time_graph", lambda fn, r: 0.25)
    runner._measure(row, p, options_from_args(parse()))
    assert (row.status, row.fwd_ms, row.fwdbwd_ms) == ("ok", 1.5, None)
    assert row.reason == "fwd+bwd: out of memory"
    assert row.extra["timings_ms"] == {"graph": 0.25}  # the forward from a CUDA graph
    row = Row("moba", 8192, "sdpa-cudnn", "dense")
    runner._measure(row, p, options_from_args(parse("--no-graph")))
    assert "timings_ms" not in row.extra
    monkeypatch.setattr(measure, "time_forward", oom)
    row = Row("moba", 8192, "sdpa-cudnn", "dense")
    runner._measure(row, p, options_from_args(parse()))
    assert (row.status, row.reason) == ("error", "out of memory")


def test_describe_error_is_one_short_line():
    assert describe_error(ValueError("bad\nmore")) == "ValueError: bad"
    assert len(describe_error(RuntimeError("x" * 500))) < 200


def test_compare_moba_counts_rows_with_other_selections():
    T, block = 24, 8
    ref = torch.zeros(1, T, 2, 4)
    out = ref.clone()
    out[0, 20, 1] = 0.5  # a row whose selection differs ...
    out[0, 3, 0] = 0.01  # ... and one that agrees
    sel = torch.full((1, 2, T, 1), -1, dtype=torch.int32)
    sel[:, :, 16:, 0] = 0
    lists = {"sel": torch.stack([torch.where(sel[..., 0] >= 0, sel[..., 0], -1),
                                 (torch.arange(T) // block).expand(1, 2, T)], -1)
             .permute(0, 2, 1, 3).clone()}
    lists["sel"][0, 20, 1, 0] = 1  # sparsedsl chose block 1 there
    r = impls.compare_moba(ref, lists, out, sel, block)
    assert r["selection_rows_differ"] == 1 and r["selection_rows"] == 2 * T
    assert r["max_abs_err"] == 0.5 and r["max_abs_err_same_selection"] == pytest.approx(0.01)
    assert r["rows"] == 2 * T and r["rows_over_tol"] == 2  # a zero reference: any difference
    ref[0, 0, 0, 0] = out[0, 0, 0, 0] = 1.0  # scale 1
    r = impls.compare(ref, out)
    assert (r["rows_over_tol"], r["rel_err"]) == (1, 0.5)  # 0.5 > 2e-2 of 1; 0.01 is not


# ============================================================ table, JSON and plot
def fake_results() -> Results:
    case = C.make_cases(options_from_args(parse("--case", "moba")))[0]
    res = Results(meta={"gpu": "fake"}, cases=[case.describe()])
    w = fl.work(case, 8192)
    res.floors.append({"case": "moba", "seq": 8192, **w.to_json(), **w.floor_ms(5e14, 2e12)})
    res.rows = [
        Row("moba", 8192, "sparsedsl", "sparsedsl", 2.0, 8.0, 3 << 30, 1 << 30,
            extra={"notes": {"cold_spec_to_layer_s": 0.0812, "cached_spec_to_layer_s": 0.004},
                   "timings_ms": {"graph": 0.625}}),
        Row("moba", 8192, "sdpa-cudnn", "dense", 4.0, 10.0, 2 << 30, 1 << 30,
            extra={"timings_ms": {"graph": "RuntimeError: capture failed"}}),
        Row("moba", 8192, "sdpa-flash", "dense", 5.0, 16.0, 2 << 30, 1 << 30),
        Row("moba", 8192, "flex", "peer", 3.0, 12.0, 2 << 30, 1 << 30,
            extra={"timings_ms": {"routing+mask": 0.75},
                   "check": {"max_abs_err": 0.0039, "rel_err": 0.001, "rows_over_tol": 1,
                             "rows": 131072, "row_tol": 0.02,
                             "selection_rows_differ": 2, "selection_rows": 100,
                             "max_abs_err_same_selection": 0.0031}}),
        Row("moba", 8192, "flex+routing", "peer", status="error", reason="out of memory"),
    ]
    return res


def test_speedups():
    res = fake_results()
    mine = res.speedups(res.rows[0])
    assert mine["x_dense_fwd"] == 4.0 / 2.0 and mine["x_dense_fwdbwd"] == 10.0 / 8.0
    assert mine["vs"] == {"flex": {"fwd": 1.5, "fwdbwd": 1.5}}
    f = res.floors[0]
    assert mine["over_floor_fwd"] == pytest.approx(2.0 / f["floor_fwd_ms"])
    assert mine["over_floor_fwdbwd"] == pytest.approx(8.0 / f["floor_fwdbwd_ms"])
    assert res.speedups(res.rows[2]) == {"x_dense_fwd": 0.8, "x_dense_fwdbwd": 10.0 / 16.0}
    assert res.speedups(res.rows[4]) == {}


def test_table():
    text = format_table(fake_results())
    lines = text.splitlines()
    assert any(ln.startswith("== moba, T=8192: MoBA, block 512, top-3; 16/16 heads") for ln in lines)
    row = next(ln for ln in lines if ln.strip().startswith("sparsedsl"))
    sp = fake_results().speedups(fake_results().rows[0])
    for cell in ("2.000", "8.000", "3.00", "2.00/1.25", "flex 1.50/1.50",
                 f"{sp['over_floor_fwd']:.2f}/{sp['over_floor_fwdbwd']:.2f}",
                 "spec->layer cold 81 ms, cached 4 ms"):
        assert cell in row, (cell, row)
    # the forward from a CUDA graph in its column (not repeated in the notes); a capture
    # that failed: '-' there and the reason in the notes
    head = next(ln for ln in lines if ln.strip().startswith("impl"))
    assert head.split()[1:6] == ["fwd", "ms", "graph", "ms", "fwd+bwd"]
    assert row.split()[1:4] == ["2.000", "0.625", "8.000"] and "graph" not in row
    cudnn = next(ln for ln in lines if ln.strip().startswith("sdpa-cudnn"))
    assert cudnn.split()[1:4] == ["4.000", "-", "10.00"]
    assert "graph: RuntimeError: capture failed" in cudnn
    flex = next(ln for ln in lines if ln.strip().startswith("flex "))
    assert "routing+mask 0.750 ms" in flex and "selection differs in 2/100 rows" in flex
    assert "1/131072 rows over 0.02 of it" in flex
    assert "ERROR: out of memory" in next(ln for ln in lines
                                          if ln.strip().startswith("flex+routing"))
    assert "keys/query" in text and ("(compute)" in text or "(memory)" in text)


def test_json_round_trip_and_plot(tmp_path, capsys):
    res = fake_results()
    path = tmp_path / "bench.json"
    res.write_json(str(path))
    data = json.loads(path.read_text())
    assert data["rows"][0]["speedup"]["x_dense_fwd"] == 2.0
    assert data["rows"][4]["status"] == "error" and data["floors"][0]["seq"] == 8192
    back = Results.from_json(data)
    assert back.rows == res.rows and back.cases == res.cases
    assert format_table(back) == format_table(res)
    pytest.importorskip("matplotlib")
    png = tmp_path / "plot.png"
    assert run(parse("--plot-from", f"{path},{path}", "--png", str(png))) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "sparsedsl" in capsys.readouterr().out


def test_floor_line_without_ceilings():
    res = fake_results()
    f = dict(res.floors[0])
    for k in [k for k in f if k.startswith("floor_")]:
        del f[k]
    res.floors = [f]
    assert "->" not in format_table(res).splitlines()[2]
    assert math.isfinite(f["keys_per_query"])


# ==================================================================== fla's entry
def _fake_fla(monkeypatch, **attrs):
    import sys
    import types
    for name in ("fla", "fla.ops", "fla.ops.nsa", "fla.ops.nsa.parallel"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    mods = {n: types.ModuleType(n) for n in ("fla", "fla.ops", "fla.ops.nsa")}
    for n, attr in attrs.items():
        setattr(mods["fla.ops.nsa"], n, attr)
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)


def test_fla_is_called_with_the_case_configuration(monkeypatch):
    calls = []

    def parallel_nsa(q, k, v, g_cmp=None, g_slc=None, g_swa=None, block_indices=None,
                     block_counts=16, block_size=64, window_size=0, scale=None, cu_seqlens=None):
        calls.append(dict(shapes=(q.shape, k.shape, g_cmp.shape), g_swa=g_swa,
                          block_counts=block_counts, block_size=block_size,
                          window_size=window_size))
        return q * g_slc[..., None]

    _fake_fla(monkeypatch, parallel_nsa=parallel_nsa)
    case = C.make_cases(options_from_args(parse("--case", "nsa-fla")))[0]
    inp = impls.make_inputs(case, 4, seed=0, device="cpu")
    p = impls.prepare_fla(case, inp)
    p.fwd()
    assert calls == [dict(shapes=((1, 4, 64, 128), (1, 4, 4, 128), (1, 4, 64)), g_swa=None,
                          block_counts=16, block_size=64, window_size=0)]
    assert "parallel_nsa(q, k, v, g_cmp, g_slc, g_swa=None" in p.notes["call"]


def test_fla_missing_or_broken_is_a_reason(monkeypatch):
    import sys
    case = C.make_cases(options_from_args(parse("--case", "nsa-fla")))[0]
    inp = impls.make_inputs(case, 4, seed=0, device="cpu")
    monkeypatch.setitem(sys.modules, "fla", None)  # import fla -> ModuleNotFoundError
    with pytest.raises(impls.Unavailable, match=r"not installed \(pip install fla-core\)"):
        impls.prepare_fla(case, inp)
    _fake_fla(monkeypatch, parallel_nsa=None)  # fla's own fallback when parallel.py fails
    with pytest.raises(impls.Unavailable, match="fla.ops.nsa.parallel"):
        impls.prepare_fla(case, inp)
    nsa = C.make_cases(options_from_args(parse("--case", "nsa")))[0]
    with pytest.raises(impls.Unavailable, match="mean compression with one block size"):
        impls.prepare_fla(nsa, inp)
