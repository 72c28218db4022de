"""Launching generated kernels on the GPU with less host time.

`kernel[grid](*args, **kw)` goes through Triton's `JITFunction.run`: the kernel's binder
works out the call's specialisation (each tensor's dtype and 16-byte alignment, each
integer's range and divisibility, the constexprs and options), then the run builds a string
cache key from it, finds the compiled kernel, checks the globals the kernel read, gathers
launch metadata for profiling hooks and calls the compiled kernel's launcher. On the lent
H100's host that is 16-45 us a launch for our kernels (docs/perf-notes.md, session 17),
and MoBA's forward makes six of them: at 8k its host time is as long as its GPU time.

`install(module_dict)` gives every jit function of a generated module its own `run`: the
same binder, then a dict keyed by the specialisation itself (what Triton's string key is
made from), then the compiled kernel's launcher. The first call of each specialisation,
warm-ups, and calls made while a launch hook or pre-run hook is set go through Triton's own
`run`, which compiles and records. What is launched is what Triton would launch: the same
compiled kernel, the same argument values, the same stream. Written against Triton 3.6 and
checked against it: with another version, or in the interpreter, nothing is installed.
"""
from __future__ import annotations

_TESTED = ("3.6.",)


def supported() -> bool:
    """Whether this Triton is one the fast path was written and tested against."""
    import triton
    return triton.__version__.startswith(_TESTED)


def install(namespace: dict) -> int:
    """Give each jit function in `namespace` (a generated module's globals) the fast `run`;
    returns how many. Jit helpers that kernels call are never launched, so theirs is unused."""
    if not supported():
        return 0
    from triton.runtime.jit import JITFunction
    n = 0
    for obj in namespace.values():
        if type(obj) is JITFunction and "run" not in vars(obj):
            obj.run = _fast_run(obj)
            n += 1
    return n


def _fast_run(fn):
    from triton import knobs
    from triton.knobs import HookChain
    from triton.runtime.driver import driver
    slow = fn.run  # Triton's JITFunction.run, bound
    launched = {}  # (device, specialisation, options) -> compiled kernel
    hooks = fn.pre_run_hooks

    def _hooked(hook) -> bool:
        """Whether a launch hook is set: Triton 3.6 keeps an empty chain of hooks (a
        profiler such as proton adds to it), which its run calls twice a launch even so."""
        return hook is not None and not (type(hook) is HookChain and not hook.calls)

    def run(*args, grid, warmup, **kwargs):
        rt = knobs.runtime
        if warmup or hooks or _hooked(rt.launch_enter_hook) or _hooked(rt.launch_exit_hook):
            return slow(*args, grid=grid, warmup=warmup, **kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or rt.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        device = driver.active.get_current_device()
        binder = fn.device_caches[device][4]
        bound, specialization, options = binder(*args, **kwargs)
        key = (device, tuple(specialization), tuple(options.items()))
        kernel = launched.get(key)
        if kernel is None:
            kernel = slow(*args, grid=grid, warmup=False, **kwargs)
            if kernel is not None and not hasattr(kernel, "result"):  # (not an async compile)
                launched[key] = kernel
            return kernel
        for (name, _), (val, globals_dict) in fn.used_global_vals.items():  # as run checks
            if globals_dict.get(name, _MISSING) != val:  # (run raises: let it)
                return slow(*args, grid=grid, warmup=False, **kwargs)
        if callable(grid):
            grid = grid(bound)
        n = len(grid)
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1,
                   driver.active.get_current_stream(device), kernel.function,
                   kernel.packed_metadata, None, None, None, *bound.values())
        return kernel

    return run


_MISSING = object()
