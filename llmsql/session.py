"""The Session: owns the connection, the executor, the backends and the settings.

A session is opened from one frozen :class:`~llmsql.config.SessionConfig` (``connect()``
builds it from its keywords). Each statement is planned once in written order, then the
optimizer's plan passes run over it (:func:`llmsql.optimizer.optimize_plan`), with this
session's engine and backend behind their sampler callback (:meth:`Session._sample_filter`);
the prompt-level rules run later, per call, inside the LLM step.

Why this module is over 500 lines: the Session is the one place where the engine, the
backends, the result cache, the budgets and EXPLAIN's dry, sampled and analyzed runs meet;
EXPLAIN's runs (about 150 lines) reuse the query path with other backends and callbacks, so
they stay methods beside it rather than a module reaching into the session's state.

>>> import llmsql, pandas as pd
>>> con = llmsql.connect(dry_run=True)
>>> _ = con.register("t", pd.DataFrame({"id": [1, 2], "review": ["great", "bad"]}))
>>> con.sql("SELECT id FROM t WHERE LLM_FILTER('Positive?', review) ORDER BY id").arrow().num_rows
2
>>> con.close()
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import weakref
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

import pyarrow as pa
from sqlglot import exp

from llmsql.adapters.options import lora_options
from llmsql.adapters.statements import (
    CreateAdapter,
    DropAdapter,
    adapter_call,
    is_adapter_statement,
    label_column,
    parse_adapter_statement,
)
from llmsql.backends import (
    BackendSpec,
    Capabilities,
    LLMBackend,
    default_backend_kind,
    get_backend,
)
from llmsql.backends.base import AdapterTrainer, CoServeStats
from llmsql.backends.dry_run import AnswerSample, DryRunBackend
from llmsql.backends.moe_glue import moe_backend_options, plan_line
from llmsql.backends.profile import send_profile
from llmsql.budget import Budget, BudgetMeter, Price, Settings, apply_setting
from llmsql.cache import LazyBackend, ResultCache, model_key
from llmsql.config import (
    SessionConfig,
    adapter_folder,
    check_moe,
    check_slo_tpot_ms,
    resolve_backend_options,
    resolve_cache_path,
)
from llmsql.errors import ConfigError
from llmsql.executors import Executor, make_executor
from llmsql.explain import CallEstimate, FilterSample, TokenCounter, coserve_line, estimate_call
from llmsql.explain import render as render_explain
from llmsql.moe.options import OPTION_NAMES
from llmsql.optimizer import PlanContext, PredicateSample, RuleContext, optimize_plan
from llmsql.optimizer.cost import CostModel
from llmsql.optimizer.expert_order import SpecRouting
from llmsql.parse import parse
from llmsql.plan import LLMCall, PromptBatch, QueryPlan
from llmsql.planner import plan_query
from llmsql.progress import Progress, auto_progress
from llmsql.result import QueryStats, Result
from llmsql.step import StepEnv, answer_through_cache, build_requests
from llmsql.step.adapter_runs import AdapterRuns, show_table
from llmsql.tokens import PromptTokenizer
from llmsql.udfs import REGISTRY

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Sequence

    from llmsql.adapters.catalog import AdapterRecord
    from llmsql.executors.base import DeferredTable
    from llmsql.stats import CallError, CallStats


@dataclass(frozen=True, slots=True)
class Explain:
    """EXPLAIN's text plus every prompt the plan would send, in send order.

    With ``analyze=True`` the query really ran: ``result`` holds its result and the text
    adds the measured figures.
    """

    text: str
    prompts: tuple[str, ...]
    result: Result | None = None
    plans: tuple[QueryPlan, ...] = ()
    """The plans that ran, per statement (structured EXPLAIN, e.g. the notebook's HTML)."""
    calls: tuple[CallStats, ...] = ()
    """Per LLM call statistics in execution order (dry-run figures without ANALYZE)."""
    batches: tuple[tuple[PromptBatch, tuple[int, ...]], ...] = ()
    """Each optimized batch with the rows it sent, in send order."""
    cost_model: CostModel = field(default_factory=CostModel)
    """The cost model the figures were computed with."""
    estimates: tuple[CallEstimate, ...] = ()
    """EXPLAIN's figures per call (selectivity samples included), in execution order."""
    samples: tuple[FilterSample, ...] = ()
    """The LLM filters whose pass rate the model sampled (``explain(..., sample=N)``)."""

    @property
    def prompt_tokens(self) -> int:
        """The prompt tokens EXPLAIN expects the backend to be sent (every call, chat
        template included): what ANALYZE measures as
        :attr:`llmsql.result.QueryStats.prompt_tokens`.
        """
        return sum(e.cost.prompt_tokens for e in self.estimates)

    def write_prompts(self, path: str | os.PathLike[str]) -> None:
        """Write one ``{"prompt": ...}`` JSON object per line."""
        _write_jsonl(Path(path), self.prompts)

    def __str__(self) -> str:
        return self.text


def _write_jsonl(path: Path, prompts: tuple[str, ...]) -> None:
    """One ``{"prompt": ...}`` per line, as ``json.dumps(..., ensure_ascii=False)`` writes it
    (its own string encoder, called directly: a dumps call per prompt was a tenth of
    EXPLAIN's time on 28k prompts).
    """
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines([f'{{"prompt": {encode_basestring(p)}}}\n' for p in prompts])
    tmp.replace(path)


class Session:
    """A connection: tables, a DuckDB engine, lazily built backends.

    Open one with :func:`connect`, or from a config: ``Session(SessionConfig(...))``.
    ``Session(**settings)`` takes the config's fields as keywords (over ``config`` when both
    are given); ``cost_model`` sets the figures EXPLAIN assumes.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        config: SessionConfig | None = None,
        /,
        *,
        cost_model: CostModel | None = None,
        **settings: Any,
    ) -> None:
        if config is None:
            config = SessionConfig(**settings)
        elif settings:
            config = dataclasses.replace(config, **settings)
        self._config = config
        backend = config.backend
        self._instance = None if backend is None or isinstance(backend, str) else backend
        self._kind = backend if isinstance(backend, str) else (
            getattr(backend, "name", "custom") if backend is not None else default_backend_kind()
        )
        self._model = config.model
        self._counters: dict[str | None, PromptTokenizer | None] = {}
        self._backends: dict[str | None, LLMBackend] = {}
        self._executor = make_executor(config.engine, database=config.database,
                                       spark=config.spark)
        # closes the engine at interpreter exit when the user never called close()
        self._finalizer = weakref.finalize(self, self._executor.close)
        self.engine = config.engine
        self.last_stats: QueryStats | None = None
        self._cost_model = cost_model or CostModel()
        self._settings = config.settings
        self._cache_path = resolve_cache_path(config)
        self._cache: ResultCache | None = None
        self._lazy: dict[str | None, LazyBackend] = {}
        self._options = resolve_backend_options(self._kind, config.backend_options)
        moe_backend_options(self._kind, self._options)  # the default kind is known only now
        self._slo_tpot_ms = config.slo_tpot_ms
        self._adapter_runs: AdapterRuns | None = None

    @property
    def config(self) -> SessionConfig:
        """The settings this session was opened with (``SET llmsql.*`` changes
        :attr:`settings`, not this).
        """
        return self._config

    # -- tables -------------------------------------------------------------------------------

    def register(self, name: str, data: Any, /) -> Session:
        """Expose a pandas/polars DataFrame, Arrow table or parquet/csv/json path as ``name``."""
        self._executor.register(name, data)
        return self

    @property
    def executor(self) -> Executor:
        """The engine running the relational parts."""
        return self._executor

    @property
    def duckdb(self) -> Any:
        """The DuckDB connection, when the engine is DuckDB."""
        con = getattr(self._executor, "con", None)
        if con is None:
            msg = f"this session runs on {self.engine!r}, not DuckDB"
            raise ConfigError(msg)
        return con

    # -- backends -------------------------------------------------------------------------------

    def spec(self, model: str | None = None) -> BackendSpec:
        """The backend spec used for ``model`` (None: the session's model)."""
        return BackendSpec.make(self._kind, model or self._model, **self._backend_options())

    def _backend_options(self, settings: Settings | None = None) -> dict[str, Any]:
        """The backend options: the config's, with the expert offload options of ``settings``
        (``SET llmsql.*``; default: the session's) over them (a NULL one removed).
        """
        options = {**self._options, **dict((settings or self._settings).moe)}
        return {k: v for k, v in options.items() if v is not None or k not in OPTION_NAMES}

    def backend(self, model: str | None = None) -> LLMBackend:
        """The backend for ``model``, built on first use."""
        if self._instance is not None:
            return self._instance
        key = model or self._model
        if key not in self._backends:
            spec = self.spec(model)
            self._backends[key] = (DryRunBackend(spec) if self._config.dry_run
                                   else get_backend(spec))
        return self._backends[key]

    def _step_backend(self, model: str | None = None) -> LLMBackend:
        """The backend a query step uses: built lazily, so cached answers need no model."""
        if self._instance is not None or self._config.dry_run:
            return self.backend(model)
        key = model or self._model
        if key not in self._lazy:
            self._lazy[key] = LazyBackend(self.spec(model), lambda: self.backend(model),
                                          self._result_cache())
        return cast("LLMBackend", self._lazy[key])  # capabilities is a read-only property

    def _result_cache(self) -> ResultCache | None:
        """The persistent result cache, if this session uses one (opened on first use)."""
        if self._cache_path is None or not self._settings.cache:
            return None
        if self._cache is None:
            self._cache = ResultCache(self._cache_path)
        return self._cache

    @property
    def settings(self) -> Settings:
        """The current ``SET llmsql.*`` settings."""
        return self._settings

    def set(self, name: str, value: Any, /) -> None:
        """Same as ``SET llmsql.<name> = <value>`` (None clears a budget or an expert
        offload option). A change of the expert offload options (``expert_cache``,
        ``moe_plan``, ``predictor``, ``lookahead``, ``moe_profile``) closes the backends
        built so far: the next query loads the model with them.

        Raises:
            ConfigError: an unknown setting or a bad value.
        """
        if name.lower() == "slo_tpot_ms":
            self._set_slo(check_slo_tpot_ms(value))
            return
        settings = apply_setting(self._settings, name, value)
        before, after = self._backend_options(), self._backend_options(settings)
        if after != before:
            check_moe(self._kind, self._model, after, complete=False)
        self._settings = settings
        if after != before:
            self._drop_backends()  # the model loads again with the new offload options

    def _drop_backends(self) -> None:
        """Close the backends built so far; the next query builds them from the current
        spec.
        """
        for b in self._backends.values():
            b.close()
        self._backends.clear()
        self._lazy.clear()

    def last_errors(self) -> tuple[CallError, ...]:
        """Why rows of the last query are NULL: failed requests and unparseable answers."""
        calls = self.last_stats.calls if self.last_stats is not None else []
        return tuple(e for c in calls for e in c.errors)

    def _price(self, model: str | None) -> Price | None:
        return self._config.prices.get(model or self._model or "default")

    def _rule_ctx(self, backend: LLMBackend) -> RuleContext:
        caps = backend.capabilities
        concurrent = caps.scheduler_batching or (caps.prefix_caching
                                                  and not caps.batch_prefix_sharing)
        size = self._config.batch_size or (2048 if concurrent else 64)
        optimize = self._config.optimize
        return RuleContext(capabilities=caps, batch_size=size, reorder=optimize,
                           warm=self._config.warm_prefixes and optimize,
                           experts=SpecRouting(self.spec()))  # expert_order's lookup

    # -- queries -----------------------------------------------------------------------------

    def plan(self, query: str, /) -> list[QueryPlan]:
        """Parse and plan every statement of ``query`` (no engine work, no model)."""
        return [plan_query(query, tree, query_id=f"q{next(self._ids)}") for tree in parse(query)]

    def sql(self, query: str, /) -> Result:
        """Run ``query`` (one or more statements); return the last statement's result.

        The result reads as Arrow, pandas or a Spark DataFrame (:meth:`Result.spark`); on
        ``engine='spark'`` it stays in Spark until one of those is asked for.

        ``CREATE ADAPTER``, ``SHOW ADAPTERS`` and ``DROP ADAPTER`` (each alone in ``query``)
        manage the session's LoRA adapters (see :meth:`create_adapter`).
        """
        if is_adapter_statement(query):
            return self._adapter_statement(query)
        return self._run(query, self._step_backend, auto_progress(self._config.progress),
                         live=True)

    def explain(
        self,
        query: str,
        /,
        *,
        prompts: str | os.PathLike[str] | None = None,
        analyze: bool = False,
        sample: int = 0,
    ) -> Explain:
        """The optimized plan, its cost figures and its prompts.

        Without ``analyze`` no model is loaded: answers are fixed valid values, so LLM calls
        that depend on earlier ones (a call after an LLM filter) see every row and their
        figures are an upper bound. With ``sample`` (N > 0) the model answers N prompts of
        each LLM filter that a later LLM call depends on (paid, and shown in the text; with
        the result cache on the query reuses those answers) and the dry run answers as the
        sample did, so the later calls are costed at the filter's sampled pass rate. With
        ``analyze`` the query runs for real and the text adds measured tokens, cache hits
        and time per stage.

        Raises:
            ConfigError: ``sample`` is negative, or given with ``analyze`` or in a dry-run
                session (which has no model to ask).
        """
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
            msg = (
                f"EXPLAIN's sample must be a whole number of prompts >= 0, got "
                f"{sample!r}"
            )
            raise ConfigError(msg)
        if sample and analyze:
            msg = (
                "EXPLAIN ANALYZE runs the whole query, so it needs no sample: "
                "pass either analyze=True or sample=N"
            )
            raise ConfigError(msg)
        if sample and self._config.dry_run:
            msg = (
                "EXPLAIN's sample asks the model, but this session is a dry run: "
                "connect without dry_run=True (CLI: llmsql explain --sample N)"
            )
            raise ConfigError(msg)
        shared = self.coserve_stats() if analyze else None
        result, plans, batches, sent = self._explain_run(query, analyze, None)
        training = coserve_line(shared, self.coserve_stats()) if analyze else None
        samples: tuple[FilterSample, ...] = ()
        if sample:
            where = {c.call_id: c.where for c in result.stats.calls}
            answers, samples = self._answer_sample(batches, sample, where)
            if samples:
                result, plans, batches, sent = self._explain_run(query, False, answers)
        estimates = tuple(self._estimate(b, rows, analyze) for b, rows in batches)
        text = render_explain(plans, result.stats.calls, estimates, model=self._cost_model,
                              analyze=analyze, samples=samples, training=training)
        out = Explain(text, tuple(sent), result if analyze else None, plans=tuple(plans),
                      calls=tuple(result.stats.calls), batches=tuple(batches),
                      cost_model=self._cost_model, estimates=estimates, samples=samples)
        if prompts is not None:
            out.write_prompts(prompts)
        return out

    def _estimate(self, batch: PromptBatch, rows: tuple[int, ...], analyze: bool
                  ) -> CallEstimate:
        """EXPLAIN's figures for one call: tokens and cost, and with expert offload the plan
        the cost model chooses for it (:func:`llmsql.backends.moe_glue.plan_line`).
        """
        model = batch.call.options.model
        spec = self.spec(model)
        est = estimate_call(batch, rows, self._explain_counter(model, analyze),
                            self._cost_model, send_profile(spec))
        line = plan_line(spec, rows=len(rows), prompt_tokens=est.cost.prompt_tokens)
        return dataclasses.replace(est, moe=line) if line is not None else est

    def _explain_run(
        self, query: str, analyze: bool, answers: AnswerSample | None
    ) -> tuple[Result, list[QueryPlan], list[tuple[PromptBatch, tuple[int, ...]]], list[str]]:
        """Run ``query`` for EXPLAIN (the dry-run backend, or the real one with ``analyze``),
        collecting its plans, its optimized batches with the rows each sent, and the prompts.
        """
        sent: list[str] = []
        batches: list[tuple[PromptBatch, tuple[int, ...]]] = []
        dry: dict[str | None, LLMBackend] = {}

        def dry_backend(model: str | None) -> LLMBackend:
            if model not in dry:
                tokenizer = self._prompt_tokenizer(model)
                dry[model] = DryRunBackend(self.spec(model),
                                           capabilities=self._planned_capabilities(model),
                                           counter=tokenizer.count if tokenizer else None,
                                           sample=answers)
            return dry[model]

        def record(batch: PromptBatch, rows: tuple[int, ...]) -> None:
            batches.append((batch, rows))
            sent.extend(batch.prompts(rows))

        plans: list[QueryPlan] = []
        backend_for = self._step_backend if analyze else dry_backend
        progress = auto_progress(self._config.progress if analyze else False)
        result = self._run(query, backend_for, progress, on_batch=record, plans_out=plans,
                           live=analyze)
        return result, plans, batches, sent

    def _answer_sample(
        self, batches: Sequence[tuple[PromptBatch, tuple[int, ...]]], size: int,
        where: dict[str, str],
    ) -> tuple[AnswerSample, tuple[FilterSample, ...]]:
        """Ask the model ``size`` prompts (seeded random, spread over the whole call) of each
        LLM_FILTER call that another call runs after, from a dry run's batches.
        """
        order = [b.call.id for b, _ in batches]
        prompts_of: dict[str, list[str]] = {}
        call_of: dict[str, LLMCall] = {}
        for b, rows in batches:
            if b.call.kind.spec.predicate:
                prompts_of.setdefault(b.call.id, []).extend(b.prompts(rows))
                call_of[b.call.id] = b.call
        known: dict[str, str] = {}
        pools: dict[tuple[tuple[str, ...] | None, str], tuple[str, ...]] = {}
        notes = []
        for cid, prompts in prompts_of.items():
            last = len(order) - 1 - order[::-1].index(cid)
            if all(c == cid for c in order[last:]):
                continue  # nothing runs after it: its answers change no figure
            call = call_of[cid]
            distinct = list(dict.fromkeys(prompts))
            if not distinct:
                continue
            chosen = random.Random(0).sample(distinct, min(size, len(distinct)))
            backend = self._step_backend(call.options.model)
            requests = build_requests(call, chosen, backend)
            responses, paid = answer_through_cache(requests, backend, self._result_cache())
            parse = REGISTRY[call.kind].parse
            passed = sum(1 for r in responses if not r.error
                         and parse(r.text, call.options).value is True)
            texts = tuple(r.text for r in responses)
            known.update(zip(chosen, texts, strict=True))
            head = call.template.instruction.split("{", 1)[0]
            pools[(requests[0].choices, head)] = texts
            notes.append(FilterSample(where.get(cid, cid), len(chosen), len(distinct), passed,
                                      sum(r.prompt_tokens for r in paid)))
        return AnswerSample(known, pools), tuple(notes)

    def _explain_counter(self, model: str | None, analyze: bool) -> TokenCounter:
        """How EXPLAIN counts the prompt tokens of a call on ``model``: the model's tokenizer
        and chat template as the backend applies them (ANALYZE: the backend's own count).
        """
        tokenizer = self._prompt_tokenizer(model)
        text = tokenizer.text_ids if tokenizer is not None else None
        templated = send_profile(self.spec(model)).chat_template
        live = self._live_counter() if analyze else None
        if live is not None:
            return TokenCounter(live, text, templated)
        if tokenizer is None:
            return TokenCounter(None)
        return TokenCounter(tokenizer.count, text, tokenizer.template is not None)

    def _live_counter(self) -> Callable[[str], int] | None:
        backends = list(self._backends.values()) or ([self._instance] if self._instance else [])
        return backends[0].count_tokens if backends else None

    def _prompt_tokenizer(self, model: str | None) -> PromptTokenizer | None:
        """The model's tokenizer, with its chat template where the backend applies one, if
        it is on disk already (never converts or downloads).
        """
        key = model or self._model
        if key not in self._counters:
            profile = send_profile(self.spec(model))
            self._counters[key] = PromptTokenizer.load(key, chat_template=profile.chat_template)
        return self._counters[key]

    def _planned_capabilities(self, model: str | None) -> Capabilities:
        """The dry run's capabilities, planning as the query's backend will: whether it
        caches and shares prefixes, schedules batches itself, its block and cache sizes
        (constrained choices, JSON and context length stay the dry run's, so every made-up
        answer is valid and no prompt is refused).
        """
        dry = DryRunBackend().capabilities
        known = (self._instance.capabilities if self._instance is not None
                 else send_profile(self.spec(model)).capabilities)
        if known is None:
            return dry
        return dataclasses.replace(
            dry, prefix_caching=known.prefix_caching, block_size=known.block_size,
            batch_prefix_sharing=known.batch_prefix_sharing, cache_tokens=known.cache_tokens,
            scheduler_batching=known.scheduler_batching)

    def _run(
        self,
        query: str,
        backend_for: Callable[[str | None], LLMBackend],
        progress: Progress,
        *,
        on_batch: Callable[[PromptBatch, tuple[int, ...]], None] | None = None,
        plans_out: list[QueryPlan] | None = None,
        live: bool = False,
    ) -> Result:
        stats = QueryStats()
        shippable = live and self._instance is None and not self._config.dry_run
        env = StepEnv(backend_for=backend_for, rule_ctx=self._rule_ctx, progress=progress,
                      on_batch=on_batch, spec_for=self.spec if shippable else None)
        meter = BudgetMeter(self._settings.budget, self._price)
        contacts = self._contacts()
        table: pa.Table | DeferredTable | None = None
        try:
            for tree in parse(query):
                if _apply_set(self, tree):
                    meter.budget = self._settings.budget
                    continue
                if live:
                    _configure_step_env(env, self, meter)
                plan = self._plan_statement(query, tree, env, stats, live)
                if plans_out is not None:
                    plans_out.append(plan)
                table = self._run_plan(plan, env, stats)
        finally:
            progress.close()
            if shippable:
                stats.backend_contacted = self._contacts() != contacts or any(
                    c.sent or c.warmup_prompts or c.truncated for c in stats.calls)
            self.last_stats = stats
        return Result(table if table is not None else pa.table({}), stats)

    def _contacts(self) -> int:
        """What reached this session's real backends so far (see ``LazyBackend.contacts``)."""
        return sum(lazy.contacts for lazy in self._lazy.values())

    def _plan_statement(
        self, query: str, tree: exp.Expression, env: StepEnv, stats: QueryStats,
        live: bool = False,
    ) -> QueryPlan:
        """Plan one statement in written order, then run the plan passes over it (with the
        optimizer on, they order its LLM filters by sampling through this session).
        """
        qid = f"q{next(self._ids)}"
        plan = plan_query(query, tree, query_id=qid)
        if any(c.options.adapter for c in plan.calls):
            env.adapters.update(self._resolve_adapters(plan, live=live))
        ctx = PlanContext(sql=query, tree=tree, query_id=qid, reorder=self._config.optimize,
                          sample=lambda call: self._sample_filter(call, query, env, stats))
        return optimize_plan(plan, ctx)[0]

    def _sample_filter(
        self, call: LLMCall, query: str, env: StepEnv, stats: QueryStats
    ) -> PredicateSample:
        """The plan passes' sampler: run ``call`` (an LLM filter over a sample of its own
        inputs) on this session's engine and backend, its answers kept in ``env.known`` so
        the query never pays for them again; its statistics join the query's.
        """
        try:
            s = self._executor.run_call(call, env)
        finally:
            self._executor.drop_lookups(QueryPlan(query, (call,), call.input))
        s.where += " (selectivity sample)"
        stats.calls.append(s)
        return PredicateSample(rows=s.rows_in, distinct=s.distinct_prompts, true=s.true_answers,
                               prompt_tokens=s.prompt_tokens, answered=s.sent)

    def _run_plan(self, plan: QueryPlan, env: StepEnv,
                  stats: QueryStats) -> pa.Table | DeferredTable | None:
        try:
            for call in plan.calls:
                stats.calls.append(self._executor.run_call(call, env))
            return self._executor.final(plan)
        finally:
            self._executor.drop_lookups(plan)

    # -- adapters -------------------------------------------------------------------------------

    def _adapters(self) -> AdapterRuns:
        """The session's adapter catalog and training runs (opened on first use)."""
        if self._adapter_runs is None:
            self._adapter_runs = AdapterRuns(adapter_folder(self._config))
        return self._adapter_runs

    def _identity(self, model: str | None) -> str:
        """The base model identity of ``model`` (an adapter's ``base_model``), known
        without loading the model where the spec says it.
        """
        if self._instance is not None:
            return self._instance.model_id()
        return model_key(self.spec(model)) or self.backend(model).model_id()

    def _resolve_adapters(self, plan: QueryPlan, *, live: bool) -> dict[str, Any]:
        """The adapters ``plan``'s calls name (checked: ready, this base model and, for a
        run that sends prompts, a backend that serves adapters).
        """
        serves = (lambda m: self._step_backend(m).capabilities.adapters) if (
            live and not self._config.dry_run) else None
        return self._adapters().resolve(plan.calls, identity=self._identity, serves=serves)

    def _adapter_statement(self, query: str) -> Result:
        stmt = parse_adapter_statement(query)
        if isinstance(stmt, CreateAdapter):
            return Result(self._create(stmt), QueryStats())
        if isinstance(stmt, DropAdapter):
            dropped = self._adapters().drop(stmt.name, if_exists=stmt.if_exists)
            return Result(pa.table({"name": [stmt.name], "dropped": [dropped]}), QueryStats())
        return Result(show_table(self.adapters()), QueryStats())

    def _create(self, stmt: CreateAdapter) -> pa.Table:
        model = stmt.call.options.model
        backend = self.backend(model)
        return self._adapters().create(
            stmt, backend=backend, identity=self._identity(model),
            rows=lambda: self.sql(stmt.source).arrow(), rule_ctx=self._rule_ctx(backend),
            slo_tpot_ms=self._slo_tpot_ms, progress=auto_progress(self._config.progress))

    def create_adapter(self, name: str, call: str, data: Any, /, *, label: str | None = None,
                       asynchronous: bool = False, **lora: Any) -> Result:
        """Train the LoRA adapter ``name`` for ``call``, as ``CREATE ADAPTER`` does.

        Args:
            name: the adapter's name (letters, digits, ``_``).
            call: the call it is trained for, as SQL: ``"LLM_FILTER('Fresh?', review)"``
                (also LLM_CLASSIFY, LLM, LLM_EXTRACT).
            data: the training rows: a ``SELECT`` giving the call's fields plus the label
                column, or a DataFrame / Arrow table holding them.
            label: the label column when ``data`` is a frame with more columns.
            asynchronous: return at once and train in the background (``ASYNC``).
            **lora: ``USING LORA`` options: rank, alpha, target_modules, lr, epochs,
                dropout, batch_size, seed, holdout.

        Returns:
            One row as ``SHOW ADAPTERS`` gives it (status ``ready``, or ``training`` when
            asynchronous).

        Raises:
            ConfigError: the backend cannot train.
            PlanError: a bad call, option, label or name already taken (nothing changed).
        """
        parsed = adapter_call(call)
        if isinstance(data, str):
            source = data
        else:
            table = f"__llmsql_adapter_rows_{name}"
            self.register(table, data)
            columns = [*parsed.columns, *([label] if label else [])]
            if not label:
                columns = self.sql(f"SELECT * FROM {table} LIMIT 0").arrow().column_names
            source = "SELECT " + ", ".join(f'"{c}"' for c in columns) + f" FROM {table}"
        stmt = CreateAdapter(name, parsed, lora_options(lora), source,
                             label_column(source, parsed), asynchronous)
        return Result(self._create(stmt), QueryStats())

    def adapters(self) -> tuple[AdapterRecord, ...]:
        """The session's adapters, by name (``SHOW ADAPTERS`` gives them as a table)."""
        return self._adapters().records()

    def drop_adapter(self, name: str, /, *, if_exists: bool = False) -> bool:
        """Drop the adapter ``name`` and its weights (``DROP ADAPTER``); False when it did
        not exist and ``if_exists``.

        Raises:
            PlanError: no such adapter (without ``if_exists``).
        """
        return self._adapters().drop(name, if_exists=if_exists)

    def _set_slo(self, ms: float | None) -> None:
        """``SET llmsql.slo_tpot_ms``: kept for later trainings, given to built backends."""
        self._slo_tpot_ms = ms
        for b in [*self._backends.values(), *([self._instance] if self._instance else [])]:
            if isinstance(b, AdapterTrainer) and b.capabilities.trains_adapters:
                b.set_slo_tpot_ms(ms)

    def coserve_stats(self) -> CoServeStats | None:
        """The co-serving counters of the session's backend (None where it trains no
        adapters or is not built yet).
        """
        for b in [*self._backends.values(), *([self._instance] if self._instance else [])]:
            if isinstance(b, AdapterTrainer) and b.capabilities.trains_adapters:
                return b.coserve_stats()
        return None

    def close(self) -> None:
        """Close the backends and the connection (a training still running is cancelled
        and left incomplete: the same CREATE ADAPTER resumes it).
        """
        if self._adapter_runs is not None:
            self._adapter_runs.close()
        for b in self._backends.values():
            b.close()
        self._backends.clear()
        self._lazy.clear()
        if self._cache is not None:
            self._cache.close()
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    *,
    backend: str | LLMBackend | None = None,
    model: str | None = None,
    database: str = ":memory:",
    progress: bool | None = None,
    optimize: bool = True,
    warm_prefixes: bool = True,
    batch_size: int | None = None,
    dry_run: bool = False,
    engine: str = "duckdb",
    spark: Any = None,
    cache: bool | str | os.PathLike[str] | None = None,
    on_error: str = "null",
    budget: Budget | dict[str, Any] | None = None,
    prices: dict[str, Any] | None = None,
    adapters: str | os.PathLike[str] | None = None,
    slo_tpot_ms: float | None = None,
    **backend_options: Any,
) -> Session:
    """Open a session.

    The keywords are checked and kept as one frozen :class:`~llmsql.config.SessionConfig`
    (:attr:`Session.config`); ``Session(SessionConfig(...))`` opens the same session.

    Args:
        backend: ``transformers``, ``vllm`` or ``openai``; default ``vllm`` when installed
            with a GPU present, else ``transformers``. An object implementing the
            ``LLMBackend`` protocol is used as it is (the session does not close it).
        model: a local Hugging Face model folder, or None / ``smollm2`` for the embedded model.
        database: a DuckDB database file, or ``:memory:``.
        progress: show a progress bar (None: when stderr is a terminal).
        optimize: reorder rows and fields for prefix-cache reuse, and LLM filters by
            sampled cost x selectivity.
        warm_prefixes: on engines that run requests concurrently, send each shared prefix
            alone before its group where the engine does not share it within a batch, and
            keep windows of long answers within the engine's cache (the ``warm_prefixes``
            rule).
        batch_size: prompts handed to the backend at a time (default: 2048 for engines that
            run a batch's requests concurrently, such as vLLM; 64 otherwise).
        dry_run: answer with fixed valid answers and never load a model (cost estimation).
        engine: ``duckdb`` (embedded, default) or ``spark``.
        spark: for ``engine='spark'``: a SparkSession (classic or Connect) or a master URL.
        cache: the persistent result cache: None (default: on, at ``$LLMSQL_CACHE`` or
            ``$XDG_CACHE_HOME/llmsql/results.sqlite``, off for backend objects), a file
            path, True or False. ``LLMSQL_CACHE=off`` turns the default off.
        on_error: ``null`` (a prompt that fails for good gives NULL, see ``last_errors()``)
            or ``fail`` (the query stops); also ``SET llmsql.on_error``.
        budget: per-query limits, a :class:`llmsql.budget.Budget` or a dict with
            ``max_calls``, ``max_prompt_tokens``, ``max_output_tokens``, ``max_cost_usd``;
            also ``SET llmsql.max_calls = N`` etc.
        prices: model name (``default`` for the session's model when none is named) ->
            ``(input, output)`` USD per million tokens, for ``max_cost_usd``.
        adapters: the folder of the session's LoRA adapters (``CREATE ADAPTER``); default:
            next to the database file (``<file>.adapters``), or
            ``$XDG_DATA_HOME/llmsql/adapters`` for ``:memory:``.
        slo_tpot_ms: while an adapter trains on the backend, the time per output token
            (ms) queries should keep; also ``SET llmsql.slo_tpot_ms = 50``.
        **backend_options: backend settings, e.g. ``max_model_len=2048``; for ``openai``:
            ``base_url``, ``api_key_env``, ``concurrency``, ``timeout``, ``max_retries``,
            ``rpm``, ``tpm`` (see :mod:`llmsql.backends.openai_compat`); for
            ``transformers`` with a mixture-of-experts model, expert offload:
            ``expert_cache`` (GPU memory for experts: ``"24GB"`` or a share such as 0.4),
            ``moe_plan`` (``auto``, ``predictive``, ``layer_sweep``, ``lru``), ``predictor``
            (``auto``, ``learned``, ``next_router``, ``none``), ``lookahead`` (layers
            ahead, 2) and ``moe_profile`` (a routing profile file); also ``SET
            llmsql.expert_cache = '24GB'`` etc. (see :mod:`llmsql.moe.options`).

    Raises:
        ConfigError: an unknown backend or a bad setting.
    """
    config = SessionConfig(
        backend=backend, model=model, database=database, engine=engine, spark=spark,
        progress=progress, optimize=optimize, warm_prefixes=warm_prefixes,
        batch_size=batch_size, dry_run=dry_run, cache=cache, on_error=on_error,  # type: ignore[arg-type]  # checked there
        budget=budget, prices=prices, backend_options=backend_options,  # type: ignore[arg-type]
        adapters=adapters, slo_tpot_ms=slo_tpot_ms)
    return Session(config)


# ---- SET llmsql.* ------------------------------------------------------------------------------


def _set_value(node: exp.Expression) -> Any:
    if isinstance(node, exp.Null):
        return None
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    if isinstance(node, exp.Literal):
        return node.this if node.is_string else node.to_py()
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal):
        return -float(node.this.to_py())
    if isinstance(node, (exp.Column, exp.Identifier, exp.Var)):
        return node.name
    msg = f"SET llmsql.*: cannot read the value {node.sql()!r}; use a literal"
    raise ConfigError(msg)


def _apply_set(session: Session, tree: exp.Expression) -> bool:
    """Apply ``SET llmsql.<name> = <value>`` to the session; False for any other statement."""
    if not isinstance(tree, exp.Set):
        return False
    items = [i.this for i in tree.expressions if isinstance(i, exp.SetItem)]
    targets = [i.this for i in items if isinstance(i, exp.EQ)]
    if len(targets) != len(items) or not targets or any(
        not isinstance(t, exp.Column) or t.table.lower() != "llmsql" for t in targets
    ):
        return False
    for item in items:
        session.set(item.this.name, _set_value(item.expression))
    return True


def _configure_step_env(env: StepEnv, session: Session, meter: BudgetMeter) -> None:
    """Give a live run the current settings: cache, error policy, budgets."""
    env.cache = session._result_cache()
    env.on_error = session._settings.on_error
    env.budget = meter if meter.budget.active() and not session._config.dry_run else None
