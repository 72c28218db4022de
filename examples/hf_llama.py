"""A tiny Llama (Hugging Face transformers) with MoBA attention in every layer, trained for a
few steps on the CPU.

    python examples/hf_llama.py [--spec moba|nsa|FILE] [--steps 3] [--seq 32]
                                [--compile [BACKEND]]

`sparsedsl.integrations.hf.register` adds the spec to transformers' attention interface;
the model is built from a config (no weights are downloaded) with
`attn_implementation="sparsedsl:<spec>"`, so each layer owns a compiled layer
(`self_attn.sparse_attention`, learnable parameters included for NSA). The kernels run in
Triton's interpreter without a GPU: sizes are tiny. `--compile` trains
`torch.compile(model, fullgraph=True)` instead (inductor by default, which needs a C++
compiler on the CPU; `--compile aot_eager` does without). Needs `pip install sparsedsl[hf]`.
"""
from __future__ import annotations

import argparse
import time

import torch

# import sparsedsl's integration before transformers: without a GPU it selects Triton's
# interpreter, which must happen before anything (transformers does) imports Triton
from sparsedsl.integrations import hf

SPECS = {
    "moba": dict(block=8, topk=2),
    "nsa": dict(cmp_len=8, cmp_stride=4, sel_len=8, topn=2, window=8),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="moba", help="built-in name or .attn file")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="train torch.compile(model, fullgraph=True) with this backend")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, LlamaConfig

    name = hf.register(args.spec, **SPECS.get(args.spec, {}))
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    print(f"attn_implementation={model.config._attn_implementation!r}")
    print(f"layer 0: {model.model.layers[0].self_attn.sparse_attention}")
    extra = sum(p.numel() for n, p in model.named_parameters() if ".sparse_attention." in n)
    print(f"parameters: {sum(p.numel() for p in model.parameters())} "
          f"({extra} in the attention specs)")

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step_model = model
    if args.compile:
        step_model = torch.compile(model, fullgraph=True, backend=args.compile)
        print(f"torch.compile(fullgraph=True, backend={args.compile!r}): the first step compiles")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g)
    for step in range(args.steps):
        t0 = time.perf_counter()
        loss = step_model(ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
