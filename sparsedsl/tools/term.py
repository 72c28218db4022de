"""Terminal output for the CLI: colours on a TTY (plain when piped or with NO_COLOR),
aligned tables, a one-line progress display, human-readable numbers."""
from __future__ import annotations

import os
import sys
import time


def color(stream) -> bool:
    """Whether to colour what goes to `stream`: a TTY, NO_COLOR unset, TERM not dumb."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("NO_COLOR") is None and \
        os.environ.get("TERM") != "dumb"


def paint(text: str, code: str, stream=None) -> str:
    """`text` in an ANSI style (`"32"` green, `"1;31"` bold red, ...) when `stream` is coloured."""
    return f"\x1b[{code}m{text}\x1b[0m" if color(stream or sys.stdout) else text


def table(rows: list[list], head: list | None = None, align: str = "",
          stream=None) -> str:
    """Rows of cells as aligned text. `align` has one letter per column, `l` or `r`
    (default: first column left, the others right). The header is bold on a TTY."""
    rows = [[str(c) for c in r] for r in rows]
    allrows = ([[str(c) for c in head]] if head else []) + rows
    ncol = max(len(r) for r in allrows)
    allrows = [r + [""] * (ncol - len(r)) for r in allrows]
    widths = [max(len(r[c]) for r in allrows) for c in range(ncol)]
    align = (align or "l" + "r" * (ncol - 1)).ljust(ncol, "r")
    lines = []
    for k, r in enumerate(allrows):
        cells = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)]
        line = "  ".join(cells).rstrip()
        if head and k == 0:
            line = paint(line, "1", stream)
        lines.append(line)
    return "\n".join(lines)


def si(x: float, unit: str = "") -> str:
    """12.3 G, 4.56 M, ... (powers of 1000)."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


class Progress:
    """A one-line progress display on stderr, redrawn with `\\r`; nothing when stderr is
    not a TTY (piped, in tests). `update(done, total, note)`; `close()` clears the line."""

    def __init__(self, label: str, stream=None, enabled: bool | None = None):
        self.label = label
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) if enabled is None else enabled
        self.start = time.monotonic()
        self._last = 0.0
        self._width = 0

    def update(self, done: int | None = None, total: int | None = None, note: str = "") -> None:
        """Redraw: a bar for `done` of `total`, a count without a total, the label alone
        (work of unknown length) without either."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and self._width and (total is None or done < total):
            return
        self._last = now
        elapsed = now - self.start
        if total:
            frac = min(done / total, 1.0)
            bar = "#" * int(24 * frac)
            text = f"{self.label} [{bar:<24}] {done}/{total}"
        elif done is not None:
            text = f"{self.label} {done}"
        else:
            text = f"{self.label}..."
        text += f"  {elapsed:.0f}s" + (f"  {note}" if note else "")
        pad = max(self._width - len(text), 0)
        self._width = len(text)
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
