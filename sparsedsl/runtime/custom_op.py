"""The generated kernels as PyTorch custom operators, so `torch.compile` sees one opaque op.

Every generated kernel module (one per spec text and parameter values: the kernel cache's
key) gets two operators, registered with `torch.library.custom_op`:

    sparsedsl::<spec>_<key>(q, k, v, gates, params, save) -> [out, *lists, *saved]
    sparsedsl::<spec>_<key>_bwd(q, k, v, gates, params, saved, do)
                                                       -> [dq, dk, dv, *dgates, *dparams]

`gates` are the gated sum's gates ([B, T, Hq] each, in `gate_names` order) and `params` the
learnable tensors the kernels read (`param_names`: MLP compression weights; the gate
projections `linear(x)` run in PyTorch before the op). `lists` are the selected block lists
(`list_names`, one per select stage of the plan) and `saved` what the backward needs
(block lists, each group's output and log-sum-exp, pooled keys): the forward returns them
as outputs so that autograd (`register_autograd`) can hand them to the backward operator.

In plain eager mode (`eager_ok`: not compiling, no dispatch mode or functorch transform, plain
tensors) `AttendOp.run` skips the operators' dispatch: the same host code runs directly, inside
a `torch.autograd.Function` with the same autograd formula when gradients are needed. The
dispatch and the custom operator's autograd wrapper cost more host time than the generated
host code itself at short sequences (MoBA at 8k on the H100, docs/perf-notes.md); under
`torch.compile`, export or a dispatch mode the operators run, so the compiler sees them.

Shapes for tracing (`register_fake`): the generated host code only computes sizes,
allocates and launches kernels, so the fake implementation runs that same host code on fake
tensors with every kernel launch replaced by a no-op. Its allocations are exactly what a real
run returns; `torch.library.opcheck` checks that in tests/test_torch_compile.py.
"""
from __future__ import annotations

import re
import types

import torch

_OPS: dict[str, "AttendOp"] = {}  # kernel cache key -> its operators (one per process)


def attend_op(key: str, spec_name: str, make_source, gate_names: tuple[str, ...],
              param_names: tuple[str, ...], list_names: tuple[str, ...]) -> "AttendOp":
    """The operators of the kernel module `key`, registered on first use."""
    op = _OPS.get(key)
    if op is None:
        op = _OPS[key] = AttendOp(key, spec_name, make_source, gate_names, param_names,
                                  list_names)
    assert (op.gate_names, op.param_names, op.list_names) == (gate_names, param_names,
                                                              list_names), key
    return op


class _NoLaunch:
    """Stands for a kernel in the fake (shape-only) run: `kernel[grid](...)` does nothing."""

    def __init__(self, name: str):
        self.name = name

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


def _shape_only(module) -> dict:
    """The module's namespace with every kernel a `_NoLaunch` and every host function
    rebound to that namespace (so helpers that launch kernels launch nothing)."""
    from triton.runtime.jit import KernelInterface
    ns = dict(module.__dict__)
    for name, obj in module.__dict__.items():
        if isinstance(obj, KernelInterface):
            ns[name] = _NoLaunch(name)
    for name, obj in module.__dict__.items():
        if isinstance(obj, types.FunctionType) and obj.__globals__ is module.__dict__:
            ns[name] = types.FunctionType(obj.__code__, ns, obj.__name__, obj.__defaults__,
                                          obj.__closure__)
    return ns


class AttendOp:
    """The forward and backward operators of one kernel module, with their shape functions
    and autograd formula."""

    def __init__(self, key: str, spec_name: str, make_source, gate_names, param_names,
                 list_names):
        self.key = key
        self.make_source = make_source
        self.gate_names = tuple(gate_names)
        self.param_names = tuple(param_names)
        self.list_names = tuple(list_names)
        # where each saved tensor is among the forward's outputs (name, index), by `save`;
        # the host code's structure depends on nothing else
        self._saved_at: dict[bool, tuple[tuple[str, int], ...]] = {}
        self._fake_ns: dict[int, dict] = {}
        base = re.sub(r"\W", "_", spec_name)
        self.name = f"sparsedsl::{base}_{key[:16]}"
        lib_fwd = torch.library.custom_op(self.name, mutates_args=())(self._forward_impl_typed())
        lib_bwd = torch.library.custom_op(self.name + "_bwd", mutates_args=())(
            self._backward_impl_typed())
        lib_fwd.register_fake(self._forward_fake)
        lib_bwd.register_fake(self._backward_fake)
        lib_fwd.register_autograd(self._backward, setup_context=self._setup_context)
        self.forward, self.backward_op = lib_fwd, lib_bwd

    def run(self, q, k, v, gates: list, params: list, save: bool) -> list:
        """The forward operator's outputs: through `torch.library` when something traces or
        intercepts the call, else the same host code directly (`eager_ok`)."""
        if not eager_ok(q, k, v, *gates, *params):
            return self.forward(q, k, v, gates, params, save)
        if save:
            return list(_EagerAttend.apply(self, len(gates), q, k, v, *gates, *params))
        return self._run_forward(q, k, v, gates, params, False, fake=False)

    def __deepcopy__(self, memo):  # shared by every layer of its key, like the kernels
        return self

    # ---- the kernel module
    def kernels(self, device: torch.device):
        from .cache import load_module
        from .layer import _interpreted
        return load_module(self.key, self.make_source, _interpreted(device))

    def _host(self, device: torch.device, fake: bool) -> dict:
        module = self.kernels(device)
        if not fake:
            return module.__dict__
        ns = self._fake_ns.get(id(module))
        if ns is None:
            ns = self._fake_ns[id(module)] = _shape_only(module)
        return ns

    # ---- forward
    def _forward_impl_typed(self):
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: list[torch.Tensor],
                   params: list[torch.Tensor], save: bool) -> list[torch.Tensor]:
            return self._run_forward(q, k, v, gates, params, save, fake=False)
        return attend

    def _forward_fake(self, q, k, v, gates, params, save):
        return self._run_forward(q, k, v, gates, params, save, fake=True)

    def _run_forward(self, q, k, v, gates, params, save, fake):
        host = self._host(q.device, fake)
        out, lists, saved = host["forward"](q, k, v, dict(zip(self.gate_names, gates)),
                                            dict(zip(self.param_names, params)), save=save)
        assert set(lists) == set(self.list_names), (sorted(lists), self.list_names)
        flat = [out] + [lists[n] for n in self.list_names]
        at = []
        for name, t in (saved or {}).items():
            i = next((j for j, u in enumerate(flat) if u is t), None)
            if i is None:
                flat.append(t)
                i = len(flat) - 1
            at.append((name, i))
        at = tuple(at)
        assert self._saved_at.setdefault(save, at) == at, (self._saved_at[save], at)
        inputs = (q, k, v, *gates, *params)
        # an operator's outputs must not be its inputs
        return [t.clone() if any(t is u for u in inputs) else t for t in flat]

    # ---- autograd
    def _setup_context(self, ctx, inputs, output):
        q, k, v, gates, params, save = inputs
        if not save:
            raise RuntimeError(f"{self.name}: gradients were asked of a call made with "
                               f"save=False")
        saved = [output[i] for _, i in self._saved_at[True]]
        # block lists and saved state are outputs only to reach the backward: not values
        # anything differentiates
        ctx.mark_non_differentiable(*output[1:])
        # and get no zero-filled gradients either: autograd would otherwise materialise one
        # per output, the saved float32 branch outputs included (4 GiB for NSA at 64k)
        ctx.set_materialize_grads(False)
        ctx.counts = (len(gates), len(params))
        ctx.save_for_backward(q, k, v, *gates, *params, *saved)

    def _backward(self, ctx, grads, run=None):
        """Gradients of (q, k, v, gates, params, save) from the saved state, by the backward
        operator (or `run`, with its arguments: the eager path's host code)."""
        ng, npar = ctx.counts
        q, k, v, *rest = ctx.saved_tensors
        gates, params, saved = rest[:ng], rest[ng:ng + npar], rest[ng + npar:]
        do = grads[0]
        if do is None:  # only the block lists were used: no gradient reaches the inputs
            return None, None, None, [None] * ng, [None] * npar, None
        dq, dk, dv, *dgp = (run or self.backward_op)(q, k, v, list(gates), list(params),
                                                     list(saved), do.to(q.dtype))
        dgates = [g.to(t.dtype) for g, t in zip(dgp[:ng], gates)]
        dparams = [g.to(t.dtype) for g, t in zip(dgp[ng:], params)]
        return dq, dk, dv, dgates, dparams, None

    # ---- backward
    def _backward_impl_typed(self):
        def attend_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       gates: list[torch.Tensor], params: list[torch.Tensor],
                       saved: list[torch.Tensor], do: torch.Tensor) -> list[torch.Tensor]:
            return self._run_backward(q, k, v, gates, params, saved, do, fake=False)
        return attend_bwd

    def _backward_fake(self, q, k, v, gates, params, saved, do):
        return self._run_backward(q, k, v, gates, params, saved, do, fake=True)

    def _run_backward(self, q, k, v, gates, params, saved, do, fake):
        host = self._host(q.device, fake)
        names = [n for n, _ in self._saved_at[True]]
        dq, dk, dv, dgates, dparams = host["backward"](
            q, k, v, dict(zip(self.gate_names, gates)), dict(zip(self.param_names, params)),
            dict(zip(names, saved)), do)
        assert set(dgates) == set(self.gate_names) and set(dparams) == set(self.param_names), \
            (sorted(dgates), sorted(dparams))
        flat = [dq, dk, dv] + [dgates[n] for n in self.gate_names] + \
            [dparams[n] for n in self.param_names]
        inputs = (q, k, v, *gates, *params, *saved, do)
        return [t.clone() if any(t is u for u in inputs) else t for t in flat]


def eager_ok(*tensors: torch.Tensor) -> bool:
    """Whether a call can skip the operators' dispatch: nothing compiles or exports it, no
    dispatch mode (FakeTensorMode, a FlopCounterMode, ...) or functorch transform (vmap,
    grad) is active, and the tensors are plain (a tensor subclass may override dispatch)."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._are_functorch_transforms_active()
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors))


class _EagerAttend(torch.autograd.Function):
    """The forward operator's host code with its autograd formula (`AttendOp._setup_context`,
    `AttendOp._backward`), without the operators' dispatch: for plain eager calls that need
    gradients. Inputs: the op, the number of gates, then q, k, v, *gates, *params."""

    @staticmethod
    def forward(ctx, op: AttendOp, ng: int, q, k, v, *rest):
        gates, params = list(rest[:ng]), list(rest[ng:])
        outs = op._run_forward(q, k, v, gates, params, True, fake=False)
        op._setup_context(ctx, (q, k, v, gates, params, True), outs)
        ctx.op = op
        return tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        op = ctx.op

        def run(q, k, v, gates, params, saved, do):
            return op._run_backward(q, k, v, gates, params, saved, do, fake=False)
        dq, dk, dv, dgates, dparams, _ = op._backward(ctx, grads, run)
        return None, None, dq, dk, dv, *dgates, *dparams
