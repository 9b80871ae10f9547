"""What a backend kind sends, known without building it: EXPLAIN plans and counts with it.

EXPLAIN answers a query with the dry-run backend, so that no model is loaded. Its figures
are those a real run measures (EXPLAIN ANALYZE) only when the dry run plans as the target
backend makes the rules plan (warm-ups are sent only where the engine does not share a
batch's prefixes itself; batch sizes follow from how the engine schedules) and counts each
prompt as the backend tokenizes it (inside the model's chat template). A
:class:`SendProfile` says both for a spec, from the backend's documented behaviour:

- ``transformers`` (:mod:`llmsql.backends.transformers`): prompts always in the chat
  template; a batch's shared prefix is computed once (no warm-ups); constrained choices are
  scored whole, so an answer's output tokens are the choice's plus the end-of-sequence token.
- ``vllm`` (:mod:`llmsql.backends.vllm`): prompts in the chat template unless the option
  ``chat_template`` is False; prefix caching as the option ``enable_prefix_caching`` says;
  vLLM shares prefixes within a step and schedules a batch itself; a choice told apart by
  its first token is one output token (``choice_decoding="first_token"``, the default;
  measured); other choices are decoded under a grammar, taken to end with the
  end-of-sequence token (not measured).
- ``openai``: capabilities come from the server and are unknown before it is asked; the chat
  endpoint applies the server's template (counted when the model is a local folder).

The capabilities given are those rules read (``prefix_caching``, ``batch_prefix_sharing``,
``scheduler_batching``, ``block_size``, ``cache_tokens``, ``constrained_choice``); a test
compares them with each real backend's. The engine's own cache size and, for vLLM, its block
size are known only once it runs: vLLM's are left at the defaults here.

>>> send_profile(BackendSpec.make("vllm", None, chat_template=False)).chat_template
False
>>> send_profile(BackendSpec.make("transformers")).capabilities.batch_prefix_sharing
True
"""

from __future__ import annotations

from dataclasses import dataclass

from llmsql.backends.base import BackendSpec, Capabilities


@dataclass(frozen=True, slots=True)
class SendProfile:
    """How a backend turns requests into tokens, as far as it is known before it is built."""

    capabilities: Capabilities | None = None
    """The capabilities the rules will plan with; None: unknown until the backend is built
    (EXPLAIN keeps the dry run's defaults)."""
    chat_template: bool = False
    """Each prompt is sent inside the model's chat template (when the tokenizer has one)."""
    choice_eos: bool = False
    """A constrained choice's output tokens include the end-of-sequence token."""
    first_token_choice: bool = False
    """Choices that start with distinct tokens are answered in one output token."""


def send_profile(spec: BackendSpec, /) -> SendProfile:
    """The profile of the backend ``spec`` builds (an unknown kind: nothing is known)."""
    if spec.kind == "transformers":
        return SendProfile(
            Capabilities(prefix_caching=True, constrained_choice=True, json_schema=True,
                         block_size=1, batch_prefix_sharing=True),
            chat_template=True, choice_eos=True,
        )
    if spec.kind == "vllm":
        return SendProfile(
            Capabilities(prefix_caching=bool(spec.option("enable_prefix_caching", True)),
                         constrained_choice=True, json_schema=True, batch_prefix_sharing=True,
                         scheduler_batching=True),
            chat_template=bool(spec.option("chat_template", True)),
            first_token_choice=spec.option("choice_decoding", "first_token") == "first_token",
            choice_eos=True,
        )
    if spec.kind == "openai":
        return SendProfile(chat_template=spec.option("endpoint", "chat") == "chat")
    return SendProfile()


PLANNING_FIELDS: tuple[str, ...] = ("prefix_caching", "constrained_choice",
                                    "batch_prefix_sharing", "scheduler_batching")
"""The capabilities a profile states for sure (a test holds each backend to them)."""
