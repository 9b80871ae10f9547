"""Progress reporting: a bar on a terminal or in Jupyter (prompts, tokens/s, cache hits)."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO


class Progress(Protocol):
    """What the engine reports while it works."""

    def start(self, total: int, label: str, /, unit: str = "prompts") -> None:
        """A new step with ``total`` prompts (or other ``unit``s, e.g. training steps)
        begins; cache hits are shown for prompts only.
        """
        ...

    def advance(self, n: int, tokens: int, cached: int | None, /) -> None:
        """``n`` more prompts answered, ``tokens`` processed, ``cached`` of them from cache
        (None: the backend did not say).
        """
        ...

    def close(self) -> None:
        """The query is over."""
        ...


class NoProgress:
    """Reports nothing."""

    def start(self, total: int, label: str, /, unit: str = "prompts") -> None:  # noqa: D102
        pass

    def advance(self, n: int, tokens: int, cached: int | None, /) -> None:  # noqa: D102
        pass

    def close(self) -> None:  # noqa: D102
        pass


class TerminalProgress:
    """One self-overwriting line on a terminal: done/total, tokens/s, cache hits, ETA."""

    def __init__(self, stream: TextIO | None = None, min_interval: float = 0.2) -> None:
        self._out = stream or sys.stderr
        self._min = min_interval
        self._reset(0, "")

    def _reset(self, total: int, label: str, unit: str = "prompts") -> None:
        self._total, self._label, self._done, self._unit = total, label, 0, unit
        self._tokens = self._cached = 0
        self._unknown = False
        self._t0 = self._last = time.monotonic()

    def start(self, total: int, label: str, /, unit: str = "prompts") -> None:  # noqa: D102
        self._finish_line()
        self._reset(total, label, unit)
        self._draw(force=True)

    def advance(self, n: int, tokens: int, cached: int | None, /) -> None:  # noqa: D102
        self._done += n
        self._tokens += tokens
        self._unknown |= cached is None
        self._cached += cached or 0
        self._draw(force=self._done >= self._total)

    def _draw(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self._min:
            return
        self._last = now
        el = max(now - self._t0, 1e-9)
        rate = self._tokens / el
        hit = f" cache {100 * self._cached / self._tokens:.0f}%" if self._tokens else ""
        hit = " cache not reported" if self._unknown else hit
        hit = hit if self._unit == "prompts" else ""
        left = (self._total - self._done) * el / self._done if self._done else 0.0
        self._out.write(
            f"\r{self._label}: {self._done}/{self._total} {self._unit}, {rate:,.0f} tok/s{hit}, "
            f"ETA {left:,.0f}s   "
        )
        self._out.flush()

    def _finish_line(self) -> None:
        if self._total:
            self._out.write("\n")
            self._out.flush()

    def close(self) -> None:  # noqa: D102
        self._finish_line()
        self._total = 0


def auto_progress(enabled: bool | None) -> Progress:
    """A bar when ``enabled`` is True, or None and in Jupyter or stderr is a terminal.

    Inside a Jupyter kernel the bar is HTML (:mod:`llmsql.progress_notebook`).
    """
    from llmsql.progress_notebook import NotebookProgress, in_notebook

    notebook = in_notebook()
    if enabled is None:
        enabled = notebook or sys.stderr.isatty()
    if not enabled:
        return NoProgress()
    return NotebookProgress() if notebook else TerminalProgress()
