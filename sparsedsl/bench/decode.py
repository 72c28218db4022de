"""`sparsedsl bench --decode`: one decode step against a KV cache of L tokens, per implementation.

Every row computes the attention of one new query, the last position p = L - 1 of a
sequence whose L keys and values are cached (batch 1), and is prepared outside the timing:

* sparsedsl: `layer.new_cache(...)` prefilled with one `cache.append` of the L keys and
  values (which pools every block), then `layer.decode(q1, cache, **gates1)`. Also timed:
  `cache.append(k1, v1)` of the last token alone and `layer.decode(q1, cache, k1, v1)` (append
  and step), the cache cut back to L - 1 tokens before each call.
* SDPA (cuDNN, flash): the query [1, H, 1, D] against the whole cache [1, Hkv, L, D], no mask
  (every cached key is at or before the query); GQA through enable_gqa, else kv heads
  repeated outside the timing, as the prefill rows do.
* FlexAttention: the same pattern as a BlockMask with one query row (Q_LEN 1, KV_LEN L; the
  mask_mod shifted to position p). For MoBA the mask holds the blocks that query selects,
  routed by q . mean key over the complete past blocks, whose means are kept beside the
  cache as sparsedsl's cache keeps them: `flex` is given the mask (its routing and build
  timed apart), `flex+routing` times routing, build and attention together.
* fla: `parallel_nsa` attends q and k of one length; it has no single-query decode, so its
  row says so.

The peers' outputs are compared with sparsedsl's decode output (and, for MoBA, their
selection with sparsedsl's block list of that step).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .cases import Case, Moba, WindowSinks
from .flexmasks import (moba_block_means, moba_decode_block_mask, moba_decode_mask_mod,
                        moba_decode_selected, moba_route_decode, window_sinks_decode_block_mask)
from .impls import DTYPE, CompiledLayer, _nbytes, _probe, compare, compiled_flex
from .measure import Prepared, Unavailable


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class DecodeInputs:
    """One case's cache and new token at one cache length, in sparsedsl's layout."""

    k: torch.Tensor   # [1, L, kv_heads, D]: every cached key, the new token's last
    v: torch.Tensor
    q1: torch.Tensor  # [1, 1, q_heads, D]: the query at position L - 1
    gates1: dict[str, torch.Tensor]  # [1, 1, q_heads] each

    @property
    def seq(self) -> int:
        return self.k.shape[1]

    @property
    def device(self) -> torch.device:
        return self.k.device


def make_inputs(case: Case, L: int, seed: int, device="cuda", dtype=DTYPE) -> DecodeInputs:
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    D = case.head_dim
    k, v = randn(1, L, case.kv_heads, D), randn(1, L, case.kv_heads, D)
    q1 = randn(1, 1, case.q_heads, D)
    gates = {n: torch.sigmoid(randn(1, 1, case.q_heads)) for n in case.gates}
    return DecodeInputs(k, v, q1, gates)


def _bhtd(t: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> contiguous [B, H, T, D]."""
    return t.transpose(1, 2).contiguous()


# ------------------------------------------------------------------------- sparsedsl
def prepare_sparsedsl(case: Case, inp: DecodeInputs, compiled: CompiledLayer) -> Prepared:
    from ..runtime.decode import default_splits
    layer, dev, L = compiled.layer, inp.device, inp.seq
    t0 = time.perf_counter()
    layer._decode_kernels(dev)
    load = time.perf_counter() - t0
    cache = layer.new_cache(1, case.kv_heads, case.head_dim, capacity=L, device=dev,
                            dtype=inp.k.dtype)
    t0 = time.perf_counter()
    cache.append(inp.k, inp.v)  # the whole prefix at once: every block pooled in one go
    _sync(dev)
    prefill = time.perf_counter() - t0
    q1, gates = inp.q1, inp.gates1
    k1, v1 = inp.k[:, L - 1:], inp.v[:, L - 1:]

    def fwd():
        return layer.decode(q1, cache, **gates)

    def append():  # the last token again: the same slot, the same blocks pooled again
        cache.length = L - 1
        try:
            cache.append(k1, v1)
        finally:
            cache.length = L

    def append_decode():
        cache.length = L - 1
        try:
            return layer.decode(q1, cache, k1, v1, **gates)
        finally:
            cache.length = L

    t0 = time.perf_counter()
    fwd()
    _sync(dev)
    first = time.perf_counter() - t0
    held = _nbytes(cache._k, cache._v, *cache._pools.values(), q1, *gates.values())
    notes = {"cold_spec_to_layer_s": compiled.cold_s, "cached_spec_to_layer_s": compiled.cached_s,
             "module_load_s": compiled.load_s, "decode_module_load_s": load,
             "prefill_append_s": prefill, "first_step_s": first,
             "splits": default_splits(cache, case.q_heads), "cache_capacity": cache.capacity,
             "cache_bytes": _nbytes(cache._k, cache._v, *cache._pools.values()),
             "timed": "layer.decode(q1, cache) at position L-1; append: cache.append(k1, v1) "
                      "of token L-1 (cache cut back to L-1 tokens first; when L is a multiple "
                      "of a pooled block, that token ends a block, which is pooled again "
                      "whole: the costliest append); append+decode: "
                      "layer.decode(q1, cache, k1, v1)"}
    return Prepared(fwd, [], None, lambda o: o, held, notes,
                    {"append": append, "append+decode": append_decode},
                    state={"layer": layer, "cache": cache, "q1": q1, "gates": gates})


def sparsedsl_reference_output(p: Prepared) -> tuple[torch.Tensor, dict]:
    """sparsedsl's decode output [1, 1, H, D] and block lists of the step, for the checks."""
    s = p.state
    out, lists = s["layer"].decode(s["q1"], s["cache"], return_lists=True, **s["gates"])
    return out.detach(), lists


# ------------------------------------------------------------------------------ SDPA
def prepare_sdpa(case: Case, inp: DecodeInputs, name: str) -> Prepared:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa-flash": SDPBackend.FLASH_ATTENTION}[name]
    q, k, v = _bhtd(inp.q1), _bhtd(inp.k), _bhtd(inp.v)
    gqa = case.q_heads != case.kv_heads

    def make(k, v, gqa):
        def fwd():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        return fwd

    notes = {"mask": "none: one query (position L-1) against every cached key"}
    fwd = make(k, v, gqa)
    err = _probe(fwd, inp.device)
    if err and gqa:  # the backend may refuse enable_gqa: repeat kv heads outside the timing
        k2 = k.repeat_interleave(case.group, 1)
        v2 = v.repeat_interleave(case.group, 1)
        fwd2 = make(k2, v2, False)
        if _probe(fwd2, inp.device) is None:
            fwd, k, v = fwd2, k2, v2
            notes["kv"] = (f"kv heads repeated to {case.q_heads} outside the timing (the step "
                           f"then reads {case.group}x the cache) ({err})")
            err = None
    if err:
        raise Unavailable(err)
    return Prepared(fwd, [], None, lambda o: o.transpose(1, 2), _nbytes(q, k, v), notes)


# --------------------------------------------------------------------- FlexAttention
def prepare_flex(case: Case, inp: DecodeInputs, name: str, compiled: bool = True) -> Prepared:
    """`compiled=False`: eager flex_attention (the CPU tests; on a GPU it is slow)."""
    if compiled:
        flex = compiled_flex()
    else:
        from torch.nn.attention.flex_attention import flex_attention as flex
    q, k, v = _bhtd(inp.q1), _bhtd(inp.k), _bhtd(inp.v)
    gqa = case.q_heads != case.kv_heads
    L, dev = inp.seq, inp.device
    pat = case.pattern
    state, extra = {}, {}
    kernel = ("FlexAttention picks its decoding kernel (flex_decoding) for query length < 128 "
              "when the mask has 1 head or, without GQA, one per query head")
    if isinstance(pat, Moba):
        kmean = moba_block_means(k, pat.block)  # kept beside the cache: outside the timing
        with torch.no_grad():
            sel = moba_route_decode(q, kmean, L - 1, pat.block, pat.topk)
        mask_mod = moba_decode_mask_mod(sel, pat.block, L - 1)

        def build():
            with torch.no_grad():
                sel.copy_(moba_route_decode(q, kmean, L - 1, pat.block, pat.topk))
                return sel, moba_decode_block_mask(sel, pat.block, L, mask_mod=mask_mod)

        _, mask = build()
        state.update(sel=sel, L=L)
        notes = {"mask": f"routing of the query at L-1 (top-{pat.topk - 1} complete past blocks "
                         f"by q . mean key, the means kept beside the cache), own block; one "
                         f"row of {mask.BLOCK_SIZE[1]}-key tiles, exact mask_mod",
                 "kernel": kernel}
        if name == "flex":
            extra["routing+mask"] = build
            fwd = lambda: flex(q, k, v, block_mask=mask, enable_gqa=gqa)  # noqa: E731
        else:
            fwd = lambda: flex(q, k, v, block_mask=build()[1], enable_gqa=gqa)  # noqa: E731
            notes["timed"] = "routing + mask build + attention"
        held = _nbytes(q, k, v, kmean)
    elif isinstance(pat, WindowSinks):
        if name != "flex":
            raise Unavailable("a static pattern has no routing")

        def build():
            return window_sinks_decode_block_mask(L, pat.window, pat.sinks, dev)

        mask = build()
        extra["mask"] = build
        notes = {"mask": f"(sink {pat.sinks} | window {pat.window}) & causal at position L-1, "
                         f"one row of {mask.BLOCK_SIZE[1]}-key tiles", "kernel": kernel}
        fwd = lambda: flex(q, k, v, block_mask=mask, enable_gqa=gqa)  # noqa: E731
        held = _nbytes(q, k, v)
    else:
        raise Unavailable(f"no FlexAttention version of {type(pat).__name__}")
    return Prepared(fwd, [], None, lambda o: o.transpose(1, 2), held, notes, extra, state)


# ------------------------------------------------------------------------------- fla
def prepare_fla(case: Case, inp: DecodeInputs) -> Prepared:
    raise Unavailable("fla's parallel_nsa attends q and k of one length: no single-query "
                      "decode against a cache")


# ----------------------------------------------------------------------------- checks
def compare_moba(ref_out: torch.Tensor, lists: dict, out: torch.Tensor, sel: torch.Tensor,
                 block: int, L: int) -> dict:
    """A MoBA peer's decode output and selection [B, H, S] against sparsedsl's step: output
    error, heads whose selected blocks differ (near-ties can break either way), and the error
    where they agree."""
    res = compare(ref_out, out)
    if "sel" not in lists:
        return res
    mine = moba_decode_selected(sel, block, L)  # [B, H, n]
    idx = lists["sel"][:, -1].long()  # [B, H, KS]: sparsedsl's list of the step
    n = mine.shape[-1]
    theirs = torch.zeros(*idx.shape[:2], n + 1, dtype=torch.bool, device=idx.device)
    theirs.scatter_(-1, torch.where(idx >= 0, idx, n), True)
    agree = (mine == theirs[..., :n]).all(-1)  # [B, H]
    res["selection_rows_differ"] = int((~agree).sum())
    res["selection_rows"] = int(agree.numel())
    res["max_abs_err_same_selection"] = compare(ref_out, out, agree[:, None])["max_abs_err"]
    return res


def check(case: Case, prep: Prepared, ref) -> dict | str:
    """A peer's decode output against sparsedsl's (`ref`: its output and lists, or why it is
    missing)."""
    if ref is None:
        return "no sparsedsl output to compare with"
    if isinstance(ref, str):
        return f"sparsedsl output unavailable ({ref})"
    ref_out, lists = ref
    with torch.no_grad():
        out = prep.to_bthd(prep.fwd())
    if isinstance(case.pattern, Moba) and "sel" in prep.state:
        return compare_moba(ref_out, lists, out, prep.state["sel"], case.pattern.block,
                            prep.state["L"])
    return compare(ref_out, out)
