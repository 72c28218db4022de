"""The on-disk kernel cache.

Generated modules are stored under `$SPARSEDSL_CACHE_DIR` (default
`~/.cache/sparsedsl`) in a directory named by a hash of what determines the
source: the spec text, its resolved parameters, the generator's version and
Triton's version. (Triton compiles and caches each kernel per dtype and
shape itself.) Each file starts with a checksum line over the rest, so a
truncated or corrupt entry is detected and rebuilt; files are written to a
temporary name and renamed into place, so concurrent writers never expose a
half-written file and all of them succeed.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

GENERATOR_VERSION = "1"
_MAGIC = "# sparsedsl-checksum: "
_loaded: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("SPARSEDSL_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "sparsedsl"


def cache_key(spec_text: str, params: dict) -> str:
    import triton
    h = hashlib.sha256()
    for part in (spec_text, repr(sorted(params.items())), GENERATOR_VERSION, triton.__version__,
                 _codegen_fingerprint()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _codegen_fingerprint() -> str:
    """Hash of the compiler's own source (front end, IR, passes and the generator all shape
    the generated text), so any change to it invalidates the cache."""
    global _fingerprint
    if _fingerprint is None:
        roots = [Path(importlib.util.find_spec(p).origin).parent
                 for p in ("sparsedsl", "sparsedsl.codegen")]
        h = hashlib.sha256()
        for root in roots:
            for f in sorted(root.rglob("*.py")):
                h.update(str(f.relative_to(root)).encode())
                h.update(f.read_bytes())
        _fingerprint = h.hexdigest()
    return _fingerprint


_fingerprint: str | None = None


def _checksum(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def _read_valid(path: Path) -> str | None:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    first, _, body = text.partition("\n")
    if not first.startswith(_MAGIC) or first[len(_MAGIC):].strip() != _checksum(body):
        return None
    return body


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it and a rename: readers see
    the old file or the new one, never half of one, and concurrent writers all succeed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def store(key: str, source: str) -> Path:
    path = cache_dir() / key / "kernels.py"
    if _read_valid(path) == source:
        return path
    write_atomic(path, f"{_MAGIC}{_checksum(source)}\n{source}")
    return path


def load_module(key: str, make_source, interpret: bool = False):
    """The generated module for `key`: from memory, from disk if intact, else built anew.
    With `interpret`, its jit functions are made for Triton's interpreter."""
    if (key, interpret) in _loaded:
        return _loaded[key, interpret]
    path = cache_dir() / key / "kernels.py"
    body = _read_valid(path)
    if body is None:
        body = make_source()
        path = store(key, body)
    name = f"sparsedsl_kernels_{key}{'_interp' if interpret else ''}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Run the text whose checksum was just verified, as the file holds it (line numbers match
    # for inspect.getsource): not a bytecode cache beside it, which nothing checks, nor the
    # file read again.
    code = compile(f"{_MAGIC}{_checksum(body)}\n{body}", str(path), "exec")
    sys.modules[name] = module
    exec(code, module.__dict__)
    from .tuning import install as install_tuned
    install_tuned(module, key)  # the settings `sparsedsl tune` measured best (runtime/tuning.py)
    if not interpret and os.environ.get("SPARSEDSL_FAST_LAUNCH", "1") != "0":
        from .launch import install
        install(module.__dict__)  # cheaper kernel launches (runtime/launch.py)
    _loaded[key, interpret] = module
    return module
