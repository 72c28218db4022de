"""sparsedsl in other people's code.

    flex.py   a static spec as a FlexAttention `BlockMask` (`layer.to_block_mask(seq_len)`)

`torch.compile` support lives in the runtime (`sparsedsl/runtime/custom_op.py`): every
compiled layer runs through a custom operator.
"""
