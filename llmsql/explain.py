"""EXPLAIN and EXPLAIN ANALYZE text: the plan, then per LLM call its cost figures.

Per call: rows in, distinct prompts, prompt tokens, expected cached tokens for the chosen plan
and for table order, expected output tokens, estimated GPU-seconds (or dollars for priced
models), what each rule changed and how long it took; with ANALYZE, the measured
counterparts. Selectivity samples (a few rows of each of several LLM filters, answered to
order them) are shown as calls of their own, and a last line sums the prompt tokens.

**Prompt tokens** are the tokens the backend is sent, as its responses report them and
ANALYZE sums them (``CallStats.prompt_tokens``, :attr:`llmsql.result.QueryStats.prompt_tokens`):
each prompt sent once (a prompt answered earlier in the query, or by the result cache, is
not sent), inside the model's chat template where the backend applies one (the
``transformers`` and ``vllm`` backends do: 30 tokens per prompt on the embedded SmolLM2),
counted with the model's tokenizer. Warm-ups (shared prefixes sent alone to warm an
engine's cache) are not in it: EXPLAIN plans with the capabilities of the backend the query
would run on (:mod:`llmsql.backends.profile`), and the local backends need none. Constrained
choices (LLM_FILTER, LLM_CLASSIFY) score or decode their choices on top of the prompt; that
is output, not prompt: the ``transformers`` backend reports the chosen answer's tokens plus
the end-of-sequence token, vLLM one token where the choices' first tokens differ.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llmsql.backends.base import Capabilities, CoServeStats
from llmsql.backends.profile import SendProfile
from llmsql.optimizer.cost import CallCost, CostModel, call_cost
from llmsql.udfs.llm_filter import CHOICES

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from sqlglot import exp

    from llmsql.plan import LLMCall, PromptBatch, QueryPlan
    from llmsql.stats import CallStats
    from llmsql.udfs.base import Constraints

NO_PROFILE = SendProfile()
"""No measured send profile: EXPLAIN's defaults."""

SAMPLE_FOR_TOKENIZER = 500
"""At most this many distinct prompts of a call are tokenized; more are estimated."""
SAMPLE_CHARS = 60_000
"""...and about this many characters of them: W2's 28,405 prompts, 131 of them tokenized in
0.03 s, estimated within 1% of counting every one (6 s)."""


@dataclass(frozen=True, slots=True)
class TokenCounter:
    """Counts prompts' tokens as sent: every prompt exactly when a call has few, else a
    sample exactly and every prompt as the tokens around an empty prompt (the template's)
    plus its length times the sample's tokens per character; without a tokenizer, one
    token per 4 characters.
    """

    count: Callable[[str], int] | None
    """A prompt's tokens as the backend is sent it (chat template included where the
    backend applies one), or None: no tokenizer at hand."""
    text: Callable[[str], Sequence[int]] | None = None
    """A bare text's token ids (an answer's), or None."""
    template: bool = False
    """Whether ``count`` includes a chat template (EXPLAIN says so)."""

    def tokens(self, *groups: Sequence[str]) -> tuple[list[list[int]], str]:
        """Tokens of every prompt of each group, and how they were obtained."""
        distinct = list(dict.fromkeys(itertools.chain.from_iterable(groups)))
        if self.count is None or not distinct:
            return ([[max(1, round(len(p) / 4)) for p in g] for g in groups],
                    "estimated, 4 chars/token")
        what = "model tokenizer and chat template" if self.template else "model tokenizer"
        sample = _sample(distinct)
        if len(sample) == len(distinct):
            exact = {p: self.count(p) for p in distinct}
            return [[exact[p] for p in g] for g in groups], what
        base = self.count("")
        ratio = (sum(map(self.count, sample)) - base * len(sample)) / max(
            1, sum(map(len, sample)))
        how = f"{what} on a {len(sample)}-prompt sample, scaled by length"
        # max(1, base + round(len(p) * ratio)) for every prompt (rint rounds half to even,
        # as round does), vectorized: a call can send tens of thousands
        lengths = [np.fromiter(map(len, g), dtype=np.float64, count=len(g)) for g in groups]
        return [np.maximum(1, base + np.rint(n * ratio)).astype(np.int64).tolist()
                for n in lengths], how

    def per_prompt(self, prompts: Sequence[str]) -> tuple[dict[str, int], str]:
        """Tokens of each distinct prompt, and how they were obtained."""
        (tokens,), how = self.tokens(prompts)
        return dict(zip(prompts, tokens, strict=True)), how


def _sample(distinct: Sequence[str]) -> Sequence[str]:
    """Every ``step``-th prompt: at most :data:`SAMPLE_FOR_TOKENIZER` prompts and about
    :data:`SAMPLE_CHARS` characters (all of them when that is fewer than twice as many).
    """
    chars = sum(map(len, distinct))
    target = min(SAMPLE_FOR_TOKENIZER, max(1, SAMPLE_CHARS * len(distinct) // max(1, chars)))
    return distinct[:: max(1, len(distinct) // target)]


def table_order_prompts(batch: PromptBatch) -> list[str]:
    """The call's distinct prompts in input (table) order with the written field order."""
    rep = batch.rep
    rows = range(batch.n_rows) if rep is None else [i for i in range(batch.n_rows) if rep[i] == i]
    return list(dict.fromkeys(batch.call.template.render_rows(batch.values, rows)))


def expected_output_tokens(
    batch: PromptBatch, prompts: int, *, profile: SendProfile = NO_PROFILE,
    text: Callable[[str], Sequence[int]] | None = None,
) -> tuple[int, str]:
    """Output tokens expected for ``prompts`` answers of this call, and the basis.

    Args:
        batch: the call's batch.
        prompts: how many prompts are sent.
        profile: how the backend answers constrained choices.
        text: the model's tokenizer for answers (token ids of a text), if at hand.
    """
    call = batch.call
    spec = call.kind.spec
    choices = _constraints(call, profile).choices
    if choices and text is not None:
        return _choice_output(choices, prompts, profile, text)
    if choices and tuple(choices) == CHOICES:
        return prompts, "1 per prompt (Yes/No)"
    if choices:
        longest = max(max(1, round(len(lab) / 4)) for lab in choices)
        return prompts * longest, f"at most {longest} per prompt (longest label)"
    cap = call.options.max_tokens or spec.default_max_tokens
    return prompts * cap, f"at most {cap} per prompt (max_tokens)"


_CHOOSING = Capabilities(constrained_choice=True, json_schema=True)
"""Answers are estimated as constrained to their choices (a backend that cannot constrain
them is asked to give one of them); choice probabilities only where the profile says."""
_PROBS = dataclasses.replace(_CHOOSING, choice_probabilities=True)


def _constraints(call: LLMCall, profile: SendProfile) -> Constraints:
    """The request constraints EXPLAIN estimates the call's answers with."""
    probs = profile.capabilities is not None and profile.capabilities.choice_probabilities
    return call.kind.spec.constraints(call.options, _PROBS if probs else _CHOOSING)


def _choice_output(choices: Sequence[str], prompts: int, profile: SendProfile,
                   text: Callable[[str], Sequence[int]]) -> tuple[int, str]:
    """Output tokens of constrained choices, as the backend reports them."""
    ids = [list(text(c)) for c in choices]
    firsts = [t[0] for t in ids if t]
    if profile.first_token_choice and len(firsts) == len(ids) == len(set(firsts)):
        return prompts, "1 per prompt (the choice's first token)"
    eos = int(profile.choice_eos)
    lengths = {len(t) + eos for t in ids}
    what = "Yes/No" if tuple(choices) == CHOICES else "the label"
    what += " + end of sequence" if eos else ""
    if len(lengths) == 1:
        n = lengths.pop()
        return prompts * n, f"{n} per prompt ({what})"
    n = max(lengths)
    return prompts * n, f"at most {n} per prompt ({what})"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


@dataclass(frozen=True, slots=True)
class CallEstimate:
    """EXPLAIN's figures for one LLM call (or selectivity sample) and their bases."""

    call_id: str
    cost: CallCost
    tokens_how: str
    """How the prompt tokens were counted."""
    output_basis: str
    """How the output tokens were estimated."""
    templated: bool = False
    """Whether the prompt tokens include the chat template."""
    moe: str | None = None
    """With expert offload: the plan the cost model chooses for the call, its GPU bytes for
    experts, expected hit rate and bytes moved per token
    (:meth:`llmsql.moe.plan.PlanEstimate.describe`)."""


@dataclass(frozen=True, slots=True)
class FilterSample:
    """An LLM filter's pass rate as a sample of its prompts, answered by the model, gave it
    (``explain(..., sample=N)``); later calls are costed with it.
    """

    call: str
    """The call, as EXPLAIN names it (``LLM_FILTER(...) at line 1, column 30``)."""
    asked: int
    """Prompts sent to the model."""
    distinct: int
    """Distinct prompts of the call (in the dry run, where every earlier filter passed)."""
    passed: int
    """Answers that parsed as TRUE."""
    prompt_tokens: int
    """Prompt tokens the sample cost, as the backend reported them (answers the result cache
    already held cost nothing)."""

    def line(self) -> str:
        """EXPLAIN's line for it."""
        return (f"  sample of {self.call}: {self.asked} of {self.distinct} distinct prompts "
                f"answered by the model, {self.passed} passed ({_pct(self.passed, self.asked)}),"
                f" {self.prompt_tokens:,} prompt tokens paid; later calls see the rows its "
                "answers pass")


def estimate_call(batch: PromptBatch, rows: Sequence[int], counter: TokenCounter,
                  model: CostModel, profile: SendProfile = NO_PROFILE) -> CallEstimate:
    """The figures of one call from its optimized batch and the rows it sends."""
    suffix = _constraints(batch.call, profile).suffix  # what the request appends
    sent = [p + suffix for p in batch.prompts(rows)]
    table = [p + suffix for p in table_order_prompts(batch)]
    (sent_tokens, table_tokens), how = counter.tokens(sent, table)
    out_tokens, basis = expected_output_tokens(batch, len(sent), profile=profile,
                                               text=counter.text)
    c = call_cost(sent, table, sent_tokens, table_tokens, out_tokens, model)
    return CallEstimate(batch.call.id, c, how, basis, counter.template)


def _cost_lines(e: CallEstimate) -> list[str]:
    c = e.cost
    money = f", ${c.usd:,.4f}" if c.usd is not None else ""
    return [
        f"    prompt tokens: {c.prompt_tokens:,} ({e.tokens_how})",
        f"    expected cached tokens: {c.cached_tokens:,} "
        f"({_pct(c.cached_tokens, c.prompt_tokens)})"
        f" with this plan vs {c.cached_tokens_table_order:,} "
        f"({_pct(c.cached_tokens_table_order, c.prompt_tokens)}) in table order",
        f"    expected output tokens: {c.output_tokens:,} ({e.output_basis})",
        f"    estimated GPU-seconds: {c.gpu_seconds:,.2f}{money}",
        *(f"    {e.moe}" for _ in [0] if e.moe),
    ]


def _cached(s: CallStats) -> str:
    if s.cached_unknown:
        return "cached tokens not reported by the backend"
    unknown = f", {s.cache_unreported} prompts unreported" if s.cache_unreported else ""
    return f"{s.cached_tokens:,} cached ({_pct(s.cached_tokens, s.prompt_tokens)}{unknown})"


def _measured_lines(s: CallStats) -> list[str]:
    return [
        f"    measured: {s.sent} prompts sent, {s.reused} reused, {s.prompt_tokens:,} prompt "
        f"tokens, {_cached(s)}, {s.output_tokens:,} output tokens",
        *(f"    warm-ups: {s.warmup_prompts} sent, {s.warmup_tokens:,} prompt tokens computed "
          f"for them; the call's prompts then found {_cached(s)}"
          for _ in [0] if s.warmup_prompts),
        f"    time: inputs {s.input_seconds:.3f}s, rules {sum(t for _, t in s.rule_seconds):.3f}s"
        f", generation {s.generate_seconds:.3f}s, call total {s.seconds:.3f}s",
        *(f"    {s.null_answers} answers unparseable -> NULL" for _ in [0] if s.null_answers),
        *(f"    {s.failed} calls failed -> NULL" for _ in [0] if s.failed),
        *(f"    {n} answered from the result cache" for n in [getattr(s, "from_cache", 0)] if n),
        *(f"    {line}" for line in [getattr(s, "moe", None)] if line),
        *(f"    NULL because {e.kind}: {e.reason}" for e in getattr(s, "errors", [])[:5]),
    ]


def _uncommented(tree: exp.Expression) -> exp.Expression:
    copy = tree.copy()
    for node in copy.walk():
        node.comments = None
    return copy


def _without_comments(plan: QueryPlan) -> QueryPlan:
    """``plan`` without SQL comments: sqlglot keeps a file's header comments on the nodes,
    and they would be repeated in every ``input:`` and ``Final:`` line.
    """
    calls = tuple(dataclasses.replace(c, input=_uncommented(c.input)) for c in plan.calls)
    return dataclasses.replace(plan, calls=calls, final=_uncommented(plan.final))


def coserve_line(before: CoServeStats | None, after: CoServeStats | None, /) -> str | None:
    """ANALYZE's line on time shared with adapter training (the backend's co-serving
    counters over the query), or None when nothing trained beside it.

    >>> line = coserve_line(CoServeStats(), CoServeStats(2.0, 0.5, 900, 40, 1))
    >>> for part in line.split("; "):
    ...     print(part)
      shared with adapter training: 40 inference passes had fine-tuning beside them
    inference 2.000s, fine-tuning 0.500s (900 tokens, 20.0% of the time)
    1 pass slower than the SLO (llmsql.slo_tpot_ms)
    """
    if after is None:
        return None
    b = before or CoServeStats()
    iters = after.iterations - b.iterations
    if iters <= 0:
        return None
    inf = after.inference_seconds - b.inference_seconds
    ft = after.finetune_seconds - b.finetune_seconds
    misses = after.slo_misses - b.slo_misses
    return (f"  shared with adapter training: {iters:,} inference passes had fine-tuning "
            f"beside them; inference {inf:.3f}s, fine-tuning {ft:.3f}s "
            f"({after.finetune_tokens - b.finetune_tokens:,} tokens, "
            f"{_pct(int(ft * 1e6), int((inf + ft) * 1e6))} of the time); {misses:,} "
            f"pass{'es' if misses != 1 else ''} slower than the SLO (llmsql.slo_tpot_ms)")


def _call_lines(s: CallStats, estimate: CallEstimate | None, analyze: bool,
                adapter: str | None = None) -> list[str]:
    lines = [f"  {s.call_id} {s.where}: rows in {s.rows_in:,}, "
             f"distinct prompts {s.distinct_prompts:,}"]
    if adapter is not None:
        lines.append(f"    adapter: {adapter} (LoRA, on the base model)")
    if estimate is not None:
        lines += _cost_lines(estimate)
    times = dict(s.rule_seconds)
    lines += [f"    rule {note} ({times.get(note.split(':')[0], 0.0):.3f}s)"
              for note in s.notes if ":" in note]
    return lines + (_measured_lines(s) if analyze else [])


def _by_plan(plans: Sequence[QueryPlan], stats: Sequence[CallStats]) -> list[list[CallStats]]:
    """Each plan's calls' statistics in execution order, a selectivity sample (a call of no
    plan) with the plan whose calls follow it.
    """
    plan_of = {c.id: k for k, plan in enumerate(plans) for c in plan.calls}
    groups: list[list[CallStats]] = [[] for _ in plans]
    pending: list[CallStats] = []
    for s in stats:
        k = plan_of.get(s.call_id)
        if k is None:
            pending.append(s)
        else:
            groups[k] += [*pending, s]
            pending = []
    if groups and pending:
        groups[-1] += pending
    return groups


def _total_line(stats: Sequence[CallStats], estimates: Sequence[CallEstimate],
                analyze: bool) -> list[str]:
    """The prompt tokens of every estimated call (LLM_AGG's are not: its reduce steps
    depend on the answers), and with ANALYZE the measured ones of every call.
    """
    if not estimates:
        return []
    total = sum(e.cost.prompt_tokens for e in estimates)
    line = (f"  prompt tokens sent, {len(estimates)} call(s): {total:,} expected "
            "(each prompt once, as the backend counts it")
    line += ", chat template included)" if any(e.templated for e in estimates) else ")"
    if analyze:
        measured = sum(s.prompt_tokens for s in stats)
        warm = sum(s.warmup_tokens for s in stats)
        line += f"; measured {measured:,}" + (f" (+{warm:,} in warm-ups)" if warm else "")
    return [line]


def render(
    plans: Sequence[QueryPlan],
    stats: Sequence[CallStats],
    estimates: Sequence[CallEstimate],
    *,
    model: CostModel,
    analyze: bool = False,
    samples: Sequence[FilterSample] = (),
    training: str | None = None,
) -> str:
    """The EXPLAIN (or EXPLAIN ANALYZE) text; ``training``: ANALYZE's line on time shared
    with adapter training (:func:`coserve_line`).
    """
    estimate_of = {e.call_id: e for e in estimates}
    lines: list[str] = []
    shown: list[CallEstimate] = []
    for plan, calls in zip(plans, _by_plan(plans, stats), strict=True):
        lines.append(_without_comments(plan).explain())
        adapters = {c.id: c.options.adapter for c in plan.calls}
        for s in calls:
            lines += _call_lines(s, estimate_of.get(s.call_id), analyze,
                                 adapters.get(s.call_id))
            shown += [estimate_of[s.call_id]] if s.call_id in estimate_of else []
    lines += _total_line(stats, shown, analyze)
    lines += [sample.line() for sample in samples]
    lines += [training] if training else []
    if not analyze and not samples and len(stats) > 1 and any(
            s.kind == "LLM_FILTER" for s in stats[:-1]):
        lines.append("  (without ANALYZE, calls after an LLM_FILTER are costed as if every row "
                     "passed it: an upper bound; explain --sample N, or sample=N, asks the "
                     "model N of its prompts and costs them at the sampled pass rate)")
    lines.append(
        f"  cost model: KV blocks of {model.block_tokens} tokens, cache {model.cache_tokens:,} "
        f"tokens, prefill {model.prefill_tokens_per_s:,.0f} tok/s, decode "
        f"{model.decode_tokens_per_s:,.0f} tok/s (assumed; see llmsql.optimizer.cost.CostModel)"
    )
    return "\n".join(lines)
