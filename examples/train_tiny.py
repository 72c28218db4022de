"""Train a tiny causal language model whose attention is a compiled `.attn` spec.

    python examples/train_tiny.py SPEC [--set NAME=VALUE ...] [--steps N] [--seq T]
        [--d-model D] [--heads H] [--kv-heads HK] [--layers L] [--batch B] [--lr LR]
        [--pairs P] [--queries Q] [--layout contiguous|scattered] [--vocab V] [--seed S] [--device cpu|cuda] [--dtype float32|bfloat16]
        [--size auto|gpu|cpu] [--out DIR] [--json FILE] [--log-every N]
        [--[no-]curriculum] [--start-seq N] [--[no-]shift] [--pos sinusoidal|learned]
    python examples/train_tiny.py --compare RUN.json ... [--out DIR]

SPEC is a `.attn` file, spec text or a built-in name (`moba`, `nsa`). Every attention
layer of the model is `sparsedsl.compile(SPEC, ...)`: its generated Triton kernels run the
forward and the backward pass (natively on a CUDA GPU, in Triton's interpreter on the CPU).

The task is multi-query associative recall (MQAR, Arora et al., 2023) over a long context.
A sequence of length T holds P key/value token pairs `k1 v1 k2 v2 ... kP vP` as one run at a
random even offset in its first half (`--layout scattered`: at separate random places
instead), random filler tokens everywhere else, and Q queries in its last quarter, each a
marker `?` followed by one of the stored keys; the last position is always a query:

    f f k1 v1 k2 v2 ... kP vP f f f ... f ? kj f f ? ki f f ... f f ? kl
                                              ^ vj      ^ vi            ^ vl   (the answers)

The loss and the accuracy count only the answers (the predictions at the query keys). Every
query lies at least T/4 positions after the pairs, outside any local window, so a sparse
pattern solves the task only if its block selection finds the block holding the queried
pair (MoBA's router: the query against each block's mean key; NSA's: the compression
branch's attention). Keys, values and filler come from disjoint parts of the vocabulary.
Many queries per sequence give the selection many signals per step; with a single query at
the end (`--queries 1`) the sparse patterns learned far more slowly in our runs.

The model: token embedding plus an absolute position code (fixed sinusoids by default, or
learned; no rotary), L pre-norm blocks (q, k, v projections -> the compiled layer -> output
projection; MLP), a final norm and the LM head. Two things make it learn in a few hundred
steps instead of thousands:
  * token shift (`--shift`, on by default): each position also adds an embedding of the
    token before it (RWKV's token shift; the "smeared keys" of Olsson et al., 2022), so a
    value's position already knows its key and retrieval is one attention hop. Without it,
    the model must first grow a previous-token head from the single answer's gradient.
  * a sequence-length curriculum (`--curriculum`, on by default): training starts at
    `--start-seq` tokens (64) and the length doubles each time the accuracy over the last
    20 steps reaches 90% (the full length comes by 3/4 of the steps at the latest). From
    scratch at T = 2048 the answer's gradient reaches the pairs through attention spread
    over 2048 positions and learning barely starts in a thousand steps. At short lengths
    every block is visible; at full length the sparse patterns have to select the block
    with the pair themselves. `steps_to_90` counts only steps at the full length.

Sizes: `--size auto` (the default) picks the GPU size on a CUDA device (T = 2048, a few
minutes per spec on an H100) and a tiny CPU size otherwise (the interpreter runs every Triton
program in Python). Any flag given overrides the size's default. Spec parameters that set
sizes (MoBA's `block`, `topk`; NSA's `cmp_len`, `cmp_stride`, `sel_len`, `topn`,
`init_blocks`, `local_blocks`, `window`) are scaled to the sequence length unless given with
`--set`, so the sparse patterns select among several blocks (T = 2048: MoBA 16 blocks of
128, top 3 with its own; NSA 32 selection blocks of 64, top 6 with the first and the 2 most
recent, window 128).

Outputs: the loss and accuracy of every step (a one-line progress display on a terminal,
plain lines every `--log-every` steps otherwise), `<out>/<pattern>.png` with the loss and
accuracy curves and, with `--json FILE`, a summary (keys: `JSON_KEYS`): spec, parameters,
steps, final loss, accuracy over the last 20 steps, steps to 90% accuracy at full length,
wall time, device, and the per-step curves. Each step's batch is fresh data scored before
the update, so its accuracy is a held-out estimate. `--compare` plots several summaries
together (`<out>/compare.png`) and prints a table.

`--seed` fixes the weights and the data: on the CPU runs repeat exactly; on a GPU the
backward kernels add into shared key gradients atomically, so runs agree only closely.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

# A size's defaults: flags that are not given take these.
SIZES = {
    # On one H100 shared by several runs (2026-11-23): 2000 steps took 3m01s (dense
    # causal), 3m09s (MoBA) and 8m28s (NSA), the curriculum's short steps included.
    "gpu": dict(steps=2000, seq=2048, d_model=256, heads=4, kv_heads=2, layers=2, batch=32,
                lr=1e-3, pairs=8, queries=16, vocab=64, dtype="bfloat16"),
    # Triton's interpreter runs every kernel program in Python (MoBA: about 50 ms per query
    # position, head and layer for forward and backward; NSA about three times that), so
    # keep it tiny: minutes, not hours. In 10 steps the loss falls from log(vocab) towards
    # log(#values) (the answers' distribution); recall itself needs the GPU size.
    "cpu": dict(steps=10, seq=32, d_model=32, heads=1, kv_heads=1, layers=2, batch=4,
                lr=1e-2, pairs=4, queries=4, vocab=32, dtype="float32"),
}
# The GPU size's learning rate for patterns that train less steadily at the default: NSA
# reached 97% at lr 1e-3 and then fell back after loss spikes; at 5e-4 it held about 80%.
GPU_LR = {"nsa": 5e-4}
LAST_N = 20  # the accuracy (and loss) reported "over the last steps" averages this many
TARGET_ACC = 0.9
JSON_KEYS = ("spec", "pattern", "spec_params", "params", "steps", "final_loss", "final_acc",
             "last_n", "loss_last_n", "acc_last_n", "steps_to_90", "full_length_from",
             "chance_acc", "wall_time_s", "step_time_s", "device", "device_name", "dtype", "png",
             "history")


# ---------------------------------------------------------------------------- the task
class Task:
    """Token ids: 0 is the query marker, then keys, values and filler, disjoint."""

    def __init__(self, vocab: int, seq: int, pairs: int, layout: str = "contiguous",
                 queries: int = 1):
        self.vocab, self.seq, self.pairs, self.layout = vocab, seq, pairs, layout
        self.queries = queries
        self.n_keys = self.n_values = (self.vocab - 1) // 3
        self.key0, self.value0 = 1, 1 + self.n_keys
        self.filler0 = self.value0 + self.n_values
        self.n_filler = self.vocab - self.filler0
        if self.n_keys < 2 or self.n_filler < 1:
            raise ValueError(f"--vocab {self.vocab} is too small: it needs a marker and at least "
                             "2 keys, 2 values and a filler token (vocab >= 7)")
        if self.pairs < 1 or self.pairs > self.n_keys:
            raise ValueError(f"--pairs must be in 1..{self.n_keys} (the keys of vocab "
                             f"{self.vocab}), got {self.pairs}")
        if 2 * self.pairs > self.seq // 2:
            raise ValueError(f"--pairs {self.pairs} do not fit in the first half of --seq "
                             f"{self.seq}: need 4 * pairs <= seq")
        if self.queries < 1:
            raise ValueError(f"--queries must be at least 1, got {self.queries}")
        if self.seq < 8:
            raise ValueError(f"--seq must be at least 8, got {self.seq}")

    def n_queries(self, seq: int) -> int:
        """Queries per sequence at length `seq`: two-token slots of the last quarter."""
        return max(1, min(self.queries, seq // 8))

    def batch(self, batch: int, g: torch.Generator, seq: int | None = None):
        """tokens [batch, seq], the query positions [batch, Q] (each holds a stored key, after
        a marker) and the answers [batch, Q] (the value stored with that key)."""
        B, T, P = batch, seq or self.seq, self.pairs
        Q = self.n_queries(T)
        tokens = self.filler0 + torch.randint(self.n_filler, (B, T), generator=g)
        keys = self.key0 + torch.rand(B, self.n_keys, generator=g).argsort(1)[:, :P]
        values = self.value0 + torch.randint(self.n_values, (B, P), generator=g)
        if self.layout == "contiguous":
            # one run `k1 v1 ... kP vP` at an even offset
            offset = 2 * torch.randint((T // 2 - 2 * P) // 2 + 1, (B, 1), generator=g)
            pos = offset + 2 * torch.arange(P)  # [B, P]
        else:
            # P distinct two-token slots at even positions of the first half
            slots = torch.rand(B, T // 4, generator=g).argsort(1)[:, :P]
            pos = 2 * slots  # [B, P]
        # even positions: a pair never straddles a block boundary of an even block size
        tokens.scatter_(1, pos, keys)
        tokens.scatter_(1, pos + 1, values)
        # queries: Q distinct two-token slots `? kj` of the last quarter, the last slot always
        n_slots = T // 8  # slots 2s, 2s + 1 for s in [3T/8, T/2)
        first = T // 2 - n_slots
        others = torch.rand(B, n_slots - 1, generator=g).argsort(1)[:, : Q - 1]
        slots = torch.cat([torch.full((B, 1), T // 2 - 1), first + others], 1)  # [B, Q]
        qpos = 2 * slots + 1 + (T % 2)  # the key's position; T odd: shifted to end at T - 1
        which = torch.randint(P, (B, Q), generator=g)
        tokens.scatter_(1, qpos - 1, torch.zeros_like(qpos))
        tokens.scatter_(1, qpos, keys.gather(1, which))
        return tokens, qpos, values.gather(1, which)


class Curriculum:
    """Sequence-length warm-up: start short, double the length once the recent accuracy at
    the current length reaches the target, up to `seq`. A deadline keeps it moving: the full
    length comes by `deadline` steps at the latest; the first length (learning from scratch)
    may take half of that, each later one an equal share of what is left.

    From scratch, the answer's gradient reaches the few pair tokens through attention spread
    over all T positions, so at T = 2048 learning starts very slowly; at 64 it takes about a
    hundred steps, and what was learned carries over as the length doubles. It also teaches
    the sparse patterns where to look: at short lengths every block is visible, and the
    query/key alignment learned there is what their block scores (mean keys, compressed
    keys) are made of at full length."""

    def __init__(self, seq: int, start: int, min_len: int, deadline: int,
                 window: int = LAST_N):
        self.seq, self.deadline, self.window = seq, deadline, window
        self.length = min(seq, max(start, min_len))
        self.step = self.at_length = 0
        self.first = True
        self.accs: list[float] = []

    def _doublings_left(self) -> int:
        n, t = 0, self.length
        while t < self.seq:
            t, n = min(self.seq, 2 * t), n + 1
        return n

    def update(self, acc: float):
        self.step += 1
        self.at_length += 1
        self.accs.append(acc)
        if self.length >= self.seq:
            return
        solved = (self.at_length >= self.window
                  and sum(self.accs[-self.window:]) / self.window >= TARGET_ACC)
        left = self.deadline - (self.step - self.at_length)  # from this stage's start
        cap = left / 2 if self.first else left / self._doublings_left()
        if solved or self.at_length >= cap:
            self.length = min(self.seq, 2 * self.length)
            self.at_length, self.accs, self.first = 0, [], False


# ---------------------------------------------------------------------------- the model
def auto_spec_params(names, seq: int) -> dict:
    """Sizes for the spec parameters this example knows, scaled to the sequence."""
    block = max(8, seq // 16)
    sel_len = max(8, seq // 32)
    cmp_len = max(8, seq // 64)
    table = {
        "block": block,                                   # MoBA: 16 blocks at 2048
        "topk": 3 if -(-seq // block) >= 8 else 2,        # own block + 2 routed
        "window": max(8, seq // 16),                      # far below the pairs' distance
        "sel_len": sel_len,                               # NSA: 32 selection blocks at 2048
        "topn": 6 if seq >= 512 else 3,                   # forced ones included
        "init_blocks": 1,
        "local_blocks": 2 if seq >= 512 else 1,
        "cmp_len": cmp_len,
        "cmp_stride": max(1, cmp_len // 2),
    }
    return {n: table[n] for n in names if n in table}


class Block(nn.Module):
    """Pre-norm: x + o(attn(q, k, v)), then x + mlp(x)."""

    def __init__(self, spec, spec_params: dict, d_model: int, heads: int, kv_heads: int,
                 seed: int):
        super().__init__()
        import sparsedsl
        self.h, self.hk, self.hd = heads, kv_heads, d_model // heads
        self.ln1 = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, heads * self.hd, bias=False)
        self.kv = nn.Linear(d_model, 2 * kv_heads * self.hd, bias=False)
        self.attn = sparsedsl.compile(spec, head_dim=self.hd, q_heads=heads, d_model=d_model,
                                      seed=seed, **spec_params)
        self.x_inputs = [n for n, i in self.attn.ir.inputs.items() if i.role == "x"]
        given = [n for n, i in self.attn.ir.inputs.items() if i.role != "x" and i.node is None]
        if given:
            raise ValueError(f"spec `{self.attn.spec_name}` needs the input(s) "
                             f"{', '.join(given)}; this example gives only the layer input `x`")
        self.o = nn.Linear(heads * self.hd, d_model, bias=False)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        B, T, _ = x.shape
        h = self.ln1(x)
        q = self.q(h).view(B, T, self.h, self.hd)
        k, v = self.kv(h).view(B, T, 2, self.hk, self.hd).unbind(2)
        inputs = {n: h.to(q.dtype) for n in self.x_inputs}  # the layer input, in q's dtype
        a = self.attn(q, k, v, **inputs)
        x = x + self.o(a.flatten(2))
        return x + self.mlp(self.ln2(x))


def sinusoids(seq: int, d: int) -> torch.Tensor:
    """The Transformer's fixed sin/cos position code [seq, d] (Vaswani et al., 2017)."""
    pos = torch.arange(seq, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    pe = torch.zeros(seq, d)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return pe


class TinyLM(nn.Module):
    """Token + absolute position embeddings (no rotary), pre-norm blocks, final norm, LM head.

    pos="sinusoidal": the fixed sin/cos code, scaled to the token embeddings' size (a shift
    by one position is a linear map of it, which the previous-token attention needs);
    pos="learned": one learned vector per position."""

    def __init__(self, spec, spec_params, vocab, seq, d_model, heads, kv_heads, layers, seed,
                 pos="sinusoidal", shift=True):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        # token shift: each position also sees an embedding of the token before it
        self.prev = nn.Embedding(vocab + 1, d_model) if shift else None  # id `vocab`: none
        if pos == "learned":
            self.pos = nn.Parameter(torch.zeros(seq, d_model))
        else:
            self.register_buffer("pos", 0.02 * math.sqrt(2) * sinusoids(seq, d_model))
        self.blocks = nn.ModuleList(Block(spec, spec_params, d_model, heads, kv_heads,
                                          seed=seed * 1000 + i) for i in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        for name, p in self.named_parameters():
            if ".attn." in name:  # the spec's own parameters keep sparsedsl's initialisation
                continue
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens, positions=None):
        x = self.tok(tokens) + self.pos[: tokens.shape[1]]
        if self.prev is not None:
            before = torch.cat([torch.full_like(tokens[:, :1], self.prev.num_embeddings - 1),
                                tokens[:, :-1]], 1)
            x = x + self.prev(before)
        for blk in self.blocks:
            x = blk(x)
        if positions is not None:  # the loss reads only the query positions
            x = x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))
        return self.head(self.ln(x))


# ---------------------------------------------------------------------------- output
class Progress:
    """A one-line `\\r` progress display on a terminal, plain lines every `every` steps else."""

    def __init__(self, total: int, every: int, stream=None, width: int = 24):
        self.total, self.every, self.width = total, max(1, every), width
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_len = 0

    def update(self, step: int, loss: float, acc: float, acc_avg: float, seq: int | None = None):
        elapsed = time.perf_counter() - self.t0
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        text = (f"step {step:>{len(str(self.total))}}/{self.total}  "
                + (f"T={seq}  " if seq is not None else "") + f"loss {loss:.4f}  "
                f"acc {acc:.3f}  acc@{LAST_N} {acc_avg:.3f}  {_rate(rate)}  "
                f"elapsed {_dur(elapsed)}  eta {_dur(eta)}")
        if self.tty:
            filled = round(self.width * step / self.total)
            line = f"[{'#' * filled}{'.' * (self.width - filled)}] {text}"
            pad = " " * max(0, self._last_len - len(line))
            self.stream.write("\r" + line + pad)
            self._last_len = len(line)
            self.stream.flush()
        elif step % self.every == 0 or step == self.total or step == 1:
            print(text, file=self.stream, flush=True)

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _rate(r: float) -> str:
    return f"{r:.2f} step/s" if r >= 1 else f"{1 / r if r else 0:.1f} s/step"


def _dur(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def moving_average(xs, n):
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= n:
            acc -= xs[i - n]
        out.append(acc / min(i + 1, n))
    return out


def steps_to(accs, target, n, ok=None):
    """The first step (1-based) whose mean accuracy over the last n steps reaches target,
    counting only windows whose steps all satisfy `ok` (a list of bools), if given."""
    n = min(n, len(accs))
    bad_until = -1
    for i, a in enumerate(moving_average(accs, n)):
        if ok is not None and not ok[i]:
            bad_until = i
        if i + 1 >= n and i - n >= bad_until and a >= target:
            return i + 1
    return None


def _shade_curriculum(axes, seqs, full):
    """Grey before the curriculum reaches the full length, with its lengths written in."""
    if not seqs or seqs[0] == full:
        return
    end = seqs.index(full) + 1 if full in seqs else len(seqs)
    firsts = [(i + 1, t) for i, t in enumerate(seqs) if i == 0 or seqs[i - 1] != t]
    for ax in axes:
        ax.axvspan(1, end, color="0.9", zorder=0)
    axes[-1].text(end / 2, 0.5, "length curriculum\n" + " ".join(str(t) for _, t in firsts
                  if t != full) + f" -> {full}", ha="center", va="center", fontsize=7,
                  color="0.35", wrap=True)


def plot(summary: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h = summary["history"]
    steps = list(range(1, len(h["loss"]) + 1))
    n = max(1, min(LAST_N, len(steps) // 5 or 1))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, h["loss"], color="tab:blue", alpha=0.3, lw=0.8, label="per step")
    ax1.plot(steps, moving_average(h["loss"], n), color="tab:blue", label=f"mean of {n}")
    ax1.set(xlabel="step", ylabel="cross-entropy (answer only)", title="loss")
    ax1.axhline(math.log(1 / summary["chance_acc"]), color="gray", ls=":", lw=1,
                label="log(#values)")
    ax1.legend()
    ax2.plot(steps, h["acc"], color="tab:green", alpha=0.3, lw=0.8, label="per step")
    ax2.plot(steps, moving_average(h["acc"], n), color="tab:green", label=f"mean of {n}")
    ax2.axhline(TARGET_ACC, color="gray", ls="--", lw=1, label="90%")
    ax2.axhline(summary["chance_acc"], color="gray", ls=":", lw=1, label="chance")
    ax2.set(xlabel="step", ylabel="accuracy", title="recall accuracy", ylim=(-0.02, 1.02))
    _shade_curriculum([ax1, ax2], h.get("seq") or [], summary["params"]["seq"])
    if summary["steps_to_90"]:
        ax2.axvline(summary["steps_to_90"], color="tab:green", ls="--", lw=0.8)
    ax2.legend(loc="lower right", fontsize=8)
    p = summary["params"]
    sp = ", ".join(f"{k}={v}" for k, v in summary["spec_params"].items())
    fig.suptitle(f"{summary['pattern']}({sp})  T={p['seq']} d={p['d_model']} "
                 f"H={p['heads']}/{p['kv_heads']} L={p['layers']} B={p['batch']} "
                 f"pairs={p['pairs']}  [{summary['device']}, {summary['wall_time_s']:.0f}s]",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="train_tiny.py", description=__doc__[__doc__.index("SPEC is"):],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", nargs="?",
                    help="a .attn file, spec text or a built-in name (moba, nsa)")
    ap.add_argument("--compare", nargs="+", metavar="JSON", default=None,
                    help="instead of training: plot the curves of earlier runs' --json "
                         "summaries together into <out>/compare.png and print a table")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a spec parameter (repeatable); overrides the scaled defaults")
    ap.add_argument("--size", choices=("auto", "gpu", "cpu"), default="auto",
                    help="the defaults for flags not given: gpu on a CUDA device, else cpu")
    for flag, typ, what in [("--steps", int, "training steps"),
                            ("--seq", int, "sequence length T"),
                            ("--d-model", int, "model width"),
                            ("--heads", int, "query heads"),
                            ("--kv-heads", int, "key/value heads (GQA)"),
                            ("--layers", int, "blocks"),
                            ("--batch", int, "sequences per step"),
                            ("--lr", float, "peak learning rate (AdamW; GPU size: 1e-3, NSA 5e-4)"),
                            ("--pairs", int, "key/value pairs per sequence"),
                            ("--queries", int, "queries per sequence (at most seq/8)"),
                            ("--vocab", int, "vocabulary: marker, keys, values, filler")]:
        ap.add_argument(flag, type=typ, default=None, help=what)
    ap.add_argument("--layout", choices=("contiguous", "scattered"), default="contiguous",
                    help="where the pairs lie in the first half: as one run k1 v1 k2 v2 ... "
                         "at a random even offset (default), or at random separate places")
    ap.add_argument("--pos", choices=("sinusoidal", "learned"), default="sinusoidal",
                    help="absolute position embeddings (default sinusoidal)")
    ap.add_argument("--shift", action=argparse.BooleanOptionalAction, default=True,
                    help="token shift: add an embedding of the previous token to each input "
                         "(default on)")
    ap.add_argument("--curriculum", action=argparse.BooleanOptionalAction, default=True,
                    help="sequence-length warm-up from --start-seq, doubling once solved "
                         "(default on)")
    ap.add_argument("--start-seq", type=int, default=64,
                    help="the curriculum's first length (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="default: cuda if available")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="bfloat16 runs the model under autocast (default: bfloat16 on the "
                         "GPU size, float32 on the CPU size)")
    ap.add_argument("--out", default="out/train", help="folder for the PNG (default out/train)")
    ap.add_argument("--json", default=None, metavar="FILE", help="write a JSON summary")
    ap.add_argument("--log-every", type=int, default=None,
                    help="plain-output lines every N steps (default steps/50)")
    return ap.parse_args(argv)


def _resolve(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    size = args.size if args.size != "auto" else ("gpu" if device == "cuda" else "cpu")
    cfg = dict(SIZES[size])
    for k in cfg:
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    cfg.update(device=device, size=size, seed=args.seed, pos=args.pos, shift=args.shift,
               layout=args.layout)
    if cfg["d_model"] % cfg["heads"]:
        raise SystemExit(f"error: --d-model {cfg['d_model']} is not a multiple of --heads "
                         f"{cfg['heads']}")
    if cfg["heads"] % cfg["kv_heads"]:
        raise SystemExit(f"error: --heads {cfg['heads']} is not a multiple of --kv-heads "
                         f"{cfg['kv_heads']}")
    return cfg


def _spec_params(spec, sets: list[str], seq: int) -> tuple[dict, dict]:
    """(the parameters passed to compile, all resolved values)."""
    import sparsedsl
    given = {}
    for item in sets:
        if "=" not in item:
            raise SystemExit(f"error: --set takes NAME=VALUE, got `{item}`")
        name, value = item.split("=", 1)
        given[name.strip()] = value.strip()
    declared = list(sparsedsl.lower(spec).params)
    params = {k: v for k, v in auto_spec_params(declared, seq).items() if k not in given}
    params.update(given)
    resolved = sparsedsl.lower(spec, params).param_values()  # raises on a bad name or value
    return params, resolved


def compare(paths, out_dir: Path) -> Path:
    """One figure with the loss and accuracy curves of several runs, and a table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [json.loads(Path(p).read_text()) for p in paths]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5 + 0.15 * len(runs)))
    rows = []
    lrs = {r["params"]["lr"] for r in runs}  # the learning rate goes into labels when it differs
    for r in runs:
        h = r["history"]
        n = max(1, min(LAST_N, len(h["loss"]) // 5 or 1))
        steps = range(1, len(h["loss"]) + 1)
        sp = ", ".join(f"{k}={v}" for k, v in r["spec_params"].items() if k != "cmp")
        if len(lrs) > 1:
            sp += (", " if sp else "") + f"lr={r['params']['lr']:g}"
        label = r["pattern"] + (f" ({sp})" if sp else "")
        if r["steps_to_90"]:
            label += f": 90% at step {r['steps_to_90']}"
        ax1.plot(steps, moving_average(h["loss"], n), label=label)
        ax2.plot(steps, moving_average(h["acc"], n), label=label)
        rows.append((r["pattern"], r["steps"], f"{r['params']['lr']:g}", f"{r['final_loss']:.4f}",
                     f"{r['acc_last_n']:.3f}", str(r["steps_to_90"] or "-"),
                     f"{r['wall_time_s']:.0f}s", r["device_name"]))
    ax1.set(xlabel="step", ylabel=f"loss (mean of {n})", title="loss")
    ax2.set(xlabel="step", ylabel=f"accuracy (mean of {n})", title="recall accuracy",
            ylim=(-0.02, 1.02))
    ax2.axhline(TARGET_ACC, color="gray", ls="--", lw=1)
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=7, frameon=False)
    p = runs[0]["params"]
    fig.suptitle(f"associative recall, T={p['seq']} d={p['d_model']} H={p['heads']}/"
                 f"{p['kv_heads']} L={p['layers']} B={p['batch']} pairs={p['pairs']}",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * len(runs), 1, 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    head = ("pattern", "steps", "lr", "final loss", "acc, last steps", "90% at", "time", "device")
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    for row in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    print(f"plot {path}")
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.compare:
        return {"png": str(compare(args.compare, Path(args.out)))}
    if not args.spec:
        raise SystemExit("error: give a SPEC (a .attn file or a built-in name), or --compare")
    cfg = _resolve(args)
    import sparsedsl
    from sparsedsl.errors import SpecError
    try:
        compile_params, spec_params = _spec_params(args.spec, args.set, cfg["seq"])
    except SpecError as e:
        msg = str(e)
        raise SystemExit(msg if msg.startswith("error") or ": error:" in msg else f"error: {msg}")
    device = torch.device(cfg["device"])
    amp = cfg["dtype"] == "bfloat16"
    torch.manual_seed(cfg["seed"])
    try:
        task = Task(cfg["vocab"], cfg["seq"], cfg["pairs"], cfg["layout"], cfg["queries"])
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    model = TinyLM(args.spec, compile_params, cfg["vocab"], cfg["seq"], cfg["d_model"],
                   cfg["heads"], cfg["kv_heads"], cfg["layers"], cfg["seed"],
                   pos=args.pos, shift=args.shift).to(device)
    pattern = model.blocks[0].attn.spec_name
    if args.lr is None and pattern in GPU_LR and cfg["size"] == "gpu":
        cfg["lr"] = GPU_LR[pattern]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and ".attn." not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and ".attn." not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.95))
    steps = cfg["steps"]
    warmup = max(1, min(100, steps // 10))

    def lr_at(step):  # linear warm-up, then cosine to a tenth
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{pattern}({', '.join(f'{k}={v}' for k, v in spec_params.items())}) on {device}"
          f" [{cfg['dtype']}, size {cfg['size']}]: T={cfg['seq']} d_model={cfg['d_model']} "
          f"heads={cfg['heads']}/{cfg['kv_heads']} layers={cfg['layers']} batch={cfg['batch']} "
          f"pairs={cfg['pairs']} vocab={cfg['vocab']} lr={cfg['lr']} steps={steps} "
          f"({n_params / 1e6:.2f}M parameters)", flush=True)
    log_every = args.log_every or max(1, steps // 50)
    progress = Progress(steps, log_every)
    # the curriculum reaches the full length by 3/4 of the steps at the latest
    curriculum = Curriculum(cfg["seq"], args.start_seq if args.curriculum else cfg["seq"],
                            min_len=4 * cfg["pairs"] + 2, deadline=int(0.75 * steps))
    losses, accs, lengths = [], [], []
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        seq = curriculum.length
        tokens, qpos, answer = (t.to(device) for t in task.batch(cfg["batch"], gen, seq))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(tokens, qpos).float()  # [B, Q, vocab]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), answer.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        # the batch was fresh data, scored before this update: a held-out estimate
        losses.append(loss.item())
        accs.append((logits.argmax(-1) == answer).float().mean().item())
        lengths.append(seq)
        curriculum.update(accs[-1])
        if not math.isfinite(losses[-1]):
            progress.close()
            raise SystemExit(f"error: the loss is {losses[-1]} at step {step + 1}")
        progress.update(step + 1, losses[-1], accs[-1],
                        moving_average(accs[-LAST_N:], LAST_N)[-1], seq)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    progress.close()

    n = min(LAST_N, steps)
    out_dir = Path(args.out)
    png = out_dir / f"{pattern}.png"
    summary = {
        "spec": args.spec,
        "pattern": pattern,
        "spec_params": spec_params,
        "params": {k: cfg[k] for k in ("seq", "d_model", "heads", "kv_heads", "layers", "batch",
                                       "lr", "pairs", "queries", "vocab", "layout", "pos", "shift", "seed",
                                       "size")}
        | {"curriculum": args.curriculum, "start_seq": args.start_seq if args.curriculum
           else cfg["seq"], "n_params": n_params, "warmup": warmup},
        "steps": steps,
        "final_loss": losses[-1],
        "final_acc": accs[-1],
        "last_n": n,
        "loss_last_n": sum(losses[-n:]) / n,
        "acc_last_n": sum(accs[-n:]) / n,
        "steps_to_90": steps_to(accs, TARGET_ACC, LAST_N, [t == cfg["seq"] for t in lengths]),
        "full_length_from": lengths.index(cfg["seq"]) + 1 if cfg["seq"] in lengths else None,
        "chance_acc": 1 / task.n_values,
        "wall_time_s": wall,
        "step_time_s": wall / steps,
        "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else "cpu (Triton interpreter)"),
        "dtype": cfg["dtype"],
        "png": str(png),
        "history": {"loss": losses, "acc": accs, "seq": lengths},
    }
    plot(summary, png)
    print(f"{pattern}: {steps} steps in {_dur(wall)} ({wall / steps:.3f} s/step); final loss "
          f"{summary['final_loss']:.4f}, accuracy over the last {n} steps "
          f"{summary['acc_last_n']:.3f} (chance {summary['chance_acc']:.3f}); "
          f"90% at T={cfg['seq']} "
          + (f"at step {summary['steps_to_90']}" if summary["steps_to_90"] else "not reached")
          + (f" (full length from step {summary['full_length_from']})"
             if args.curriculum and cfg["seq"] > args.start_seq else "")
          + f"; plot {png}", flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"summary {path}")
    return summary


if __name__ == "__main__":
    main()
