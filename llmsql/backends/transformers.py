"""PyTorch + transformers backend: small models on the CPU (or one GPU), with prefix reuse.

How a batch runs:

1. Each prompt is wrapped in the tokenizer's chat template (one user message plus the
   generation prompt) and tokenized.
2. Requests are split into free generation and constrained choice, each sorted by token ids
   (so prompts sharing a prefix sit together) and cut into chunks of ``batch_size``.
3. Inside a chunk, :func:`plan_prefix_groups` splits the sorted prompts into contiguous
   groups that share a token prefix. Each group's prefix runs through the model **once**
   (all groups of the chunk in one padded forward pass); its KV cache is then copied to every
   member, and only the members' suffixes are computed ("middle padding": a row holds
   ``[pad | group prefix | pad | suffix]``; the attention mask hides the pads and explicit
   position ids keep every real token at its unpadded position, so the numbers are those of
   an unbatched run up to floating-point rounding).
4. Generation decodes all rows of the chunk together (greedy, or sampling with a per-request
   seeded generator), dropping rows as they finish. Constrained choice scores every choice.

**Batch invariance.** A prompt's answer does not depend on its batch size, its batch
neighbours, the padding or the prefix group it ran in, so the same query gives the same
answers on DuckDB and on Spark, with any partitioning and row order. Batched runs differ from
an unbatched run by floating-point rounding only (float32: at most about 1e-4 in a logit,
measured), which can flip a decision only where two candidates are nearly tied. So every
greedy decision (each decoded token's top-2 logit margin, and the best-minus-second score of
constrained choice) is checked against a margin (``invariance_margin``: 0.002 logits in
float32, 0.5 in 16-bit types): a decision inside it is not trusted, and that request is
answered again on the *canonical path*: alone, the whole prompt in one forward pass (no
padding, no shared prefix), then one token at a time. A request whose every decision cleared
the margin has the canonical path's answer too, because rounding cannot move a logit by half
the margin; so every answer is the canonical one, a function of the prompt alone. Ties on the
canonical path go to the lowest token id, or the earliest choice. Sampling (temperature > 0)
is not covered: a seeded sample is reproducible for the same batch only.

``cached_tokens`` (the definition this backend reports): a group prefix of ``P`` tokens is
computed once and reused by the other ``k - 1`` members of its group of ``k``; those members
report ``cached_tokens = P`` and the member that comes first in the input batch, which paid for
the prefix, reports 0. So the sum of ``cached_tokens`` over a batch is exactly the number of
prompt tokens whose KV was *not* computed. Nothing is cached across ``generate`` calls, so a
prompt alone in its batch always reports 0.

Constrained choice is exact: the answer is the choice ``c`` maximizing
``log P(tokens(c) + <eos> | prompt)``, the likelihood that the model's whole answer is exactly
``c``; all choices of a request reuse the prompt's KV.

A request with a ``json_schema`` decodes under a grammar (:mod:`llmsql.backends.grammar`,
on ``outlines_core``): each step masks the tokens that would leave the schema, or that would
leave too few tokens of ``max_tokens`` to finish a valid answer, so every answer parses. A
budget too small for the shortest valid answer gets an error response.

torch and transformers are imported only inside this module's functions and methods.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmsql.backends.base import BackendSpec, Capabilities, Request, Response
from llmsql.errors import BackendError, ConfigError
from llmsql.models import model_max_len, resolve_model

if TYPE_CHECKING:
    import pathlib
    from collections.abc import Callable, Iterator, Sequence

    import torch
    from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

    from llmsql.backends.grammar import TokenGrammar

logger = logging.getLogger(__name__)

OPTIONS: tuple[str, ...] = (
    "batch_size",
    "cache_dir",
    "device",
    "dtype",
    "invariance_margin",
    "max_model_len",
    "threads",
)
"""The spec options this backend uses; keys outside these and WORKER_OPTIONS are rejected."""

WORKER_OPTIONS: tuple[str, ...] = ("idle_timeout", "socket_path", "startup_timeout")
"""Client-side options of :mod:`llmsql.backends.worker` (its ``CLIENT_OPTIONS``): a worker
builds this backend from the client's whole spec, so they are accepted and ignored here."""

DEFAULT_BATCH_SIZE = 16
MIN_SHARED_PREFIX = 8
"""Shortest prefix worth a separate forward pass (in tokens)."""

_DTYPES = ("auto", "float32", "bfloat16", "float16")
INVARIANCE_MARGIN = {"float32": 0.002, "bfloat16": 0.5, "float16": 0.5}
"""Default margin (in logits) below which a greedy decision is re-decided on the canonical
path, by compute type. Batch-dependent rounding measured on the embedded model in float32 is
at most 7e-5 on prefill (64-row vs one-row prefill of 64 W1-style prompts) and 9.2e-5 over
512 decode steps (16 W1 prompts, 32 tokens each, batch of 16 vs alone, teacher-forced): half
the margin is 10 times that. 0.02 (the first default) re-answered about 6% of 32-token answers
alone, which doubled the time of free-text calls; at 0.002 no step of those 512 was inside
the margin. 16-bit types round about 1,000 times coarser."""


@dataclass(frozen=True, slots=True)
class PrefixGroup:
    """A contiguous run ``[start, stop)`` of prompts that share their first ``prefix_len`` tokens.

    ``prefix_len`` is 0 for a prompt that shares nothing worth reusing (a group of one).
    """

    start: int
    stop: int
    prefix_len: int


@dataclass(frozen=True, slots=True)
class _Encoded:
    """A request with its position in the input batch and its templated token ids."""

    index: int
    request: Request
    ids: tuple[int, ...]


@dataclass(slots=True)
class _Rows:
    """Decoding state of a batch of rows (internal, mutated in place by the decode loop)."""

    cache: DynamicCache
    mask: torch.Tensor
    """(rows, cache length): 1 where the cache holds a real token, 0 for padding."""
    next_pos: torch.Tensor
    """(rows,): position id of each row's next token."""
    logits: torch.Tensor
    """(rows, vocab): float32 logits for each row's next token."""


def common_prefix_len(a: Sequence[int], b: Sequence[int], /) -> int:
    """Return the number of leading items ``a`` and ``b`` share.

    >>> common_prefix_len([1, 2, 3], [1, 2, 4, 5])
    2
    """
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def plan_prefix_groups(
    seqs: Sequence[Sequence[int]], /, *, min_prefix: int = MIN_SHARED_PREFIX
) -> list[PrefixGroup]:
    """Split ``seqs`` (sorted, ideally) into contiguous groups that maximize reused tokens.

    A group of ``k`` sequences sharing ``p`` leading tokens saves ``(k - 1) * p`` tokens; the
    split maximizes the total by dynamic programming (``O(n^2)``, ``n`` is a batch). A shared
    prefix always leaves each member at least one token of its own (the last prompt token
    must run to give the next-token logits).

    Args:
        seqs: Token id sequences, in the order the groups must follow.
        min_prefix: Shortest shared prefix worth using.

    Returns:
        Groups covering ``seqs`` in order; singletons have ``prefix_len == 0``.

    >>> plan_prefix_groups([[1, 2, 3], [1, 2, 4], [7, 8]], min_prefix=2)
    [PrefixGroup(start=0, stop=2, prefix_len=2), PrefixGroup(start=2, stop=3, prefix_len=0)]
    """
    n = len(seqs)
    adjacent = [common_prefix_len(seqs[i], seqs[i + 1]) for i in range(n - 1)]
    best, cut, plen = [0] * (n + 1), list(range(-1, n)), [0] * (n + 1)
    for j in range(1, n + 1):
        best[j] = best[j - 1]
        shared, shortest = len(seqs[j - 1]), len(seqs[j - 1])
        for i in range(j - 2, -1, -1):
            shared, shortest = min(shared, adjacent[i]), min(shortest, len(seqs[i]))
            p = min(shared, shortest - 1)
            if p < min_prefix:
                break  # p only shrinks as the group grows to the left
            if best[i] + (j - 1 - i) * p > best[j]:
                best[j], cut[j], plen[j] = best[i] + (j - 1 - i) * p, i, p
    return _backtrack_groups(cut, plen, n)


def _backtrack_groups(cut: list[int], plen: list[int], n: int) -> list[PrefixGroup]:
    groups: list[PrefixGroup] = []
    j = n
    while j > 0:
        groups.append(PrefixGroup(cut[j], j, plen[j]))
        j = cut[j]
    return groups[::-1]


def _chunks(
    items: Sequence[_Encoded], weight: Callable[[_Encoded], int], budget: int
) -> Iterator[list[_Encoded]]:
    """Yield consecutive chunks of total ``weight`` within ``budget`` (at least one item each)."""
    chunk: list[_Encoded] = []
    total = 0
    for item in items:
        if chunk and total + weight(item) > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(item)
        total += weight(item)
    if chunk:
        yield chunk


def _cached_counts(rows: Sequence[_Encoded], groups: Sequence[PrefixGroup]) -> list[int]:
    """Per row: the group prefix length, except 0 for the group's first row in input order."""
    counts = [0] * len(rows)
    for g in groups:
        if g.prefix_len == 0:
            continue
        payer = min(range(g.start, g.stop), key=lambda r: rows[r].index)
        for r in range(g.start, g.stop):
            counts[r] = 0 if r == payer else g.prefix_len
    return counts


class TransformersBackend:
    """The :class:`~llmsql.backends.base.LLMBackend` for PyTorch + transformers.

    Spec options: ``device`` (``"cpu"`` default, ``"cuda"``, or ``"auto"``), ``dtype``
    (``"auto"``: float32 on the CPU, bfloat16 on a GPU), ``batch_size`` (16),
    ``max_model_len`` (the model's, at most 8192), ``threads`` (torch CPU threads),
    ``cache_dir`` (where the embedded model is converted), ``invariance_margin`` (see
    *Batch invariance* in the module docstring; 0 turns the guard off).
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
        )
        self._device, self._dtype_name = _pick_device(spec)
        self._margin = _margin(spec, self._dtype_name, self._device)
        self.canonical_reruns = 0
        """Requests answered again on the canonical path (a decision was nearly tied)."""
        self._model: PreTrainedModel | None = None
        self._grammars: dict[str, TokenGrammar] = {}
        self._vocabulary: Any = None
        self._lock = threading.Lock()  # one batch at a time; fast tokenizers are not reentrant
        self._load(spec.option("threads"))

    # ----------------------------------------------------------------- loading
    def _load(self, threads: object) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bars on the user's terminal
        if threads is not None:
            torch.set_num_threads(_as_positive(threads, "threads"))
        dtype = _torch_dtype(self._dtype_name, self._device)
        try:
            self._tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(self._path)
            model = AutoModelForCausalLM.from_pretrained(
                self._path, dtype=dtype, attn_implementation=_attention_implementation()
            )
        except Exception as exc:  # boundary: wrap whatever transformers raises
            msg = (
                f"loading the model at {self._path} failed: {exc}; check that the folder "
                "holds a complete causal-LM checkpoint"
            )
            raise BackendError(msg, backend=self.name) from exc
        self._model = model.to(self._device).eval()  # type: ignore[arg-type]  # transformers' stub
        self._eos = _eos_ids(self._tokenizer, model)
        self._pad = _pad_id(self._tokenizer, self._eos)
        self._templated = getattr(self._tokenizer, "chat_template", None) is not None
        self._id = _model_id(self._path)
        logger.info("loaded %s on %s (%s)", self._path, self._device, dtype)

    # ----------------------------------------------------------- the protocol
    def generate(self, batch: Sequence[Request], /) -> list[Response]:
        """Return one :class:`Response` per request, in input order.

        A prompt that does not fit ``max_model_len`` gets a response with ``error`` set;
        the other requests still run.

        Raises:
            BackendError: the backend is closed, or the model failed while running.
        """
        with self._lock:
            return self._generate(batch)

    def _generate(self, batch: Sequence[Request]) -> list[Response]:
        if self._model is None:
            msg = "the transformers backend is closed; build a new one"
            raise BackendError(msg, backend=self.name)
        out: list[Response | None] = [None] * len(batch)
        encoded = [self._encode(i, r) for i, r in enumerate(batch)]
        runnable = []
        for e in encoded:
            problem = self._request_problem(e)
            if problem is None:
                runnable.append(e)
            else:
                out[e.index] = Response("", prompt_tokens=len(e.ids), error=problem)
        try:
            self._run(runnable, out)
        except Exception as exc:  # boundary: torch errors become BackendError
            msg = f"generation failed in the transformers backend: {exc}"
            raise BackendError(msg, backend=self.name) from exc
        assert all(r is not None for r in out), "every request must get a response"
        return [r for r in out if r is not None]

    def count_tokens(self, text: str, /) -> int:
        """Return the number of tokens of ``text`` wrapped in the chat template."""
        with self._lock:
            return len(self._token_ids(text))

    def model_id(self) -> str:
        """Return ``transformers:<model folder>:<hash of config and weight files>``."""
        return self._id

    def close(self) -> None:
        """Free the model (and the GPU memory it held); later calls to generate raise."""
        with self._lock:
            if self._model is None:
                return
            self._model = None
        gc.collect()
        if self._device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- encoding
    def _token_ids(self, prompt: str) -> list[int]:
        if not self._templated:
            return list(self._tokenizer(prompt).input_ids)
        text = self._tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return list(self._tokenizer(text, add_special_tokens=False).input_ids)

    def _encode(self, index: int, request: Request) -> _Encoded:
        return _Encoded(index, request, tuple(self._token_ids(request.prompt)))

    def _choice_ids(self, choice: str) -> list[int]:
        ids = list(self._tokenizer(choice, add_special_tokens=False).input_ids)
        return ids + self._eos[:1]

    def _request_problem(self, e: _Encoded) -> str | None:
        """Why ``e`` cannot run (empty or too long for ``max_model_len``), or None."""
        n = len(e.ids)
        if n == 0:
            return "the prompt is empty after tokenization; give the model some text"
        choice_lens = [len(self._choice_ids(c)) for c in e.request.choices or ()]
        if 0 in choice_lens:
            return "a choice is empty and the model has no end-of-sequence token; drop it"
        if e.request.json_schema is not None:
            problem = self._schema_problem(e)
            if problem is not None:
                return problem
        need = n + max(choice_lens, default=1)
        if need <= self._max_len:
            return None
        return (
            f"prompt has {n} tokens (chat template included) and needs {need} with its answer, "
            f"but max_model_len is {self._max_len}; shorten the prompt or raise max_model_len"
        )

    def _schema_problem(self, e: _Encoded) -> str | None:
        """Why ``e``'s JSON schema cannot be answered within its budget, or None."""
        if e.request.choices is not None:
            return "a request cannot have both choices and a JSON schema; pass one of them"
        try:
            grammar = self._grammar(e.request)
        except ConfigError as exc:
            return str(exc)
        assert grammar is not None
        need, budget = grammar.min_tokens(), self._budget(e)
        if need <= budget:
            return None
        return (
            f"the shortest answer that fits the JSON schema takes {need} tokens but only "
            f"{budget} may be generated; raise max_tokens (or max_model_len)"
        )

    # ----------------------------------------------------------------- running
    def _run(self, runnable: Sequence[_Encoded], out: list[Response | None]) -> None:
        ordered = sorted(runnable, key=lambda e: (e.ids, e.index))
        free = [e for e in ordered if not e.request.choices]
        choice = [e for e in ordered if e.request.choices]
        for chunk in _chunks(free, lambda e: 1, self._batch_size):
            self._store(chunk, self._generate_chunk(chunk), out)
        pair_budget = 2 * self._batch_size
        for chunk in _chunks(choice, lambda e: len(e.request.choices or ()), pair_budget):
            self._store(chunk, self._choose_chunk(chunk), out)

    @staticmethod
    def _store(
        chunk: Sequence[_Encoded], responses: Sequence[Response], out: list[Response | None]
    ) -> None:
        for e, r in zip(chunk, responses, strict=True):
            out[e.index] = r

    def _generate_chunk(self, rows: Sequence[_Encoded]) -> list[Response]:
        import torch

        with torch.inference_mode():
            state, cached = self._prefill(rows)
            tokens, unsure = self._decode(rows, state, guard=len(rows) > 1)
            for r in unsure:
                tokens[r] = self._canonical_tokens(rows[r])
        return [self._response(e, toks, c) for e, toks, c in zip(rows, tokens, cached, strict=True)]

    def _canonical_tokens(self, e: _Encoded) -> list[int]:
        """Decode ``e`` on the canonical path: alone, whole prompt, one token at a time."""
        self.canonical_reruns += 1
        state, _ = self._prefill([e])
        return self._decode([e], state, guard=False)[0][0]

    def _response(self, e: _Encoded, tokens: list[int], cached: int) -> Response:
        stopped = bool(tokens) and tokens[-1] in self._eos and not e.request.ignore_eos
        text_ids = tokens[:-1] if stopped else tokens
        text = str(self._tokenizer.decode(text_ids, skip_special_tokens=True))
        return Response(
            text, prompt_tokens=len(e.ids), cached_tokens=cached, output_tokens=len(tokens)
        )

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        cache: DynamicCache,
        keep: int,
    ) -> torch.Tensor:
        """Run the model on ``ids`` after ``cache``; return float32 logits of the last ``keep``."""
        assert self._model is not None
        out = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        logits: torch.Tensor = out.logits
        return logits.float()

    # ----------------------------------------------------------------- prefill
    def _prefill(self, rows: Sequence[_Encoded]) -> tuple[_Rows, list[int]]:
        """Run the rows' prompts, each group prefix once; return the state and cached counts."""
        groups = plan_prefix_groups([e.ids for e in rows])
        prefix_lens = [g.prefix_len for g in groups for _ in range(g.start, g.stop)]
        cache, prefix_mask = self._prefix_cache(rows, groups)
        suffixes = [e.ids[p:] for e, p in zip(rows, prefix_lens, strict=True)]
        ids, smask = self._left_pad(suffixes)
        starts = self._tensor(prefix_lens)
        pos = (starts[:, None] + smask.cumsum(-1) - 1).clamp(min=0)
        mask = _cat_columns(prefix_mask, smask)
        logits = self._forward(ids, mask, pos, cache, keep=1)[:, -1]
        next_pos = starts + smask.sum(-1)
        return _Rows(cache, mask, next_pos, logits), _cached_counts(rows, groups)

    def _prefix_cache(
        self, rows: Sequence[_Encoded], groups: Sequence[PrefixGroup]
    ) -> tuple[DynamicCache, torch.Tensor]:
        """Compute each shared group prefix once; copy its KV to every member row.

        Rows without a shared prefix borrow any group's KV row with an all-zero mask, so the
        borrowed keys are never attended to.
        """
        from transformers import DynamicCache

        assert self._model is not None
        cache = DynamicCache(config=self._model.config)
        shared = [g for g in groups if g.prefix_len > 0]
        if not shared:
            return cache, self._tensor([[] for _ in rows])
        ids, gmask = self._left_pad([rows[g.start].ids[: g.prefix_len] for g in shared])
        self._forward(ids, gmask, (gmask.cumsum(-1) - 1).clamp(min=0), cache, keep=1)
        source = [0] * len(rows)
        for k, g in enumerate(shared):
            source[g.start : g.stop] = [k] * (g.stop - g.start)
        index = self._tensor(source)
        cache.batch_select_indices(index)
        has_prefix = self._tensor(
            [g.prefix_len > 0 for g in groups for _ in range(g.start, g.stop)]
        )
        return cache, gmask[index] * has_prefix[:, None]

    def _left_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (ids, mask), both (len(seqs), longest), padded on the left."""
        width = max(len(s) for s in seqs)
        ids = [[self._pad] * (width - len(s)) + list(s) for s in seqs]
        mask = [[0] * (width - len(s)) + [1] * len(s) for s in seqs]
        return self._tensor(ids), self._tensor(mask)

    def _tensor(self, data: object) -> torch.Tensor:
        import torch

        return torch.tensor(data, dtype=torch.long, device=self._device)

    # ------------------------------------------------------------------ decode
    def _decode(
        self, rows: Sequence[_Encoded], state: _Rows, *, guard: bool
    ) -> tuple[list[list[int]], list[int]]:
        """Generate for every row; return each row's tokens (stop token included).

        With ``guard``, a greedy row whose top-2 logits come within the invariance margin
        stops there and is listed in the second return value (its tokens are then partial):
        the caller answers it on the canonical path.
        """
        budgets = [self._budget(e) for e in rows]
        pickers = [self._picker(e.request) for e in rows]
        greedy = [e.request.temperature <= 0 for e in rows]
        guarded = [guard and self._margin > 0 and g for g in greedy]
        grammars = [self._grammar(e.request) for e in rows]
        gstate = [g.initial if g is not None else 0 for g in grammars]
        outputs: list[list[int]] = [[] for _ in rows]
        unsure: list[int] = []
        # slots[k]: the row that state row k decodes, or None once it finished. Finished
        # rows are dropped from the KV cache only when a quarter of the rows are done:
        # each drop copies the whole cache, which costs more than a few padded rows.
        slots: list[int | None] = [i if budgets[i] > 0 else None for i in range(len(rows))]
        state, slots = self._compact(state, slots)
        while slots:
            live = [(k, i) for k, i in enumerate(slots) if i is not None]
            logits = self._constrain(state.logits, live, grammars, gstate, outputs, budgets)
            best = logits.argmax(-1).tolist() if any(greedy[i] for _, i in live) else []
            close = self._near_ties(logits) if any(guarded[i] for _, i in live) else None
            feed = [self._pad] * len(slots)
            for k, i in live:
                tok = best[k] if greedy[i] else pickers[i](logits[k])
                outputs[i].append(tok)
                feed[k] = tok
                finished = self._finished(rows[i], outputs[i], budgets[i])
                if close is not None and guarded[i] and close[k]:
                    unsure.append(i)
                    finished = True
                g = grammars[i]
                if g is not None:
                    nxt = g.next_state(gstate[i], tok)
                    finished = finished or nxt is None or g.is_done(nxt)
                    gstate[i] = gstate[i] if nxt is None else nxt
                if finished:
                    slots[k] = None
            state, slots = self._compact(state, slots, feed)
            if slots:
                self._step(state, feed)
        return outputs, sorted(unsure)

    def _compact(
        self, state: _Rows, slots: list[int | None], feed: list[int] | None = None
    ) -> tuple[_Rows, list[int | None]]:
        """Drop finished rows from ``state`` once they are a quarter of it (all: none left).

        ``feed`` (the next tokens, one per state row) is compacted alongside, in place.
        """
        done = sum(i is None for i in slots)
        if done == 0 or (done * 4 < len(slots) and done < len(slots)):
            return state, slots
        going = [k for k, i in enumerate(slots) if i is not None]
        if feed is not None:
            feed[:] = [feed[k] for k in going]
        return self._keep(state, list(range(len(slots))), going), [slots[k] for k in going]

    def _constrain(
        self,
        logits: torch.Tensor,
        live: Sequence[tuple[int, int]],
        grammars: Sequence[TokenGrammar | None],
        states: Sequence[int],
        outputs: Sequence[Sequence[int]],
        budgets: Sequence[int],
    ) -> torch.Tensor:
        """Mask each grammar row's logits to the tokens its grammar allows in its budget.

        ``live`` pairs a state row with the request row it decodes.
        """
        rows = [(k, i) for k, i in live if grammars[i] is not None]
        if not rows:
            return logits
        out = logits.clone()
        vocab = logits.shape[-1]
        for k, i in rows:
            g = grammars[i]
            assert g is not None
            left = budgets[i] - len(outputs[i])
            allowed = g.mask(states[i], left, vocab, self._device)
            out[k] = out[k].masked_fill(~allowed, float("-inf"))
        return out

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

    def _near_ties(self, logits: torch.Tensor) -> list[bool]:
        """Per row: whether the two largest logits are within the invariance margin."""
        top = logits.topk(2, dim=-1).values
        return [bool(m) for m in (top[:, 0] - top[:, 1]) < self._margin]

    def _budget(self, e: _Encoded) -> int:
        return max(0, min(e.request.max_tokens, self._max_len - len(e.ids)))

    def _finished(self, e: _Encoded, tokens: list[int], budget: int) -> bool:
        stopped = tokens[-1] in self._eos and not e.request.ignore_eos
        return stopped or len(tokens) >= budget

    @staticmethod
    def _keep(state: _Rows, active: list[int], going: list[int]) -> _Rows:
        """Drop the rows that finished (``going`` indexes ``active``)."""
        if len(going) == len(active) or not going:
            return state
        index = state.next_pos.new_tensor(going)
        state.cache.batch_select_indices(index)
        return _Rows(state.cache, state.mask[index], state.next_pos[index], state.logits[index])

    def _step(self, state: _Rows, tokens: list[int]) -> None:
        """Feed one token per row; update ``state`` in place."""
        ids = self._tensor(tokens)[:, None]
        state.mask = _cat_columns(state.mask, ids.new_ones(ids.shape))
        logits = self._forward(ids, state.mask, state.next_pos[:, None], state.cache, keep=1)
        state.logits = logits[:, -1]
        state.next_pos = state.next_pos + 1

    def _picker(self, request: Request) -> Callable[[torch.Tensor], int]:
        """Return the token picker of a request: argmax, or seeded sampling when temperature > 0."""
        import torch

        if request.temperature <= 0:
            return lambda logits: int(torch.argmax(logits))  # ties: the lowest token id
        generator = torch.Generator(device=self._device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        temperature = request.temperature

        def sample(logits: torch.Tensor) -> int:
            probs = torch.softmax(logits / temperature, dim=-1)
            return int(torch.multinomial(probs, 1, generator=generator))

        return sample

    # ----------------------------------------------------------------- choices
    def _choose_chunk(self, rows: Sequence[_Encoded]) -> list[Response]:
        import torch

        with torch.inference_mode():
            state, cached = self._prefill(rows)
            scores = self._score_choices(rows, state)
            if len(rows) > 1 and self._margin > 0:
                for r, row_scores in enumerate(scores):
                    if _score_margin(row_scores) < self._margin:
                        scores[r] = self._canonical_scores(rows[r])
        return [self._choice_response(*a) for a in zip(rows, scores, cached, strict=True)]

    def _canonical_scores(self, e: _Encoded) -> list[float]:
        """Score ``e``'s choices on the canonical path: alone, whole prompt."""
        self.canonical_reruns += 1
        return self._score_choices([e], self._prefill([e])[0])[0]

    def _choice_response(self, e: _Encoded, scores: Sequence[float], cached: int) -> Response:
        """Answer with the best-scoring choice (the earliest one on a tie)."""
        choices = e.request.choices or ()
        best = choices[max(range(len(choices)), key=lambda j: (scores[j], -j))]
        n_out = len(self._choice_ids(best))
        return Response(best, prompt_tokens=len(e.ids), cached_tokens=cached, output_tokens=n_out)

    def _score_choices(self, rows: Sequence[_Encoded], state: _Rows) -> list[list[float]]:
        """Return ``log P(choice tokens + eos | prompt)`` for every choice of every row."""
        import torch

        pairs = [
            (r, list(self._choice_ids(c)))
            for r, e in enumerate(rows)
            for c in e.request.choices or ()
        ]
        row_of = self._tensor([r for r, _ in pairs])
        first = torch.log_softmax(state.logits, dim=-1)[row_of]
        ids, cmask = self._right_pad([toks for _, toks in pairs])
        state.cache.batch_select_indices(row_of)
        mask = _cat_columns(state.mask[row_of], cmask)
        pos = state.next_pos[row_of][:, None] + torch.arange(ids.shape[1], device=ids.device)
        logp = torch.log_softmax(self._forward(ids, mask, pos, state.cache, keep=0), dim=-1)
        flat = [_choice_logprob(first[n], logp[n], toks) for n, (_, toks) in enumerate(pairs)]
        return _regroup(flat, [len(e.request.choices or ()) for e in rows])

    def _right_pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = [list(s) + [self._pad] * (width - len(s)) for s in seqs]
        mask = [[1] * len(s) + [0] * (width - len(s)) for s in seqs]
        return self._tensor(ids), self._tensor(mask)


def _choice_logprob(first: torch.Tensor, logp: torch.Tensor, tokens: Sequence[int]) -> float:
    """Sum the log-probabilities of ``tokens``: the first from the prompt's last logits."""
    total = float(first[tokens[0]])
    for t in range(1, len(tokens)):
        total += float(logp[t - 1, tokens[t]])
    return total


def _score_margin(scores: Sequence[float]) -> float:
    """Best score minus the second best (infinite with one choice).

    >>> _score_margin([-1.0, -0.25, -3.0])
    0.75
    """
    if len(scores) < 2:
        return float("inf")
    best, second = sorted(scores, reverse=True)[:2]
    return best - second


def _regroup(flat: Sequence[float], sizes: Sequence[int]) -> list[list[float]]:
    out, at = [], 0
    for n in sizes:
        out.append(list(flat[at : at + n]))
        at += n
    return out


def _cat_columns(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Concatenate two (rows, columns) masks along the columns."""
    import torch

    return torch.cat([left.to(right.dtype), right], dim=-1)


ATTENTION = "llmsql_sdpa"
"""The attention this backend registers: transformers' SDPA, except one-token decode steps
of grouped-query models, which :func:`_decode_attention` computes without copying the KV."""


def _attention_implementation() -> str:
    """Register :data:`ATTENTION` with transformers (once) and return its name."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:

        def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                      **kwargs: Any) -> tuple[Any, None]:
            groups = getattr(module, "num_key_value_groups", 1)
            if query.shape[2] == 1 and groups > 1 and not kwargs.get("dropout"):
                return _decode_attention(query, key, value, attention_mask,
                                         kwargs.get("scaling")), None
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(ATTENTION, attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    return ATTENTION


def _decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """Attention of one new token per row over its KV, grouped-query heads kept grouped.

    transformers' SDPA path copies every key and value head ``groups`` times per layer and
    step when a mask is given (``repeat_kv``), and the CPU flash kernel is slow for a single
    query: in a profile of a 16-row decode step at 766 cached tokens, those two took 62% of
    the step. Here the query heads are viewed as (kv heads, groups) and multiplied with the
    cache as it is. Returns (rows, 1, heads, head dim), as transformers expects.
    """
    import torch

    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2))
    scores = scores * (scaling if scaling is not None else dim**-0.5)
    if mask is not None:
        last = mask[:, :, -1:, :]  # (rows, 1, 1, keys)
        if last.dtype == torch.bool:
            scores = scores.masked_fill(~last, float("-inf"))
        else:
            scores = scores + last
    probs = torch.softmax(scores.float(), dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (rows, kv heads, groups, dim)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous()


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
    if value is None:
        resolved = dtype if dtype != "auto" else ("float32" if device == "cpu" else "bfloat16")
        return INVARIANCE_MARGIN[resolved]
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


def _torch_dtype(name: str, device: str) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _eos_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """Stop tokens: the tokenizer's EOS first, then any from the generation config."""
    ids: list[int] = []
    configured: Any = getattr(model.generation_config, "eos_token_id", None)
    extra = configured if isinstance(configured, list) else [configured]
    for tok in [tokenizer.eos_token_id, *extra]:
        if isinstance(tok, int) and tok not in ids:
            ids.append(tok)
    return ids


def _pad_id(tokenizer: PreTrainedTokenizerBase, eos: list[int]) -> int:
    pad = tokenizer.pad_token_id
    if isinstance(pad, int):
        return pad
    return eos[0] if eos else 0


def _model_id(path: pathlib.Path) -> str:
    """``transformers:<path>:<hash>``, hashing config.json and the weight files' names and sizes."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return f"transformers:{path}:{digest.hexdigest()[:16]}"
