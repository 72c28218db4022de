"""Tuned kernel knobs: what `sparsedsl tune` measured best, kept beside the generated module.

The generated host code reads its tile shapes, warps and stages through kernel knobs
(`SPARSEDSL_TILE`, `SPARSEDSL_ROW`, `SPARSEDSL_GROUPED`, ...: `KNOBS`, and docs/design.md).
Each knob's setting is, in order: the environment variable (read at every call, for
sweeps), else the setting tuned for the call's device and shapes (this file), else the
built-in default (chosen by measurements on an H100).

A module's tuned settings live in `<cache dir>/<module key>/tuned.json`, beside its
`kernels.py`. The module key hashes the spec, its parameters and the compiler's own
source, so a new compiler version, whose knobs may mean something else, starts with none.
One entry a (device, dtype, heads, kv heads, head dims, sequence length); a call uses the
entry of its device, dtype, heads and head dims tuned at the sequence length nearest its
own (`_tuned` in the generated module). `SPARSEDSL_TUNED=0` turns tuned settings off.

A file that cannot be read, or an entry that does not hold together, is skipped with a
warning: a bad tuning file never stops a layer from running on its defaults.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

FORMAT = 1
FILE_NAME = "tuned.json"

# the knobs a tuning may set; the generated host code reads each through `_knob`
KNOBS = ("SPARSEDSL_TILE", "SPARSEDSL_TILE_DQ", "SPARSEDSL_TILE_DKDV", "SPARSEDSL_TILE_DKDVP",
         "SPARSEDSL_QUERY_SPLIT", "SPARSEDSL_ROW", "SPARSEDSL_ROW_DQ", "SPARSEDSL_LIST_CHUNK",
         "SPARSEDSL_GROUPED", "SPARSEDSL_GROUPED_OWN", "SPARSEDSL_GROUPED_DQ",
         "SPARSEDSL_GROUPED_DKDV", "SPARSEDSL_SELECT_TILE", "SPARSEDSL_SELECT_SPLIT")

# what identifies an entry (besides the module): the shape key (the fields of the generated
# module's `_tuning_key`, in its order), then the sequence length
SHAPE_FIELDS = ("device", "dtype", "heads", "kv_heads", "head_dim", "head_dim_v")


def tuned_path(key: str) -> Path:
    from .cache import cache_dir
    return cache_dir() / key / FILE_NAME


def _valid(entry) -> str | None:
    """Why `entry` is not a usable tuning entry, or None."""
    if not isinstance(entry, dict):
        return "not an object"
    for f in SHAPE_FIELDS + ("seq", "settings"):
        if f not in entry:
            return f"no `{f}`"
    if not isinstance(entry["device"], str) or not isinstance(entry["dtype"], str):
        return "`device` and `dtype` must be strings"
    for f in ("heads", "kv_heads", "head_dim", "head_dim_v", "seq"):
        if not isinstance(entry[f], int) or isinstance(entry[f], bool) or entry[f] < 1:
            return f"`{f}` must be a positive integer"
    settings = entry["settings"]
    if not isinstance(settings, dict):
        return "`settings` must be an object"
    for var, value in settings.items():
        if var not in KNOBS:
            return f"unknown knob `{var}`"
        if not isinstance(value, str) or not value.strip():
            return f"`{var}` must be a non-empty string"
    return None


def read_entries(key: str) -> list[dict]:
    """The valid entries of module `key`'s tuning file ([] when there is none); an
    unreadable file or an invalid entry is skipped with a warning naming it."""
    path = tuned_path(key)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as e:
        warnings.warn(f"{path}: not read ({e}); running on the default kernel settings")
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        warnings.warn(f"{path}:{e.lineno}:{e.colno}: not JSON ({e.msg}); running on the default "
                      f"kernel settings (`sparsedsl tune` writes it anew)")
        return []
    if not isinstance(data, dict) or data.get("format") != FORMAT or \
            not isinstance(data.get("entries"), list):
        warnings.warn(f"{path}: not a tuning file of format {FORMAT}; running on the default "
                      f"kernel settings")
        return []
    good = []
    for i, entry in enumerate(data["entries"]):
        why = _valid(entry)
        if why:
            warnings.warn(f"{path}: entry {i} skipped: {why}")
        else:
            good.append(entry)
    return good


def table(entries: list[dict]) -> dict:
    """The generated module's `_TUNED`: shape key -> [(seq, settings)]."""
    out: dict[tuple, list] = {}
    for e in entries:
        out.setdefault(tuple(e[f] for f in SHAPE_FIELDS), []).append(
            (e["seq"], dict(e["settings"])))
    return out


def install(module, key: str) -> None:
    """Fill a freshly loaded generated module's `_TUNED` from its tuning file."""
    tuned = getattr(module, "_TUNED", None)
    if isinstance(tuned, dict):
        tuned.clear()
        tuned.update(table(read_entries(key)))


def record(key: str, entry: dict, module=None) -> Path:
    """Add `entry` to module `key`'s tuning file, replacing one for the same shapes and
    sequence length, and to `module`'s `_TUNED` when given (so the process that tuned runs
    on the result). Written to a temporary name and renamed: readers never see half a file."""
    from .cache import write_atomic
    why = _valid(entry)
    if why:
        raise ValueError(f"not a tuning entry: {why}")

    def where(e):
        return tuple(e[f] for f in SHAPE_FIELDS + ("seq",))
    entries = [e for e in read_entries(key) if where(e) != where(entry)] + [entry]
    path = tuned_path(key)
    write_atomic(path, json.dumps({"format": FORMAT, "entries": entries}, indent=1,
                                  sort_keys=True) + "\n")
    if module is not None:
        install(module, key)
    return path


def forget(key: str, module=None) -> bool:
    """Delete module `key`'s tuning file (and empty `module`'s `_TUNED`); whether it existed."""
    path = tuned_path(key)
    try:
        path.unlink()
        existed = True
    except FileNotFoundError:
        existed = False
    if module is not None:
        install(module, key)
    return existed

