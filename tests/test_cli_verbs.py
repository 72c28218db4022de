"""The tool verbs through the CLI entry point: `cost`, `show`, `fuzz`, `fmt --check`.

`cost` is checked against counts computed here by other code: the dense
reference's masks for static patterns (examples and generated specs), and
closed forms of the MoBA and NSA papers' configurations. `fuzz` must find a
bug planted in the reference and write a reproducer.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsedsl
from sparsedsl.cli import main
from sparsedsl.testing import Shape, spec_inputs
from sparsedsl.testing.strategies import specs
from sparsedsl.tools.keysets import branches, count_keys

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------ independent key counts
def reference_counts(ir, T: int, seed: int = 0) -> dict[str, tuple[list, list]]:
    """Per branch and query, the real and pooled keys the dense reference's masks hold
    (head 0 of 2; static patterns are the same on every head)."""
    data = spec_inputs(ir, Shape(batch=1, seq=T, kv_heads=1, group=2, head_dim=4, d_model=4),
                       seed)
    d = data.reference(ir, return_details=True)
    out = {}
    for b in branches(ir):
        label = ir.label(b.node)
        tok = d.keys[label][0, 0].sum(-1).tolist() if b.token_parts else [0] * T
        pooled = [0] * T
        for p in b.pooled_parts:
            sel = d.blocksets[ir.label(ir.operand(p, "blocks"))][0, 0]
            pooled = [x + int(y) for x, y in zip(pooled, sel.sum(-1).tolist())]
        out[b.name] = (tok, pooled)
    return out


STATIC_EXAMPLES = {
    "dense_causal": {},
    "sliding_window": {"window": 5},
    "streaming_llm": {"window": 6, "sinks": 3},
    "sparse_transformer_strided": {"stride": 4},
    "dilated": {"window": 5, "dilation": 3},
    "longformer": {"window": 5, "globals": 3},
    "bigbird": {"block": 4, "random_blocks": 2, "window_blocks": 2, "global_blocks": 1},
}


@pytest.mark.parametrize("name", list(STATIC_EXAMPLES))
def test_cost_counts_equal_reference_masks(name):
    ir = sparsedsl.lower(EXAMPLES / f"{name}.attn", STATIC_EXAMPLES[name])
    T = 45
    mine = count_keys(ir, T)
    for bname, (tok, pooled) in reference_counts(ir, T).items():
        assert mine.tokens[bname] == tok, bname
        assert mine.pooled[bname] == pooled, bname


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=specs(exclude={"topk", "union"}), T=st.integers(1, 30))
def test_cost_counts_equal_reference_masks_generated(spec, T):
    """Static generated specs (no top-k: those depend on data; no union: the reference's
    known issue with nested unions): every branch, every query."""
    ir = sparsedsl.lower(sparsedsl.format_spec(spec))
    mine = count_keys(ir, T)
    for bname, (tok, pooled) in reference_counts(ir, T).items():
        assert mine.tokens[bname] == tok, bname
        assert mine.pooled[bname] == pooled, bname


def moba_keys(i: int, block: int, topk: int) -> int:
    """MoBA (Lu et al., 2025): the query's own block up to the query, and topk - 1 earlier
    blocks when that many exist."""
    c = i // block
    return min(topk - 1, c) * block + (i - c * block) + 1


@pytest.mark.parametrize("T,block,topk", [(8192, 512, 3), (1000, 64, 4), (77, 16, 3)])
def test_cost_moba_closed_form(capsys, T, block, topk):
    code, out, err = run(capsys, "cost", "moba", "--seq", T, "--set", f"block={block}",
                         "--set", f"topk={topk}", "--heads", 4, "--kv-heads", 2,
                         "--head-dim", 64, "--json")
    assert code == 0, err
    c = json.loads(out)
    keys = [moba_keys(i, block, topk) for i in range(T)]
    (br,) = c["branches"]
    assert (br["last_tokens"], br["last_pooled"]) == (keys[-1], 0)
    assert br["mean_tokens"] == pytest.approx(sum(keys) / T, rel=1e-12)
    assert c["last_total"] == keys[-1] and c["dense_last"] == T
    assert c["ratio_last"] == pytest.approx(T / keys[-1])
    # 4 query heads, q.k and p.v over 64 dims each
    assert c["flops"]["attention"] == sum(keys) * 4 * 2 * 128
    assert c["dense_flops"] == T * (T + 1) // 2 * 4 * 2 * 128
    # every query scores the blocks before its own (the free candidates)
    assert c["flops"]["scores"] == sum(i // block for i in range(T)) * 4 * 2 * 64
    # MoBA selects per query head: each head loads its own keys; dense shares the kv head
    assert c["bytes"]["kv"] == sum(keys) * 4 * 128 * 2
    assert c["dense_bytes"] == 2 * (T * 4 * 128 + T * (T + 1) // 2 * 2 * 128)


def nsa_keys(i: int, cmp_len=32, cmp_stride=16, sel_len=64, topn=16, init=1, local=2,
             window=512) -> tuple[int, int, int]:
    """NSA (Yuan et al., 2025) per query: compressed blocks of Eq. 7
    (0 <= n <= floor((t - l) / d), t = i + 1 tokens seen), selected tokens of Eq. 11-12
    (the initial and local blocks, then the best past blocks up to n blocks), window."""
    t = i + 1
    cmp = (t - cmp_len) // cmp_stride + 1 if t >= cmp_len else 0
    c = i // sel_len
    forced = set(range(min(init, c + 1))) | set(range(max(c - local + 1, 0), c + 1))
    past = (i + 1) // sel_len  # blocks wholly at or before i
    free = past - len([b for b in forced if b < past])
    picks = min(max(topn - len(forced), 0), free)
    slc = sum(sel_len if b < c else i - c * sel_len + 1 for b in forced) + picks * sel_len
    return cmp, slc, min(window, t)


def test_cost_nsa_paper_defaults_at_64k():
    ir = sparsedsl.lower("nsa")
    T = 65536
    kc = count_keys(ir, T, queries=[T - 1])
    cmp, slc, swa = nsa_keys(T - 1)
    assert (cmp, slc, swa) == (4095, 1024, 512)  # the paper's sizes at 64k
    assert kc.pooled["cmp_out"] == [cmp] and kc.tokens["cmp_out"] == [0]
    assert kc.tokens["slc_out"] == [slc] and kc.tokens["swa_out"] == [swa]


@pytest.mark.parametrize("T,params", [
    (3000, {}),
    (700, dict(cmp_len=16, cmp_stride=8, sel_len=32, topn=5, init_blocks=2, local_blocks=3,
               window=100)),
])
def test_cost_nsa_closed_form(capsys, T, params):
    argv = ["cost", "nsa", "--seq", T, "--heads", 16, "--kv-heads", 2, "--head-dim", 32,
            "--json"]
    for k, v in params.items():
        argv += ["--set", f"{k}={v}"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    c = json.loads(out)
    kw = {("init" if k == "init_blocks" else "local" if k == "local_blocks" else k): v
          for k, v in params.items()}
    keys = [nsa_keys(i, **kw) for i in range(T)]
    by = {b["name"]: b for b in c["branches"]}
    for k, name, field in ((0, "cmp_out", "pooled"), (1, "slc_out", "tokens"),
                           (2, "swa_out", "tokens")):
        assert by[name][f"last_{field}"] == keys[-1][k], name
        assert by[name][f"mean_{field}"] == pytest.approx(sum(x[k] for x in keys) / T), name
    total = [sum(x) for x in keys]
    assert c["last_total"] == total[-1]
    assert c["mean_total"] == pytest.approx(sum(total) / T)
    assert c["flops"]["attention"] == sum(total) * 16 * 2 * 64
    # every branch's key set is shared by the GQA group (static, or `groupsum`)
    assert c["bytes"]["kv"] == sum(total) * 2 * 64 * 2


def test_cost_text_output(capsys):
    code, out, err = run(capsys, "cost", "nsa", "--seq", 4096)
    assert code == 0 and err == ""
    assert "\x1b[" not in out  # plain when not a terminal
    lines = out.splitlines()
    assert lines[0].startswith("nsa(cmp=mlp, cmp_len=32, ") and "N = 4,096" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines if line.strip()}
    last = [nsa_keys(4095)[k] for k in range(3)]
    assert rows["cmp_out"][1:5] == ["pooled", "0", f"{last[0]:,}", f"{last[0]:,}"]
    assert rows["slc_out"][1:5] == ["tokens", f"{last[1]:,}", "0", f"{last[1]:,}"]
    assert rows["total"][1] == f"{sum(last):,}"
    assert any(line.startswith("N / total") for line in lines)
    assert rows["FLOPs"][-1].endswith("x") and rows["bytes"][-1].endswith("x")
    assert any("top-k `sel`" in line and "structurally" in line for line in lines)


def test_cost_errors(capsys):
    code, _, err = run(capsys, "cost", "moba", "--seq", 0)
    assert code == 1 and err.startswith("error: --seq must be at least 1")
    code, _, err = run(capsys, "cost", "moba", "--seq", 64, "--heads", 3, "--kv-heads", 2)
    assert code == 1 and "multiple of --kv-heads" in err
    code, _, err = run(capsys, "cost", "moba", "--seq", 64, "--set", "block=0")
    assert code == 1 and "must be >= 1" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ show
def test_show_text_static(capsys):
    code, out, err = run(capsys, "show", EXAMPLES / "sliding_window.attn", "--seq", 40,
                         "--set", "window=8", "--tile", 4)
    assert code == 0 and err == ""
    assert "\x1b[" not in out
    lines = out.splitlines()
    assert lines[0].startswith("sliding_window(window=8)  T=40  head 0 of 1  density ")
    grid = [line for line in lines if "|" in line]
    assert len(grid) == 10
    assert grid[0] == "     0 |█" and grid[1] == "     4 |██"
    # a window of 8 at tiles of 4: the diagonal tile and the one before are full, the
    # one before that partly attended, the rest empty
    assert grid[9] == "    36 |" + "." * 7 + "▒██"


def test_show_json_density_equals_reference(capsys):
    spec = EXAMPLES / "streaming_llm.attn"
    code, out, err = run(capsys, "show", spec, "--seq", 30, "--set", "window=5",
                         "--set", "sinks=2", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["selection"] == "static" and d["seq"] == 30
    ir = sparsedsl.lower(spec, {"window": 5, "sinks": 2})
    mask = torch.tensor([[j <= i and (j < 2 or i - j < 5) for j in range(30)]
                         for i in range(30)])
    assert d["density"] == pytest.approx(float(mask.sum()) / (30 * 31 / 2))
    assert d["branches"][0]["name"] == "out" and ir.spec_name == d["spec"]


def test_show_png_uses_the_kernels_selection(capsys, tmp_path, monkeypatch):
    """The picture of a top-k pattern shows the blocks the compiled layer selected: make the
    layer report a selection the reference would not make (block 0 and the query's own)
    and look for it in the masks."""
    from sparsedsl.runtime.layer import SparseAttention
    forward = SparseAttention.forward

    def fake_lists(self, q, k, v, return_lists=False, **inputs):
        out, lists = forward(self, q, k, v, return_lists=True, **inputs)
        (name, idx), = lists.items()
        T = q.shape[1]
        c = torch.arange(T) // 4
        fake = torch.stack([torch.zeros_like(c), c], -1)  # blocks 0 and c(i), c(i) may be 0
        fake[:, 1] = torch.where(c == 0, -1, c)
        lists = {name: fake[None, :, None, :].expand(idx.shape[0], T, idx.shape[2], 2)
                 .to(idx.dtype).contiguous()}
        return (out, lists) if return_lists else out

    monkeypatch.setattr(SparseAttention, "forward", fake_lists)
    from sparsedsl.frontend.load import load_source
    from sparsedsl.tools.show import attention_map
    ir = sparsedsl.lower("moba", {"block": 4, "topk": 3})
    m = attention_map(ir, load_source("moba").text, 16)
    assert m.selection == "kernels"
    want = torch.tensor([[j <= i and (j < 4 or j // 4 == i // 4) for j in range(16)]
                         for i in range(16)])
    assert torch.equal(m.branches[0].tokens, want)

    png = tmp_path / "moba.png"
    code, out, err = run(capsys, "show", "moba", "--set", "block=4", "--seq", 16, "--heads", 2,
                         "--out", png)
    assert code == 0, err
    assert out.startswith(f"{png}: moba(block=4, topk=3)  T=16  head 0 of 2  density ")
    assert "selection made by the compiled kernels" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_show_errors(capsys):
    code, _, err = run(capsys, "show", "moba", "--seq", 16, "--head", 3, "--heads", 2)
    assert code == 1 and err.startswith("error: --head must be in 0..1, got 3")
    code, _, err = run(capsys, "show", "nosuch", "--seq", 16)
    assert code == 1 and "neither a .attn file nor a built-in spec" in err
    with pytest.raises(SystemExit) as e:  # --seq is required: argparse's usage error
        main(["show", "moba"])
    assert e.value.code == 2


# ------------------------------------------------------------------------------ fuzz
def test_fuzz_passes(capsys, tmp_path):
    code, out, err = run(capsys, "fuzz", "--examples", 1, "--seed", 0, "--out-dir", tmp_path,
                         "--json")
    assert code == 0, out + err
    d = json.loads(out)
    assert d["examples"] == 1 and d["failure"] is None and d["seed"] == 0
    assert d["checked"] == "outputs and gradients"
    assert list(tmp_path.iterdir()) == []


def test_fuzz_finds_a_planted_bug(capsys, tmp_path, monkeypatch):
    """A reference that is wrong on purpose (probabilities 1% too large): fuzz must report a
    failure, write the shrunk spec and a command that reproduces it."""
    evaluate = importlib.import_module("sparsedsl.reference.evaluate")
    softmax = evaluate._softmax_rows

    def broken(logits, mask):
        p, masked = softmax(logits, mask)
        return p * 1.01, masked

    monkeypatch.setattr(evaluate, "_softmax_rows", broken)
    code, out, err = run(capsys, "fuzz", "--examples", 3, "--seed", 1, "--out-dir", tmp_path)
    assert code == 1, out + err
    assert out.startswith("FAIL  after 1 generated specs (seed 1): outputs: error ")
    (path,) = tmp_path.glob("fuzz-failure-*.attn")
    assert f"written to {path}" in out
    command = f"sparsedsl fuzz --replay {path}"
    assert f"reproduce with: {command}" in out
    text = path.read_text()
    assert text.startswith("# found by sparsedsl fuzz: outputs: error ")
    assert "\n# shape: 1 1 1 1 " in text  # shrunk to one token
    assert text.endswith("out = attend(causal)\n")
    # the command reproduces it while the bug is there, and passes once it is fixed
    code, out, _ = run(capsys, *command.split()[1:])
    assert code == 1 and out.startswith(f"FAIL  {path}")
    monkeypatch.setattr(evaluate, "_softmax_rows", softmax)
    code, out, _ = run(capsys, *command.split()[1:])
    assert code == 0 and out.startswith(f"ok  {path}")


def test_fuzz_arguments(capsys):
    code, _, err = run(capsys, "fuzz", "--examples", 2, "--minutes", 1)
    assert code == 1 and err.strip() == "error: give --examples or --minutes, not both"
    code, _, err = run(capsys, "fuzz", "--examples", 0)
    assert code == 1 and "--examples must be at least 1" in err


# ------------------------------------------------------------------------------- fmt
def test_fmt_check_several_and_json(capsys, tmp_path):
    good = tmp_path / "good.attn"
    good.write_text("pattern g\n\nout = attend(causal)\n")
    bad = tmp_path / "bad.attn"
    bad.write_text("pattern b\nout=attend( causal )\n")
    code, out, err = run(capsys, "fmt", "--check", good, bad, "moba")
    assert code == 1
    assert out.splitlines() == [f"{good}: canonical", "<builtin moba>: canonical"]
    assert err.strip() == f"{bad}: not in canonical form (run `sparsedsl fmt {bad}`)"
    code, out, _ = run(capsys, "fmt", "--check", "--json", good, bad)
    assert code == 1
    assert [(r["spec"], r["canonical"]) for r in json.loads(out)] == [(str(good), True),
                                                                      (str(bad), False)]
    code, out, _ = run(capsys, "fmt", "--json", bad)
    assert code == 0 and json.loads(out)["text"] == "pattern b\n\nout = attend(causal)\n"
    code, _, err = run(capsys, "fmt", good, bad)
    assert code == 1 and "use `--check` to check several" in err


# ------------------------------------------------------------------------------ docs
def test_gallery_lists_every_example():
    """docs/gallery.md is generated (`make docs`); it must cover every example and its
    pictures must exist."""
    gallery = (ROOT / "docs" / "gallery.md").read_text()
    for path in sorted(EXAMPLES.glob("*.attn")):
        assert f"`examples/{path.name}`" in gallery, path.name
    import re
    for img in re.findall(r"\]\((img/[^)]+\.png)\)", gallery):
        assert (ROOT / "docs" / img).stat().st_size > 1000, img
