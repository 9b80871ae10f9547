"""EXPLAIN and EXPLAIN ANALYZE text: the plan, then per LLM call its cost figures.

Per call: rows in, distinct prompts, prompt tokens (the model's tokenizer when available,
else an estimate), expected cached tokens for the chosen plan and for table order, expected
output tokens, estimated GPU-seconds (or dollars for priced models), what each rule changed
and how long it took; with ANALYZE, the measured counterparts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmsql.executors.llm_step import CallStats
from llmsql.optimizer.cost import CallCost, CostModel, call_cost
from llmsql.plan import PromptBatch, QueryPlan
from llmsql.udfs import REGISTRY
from llmsql.udfs.base import CallKind

if TYPE_CHECKING:
    from sqlglot import exp

SAMPLE_FOR_TOKENIZER = 500


@dataclass(frozen=True, slots=True)
class TokenCounter:
    """Counts tokens: exactly on a sample with a tokenizer, scaled by characters elsewhere."""

    count: Callable[[str], int] | None

    def per_prompt(self, prompts: Sequence[str]) -> tuple[dict[str, int], str]:
        """Tokens of each distinct prompt, and how they were obtained."""
        distinct = list(dict.fromkeys(prompts))
        if self.count is None or not distinct:
            return {p: max(1, round(len(p) / 4)) for p in distinct}, "estimated, 4 chars/token"
        step = max(1, len(distinct) // SAMPLE_FOR_TOKENIZER)
        sample = distinct[::step]
        if len(sample) == len(distinct):
            return {p: self.count(p) for p in distinct}, "model tokenizer"
        chars = sum(len(p) for p in sample)
        ratio = sum(self.count(p) for p in sample) / max(1, chars)
        how = f"model tokenizer on a {len(sample)}-prompt sample, scaled by length"
        return {p: max(1, round(len(p) * ratio)) for p in distinct}, how


def table_order_prompts(batch: PromptBatch) -> list[str]:
    """The call's distinct prompts in input (table) order with the written field order."""
    rep = batch.rep
    rows = range(batch.n_rows) if rep is None else [i for i in range(batch.n_rows) if rep[i] == i]
    return list(dict.fromkeys(batch.call.template.render_rows(batch.values, rows)))


def expected_output_tokens(batch: PromptBatch, prompts: int) -> tuple[int, str]:
    """Output tokens expected for ``prompts`` answers of this call, and the basis."""
    call = batch.call
    if call.kind is CallKind.FILTER:
        return prompts, "1 per prompt (Yes/No)"
    if call.kind is CallKind.CLASSIFY and call.options.labels:
        longest = max(max(1, round(len(lab) / 4)) for lab in call.options.labels)
        return prompts * longest, f"at most {longest} per prompt (longest label)"
    cap = call.options.max_tokens or REGISTRY[call.kind].default_max_tokens
    return prompts * cap, f"at most {cap} per prompt (max_tokens)"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _cost_lines(batch: PromptBatch, rows: Sequence[int], counter: TokenCounter,
                model: CostModel) -> list[str]:
    sent = batch.prompts(rows)
    table = table_order_prompts(batch)
    tokens_of, how = counter.per_prompt(sent + table)
    out_tokens, basis = expected_output_tokens(batch, len(sent))
    c: CallCost = call_cost(sent, table, tokens_of, out_tokens, model)
    money = f", ${c.usd:,.4f}" if c.usd is not None else ""
    return [
        f"    prompt tokens: {c.prompt_tokens:,} ({how})",
        f"    expected cached tokens: {c.cached_tokens:,} ({_pct(c.cached_tokens, c.prompt_tokens)})"
        f" with this plan vs {c.cached_tokens_table_order:,} "
        f"({_pct(c.cached_tokens_table_order, c.prompt_tokens)}) in table order",
        f"    expected output tokens: {c.output_tokens:,} ({basis})",
        f"    estimated GPU-seconds: {c.gpu_seconds:,.2f}{money}",
    ]


def _measured_lines(s: CallStats) -> list[str]:
    return [
        f"    measured: {s.sent} prompts sent, {s.reused} reused, {s.prompt_tokens:,} prompt "
        f"tokens, {s.cached_tokens:,} cached ({_pct(s.cached_tokens, s.prompt_tokens)}), "
        f"{s.output_tokens:,} output tokens",
        f"    time: inputs {s.input_seconds:.3f}s, rules {sum(t for _, t in s.rule_seconds):.3f}s"
        f", generation {s.generate_seconds:.3f}s, call total {s.seconds:.3f}s",
        *(f"    {s.null_answers} answers unparseable -> NULL" for _ in [0] if s.null_answers),
        *(f"    {s.failed} calls failed -> NULL" for _ in [0] if s.failed),
        *(f"    {n} answered from the result cache" for n in [getattr(s, "from_cache", 0)] if n),
        *(f"    NULL because {e.kind}: {e.reason}" for e in getattr(s, "errors", [])[:5]),
    ]


def _uncommented(tree: exp.Expression) -> exp.Expression:
    copy = tree.copy()
    for node in copy.walk():
        node.comments = None
    return copy


def _without_comments(plan: QueryPlan) -> QueryPlan:
    """``plan`` without SQL comments: sqlglot keeps a file's header comments on the nodes,
    and they would be repeated in every ``input:`` and ``Final:`` line."""
    calls = tuple(dataclasses.replace(c, input=_uncommented(c.input)) for c in plan.calls)
    return dataclasses.replace(plan, calls=calls, final=_uncommented(plan.final))


def render(
    plans: Sequence[QueryPlan],
    stats: Sequence[CallStats],
    batches: Sequence[tuple[PromptBatch, Sequence[int]]],
    *,
    counter: TokenCounter,
    model: CostModel,
    analyze: bool = False,
) -> str:
    """The EXPLAIN (or EXPLAIN ANALYZE) text."""
    by_id = {s.call_id: s for s in stats}
    batch_of = {b.call.id: (b, rows) for b, rows in batches}
    lines: list[str] = []
    for plan in plans:
        lines.append(_without_comments(plan).explain())
        for call in plan.calls:
            s = by_id.get(call.id)
            if s is None:
                continue
            lines.append(f"  {call.id} {call.where}: rows in {s.rows_in:,}, "
                         f"distinct prompts {s.distinct_prompts:,}")
            if call.id in batch_of:
                lines += _cost_lines(*batch_of[call.id], counter, model)
            times = dict(s.rule_seconds)
            lines += [f"    rule {note} ({times.get(note.split(':')[0], 0.0):.3f}s)"
                      for note in s.notes if ":" in note]
            if analyze:
                lines += _measured_lines(s)
    if not analyze and sum(1 for s in stats if s.kind == "LLM_FILTER") and len(stats) > 1:
        lines.append("  (without ANALYZE, calls after an LLM_FILTER are costed as if every row "
                     "passed it: an upper bound)")
    lines.append(
        f"  cost model: KV blocks of {model.block_tokens} tokens, cache {model.cache_tokens:,} "
        f"tokens, prefill {model.prefill_tokens_per_s:,.0f} tok/s, decode "
        f"{model.decode_tokens_per_s:,.0f} tok/s (assumed; see llmsql.optimizer.cost.CostModel)"
    )
    return "\n".join(lines)
