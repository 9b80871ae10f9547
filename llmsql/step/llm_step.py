"""The LLM step shared by every executor: input rows in, a lookup table of answers out.

``run_scalar`` binds a call to its input rows (Arrow), lets the optimizer rewrite the batch,
sends prompts to the backend in the chosen order, parses the answers and returns the lookup
table (inputs + ``__llmsql_result``). The executor decides where inputs come from and where
the lookup goes; nothing here knows about DuckDB or Spark.

This module is over the 500-line guideline: binding, request building, the answer path
(query memo, result cache, backend, parsing, error accounting) and the send loop with its
warm-ups share StepEnv and a dozen small private helpers; LLM_AGG's step, which only calls
them, is :mod:`llmsql.step.agg`.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from llmsql.arrays import from_values, int64s, ints
from llmsql.backends.base import AdapterRef, BackendSpec, LLMBackend, Request, Response
from llmsql.cache import ResultCache, reproducible, request_key
from llmsql.errors import (
    BackendError,
    BudgetExceeded,
    CallFailed,
    ConfigError,
    ContextLengthError,
    QueryInterrupted,
)
from llmsql.optimizer import RuleContext, optimize
from llmsql.plan import ARG_PREFIX, RESULT_COL, LLMCall, PromptBatch
from llmsql.stats import MAX_ERRORS_KEPT, CallError, CallStats
from llmsql.step.offload import offload_line, offload_stats
from llmsql.udfs.base import Parsed, Volatility, choice_probs_text
from llmsql.udfs.prompts import render_value

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from llmsql.budget import BudgetMeter
    from llmsql.progress import Progress

logger = logging.getLogger(__name__)

TEMPLATE_OVERHEAD_TOKENS = 64
"""Room left for a chat template around the prompt when lengths are checked by bytes."""

@dataclass(slots=True)
class StepEnv:
    """What a step needs from the session: a backend per model, settings, shared memo."""

    backend_for: Callable[[str | None], LLMBackend]
    rule_ctx: Callable[[LLMBackend], RuleContext]
    progress: Progress
    memo: dict[tuple[Any, ...], Response] = field(default_factory=dict)
    known: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    """Parsed answers by call signature and field values (any field order): an input
    answered once in a query (e.g. in a selectivity sample) is never sent again. The Spark
    engine ships a call's entries (:func:`known_answers`) to its tasks and adds small calls'
    answers back (:func:`remember`)."""
    spec_for: Callable[[str | None], BackendSpec] | None = None
    """The spec a backend per model is built from, where the session may ship it to other
    processes (Spark executors); None for a backend object or a dry run."""
    on_batch: Callable[[PromptBatch, tuple[int, ...]], None] | None = None
    """Called with each optimized batch and the rows about to be sent, in send order
    (rows answered earlier in the query are left out); EXPLAIN --prompts uses it."""
    cache: ResultCache | None = None
    """Read before the backend, written after every batch; None: no persistent cache."""
    on_error: str = "null"
    """``null``: a prompt that failed for good gives NULL; ``fail``: the query stops."""
    budget: BudgetMeter | None = None
    """The query's budgets (None: unlimited)."""
    adapters: dict[str, AdapterRef] = field(default_factory=dict)
    """The LoRA adapters the query's calls name (``adapter => 'name'``), resolved by the
    session from its catalog (status ready, same base model) before the query runs."""


# ---- binding --------------------------------------------------------------------------------


def render_column(column: pa.ChunkedArray | pa.Array) -> tuple[str, ...]:
    """Render an Arrow column with the engine-independent value contract."""
    values = column.to_pylist()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return tuple(values) if not column.null_count else tuple(
            ["" if v is None else v for v in values])
    return tuple(map(render_value, values))


def bind(call: LLMCall, table: pa.Table, /) -> PromptBatch:
    """Bind ``call`` to its distinct input rows."""
    values = tuple(
        render_column(table.column(f"{ARG_PREFIX}{j}")) for j in range(len(call.fields))
    )
    return PromptBatch(call=call, values=values, n_rows=table.num_rows)


# ---- requests ---------------------------------------------------------------------------------


def adapter_ref(call: LLMCall, adapters: dict[str, AdapterRef], /) -> AdapterRef | None:
    """The adapter ``call`` runs with (None: the base model).

    Raises:
        ConfigError: the call names an adapter the session did not resolve.
    """
    name = call.options.adapter
    if name is None:
        return None
    ref = adapters.get(name)
    if ref is None:
        msg = (f"{call.where} names adapter {name!r}, but this step was not given it; "
               "run the query through a session whose catalog has the adapter "
               "(SHOW ADAPTERS lists them)")
        raise ConfigError(msg)
    return ref


def _request(call: LLMCall, prompt: str, backend: LLMBackend,
             adapter: AdapterRef | None = None) -> Request:
    """The request for one rendered prompt: the call's options, and the constraints its
    function's spec asks of this backend (its suffix appended to the prompt).
    """
    opts = call.options
    spec = call.kind.spec
    c = spec.constraints(opts, backend.capabilities)
    return Request(
        prompt=prompt + c.suffix,
        max_tokens=opts.max_tokens or spec.default_max_tokens,
        temperature=opts.temperature,
        seed=opts.seed,
        choices=c.choices,
        json_schema=c.json_schema,
        choice_probs=c.choice_probs,
        adapter=adapter,
    )


def build_requests(call: LLMCall, prompts: Sequence[str], backend: LLMBackend,
                   adapter: AdapterRef | None = None) -> list[Request]:
    """One request per prompt, as :func:`_request` builds it (the options the call's
    requests share are worked out once); ``adapter``: the LoRA adapter they run with.
    """
    r = _request(call, "", backend, adapter)
    suffix = r.prompt
    return [Request(p + suffix, r.max_tokens, r.temperature, r.seed, r.choices, r.json_schema,
                    r.ignore_eos, r.choice_probs, r.adapter) for p in prompts]


def _memo_key(backend: LLMBackend, req: Request) -> tuple[Any, ...]:
    return _memo_keys(backend, [req])[0]


def _memo_keys(backend: LLMBackend, reqs: Sequence[Request]) -> list[tuple[Any, ...]]:
    """The query memo's key of every request (the model identity asked once)."""
    model = backend.model_id()
    return [(model, r.max_tokens, r.temperature, r.seed, r.choices, r.json_schema,
             r.choice_probs, r.adapter, r.prompt) for r in reqs]


def _fit(call: LLMCall, prompt: str, values: Sequence[str], backend: LLMBackend,
         stats: CallStats, env: StepEnv) -> str:
    """Check the prompt fits the context; truncate the longest field if the call allows it."""
    budget = _room(call, backend)
    if len(prompt.encode("utf-8")) + TEMPLATE_OVERHEAD_TOKENS <= budget:
        return prompt
    if _answered(call, prompt, backend, env):
        return prompt  # it fit when it was answered; counting would need the model
    tokens = backend.count_tokens(prompt)
    if tokens <= budget:
        return prompt
    if not call.options.truncate or not values:
        preview = ", ".join(f"{f.name}={v[:40]!r}"
                            for f, v in zip(call.fields, values, strict=False))
        msg = (
            f"a prompt of {call.where} is {tokens} tokens, but the model's context leaves "
            f"{budget} ({backend.capabilities.max_model_len} minus max_tokens); row with "
            f"{preview}; shorten the field, lower max_tokens, or pass truncate => true"
        )
        raise ContextLengthError(
            msg,
            step=call.id,
        )
    stats.truncated += 1
    return _truncate(call, list(values), budget, backend)


def _room(call: LLMCall, backend: LLMBackend) -> int:
    """Tokens the context leaves a prompt of ``call`` (the model's length minus the answer's)."""
    spec = call.kind.spec
    suffix = spec.constraints(call.options, backend.capabilities).suffix
    # characters bound tokens: the suffix the request appends never makes a prompt overflow
    return backend.capabilities.max_model_len - len(suffix) - (
        call.options.max_tokens or spec.default_max_tokens
    )


def _answered(call: LLMCall, prompt: str, backend: LLMBackend, env: StepEnv) -> bool:
    """Whether ``prompt``, as it stands, has an answer in the query's memo or the result
    cache.
    """
    req = _request(call, prompt, backend, adapter_ref(call, env.adapters))
    return _memo_key(backend, req) in env.memo or bool(_cache_hits([req], backend, env.cache))


def _truncate(call: LLMCall, values: list[str], budget: int, backend: LLMBackend) -> str:
    for _ in range(32):
        longest = max(range(len(values)), key=lambda j: len(values[j]))
        prompt = call.template.render(values)
        tokens = backend.count_tokens(prompt)
        if tokens <= budget:
            return prompt
        keep = int(len(values[longest]) * budget / tokens * 0.95) - 1
        values[longest] = values[longest][: max(0, keep)]
    msg = f"{call.where}: truncating fields could not make the prompt fit the context"
    raise ContextLengthError(
        msg,
        step=call.id,
    )


# ---- sending ------------------------------------------------------------------------------


def _cache_hits(reqs: Sequence[Request], backend: LLMBackend,
                cache: ResultCache | None) -> dict[int, Response]:
    """Answers of reproducible ``reqs`` found in the result cache, by position."""
    if cache is None:
        return {}
    model = backend.model_id()
    keys = {i: request_key(model, r) for i, r in enumerate(reqs) if reproducible(r)}
    found = cache.get_many(list(keys.values()))
    return {i: found[k] for i, k in keys.items() if k in found}


def _commit(reqs: Sequence[Request], answers: Sequence[Response], backend: LLMBackend,
            cache: ResultCache | None) -> None:
    """Write a batch's reproducible, successful answers to the result cache."""
    if cache is None:
        return
    model = backend.model_id()
    items = [(request_key(model, q), model, a) for q, a in zip(reqs, answers, strict=True)
             if a.error is None and reproducible(q)]
    try:
        cache.put_many(items)
    except sqlite3.Error as exc:
        cache.write_errors += 1
        logger.warning("could not write %d answers to the result cache %s: %s; they will be "
                       "paid again if the query is re-run", len(items), cache.path, exc)


def answer_through_cache(reqs: Sequence[Request], backend: LLMBackend,
                         cache: ResultCache | None) -> tuple[list[Response], list[Response]]:
    """Answers to ``reqs`` asked outside a call (EXPLAIN's sample): from the result cache
    where it has them, the rest generated and written to it, so a later run reuses them.
    Returns the answers in order, and those that were generated (paid).
    """
    hits = _cache_hits(reqs, backend, cache)
    todo = [i for i in range(len(reqs)) if i not in hits]
    fresh = _generate(backend, [reqs[i] for i in todo]) if todo else []
    _commit([reqs[i] for i in todo], fresh, backend, cache)
    answers = {**hits, **dict(zip(todo, fresh, strict=True))}
    return [answers[i] for i in range(len(reqs))], fresh


def _generate(backend: LLMBackend, reqs: list[Request]) -> list[Response]:
    answers = backend.generate(reqs)
    if len(answers) != len(reqs):
        msg = (
            f"backend {backend.name!r} returned {len(answers)} answers for {len(reqs)} "
            "prompts"
        )
        raise BackendError(
            msg, backend=backend.name,
        )
    return [_with_probs_text(q, a) for q, a in zip(reqs, answers, strict=True)]


def _with_probs_text(req: Request, resp: Response) -> Response:
    """An answer with choice probabilities, as it is kept and parsed: its text becomes
    :func:`~llmsql.udfs.base.choice_probs_text`, so the query memo and the result cache
    (which keeps texts) give a re-run the same value.
    """
    if not req.choice_probs or req.choices is None or resp.choice_probs is None:
        return resp
    return dataclasses.replace(resp, text=choice_probs_text(req.choices, resp.choice_probs))


def _send(
    reqs: list[Request], keys: list[tuple[Any, ...]], hits: dict[int, Response],
    backend: LLMBackend, env: StepEnv, stats: CallStats, model: str | None,
    warmups: Sequence[str] = (),
) -> list[Response]:
    """Answer ``reqs``: from the query's memo, then the result cache (``hits``), then the
    backend, in parts that fit the budget; each part is committed to the cache at once.

    ``warmups`` (the next window's shared prefixes) ride along at the end of the last part
    sent, so the engine computes them while this part decodes (sent alone if nothing is).
    """
    out: list[Response | None] = [env.memo.get(k) for k in keys]
    stats.reused += sum(r is not None for r in out)
    for i, resp in hits.items():
        if out[i] is None:
            out[i] = env.memo[keys[i]] = resp
            stats.from_cache += 1
    todo = [i for i, r in enumerate(out) if r is None]
    while todo:
        n = env.budget.admit(model, [reqs[i] for i in todo]) if env.budget else len(todo)
        if n == 0:
            assert env.budget is not None
            raise env.budget.blocked(model, reqs[todo[0]])
        part, todo = todo[:n], todo[n:]
        extra = [] if todo else _warmup_requests(warmups)
        answers = _generate(backend, [reqs[i] for i in part] + extra)
        if extra:
            _count_warmups(answers[len(part):], stats)
            answers, warmups = answers[:len(part)], ()
        if env.budget is not None:
            env.budget.record(model, answers)
        _commit([reqs[i] for i in part], answers, backend, env.cache)
        for i, resp in zip(part, answers, strict=True):
            out[i] = resp
            if resp.error is None:
                env.memo[keys[i]] = resp
        _count_sent(answers, stats)
    if warmups:
        _warm_up(list(warmups), backend, stats)
    return [r for r in out if r is not None]


def _memo_parse(parse: Callable[[str, Any], Parsed]) -> Callable[[str, Any], Parsed]:
    """``parse`` remembering short answers (a call's options are fixed): a filter's or a
    classifier's thousands of answers are a few distinct texts.
    """
    seen: dict[str, Parsed] = {}

    def memo(text: str, options: Any) -> Parsed:
        if len(text) > 32:
            return parse(text, options)
        found = seen.get(text)
        if found is None:
            found = seen[text] = parse(text, options)
        return found

    return memo


def _count_sent(answers: Sequence[Response], stats: CallStats) -> None:
    """Add answers the backend gave to the call's sent prompts and tokens."""
    stats.sent += len(answers)
    stats.prompt_tokens += sum(r.prompt_tokens for r in answers)
    stats.cached_tokens += sum(r.cached_tokens for r in answers)
    stats.cache_unreported += sum(1 for r in answers if not r.cached_reported)
    stats.output_tokens += sum(r.output_tokens for r in answers)


def _parse(call: LLMCall, resp: Response, prompt: str, env: StepEnv, stats: CallStats,
           parse: Callable[[str, Any], Parsed]) -> Any:
    if resp.error is not None:
        stats.failed += 1
        _reason(stats, call, "failed", resp.error, prompt)
        if env.on_error == "fail":
            msg = (
                f"{call.where} failed for the prompt {prompt[:80]!r}: {resp.error}; the query "
                f"stopped because llmsql.on_error = 'fail'. {_kept(env, stats)}; fix the "
                "cause, or SET llmsql.on_error = 'null' to get NULL for rows that fail"
            )
            raise CallFailed(
                msg,
                step=call.id,
            )
        return None
    parsed = parse(resp.text, call.options)
    if not parsed.ok:
        stats.null_answers += 1
        _reason(stats, call, "unparseable", parsed.reason, prompt)
    return parsed.value


def _reason(stats: CallStats, call: LLMCall, kind: str, reason: str, prompt: str) -> None:
    if len(stats.null_reasons) < 20:
        stats.null_reasons.append(reason if kind == "unparseable" else f"failed: {reason}")
    if len(stats.errors) < MAX_ERRORS_KEPT:
        stats.errors.append(CallError(call.id, call.where, kind, reason, prompt[:200]))


def _kept(env: StepEnv, stats: CallStats) -> str:
    done = f"{stats.sent} prompts were answered by the backend"
    if env.cache is None:
        return done + " (the result cache is off: a re-run pays for them again)"
    return done + "; they are kept in the result cache, so a re-run does not pay for them"


def _to_send(reqs: list[Request], keys: list[tuple[Any, ...]], hits: dict[int, Response],
             env: StepEnv) -> list[Request]:
    """The distinct requests that neither the memo nor the result cache answers."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for i, (r, k) in enumerate(zip(reqs, keys, strict=True)):
        if i not in hits and k not in env.memo and k not in seen:
            seen.add(k)
            out.append(r)
    return out


def _answer_prompts(
    call: LLMCall, prompts: list[str], bounds: Sequence[int], backend: LLMBackend,
    env: StepEnv, stats: CallStats, warmups: Sequence[str] = (),
) -> list[Any]:
    """Send prompts batch by batch (``bounds``: batch starts), return parsed values.

    The result cache is read for every prompt first; a budget is checked against the
    prompts it does not answer before anything is sent.
    """
    values: list[Any] = []
    edges = [*bounds, len(prompts)] if bounds else [0, len(prompts)]
    parse = _memo_parse(call.kind.spec.parse)
    try:
        reqs = build_requests(call, prompts, backend, adapter_ref(call, env.adapters))
        keys = _memo_keys(backend, reqs)
        hits = _cache_hits(reqs, backend, env.cache)
        if env.budget is not None:
            env.budget.check_step(call.where, call.options.model,
                                  _to_send(reqs, keys, hits, env))
        for lo, hi in zip(edges, edges[1:], strict=False):
            part = {i - lo: r for i, r in hits.items() if lo <= i < hi}
            resps = _send(reqs[lo:hi], keys[lo:hi], part, backend, env, stats,
                          call.options.model, warmups if hi == len(prompts) else ())
            values += [_parse(call, r, p, env, stats, parse)
                       for r, p in zip(resps, prompts[lo:hi], strict=True)]
            env.progress.advance(hi - lo, sum(r.prompt_tokens + r.output_tokens for r in resps),
                                 sum(r.cached_tokens for r in resps)
                                 if all(r.cached_reported for r in resps) else None)
    except KeyboardInterrupt:
        msg = (
            f"query interrupted during {call.where}: {len(values)} of {len(prompts)} prompts "
            f"were answered; {_kept(env, stats)}"
        )
        raise QueryInterrupted(msg) from None
    except BudgetExceeded as exc:
        if env.budget is not None and env.budget.scope is not None:
            raise  # a share of the query's budget: the driver tells the whole story
        kept = f"; {_kept(env, stats)}" if stats.sent else ""
        msg = (
            f"{exc}. The query stopped in {call.where} with {len(values)} of {len(prompts)} "
            f"prompts answered{kept}; raise the budget (SET llmsql.{exc.budget} = ...) and run "
            "again to continue"
        )
        raise BudgetExceeded(
            msg, budget=exc.budget, limit=exc.limit, used=exc.used,
        ) from None
    return values


# ---- the scalar step --------------------------------------------------------------------------


def result_type(call: LLMCall) -> pa.DataType:
    """The Arrow type of the call's SQL result (its function's spec says)."""
    return call.kind.spec.arrow_type(call.options)


def _signature(call: LLMCall, backend: LLMBackend) -> tuple[Any, ...]:
    """What makes two calls' answers interchangeable for equal field values."""
    return (backend.model_id(), *signature_tail(call))


def signature_tail(call: LLMCall) -> tuple[Any, ...]:
    """The part of a call's answer signature that the plan alone gives (all but the model
    identity; within one query, equal tails mean equal models, since options name it).

    Plain values only (the kind's name, the options as a tuple): the signature is hashed
    with every row's values, and an enum's or a dataclass's hash runs Python code.
    """
    return (call.kind.value, call.template.instruction, call.template.fields,
            dataclasses.astuple(call.options))


KnownAnswers = tuple[tuple[tuple[str, ...], Any], ...]
"""Answers already obtained for one call's signature: (rendered field values, parsed answer)."""


def known_answers(call: LLMCall, known: dict[tuple[Any, ...], Any], /) -> KnownAnswers:
    """The entries of ``known`` that can answer ``call`` (to ship them to other processes)."""
    tail = signature_tail(call)
    return tuple((values, answer) for (sig, values), answer in known.items()
                 if tuple(sig[1:]) == tail)


def remember(call: LLMCall, model_id: str, entries: KnownAnswers,
             known: dict[tuple[Any, ...], Any], /) -> None:
    """Add answers of ``call`` obtained elsewhere (a Spark task) to ``known``."""
    signature = (model_id, *signature_tail(call))
    known.update(((signature, values), answer) for values, answer in entries)


def _warmup_requests(prefixes: Sequence[str]) -> list[Request]:
    """Shared prefixes as requests of one output token (answers discarded)."""
    return [Request(p, max_tokens=1) for p in prefixes]


def _needed_warmups(call: LLMCall, todo: Sequence[int], prompts: Sequence[str],
                    warm: dict[int, int], backend: LLMBackend, env: StepEnv) -> dict[int, int]:
    """The warm-ups (row -> prefix length) whose prefix is shared by a prompt that will be
    sent: one that neither the query's memo nor the result cache answers. Warming a prefix
    whose prompts are all answered would reach the backend for nothing (a cached re-run
    must not need it).
    """
    if not warm:
        return warm
    if env.cache is None and not env.memo:  # nothing answers a prompt: each one is sent
        return {i: warm[i] for i in todo if i in warm}
    reqs = build_requests(call, prompts, backend, adapter_ref(call, env.adapters))
    hits = _cache_hits(reqs, backend, env.cache)
    sent = {k for k, key in enumerate(_memo_keys(backend, reqs))
            if k not in hits and key not in env.memo}
    return {i: warm[i] for k, i in enumerate(todo)
            if i in warm and _group_sends(prompts, k, prompts[k][: warm[i]], sent)}


def _group_sends(prompts: Sequence[str], start: int, head: str, sent: set[int]) -> bool:
    """Whether a prompt of the run from ``start`` that shares ``head`` is in ``sent``."""
    for k in range(start, len(prompts)):
        if not prompts[k].startswith(head):
            return False
        if k in sent:
            return True
    return False


def _count_warmups(out: Sequence[Response], stats: CallStats) -> None:
    stats.warmup_prompts += len(out)
    stats.warmup_tokens += sum(r.prompt_tokens - r.cached_tokens for r in out)


def _warm_up(prefixes: list[str], backend: LLMBackend, stats: CallStats) -> None:
    """Send shared prefixes alone to warm the cache."""
    if prefixes:
        _count_warmups(backend.generate(_warmup_requests(prefixes)), stats)


def _chunks(bounds: Sequence[int], n: int, stepwise: bool) -> list[tuple[int, int]]:
    """The whole range at once, or batch by batch when an early stop may cut it short."""
    if not stepwise:
        return [(0, n)] if n else []
    edges = [*bounds, n] if bounds else [0, n]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:], strict=False) if hi > lo]


def _passed(batch: PromptBatch, answers: dict[int, Any]) -> int:
    """Input rows whose (representative's) answer is TRUE."""
    rep = batch.rep or range(batch.n_rows)
    return sum(1 for r in rep if answers.get(r) is True)


def _rebound(bounds: Sequence[int], order: Sequence[int], skipped: set[int]) -> list[int]:
    """Batch starts over ``order`` re-expressed over the rows that are still to send."""
    if not skipped:
        return list(bounds)
    kept_before = [0]
    for i in order:
        kept_before.append(kept_before[-1] + (i not in skipped))
    return sorted({kept_before[b] for b in bounds if kept_before[b] < kept_before[-1]})


def run_scalar(call: LLMCall, inputs: pa.Table, env: StepEnv, /) -> tuple[pa.Table, CallStats]:
    """Answer every input row of a scalar call; return the lookup table and stats."""
    start = time.perf_counter()
    stats = CallStats(call.id, call.kind.value, call.where, rows_in=inputs.num_rows)
    backend = env.backend_for(call.options.model) if inputs.num_rows else None
    results: list[Any] = []
    if backend is not None:
        offloaded = offload_stats(backend)
        batch, trace = optimize(bind(call, inputs), env.rule_ctx(backend))
        stats.notes = batch.notes
        stats.rule_seconds = tuple((t.rule, t.seconds) for t in trace)
        order = batch.send_order()
        stats.distinct_prompts = len(order)
        signature = _signature(call, backend)
        row_values = list(zip(*batch.values, strict=False)) if batch.values else [()] * batch.n_rows
        keys = {i: (signature, row_values[i]) for i in order}
        known = env.known
        answers = {i: known[keys[i]] for i in order if keys[i] in known} if known else {}
        todo = [i for i in order if i not in answers]
        stats.reused += len(answers)
        if env.on_batch is not None:
            env.on_batch(batch, tuple(todo))
        room = _room(call, backend) if todo else 0
        prompts = [prompt if 4 * len(prompt) + TEMPLATE_OVERHEAD_TOKENS <= room  # bytes <= 4
                   else _fit(call, prompt, row_values[i], backend, stats, env)  # x chars
                   for i, prompt in zip(todo, batch.prompts(todo), strict=True)]
        env.progress.start(len(prompts), call.where)
        t0 = time.perf_counter()
        bounds = _rebound(batch.batches, order, set(answers))
        # a warm-up runs the base model: an adapter's prompts get nothing from it
        warm = _needed_warmups(call, todo, prompts, dict(batch.warmups), backend, env
                               ) if call.options.adapter is None else {}
        stepwise = call.stop_after is not None or bool(warm)
        chunks = _chunks(bounds, len(todo), stepwise)

        def warm_texts(lo: int, hi: int) -> list[str]:
            return [prompts[k][: warm[i]] for k, i in enumerate(todo[lo:hi], lo) if i in warm]

        # the first window's prefixes are warmed alone; every later window's ride along
        # with the previous window's last engine call (computed while it decodes)
        if chunks:
            _warm_up(warm_texts(*chunks[0]), backend, stats)
        for k, (lo, hi) in enumerate(chunks):
            if call.stop_after is not None and _passed(batch, answers) >= call.stop_after:
                stats.notes = (*stats.notes, f"LIMIT reached: stopped after {lo} of "
                               f"{len(todo)} prompts")
                break
            ahead = warm_texts(*chunks[k + 1]) if k + 1 < len(chunks) else []
            answers.update(zip(todo[lo:hi], _answer_prompts(
                call, prompts[lo:hi], [b - lo for b in bounds if lo <= b < hi], backend, env,
                stats, ahead), strict=True))
        stats.generate_seconds = time.perf_counter() - t0
        stats.moe = offload_line(backend, offloaded)
        env.known.update((keys[i], answers[i]) for i in order if i in answers)
        stats.true_answers = sum(1 for i in order if answers.get(i) is True)
        rep = batch.rep or tuple(range(batch.n_rows))
        results = [answers.get(rep[i]) for i in range(batch.n_rows)]
    stats.seconds = time.perf_counter() - start
    if call.volatility is Volatility.VOLATILE:
        stats.notes = (*stats.notes, "volatile call: one sample per distinct input")
    return _lookup(inputs, results, call), stats


def distinct_rows(table: pa.Table, columns: Sequence[str]) -> list[int]:
    """Indexes of the first row of each distinct tuple of ``columns``, in table order."""
    n = table.num_rows
    if n == 0:
        return []
    if not columns:
        return [0]
    import pyarrow.compute as pc  # not at import: 40 ms of `import llmsql`

    try:
        # Arrow's hash kernel per column (the equality Table.group_by uses: -0.0 and NaN
        # payloads kept apart, NULL a value of its own), then distinct code tuples; not
        # group_by itself, whose first use imports pyarrow.dataset and with it pandas
        codes = [ints(pc.dictionary_encode(table.column(c).combine_chunks(),
                                           null_encoding="encode").indices) for c in columns]
        first = np.unique(np.stack(codes, axis=1), axis=0, return_index=True)[1]
        return sorted(first.tolist())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        first: dict[str, int] = {}
        rows = zip(*[table.column(c).to_pylist() for c in columns], strict=True)
        for i, row in enumerate(rows):
            first.setdefault(repr(row), i)
        return sorted(first.values())


def _lookup(inputs: pa.Table, results: list[Any], call: LLMCall) -> pa.Table:
    """One row per distinct input tuple (the final query's lookups need exactly one)."""
    arg_cols = [c for c in inputs.column_names if c.startswith(ARG_PREFIX)]
    keep = distinct_rows(inputs, arg_cols)
    column = from_values([results[i] for i in keep] if results else [], result_type(call))
    table = inputs.select(arg_cols).take(int64s(keep))
    return table.append_column(RESULT_COL, column)
