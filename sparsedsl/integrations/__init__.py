"""sparsedsl in other people's code.

    flex.py   a static spec as a FlexAttention `BlockMask` (`layer.to_block_mask(seq_len)`)
    hf.py     a spec as a Hugging Face transformers attention implementation
              (`register("moba", ...)`; needs the optional `transformers`: pip install sparsedsl[hf])

`torch.compile` support lives in the runtime (`sparsedsl/runtime/custom_op.py`): every
compiled layer runs through a custom operator.
"""
