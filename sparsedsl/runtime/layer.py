"""`sparsedsl.compile(spec, **params)`: a spec as a trainable `torch.nn.Module`.

The layer owns the learnable tensors the spec declares (compression MLPs,
gate projections) as `nn.Parameter`s, checks its inputs before any launch,
and runs the generated kernels: natively on a CUDA GPU, in Triton's
interpreter on a machine without one (`TRITON_INTERPRET=1` is set then).
The kernels run through custom operators (`custom_op.py`): eager calls and
`torch.compile` (fullgraph) take the same path.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..ir.graph import IR
from ..reference.evaluate import check_inputs, needed_inputs
from ..reference.params import Dims, init_param, param_shapes


def _interpreted(device: torch.device) -> bool:
    """Whether kernels for `device` run in Triton's interpreter: off the GPU, yes.

    Triton decides at `import triton` (from TRITON_INTERPRET) whether its own library
    functions are interpreted, so the choice is per process: `sparsedsl.runtime` sets
    TRITON_INTERPRET=1 on a machine without a GPU before anything imports Triton."""
    if device.type == "cuda":
        return os.environ.get("TRITON_INTERPRET") == "1"
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "tensors on the CPU need Triton's interpreter, but Triton was loaded for the GPU in "
            "this process (something imported it before sparsedsl: torch._dynamo, "
            "torch.compile or transformers do): move q, k, v to CUDA, import sparsedsl.runtime "
            "first, or set TRITON_INTERPRET=1 before importing triton")
    from .interp import install_speedups
    install_speedups()
    import numpy
    major, minor = (int(x) for x in numpy.__version__.split(".")[:2])
    if (major, minor) >= (2, 3):
        raise RuntimeError(f"Triton's interpreter (used without a GPU) needs numpy < 2.3, found "
                           f"{numpy.__version__}: pip install 'numpy<2.3' (or sparsedsl[cpu])")
    return True


class SparseAttention(torch.nn.Module):
    """A compiled spec. forward(q, k, v, **inputs) -> [batch, seq, q_heads, head_dim_v]."""

    def __init__(self, ir: IR, spec_text: str, head_dim: int | None, q_heads: int | None,
                 head_dim_v: int | None, d_model: int | None, seed: int):
        super().__init__()
        self.ir = ir
        self.spec_name = ir.spec_name
        self._spec_text = spec_text
        from ..codegen.plan import plan_kernels
        self.plan = plan_kernels(ir)
        self._kernel_modules = {}  # interpreted? -> generated module
        self.dims = None
        self._param_names: dict[str, str] = {}
        needs_dims = bool(param_shapes_needed(ir))
        if needs_dims:
            missing = [n for n, v in (("head_dim", head_dim), ("q_heads", q_heads)) if v is None]
            if any(ir.node(n)["op"] == "linear" for n in ir.g.nodes) and d_model is None:
                missing.append("d_model")
            if missing:
                raise ValueError(f"spec `{ir.spec_name}` has learnable parts; give "
                                 f"{', '.join(missing)} to sparsedsl.compile(...)")
            self.dims = Dims(head_dim, head_dim_v or head_dim, q_heads, d_model)
            g = torch.Generator().manual_seed(seed)
            for name, shape in param_shapes(ir, self.dims).items():
                safe = name.replace(".", "__")
                self._param_names[name] = safe
                self.register_parameter(safe, torch.nn.Parameter(init_param(name, shape, g)))
        # what `forward` reads of the IR, as plain data (torch.compile traces no graph walk)
        self._gate_plan = _gate_plan(ir, self._param_names)
        self._list_strides = {st.name: st.grid.stride for st in self.plan.stages
                              if st.kind == "select"}  # block lists of packed batches
        names = tuple(ir.inputs)
        self._needed_table = {} if len(names) > 8 else {
            given: needed_inputs(ir, given) for given in
            (tuple(n for b, n in enumerate(names) if m >> b & 1) for m in range(2 ** len(names)))}
        self._op = self._make_op()

    # ---- what the compiled path runs
    @property
    def source(self) -> str:
        """The generated Triton source of this layer."""
        from ..codegen.emit import generate
        return generate(self.ir, self.plan)[0]

    def _kernels(self, device: torch.device | None = None):
        """The generated module for a device: native kernels for CUDA, interpreted ones
        elsewhere (one process can hold both)."""
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        interpret = _interpreted(device)
        if interpret not in self._kernel_modules:
            self._kernel_modules[interpret] = self._op.kernels(device)
        return self._kernel_modules[interpret]

    def _make_op(self):
        """The custom operators (`torch.library`) that run this layer's kernels: shared by
        every layer compiled from the same spec text and parameters, like the kernels."""
        from .cache import cache_key
        from .custom_op import attend_op
        gate_names = tuple(g.key for g in self._gate_plan)
        linear_owners = {self.ir.node(n)["facts"]["params"] for n in self.ir.g.nodes
                         if self.ir.node(n)["op"] == "linear"}
        # the kernels read the compression MLPs; gate projections run before the operator
        # (owners are IR labels such as `out.1`: match whole names, not the first component)
        gate_params = {f"{o}.{w}" for o in linear_owners for w in ("weight", "bias")}
        kernel_params = tuple(n for n in self._param_names if n not in gate_params)
        list_names = tuple(st.name for st in self.plan.stages if st.kind == "select")
        key = cache_key(self._spec_text, self.ir.param_values())
        ir, plan = self.ir, self.plan

        def make_source():
            from ..codegen.emit import generate
            return generate(ir, plan)[0]
        return attend_op(key, self.spec_name, make_source, gate_names, kernel_params, list_names)

    @property
    def op(self):
        """The forward custom operator (`torch.ops.sparsedsl.<spec>_<key>`)."""
        return self._op.forward

    def learnable(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, safe) for name, safe in self._param_names.items()}

    def _inputs(self, inputs: dict) -> dict:
        unknown = sorted(set(inputs) - set(self.ir.inputs))
        if unknown:
            raise ValueError(f"spec `{self.spec_name}` has no input {', '.join(map(repr, unknown))};"
                             f" its inputs are: {', '.join(self.ir.inputs) or 'none'}")
        return inputs

    def _needed(self, ir: IR, given: tuple[str, ...]) -> frozenset[str]:
        hit = self._needed_table.get(given)
        return hit if hit is not None else needed_inputs(ir, given)

    def _check(self, q, k, v, inputs):
        check_inputs(self.ir, q, k, v, inputs, needed=self._needed)
        if q.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"`q` must be float32, float16, bfloat16 or float64, got {q.dtype}")
        for name, t in inputs.items():
            if t.dtype != q.dtype and name in self.ir.inputs and self.ir.inputs[name].role == "x":
                raise ValueError(f"input `{name}` must have q's dtype {q.dtype}, got {t.dtype}")
        if self.dims is not None and self.dims.d_model is not None:
            for name, t in inputs.items():
                if self.ir.inputs[name].role == "x" and t.shape[-1] != self.dims.d_model:
                    raise ValueError(f"input `{name}` must be [batch={q.shape[0]}, "
                                     f"seq={q.shape[1]}, d_model={self.dims.d_model}] (this "
                                     f"layer's d_model), got {tuple(t.shape)}")
        if self.dims is not None:
            if q.shape[-1] != self.dims.head_dim or q.shape[2] != self.dims.q_heads or \
                    v.shape[-1] != self.dims.head_dim_v:
                raise ValueError(
                    f"this layer was compiled for q [batch, seq, {self.dims.q_heads}, "
                    f"{self.dims.head_dim}] and v head_dim {self.dims.head_dim_v}; got q "
                    f"{tuple(q.shape)}, v {tuple(v.shape)}")
        if not 1 <= q.shape[-1] <= 256 or not 1 <= v.shape[-1] <= 256:
            raise ValueError(f"head dims up to 256 are supported, got {q.shape[-1]}, {v.shape[-1]}")

    def _gates(self, inputs: dict) -> dict:
        """Every gate of the output's gated sum as a [B, T, H] tensor, keyed `g<node>`:
        a given tensor, else sigmoid(linear(x)) with this layer's weights."""
        gates = {}
        for g in self._gate_plan:
            given = next((inputs[n] for n in g.given if n in inputs), None)
            if given is None:
                x = inputs[g.x]
                w, b = getattr(self, g.weight), getattr(self, g.bias)
                dt = torch.promote_types(x.dtype, torch.float32)
                given = torch.sigmoid(x.to(dt) @ w.to(dt).T + b.to(dt))
            gates[g.key] = given.contiguous()
        return gates

    def forward(self, q, k, v, return_lists: bool = False, cu_seqlens=None,
                max_seqlen: int | None = None, **inputs):
        """Attention over q, k, v [batch, seq, heads, dim] and the spec's inputs: out
        [batch, seq, q_heads, head_dim_v], and with `return_lists` the selected block lists
        by name ([batch, seq, heads, KS] int32, -1 padded).

        Packed batches (flash-attn's convention): with `cu_seqlens` (int32 [num_seqs + 1],
        offsets from 0 to total) q, k, v are [1, total, heads, dim], every per-token input
        [1, total, ...], and so are the output and the lists (block indices relative to each
        sequence's start, -1 for blocks past its end); each sequence is attended alone.
        `max_seqlen` (a Python int, at least the longest sequence) saves reading it from
        `cu_seqlens`. The offsets are checked in one host sync (device-side asserts under
        `torch.compile`, which needs `max_seqlen`). The kernels run on num_seqs x max_seqlen
        rows, so very unequal lengths waste work: see `varlen.py`."""
        inputs = self._inputs(inputs)
        self._check(q, k, v, inputs)
        if cu_seqlens is not None:
            from .varlen import run_packed
            return run_packed(self._run, q, k, v, cu_seqlens, max_seqlen, return_lists, inputs,
                              self._list_strides)
        if max_seqlen is not None:
            raise ValueError("`max_seqlen` is for packed batches: give `cu_seqlens` with it")
        return self._run(q, k, v, return_lists, inputs)

    def _run(self, q, k, v, return_lists: bool, inputs: dict):
        """The operators on a checked batch."""
        dtype = q.dtype
        if dtype == torch.bfloat16 and q.device.type != "cuda":
            # Triton 3.6's interpreter multiplies bfloat16 matrices wrongly (triton-lang/triton
            # issue 11584): off the GPU, compute in float32 and round the output to bfloat16
            q, k, v = q.float(), k.float(), v.float()
        if torch.is_autocast_enabled(q.device.type):  # attention runs in the autocast dtype
            cast = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(cast), k.to(cast), v.to(cast)
            dtype = cast
        gates = self._gates(inputs)
        learnable = self.learnable()
        # the kernels accumulate in float32 (float64 for float64 inputs)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        gates = [gates[n].to(acc).contiguous() for n in self._op.gate_names]
        params = [learnable[n].to(acc).contiguous() for n in self._op.param_names]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        save = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *gates, *params))
        outs = self._op.run(q, k, v, gates, params, save)  # the operator, or eager
        out = outs[0].to(dtype)
        if return_lists:
            return out, dict(zip(self._op.list_names, outs[1:1 + len(self._op.list_names)]))
        return out

    # ---- decoding with a KV cache (runtime/decode.py, codegen/decode.py)
    def new_cache(self, batch: int, kv_heads: int, head_dim: int, head_dim_v: int | None = None,
                  *, capacity: int = 1024, device=None, dtype=torch.float32):
        """An empty `KVCache` for this layer: keys, values and every pooled grid the spec
        reads, kept up to date as tokens are appended (it grows as needed)."""
        from .decode import KVCache
        return KVCache(self, batch, kv_heads, head_dim, head_dim_v, capacity=capacity,
                       device=device, dtype=dtype)

    def decode(self, q_new, cache, k_new=None, v_new=None, *, splits: int | None = None,
               return_lists: bool = False, **inputs):
        """Outputs of the last q_new.shape[1] positions against the cache, after appending
        k_new, v_new when given: equal to those rows of the full-sequence forward. Gate
        inputs hold the new tokens only. Not differentiable (inference)."""
        from .decode import decode
        return decode(self, q_new, cache, k_new, v_new, splits=splits,
                      return_lists=return_lists, **inputs)

    def _decode_kernels(self, device: torch.device):
        from .decode import decode_kernels
        return decode_kernels(self, device)

    def reference(self, q, k, v, return_details: bool = False, selections=None,
                  cu_seqlens=None, **inputs):
        """The dense float64 reference with this layer's own parameters. With `cu_seqlens`
        (a packed batch, as in `forward`) each sequence is evaluated alone and the outputs
        are packed back (no details or given selections then)."""
        if cu_seqlens is not None:
            from .varlen import reference_packed
            if return_details or selections is not None:
                raise ValueError("`return_details` and `selections` are for one batch: call "
                                 "`reference` on each sequence of a packed batch")
            return reference_packed(self.reference, q, k, v, cu_seqlens, inputs)
        from ..reference import reference
        return reference(self.ir, q, k, v, params={n: p.detach().to(q.device) for n, p in
                                                   self.learnable().items()},
                         return_details=return_details, selections=selections, **inputs)

    def to_block_mask(self, seq_len: int, device=None, block_size: int | tuple[int, int] = 128):
        """An equivalent FlexAttention `BlockMask` at `seq_len`, for specs without
        data-dependent selection (`sparsedsl.integrations.flex`); a NotAMaskError saying why
        otherwise."""
        from ..integrations.flex import to_block_mask
        return to_block_mask(self, seq_len, device, block_size)

    def extra_repr(self) -> str:
        pv = ", ".join(f"{k}={v}" for k, v in self.ir.param_values().items())
        return f"spec={self.spec_name}({pv}), strategy={self.plan.strategy.split(':')[0]!r}"


@dataclass(frozen=True)
class _GateSource:
    """Where gate `key` (`g<node>`) comes from: the first input in `given` that the call
    passes, else sigmoid(x @ weight.T + bias) with the layer's parameters (attribute names)."""
    key: str
    given: tuple[str, ...]
    x: str | None
    weight: str | None
    bias: str | None


def _gate_plan(ir: IR, param_attrs: dict[str, str]) -> tuple[_GateSource, ...]:
    out = ir.out
    if ir.node(out)["op"] != "mix":
        return ()
    plan = []
    for arg, nid in ir.operands(out).items():
        if not arg.startswith("gate."):
            continue
        key, given, node = f"g{nid}", [], nid
        while ir.node(node)["op"] == "input":
            given.append(ir.node(node)["args"]["name"])
            node = ir.operand(node, "default")
            if node is None:  # a gate with no default: the call must give it (checked)
                break
        x = weight = bias = None
        if node is not None:
            assert ir.node(node)["op"] == "sigmoid", ir.node(node)["op"]
            lin = ir.operand(node, "logits")
            owner = ir.node(lin)["facts"]["params"]
            x = ir.node(ir.operand(lin, "x"))["args"]["name"]
            weight, bias = param_attrs[f"{owner}.weight"], param_attrs[f"{owner}.bias"]
        plan.append(_GateSource(key, tuple(given), x, weight, bias))
    return tuple(plan)


def param_shapes_needed(ir: IR) -> bool:
    return any(ir.node(n)["op"] == "linear" or (ir.node(n)["op"] == "pool" and
                                               ir.node(n)["args"]["method"] == "mlp")
               for n in ir.g.nodes)


def compile(spec, *, head_dim: int | None = None, q_heads: int | None = None,
            head_dim_v: int | None = None, d_model: int | None = None, seed: int = 0,
            **params) -> SparseAttention:
    """Compile a spec (built-in name, path or text) with parameter overrides to a layer."""
    from ..frontend.load import load_source
    from ..pipeline import lower
    source = load_source(spec)
    ir = lower(source, params)
    return SparseAttention(ir, source.text, head_dim, q_heads, head_dim_v, d_model, seed)


del math
