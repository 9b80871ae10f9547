"""vLLM behind the backend seam: the offline ``vllm.LLM`` runs inside an llmsql worker.

:class:`VLLMBackend` is what ``get_backend`` builds for kind ``"vllm"``: a
:class:`~llmsql.backends.worker.WorkerClient` that starts (or attaches to) a worker process
hosting one :class:`VLLMEngine`. Keeping vLLM in its own process means user scripts need no
``if __name__ == "__main__"`` guard (vLLM spawns engine processes), several processes share
one model load and one prefix cache, and closing the backend frees everything.

On the CPU, vLLM's engine core runs inside the worker process by default
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the worker already isolates vLLM, and skipping
vLLM's two extra processes (each importing torch and vLLM again) cuts the start from about
25 s to about 8 s on two cores, and leaves no engine process behind if the worker is killed.

Spec options (``BackendSpec.make("vllm", model, **options)``):

- ``enable_prefix_caching`` (True; False for the no-cache baseline), ``ignore_eos`` (False;
  True makes free-text requests run to ``max_tokens``, for random-weight benchmarks).
- ``max_model_len`` (2048), ``enforce_eager`` (True on CPU, False on GPU), ``seed`` (0),
  ``dtype`` ("auto"), ``tokenizer`` (the model folder), ``load_format`` ("dummy" for
  benchmarks with random weights), ``chat_template`` (True: prompts are wrapped as one user
  message when the tokenizer has a template).
- GPU: ``gpu_memory_utilization``, ``num_gpu_blocks_override``, ``attention_backend``
  (e.g. "TRITON_ATTN").
- CPU: ``kv_cache_space_gb`` (KV cache size; sets ``VLLM_CPU_KVCACHE_SPACE``), ``threads``
  (compute threads; default: the allowed cores minus one, at least one).
- ``choice_decoding`` ("first_token" or "structured"; default "first_token"): how a request
  constrained to choices (LLM_FILTER, LLM_CLASSIFY) is decoded. ``first_token``: when every
  choice starts with its own token, one step with vLLM's ``allowed_token_ids`` picks it
  (``max_tokens=1``; the choice is then fully determined), which frees the request's slot
  after its prefill step instead of after 2-3 grammar-constrained steps; choices that share
  a first token fall back to structured outputs. Greedy answers equal structured decoding's
  whenever the model's best first token is the choice's own first token.
  A request with ``choice_probs`` (LLM_SCORE) also asks vLLM for the log-probabilities of
  the choices' first tokens at the first step (``logprob_token_ids``; older vLLM: the top 20,
  where a missing token counts as probability 0) and gets them renormalized over the
  choices; choices that share a first token get no probabilities (None).
- ``deterministic`` (False): vLLM's batch-invariant mode (``VLLM_BATCH_INVARIANT=1``): a
  prompt's answer no longer depends on its batch neighbours, at a measured cost in speed
  (``bench/results/deterministic.md``). vLLM implements it for NVIDIA GPUs only: asking for
  it on the CPU is a ConfigError (the transformers backend is batch-invariant by default).
  The model identity gets a ``#batch_invariant`` suffix, so the result cache keeps such
  answers apart.
- ``max_num_seqs``, ``max_num_batched_tokens``: vLLM's scheduler limits (vLLM's defaults
  when absent: 1024 and 16384 on an H100 for the offline engine).
- ``log_stats`` (False): keep vLLM's metrics (engine steps, tokens per step, preemptions);
  the ``metrics`` admin call returns them.
- ``multiprocessing``: run vLLM's engine core in its own processes, as vLLM does by default
  (default: False on the CPU, True with an NVIDIA GPU). With it on the CPU, ``threads``
  binds OpenMP to the first allowed cores (``VLLM_CPU_OMP_THREADS_BIND``).
- LoRA adapters (requests with :attr:`~llmsql.backends.base.Request.adapter`; vLLM's
  multi-LoRA, :mod:`llmsql.backends.vllm_lora`): ``enable_lora`` (not set: the engine is
  built without LoRA and rebuilt with it when the first request with an adapter arrives,
  which costs one model load and drops the prefix cache, so set it when adapters are
  expected; True: built with LoRA from the start; False: requests with an adapter get an
  error), ``max_lora_rank`` (the largest adapter rank served; default: the rank of the
  adapters seen, rounded up to a rank vLLM accepts; a larger adapter rebuilds the engine),
  ``max_loras`` (4: different adapters in one engine step; rows of further adapters wait),
  ``max_cpu_loras`` (adapters kept loaded; vLLM's default: ``max_loras``). Each adapter is
  a ``LoRARequest`` with one id per weights digest and the digest in its name, so vLLM's
  prefix cache (which it keys by LoRA) never mixes two adapters' or two trainings' KV.
  Requests of several adapters and of the base model share one ``generate`` call.
- Worker: ``startup_timeout`` (600 s), ``idle_timeout`` (600 s), ``socket_path``.
"""

# Why this module is over 500 lines: it is the whole vLLM seam (option checks, the engine's
# environment and arguments, the one-step choice path with its log-probabilities, LoRA serving
# whose helpers are in vllm_lora.py), each part small and used only here; the worker machinery
# it runs in lives in llmsql/backends/worker/.

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import pathlib
from typing import TYPE_CHECKING, Any

from llmsql.backends.base import BackendSpec, Capabilities, Request, Response
from llmsql.backends.vllm_lora import (
    LoraRequests,
    check_lora_options,
    lora_kwargs,
    lora_mode,
    lora_problem,
)
from llmsql.backends.worker import CLIENT_OPTIONS, WorkerClient
from llmsql.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vllm import LLM, SamplingParams

ENGINE_OPTIONS: frozenset[str] = frozenset(
    {
        "attention_backend",
        "chat_template",
        "choice_decoding",
        "deterministic",
        "dtype",
        "enable_lora",
        "enable_prefix_caching",
        "enforce_eager",
        "ignore_eos",
        "gpu_memory_utilization",
        "kv_cache_space_gb",
        "load_format",
        "log_stats",
        "max_cpu_loras",
        "max_lora_rank",
        "max_loras",
        "max_model_len",
        "max_num_batched_tokens",
        "max_num_seqs",
        "multiprocessing",
        "num_gpu_blocks_override",
        "seed",
        "threads",
        "tokenizer",
    }
)
"""Options :class:`VLLMEngine` understands (worker options aside)."""

logger = logging.getLogger(__name__)

CHOICE_DECODINGS = ("first_token", "structured")
DEFAULT_MAX_MODEL_LEN = 2048
_GIB = 1 << 30


def check_options(spec: BackendSpec, /) -> None:
    """Reject unknown option keys before any process starts.

    Raises:
        ConfigError: an option is not a vLLM engine or worker option.

    >>> check_options(BackendSpec.make("vllm", max_model_len=512))
    >>> check_options(BackendSpec.make("vllm", max_len=512))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    llmsql.errors.ConfigError: unknown vllm option 'max_len'; ...
    """
    known = ENGINE_OPTIONS | CLIENT_OPTIONS
    for key, value in spec.options:
        if key not in known:
            msg = f"unknown vllm option {key!r}; known options: {', '.join(sorted(known))}"
            raise ConfigError(msg)
        if key == "choice_decoding" and value not in CHOICE_DECODINGS:
            msg = (f"vllm option choice_decoding={value!r} is not one of "
                   f"{', '.join(CHOICE_DECODINGS)}")
            raise ConfigError(msg)
    if spec.option("deterministic") and not _has_nvidia_gpu():
        msg = ("vllm option deterministic=True (vLLM's batch-invariant mode) needs an NVIDIA "
               "GPU, and none is here; on the CPU use the transformers backend, whose answers "
               "do not depend on batching, or drop the option")
        raise ConfigError(msg)
    check_lora_options(spec)


class VLLMBackend(WorkerClient):
    """The ``vllm`` backend: a client of an llmsql worker that hosts a :class:`VLLMEngine`.

    The first ``VLLMBackend`` for a spec starts the worker (and stops it on ``close``);
    later ones, in this process or others, attach to it.
    """

    def __init__(self, spec: BackendSpec, /) -> None:
        """Start or attach to the vLLM worker for ``spec``.

        Raises:
            ConfigError: an option is unknown.
            BackendError: the worker failed to start (the message holds its log tail).
        """
        check_options(spec)
        super().__init__(spec)

    def reset_prefix_cache(self) -> bool:
        """Drop the worker's prefix cache (benchmarks measure cold runs with it)."""
        return bool(self.admin("reset_prefix_cache"))

    def metrics(self) -> dict[str, float]:
        """VLLM's cumulative counters (needs the ``log_stats`` option; see
        :meth:`VLLMEngine.metrics`).
        """
        return dict(self.admin("metrics"))  # type: ignore[call-overload]


class VLLMEngine:
    """The offline ``vllm.LLM`` with prefix caching; runs inside the worker process."""

    name = "vllm"

    def __init__(self, spec: BackendSpec, /) -> None:
        """Load the model named by ``spec`` (see the module docstring for options).

        Raises:
            ConfigError: an option is unknown or the model folder is invalid.
        """
        from llmsql.models import resolve_model

        check_options(spec)
        # before torch and vllm are imported (resolve_model may import torch): they read
        # these at import time or when the engine starts
        threads = _set_env(spec)
        self._spec = spec
        self._path = str(resolve_model(spec.model))
        self._id = _model_id(pathlib.Path(self._path), spec.option("load_format"))
        if spec.option("deterministic"):
            self._id += "#batch_invariant"
        import torch
        from vllm.platforms import current_platform

        if threads is not None:
            torch.set_num_threads(threads)
        self._kwargs = _llm_kwargs(spec, self._path, current_platform.is_cpu())
        self._lora_mode = lora_mode(spec)
        self._loras = LoraRequests()
        self._lora_rank: int | None = None
        """The largest adapter rank the engine serves (None: built without LoRA)."""
        self._lost: str | None = None
        """Why the engine is gone (a rebuild failed), else None."""
        self._build(lora_kwargs(spec, None) if self._lora_mode else {})
        self._tokenizer = self._llm.get_tokenizer()
        self._chat = bool(spec.option("chat_template", True)) and bool(
            getattr(self._tokenizer, "chat_template", None)
        )
        self._request_errors = _request_errors()
        self._ignore_eos = bool(spec.option("ignore_eos", False))
        self._first_token = spec.option("choice_decoding", "first_token") == "first_token"
        self._choice_ids: dict[tuple[str, ...], tuple[int, ...] | None] = {}
        self._token_logprobs = _has_token_logprobs()

    def _build(self, lora: dict[str, Any]) -> None:
        """Build the ``vllm.LLM`` (with the LoRA arguments ``lora``, or none) and the
        capabilities it gives.
        """
        from vllm import LLM

        self._llm: LLM = LLM(**self._kwargs, **lora)
        self._lora_rank = lora.get("max_lora_rank")
        config = self._llm.llm_engine.vllm_config
        self.capabilities = Capabilities(
            prefix_caching=bool(self._spec.option("enable_prefix_caching", True)),
            constrained_choice=True,
            json_schema=True,
            max_model_len=config.model_config.max_model_len,
            reports_cached_tokens=True,
            # vLLM caches a prompt's blocks when it schedules them, so requests scheduled in
            # the same step already share them: no warm-ups needed
            batch_prefix_sharing=True,
            scheduler_batching=True,
            block_size=config.cache_config.block_size,
            cache_tokens=_cache_tokens(config),
            choice_probabilities=True,  # from the first token's logprobs (distinct first tokens)
            adapters=self._lora_mode is not False,  # None: LoRA is turned on when first used
        )

    def generate(self, batch: Sequence[Request], /) -> list[Response]:
        """Return exactly one Response per Request, in input order.

        Requests that cannot run (prompt too long, invalid constraint, an adapter whose
        files cannot be served) get a Response with ``error`` set; the rest of the batch
        still runs. Requests of several LoRA adapters and of the base model run in one vLLM
        call; the first request with an adapter rebuilds an engine built without LoRA.
        """
        if self._lost is not None:
            raise BackendError(self._lost, backend=self.name)
        out: list[Response | None] = [None] * len(batch)
        runnable: list[int] = []
        prompts: list[list[int]] = []
        for i, req in enumerate(batch):
            ids = self._encode(req.prompt)
            problem = self._check(req, len(ids))
            if problem:
                out[i] = Response("", prompt_tokens=len(ids), error=problem)
            else:
                runnable.append(i)
                prompts.append(ids)
        self._serve_lora([batch[i] for i in runnable])
        for i, resp in zip(runnable, self._run(prompts, [batch[i] for i in runnable]), strict=True):
            out[i] = resp
        return [r for r in out if r is not None]

    def count_tokens(self, text: str, /) -> int:
        """Tokens of ``text`` as the model sees it (chat template included)."""
        return len(self._encode(text))

    def model_id(self) -> str:
        """``vllm:<folder>:<hash of config.json and weight file sizes>[#<load_format>]``."""
        return self._id

    def reset_prefix_cache(self) -> bool:
        """Drop all cached prefix blocks; True when vLLM did."""
        return bool(self._llm.reset_prefix_cache())

    def close(self) -> None:
        """Shut the engine's processes down."""
        self._shutdown()

    def _shutdown(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del self._llm
            gc.collect()  # an in-process engine frees its memory only when collected

    def _bench_eos(self, req: Request) -> Request:
        """With the ``ignore_eos`` option, free-text requests run to ``max_tokens`` (for
        benchmarks with random weights, which never stop on their own).
        """
        if self._ignore_eos and req.choices is None and req.json_schema is None:
            return dataclasses.replace(req, ignore_eos=True)
        return req

    def _encode(self, prompt: str) -> list[int]:
        if not self._chat:
            return list(self._tokenizer.encode(prompt))
        text = self._tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        assert isinstance(text, str), "tokenize=False renders text"
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _check(self, req: Request, n_prompt: int) -> str | None:
        limit = self.capabilities.max_model_len
        if n_prompt >= limit:
            return (
                f"prompt has {n_prompt} tokens but max_model_len is {limit}; shorten it or "
                "raise the vllm option max_model_len"
            )
        if req.choices is not None and req.json_schema is not None:
            return "a request cannot constrain to both choices and a JSON schema"
        if req.json_schema is not None:
            try:
                json.loads(req.json_schema)
            except ValueError as exc:
                return f"json_schema is not valid JSON ({exc}); pass a JSON schema string"
        if req.adapter is not None:
            return lora_problem(req.adapter, self._lora_mode, self._loras)
        return None

    def _serve_lora(self, reqs: Sequence[Request]) -> None:
        """Make sure the engine serves the adapters of ``reqs`` (checked by :meth:`_check`):
        rebuild it with LoRA, or with a larger ``max_lora_rank``, when it does not.

        A rebuild reloads the model and drops the prefix cache (answers do not change);
        the ``enable_lora`` option avoids it.
        """
        ranks = [self._loras.rank(r.adapter) for r in reqs if r.adapter is not None]
        if not ranks or (self._lora_rank is not None and max(ranks) <= self._lora_rank):
            return
        lora = lora_kwargs(self._spec, max(ranks))
        logger.warning("rebuilding the vLLM engine to serve LoRA adapters (%s); set the vllm "
                       "option enable_lora=True (and max_lora_rank) to build it so at once",
                       ", ".join(f"{k}={v}" for k, v in lora.items()))
        self._shutdown()
        try:
            self._build(lora)
        except Exception as exc:  # e.g. out of memory: this worker has no engine now
            msg = (f"rebuilding the vLLM engine with LoRA failed ({exc}); start the backend "
                   "with the vllm option enable_lora=True (and max_lora_rank, max_loras) so "
                   "that it is built with LoRA at once")
            self._lost = msg
            raise BackendError(msg, backend=self.name) from exc

    def _run(self, prompts: list[list[int]], reqs: list[Request]) -> list[Response]:
        """Generate; if vLLM rejects the batch, retry one by one to isolate the culprit."""
        if not prompts:
            return []
        try:
            return self._generate(prompts, reqs)
        except self._request_errors as exc:  # a bad request rejects the whole batch; anything
            # else (a dead engine) propagates to the worker
            if len(prompts) == 1:
                return [Response("", prompt_tokens=len(prompts[0]), error=str(exc))]
        return [r for p, q in zip(prompts, reqs, strict=True) for r in self._run([p], [q])]

    def _generate(self, prompts: list[list[int]], reqs: list[Request]) -> list[Response]:
        from vllm.inputs import TokensPrompt

        firsts = [self._first_tokens(r) for r in reqs]
        scored = [self._scored_tokens(r) for r in reqs]
        params = [
            _sampling_params(self._bench_eos(r), first,
                             _logprob_options(ids, by_id=self._token_logprobs))
            for r, first, ids in zip(reqs, firsts, scored, strict=True)
        ]
        loras = [self._loras.request(r.adapter) for r in reqs]
        try:
            outs = self._llm.generate(
                [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False,
                **({"lora_request": loras} if any(loras) else {}),
            )
        except Exception:
            self._abort_unfinished()
            raise
        return [
            Response(
                _choice_text(o.outputs[0], r, first),
                prompt_tokens=len(o.prompt_token_ids or ()),
                cached_tokens=o.num_cached_tokens or 0,
                output_tokens=len(o.outputs[0].token_ids),
                choice_probs=_choice_probs(o.outputs[0], ids),
            )
            for o, r, first, ids in zip(outs, reqs, firsts, scored, strict=True)
        ]

    def _abort_unfinished(self) -> None:
        """Drop the requests a failed ``generate`` left in the engine: ``LLM.generate``
        aborts its requests when adding them fails, not when an engine step raises (e.g. an
        adapter failing to load there), and the next ``generate`` would run them again.
        """
        engine = self._llm.llm_engine
        states = getattr(getattr(engine, "output_processor", None), "request_states", None)
        if not states:
            return
        try:
            engine.abort_request(list(states), internal=True)
        except TypeError:  # an older vLLM, whose request ids are all external
            engine.abort_request(list(states))

    def _first_tokens(self, req: Request) -> tuple[int, ...] | None:
        """The choices' first token ids when they tell the choices apart (else None:
        structured decoding).
        """
        if req.choices is None or not self._first_token:
            return None
        return self._distinct_firsts(req.choices)

    def _scored_tokens(self, req: Request) -> tuple[int, ...] | None:
        """The first tokens whose logprobs give a ``choice_probs`` request its answer (None:
        not asked, or the choices share a first token).
        """
        if req.choices is None or not req.choice_probs:
            return None
        return self._distinct_firsts(req.choices)

    def _distinct_firsts(self, choices: tuple[str, ...]) -> tuple[int, ...] | None:
        """The choices' first token ids when they all differ, else None (cached)."""
        if choices not in self._choice_ids:
            firsts = []
            for choice in choices:
                ids = self._tokenizer.encode(choice, add_special_tokens=False)
                firsts.append(ids[0] if ids else -1)
            unique = -1 not in firsts and len(set(firsts)) == len(firsts)
            self._choice_ids[choices] = tuple(firsts) if unique else None
        return self._choice_ids[choices]

    def metrics(self) -> dict[str, float]:
        """VLLM's cumulative counters and histogram sums/counts by name (``vllm:`` dropped),
        e.g. ``iteration_tokens_total_count`` (engine steps) and ``_sum`` (tokens they ran);
        empty unless the engine was built with the ``log_stats`` option.
        """
        out: dict[str, float] = {}
        if not self._spec.option("log_stats"):
            return out  # vLLM keeps no metrics then
        for m in self._llm.get_metrics():
            name = m.name.removeprefix("vllm:")
            if hasattr(m, "count") and hasattr(m, "sum"):
                out[f"{name}_count"] = out.get(f"{name}_count", 0.0) + float(m.count)
                out[f"{name}_sum"] = out.get(f"{name}_sum", 0.0) + float(m.sum)
            elif isinstance(getattr(m, "value", None), (int, float)):
                out[name] = out.get(name, 0.0) + float(m.value)
        return out


def _request_errors() -> tuple[type[Exception], ...]:
    """Exceptions of ``LLM.generate`` that blame a request, not the engine.

    Newer vLLM raises ``VLLMValidationError``, a ``VLLMClientError`` that is no longer a
    ``ValueError``; older versions raise ``ValueError``.
    """
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMClientError)


def _cache_tokens(config: Any) -> int | None:
    blocks = getattr(config.cache_config, "num_gpu_blocks", None)
    return int(blocks) * int(config.cache_config.block_size) if blocks else None


def _choice_text(output: Any, req: Request, first: tuple[int, ...] | None) -> str:
    """The answer's text; a first-token choice is mapped back to its whole choice."""
    if first is None or req.choices is None:
        return str(output.text)
    ids = list(output.token_ids)
    return req.choices[first.index(ids[0])] if ids and ids[0] in first else str(output.text)


TOP_LOGPROBS = 20
"""Log-probabilities asked for where vLLM cannot name the tokens (its default maximum)."""


def _has_token_logprobs() -> bool:
    """Whether this vLLM's ``SamplingParams`` takes ``logprob_token_ids`` (the log-probs of
    named tokens, whatever their rank).
    """
    from vllm import SamplingParams

    return "logprob_token_ids" in getattr(SamplingParams, "__struct_fields__", ())


def _logprob_options(ids: tuple[int, ...] | None, *, by_id: bool) -> dict[str, Any]:
    """The ``SamplingParams`` options asking for the log-probabilities of tokens ``ids``.

    >>> _logprob_options((5, 9), by_id=True), _logprob_options((5, 9), by_id=False)
    ({'logprob_token_ids': [5, 9]}, {'logprobs': 20})
    >>> _logprob_options(None, by_id=True)
    {}
    """
    if ids is None:
        return {}
    return {"logprob_token_ids": list(ids)} if by_id else {"logprobs": TOP_LOGPROBS}


def _choice_probs(output: Any, ids: tuple[int, ...] | None) -> tuple[float, ...] | None:
    """The choices' probabilities from the first step's log-probabilities of their first
    tokens, renormalized over the choices (a token vLLM did not return counts as 0).
    """
    from llmsql.backends.choice_probs import renormalize

    if ids is None or not output.logprobs:
        return None
    step = output.logprobs[0]
    return renormalize([step[t].logprob if t in step else float("-inf") for t in ids])


def _sampling_params(req: Request, first: tuple[int, ...] | None = None,
                     logprobs: dict[str, Any] | None = None) -> SamplingParams:
    """VLLM's sampling parameters for ``req`` (``first``: decide among those first tokens in
    one step; ``logprobs``: :func:`_logprob_options`).
    """
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    extra = logprobs or {}
    if first is not None:  # one step among the choices' first tokens decides the choice
        return SamplingParams(temperature=req.temperature, seed=req.seed, max_tokens=1,
                              allowed_token_ids=list(first), **extra)
    structured = None
    if req.choices is not None:
        structured = StructuredOutputsParams(choice=list(req.choices))
    elif req.json_schema is not None:
        structured = StructuredOutputsParams(json=req.json_schema)
    return SamplingParams(
        temperature=req.temperature,
        seed=req.seed,
        max_tokens=req.max_tokens,
        ignore_eos=req.ignore_eos,
        structured_outputs=structured,
        **extra,
    )


def _llm_kwargs(spec: BackendSpec, path: str, on_cpu: bool) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments for ``spec``; absent options keep vLLM's defaults."""
    kwargs: dict[str, Any] = {
        "model": path,
        "tokenizer": spec.option("tokenizer"),
        "enable_prefix_caching": bool(spec.option("enable_prefix_caching", True)),
        "max_model_len": int(spec.option("max_model_len", DEFAULT_MAX_MODEL_LEN)),
        "enforce_eager": bool(spec.option("enforce_eager", on_cpu)),
        "seed": int(spec.option("seed", 0)),
        "dtype": spec.option("dtype", "auto"),
    }
    optional = {
        "max_num_seqs": spec.option("max_num_seqs"),
        "max_num_batched_tokens": spec.option("max_num_batched_tokens"),
        "gpu_memory_utilization": spec.option("gpu_memory_utilization"),
        "num_gpu_blocks_override": spec.option("num_gpu_blocks_override"),
        "load_format": spec.option("load_format"),
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if spec.option("log_stats"):
        kwargs["disable_log_stats"] = False
    if spec.option("attention_backend") is not None:
        kwargs["attention_config"] = {"backend": spec.option("attention_backend")}
    space = spec.option("kv_cache_space_gb")
    if space is not None and on_cpu:
        kwargs["kv_cache_memory_bytes"] = int(float(space) * _GIB)
    return kwargs


def _model_id(path: pathlib.Path, load_format: str | None) -> str:
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    fmt = f"#{load_format}" if load_format and load_format != "auto" else ""
    return f"vllm:{path}:{digest.hexdigest()[:16]}{fmt}"


def _set_env(spec: BackendSpec) -> int | None:
    """Set vLLM's environment variables in this (worker) process.

    Returns:
        The torch thread count to set for an in-process engine on the CPU, else None.

    Raises:
        ConfigError: ``threads`` is out of range.
    """
    on_cpu = not _has_nvidia_gpu()
    if spec.option("deterministic"):
        os.environ["VLLM_BATCH_INVARIANT"] = "1"
    in_process = not spec.option("multiprocessing", not on_cpu)
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    space = spec.option("kv_cache_space_gb")
    if space is not None:
        # whole GiB only, and it overrides kv_cache_memory_bytes: clear it for a fraction
        if float(space) == int(float(space)):
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(float(space)))
        else:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if not on_cpu:
        return None
    cpus = sorted(os.sched_getaffinity(0))
    threads = spec.option("threads")
    if threads is not None and not 1 <= int(threads) <= len(cpus):
        msg = f"vllm option threads={threads} must be between 1 and {len(cpus)} here"
        raise ConfigError(msg)
    if not in_process:
        if threads is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cpus[: int(threads)]))
        return None
    n = int(threads) if threads is not None else max(1, len(cpus) - 1)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


def _has_nvidia_gpu() -> bool:
    """Guess, without importing torch, whether vLLM will run on an NVIDIA GPU."""
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/gpus")
