"""A progress bar for Jupyter: prompts done, tokens/s, prefix-cache hit rate, ETA.

It implements the :class:`~llmsql.progress.Progress` protocol with one HTML line per LLM
step, updated in place through IPython's display handles (no ipywidgets needed; the text
form shows where HTML does not render). ``auto_progress`` picks it inside a Jupyter kernel.
IPython is imported only when a bar is drawn.
"""

from __future__ import annotations

import html
import sys
import time
from dataclasses import dataclass
from typing import Any


def in_notebook() -> bool:
    """True inside a Jupyter kernel (never imports IPython itself)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


@dataclass(frozen=True, slots=True)
class BarState:
    """What one bar shows."""

    label: str
    done: int
    total: int
    tokens: int
    cached: int | None
    """Prompt tokens from the engine's cache (None: the backend did not say)."""
    elapsed: float
    finished: bool = False
    unit: str = "prompts"
    """What ``done`` and ``total`` count (cache hits are shown for prompts only)."""

    def figures(self) -> str:
        """``3/10 prompts, 1,234 tok/s, cache 45%, ETA 3s`` (or the time taken when done)."""
        rate = self.tokens / max(self.elapsed, 1e-9)
        if self.unit != "prompts":
            hit = ""
        elif self.cached is None:
            hit = ", cache not reported"
        else:
            hit = f", cache {100 * self.cached / self.tokens:.0f}%" if self.tokens else ""
        if self.finished:
            tail = f", done in {self.elapsed:,.1f}s"
        else:
            left = (self.total - self.done) * self.elapsed / self.done if self.done else None
            tail = f", ETA {left:,.0f}s" if left is not None else ", ETA -"
        return f"{self.done}/{self.total} {self.unit}, {rate:,.0f} tok/s{hit}{tail}"

    def _repr_html_(self) -> str:
        return (
            '<div style="font-family:monospace;font-size:12px;line-height:1.6">'
            f'<progress value="{self.done}" max="{max(self.total, 1)}" '
            'style="width:200px;vertical-align:middle"></progress> '
            f"<b>{html.escape(self.label)}</b>: {html.escape(self.figures())}</div>"
        )

    def __repr__(self) -> str:
        return f"{self.label}: {self.figures()}"


class NotebookProgress:
    """One bar per LLM step in the cell's output, redrawn at most every ``min_interval`` s.

    Args:
        min_interval: seconds between redraws (the last one is always drawn).
        display: ``IPython.display.display`` or a stand-in with the same signature
            (``display(obj, display_id=True)`` returning a handle with ``update(obj)``).
    """

    def __init__(self, min_interval: float = 0.25, display: Any = None) -> None:
        self._min = min_interval
        self._display = display
        self._handle: Any = None
        self._reset(0, "")

    def _reset(self, total: int, label: str, unit: str = "prompts") -> None:
        self._total, self._label, self._done, self._unit = total, label, 0, unit
        self._tokens = 0
        self._cached: int | None = 0
        self._t0 = self._last = time.monotonic()

    def state(self, *, finished: bool = False) -> BarState:
        """The current figures."""
        return BarState(self._label, self._done, self._total, self._tokens, self._cached,
                        time.monotonic() - self._t0, finished, self._unit)

    def start(self, total: int, label: str, /, unit: str = "prompts") -> None:
        """A new step: finish the previous bar and start a new one (``unit``: what it
        counts).
        """
        self._finish()
        self._reset(total, label, unit)
        show = self._display
        if show is None:
            from IPython.display import display as show
        self._handle = show(self.state(), display_id=True)

    def advance(self, n: int, tokens: int, cached: int | None, /) -> None:
        """Count ``n`` answered prompts; redraw when due."""
        self._done += n
        self._tokens += tokens
        self._cached = None if cached is None or self._cached is None else self._cached + cached
        now = time.monotonic()
        if self._done >= self._total or now - self._last >= self._min:
            self._last = now
            self._update(finished=False)

    def _update(self, *, finished: bool) -> None:
        if self._handle is not None:
            self._handle.update(self.state(finished=finished))

    def _finish(self) -> None:
        if self._handle is not None:
            self._update(finished=True)
            self._handle = None

    def close(self) -> None:
        """The query is over: draw the last bar as finished."""
        self._finish()
