"""The implementations each case is run with, prepared on the same inputs.

Every `prepare_*` returns a `measure.Prepared` (or raises `measure.Unavailable`),
and does all layout work (transposes, contiguous copies, repeated kv heads,
FlexAttention's routing for the mask-given row) before anything is timed.
sparsedsl and fla take [batch, seq, heads, dim]; SDPA and FlexAttention
[batch, heads, seq, dim]: each gets contiguous tensors in its own layout.
"""
from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from .cases import Case, Moba, Nsa, WindowSinks
from .flexmasks import (moba_block_mask, moba_mask_mod, moba_route, moba_selected,
                        window_sinks_block_mask)
from .measure import Prepared, Unavailable, describe_error

DTYPE = torch.bfloat16
DENSE = ("sdpa-cudnn", "sdpa-flash")


@dataclass
class Inputs:
    """One case's inputs at one length, in sparsedsl's layout [batch, seq, heads, dim]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    gates: dict[str, torch.Tensor]

    @property
    def seq(self) -> int:
        return self.q.shape[1]


def make_inputs(case: Case, T: int, seed: int, device="cuda") -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(DTYPE)

    D = case.head_dim
    q, k, v = randn(1, T, case.q_heads, D), randn(1, T, case.kv_heads, D), \
        randn(1, T, case.kv_heads, D)
    dout = randn(1, T, case.q_heads, D)
    gates = {n: torch.sigmoid(randn(1, T, case.q_heads)) for n in case.gates}
    return Inputs(q, k, v, dout, gates)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _bhtd(t: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] -> a contiguous [B, H, T, D] leaf."""
    return t.detach().transpose(1, 2).contiguous().requires_grad_(True)


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# ------------------------------------------------------------------------- sparsedsl
@dataclass
class CompiledLayer:
    layer: object
    cold_s: float    # compile() + source generation, first time in this process
    cached_s: float  # compile() + the generated module, once it is cached (median of five)
    load_s: float    # loading the generated module (disk cache, or generating it)


def case_layer(case: Case):
    """sparsedsl's layer for a case: the one the bench times and `sparsedsl tune --case`
    tunes (the same spec and parameters: the same generated module and tuning file)."""
    import sparsedsl
    return sparsedsl.compile(case.spec, head_dim=case.head_dim, q_heads=case.q_heads,
                             d_model=case.q_heads * case.head_dim, **dict(case.params))


def compile_layer(case: Case, device="cuda") -> CompiledLayer:
    """sparsedsl.compile for a case, timing the spec -> layer path (Triton excluded: its
    kernels compile at the first launch): cold (the first compile in the process) and
    cached (again, the generated module found: the median of five)."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    layer = case_layer(case)
    _ = layer.source
    cold = time.perf_counter() - t0
    layer = layer.to(dev)
    t0 = time.perf_counter()
    layer._kernels(dev)
    load = time.perf_counter() - t0
    cached = []  # the median of five: one call can catch a garbage collection or the host's noise
    for _ in range(5):
        t0 = time.perf_counter()
        again = case_layer(case)
        again._kernels(dev)
        cached.append(time.perf_counter() - t0)
    return CompiledLayer(layer, cold, statistics.median(cached), load)


def prepare_sparsedsl(case: Case, inp: Inputs, compiled: CompiledLayer) -> Prepared:
    layer = compiled.layer
    q, k, v = _leaf(inp.q), _leaf(inp.k), _leaf(inp.v)
    gates = {n: _leaf(t) for n, t in inp.gates.items()}
    params = [p for p in layer.parameters() if p.requires_grad]

    def fwd():
        return layer(q, k, v, **gates)

    t0 = time.perf_counter()
    with torch.no_grad():
        fwd()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    notes = {"cold_spec_to_layer_s": compiled.cold_s, "cached_spec_to_layer_s": compiled.cached_s,
             "module_load_s": compiled.load_s, "first_forward_s": first,
             "strategy": layer.plan.strategy,
             # the knob settings `sparsedsl tune` recorded for this call (none: the defaults)
             "tuned": layer._kernels(q.device)._tuned(q, k, v)}
    return Prepared(fwd, [q, k, v, *gates.values(), *params], inp.dout, lambda o: o,
                    _nbytes(q, k, v, *gates.values()), notes,
                    state={"layer": layer, "q": q, "k": k, "v": v, "gates": gates})


def sparsedsl_reference_output(p: Prepared) -> tuple[torch.Tensor, dict]:
    """sparsedsl's output and block lists on the benchmark inputs, for the peers' checks."""
    s = p.state
    with torch.no_grad():
        out, lists = s["layer"](s["q"], s["k"], s["v"], return_lists=True, **s["gates"])
    return out.detach(), lists


# ------------------------------------------------------------------------------ SDPA
def _probe(fwd, device: torch.device | None = None) -> str | None:
    """Run a forward once; None if it works, else why not (SDPA's warnings say why a
    backend refused). Synchronises CUDA unless `device` is another device."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                fwd()
            if device is None or device.type == "cuda":
                torch.cuda.synchronize()
            return None
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            why = [str(w.message).strip().splitlines()[0] for w in caught
                   if "kernel not used because" in str(w.message) or "requires" in str(w.message)]
            return "; ".join([describe_error(e)] + why[:3])


def prepare_sdpa(case: Case, inp: Inputs, name: str) -> Prepared:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa-flash": SDPBackend.FLASH_ATTENTION}[name]
    q, k, v = _bhtd(inp.q), _bhtd(inp.k), _bhtd(inp.v)
    dout = inp.dout.transpose(1, 2).contiguous()
    gqa = case.q_heads != case.kv_heads

    def make(k, v, gqa):
        def fwd():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return fwd

    notes = {"mask": "dense causal (is_causal=True)"}
    fwd = make(k, v, gqa)
    err = _probe(fwd)
    if err and gqa:  # the backend may refuse enable_gqa: repeat kv heads outside the timing
        k2 = k.detach().repeat_interleave(case.group, 1).requires_grad_(True)
        v2 = v.detach().repeat_interleave(case.group, 1).requires_grad_(True)
        fwd2 = make(k2, v2, False)
        if _probe(fwd2) is None:
            fwd, k, v = fwd2, k2, v2
            notes["kv"] = f"kv heads repeated to {case.q_heads} outside the timing ({err})"
            err = None
    if err:
        raise Unavailable(err)
    return Prepared(fwd, [q, k, v], dout, lambda o: o.transpose(1, 2), _nbytes(q, k, v), notes)


# --------------------------------------------------------------------- FlexAttention
_FLEX = None


def compiled_flex():
    """flex_attention under torch.compile (eager flex materialises the score matrix). Every
    length and mask recompiles: raise dynamo's recompile limits so none falls back to eager."""
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention
        cfg = torch._dynamo.config
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            try:
                if hasattr(cfg, knob):
                    setattr(cfg, knob, max(int(getattr(cfg, knob)), 512))
            except Exception:  # noqa: BLE001 - an alias that cannot be set: the other one is
                pass
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def prepare_flex(case: Case, inp: Inputs, name: str) -> Prepared:
    q, k, v = _bhtd(inp.q), _bhtd(inp.k), _bhtd(inp.v)
    dout = inp.dout.transpose(1, 2).contiguous()
    gqa = case.q_heads != case.kv_heads
    T = inp.seq
    flex = compiled_flex()
    pat = case.pattern
    state = {}
    extra = {}
    if isinstance(pat, Moba):
        # one selection buffer and one mask_mod reading it, refilled by every routing
        with torch.no_grad():
            sel = moba_route(q, k, pat.block, pat.topk)
        mask_mod = moba_mask_mod(sel, pat.block)

        def build():
            with torch.no_grad():
                sel.copy_(moba_route(q, k, pat.block, pat.topk))
                return sel, moba_block_mask(sel, pat.block, T, mask_mod=mask_mod)

        _, mask = build()
        state["sel"] = sel
        notes = {"mask": f"per-token routing (top-{pat.topk - 1} complete past blocks by "
                         f"q . mean key, own block, causal); BlockMask per {mask.BLOCK_SIZE} "
                         f"tiles, exact mask_mod"}
        if name == "flex":
            extra["routing+mask"] = build
            fwd = lambda: flex(q, k, v, block_mask=mask, enable_gqa=gqa)  # noqa: E731
        else:
            fwd = lambda: flex(q, k, v, block_mask=build()[1], enable_gqa=gqa)  # noqa: E731
            notes["timed"] = "routing + mask build + attention"
    elif isinstance(pat, WindowSinks):
        if name != "flex":
            raise Unavailable("a static pattern has no routing")

        def build():
            return window_sinks_block_mask(T, pat.window, pat.sinks, q.device, compile_mask=True)

        mask = build()
        extra["mask"] = build
        notes = {"mask": f"and_masks(or_masks(sink {pat.sinks}, window {pat.window}), causal) "
                         f"via create_block_mask"}
        fwd = lambda: flex(q, k, v, block_mask=mask, enable_gqa=gqa)  # noqa: E731
    else:
        raise Unavailable(f"no FlexAttention version of {type(pat).__name__}")
    return Prepared(fwd, [q, k, v], dout, lambda o: o.transpose(1, 2), _nbytes(q, k, v), notes,
                    extra, state)


# ------------------------------------------------------------------------------- fla
def fla_version() -> str | None:
    from importlib import metadata
    for dist in ("fla-core", "flash-linear-attention"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def _fla_nsa():
    """fla's NSA with compression and top-k selection computed inside: `parallel_nsa` (since
    fla 0.2 or so it takes g_cmp), else the older `parallel_nsa_with_compression`."""
    import importlib
    import inspect
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fla warns when flash-attn (its window branch) is absent
        try:
            mod = importlib.import_module("fla.ops.nsa")
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] == "fla":
                raise Unavailable("not installed (pip install fla-core)") from None
            raise Unavailable(f"import failed: {describe_error(e)}") from None
        except Exception as e:  # noqa: BLE001 - an incompatible install is a row, not a crash
            raise Unavailable(f"import failed: {describe_error(e)}") from None
        fn = getattr(mod, "parallel_nsa", None)
        if fn is None:  # some versions set it to None when fla/ops/nsa/parallel.py fails
            try:
                fn = importlib.import_module("fla.ops.nsa.parallel").parallel_nsa
            except Exception as e:  # noqa: BLE001
                raise Unavailable(f"fla.ops.nsa.parallel: {describe_error(e)}") from None
    try:
        takes_cmp = "g_cmp" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_cmp = True
    if not takes_cmp:
        fn = getattr(mod, "parallel_nsa_with_compression", None)
        if fn is None:
            raise Unavailable("this fla's parallel_nsa takes no g_cmp (no compression branch)")
    return fn


def prepare_fla(case: Case, inp: Inputs) -> Prepared:
    pat = case.pattern
    if not (isinstance(pat, Nsa) and not pat.mlp and not pat.window
            and pat.cmp_len == pat.cmp_stride == pat.sel_len):
        raise Unavailable("fla's parallel_nsa computes mean compression with one block size "
                          "and no window only")
    nsa = _fla_nsa()
    q, k, v = _leaf(inp.q), _leaf(inp.k), _leaf(inp.v)
    g_cmp, g_slc = _leaf(inp.gates["g_cmp"]), _leaf(inp.gates["g_slc"])

    def fwd():
        return nsa(q, k, v, g_cmp=g_cmp, g_slc=g_slc, g_swa=None, block_counts=pat.topn,
                   block_size=pat.sel_len, window_size=0)

    notes = {"call": f"{nsa.__name__}(q, k, v, g_cmp, g_slc, g_swa=None, block_counts="
                     f"{pat.topn}, block_size={pat.sel_len}, window_size=0)",
             "version": fla_version()}
    return Prepared(fwd, [q, k, v, g_cmp, g_slc], inp.dout, lambda o: o,
                    _nbytes(q, k, v, g_cmp, g_slc), notes)


# ----------------------------------------------------------------------------- checks
ROW_TOL = 2e-2  # of the output's scale: the bfloat16 tolerance of docs/testing.md


def compare(ref: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None = None,
            chunk: int = 4096) -> dict:
    """Max |out - ref| (and relative to max |ref|) over [B, T, H, D] outputs, in chunks of
    the sequence, and how many (token, head) rows differ by more than ROW_TOL of the scale
    (a few: near-ties in a selection broken the other way; many: a real difference).
    `rows` [B, T, H] restricts the maximum to some rows."""
    per_row = []
    scale = torch.zeros((), device=ref.device)
    finite = True
    for s in range(0, ref.shape[1], chunk):
        r, o = ref[:, s:s + chunk].float(), out[:, s:s + chunk].float()
        per_row.append((o - r).abs().amax(-1))  # [B, t, H]
        scale = torch.maximum(scale, r.abs().max())
        finite = finite and bool(torch.isfinite(o).all())
    d = torch.cat(per_row, 1)
    sc = float(scale)
    chosen = d if rows is None else torch.where(rows, d, torch.zeros_like(d))
    e = float(chosen.max()) if finite else float("nan")
    return {"max_abs_err": e, "rel_err": e / sc if sc > 0 else e,
            "rows_over_tol": int((d > ROW_TOL * sc).sum()), "rows": int(d.numel()),
            "row_tol": ROW_TOL}


def compare_moba(ref_out: torch.Tensor, lists: dict, out: torch.Tensor, sel: torch.Tensor,
                 block: int) -> dict:
    """Flex MoBA vs sparsedsl: output error, rows whose selected blocks differ (near-ties in
    the router's bfloat16 inputs can break either way), and the error where they agree."""
    res = compare(ref_out, out)
    if "sel" not in lists:
        return res
    T = ref_out.shape[1]
    mine = moba_selected(sel, block, T)  # [B, H, T, n]
    idx = lists["sel"].permute(0, 2, 1, 3).long()  # [B, H, T, S]
    n = mine.shape[-1]
    theirs = torch.zeros(*idx.shape[:3], n + 1, dtype=torch.bool, device=idx.device)
    theirs.scatter_(-1, torch.where(idx >= 0, idx, n), True)
    agree = (mine == theirs[..., :n]).all(-1)  # [B, H, T]
    res["selection_rows_differ"] = int((~agree).sum())
    res["selection_rows"] = int(agree.numel())
    res["max_abs_err_same_selection"] = compare(ref_out, out, agree.transpose(1, 2))["max_abs_err"]
    return res
