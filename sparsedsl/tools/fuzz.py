"""`sparsedsl fuzz`: random specs, compiled and checked against the dense reference.

Specs, shapes and inputs come from the Hypothesis strategy the test suite uses
(`sparsedsl.testing.strategies.cases`). Each case is compiled to kernels and
checked like `tests/test_kernel_properties.py` and `tests/test_gradients.py` do:

  outputs    `sparsedsl.testing.oracle.check_layer` in float32: the kernels'
             selections are a correct top-k, and the output equals the reference's
             on those selections within 1e-4 of its scale
  gradients  `sparsedsl.testing.grads.gradient_errors` in float64: every gradient
             equals the reference's autograd within 1e-8 of its scale

`torch.empty` returns NaN-filled tensors meanwhile, so an unwritten output fails.
On a failure Hypothesis shrinks the case; the smallest failing spec is written
as a `.attn` file whose header gives the shape and seed
(`# shape: B T Hkv G D`, the format of `tests/regressions/`), and
`sparsedsl fuzz --replay FILE` reproduces it.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

OUT_TOL = 1e-4  # float32 output, relative to the output's scale
SCORE_TOL = 1e-4  # near-ties in top-k scores
GRAD_TOL = 1e-8  # float64 gradients, relative to each gradient's scale
SHAPES = dict(max_seq=24, max_batch=2, kv_heads=(1, 2), groups=(1, 2, 4), head_dims=(4, 16))
CHUNK = 10  # examples per Hypothesis run when fuzzing for a time


class CaseFailure(AssertionError):
    """A case whose kernels disagree with the reference."""


@dataclass
class Outcome:
    examples: int = 0
    seconds: float = 0.0
    seed: int = 0
    failure: dict | None = None


def _device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_case(text: str, shape, seed: int, grads: bool = True) -> None:
    """Compile `text` and compare it with the reference at `shape` on inputs drawn with
    `seed`; raises `CaseFailure` with a one-line reason."""
    import torch

    import sparsedsl

    from ..testing import poison_empty, spec_inputs
    from ..testing.grads import gradient_errors
    from ..testing.oracle import check_layer

    device = _device()
    with poison_empty():
        ir = sparsedsl.lower(text)
        layer = sparsedsl.compile(text, head_dim=shape.head_dim, q_heads=shape.q_heads,
                                  head_dim_v=shape.dv, d_model=shape.d_model)
        data = spec_inputs(ir, shape, seed, dtype=torch.float32)
        with torch.no_grad():
            for name, p in layer.learnable().items():
                p.copy_(data.params[name])
        layer = layer.to(device)
        to = lambda t: t.to(device)  # noqa: E731
        try:
            rep = check_layer(layer, to(data.q), to(data.k), to(data.v),
                              {n: to(t) for n, t in data.tensors.items()}, OUT_TOL, SCORE_TOL)
        except AssertionError as e:  # a selection that is not a correct top-k
            raise CaseFailure(f"outputs: {str(e).splitlines()[0]}") from None
        if not rep.finite:
            raise CaseFailure("outputs: the kernels' output is not finite")
        if not rep.error < OUT_TOL:
            raise CaseFailure(f"outputs: error {rep.error:.3g} (tolerance {OUT_TOL:g} of the "
                              f"output's scale)")
        if not grads:
            return
        data = spec_inputs(ir, shape, seed, dtype=torch.float64, device=device)
        layer = layer.double()
        errors = gradient_errors(layer, data, seed)
        bad = {n: e for n, e in errors.items() if not e < GRAD_TOL}
        if bad:
            worst = max(bad, key=lambda n: bad[n] if bad[n] == bad[n] else float("inf"))
            raise CaseFailure(f"gradients: d{worst} error {bad[worst]:.3g} (tolerance "
                              f"{GRAD_TOL:g}); {len(bad)} of {len(errors)} gradients off")


def run(examples: int | None, minutes: float | None, seed: int, grads: bool = True,
        out_dir: Path = Path("."), progress=None) -> Outcome:
    """Fuzz for `examples` cases, or for `minutes`; stop at the first failure (shrunk)."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed

    from ..testing.strategies import cases

    start = time.monotonic()
    deadline = start + 60 * minutes if minutes else None
    state = dict(done=0, failures=[])
    total = examples

    def report():
        if progress is not None:
            note = (f"shrinking a failure ({len(state['failures'])} failing runs)"
                    if state["failures"] else "0 failures")
            progress(state["done"], total, note)

    def check(case):
        if not state["failures"]:  # (after a failure, Hypothesis is shrinking it)
            if deadline is not None and time.monotonic() > deadline:
                return  # time is up: the rest of this run passes without work
            state["done"] += 1
        report()
        try:
            check_case(case.text, case.shape, case.seed, grads)
        except Exception as e:  # noqa: BLE001 - anything the kernels do wrong is a finding
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if not isinstance(e, CaseFailure):
                reason = f"{type(e).__name__}: {reason}"
            state["failures"].append((case, reason))
            raise

    def one_run(n: int, run_seed: int) -> bool:
        test = given(case=cases(shape_options=SHAPES))(check)
        test = settings(max_examples=n, deadline=None, database=None, derandomize=False,
                        verbosity=Verbosity.quiet, report_multiple_bugs=False,
                        phases=(Phase.generate, Phase.shrink),
                        suppress_health_check=list(HealthCheck))(test)
        test = hseed(run_seed)(test)
        try:
            test()
        except Exception:  # noqa: BLE001 - the failure is in state["failures"]
            if not state["failures"]:
                raise
            return False
        return True

    ok = True
    if deadline is None:
        ok = one_run(examples, seed)
    else:
        chunk = 0
        while ok and time.monotonic() < deadline:
            ok = one_run(CHUNK, _chunk_seed(seed, chunk))
            chunk += 1
    outcome = Outcome(state["done"], time.monotonic() - start, seed)
    if not ok:
        case, reason = state["failures"][-1]  # Hypothesis replays the shrunk case last
        outcome.failure = write_failure(case, reason, out_dir, grads)
    return outcome


def _chunk_seed(seed: int, chunk: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{chunk}".encode()).digest()[:8], "little")


def write_failure(case, reason: str, out_dir: Path, grads: bool) -> dict:
    """The failing spec as a `.attn` file that `--replay` and the regression test read."""
    s = case.shape
    digest = hashlib.sha256(f"{case.text}{s}{case.seed}".encode()).hexdigest()[:8]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"fuzz-failure-{digest}.attn"
    header = [f"# found by sparsedsl fuzz: {reason}",
              f"# shape: {s.batch} {s.seq} {s.kv_heads} {s.group} {s.head_dim}",
              f"# fuzz: head_dim_v={s.dv} d_model={s.d_model} seed={case.seed}"]
    path.write_text("\n".join(header) + "\n" + case.text)
    command = f"sparsedsl fuzz --replay {path}" + ("" if grads else " --no-grad")
    return {"file": str(path), "command": command, "reason": reason, "shape": str(s),
            "seed": case.seed, "spec": case.text}


def read_case(path: Path):
    """The spec text, shape and seed of a file `write_failure` wrote (or a regression file:
    `# shape: B T Hkv G D`, defaults otherwise)."""
    from ..testing import Shape
    text = Path(path).read_text()
    shape = Shape(batch=1, seq=23, kv_heads=1, group=2, head_dim=8, d_model=8)
    dv, seed = None, 0
    for line in text.splitlines():
        if line.startswith("# shape:"):
            b, t, hk, g, d = (int(x) for x in line.split(":", 1)[1].split())
            shape = Shape(batch=b, seq=t, kv_heads=hk, group=g, head_dim=d, d_model=d)
        elif line.startswith("# fuzz:"):
            kv = dict(item.split("=", 1) for item in line.split(":", 1)[1].split())
            dv, seed = int(kv["head_dim_v"]), int(kv["seed"])
            shape = replace(shape, d_model=int(kv["d_model"]))
    if dv is not None and dv != shape.head_dim:
        shape = replace(shape, head_dim_v=dv)
    return text, shape, seed
