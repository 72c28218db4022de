"""Decoding with a KV cache: `layer.new_cache(...)`, `layer.decode(q_new, cache, k_new, v_new)`.

A `KVCache` holds one layer's keys and values for a batch of sequences and every pooled
key/value grid the spec reads (block means, MLP-compressed blocks), in buffers with room to
grow. `append` writes the new tokens and pools again only the blocks they touch, so the
past is never recomputed. `decode` runs the layer's decode module (codegen/decode.py): the
select and attention stages of the same kernel plan for the new queries only, with the key
axis split over several programs when the cache is long, and a log-sum-exp merge.

Decoding token by token gives the outputs of the full-sequence forward (tests/test_decode.py):
every query reads only keys and whole blocks at or before it (the causality pass's proof),
and the cache's pooled blocks equal the forward's for every block a query can read.
"""
from __future__ import annotations

import math

import torch


class KVCache:
    """Keys, values and pooled blocks of one layer, for `batch` sequences of equal length.

    k, v: [batch, length, kv_heads, head_dim] views of buffers with room for `capacity`
    tokens (doubled when full). Pooled buffers have the cache's dtype on a GPU (as the
    forward pools them), float32 (float64 for a float64 cache) in the interpreter."""

    def __init__(self, layer, batch: int, kv_heads: int, head_dim: int,
                 head_dim_v: int | None = None, *, capacity: int = 1024,
                 device=None, dtype=torch.float32):
        if batch < 1 or kv_heads < 1 or head_dim < 1 or capacity < 1:
            raise ValueError(f"a cache needs batch, kv_heads, head_dim and capacity >= 1, got "
                             f"{batch}, {kv_heads}, {head_dim}, {capacity}")
        self.layer = layer
        self.batch, self.kv_heads = batch, kv_heads
        self.head_dim, self.head_dim_v = head_dim, head_dim_v or head_dim
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        # Triton 3.6's interpreter multiplies bfloat16 wrongly (see layer.forward): off the
        # GPU a bfloat16 cache stores float32 and outputs are rounded to bfloat16
        self._store = torch.float32 if (dtype == torch.bfloat16 and
                                        self.device.type != "cuda") else dtype
        self._acc = torch.float64 if dtype == torch.float64 else torch.float32
        # pooled keys as the forward pools them: in the inputs' dtype on a GPU
        self._pool_dtype = self._store if self.device.type == "cuda" else self._acc
        self.length = 0
        self._pool_stages = [st for st in layer.plan.stages if st.kind == "pool"]
        self._k = self._v = None
        self._pools: dict[str, torch.Tensor] = {}
        self._allocate(self._round(capacity))

    # ---- storage
    def _round(self, n: int) -> int:
        """A capacity that is a multiple of every pooled grid's stride (whole blocks)."""
        m = 1
        for st in self._pool_stages:
            m = m * st.grid.stride // math.gcd(m, st.grid.stride)
        return max(m, -(-n // m) * m)

    @property
    def capacity(self) -> int:
        return self._k.shape[1]

    def _allocate(self, capacity: int) -> None:
        B, HKV, dev = self.batch, self.kv_heads, self.device
        k = torch.zeros(B, capacity, HKV, self.head_dim, device=dev, dtype=self._store)
        v = torch.zeros(B, capacity, HKV, self.head_dim_v, device=dev, dtype=self._store)
        pools = {}
        for st in self._pool_stages:
            nb = -(-capacity // st.grid.stride)
            for side, d in (("k", self.head_dim), ("v", self.head_dim_v)):
                pools[f"{side}p{st.node}"] = torch.zeros(B, nb, HKV, d, device=dev,
                                                         dtype=self._pool_dtype)
        if self._k is not None:  # grow: keep what is there
            n = self.length
            k[:, :n], v[:, :n] = self._k[:, :n], self._v[:, :n]
            for name, buf in self._pools.items():
                pools[name][:, :buf.shape[1]] = buf
        self._k, self._v, self._pools = k, v, pools

    @property
    def k(self) -> torch.Tensor:
        return self._k[:, :self.length]

    @property
    def v(self) -> torch.Tensor:
        return self._v[:, :self.length]

    def pooled(self) -> dict[str, torch.Tensor]:
        """Every pooled grid's buffers up to the blocks that have started, by name
        (`kp<node>`, `vp<node>`)."""
        out = {}
        for st in self._pool_stages:
            nb = -(-self.length // st.grid.stride)
            for side in ("k", "v"):
                out[f"{side}p{st.node}"] = self._pools[f"{side}p{st.node}"][:, :nb]
        return out

    # ---- appending
    @torch.no_grad()
    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Add tokens: k_new [batch, n, kv_heads, head_dim], v_new likewise (head_dim_v)."""
        want_k = (self.batch, k_new.shape[1] if k_new.dim() == 4 else -1, self.kv_heads,
                  self.head_dim)
        if k_new.dim() != 4 or tuple(k_new.shape) != want_k:
            raise ValueError(f"k_new must be [batch={self.batch}, new tokens, kv_heads="
                             f"{self.kv_heads}, head_dim={self.head_dim}], got "
                             f"{tuple(k_new.shape)}")
        want_v = (self.batch, k_new.shape[1], self.kv_heads, self.head_dim_v)
        if tuple(v_new.shape) != want_v:
            raise ValueError(f"v_new must be {list(want_v)} (as k_new, head_dim_v="
                             f"{self.head_dim_v}), got {tuple(v_new.shape)}")
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t.device != self.device:
                raise ValueError(f"`{name}` is on {t.device}, the cache on {self.device}")
            if t.dtype != self.dtype:
                raise ValueError(f"`{name}` must have the cache's dtype {self.dtype}, got "
                                 f"{t.dtype}")
        n = k_new.shape[1]
        if n == 0:
            return
        lo, hi = self.length, self.length + n
        if hi > self.capacity:
            self._allocate(self._round(max(hi, 2 * self.capacity)))
        self._k[:, lo:hi] = k_new
        self._v[:, lo:hi] = v_new
        self.length = hi
        if self._pool_stages:
            params = {name: p.detach().to(self._acc).contiguous()
                      for name, p in self.layer.learnable().items()}
            self.layer._decode_kernels(self.device).update_pools(
                self._k, self._v, params, self._pools, lo, hi)

    def reset(self) -> None:
        """Forget every token (buffers are kept)."""
        self.length = 0
        self._k.zero_()
        self._v.zero_()
        for buf in self._pools.values():
            buf.zero_()

    def __repr__(self) -> str:
        return (f"KVCache(spec={self.layer.spec_name}, batch={self.batch}, length={self.length},"
                f" capacity={self.capacity}, kv_heads={self.kv_heads}, dtype={self.dtype})")


def default_splits(cache: KVCache, programs: int) -> int:
    """Key splits for a decode step: enough programs to fill a GPU (about 2 per SM of an
    H100) while each split keeps at least 512 keys of a long cache; 1 off the GPU."""
    if cache.device.type != "cuda":
        return 1
    want = -(-264 // max(1, programs))
    return max(1, min(want, cache.length // 512, 64))


@torch.no_grad()
def decode(layer, q_new, cache: KVCache, k_new=None, v_new=None, *, splits: int | None = None,
           return_lists: bool = False, **inputs):
    """Attention of the last q_new.shape[1] positions of the cache (after appending k_new,
    v_new when given): [batch, n, q_heads, head_dim_v] in the cache's dtype."""
    # everything is checked before anything is appended: a failed call leaves the cache as
    # it was (the cache checks k_new and v_new itself)
    if not isinstance(cache, KVCache) or cache.layer is not layer:
        raise ValueError("`cache` must be a KVCache made by this layer's new_cache(...)")
    if (k_new is None) != (v_new is None):
        raise ValueError("give both k_new and v_new, or neither (to decode tokens already "
                         "appended)")
    if not isinstance(q_new, torch.Tensor) or q_new.dim() != 4 or \
            q_new.shape[0] != cache.batch or q_new.shape[-1] != cache.head_dim:
        raise ValueError(f"q_new must be [batch={cache.batch}, new tokens, q_heads, head_dim="
                         f"{cache.head_dim}], got {tuple(getattr(q_new, 'shape', ()))}")
    n, H = q_new.shape[1], q_new.shape[2]
    if H % cache.kv_heads:
        raise ValueError(f"q heads ({H}) must be a multiple of the cache's kv_heads "
                         f"({cache.kv_heads})")
    if layer.dims is not None and (H != layer.dims.q_heads or
                                   cache.head_dim_v != layer.dims.head_dim_v):
        raise ValueError(f"this layer was compiled for {layer.dims.q_heads} query heads and v "
                         f"head_dim {layer.dims.head_dim_v}; got {H} and {cache.head_dim_v}")
    if q_new.device != cache.device or q_new.dtype != cache.dtype:
        raise ValueError(f"q_new must be on the cache's device {cache.device} with its dtype "
                         f"{cache.dtype}, got {q_new.device}, {q_new.dtype}")
    if splits is not None and splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    length = cache.length + (0 if k_new is None else k_new.shape[1])
    if not 1 <= n <= length:
        raise ValueError(f"q_new has {n} tokens but the cache holds {length}: append "
                         f"their keys and values first (or pass k_new, v_new)")
    inputs = layer._inputs(inputs)
    # the forward's checks, on the new tokens (gates and model inputs: [batch, n, ...])
    kv = q_new.new_zeros(cache.batch, n, cache.kv_heads, cache.head_dim)
    layer._check(q_new, kv, kv.new_zeros(*kv.shape[:3], cache.head_dim_v), inputs)
    if k_new is not None:
        cache.append(k_new, v_new)
    acc = cache._acc
    gates = {name: g.to(acc).contiguous() for name, g in layer._gates(inputs).items()}
    params = {name: p.detach().to(acc).contiguous() for name, p in layer.learnable().items()}
    q = q_new.to(cache._store).contiguous()
    S = splits if splits is not None else default_splits(cache, cache.batch * n * H)
    module = layer._decode_kernels(cache.device)
    out, lists = module.decode(q, cache._k, cache._v, gates, params, cache._pools,
                               cache.length - n, S)
    out = out.to(cache.dtype)
    return (out, lists) if return_lists else out


def decode_kernels(layer, device: torch.device):
    """The layer's decode module (codegen/decode.py) for a device, cached like the training
    kernels (one per spec text and parameters)."""
    from .cache import cache_key, load_module
    from .layer import _interpreted
    interpret = _interpreted(device)
    key = cache_key(layer._spec_text, layer.ir.param_values()) + "_decode"
    ir, plan = layer.ir, layer.plan

    def make_source():
        from ..codegen.decode import generate_decode
        return generate_decode(ir, plan)
    return load_module(key, make_source, interpret)
