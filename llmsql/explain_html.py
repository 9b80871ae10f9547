"""EXPLAIN as HTML for notebooks: the plan, per LLM call its figures, and a time chart.

Per LLM call: rows in, distinct prompts, prompts sent, prompt tokens (estimated without
ANALYZE, measured with it), the most output tokens, expected prefix-cache hits for the
chosen send order and for table order (the cost model's LRU block simulation, as in the
text EXPLAIN), and, with ANALYZE, the measured hits. The chart is inline SVG (no plotting
library): with ANALYZE, where the measured time went (inputs, optimizer rules, generation,
the rest of the query); without, where the cost model expects GPU time to go.

>>> import llmsql, pandas as pd
>>> con = llmsql.connect(dry_run=True, progress=False)
>>> _ = con.register("t", pd.DataFrame({"g": ["a", "a", "b"], "v": ["x", "y", "z"]}))
>>> rep = explain_report(con, "SELECT LLM('Say', g, v) AS s FROM t")
>>> [(c.kind, c.distinct_prompts) for c in rep.calls]
[('LLM', 3)]
>>> "<svg" in rep.html() and "QueryPlan" in rep.html()
True
>>> con.close()
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmsql.explain import (
    CallEstimate,
    TokenCounter,
    expected_output_tokens,
    table_order_prompts,
)
from llmsql.optimizer.cost import CostModel, call_cost

if TYPE_CHECKING:
    from collections.abc import Sequence

    from llmsql.plan import PromptBatch
    from llmsql.session import Explain, Result, Session
    from llmsql.stats import CallStats

COLORS = {"inputs": "#9ecae1", "rules": "#fdae6b", "generation": "#3182bd",
          "other": "#c7c7c7", "prefill": "#3182bd", "decode": "#e6550d", "query": "#a1d99b"}
"""Chart segment colors (colorblind-safe blues/oranges)."""


@dataclass(frozen=True, slots=True)
class CallFigures:
    """One LLM call's row in the report."""

    call_id: str
    where: str
    kind: str
    instruction: str
    """The call's instruction ('' for steps not in the plan, e.g. selectivity samples)."""
    rows_in: int
    distinct_prompts: int
    sent: int
    prompt_tokens: int
    output_tokens: int
    """Measured with ANALYZE; else the most the call can produce (max_tokens, label length)."""
    expected_hit: float | None
    """Expected share of prompt tokens from the prefix cache, in the chosen send order."""
    expected_hit_table: float | None
    """The same in table order with the written field order (what no optimizer gives)."""
    measured_hit: float | None
    """Measured share (ANALYZE only)."""
    stages: tuple[tuple[str, float], ...]
    """Seconds per stage: measured with ANALYZE, else the cost model's GPU-seconds."""


@dataclass(frozen=True, slots=True, repr=False)
class ExplainReport:
    """A structured EXPLAIN that renders as HTML in Jupyter and as text elsewhere."""

    text: str
    calls: tuple[CallFigures, ...]
    analyze: bool
    total_seconds: float | None = None
    result: Result | None = None

    def html(self) -> str:
        """The report as one self-contained HTML fragment."""
        title = "EXPLAIN ANALYZE" if self.analyze else "EXPLAIN (no model run; estimates)"
        total = f" &middot; {self.total_seconds:.2f}s total" if self.total_seconds else ""
        return (
            '<div class="llmsql-explain" style="font-family:sans-serif;font-size:13px">'
            f"<div><b>{title}</b>{total}</div>{_table(self)}{_chart(self)}"
            "<details><summary>plan</summary>"
            f'<pre style="font-size:11px">{html.escape(self.text)}</pre></details></div>'
        )

    def _repr_html_(self) -> str:
        return self.html()

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text


# ---- building the figures --------------------------------------------------------------------


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _expected(batch: PromptBatch, rows: Sequence[int], model: CostModel,
              ) -> tuple[float | None, float | None, int, float, float]:
    """Expected hit shares (plan, table order), max output tokens, prefill and decode s."""
    sent = batch.prompts(rows)
    table = table_order_prompts(batch)
    (sent_tokens, table_token_list), _ = TokenCounter(None).tokens(sent, table)
    out_tokens, _ = expected_output_tokens(batch, len(sent))
    c = call_cost(sent, table, sent_tokens, table_token_list, out_tokens, model)
    table_tokens = sum(table_token_list)
    prefill = (c.prompt_tokens - c.cached_tokens) / model.prefill_tokens_per_s
    return (_share(c.cached_tokens, c.prompt_tokens),
            _share(c.cached_tokens_table_order, table_tokens), out_tokens, prefill,
            out_tokens / model.decode_tokens_per_s)


def _measured_stages(s: CallStats) -> tuple[tuple[str, float], ...]:
    rules = sum(t for _, t in s.rule_seconds)
    other = max(0.0, s.seconds - s.input_seconds - rules - s.generate_seconds)
    return (("inputs", s.input_seconds), ("rules", rules), ("generation", s.generate_seconds),
            ("other", other))


def _estimated(e: CallEstimate, model: CostModel,
               ) -> tuple[float | None, float | None, int, float, float]:
    """The same figures as :func:`_expected`, from EXPLAIN's own estimate of the call."""
    c = e.cost
    return (_share(c.cached_tokens, c.prompt_tokens),
            _share(c.cached_tokens_table_order, c.prompt_tokens_table_order), c.output_tokens,
            (c.prompt_tokens - c.cached_tokens) / model.prefill_tokens_per_s,
            c.output_tokens / model.decode_tokens_per_s)


def call_figures(s: CallStats, batch: tuple[PromptBatch, Sequence[int]] | None,
                 model: CostModel, *, analyze: bool, instruction: str = "",
                 estimate: CallEstimate | None = None) -> CallFigures:
    """The report row of one call from its statistics and, when known, its sent batch (or
    EXPLAIN's estimate of it, whose prompt tokens are shown without ANALYZE).
    """
    hit = table_hit = None
    out_tokens, stages = s.output_tokens, _measured_stages(s)
    prompt_tokens = s.prompt_tokens
    figures = (_estimated(estimate, model) if estimate is not None
               else _expected(*batch, model) if batch is not None else None)
    if figures is not None:
        hit, table_hit, max_out, prefill, decode = figures
        if not analyze:
            out_tokens, stages = max_out, (("prefill", prefill), ("decode", decode))
        if not analyze and estimate is not None:
            prompt_tokens = estimate.cost.prompt_tokens
    return CallFigures(
        call_id=s.call_id, where=s.where, kind=s.kind, instruction=instruction,
        rows_in=s.rows_in,
        distinct_prompts=s.distinct_prompts, sent=s.sent, prompt_tokens=prompt_tokens,
        output_tokens=out_tokens, expected_hit=hit, expected_hit_table=table_hit,
        measured_hit=_share(s.cached_tokens, s.prompt_tokens) if analyze else None,
        stages=stages,
    )


def report(explain: Explain, /, *, seconds: float | None = None) -> ExplainReport:
    """Turn a :meth:`Session.explain` result into a report.

    Args:
        explain: what ``session.explain(query)`` (or with ``analyze=True``) returned.
        seconds: the measured wall time of the whole query, for the chart's "rest" bar.
    """
    analyze = explain.result is not None
    batches = {b.call.id: (b, rows) for b, rows in explain.batches}
    said = {c.id: c.template.instruction for p in explain.plans for c in p.calls}
    estimates = {e.call_id: e for e in explain.estimates}
    calls = tuple(call_figures(s, batches.get(s.call_id), explain.cost_model, analyze=analyze,
                               instruction=said.get(s.call_id, ""),
                               estimate=estimates.get(s.call_id))
                  for s in explain.calls)
    return ExplainReport(explain.text, calls, analyze, seconds, explain.result)


def explain_report(session: Session, query: str, /, *, analyze: bool = False) -> ExplainReport:
    """EXPLAIN ``query`` on ``session`` as a report; with ``analyze`` the query runs.

    Args:
        session: the session whose tables and backend are used.
        query: SQL with LLM functions.
        analyze: run the query for real (the report's ``result`` holds its result) and
            show measured tokens, cache hits and time; else no model is loaded.
    """
    t0 = time.perf_counter()
    explain = session.explain(query, analyze=analyze)
    return report(explain, seconds=time.perf_counter() - t0 if analyze else None)


# ---- rendering -----------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "&ndash;" if x is None else f"{100 * x:.0f}%"


_HEAD = ("call", "rows in", "distinct prompts", "sent", "prompt tokens", "output tokens",
         "expected cache hits (plan / table order)", "measured cache hits", "seconds")


def _row(c: CallFigures, analyze: bool) -> str:
    secs = f"{sum(t for _, t in c.stages):.2f}" if analyze else "&ndash;"
    out = f"{c.output_tokens:,}" if analyze else f"&le; {c.output_tokens:,}"
    toks = f"{c.prompt_tokens:,}" if analyze else f"~{c.prompt_tokens:,}"
    said = c.instruction if len(c.instruction) <= 60 else c.instruction[:57] + "..."
    call = (f"<b>{html.escape(c.call_id)}</b> {html.escape(c.where)}<br>"
            f'<span style="color:#666;font-size:11px">{html.escape(said)}</span>')
    cells = (call, f"{c.rows_in:,}",
             f"{c.distinct_prompts:,}", f"{c.sent:,}", toks, out,
             f"{_pct(c.expected_hit)} / {_pct(c.expected_hit_table)}", _pct(c.measured_hit),
             secs)
    tds = "".join(f'<td style="text-align:{"left" if i == 0 else "right"};padding:2px 8px">'
                  f"{cell}</td>" for i, cell in enumerate(cells))
    return f"<tr>{tds}</tr>"


def _table(rep: ExplainReport) -> str:
    if not rep.calls:
        return "<p>No LLM calls: the query is plain SQL.</p>"
    head = "".join(f'<th style="padding:2px 8px;border-bottom:1px solid #999">{h}</th>'
                   for h in _HEAD)
    body = "".join(_row(c, rep.analyze) for c in rep.calls)
    return f'<table style="border-collapse:collapse"><tr>{head}</tr>{body}</table>'


def _bars(rep: ExplainReport) -> list[tuple[str, tuple[tuple[str, float], ...]]]:
    bars = [(f"{c.call_id} {c.kind}", c.stages) for c in rep.calls]
    if rep.analyze and rep.total_seconds is not None:
        spent = sum(t for _, stages in bars for _, t in stages)
        bars.append(("rest of the query", (("query", max(0.0, rep.total_seconds - spent)),)))
    return bars


def _chart(rep: ExplainReport) -> str:
    bars = _bars(rep)
    if not bars:
        return ""
    caption = ("where the time went (seconds)" if rep.analyze
               else "where GPU time would go (cost model, seconds)")
    return svg_bar_chart(bars, caption)


def svg_bar_chart(bars: Sequence[tuple[str, Sequence[tuple[str, float]]]], caption: str,
                  *, width: int = 420) -> str:
    """A horizontal stacked bar chart as inline SVG: one bar per label, one segment per stage.

    >>> svg_bar_chart([("a", [("generation", 2.0)]), ("b", [("inputs", 1.0)])], "t")[:4]
    '<svg'
    """
    label_w, row_h = 150, 18
    top = max((sum(v for _, v in segs) for _, segs in bars), default=0.0) or 1.0
    used = list(dict.fromkeys(k for _, segs in bars for k, v in segs if v > 0))
    height = row_h * (len(bars) + 2) + 6
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + width + 60}" '
              f'height="{height}" style="font:11px sans-serif">'),
             f'<text x="0" y="12" font-weight="bold">{html.escape(caption)}</text>']
    for i, (label, segs) in enumerate(bars):
        y = row_h * (i + 1)
        parts.append(f'<text x="0" y="{y + 12}">{html.escape(label[:24])}</text>')
        x = float(label_w)
        for name, value in segs:
            w = width * value / top
            parts.append(f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row_h - 4}" '
                         f'fill="{COLORS.get(name, "#999")}"><title>{html.escape(name)}: '
                         f"{value:.3f}s</title></rect>")
            x += w
        total = sum(v for _, v in segs)
        parts.append(f'<text x="{x + 4:.1f}" y="{y + 12}">{total:.2f}</text>')
    parts.append(_legend(used, row_h * (len(bars) + 1) + 14))
    return "".join(parts) + "</svg>"


def _legend(names: Sequence[str], y: int) -> str:
    out, x = [], 0
    for name in names:
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" '
                   f'fill="{COLORS.get(name, "#999")}"/><text x="{x + 13}" y="{y}">{name}</text>')
        x += 20 + 7 * len(name)
    return "".join(out)
