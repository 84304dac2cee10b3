"""The progress line of the command-line applications (``recsys`` and ``bench``).

On a terminal the line is redrawn in place (``\\r``) while the work runs.  Anywhere else -- a
pipe, a file, a ``2>&1`` log -- nothing is written while it runs and :meth:`Progress.close`
writes one plain line ending in a newline, so that logs stay one line per event.  No
dependency: tqdm is not used.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import IO, Any, Literal, Optional

__all__ = ["Progress", "is_terminal"]


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an open terminal (``isatty()``); False for anything without one."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):       # no isatty, or a closed stream
        return False


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 100 else f"{s / 60:.1f} min"


class Progress:
    """A progress line for ``total`` units of work, on ``stream`` (default: ``sys.stderr`` as it
    is when the object is made).

    Parameters
    ----------
    total : int
        Units expected (batches, rounds); the live line shows ``done/total`` and an estimate of
        the time left.
    desc : str
        What is running; starts every line (``"{desc}: ..."``).
    unit : str
        Plural name of a unit, as in ``"3/10 rounds"``.
    stream : file-like, optional
        Where to write (default ``sys.stderr``).
    enabled : bool
        False: write nothing at all (``--no-progress``).
    leave : bool
        On a terminal, replace the live line with the final line at :meth:`close` (True) or
        clear it (False: when the caller prints its own summary).  Off a terminal the final
        line is always written.
    interval : float
        Minimum seconds between two redraws of the live line.

    Use :meth:`update` once per unit done, then :meth:`close` (or use it as a context manager).
    """

    def __init__(self, total: int, desc: str, unit: str = "steps", *, stream: Optional[IO[str]] = None,
                 enabled: bool = True, leave: bool = True, interval: float = 0.2) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = bool(enabled)
        self.live = self.enabled and is_terminal(self.stream)
        self.leave, self.interval = leave, interval
        self.done = 0
        self.status: Optional[str] = None
        self.postfix: Optional[str] = None
        self.start = self._last = time.perf_counter()
        self._width = 0                                   # length of the line on screen
        self.closed = False

    # ------------------------------------------------------------------ text

    def _count(self) -> str:
        return self.status if self.status is not None else f"{self.done}/{self.total} {self.unit}"

    def text(self) -> str:
        """The live line: what runs, how far, the postfix, elapsed and estimated time left."""
        elapsed = time.perf_counter() - self.start
        parts = [self._count()]
        if self.postfix:
            parts.append(self.postfix)
        parts.append(_seconds(elapsed))
        if 0 < self.done < self.total:
            parts.append(f"~{_seconds(elapsed / self.done * (self.total - self.done))} left")
        return f"{self.desc}: " + ", ".join(parts)

    def final_text(self) -> str:
        """The line written at :meth:`close`: what ran, how far, the postfix and the time taken."""
        parts = [f"{self.done}/{self.total} {self.unit}"]
        if self.postfix:
            parts.append(self.postfix)
        parts.append(_seconds(time.perf_counter() - self.start))
        return f"{self.desc}: " + ", ".join(parts)

    # ------------------------------------------------------------------ drawing

    def _draw(self, text: str) -> None:
        columns = shutil.get_terminal_size((80, 24)).columns
        text = text[:max(10, columns - 1)]                # never wrap: "\r" only rewinds one row
        pad = " " * max(0, self._width - len(text))
        self.stream.write("\r" + text + pad)
        self.stream.flush()
        self._width = len(text)

    def update(self, n: int = 1, *, status: Optional[str] = None, postfix: Optional[str] = None) -> None:
        """Count ``n`` more units done; ``status`` replaces the ``done/total unit`` part of the
        live line, ``postfix`` (e.g. the current loss) follows it."""
        self.done += n
        if status is not None:
            self.status = status
        if postfix is not None:
            self.postfix = postfix
        if not self.live:
            return
        now = time.perf_counter()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            self._draw(self.text())

    def close(self, final: Optional[str] = None) -> None:
        """End the line.  ``final`` replaces :meth:`final_text`.  Off a terminal (when enabled),
        write the final line; on one, replace the live line by it (``leave``) or clear it."""
        if self.closed or not self.enabled:
            self.closed = True
            return
        self.closed = True
        text = self.final_text() if final is None else final
        if self.live:
            if self.leave:
                self._draw(text)
                self.stream.write("\n")
            elif self._width:
                self.stream.write("\r" + " " * self._width + "\r")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> "Literal[False]":
        self.close()
        return False
