"""A spec as a Hugging Face transformers attention implementation.

    from sparsedsl.integrations import hf
    name = hf.register("moba", block=64, topk=3)          # -> "sparsedsl:moba"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)

`register` adds the spec to transformers' `AttentionInterface` (and its mask function to
`AttentionMaskInterface`). Every attention module built afterwards for a config that names
it (Llama-style modules: `head_dim`, `layer_idx`, `num_key_value_groups`) gets its own
compiled layer as the submodule `sparse_attention`, so the spec's learnable tensors (NSA's
compression MLPs, gate projections) are parameters of the model: in `model.parameters()`,
the optimiser and `state_dict()`. `attach(model)` does the same for a model built before
`register` or switched with `model.set_attn_implementation(name)`.

What the model hands the attention function, and what sparsedsl does with it:

* query [B, Hq, T, D], key/value [B, Hkv, T, D], after RoPE: transposed to sparsedsl's
  [B, T, H, D]; GQA is native (Hq a multiple of Hkv).
* `scaling`: replaces the spec's default scale 1/sqrt(D): q is multiplied by
  scaling * sqrt(D) (exactly 1 for Llama, so nothing is done there).
* the layer input `x` of learned gates (`sigmoid(linear(x))`): the attention module's
  own input `hidden_states` (after the decoder layer's input norm), taken by a forward
  pre-hook on the attention module, since the attention interface does not pass it.
* the mask: the spec *is* the attention pattern (causal by construction), so the model's
  causal mask is not needed. Padding masks and models whose own mask is not plain causal
  at this length (a sliding window shorter than the sequence) get a clear error, as do
  dropout > 0 and decoding with a KV cache (query shorter than keys).
* packed sequences (batch 1, padding-free, e.g. `DataCollatorWithFlattening`): the
  flash-attention kwargs `cu_seq_lens_q` / `cu_seq_lens_k` (equal: self-attention) and
  `max_length_q` go to the layer as `cu_seqlens` / `max_seqlen`; without them, the
  sequence starts are read from `position_ids` (a position that does not follow the one
  before starts a sequence, as transformers' own mask does; eager only: under
  `torch.compile` pass the kwargs, `return_flash_attn_kwargs=True`). The model's
  block-diagonal causal mask, when it builds one, is checked against those sequences.

`register(..., reference=True)` plugs in the dense float64 reference instead of the
kernels (with the same per-layer parameters): the oracle tests/test_hf.py compares with.
transformers is an optional dependency: `pip install sparsedsl[hf]`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .. import runtime  # noqa: F401  (picks Triton's interpreter on a machine without a GPU, before transformers imports Triton)
from ..errors import Source
from ..frontend.load import load_source
from ..pipeline import lower


@dataclass(frozen=True)
class _Entry:
    name: str
    source: Source
    params: tuple  # the overrides given to `register`
    param_values: tuple  # every parameter's resolved value
    reference: bool
    x_input: str | None  # the spec's layer input (role x), fed with hidden_states


_REGISTRY: dict[str, _Entry] = {}
_hook = None


def _transformers():
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError("sparsedsl.integrations.hf needs transformers: "
                          "pip install 'sparsedsl[hf]'") from e
    return transformers, AttentionInterface, AttentionMaskInterface


def register(spec="moba", name: str | None = None, *, reference: bool = False,
             **params) -> str:
    """Register `spec` (built-in name, path or text) with parameter overrides as a transformers
    attention implementation; returns its name (`sparsedsl:<spec>`, or
    `sparsedsl-reference:<spec>` with `reference=True`) for `attn_implementation=`."""
    _, attention_interface, mask_interface = _transformers()
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "Triton was imported for a GPU before sparsedsl could choose its interpreter (this "
            "machine has none): import sparsedsl.integrations.hf before transformers (which "
            "imports Triton), or set TRITON_INTERPRET=1 in the environment")
    source = load_source(spec)
    ir = lower(source, params)  # errors in the spec or the parameters surface here
    if name is None:
        name = f"sparsedsl{'-reference' if reference else ''}:{ir.spec_name}"
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty string without '/' (transformers reads "
                         f"'org/repo' as a hub kernel), got {name!r}")
    given_only = [n for n, i in ir.inputs.items() if i.role == "gate" and i.node is None]
    if given_only:
        raise ValueError(
            f"spec `{ir.spec_name}` needs gate tensors {', '.join(map(repr, given_only))} that "
            f"a transformers model does not pass: give them a default, e.g. "
            f"`input {given_only[0]} = sigmoid(linear(x))`")
    xs = [n for n, i in ir.inputs.items() if i.role == "x"]
    if len(xs) > 1:
        raise ValueError(f"spec `{ir.spec_name}` declares several layer inputs "
                         f"({', '.join(xs)}); a transformers model has one: hidden_states")
    entry = _Entry(name, source, tuple(sorted(params.items())),
                   tuple(sorted(ir.param_values().items())), reference, xs[0] if xs else None)
    old = _REGISTRY.get(name)
    if old is not None and old != entry:
        raise ValueError(f"attention implementation {name!r} is already registered for another "
                         f"spec or other parameters: pass name=... to register this one")
    _REGISTRY[name] = entry
    attention_interface.register(name, _attention)
    mask_interface.register(name, _mask)
    _install_hook()
    return name


def _install_hook():
    """Attach a compiled layer to each attention module as the model is built: PyTorch's
    module-registration hook sees `self.self_attn = LlamaAttention(config, i)`."""
    global _hook
    if _hook is None:
        _hook = torch.nn.modules.module.register_module_module_registration_hook(_on_register)


def _on_register(parent, name, module):
    entry = _entry_of(module)
    if entry is not None and not isinstance(getattr(module, "sparse_attention", None),
                                            torch.nn.Module):
        _attach(module, entry)
    return None


def _is_attention(module) -> bool:
    return all(hasattr(module, a) for a in ("config", "head_dim", "layer_idx",
                                            "num_key_value_groups"))


def _entry_of(module) -> _Entry | None:
    if not _is_attention(module):
        return None
    return _REGISTRY.get(getattr(module.config, "_attn_implementation", None))


def attach(model: torch.nn.Module) -> torch.nn.Module:
    """Give every attention module of `model` whose config names a registered spec its
    compiled layer (`module.sparse_attention`), if it has none yet. Returns the model."""
    found = False
    for module in model.modules():
        entry = _entry_of(module)
        if entry is None:
            continue
        found = True
        layer = getattr(module, "sparse_attention", None)
        if layer is None:
            _attach(module, entry)
        else:
            _check_layer(module, layer, entry)
    if not found:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise ValueError(f"no attention module of this model uses a sparsedsl attention "
                         f"implementation (its attn_implementation is {impl!r}; registered: "
                         f"{', '.join(sorted(_REGISTRY)) or 'none'})")
    return model


def _attach(module, entry: _Entry):
    from ..runtime.layer import SparseAttention
    cfg = module.config
    ir = lower(entry.source, dict(entry.params))
    # initial values come from a per-layer seed on the CPU, then take the device and dtype
    # of the attention module's own weights
    layer = SparseAttention(ir, entry.source.text, module.head_dim, cfg.num_attention_heads,
                            module.head_dim, cfg.hidden_size, seed=int(module.layer_idx))
    like = next(module.parameters(), None)
    if like is not None:
        layer = layer.to(device=like.device, dtype=like.dtype)
    layer._hf_entry = entry  # set now, not at the first call: torch.compile guards on it
    module.sparse_attention = layer
    module._sparsedsl_x = None
    if entry.x_input is not None:
        module.register_forward_pre_hook(_stash_hidden_states, with_kwargs=True)
        module.register_forward_hook(_drop_hidden_states)


def _check_layer(module, layer, entry: _Entry):
    from ..runtime.layer import SparseAttention
    if not isinstance(layer, SparseAttention) or layer._spec_text != entry.source.text or \
            tuple(sorted(layer.ir.param_values().items())) != entry.param_values:
        raise ValueError(f"layer {module.layer_idx}'s `sparse_attention` was compiled from another "
                         f"spec or other parameters than {entry.name!r} ({entry.source.name} "
                         f"with {dict(entry.params)})")


def _stash_hidden_states(module, args, kwargs):
    x = kwargs.get("hidden_states", args[0] if args else None)
    module._sparsedsl_x = x
    return None


def _drop_hidden_states(module, args, output):
    module._sparsedsl_x = None
    return None


# ---- the attention function and its mask function

def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
          attention_mask=None, **kwargs):
    """transformers' mask hook for our names: None when the model asks for plain causal
    attention over unpadded inputs (the spec is the pattern); otherwise the mask the model
    wants (its 2D padding mask, or sdpa's 4D boolean mask), which `_attention` then
    accepts only if it is plain causal after all."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask
    if mask_function is causal_mask_function or mask_function is None:
        if attention_mask is None:
            return None
        if attention_mask.dim() == 2:
            return attention_mask
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function or causal_mask_function,
                     attention_mask=attention_mask, allow_is_causal_skip=False,
                     **{k: v for k, v in kwargs.items() if k != "allow_is_causal_skip"})


def _require(ok: torch.Tensor, message: str):
    if torch.compiler.is_compiling():
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)


_NOT_CAUSAL = ("sparsedsl attention replaces the model's causal mask with its own pattern and "
               "supports neither padding nor a model mask other than plain causal (e.g. a "
               "sliding window shorter than the sequence); packed sequences are given by "
               "cu_seq_lens_q/cu_seq_lens_k/max_length_q or position_ids")


def _check_mask(mask, B: int, T: int, cu_seqlens=None):
    if mask is None:
        return
    if mask.dim() == 2:  # padding mask [B, T]
        _require(mask.bool().all(), f"{_NOT_CAUSAL}: this batch is padded "
                 "(attention_mask has zeros); pass sequences of one length without padding, "
                 "or pack them")
        return
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    what = "plain causal"
    if cu_seqlens is not None:  # causal within each packed sequence
        seq = torch.searchsorted(cu_seqlens, torch.arange(T, device=cu_seqlens.device,
                                                          dtype=cu_seqlens.dtype), right=True)
        seq = seq.to(mask.device)
        causal = causal & (seq[:, None] == seq[None, :])
        what = "causal within the packed sequences (cu_seq_lens_q or position_ids)"
    if mask.dtype != torch.bool:  # an additive float mask: 0 where visible
        mask = mask == 0
    _require((mask == causal).all(), f"{_NOT_CAUSAL}: the model's mask here is not {what}")


def _packing(kwargs: dict, B: int, T: int):
    """(cu_seqlens, max_seqlen) of a packed batch, or (None, None): from the flash-attention
    kwargs, else (eagerly) from position_ids that restart."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        pos = kwargs.get("position_ids")
        if pos is None or B != 1 or T < 2 or torch.compiler.is_compiling():
            return None, None
        pos = pos.reshape(-1)
        if pos.shape[0] != T:
            return None, None
        starts = (torch.diff(pos) != 1).nonzero().flatten() + 1
        if starts.numel() == 0:
            return None, None  # one sequence
        edge = torch.tensor([0], device=pos.device)
        return torch.cat([edge, starts, edge + T]).to(torch.int32), None
    if cu_q is None or cu_k is None:
        raise ValueError("packed sequences need both cu_seq_lens_q and cu_seq_lens_k (equal: "
                         "sparsedsl attention is self-attention over each sequence)")
    if cu_q is not cu_k:
        if cu_q.shape != cu_k.shape:
            raise ValueError(f"cu_seq_lens_q and cu_seq_lens_k must be equal, got shapes "
                             f"{tuple(cu_q.shape)} and {tuple(cu_k.shape)}")
        _require((cu_q == cu_k).all(), "cu_seq_lens_q and cu_seq_lens_k must be equal")
    max_len = kwargs.get("max_length_q")
    if isinstance(max_len, torch.Tensor):
        if torch.compiler.is_compiling():
            raise ValueError("under torch.compile, max_length_q must be a Python int "
                             "(DataCollatorWithFlattening gives one)")
        max_len = int(max_len)
    return cu_q.to(torch.int32), max_len


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    entry = _REGISTRY[module.config._attn_implementation]
    layer = getattr(module, "sparse_attention", None)
    if layer is None:
        raise ValueError(f"attention module {type(module).__name__} (layer {module.layer_idx}) has "
                         f"no compiled sparsedsl layer: call "
                         f"sparsedsl.integrations.hf.attach(model) after building the model")
    if getattr(layer, "_hf_entry", None) is not entry:  # e.g. after set_attn_implementation
        _check_layer(module, layer, entry)
        layer._hf_entry = entry
    B, H, T, D = query.shape
    if key.shape[2] != T:
        raise ValueError(f"sparsedsl attention runs on whole sequences (training, prefill): "
                         f"the query has {T} positions but the keys {key.shape[2]} (decoding with "
                         f"a KV cache is not supported yet; pass use_cache=False)")
    if dropout:
        raise ValueError(f"sparsedsl attention has no attention dropout: got dropout={dropout} "
                         f"(set config.attention_dropout = 0.0)")
    cu_seqlens, max_seqlen = _packing(kwargs, B, T)
    _check_mask(attention_mask, B, T, cu_seqlens)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if scaling is not None and not math.isclose(scaling * math.sqrt(D), 1.0, rel_tol=1e-12):
        q = q * (scaling * math.sqrt(D))
    inputs = {}
    if entry.x_input is not None:
        x = getattr(module, "_sparsedsl_x", None)
        if x is None or x.shape[:2] != (B, T):
            raise ValueError(f"spec input `{entry.x_input}` is the attention module's "
                             f"hidden_states [batch, seq, hidden], taken by a forward pre-hook: "
                             f"call the attention module itself (its forward), got "
                             f"{None if x is None else tuple(x.shape)}")
        inputs[entry.x_input] = x
    if entry.reference:
        out = layer.reference(q, k, v, cu_seqlens=cu_seqlens, **inputs)
    else:
        out = layer(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **inputs)
    return out, None  # [B, T, Hq, Dv], no attention weights


def registered() -> dict[str, str]:
    """Registered names -> where their spec came from."""
    return {n: e.source.name for n, e in _REGISTRY.items()}
