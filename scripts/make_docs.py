"""`make docs`: regenerate docs/gallery.md and its pictures from examples/*.attn.

Every example gets a picture (`sparsedsl show`, at a small size with its block
and window parameters scaled down so the structure is visible; top-k patterns
show the compiled kernels' own selection) and a cost table (`sparsedsl cost`
at the example's own parameters and a long sequence). The output depends only
on the code and the examples, so rerunning gives the same files; the gallery
cannot drift from the code as long as it is regenerated with it.

    python scripts/make_docs.py [--only NAME ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparsedsl import lower  # noqa: E402
from sparsedsl.frontend.load import load_source  # noqa: E402
from sparsedsl.tools.cost import Dims, cost  # noqa: E402
from sparsedsl.tools.show import attention_map, render_png  # noqa: E402

DOCS = ROOT / "docs"
IMG = DOCS / "img"

# the picture of each example: sequence length and parameters scaled down to it
PICTURES: dict[str, tuple[int, dict]] = {
    "bigbird": (128, dict(block=8, random_blocks=2, window_blocks=2, global_blocks=1)),
    "dense_causal": (64, {}),
    "dilated": (96, dict(window=8, dilation=3)),
    "longformer": (128, dict(window=16, globals=8)),
    "moba": (128, dict(block=16, topk=3)),
    "moba_window_sinks": (128, dict(block=16, topk=2, sinks=4, window=16)),
    "nsa": (128, dict(cmp_len=16, cmp_stride=8, sel_len=16, topn=4, window=32)),
    "sliding_window": (96, dict(window=16)),
    "sparse_transformer_strided": (96, dict(stride=8)),
    "streaming_llm": (96, dict(sinks=4, window=16)),
}
DEFAULT_PICTURE = (128, {})  # an example this table does not know yet: its own parameters

SEQ = 32768
DIMS = Dims(batch=1, heads=16, kv_heads=1, head_dim=128, head_dim_v=128, d_model=2048)


def _num(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


def _sets(params: dict) -> str:
    return "".join(f" --set {k}={v}" for k, v in params.items())


def example_section(path: Path) -> tuple[str, list]:
    name = path.stem
    source = load_source(path)
    ir = lower(source)
    seq, small = PICTURES.get(name, DEFAULT_PICTURE)
    small_ir = lower(source, small)
    img = IMG / f"{name}.png"
    print(f"  {name}: picture at T={seq}", flush=True)
    m = attention_map(small_ir, source.text, seq, heads=1, seed=0)
    render_png(m, img)
    print(f"  {name}: cost at N={SEQ}", flush=True)
    c = cost(ir, SEQ, DIMS)
    rel = f"examples/{path.name}"
    lines = [f"## `{rel}`", "", f"**{ir.doc or name}.** {_summary(source.text)}", ""]
    lines += [f"![{name}](img/{name}.png)", "",
              f"`sparsedsl show {rel} --seq {seq}{_sets(small)} --out {name}.png` "
              f"(density {100 * m.combined.density(m.causal):.1f}% of the causal pairs; "
              + ("the top-k is the compiled kernels' selection on random inputs)"
                 if m.selection == "kernels" else "a static pattern)"), ""]
    pv = ", ".join(f"{k}={v}" for k, v in ir.param_values().items())
    lines += [f"Cost at its own parameters ({pv or 'none'}), N = {SEQ:,}: "
              f"`sparsedsl cost {rel} --seq {SEQ} --heads {DIMS.heads} "
              f"--kv-heads {DIMS.kv_heads} --head-dim {DIMS.head_dim}`", "",
              "| branch | kind | keys, last query (tokens + pooled) | keys, average query |",
              "|---|---|---:|---:|"]
    for b in c.branches:
        lines.append(f"| `{b.name}` | {b.kind} | {_num(b.last_tokens)} + {_num(b.last_pooled)}"
                     f" | {_num(round(b.mean, 1))} |")
    lines.append(f"| **total** | | **{_num(c.last_total)}** (N / total = "
                 f"{c.seq / c.last_total:.2f}) | **{_num(round(c.mean_total, 1))}** |")
    lines.append(f"| dense causal | | {_num(c.dense_last)} | {_num(c.dense_mean)} |")
    lines += ["", f"FLOPs per forward: {_si(c.flops['total'])} against {_si(c.dense_flops)} "
              f"dense ({c.dense_flops / c.flops['total']:.2f}x fewer); bytes: "
              f"{_si(c.bytes['total'])}B against {_si(c.dense_bytes)}B "
              f"({c.dense_bytes / c.bytes['total']:.2f}x fewer)."]
    lines += [f"Note: {n}." for n in c.notes]
    row = [f"[`{name}`](#examples{path.stem}attn)", _num(c.last_total),
           f"{c.seq / c.last_total:.1f}", f"{c.dense_flops / c.flops['total']:.1f}x",
           f"{c.dense_bytes / c.bytes['total']:.1f}x"]
    return "\n".join(lines) + "\n", row


def _si(x: float) -> str:
    from sparsedsl.tools.term import si
    return si(x).replace(" ", "\u00a0")


def _summary(text: str) -> str:
    """The first sentence of the example's header comment."""
    words = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        words += line.lstrip("#").split()
    sentence = " ".join(words)
    end = sentence.find(". ")
    return sentence if end < 0 else sentence[: end + 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="regenerate these pictures only (no gallery.md)")
    args = ap.parse_args()
    IMG.mkdir(parents=True, exist_ok=True)
    examples = sorted((ROOT / "examples").glob("*.attn"))
    if args.only:
        examples = [p for p in examples if p.stem in args.only]
    sections, rows = [], []
    for path in examples:
        text, row = example_section(path)
        sections.append(text)
        rows.append(row)
    if args.only:
        return
    head = f"""# Gallery

Every example in `examples/`: what its queries attend and what it costs.
Generated by `make docs` (`scripts/make_docs.py`) from the examples and the
code; do not edit by hand.

* **Pictures** (`sparsedsl show`): rows are queries, columns keys; dark:
  real keys attended; orange: the tokens of pooled blocks attended (one
  pooled key per block); grey: causal pairs not attended; white lines: the
  block grid. Drawn at a small size (parameters scaled down, given under each
  picture) for head 0 of random inputs; a top-k shows the selection the
  compiled kernels made.
* **Costs** (`sparsedsl cost`): at each example's own parameters, N =
  {SEQ:,} tokens, {DIMS.heads} query heads, {DIMS.kv_heads} kv head, head dim
  {DIMS.head_dim}, bfloat16, batch 1; counted exactly from the IR (a top-k
  structurally: `k` blocks, the forced ones included, as many as exist).
  FLOPs and bytes of one forward pass against dense causal attention on the
  same model (see `sparsedsl/tools/cost.py`: every query loads the keys it
  attends, a GQA group once when its heads share the key set). So a pattern
  whose selection is made per query head, like MoBA's, loads each head's keys
  separately and can move more bytes than dense attention at 16 query heads
  per kv head, though it computes far less: the reason NSA shares one
  selection across a GQA group (`groupsum`).

| example | keys, last query | N / keys | FLOPs: dense / sparse | bytes: dense / sparse |
|---|---:|---:|---:|---:|
"""
    table = "\n".join("| " + " | ".join(r) + " |" for r in rows)
    (DOCS / "gallery.md").write_text(head + table + "\n\n" + "\n".join(sections))
    print(f"wrote {DOCS / 'gallery.md'} and {len(rows)} pictures in {IMG}")


if __name__ == "__main__":
    main()
