"""The backend seam: one Protocol, typed requests and responses, a picklable spec.

A backend takes a batch of :class:`Request` and returns exactly one :class:`Response` per
request, in input order, with prompt-token and cached-token counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from llmsql.adapters.options import LoraOptions


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """A trained LoRA adapter a request runs with (``adapter => 'name'``).

    ``path`` is the folder of its PEFT files (``adapter_config.json``,
    ``adapter_model.safetensors``) as the driver sees it; ``digest`` is a digest of those
    weights, part of every cache key (retraining under the same name changes it).
    """

    name: str
    path: str
    digest: str


@dataclass(frozen=True, slots=True)
class Request:
    """One generation request. ``prompt`` is the rendered prompt before any chat template."""

    prompt: str
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None
    choices: tuple[str, ...] | None = None
    """Constrain the answer to exactly one of these strings (where the backend can)."""
    json_schema: str | None = None
    """Constrain the answer to JSON matching this JSON schema (where the backend can)."""
    ignore_eos: bool = False
    """Generate exactly ``max_tokens`` tokens (benchmarks with random weights)."""
    choice_probs: bool = False
    """With ``choices``: also return each choice's probability, renormalized over the
    choices, in :attr:`Response.choice_probs` (where :attr:`Capabilities.choice_probabilities`
    says the backend can; others leave it None). LLM_SCORE reads P("Yes") from it."""
    adapter: AdapterRef | None = None
    """Run with this LoRA adapter on the base model (where :attr:`Capabilities.adapters`
    says the backend can); None: the base model alone."""


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to one :class:`Request`."""

    text: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose KV came from a cache (0 where nothing was reused)."""
    output_tokens: int = 0
    error: str | None = None
    """Set when this request failed for good; ``text`` is then empty."""
    choice_probs: tuple[float, ...] | None = None
    """For a request with ``choice_probs``: one probability per choice, in the request's
    choice order, summing to 1 (None where the backend cannot give them)."""
    cached_reported: bool = True
    """False where the backend did not say how many prompt tokens its cache supplied
    (``cached_tokens`` is then 0 because it is unknown, not because nothing was reused)."""


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; rules consult this, never ``isinstance``."""

    prefix_caching: bool = False
    constrained_choice: bool = False
    json_schema: bool = False
    max_model_len: int = 2048
    reports_cached_tokens: bool = False
    block_size: int = 16
    cache_tokens: int | None = None
    """Prefix-cache capacity in tokens, when the engine says."""
    batch_prefix_sharing: bool = False
    """A batch's shared prefix is computed once even when its requests arrive together (no
    cache warm-up needed)."""
    scheduler_batching: bool = False
    """The engine schedules a batch's requests itself (continuous batching, as vLLM does):
    large batches keep it busy."""
    choice_probabilities: bool = False
    """Answers requests with ``choice_probs`` (the choices' probabilities, from the model's
    log-probabilities)."""
    concurrent_requests: int | None = None
    """Requests computed at once (a client's concurrency limit; None: a batch's size)."""
    adapters: bool = False
    """Answers requests with an :attr:`Request.adapter` (LoRA adapters on the base model;
    requests with different adapters may share one batch)."""
    trains_adapters: bool = False
    """Implements :class:`AdapterTrainer` (``CREATE ADAPTER`` can train on it)."""


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """A picklable description of a backend: engines are built from it where they run.

    ``options`` holds backend-specific settings as sorted (key, value) pairs so the spec
    stays hashable and picklable.
    """

    kind: str
    model: str | None = None
    options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def option(self, key: str, default: Any = None) -> Any:
        """Return the option ``key`` or ``default``."""
        for k, v in self.options:
            if k == key:
                return v
        return default

    @staticmethod
    def make(kind: str, model: str | None = None, **options: Any) -> BackendSpec:
        """Build a spec from keyword options (sorted for a stable identity)."""
        return BackendSpec(kind, model, tuple(sorted(options.items())))


@runtime_checkable
class LLMBackend(Protocol):
    """The one interface every backend implements."""

    name: str
    capabilities: Capabilities

    def generate(self, batch: Sequence[Request], /) -> list[Response]:
        """Return exactly one Response per Request, in input order."""
        ...

    def count_tokens(self, text: str, /) -> int:
        """Tokens of ``text`` as the model would see it (chat template included)."""
        ...

    def model_id(self) -> str:
        """A stable identity of the model (path + revision/size), for caches."""
        ...

    def close(self) -> None:
        """Release the engine (processes, GPU memory)."""
        ...


# -- adapter training (CREATE ADAPTER) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrainExample:
    """One labelled row as training sees it: ``request`` is exactly the request the LLM
    call sends for that row (prompt rendered by the call's contract, choices, schema), and
    ``answer`` the row's label rendered as the call's answer text (e.g. ``"Yes"``).
    """

    request: Request
    answer: str


@dataclass(frozen=True, slots=True)
class TrainJob:
    """What to train: one LoRA adapter on the backend's base model."""

    name: str
    examples: tuple[TrainExample, ...]
    holdout: tuple[TrainExample, ...]
    """Rows kept out of training (held-out loss; may be empty)."""
    lora: LoraOptions
    out_dir: str
    """Where the finished adapter's PEFT files go (written atomically: a folder renamed
    into place)."""
    checkpoint_dir: str
    """Checkpoints (adapter weights, optimizer state, step); training resumes from the
    newest one found here."""
    slo_tpot_ms: float | None = None
    """While queries run on the same backend: their time per output token objective (the
    co-serving scheduler sizes fine-tuning work to keep it); None: no objective."""


@dataclass(frozen=True, slots=True)
class TrainProgress:
    """Where a training run is."""

    step: int
    steps: int
    """Optimizer steps in the whole run."""
    loss: float | None
    tokens: int
    """Training tokens forwarded so far."""
    seconds: float


@dataclass(frozen=True, slots=True)
class TrainResult:
    """A finished training run."""

    adapter: AdapterRef
    loss_curve: tuple[tuple[int, float], ...]
    holdout_loss: float | None
    steps: int
    tokens: int
    seconds: float
    resumed_from: int = 0
    """The step training resumed from (0: from scratch)."""


@dataclass(frozen=True, slots=True)
class CoServeStats:
    """What co-serving did since the backend started (a counter; callers take deltas)."""

    inference_seconds: float = 0.0
    """Time in inference forward passes."""
    finetune_seconds: float = 0.0
    """Time in fine-tuning work interleaved between inference passes."""
    finetune_tokens: int = 0
    iterations: int = 0
    """Inference passes that had fine-tuning work beside them."""
    slo_misses: int = 0
    """Inference passes slower than the objective."""


@runtime_checkable
class TrainHandle(Protocol):
    """A training run in progress (background or not)."""

    def done(self) -> bool:
        """True once it finished, failed or was cancelled."""
        ...

    def progress(self) -> TrainProgress:
        """Where it is now."""
        ...

    def result(self, timeout: float | None = None) -> TrainResult:
        """Wait for the end; raise the run's error (an :class:`~llmsql.errors.LLMSQLError`)
        if it failed or was cancelled (the newest checkpoint stays for a resume).
        """
        ...

    def cancel(self) -> None:
        """Stop at the next step boundary (a checkpoint is written first)."""
        ...


@runtime_checkable
class AdapterTrainer(Protocol):
    """A backend that trains adapters (:attr:`Capabilities.trains_adapters`)."""

    def start_training(self, job: TrainJob, /,
                       on_progress: Callable[[TrainProgress], None] | None = None,
                       ) -> TrainHandle:
        """Start training ``job`` in the background, co-served with this backend's
        queries; :meth:`TrainHandle.result` waits for it.
        """
        ...

    def coserve_stats(self) -> CoServeStats:
        """The co-serving counters (ANALYZE's share of time with training)."""
        ...

    def set_slo_tpot_ms(self, ms: float | None, /) -> None:
        """Change the objective running and later training works to."""
        ...
