"""Checking a compiled layer against the dense reference.

Two questions, kept apart so a near-tie in a gate cannot hide a wrong kernel:

1. Is each selection the kernels made a correct top-k? Its block set must equal
   the reference's, except where two blocks' reference scores are within
   `score_tol` of each other (a tie the kernel's float32 or bfloat16
   arithmetic may break the other way): then the selected scores, sorted, must
   match the reference's within that tolerance.
2. Given the kernels' own selections, is the output the reference's? The
   reference is evaluated with those selections (`selections=`) and compared
   with `out_tol` relative to the output's scale (max |ref|).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Report:
    error: float  # max |out - ref| / max |ref|
    exact_selections: dict[str, bool] = field(default_factory=dict)
    tie_rows: dict[str, int] = field(default_factory=dict)  # rows that differ only by near-ties
    finite: bool = True


def _as_sets(idx: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T, H, S] index lists (-1 padded) -> bool [B, T, H, n]."""
    idx = idx.long().cpu()
    m = torch.zeros(*idx.shape[:3], n + 1, dtype=torch.bool)
    m.scatter_(-1, torch.where(idx >= 0, idx, n), True)
    return m[..., :n]


def check_layer(layer, q, k, v, inputs: dict | None = None, out_tol: float = 1e-4,
                score_tol: float = 1e-4) -> Report:
    inputs = dict(inputs or {})
    out, lists = layer(q, k, v, return_lists=True, **inputs)
    cpu = {n: t.detach().double().cpu() for n, t in inputs.items()}
    qd, kd, vd = (t.detach().double().cpu() for t in (q, k, v))
    ref = layer.reference(qd, kd, vd, return_details=True, **cpu)
    report = Report(error=0.0, finite=bool(torch.isfinite(out).all()))
    given = {}
    for name, idx in lists.items():
        r = ref.selections[name]
        n = ref.blocksets[name].shape[-1]
        mine, theirs = _as_sets(idx, n), _as_sets(r, n)
        same = torch.equal(mine, theirs)
        report.exact_selections[name] = same
        if not same:
            _check_near_ties(name, mine, theirs, ref.scores[name], score_tol, report)
        given[name] = idx.long().cpu()
    ref_given = layer.reference(qd, kd, vd, return_details=True, selections=given, **cpu) \
        if given else ref
    scale = ref_given.out.abs().max().clamp(min=1e-6)
    report.error = float((out.detach().double().cpu() - ref_given.out).abs().max() / scale)
    return report


def _check_near_ties(name, mine, theirs, scores, tol, report) -> None:
    """Rows where the kernel's and the reference's sets differ must differ only by blocks
    whose scores tie (within tol, relative to the row's largest score) with the cut-off."""
    B, T, H, N = mine.shape
    s = scores.permute(0, 2, 1, 3).cpu()  # [B, T, Hq, N]
    if H != s.shape[2]:  # group lists: scores are equal over the group's heads
        s = s[:, :, :: s.shape[2] // H]
    diff = (mine != theirs).any(-1)
    rows = diff.nonzero().tolist()
    for b, t, h in rows:
        a, r = mine[b, t, h], theirs[b, t, h]
        if a.sum() != r.sum():
            raise AssertionError(f"selection `{name}` at (b={b}, t={t}, h={h}): kernel chose "
                                 f"{a.nonzero().flatten().tolist()}, reference "
                                 f"{r.nonzero().flatten().tolist()} (different counts)")
        row = s[b, t, h]
        only_mine = row[a & ~r]
        only_ref = row[r & ~a]
        bound = tol * max(1.0, float(row.abs().max()))
        if (only_mine.sort().values - only_ref.sort().values).abs().max() > bound:
            raise AssertionError(
                f"selection `{name}` at (b={b}, t={t}, h={h}): kernel chose "
                f"{a.nonzero().flatten().tolist()}, reference {r.nonzero().flatten().tolist()}; "
                f"scores {only_mine.tolist()} vs {only_ref.tolist()} are not a near-tie")
    report.tie_rows[name] = len(rows)
