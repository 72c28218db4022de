"""sparsedsl as a Hugging Face transformers attention implementation.

A tiny Llama is built from a config (no weights are downloaded) with
`attn_implementation="sparsedsl:<spec>"`: every layer runs the compiled spec (kernels in
Triton's interpreter), with its learnable tensors as parameters of the model. The same
model with the dense reference plugged in (`register(..., reference=True)`, the same
weights through `state_dict`) is the oracle for logits and gradients. Misuse (padding,
decoding with a cache, dropout, a layer from another spec) gets a clear error.
"""
from __future__ import annotations

import copy

import pytest
import torch

from sparsedsl.integrations import hf  # before transformers: chooses Triton's interpreter

transformers = pytest.importorskip("transformers")

MOBA = dict(block=4, topk=2)
NSA = dict(cmp_len=8, cmp_stride=4, sel_len=8, topn=2, window=4)
TOL = 1e-4  # float32 kernels against the float64 reference, relative to the scale


def _config(layers=2):
    return transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64)


def _model(name, cfg=None, seed=0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg or _config()),
                                                         attn_implementation=name)


def _pair(spec, layers=2, **params):
    """The model with kernels and the same model (same weights) with the reference."""
    model = _model(hf.register(spec, **params), _config(layers))
    oracle = _model(hf.register(spec, reference=True, **params), _config(layers), seed=1)
    oracle.load_state_dict(model.state_dict())  # strict: the spec's parameters included
    return model, oracle


def _rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def test_moba_llama_matches_the_reference():
    model, oracle = _pair("moba", **MOBA)
    assert model.config._attn_implementation == "sparsedsl:moba"
    ids = torch.randint(0, 32, (1, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for m in (model, oracle):
        out = m(ids, labels=ids, use_cache=False)
        out.loss.backward()
        losses.append(out)
    assert _rel(losses[0].logits, losses[1].logits) < TOL
    grads = {n: p.grad for n, p in oracle.named_parameters()}
    for name, p in model.named_parameters():
        assert _rel(p.grad, grads[name]) < TOL, name


def test_nsa_parameters_belong_to_the_model():
    model = _model(hf.register("nsa", **NSA))
    names = [n for n, _ in model.named_parameters() if ".sparse_attention." in n]
    per_layer = len(model.model.layers[0].self_attn.sparse_attention.learnable())
    assert per_layer == 16 and len(names) == 2 * per_layer  # gates and compression MLPs
    assert "model.layers.1.self_attn.sparse_attention.g_cmp__weight" in model.state_dict()
    w0, w1 = (model.model.layers[i].self_attn.sparse_attention.g_cmp__weight for i in (0, 1))
    assert not torch.equal(w0, w1)  # one seed per layer


def test_nsa_llama_matches_the_reference():
    model, oracle = _pair("nsa", layers=1, **NSA)  # one layer: NSA is slow in the interpreter
    ids = torch.randint(0, 32, (1, 12), generator=torch.Generator().manual_seed(1))
    logits = model(ids, use_cache=False).logits
    assert _rel(logits, oracle(ids, use_cache=False).logits) < TOL
    logits.sum().backward()  # the gates see hidden_states (a forward pre-hook)
    for name, p in model.named_parameters():
        if ".sparse_attention." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_attach_after_set_attn_implementation():
    name = hf.register("moba", **MOBA)
    oracle = hf.register("moba", reference=True, **MOBA)
    model = _model("sdpa")
    assert not hasattr(model.model.layers[0].self_attn, "sparse_attention")
    model.set_attn_implementation(oracle)
    ids = torch.randint(0, 32, (1, 10))
    with pytest.raises(ValueError, match=r"call sparsedsl.integrations.hf.attach\(model\)"):
        model(ids)
    hf.attach(model)
    model(ids)
    other = hf.register("out = attend(window(3))", name="sparsedsl:test-window")
    model.set_attn_implementation(other)
    with pytest.raises(ValueError, match="compiled from another spec or other parameters"):
        model(ids)
    assert name in hf.registered()


def _oracle_model():
    return _model(hf.register("moba", reference=True, **MOBA))


def test_padding_is_refused():
    model = _oracle_model()
    ids = torch.randint(0, 32, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    model(ids, attention_mask=mask)  # no padding: fine
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="supports neither padding nor a model mask other "
                                         "than plain causal.*this batch is padded"):
        model(ids, attention_mask=mask)


def _packed(lengths, seed=3):
    """Token ids of sequences packed in one row, restarting position ids, flash kwargs."""
    ids = torch.randint(0, 32, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    pos = torch.cat([torch.arange(n) for n in lengths]).view(1, -1)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    flash = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=max(lengths),
                 max_length_k=max(lengths))
    return ids, pos, cu, flash


def test_packed_sequences_each_as_if_alone():
    """A padding-free packed batch (DataCollatorWithFlattening's kwargs, or position ids
    alone): every sequence's logits are those of the sequence run alone, and the kernels
    equal the reference model on the packed batch, gradients included."""
    lengths = [6, 1, 9, 3]  # 1 and 3: shorter than a block (4)
    model, oracle = _pair("moba", layers=1, **MOBA)
    ids, pos, cu, flash = _packed(lengths)
    out = model(ids, position_ids=pos, use_cache=False, **flash)
    out.logits.sum().backward()
    ref = oracle(ids, position_ids=pos, use_cache=False, **flash)
    ref.logits.sum().backward()
    assert _rel(out.logits, ref.logits) < TOL
    grads = {n: p.grad for n, p in oracle.named_parameters()}
    for name, p in model.named_parameters():
        assert _rel(p.grad, grads[name]) < TOL, name
    with torch.no_grad():
        c = cu.tolist()
        for a, b in zip(c[:-1], c[1:]):
            alone = model(ids[:, a:b], use_cache=False).logits
            torch.testing.assert_close(out.logits[:, a:b], alone, rtol=1e-5, atol=1e-5)
        # the sequences read from position_ids alone: the same logits
        by_pos = model(ids, position_ids=pos, use_cache=False).logits
        torch.testing.assert_close(by_pos, out.logits, rtol=0, atol=0)


def test_packed_sequences_checks():
    model = _oracle_model()
    ids, pos, cu, flash = _packed([4, 5])
    with pytest.raises(ValueError, match="need both cu_seq_lens_q and cu_seq_lens_k"):
        model(ids, position_ids=pos, use_cache=False, cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="cu_seq_lens_q and cu_seq_lens_k must be equal"):
        model(ids, position_ids=pos, use_cache=False, cu_seq_lens_q=cu,
              cu_seq_lens_k=torch.tensor([0, 3, 9], dtype=torch.int32))
    bad = dict(flash, cu_seq_lens_q=torch.tensor([0, 3, 9], dtype=torch.int32))
    bad["cu_seq_lens_k"] = bad["cu_seq_lens_q"]
    with pytest.raises(ValueError, match="not causal within the packed sequences"):
        model(ids, position_ids=pos, use_cache=False, **bad)  # boundaries that disagree
    with pytest.raises(ValueError, match=r"batch dimension 1"):
        model(ids.repeat(2, 1), position_ids=pos.repeat(2, 1), use_cache=False, **flash)


def test_decoding_with_a_cache_is_refused():
    model = _oracle_model()
    ids = torch.randint(0, 32, (1, 10))
    out = model(ids, use_cache=True)
    with pytest.raises(ValueError, match="decoding with a KV cache is not supported yet"):
        model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)


def test_dropout_is_refused():
    cfg = _config()
    cfg.attention_dropout = 0.1
    model = _model(hf.register("moba", reference=True, **MOBA), cfg).train()
    with pytest.raises(ValueError, match="no attention dropout"):
        model(torch.randint(0, 32, (1, 10)))


def test_register_checks():
    hf.register("moba", **MOBA)  # again: the same spec and parameters are fine
    with pytest.raises(ValueError, match="already registered for another spec"):
        hf.register("moba", block=8)
    with pytest.raises(ValueError, match="without '/'"):
        hf.register("moba", name="org/moba", **MOBA)
    with pytest.raises(ValueError, match="needs gate tensors 'g' that a transformers model "
                                         "does not pass"):
        hf.register("input g\nout = g * attend(causal)")
    with pytest.raises(ValueError, match="no attention module of this model uses"):
        hf.attach(_model("sdpa"))


def test_llama_compiles_fullgraph():
    """The whole model, hooks and mask checks included, compiles without graph breaks
    (aot_eager: the same tracing as inductor, without its C++ build)."""
    torch._dynamo.reset()
    model = _model(hf.register("moba", **MOBA), _config(layers=1))
    ids = torch.randint(0, 32, (1, 12), generator=torch.Generator().manual_seed(2))
    eager = model(ids, use_cache=False).logits
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(ids, use_cache=False).logits
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    torch._dynamo.reset()


def test_packed_llama_compiles_fullgraph():
    """Packed with DataCollatorWithFlattening's kwargs (max_length_q a Python int): one
    graph, the eager logits."""
    torch._dynamo.reset()
    model = _model(hf.register("moba", **MOBA), _config(layers=1))
    ids, pos, _, flash = _packed([5, 2, 6])
    eager = model(ids, position_ids=pos, use_cache=False, **flash).logits
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(ids, position_ids=pos, use_cache=False, **flash).logits
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    torch._dynamo.reset()
