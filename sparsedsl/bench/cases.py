"""The benchmark cases: which spec, which sizes, which peers compute the same thing.

The numbers of each pattern (block sizes, top-k, window) are read from the spec's
resolved parameters, so the floor, the FlexAttention masks and the compiled layer
cannot disagree about them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .options import NSA_Q_HEADS, BenchOptions

HEAD_DIM = 128

# NSA as flash-linear-attention's `parallel_nsa` computes it (fla/ops/nsa/parallel.py):
# one block size for mean-pooled compression and selection, the first block and the
# query's last two blocks forced, the group's compression probabilities summed to rank
# blocks, no sliding window, gates given as [batch, seq, q_heads] tensors.
NSA_FLA_SPEC = """\
pattern nsa_fla "NSA as flash-linear-attention's parallel_nsa computes it: no window"

param block = 64  # tokens per compression and selection block (fla's block_size)
param topn = 16   # selected blocks, the forced ones included (fla's block_counts)

input g_cmp  # gate tensors [batch, seq, q_heads], as fla takes them
input g_slc

let cblk = blocks(block)
let cmp_out = attend(pool(cblk, mean), past(cblk))

let sblk = blocks(block)
let score = groupsum(remap(probs(cmp_out), sblk))
let sel = topk(score, topn, force=first(sblk, 1) | recent(sblk, 2), forbid=~past(sblk))
let slc_out = attend(tokens(sel) & causal)

out = g_cmp * cmp_out + g_slc * slc_out
"""

# A static pattern: StreamingLLM's sinks plus a sliding window (examples/streaming_llm.attn).
WINDOW_SINKS_SPEC = """\
pattern window_sinks "Attention sinks plus a sliding window"

param sinks = 64      # initial tokens every query attends to
param window = 4096   # most recent tokens, the query itself included

out = attend((sink(sinks) | window(window)) & causal)
"""


@dataclass(frozen=True)
class Moba:
    block: int
    topk: int


@dataclass(frozen=True)
class Nsa:
    cmp_len: int
    cmp_stride: int
    sel_len: int
    topn: int
    init_blocks: int
    local_blocks: int
    window: int  # 0: no window branch
    mlp: bool    # learned MLP compression (else mean pooling)


@dataclass(frozen=True)
class WindowSinks:
    window: int
    sinks: int


Pattern = Moba | Nsa | WindowSinks


@dataclass(frozen=True)
class Case:
    key: str      # the --case name
    label: str    # unique among the cases of one run (group size included)
    title: str
    spec: str     # built-in name or spec text
    params: tuple[tuple[str, object], ...]
    pattern: Pattern
    q_heads: int
    kv_heads: int
    head_dim: int = HEAD_DIM
    gates: tuple[str, ...] = ()  # gate inputs given as [batch, seq, q_heads] tensors
    peers: tuple[str, ...] = ()  # implementations of the same pattern
    decode: bool = False  # one decode step against a KV cache (--decode), not fwd/bwd

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    def describe(self) -> dict:
        spec = self.spec if "\n" not in self.spec else self.spec.splitlines()[0]
        return {"label": self.label, "case": self.key, "title": self.title, "spec": spec,
                "params": dict(self.params), "q_heads": self.q_heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "gates": list(self.gates), "peers": list(self.peers),
                "mode": "decode" if self.decode else "prefill",
                "pattern": {"kind": type(self.pattern).__name__.lower(),
                            **self.pattern.__dict__}}


def resolved(spec: str, params: tuple[tuple[str, object], ...]) -> dict:
    """The spec's parameters after overrides (defaults included)."""
    from ..pipeline import lower
    return lower(spec, dict(params)).param_values()


def _moba() -> Case:
    params = (("block", 512), ("topk", 3))
    p = resolved("moba", params)
    return Case("moba", "moba", f"MoBA, block {p['block']}, top-{p['topk']}", "moba", params,
                Moba(p["block"], p["topk"]), 16, 16, peers=("flex", "flex+routing"))


def _nsa_fla(group: int) -> Case:
    params = (("block", 64), ("topn", 16))
    p = resolved(NSA_FLA_SPEC, params)
    pat = Nsa(p["block"], p["block"], p["block"], p["topn"], 1, 2, 0, False)
    return Case("nsa-fla", f"nsa-fla g{group}",
                f"NSA as fla: mean compression {p['block']}, top-{p['topn']}, no window, "
                f"{NSA_Q_HEADS}/{NSA_Q_HEADS // group} heads", NSA_FLA_SPEC, params, pat,
                NSA_Q_HEADS, NSA_Q_HEADS // group, gates=("g_cmp", "g_slc"), peers=("fla",))


def _nsa(group: int) -> Case:
    p = resolved("nsa", ())
    pat = Nsa(p["cmp_len"], p["cmp_stride"], p["sel_len"], p["topn"], p["init_blocks"],
              p["local_blocks"], p["window"], p["cmp"] == "mlp")
    return Case("nsa", f"nsa g{group}",
                f"NSA paper defaults: {p['cmp']} compression {p['cmp_len']}/{p['cmp_stride']}, "
                f"selection {p['sel_len']} top-{p['topn']}, window {p['window']}, "
                f"{NSA_Q_HEADS}/{NSA_Q_HEADS // group} heads", "nsa", (), pat,
                NSA_Q_HEADS, NSA_Q_HEADS // group, gates=("g_cmp", "g_slc", "g_swa"))


def _window_sinks() -> Case:
    params = (("window", 4096), ("sinks", 64))
    p = resolved(WINDOW_SINKS_SPEC, params)
    return Case("window-sinks", "window-sinks",
                f"sliding window {p['window']} + {p['sinks']} sinks", WINDOW_SINKS_SPEC, params,
                WindowSinks(p["window"], p["sinks"]), 16, 16, peers=("flex",))


def make_cases(opts: BenchOptions) -> list[Case]:
    cases: list[Case] = []
    for key in opts.cases:
        if key == "moba":
            cases.append(_moba())
        elif key == "nsa-fla":
            cases.extend(_nsa_fla(g) for g in opts.groups)
        elif key == "nsa":
            cases.extend(_nsa(g) for g in opts.groups)
        elif key == "window-sinks":
            cases.append(_window_sinks())
    if opts.decode:  # the same configurations, one decode step each ("moba decode", ...)
        cases = [replace(c, label=f"{c.label} decode", decode=True) for c in cases]
    return cases
