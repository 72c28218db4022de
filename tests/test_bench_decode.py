"""`sparsedsl bench --decode` without a GPU: the one-row FlexAttention masks against the dense
reference's last row (MoBA on sparsedsl's own selection), the decode floor against the
reference's key counts and a count by hand, the options, the host-loop timer, and the whole
decode loop (inputs, every row's preparation, the checks, table, JSON and plot) at tiny sizes
on the CPU, the kernels in Triton's interpreter and the GPU timers replaced."""
from __future__ import annotations

import argparse
import json
import time
import warnings

import pytest
import torch

import sparsedsl
from sparsedsl.bench import add_arguments, measure, run, runner
from sparsedsl.bench import cases as C
from sparsedsl.bench import decode as D
from sparsedsl.bench import flexmasks as fm
from sparsedsl.bench import floor as fl
from sparsedsl.bench.options import UsageError, options_from_args
from sparsedsl.bench.report import Results, format_table

F64 = torch.float64


def qkv(T, hq, hkv, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, T, h, D, generator=g, dtype=F64) for h in (hq, hkv, hkv))


def parse(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def last_row(details) -> torch.Tensor:
    (keys,) = details.keys.values()
    return keys[:, :, -1]  # [B, H, T]: the keys the last query attends


# ========================================================== FlexAttention, one row
# T (the cache length), block, topk, tile, q heads, kv heads: a partial last block, tiles
# smaller and larger than blocks, a query whose own block is its first token, GQA
MOBA = [(61, 8, 3, 4, 4, 4), (64, 16, 2, 8, 2, 2), (50, 6, 4, 16, 4, 2), (41, 8, 3, 8, 2, 1)]


@pytest.mark.parametrize("T,block,topk,tile,hq,hkv", MOBA,
                         ids=[f"T{c[0]}-b{c[1]}-k{c[2]}-tile{c[3]}-g{c[4] // c[5]}" for c in MOBA])
def test_flex_moba_decode_mask_is_the_reference_row(T, block, topk, tile, hq, hkv):
    q, k, v = qkv(T, hq, hkv, seed=T + tile)
    d = sparsedsl.reference("moba", q, k, v, block=block, topk=topk, return_details=True)
    # sparsedsl's selection at the last position, from a decode step of a prefilled cache
    layer = sparsedsl.compile("moba", block=block, topk=topk).double()
    cache = layer.new_cache(1, hkv, 8, dtype=F64)
    cache.append(k, v)
    out, lists = layer.decode(q[:, -1:], cache, return_lists=True)
    sel = lists["sel"][:, -1]  # [B, H, KS], the own block included
    assert torch.equal(fm.moba_decode_selected(sel, block, T), d.blocksets["sel"][:, :, -1])
    mask = fm.moba_decode_block_mask(sel, block, T, tile=tile)
    assert mask.kv_num_blocks.shape == (1, hq, 1) and mask.seq_lengths == (1, T)
    # skipped tiles, full tiles and the mask_mod at position T - 1 give the reference's row
    assert torch.equal(fm.token_mask(mask, 1, hq, 1, T)[:, :, 0], last_row(d))
    if tile <= block:
        assert mask.full_kv_num_blocks.sum() > 0
    # FlexAttention's own routing (from block means kept beside the cache) picks the same
    qt, kt = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    own = fm.moba_route_decode(qt[:, :, -1:], fm.moba_block_means(kt, block), T - 1, block, topk)
    assert own.shape == (1, hq, topk - 1)
    assert torch.equal(fm.moba_decode_selected(own, block, T), d.blocksets["sel"][:, :, -1])
    torch.testing.assert_close(out, sparsedsl.reference("moba", q, k, v, block=block,
                                                         topk=topk)[:, -1:], atol=1e-10, rtol=0)


def test_flex_moba_decode_output_is_the_reference_row():
    T, block, topk = 45, 8, 3
    q, k, v = qkv(T, 4, 2, seed=3)
    ref = sparsedsl.reference("moba", q, k, v, block=block, topk=topk)[:, -1:]
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))
    sel = fm.moba_route_decode(qt[:, :, -1:], fm.moba_block_means(kt, block), T - 1, block, topk)
    from torch.nn.attention.flex_attention import flex_attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is not compiled
        out = flex_attention(qt[:, :, -1:], kt, vt, enable_gqa=True,
                             block_mask=fm.moba_decode_block_mask(sel, block, T, tile=8))
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, atol=1e-5, rtol=0)


def test_moba_decode_routing_with_fewer_past_blocks_than_topk():
    q, k, _ = qkv(20, 2, 2)
    kmean = fm.moba_block_means(k.transpose(1, 2), 8)
    assert kmean.shape == (1, 2, 2, 8)  # the complete blocks only
    q1 = q.transpose(1, 2)[:, :, -1:]
    assert (fm.moba_route_decode(q1, kmean, 5, 8, 4) == -1).all()  # block 0: no past
    sel = fm.moba_route_decode(q1, kmean, 19, 8, 4)  # two complete past blocks of three wanted
    assert sel.shape == (1, 2, 3) and (sel[..., 2] == -1).all()
    assert sorted(sel[0, 0, :2].tolist()) == [0, 1]


@pytest.mark.parametrize("T,window,sinks,tile", [(70, 16, 4, 8), (64, 9, 3, 16), (33, 40, 2, 8),
                                                 (50, 20, 5, 4)])
def test_flex_window_sinks_decode_mask_is_the_reference_row(T, window, sinks, tile):
    q, k, v = qkv(T, 2, 2)
    d = sparsedsl.reference(C.WINDOW_SINKS_SPEC, q, k, v, window=window, sinks=sinks,
                            return_details=True)
    mask = fm.window_sinks_decode_block_mask(T, window, sinks, "cpu", tile=tile)
    assert torch.equal(fm.token_mask(mask, 1, 2, 1, T)[:, :, 0], last_row(d))


# ===================================================================== the floor
def test_decode_floor_counted_by_hand():
    # MoBA, block 4, top-2, L = 10: the query at 9 attends its own block [8, 10) and one of
    # the two complete past blocks; the router scores those two
    w = fl.pattern_decode_work(C.Moba(4, 2), 10, q_heads=2, kv_heads=1, D=16)
    assert (w.keys, w.keys_read) == (6, 6)
    assert w.flops == 6 * 2 * 4 * 16 + 2 * 2 * 2 * 16
    assert w.bytes == (2 * 2 * 16 + 6 * 1 * 2 * 16 + 2 * 1 * 16) * 2  # q, o; k, v; block means
    # window 4 + 2 sinks at L = 10: keys 0, 1 and 6..9
    w = fl.pattern_decode_work(C.WindowSinks(4, 2), 10, q_heads=2, kv_heads=2, D=8, n_gates=1)
    assert (w.keys, w.flops) == (6, 6 * 2 * 4 * 8)
    assert w.bytes == (2 * 2 * 8 + 2 + 6 * 2 * 2 * 8) * 2
    f = w.floor_ms(flops_per_s=1e12, bytes_per_s=1e9)
    assert f == {"floor_fwd_ms": pytest.approx(w.bytes / 1e6), "floor_fwd_bound": "memory"}
    dense = fl.dense_decode_work(10, 2, 1, 16)
    assert (dense.keys, dense.flops, dense.bytes) == (10, 10 * 2 * 4 * 16,
                                                      (2 * 2 * 16 + 2 * 10 * 16) * 2)


@pytest.mark.parametrize("T", [37, 40, 64])
def test_decode_floor_keys_are_the_reference_row(T):
    q, k, v = qkv(T, 4, 2, seed=T)
    d = sparsedsl.reference("moba", q, k, v, block=8, topk=3, return_details=True)
    assert fl.pattern_decode_work(C.Moba(8, 3), T, 4, 2, 8).keys == last_row(d).sum(-1)[0, 0]
    assert (last_row(d).sum(-1) == last_row(d).sum(-1)[0, 0]).all()  # every head alike
    d = sparsedsl.reference(C.WINDOW_SINKS_SPEC, q, k, v, window=10, sinks=3,
                            return_details=True)
    assert fl.pattern_decode_work(C.WindowSinks(10, 3), T, 4, 2, 8).keys == \
        last_row(d).sum(-1)[0, 0]


def test_decode_floor_nsa_is_the_reference_row():
    T = 90
    over = dict(cmp_len=8, cmp_stride=4, sel_len=8, topn=3, window=12)
    q, k, v = qkv(T, 4, 2, seed=7)
    g = [torch.rand(1, T, 4, dtype=F64) for _ in range(3)]
    d = sparsedsl.reference("nsa", q, k, v, g_cmp=g[0], g_slc=g[1], g_swa=g[2],
                            return_details=True, cmp="mean", **over)
    ir = sparsedsl.lower("nsa", dict(cmp="mean", **over))
    pooled = next(n for n in ir.g.nodes if ir.node(n)["op"] == "attend_pooled")
    cmp = int(d.blocksets[ir.label(ir.operand(pooled, "blocks"))][0, 0, -1].sum())
    slc, swa = (int(d.keys[b][0, 0, -1].sum()) for b in ("slc_out", "swa_out"))
    union = int((d.keys["slc_out"][0, 0, -1] | d.keys["swa_out"][0, 0, -1]).sum())
    pat = C.Nsa(8, 4, 8, 3, 1, 2, 12, False)
    assert fl.decode_keys(pat, T) == {"cmp": cmp, "slc": slc, "swa": swa}
    w = fl.pattern_decode_work(pat, T, 4, 2, 16, n_gates=3)
    assert w.keys == cmp + slc + swa
    assert w.keys_read == cmp + max(slc, swa) <= cmp + union  # a lower bound on the union
    assert w.bytes == (4 * 2 * 16 + 3 * 4 + w.keys_read * 2 * 2 * 16) * 2


# ======================================================================= options
def test_decode_options_and_cases():
    o = options_from_args(parse("--decode"))
    assert o.decode and o.graphs and o.seqs == (8192, 16384, 32768, 65536, 131072)
    assert options_from_args(parse("--decode", "--quick")).seqs == (8192,)
    o = options_from_args(parse("--decode", "--seq", "16k,128k", "--no-graph", "--case", "moba"))
    assert (o.seqs, o.graphs, o.cases) == ((16384, 131072), False, ("moba",))
    assert options_from_args(parse()).decode is False
    cases = {c.label: c for c in C.make_cases(options_from_args(parse("--decode")))}
    assert list(cases) == ["moba decode", "nsa-fla g16 decode", "nsa g16 decode",
                           "window-sinks decode"]
    prefill = {c.label: c for c in C.make_cases(options_from_args(parse()))}
    for label, c in cases.items():  # the prefill cases' configurations, decoded
        p = prefill[label[:-len(" decode")]]
        assert c.decode and not p.decode and c.describe()["mode"] == "decode"
        assert (c.pattern, c.q_heads, c.kv_heads, c.head_dim, c.gates) == \
            (p.pattern, p.q_heads, p.kv_heads, p.head_dim, p.gates)
    # the forward's CUDA-graph timing is also on by default outside --decode
    assert options_from_args(parse()).graphs and not options_from_args(parse("--no-graph")).graphs


def test_decode_floors_only_needs_no_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run(parse("--floors-only", "--decode", "--case", "moba,nsa")) == 0
    out = capsys.readouterr().out
    assert "one decode step" in out and "moba decode" in out and "nsa g16 decode" in out
    assert "L=131072" in out and "1536 keys/query" in out  # 512 own + 2 x 512 selected
    assert run(parse("--decode", "--quick")) == 3  # and no GPU: nothing measured


def test_compare_moba_decode_counts_heads_with_other_selections():
    L, block = 20, 8
    ref = torch.zeros(1, 1, 3, 4)
    ref[0, 0, :, 0] = 1.0  # scale 1
    out = ref.clone()
    out[0, 0, 1, 1] = 0.5  # a head whose selection differs ...
    out[0, 0, 2, 1] = 0.01  # ... and one that agrees
    sel = torch.tensor([[[0], [1], [0]]], dtype=torch.int32)  # the peer's: [B, H, S]
    lists = {"sel": torch.tensor([[[[0, 2], [0, 2], [2, 0]]]], dtype=torch.int32)}  # sparsedsl
    r = D.compare_moba(ref, lists, out, sel, block, L)
    assert (r["selection_rows_differ"], r["selection_rows"]) == (1, 3)
    assert r["max_abs_err"] == 0.5 and r["max_abs_err_same_selection"] == pytest.approx(0.01)
    assert (r["rows_over_tol"], r["rows"]) == (1, 3)
    assert D.check(C.make_cases(options_from_args(parse("--decode", "--case", "moba")))[0],
                   None, "OOM") == "sparsedsl output unavailable (OOM)"


def test_time_loop_on_the_host():
    calls = []
    ms = measure.time_loop(lambda: (calls.append(1), time.sleep(0.001)), rep_ms=20,
                           sync=lambda: None, batches=2)
    assert 1.0 <= ms < 50 and len(calls) >= 4 + 2 * 3


# ============================================================ the loop, on the CPU
TINY = [
    C.Case("moba", "moba decode", "MoBA, block 8, top-3", "moba", (("block", 8), ("topk", 3)),
           C.Moba(8, 3), 4, 4, head_dim=16, peers=("flex", "flex+routing"), decode=True),
    C.Case("window-sinks", "window-sinks decode", "window 16 + 4 sinks", C.WINDOW_SINKS_SPEC,
           (("window", 16), ("sinks", 4)), C.WindowSinks(16, 4), 4, 4, head_dim=16,
           peers=("flex",), decode=True),
    C.Case("nsa-fla", "nsa-fla g2 decode", "NSA as fla, block 8, top-3", C.NSA_FLA_SPEC,
           (("block", 8), ("topn", 3)), C.Nsa(8, 8, 8, 3, 1, 2, 0, False), 4, 2, head_dim=16,
           gates=("g_cmp", "g_slc"), peers=("fla",), decode=True),
]


def _timer(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def test_the_decode_run_on_the_cpu(monkeypatch, tmp_path, capsys):
    """Every decode row is prepared, run and checked at tiny sizes; only the GPU timers (CUDA
    events, graphs, memory statistics) are replaced by one host-timed call."""
    monkeypatch.setattr(runner, "make_cases", lambda opts: TINY)
    monkeypatch.setattr(runner, "environment", lambda: {"gpu": "cpu (test)", "torch": "-",
                                                        "triton": "-", "fla": None})
    monkeypatch.setattr(measure, "time_forward", lambda p, w, r: _timer(p.fwd))
    monkeypatch.setattr(measure, "do_bench", lambda fn, w, r, grad_to_none=None: _timer(fn))
    monkeypatch.setattr(measure, "time_loop", lambda fn, r: _timer(fn))
    monkeypatch.setattr(measure, "time_graph", lambda fn, r: _timer(fn))
    monkeypatch.setattr(measure, "peak_forward", lambda p: (p.input_bytes, 0))
    out = tmp_path / "decode.json"
    png = tmp_path / "decode.png"
    opts = options_from_args(parse("--decode", "--seq", "44", "--no-ceilings", "--json", str(out),
                                   "--png", str(png)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not compiled
        code = runner._bench(opts, device="cpu")
    res = Results.from_json(json.loads(out.read_text()))
    rows = {(r.case, r.impl): r for r in res.rows}
    assert [r.seq for r in res.rows] == [44] * 13  # 5 + 4 + 4 rows
    assert code == 0, [(r.case, r.impl, r.reason) for r in res.rows if r.status != "ok"]
    for case in TINY:
        mine = rows[(case.label, "sparsedsl")]
        assert mine.status == "ok" and mine.fwd_ms > 0 and mine.fwdbwd_ms is None
        t = mine.extra["timings_ms"]
        assert {"append", "append+decode", "loop", "graph"} <= set(t), t
        assert all(isinstance(x, float) for x in t.values()), t
        notes = mine.extra["notes"]
        assert notes["splits"] == 1 and notes["cache_capacity"] >= 44
        assert rows[(case.label, "sdpa-flash")].status == "ok"
        assert rows[(case.label, "sdpa-cudnn")].status == "n/a"  # not on the CPU
        assert res.floor(case.label, 44)["mode"] == "decode"
    for peer in ("flex", "flex+routing"):  # the same output and selection as sparsedsl's step
        c = rows[("moba decode", peer)].extra["check"]
        assert c["max_abs_err"] < 2e-2 and c["rows"] == 4 and c["selection_rows_differ"] == 0, c
    assert "routing+mask" in rows[("moba decode", "flex")].extra["timings_ms"]
    c = rows[("window-sinks decode", "flex")].extra["check"]
    assert c["max_abs_err"] < 2e-2 and c["rows_over_tol"] == 0, c
    assert rows[("nsa-fla g2 decode", "fla")].status == "n/a"
    assert "no single-query decode" in rows[("nsa-fla g2 decode", "fla")].reason
    table = format_table(res)
    assert "== moba decode, L=44: MoBA, block 8, top-3; 4/4 heads" in table
    head = next(ln for ln in table.splitlines() if ln.strip().startswith("impl"))
    assert head.split()[1:9] == ["step", "ms", "loop", "ms", "graph", "ms", "held", "GiB"]
    assert "floor of one step: 20 keys/query" in table  # 40..43 and two blocks of 8
    line = next(ln for ln in table.splitlines() if ln.strip().startswith("sparsedsl"))
    assert "append+decode" in line and "flex " in line  # x peer and the append timings
    assert "selection differs in 0/4 rows" in table
    printed = capsys.readouterr()
    assert table in printed.out and "[moba decode L=44]" in printed.err
    if png.exists():  # matplotlib installed
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
