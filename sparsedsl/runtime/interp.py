"""Running generated kernels in Triton's interpreter (machines without a GPU).

Triton 3.6's interpreter re-patches `triton.language` (an `inspect.getmembers`
walk over the whole module) on every call of a nested jit function, and
`tl.sum`, `tl.max`, `tl.cumsum` are such functions: in our kernels that is
most of the interpreter's time. `install_speedups` patches the language once
per launch (both `triton.language` and `triton.language.core`, which nested
functions see) and skips the repeated walks. It only touches the interpreter,
is checked against the Triton version it was written for, and otherwise does
nothing.
"""
from __future__ import annotations

import types

_installed = False


def install_speedups() -> bool:
    global _installed
    if _installed:
        return True
    try:
        import triton
        import triton.language as tl
        from triton.runtime import interpreter as it
    except ImportError:  # pragma: no cover
        return False
    if not triton.__version__.startswith("3.6") or not hasattr(it, "_patch_lang") or \
            not hasattr(it, "GridExecutor"):
        return False
    orig_patch = it._patch_lang
    orig_call = it.GridExecutor.__call__
    state = {"launch": False, "patched": False}

    class _Keep:
        def restore(self):
            pass

    def both_langs():
        pass
    both_langs.__globals__["__sparsedsl_tl"] = tl  # noqa: B010  (make both visible)
    proxy = types.FunctionType(both_langs.__code__, {"tl": tl, "core": tl.core, "math": tl.math})

    def patch_lang(fn):
        if not state["launch"]:
            return orig_patch(fn)
        if not state["patched"]:
            state["patched"] = True
            return orig_patch(proxy)
        return _Keep()

    def call(self, *args, **kwargs):
        state["launch"], state["patched"] = True, False
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            state["launch"], state["patched"] = False, False

    it._patch_lang = patch_lang
    it.GridExecutor.__call__ = call
    _installed = True
    return True
