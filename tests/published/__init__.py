"""Independent test oracles transcribing *published* sparse-attention definitions.

These modules are written from scratch in plain torch (no einops / flash-attn /
triton) and are meant to be used only as slow, obviously-correct references:

* :mod:`.moba` -- MoBA (MoonshotAI/MoBA, ``moba/moba_naive.py``,
  ``moba_attn_varlen_naive``).
* :mod:`.nsa`  -- Native Sparse Attention as defined by flash-linear-attention's
  naive reference (``fla/ops/nsa/naive.py`` + ``fla/ops/utils/pooling.py``).

Tensor layout everywhere is ``[batch, seq, heads, head_dim]``; with GQA the
query head ``h`` reads key/value head ``h // G`` where ``G = HQ // H``.
"""
