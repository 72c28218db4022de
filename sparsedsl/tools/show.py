"""`sparsedsl show`: which keys each query attends, per branch and combined.

`attention_map(...)` runs the pattern on random inputs (or given ones) and
returns, for one head, the `[T, T]` masks of real keys each branch attends
and of the tokens covered by the pooled blocks it attends. When the spec has a
top-k, the selection is the one the compiled layer's kernels make (its block
lists are fed to the dense reference, which turns them into masks); without
one, the pattern does not depend on the data and the reference alone draws it.

`render_text` draws the masks as a block grid of characters; `render_png` as
a picture (matplotlib, `pip install sparsedsl[plot]`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..ir.graph import IR
from .keysets import branches


@dataclass
class BranchMap:
    name: str
    kind: str  # tokens | pooled | union
    tokens: torch.Tensor  # bool [T, T]: real keys attended
    pooled: torch.Tensor  # bool [T, T]: tokens of the pooled blocks attended

    def density(self, causal: torch.Tensor) -> float:
        return _density(self.tokens, causal)


@dataclass
class AttentionMap:
    ir: IR
    seq: int
    heads: int
    kv_heads: int
    head: int
    seed: int
    selection: str  # "kernels" (top-k from the compiled layer) or "static"
    branches: list[BranchMap]
    combined: BranchMap
    grid: tuple[int, int] | None  # (len, stride) of the grid drawn
    density_all_heads: float = 0.0
    inputs: str = "random"
    notes: list[str] = field(default_factory=list)

    @property
    def causal(self) -> torch.Tensor:
        return torch.ones(self.seq, self.seq, dtype=torch.bool).tril()

    @property
    def title(self) -> str:
        pv = ", ".join(f"{k}={v}" for k, v in self.ir.param_values().items())
        sel = {"kernels": "selection made by the compiled kernels",
               "static": "static pattern"}[self.selection]
        return (f"{self.ir.spec_name}({pv})  T={self.seq}  head {self.head} of {self.heads}  "
                f"density {100 * self.combined.density(self.causal):.1f}%  ({sel})")

    def to_json(self) -> dict:
        c = self.causal
        return {"spec": self.ir.spec_name, "params": self.ir.param_values(), "seq": self.seq,
                "heads": self.heads, "kv_heads": self.kv_heads, "head": self.head,
                "seed": self.seed, "inputs": self.inputs, "selection": self.selection,
                "grid": list(self.grid) if self.grid else None,
                "density": self.combined.density(c),
                "density_all_heads": self.density_all_heads,
                "branches": [{"name": b.name, "kind": b.kind, "density": b.density(c),
                              "pooled_coverage": _density(b.pooled, c)}
                             for b in self.branches]}


def _density(m: torch.Tensor, causal: torch.Tensor) -> float:
    return float((m & causal).sum()) / float(causal.sum())


def attention_map(ir: IR, source_text: str, seq: int, heads: int = 1, kv_heads: int | None = None,
                  head: int = 0, seed: int = 0, head_dim: int = 16,
                  inputs: dict | None = None) -> AttentionMap:
    """Masks of one head of `ir` at sequence length `seq` (see the module doc).

    `inputs`: q, k, v (and the spec's declared inputs) to use instead of random ones."""
    from ..testing import Shape, spec_inputs
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise ValueError(f"--heads ({heads}) must be a multiple of --kv-heads ({kv_heads})")
    given = "random"
    if inputs is not None:
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        seq, heads, kv_heads, head_dim = q.shape[1], q.shape[2], k.shape[2], q.shape[3]
        given = "given"
    if not 0 <= head < heads:
        raise ValueError(f"--head must be in 0..{heads - 1}, got {head}")
    d_model = next((t.shape[-1] for n, t in (inputs or {}).items()
                    if n in ir.inputs and ir.inputs[n].role == "x"), head_dim)
    shape = Shape(batch=1, seq=seq, kv_heads=kv_heads, group=heads // kv_heads,
                  head_dim=head_dim, head_dim_v=inputs["v"].shape[3] if inputs else None,
                  d_model=d_model)
    data = spec_inputs(ir, shape, seed)
    if inputs is not None:
        data.q, data.k, data.v = (inputs[n].double() for n in ("q", "k", "v"))
        data.tensors.update({n: t.double() for n, t in inputs.items() if n in ir.inputs})
    selections = None
    if ir.nodes_with("topk"):
        selections = _kernel_selections(ir, source_text, data, shape)
    from ..reference import reference
    d = reference(ir, data.q, data.k, data.v, params=data.params, return_details=True,
                  selections=selections, **data.tensors)
    maps = [_branch_map(ir, b, d, head, seq) for b in branches(ir)]
    tok = torch.zeros(seq, seq, dtype=torch.bool)
    pooled = torch.zeros(seq, seq, dtype=torch.bool)
    for m in maps:
        tok |= m.tokens
        pooled |= m.pooled
    combined = BranchMap("combined", "all", tok, pooled)
    return AttentionMap(ir, seq, heads, kv_heads, head, seed,
                        "kernels" if selections is not None else "static", maps, combined,
                        _grid(ir), d.density, given)


def _kernel_selections(ir: IR, text: str, data, shape) -> dict:
    """The block lists the compiled kernels choose on these inputs (float32)."""
    from ..runtime.layer import SparseAttention
    layer = SparseAttention(ir, text, head_dim=shape.head_dim, q_heads=shape.q_heads,
                            head_dim_v=shape.dv, d_model=shape.d_model, seed=0)
    with torch.no_grad():
        for name, p in layer.learnable().items():
            p.copy_(data.params[name])
        _, lists = layer(data.q.float(), data.k.float(), data.v.float(), return_lists=True,
                         **{n: t.float() for n, t in data.tensors.items()})
    return {n: s.long().cpu() for n, s in lists.items()}


def _branch_map(ir: IR, b, d, head: int, T: int) -> BranchMap:
    tok = torch.zeros(T, T, dtype=torch.bool)
    label = ir.label(b.node)
    if b.token_parts:
        tok = d.keys[label][0, head].clone()
    pooled = torch.zeros(T, T, dtype=torch.bool)
    for p in b.pooled_parts:
        blocks = ir.operand(p, "blocks")
        sel = d.blocksets[ir.label(blocks)][0, head]  # [T, N]
        grid = ir.node(ir.operand(ir.operand(p, "keys"), "grid"))["args"]
        start = torch.arange(sel.shape[-1])[:, None] * grid["stride"]
        j = torch.arange(T)[None, :]
        member = (j >= start) & (j < start + grid["len"])  # [N, T]
        pooled |= (sel.double() @ member.double()) > 0
    kind = "union" if b.op == "union" else ("pooled" if b.op == "attend_pooled" else "tokens")
    return BranchMap(b.name, kind, tok, pooled)


def _grid(ir: IR) -> tuple[int, int] | None:
    """The grid to draw: that of a top-k or `tokens(...)` if any, else the first one."""
    grids = ir.nodes_with("blocks")
    if not grids:
        return None
    for op in ("topk", "tokens", "random"):
        for nid in ir.nodes_with(op):
            ref = ir.node(nid)["facts"].get("grid")
            if op == "tokens":
                ref = ir.node(ir.operand(nid, "blocks"))["facts"].get("grid")
            if ref:
                a = ir.node(int(ref[1:]))["args"]
                return a["len"], a["stride"]
    a = ir.node(grids[0])["args"]
    return a["len"], a["stride"]


# ----------------------------------------------------------------------- text
_SHADES = " .░▒▓█"
_ASCII = " .:+#@"


def tile_size(m: AttentionMap, max_cols: int = 64) -> int:
    """Tokens per character: the grid's block length when it gives at most max_cols
    columns, else the smallest size that does."""
    T = m.seq
    if m.grid and math.ceil(T / m.grid[0]) <= max_cols:
        return m.grid[0]
    return max(1, math.ceil(T / max_cols))


def render_text(m: AttentionMap, tile: int | None = None, color: bool = False,
                unicode: bool = True) -> str:
    """Each branch and the combination as a grid of characters, one per tile of
    `tile` queries x `tile` keys: blank above the diagonal (no causal pair), `.` for
    nothing attended, then darker the larger the attended share of the tile's causal
    pairs, full when all are; `o` marks pooled keys (a tile of pooled blocks only)."""
    tile = tile or tile_size(m)
    shades = _SHADES if unicode else _ASCII
    out = [m.title, f"one character: {tile} queries x {tile} keys "
                    f"(`o`: pooled blocks attended; blank: no causal pair)"]
    panels = m.branches + [m.combined] if len(m.branches) > 1 else m.branches
    c = m.causal
    for b in panels:
        kind = b.kind if b.name != "combined" else "all branches"
        out.append("")
        out.append(f"{b.name} ({kind}): density {100 * b.density(c):.1f}%")
        out.extend(_grid_rows(b, c, tile, shades, color))
    return "\n".join(out) + "\n"


def _grid_rows(b: BranchMap, causal, tile: int, shades: str, color: bool) -> list[str]:
    T = causal.shape[0]
    n = math.ceil(T / tile)
    pad = n * tile - T

    def pool(x):
        x = torch.nn.functional.pad(x.double(), (0, pad, 0, pad))
        return x.view(n, tile, n, tile).sum((1, 3))

    ncausal = pool(causal)
    frac = pool(b.tokens & causal) / ncausal.clamp(min=1)
    pooled = pool(b.pooled & causal) > 0
    rows = []
    for r in range(n):
        line = []
        for col in range(n):
            if ncausal[r, col] == 0:
                ch = " "
            elif frac[r, col] > 0:
                f = float(frac[r, col])
                ch = shades[-1] if f >= 1 else shades[2 + min(int(f * 3), 2)]
                if color:
                    ch = f"\x1b[34m{ch}\x1b[0m"
            elif pooled[r, col]:
                ch = "\x1b[33mo\x1b[0m" if color else "o"
            else:
                ch = shades[1]
            line.append(ch)
        rows.append(f"{r * tile:>6} |" + "".join(line).rstrip())
    return rows


# ------------------------------------------------------------------------ PNG
def render_png(m: AttentionMap, path: str | Path, dpi: int = 110) -> None:
    """A picture: one panel per branch and one for the combination when there are several;
    real keys dark, tokens of pooled blocks orange, the causal triangle light grey, the
    block grid drawn as thin lines."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("drawing a PNG needs matplotlib: pip install 'sparsedsl[plot]'") \
            from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = m.branches + [m.combined] if len(m.branches) > 1 else m.branches
    c = m.causal.numpy()
    import textwrap
    pv = ", ".join(f"{k}={v}" for k, v in m.ir.param_values().items())
    sel = "selection: the compiled kernels'" if m.selection == "kernels" else "static pattern"
    line = (f"{m.ir.spec_name}({pv}); T={m.seq}, head {m.head} of {m.heads}, "
            f"density {100 * m.combined.density(m.causal):.1f}%, {sel}")
    width = 3.4 * len(panels) + 0.4
    title = textwrap.fill(line, width=int(13 * width))
    height = 3.9 + 0.2 * (title.count("\n") + 1)
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False,
                             layout="constrained")
    T = m.seq
    for ax, b in zip(axes[0], panels):
        img = np.ones((T, T, 3))
        img[c] = (0.93, 0.93, 0.93)
        pooled = b.pooled.numpy() & c
        img[pooled] = (0.99, 0.71, 0.38)
        img[b.tokens.numpy() & c] = (0.12, 0.25, 0.55)
        ax.imshow(img, interpolation="nearest" if T <= 512 else "antialiased",
                  extent=(0, T, T, 0))
        if m.grid and T / m.grid[1] <= 96:
            L, S = m.grid
            for x in range(S, T, S):
                ax.axvline(x, color="white", lw=0.5)
                ax.axhline(x, color="white", lw=0.5)
        kind = "" if b.name == "combined" else f" ({b.kind})"
        if b.kind == "pooled":
            what = f"pooled blocks cover {100 * _density(b.pooled, m.causal):.1f}%"
        else:
            what = f"density {100 * b.density(m.causal):.1f}%"
        ax.set_title(f"{b.name}{kind}\n{what}", fontsize=9)
        ax.set_xlabel("key position", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("query position", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=dpi, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
