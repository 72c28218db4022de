"""The fast kernel launch (sparsedsl.runtime.launch).

Without a GPU its control flow is checked against stand-ins for Triton's pieces (the kernel's
binder, the compiled kernel's launcher, the driver): which calls go through Triton's own
`run`, and that the others launch the kernel Triton compiled for that specialisation, with
the same arguments, grid and stream. With SPARSEDSL_TEST_DEVICE=cuda the generated kernels
run through it for real: outputs and gradients equal those of Triton's path, on aligned and
misaligned inputs.
"""
from __future__ import annotations

import os

import pytest
import torch

from sparsedsl.runtime import launch

DEVICE = os.environ.get("SPARSEDSL_TEST_DEVICE", "cpu")


class _Compiled:
    """A compiled kernel: its launcher records what it was given."""

    def __init__(self, spec):
        self.spec, self.function, self.packed_metadata, self.launches = spec, object(), ("meta",), []

    def run(self, *a):
        self.launches.append(a)


class _Fn:
    """What _fast_run reads of a JITFunction. The binder specialises tensors (here: lists) by
    their 'alignment' (length % 2) and passes K through as a constexpr."""

    def __init__(self):
        self.debug, self.pre_run_hooks, self.used_global_vals = False, [], {}
        self.device_caches = {0: ({}, {}, None, None, self._binder)}
        self.slow_calls, self.compiled = [], {}

    @staticmethod
    def _binder(x, n, K=1, **options):
        spec = [("*fp32", "D" if len(x) % 2 == 0 else ""), ("i32", ""), ("constexpr", K)]
        return {"x": x, "n": n, "K": K}, spec, options

    def run(self, *args, grid, warmup, **kwargs):  # Triton's run: compiles once, launches
        bound, spec, options = self._binder(*args, **kwargs)
        self.slow_calls.append((args, grid, warmup))
        key = (tuple(spec), str(options))
        kernel = self.compiled.setdefault(key, _Compiled(spec))
        return kernel


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 77


@pytest.fixture
def fake(monkeypatch):
    from triton.runtime.driver import driver
    monkeypatch.setattr(driver, "_active", _Driver())
    fn = _Fn()
    fn.run = launch._fast_run(fn)
    return fn


def _noop(*a, **k):
    pass


def _launch(fn, grid, *args, **kw):
    return fn.run(*args, grid=grid, warmup=False, num_warps=4, **kw)


def test_first_call_compiles_then_launches_directly(fake):
    x = [1.0, 2.0]
    k1 = _launch(fake, (3,), x, 5, K=8)
    assert len(fake.slow_calls) == 1 and k1.launches == []  # Triton's run launched it
    k2 = _launch(fake, (3, 2), x, 6, K=8)
    assert k2 is k1 and len(fake.slow_calls) == 1
    (args,) = k1.launches
    assert args[:4] == (3, 2, 1, 77) and args[4] is k1.function
    assert args[5] == ("meta",) and args[6:9] == (None, None, None)
    assert args[9:] == (x, 6, 8)  # every parameter in order, constexprs included


def test_a_new_specialisation_goes_through_triton(fake):
    k1 = _launch(fake, (1,), [1.0, 2.0], 5, K=8)
    k2 = _launch(fake, (1,), [1.0], 5, K=8)  # 'misaligned'
    k3 = _launch(fake, (1,), [1.0, 2.0], 5, K=16)  # another constexpr
    k4 = fake.run([1.0, 2.0], 5, K=8, grid=(1,), warmup=False, num_warps=8)  # another option
    assert len({id(k) for k in (k1, k2, k3, k4)}) == 4 and len(fake.slow_calls) == 4
    _launch(fake, (1,), [3.0], 9, K=8)
    assert len(fake.slow_calls) == 4 and len(k2.launches) == 1


def test_hooks_warmup_and_changed_globals_go_through_triton(fake, monkeypatch):
    from triton import knobs
    _launch(fake, (1,), [1.0, 2.0], 5)
    knobs.runtime.launch_exit_hook.add(_noop)  # a profiler's hook
    try:
        _launch(fake, (1,), [1.0, 2.0], 5)
    finally:
        knobs.runtime.launch_exit_hook.remove(_noop)
    fake.pre_run_hooks.append(lambda *a, **k: None)
    _launch(fake, (1,), [1.0, 2.0], 5)
    fake.pre_run_hooks.clear()
    fake.run([1.0, 2.0], 5, grid=(1,), warmup=True, num_warps=4)
    g = {"C": 1}
    fake.used_global_vals = {("C", id(g)): (1, g)}
    k = _launch(fake, (1,), [1.0, 2.0], 5)
    assert len(fake.slow_calls) == 4 and len(k.launches) == 1
    g["C"] = 2  # Triton's run raises for this: it must see the call
    _launch(fake, (1,), [1.0, 2.0], 5)
    assert len(fake.slow_calls) == 5 and len(k.launches) == 1


def test_grid_may_be_a_function_of_the_arguments(fake):
    k = _launch(fake, lambda meta: (meta["n"] * 2,), [1.0, 2.0], 5)
    _launch(fake, lambda meta: (meta["n"] * 2,), [1.0, 2.0], 7)
    assert k.launches[0][:3] == (14, 1, 1)


def test_install_wraps_jit_functions_of_a_supported_triton(monkeypatch):
    import triton
    from triton.runtime.jit import JITFunction

    def kern(x):
        pass
    jf = JITFunction(kern)
    ns = {"kern": jf, "helper": len, "value": 3}
    monkeypatch.setattr(triton, "__version__", "9.0.0")
    assert launch.install(ns) == 0 and "run" not in vars(jf)
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert launch.install(ns) == 1 and "run" in vars(jf)
    assert launch.install(ns) == 0  # once


@pytest.mark.skipif(DEVICE != "cuda", reason="launches on a GPU (SPARSEDSL_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("offset", [0, 1])
def test_generated_kernels_launch_as_triton_does(offset):
    """MoBA's forward and backward through the fast path and through Triton's own run give
    the same bits; offset=1 starts q one element into its storage (not 16-byte aligned), a
    specialisation of its own."""
    import sparsedsl
    from triton.runtime.jit import JITFunction
    layer = sparsedsl.compile("moba", head_dim=64, q_heads=4, block=64, topk=3).to("cuda")
    g = torch.Generator().manual_seed(0)
    T = 333
    mk = lambda *s: torch.randn(*s, generator=g).to("cuda", torch.bfloat16)  # noqa: E731
    qs = mk(1 * T * 4 * 64 + offset)
    q = qs[offset:].view(1, T, 4, 64)
    k, v, do = mk(1, T, 4, 64), mk(1, T, 4, 64), mk(1, T, 4, 64)
    mod = layer._op.kernels(q.device)
    jits = [o for o in vars(mod).values() if type(o) is JITFunction]
    assert jits and all("run" in vars(o) for o in jits)

    def step():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        o = layer(qq, kk, vv)
        o.backward(do)
        return [o, qq.grad, kk.grad, vv.grad]

    fast = [step() for _ in range(2)]  # the second call launches directly
    saved = {o: vars(o).pop("run") for o in jits}
    try:
        slow = step()
    finally:
        for o, r in saved.items():
            o.run = r
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), slow, *fast):
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        if name == "dq":  # added atomically in float32: the order of the adds may differ
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(b, c)
        else:
            assert torch.equal(a, b) and torch.equal(b, c), name
