"""Progress bars for the board side: tqdm where it is installed (it comes with the `export` extra, not with
the runtime's numpy + onnxruntime), else a plain counter on stderr; nothing at all when not shown."""

from __future__ import annotations

import sys


class _Plain:
    """What a tqdm bar does here, without tqdm: `desc: done/total` rewritten in place on a terminal, one line
    at the end otherwise (a log file gets no stream of carriage returns)."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self._tty = sys.stderr.isatty()

    def update(self, k: int = 1) -> None:
        self.n += k
        if self._tty:
            print(f"\r{self.desc}: {self.n}/{self.total} {self.unit}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        start = "\r" if self._tty else ""
        print(f"{start}{self.desc}: {self.n}/{self.total} {self.unit}", file=sys.stderr)


class _Off:
    n = 0

    def update(self, k: int = 1) -> None:
        self.n += k

    def close(self) -> None:
        pass


def bar(total: int, desc: str, *, show: bool = True, unit: str = "it", leave: bool = True):
    """A progress bar with `update(k)`, `close()` and `n`: tqdm's when shown and installed. tqdm is imported
    only here, so a board without it runs everything but the bar."""
    if not show:
        return _Off()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Plain(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, leave=leave)
