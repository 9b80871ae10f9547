"""PyTorch + transformers backend: small models on the CPU (or one GPU), with prefix reuse.

A thin facade over llmsql's engine (:mod:`llmsql.engine`): this module parses the spec's
options, wraps each prompt in the tokenizer's chat template (one user message plus the
generation prompt) and tokenizes it, turns requests into engine jobs and the engine's
results into responses. How a batch runs (shared-prefix KV, batched decode, constrained
choice) is described in :mod:`llmsql.engine.runner`.

**Batch invariance.** A prompt's answer does not depend on its batch size, its batch
neighbours, the padding or the prefix group it ran in, so the same query gives the same
answers on DuckDB and on Spark, with any partitioning and row order: every greedy decision is
checked against a margin (``invariance_margin``: 0.002 logits in float32, 0.5 in 16-bit
types), and a decision inside it is re-decided on the canonical path (see
:mod:`llmsql.engine.runner`). Sampling (temperature > 0) is not covered: a seeded sample is
reproducible for the same batch only.

``cached_tokens`` (the definition this backend reports): a group prefix of ``P`` tokens is
computed once and reused by the other ``k - 1`` members of its group of ``k``; those members
report ``cached_tokens = P`` and the member that comes first in the input batch, which paid for
the prefix, reports 0. So the sum of ``cached_tokens`` over a batch is exactly the number of
prompt tokens whose KV was *not* computed. Nothing is cached across ``generate`` calls, so a
prompt alone in its batch always reports 0.

Constrained choice is exact: the answer is the choice ``c`` maximizing
``log P(tokens(c) + <eos> | prompt)``, the likelihood that the model's whole answer is exactly
``c``; all choices of a request reuse the prompt's KV. With ``Request.choice_probs`` the
response also carries the choices' probabilities renormalized over the choices (the softmax
of those log-likelihoods).

A request with a ``json_schema`` decodes under a grammar (:mod:`llmsql.backends.grammar`,
on ``outlines_core``): each step masks the tokens that would leave the schema, or that would
leave too few tokens of ``max_tokens`` to finish a valid answer, so every answer parses. A
budget too small for the shortest valid answer gets an error response.

Requests with a LoRA adapter (one engine run per adapter in a batch) and adapter training
co-served with queries: :mod:`llmsql.backends.transformers_adapters`.

torch, transformers and :mod:`llmsql.engine` are imported only inside this module's
functions and methods.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from llmsql.backends import moe_glue
from llmsql.backends.base import AdapterRef, BackendSpec, Capabilities, Request, Response
from llmsql.backends.transformers_adapters import AdapterHost
from llmsql.errors import BackendError, ConfigError
from llmsql.models import model_max_len, resolve_model
from llmsql.moe.options import OPTION_NAMES

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Callable, Sequence

    from transformers import PreTrainedTokenizerBase

    from llmsql.backends.base import (
        CoServeStats,
        TrainExample,
        TrainHandle,
        TrainJob,
        TrainProgress,
    )
    from llmsql.backends.grammar import TokenGrammar
    from llmsql.engine import Engine, Generated, Job, Scored
    from llmsql.engine.finetune.train import TrainSeq
    from llmsql.moe.plan import OffloadStats

logger = logging.getLogger(__name__)

OPTIONS: tuple[str, ...] = (
    "batch_size",
    "cache_dir",
    "device",
    "dtype",
    "invariance_margin",
    "max_model_len",
    "threads",
    *OPTION_NAMES,
)
"""The spec options this backend uses; keys outside these and WORKER_OPTIONS are rejected.
``expert_cache``, ``moe_plan``, ``predictor``, ``lookahead`` and ``moe_profile`` offload a
mixture-of-experts model's experts (:mod:`llmsql.moe.options`)."""

WORKER_OPTIONS: tuple[str, ...] = ("idle_timeout", "socket_path", "startup_timeout")
"""Client-side options of :mod:`llmsql.backends.worker` (its ``CLIENT_OPTIONS``): a worker
builds this backend from the client's whole spec, so they are accepted and ignored here."""

DEFAULT_BATCH_SIZE = 16
"""Rows per chunk (the ``batch_size`` option's default)."""

_DTYPES = ("auto", "float32", "bfloat16", "float16")


class TransformersBackend:
    """The :class:`~llmsql.backends.base.LLMBackend` for PyTorch + transformers.

    Spec options: ``device`` (``"cpu"`` default, ``"cuda"``, or ``"auto"``), ``dtype``
    (``"auto"``: float32 on the CPU, bfloat16 on a GPU), ``batch_size`` (16),
    ``max_model_len`` (the model's, at most 8192), ``threads`` (torch CPU threads),
    ``cache_dir`` (where the embedded model is converted), ``invariance_margin`` (see
    *Batch invariance* in the module docstring; 0 turns the guard off); ``expert_cache``
    (with ``moe_plan``, ``predictor``, ``lookahead``, ``moe_profile``): run a
    mixture-of-experts model with its experts in host memory and a GPU cache of this size
    (:mod:`llmsql.backends.moe_glue`).

    ``engine`` is the :class:`llmsql.engine.Engine` that runs the model (attach a step timer
    to it to measure).
    """

    name = "transformers"

    def __init__(self, spec: BackendSpec, /) -> None:
        """Resolve and load the model that ``spec`` names.

        Args:
            spec: ``spec.model`` goes through :func:`llmsql.models.resolve_model`.

        Raises:
            ConfigError: an unknown option or a bad value, or a bad model path.
            BackendError: the model failed to load.
        """
        _check_options(spec)
        self._spec = spec
        self._path = resolve_model(spec.model, cache_dir=spec.option("cache_dir"))
        self._batch_size = _positive_int(spec, "batch_size", DEFAULT_BATCH_SIZE)
        limit = model_max_len(self._path)
        self._max_len = min(_positive_int(spec, "max_model_len", limit), limit)
        self.capabilities = Capabilities(
            prefix_caching=True,
            constrained_choice=True,
            json_schema=_has_grammar_library(),
            max_model_len=self._max_len,
            reports_cached_tokens=True,
            block_size=1,
            batch_prefix_sharing=True,  # a batch's shared prefix is computed once
            choice_probabilities=True,  # exact: softmax of the choices' log-likelihoods
            adapters=True,  # per request: one engine run per adapter in a batch
            trains_adapters=True,  # start_training: LoRA co-served with queries
        )
        self._device, self._dtype_name = _pick_device(spec)
        self._margin = _margin(spec, self._dtype_name, self._device)
        self._moe = moe_glue.moe_backend_options(self.name, dict(spec.options))
        self._offload: Any = None  # the engine's ExpertOffload with MoE options
        self._engine: Engine | None = None
        self._grammars: dict[str, TokenGrammar] = {}
        self._vocabulary: Any = None
        self._lock = threading.Lock()  # one batch at a time; fast tokenizers are not reentrant
        self._adapters: AdapterHost | None = None
        self._load(spec.option("threads"))

    # ----------------------------------------------------------------- loading
    def _load(self, threads: object) -> None:
        from llmsql.engine import Engine, load_tokenizer, pad_id, set_threads, stop_ids

        if threads is not None:
            set_threads(_as_positive(threads, "threads"))
        try:
            self._tokenizer: PreTrainedTokenizerBase = load_tokenizer(self._path)
            model, self._offload = moe_glue.load_model(
                self._path, self._moe, device=self._device, dtype=self._dtype_name)
        except ConfigError:  # a model that cannot take the MoE options: the user's to fix
            raise
        except Exception as exc:  # boundary: wrap whatever transformers raises
            msg = (
                f"loading the model at {self._path} failed: {exc}; check that the folder "
                "holds a complete causal-LM checkpoint"
            )
            raise BackendError(msg, backend=self.name) from exc
        self._eos = stop_ids(self._tokenizer, model)
        self._engine = Engine(
            model, eos=self._eos, pad=pad_id(self._tokenizer, self._eos), device=self._device,
            batch_size=self._batch_size, margin=self._margin,
        )
        self._id = _model_id(self._path)
        self._adapters = AdapterHost(self._engine)
        logger.info("loaded %s on %s (%s)", self._path, self._device, model.dtype)

    @property
    def engine(self) -> Engine:
        """The engine that runs the model.

        Raises:
            BackendError: the backend is closed.
        """
        if self._engine is None:
            msg = "the transformers backend is closed; build a new one"
            raise BackendError(msg, backend=self.name)
        return self._engine

    @property
    def adapters(self) -> AdapterHost:
        """The model's LoRA adapters, served and trained; BackendError once closed."""
        self.engine  # noqa: B018 -- raises once closed
        assert self._adapters is not None, "a loaded backend has its adapters"
        return self._adapters

    def moe_stats(self) -> OffloadStats | None:
        """What expert offload measured since the model loaded (None without it)."""
        return self._offload.stats() if self._offload is not None else None

    @property
    def canonical_reruns(self) -> int:
        """Requests answered again on the canonical path (a decision was nearly tied)."""
        return self._engine.canonical_reruns if self._engine is not None else 0

    # ----------------------------------------------------------- the protocol
    def generate(self, batch: Sequence[Request], /) -> list[Response]:
        """Return one :class:`Response` per request, in input order.

        A prompt that does not fit ``max_model_len`` gets a response with ``error`` set;
        the other requests still run.

        Raises:
            BackendError: the backend is closed, or the model failed while running.
        """
        with self._lock:
            engine = self.engine
            with self.adapters.model_lock():  # training pieces run between its passes
                return self._generate(engine, batch)

    def _generate(self, engine: Engine, batch: Sequence[Request]) -> list[Response]:
        out: list[Response | None] = [None] * len(batch)
        groups: dict[AdapterRef | None, list[Job]] = {}
        for i, request in enumerate(batch):
            ids = tuple(self._token_ids(request.prompt))
            problem = self._request_problem(request, ids)
            if problem is None:
                groups.setdefault(request.adapter, []).append(self._job(i, request, ids))
            else:
                out[i] = Response("", prompt_tokens=len(ids), error=problem)
        try:
            for ref, jobs in groups.items():  # one engine run per adapter: no prefix across
                problem = self.adapters.activate(ref)
                results = engine.run(jobs) if problem is None else [problem] * len(jobs)
                for job, res in zip(jobs, results, strict=True):
                    out[job.index] = (Response("", prompt_tokens=len(job.ids), error=res)
                                      if isinstance(res, str) else
                                      self._response(batch[job.index], job, res))
        except Exception as exc:  # boundary: torch errors become BackendError
            msg = f"generation failed in the transformers backend: {exc}"
            raise BackendError(msg, backend=self.name) from exc
        finally:
            self.adapters.activate(None)  # the engine runs the base model between batches
        assert all(r is not None for r in out), "every request must get a response"
        return [r for r in out if r is not None]

    def count_tokens(self, text: str, /) -> int:
        """Return the number of tokens of ``text`` wrapped in the chat template."""
        with self._lock:
            return len(self._token_ids(text))

    def model_id(self) -> str:
        """Return ``transformers:<model folder>:<hash of config and weight files>``."""
        return self._id

    # -------------------------------------------------------- adapter training
    def start_training(self, job: TrainJob, /,
                       on_progress: Callable[[TrainProgress], None] | None = None,
                       ) -> TrainHandle:
        """Start training ``job``'s LoRA adapter in the background, co-served with queries
        (:func:`.transformers_adapters.start_training`: ConfigError on a bad job).
        """
        from llmsql.backends.transformers_adapters import start_training, train_sequences

        def sequences(examples: Sequence[TrainExample], what: str) -> list[TrainSeq]:
            return train_sequences(examples, prompt_ids=self._token_ids, what=what,
                                   answer_ids=self._choice_ids, max_len=self._max_len)

        with self._lock:  # the tokenizer
            return start_training(job, host=self.adapters, sequences=sequences,
                                  base_model=str(self._path), on_progress=on_progress)

    def coserve_stats(self) -> CoServeStats:
        """What co-serving did since the first training run (zeros before)."""
        return self.adapters.stats()

    def set_slo_tpot_ms(self, ms: float | None, /) -> None:
        """Change the time-per-output-token objective that training keeps (None: none)."""
        self.adapters.set_slo_tpot_ms(ms)

    # ------------------------------------------------------------------- close
    def close(self) -> None:
        """Free the model (training runs are cancelled, checkpoints written); later calls to
        generate raise.
        """
        if self._adapters is not None:
            self._adapters.close()
        with self._lock:
            if self._engine is None:
                return
            self._engine = None
            if self._offload is not None:
                self._offload.close()
                self._offload = None
        gc.collect()
        if self._device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- encoding
    def _token_ids(self, prompt: str) -> list[int]:
        return prompt_ids(self._tokenizer, prompt)

    def _encode(self, index: int, request: Request) -> Job:
        """The engine job of ``request`` (which must be runnable) at ``index`` in its batch."""
        return self._job(index, request, tuple(self._token_ids(request.prompt)))

    def _job(self, index: int, request: Request, ids: tuple[int, ...]) -> Job:
        from llmsql.engine import Job

        return Job(
            index, ids, budget=self._budget(request, ids), temperature=request.temperature,
            seed=request.seed, ignore_eos=request.ignore_eos, grammar=self._grammar(request),
            choices=tuple(tuple(self._choice_ids(c)) for c in request.choices or ()),
        )

    def _choice_ids(self, choice: str) -> list[int]:
        ids = list(self._tokenizer(choice, add_special_tokens=False).input_ids)
        return ids + self._eos[:1]

    def _request_problem(self, request: Request, ids: Sequence[int]) -> str | None:
        """Why ``request`` cannot run (empty or too long for ``max_model_len``), or None."""
        n = len(ids)
        if n == 0:
            return "the prompt is empty after tokenization; give the model some text"
        choice_lens = [len(self._choice_ids(c)) for c in request.choices or ()]
        if 0 in choice_lens:
            return "a choice is empty and the model has no end-of-sequence token; drop it"
        if request.json_schema is not None:
            problem = self._schema_problem(request, ids)
            if problem is not None:
                return problem
        need = n + max(choice_lens, default=1)
        if need <= self._max_len:
            return None
        return (
            f"prompt has {n} tokens (chat template included) and needs {need} with its answer, "
            f"but max_model_len is {self._max_len}; shorten the prompt or raise max_model_len"
        )

    def _schema_problem(self, request: Request, ids: Sequence[int]) -> str | None:
        """Why ``request``'s JSON schema cannot be answered within its budget, or None."""
        if request.choices is not None:
            return "a request cannot have both choices and a JSON schema; pass one of them"
        try:
            grammar = self._grammar(request)
        except ConfigError as exc:
            return str(exc)
        assert grammar is not None
        need, budget = grammar.min_tokens(), self._budget(request, ids)
        if need <= budget:
            return None
        return (
            f"the shortest answer that fits the JSON schema takes {need} tokens but only "
            f"{budget} may be generated; raise max_tokens (or max_model_len)"
        )

    def _grammar(self, request: Request) -> TokenGrammar | None:
        """The compiled grammar of a JSON-constrained request (compiled once per schema)."""
        if request.json_schema is None:
            return None
        grammar = self._grammars.get(request.json_schema)
        if grammar is None:
            from llmsql.backends.grammar import compile_schema, vocabulary

            if self._vocabulary is None:
                self._vocabulary = vocabulary(self._tokenizer, self._eos[0])
            grammar = compile_schema(request.json_schema, self._vocabulary, self._eos)
            self._grammars[request.json_schema] = grammar
        return grammar

    def _budget(self, request: Request, ids: Sequence[int]) -> int:
        return max(0, min(request.max_tokens, self._max_len - len(ids)))

    # --------------------------------------------------------------- responses
    def _response(self, request: Request, job: Job, result: Generated | Scored) -> Response:
        from llmsql.engine import Generated

        if isinstance(result, Generated):
            text_ids = result.tokens[:-1] if result.stopped else result.tokens
            text = str(self._tokenizer.decode(list(text_ids), skip_special_tokens=True))
            return Response(text, prompt_tokens=len(job.ids), cached_tokens=result.cached_tokens,
                            output_tokens=len(result.tokens))
        return self._choice_response(request, job, result)

    def _choice_response(self, request: Request, job: Job, result: Scored) -> Response:
        """Answer with the best-scoring choice (the earliest one on a tie)."""
        from llmsql.engine import best_choice, choice_probabilities

        best = best_choice(result.scores)
        probs = choice_probabilities(result.scores) if request.choice_probs else None
        return Response(
            (request.choices or ())[best], prompt_tokens=len(job.ids),
            cached_tokens=result.cached_tokens, output_tokens=len(job.choices[best]),
            choice_probs=probs,
        )


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, /) -> list[int]:
    """The token ids this backend runs for ``prompt``: one user message in the tokenizer's
    chat template plus the generation prompt (as written, with special tokens, without a
    template). ``llmsql moe-profile`` records routing on exactly these.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        return list(tokenizer(prompt).input_ids)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _has_grammar_library() -> bool:
    """Whether ``outlines_core`` (JSON-schema constrained decoding) is installed."""
    import importlib.util

    return importlib.util.find_spec("outlines_core") is not None


# ------------------------------------------------------------------- options
def _check_options(spec: BackendSpec) -> None:
    unknown = sorted(k for k, _ in spec.options if k not in OPTIONS + WORKER_OPTIONS)
    if unknown:
        msg = (
            f"unknown option(s) {', '.join(unknown)} for the transformers backend; "
            f"accepted: {', '.join(OPTIONS)}"
        )
        raise ConfigError(msg)


def _as_positive(value: object, key: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, str))
        or not str(value).isdigit()
        or int(value) <= 0
    ):
        msg = f"option {key}={value!r} of the transformers backend must be a positive integer"
        raise ConfigError(msg)
    return int(value)


def _positive_int(spec: BackendSpec, key: str, default: int) -> int:
    value = spec.option(key)
    return default if value is None else _as_positive(value, key)


def _pick_device(spec: BackendSpec) -> tuple[str, str]:
    """Return (device, dtype name) from the spec's ``device`` and ``dtype`` options."""
    device = str(spec.option("device", "cpu"))
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        msg = (
            f"option device={device!r} of the transformers backend must be 'cpu', 'cuda' or 'auto'"
        )
        raise ConfigError(msg)
    dtype = str(spec.option("dtype", "auto"))
    if dtype not in _DTYPES:
        choices = ", ".join(_DTYPES)
        msg = f"option dtype={dtype!r} of the transformers backend must be one of {choices}"
        raise ConfigError(msg)
    return device, dtype


def _margin(spec: BackendSpec, dtype: str, device: str) -> float:
    """The invariance margin: the ``invariance_margin`` option, else the compute type's."""
    value = spec.option("invariance_margin")
    if value is None:  # the engine's defaults, by compute type (measured there)
        from llmsql.engine import INVARIANCE_MARGIN, resolve_dtype

        return INVARIANCE_MARGIN[resolve_dtype(dtype, device)]
    try:
        margin = float(value)
    except (TypeError, ValueError):
        margin = -1.0
    if isinstance(value, bool) or not margin >= 0 or margin == float("inf"):
        msg = (
            f"option invariance_margin={value!r} of the transformers backend must be a "
            "number >= 0 (logits; 0 turns the batch-invariance guard off)"
        )
        raise ConfigError(msg)
    return margin


def _model_id(path: pathlib.Path) -> str:
    """``transformers:<path>:<hash>``, hashing config.json and the weight files' names and sizes."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"transformers:{path}:{digest.hexdigest()[:16]}"
