"""The backend seam: one Protocol, typed requests and responses, a picklable spec.

A backend takes a batch of :class:`Request` and returns exactly one :class:`Response` per
request, in input order, with prompt-token and cached-token counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Sequence


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
