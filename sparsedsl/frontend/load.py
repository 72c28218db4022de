"""Where a spec comes from: a built-in name, a `.attn` file, or spec text."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import Source, UnknownSpecError


def builtin_names() -> list[str]:
    files = resources.files("sparsedsl.builtins")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".attn"))


def load_source(spec) -> Source:
    """A built-in name (`"moba"`), a path to a `.attn` file, or the text of a spec."""
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, Path):
        return _read(spec)
    if not isinstance(spec, str):
        raise TypeError(f"a spec is a built-in name, a path or spec text, not {type(spec).__name__}")
    if "\n" in spec or "=" in spec or not spec.strip():
        return Source("<string>", spec)
    if spec in builtin_names():
        text = resources.files("sparsedsl.builtins").joinpath(f"{spec}.attn").read_text()
        return Source(f"<builtin {spec}>", text)
    path = Path(spec)
    if path.exists():
        return _read(path)
    names = ", ".join(builtin_names())
    raise UnknownSpecError(f"`{spec}` is neither a .attn file nor a built-in spec ({names})")


def _read(path: Path) -> Source:
    try:
        return Source(str(path), path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UnknownSpecError(f"cannot read spec file `{path}`: {e}") from None
