"""The lark grammar of the .attn language (installed as `sparsedsl.grammar`)."""
