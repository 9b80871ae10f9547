"""The batched runner: prompts in, greedy/sampled tokens or choice scores out.

How :meth:`Engine.run` computes a batch of :class:`Job` (token ids, not text: the caller
tokenizes):

1. Jobs are split into free generation and constrained choice, each sorted by token ids
   (so prompts sharing a prefix sit together) and cut into chunks of ``batch_size`` (choice
   jobs: ``2 * batch_size`` choices).
2. Inside a chunk, :func:`~llmsql.engine.prefix.plan_prefix_groups` splits the sorted
   prompts into contiguous groups that share a token prefix. Each group's prefix runs through
   the model **once** (all groups of the chunk in one padded forward pass); its KV cache is
   then copied to every member, and only the members' suffixes are computed ("middle
   padding": a row holds ``[pad | group prefix | pad | suffix]``; the attention mask hides
   the pads and explicit position ids keep every real token at its unpadded position, so the
   numbers are those of an unbatched run up to floating-point rounding).
3. Generation decodes all rows of the chunk together (greedy, or sampling with a per-job
   seeded generator), dropping rows from the KV cache once a quarter of them finished
   ("compaction"). Constrained choice scores every choice (:mod:`llmsql.engine.choices`).

**Batch invariance.** Batched runs differ from an unbatched run by floating-point rounding
only (float32: at most about 1e-4 in a logit, measured), which can flip a decision only where
two candidates are nearly tied. So every greedy decision (each decoded token's top-2 logit
margin, and the best-minus-second score of constrained choice) is checked against
``margin``: a decision inside it is not trusted, and that job is run again on the
*canonical path*: alone, the whole prompt in one forward pass (no padding, no shared prefix),
then one token at a time. A job whose every decision cleared the margin has the canonical
path's answer too, because rounding cannot move a logit by half the margin; so every answer
is the canonical one, a function of the prompt alone. Ties on the canonical path go to the
lowest token id, or the earliest choice. Sampling (temperature > 0) is not covered: a seeded
sample is reproducible for the same batch only.

``cached_tokens``: a group prefix of ``P`` tokens is computed once and reused by the other
``k - 1`` members of its group of ``k``; those members report ``P`` and the member that comes
first in the input (lowest :attr:`Job.index`), which paid for the prefix, reports 0. Nothing
is cached across ``run`` calls.

A job with a ``grammar`` decodes under it: each step masks the tokens the grammar does not
allow with the tokens left in the job's budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from llmsql.engine.choices import score_choices, score_margin
from llmsql.engine.prefix import cached_counts, chunks, plan_prefix_groups
from llmsql.engine.state import Rows, cat_columns, left_pad, long_tensor
from llmsql.engine.timing import StepTimer

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from transformers import DynamicCache, PreTrainedModel

    from llmsql.engine.prefix import PrefixGroup
    from llmsql.engine.timing import StepTime

DEFAULT_BATCH_SIZE = 16

INVARIANCE_MARGIN = {"float32": 0.002, "bfloat16": 0.5, "float16": 0.5}
"""Default margin (in logits) below which a greedy decision is re-decided on the canonical
path, by compute type. Batch-dependent rounding measured on the embedded model in float32 is
at most 7e-5 on prefill (64-row vs one-row prefill of 64 W1-style prompts) and 9.2e-5 over
512 decode steps (16 W1 prompts, 32 tokens each, batch of 16 vs alone, teacher-forced): half
the margin is 10 times that. 0.02 (the first default) re-answered about 6% of 32-token answers
alone, which doubled the time of free-text calls; at 0.002 no step of those 512 was inside
the margin. 16-bit types round about 1,000 times coarser."""


class Grammar(Protocol):
    """A token automaton that constrains decoding (:class:`llmsql.backends.grammar.TokenGrammar`
    is one).
    """

    initial: int

    def mask(self, state: int, left: int, vocab: int, device: str) -> torch.Tensor:
        """Boolean (vocab,) tensor of the tokens allowed at ``state`` with ``left`` to go."""
        ...

    def next_state(self, state: int, token: int) -> int | None:
        """The state after ``token`` (None: a stop token, or a token not allowed)."""
        ...

    def is_done(self, state: int) -> bool:
        """Whether the answer must end at ``state``."""
        ...


@dataclass(frozen=True, slots=True)
class Job:
    """One prompt to run, as token ids, and how to answer it."""

    index: int
    """The job's position in the caller's batch: breaks sorting ties and says who pays
    for a shared prefix (the lowest index)."""
    ids: tuple[int, ...]
    budget: int = 0
    """Tokens that may be generated (free generation; unused for choices)."""
    temperature: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    """Do not stop at a stop token: generate exactly ``budget`` tokens."""
    grammar: Grammar | None = None
    choices: tuple[tuple[int, ...], ...] = ()
    """Constrained choice: each choice's token ids (its stop token included); empty: free
    generation."""


@dataclass(frozen=True, slots=True)
class Generated:
    """The tokens generated for a free-generation :class:`Job`."""

    tokens: tuple[int, ...]
    """The stop token included, when the job stopped on one."""
    stopped: bool
    """Whether the last token is a stop token that ended the answer."""
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class Scored:
    """The choice scores of a constrained-choice :class:`Job`."""

    scores: tuple[float, ...]
    """``log P(choice tokens | prompt)`` per choice, in choice order."""
    cached_tokens: int


class Engine:
    """Runs batches of :class:`Job` on one causal LM (see the module docstring).

    Attributes:
        model: The transformers causal LM (seams in :mod:`llmsql.engine` may have changed
            its modules).
        timer: A :class:`~llmsql.engine.timing.StepTimer` recording every forward pass, or
            None (default: nothing is measured).
        canonical_reruns: Jobs answered again on the canonical path (a decision was nearly
            tied).
        after_pass: Called with each forward pass's :class:`~llmsql.engine.timing.StepTime`
            right after the pass, in the thread that ran it (under
            ``torch.inference_mode()``), or None. Setting it times every pass (as ``timer``
            does). The co-serving loop (:mod:`llmsql.engine.finetune.coserve`) runs
            fine-tuning pieces from it.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        /,
        *,
        eos: Sequence[int],
        pad: int,
        device: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        margin: float = 0.0,
        timer: StepTimer | None = None,
    ) -> None:
        """Run ``model`` (on ``device``: default, where its parameters are).

        Args:
            model: A causal LM in eval mode.
            eos: Stop tokens; the first also ends every choice.
            pad: The token that fills padding (never attended to).
            device: The device the model runs on.
            batch_size: Rows per chunk.
            margin: The invariance margin in logits (0: no guard).
            timer: Records every forward pass when given.
        """
        self.model = model
        self.eos = tuple(eos)
        self.pad = pad
        self.device = device if device is not None else str(next(model.parameters()).device)
        self.batch_size = batch_size
        self.margin = margin
        self.timer = timer
        self.canonical_reruns = 0
        self.after_pass: Callable[[StepTime], None] | None = None

    # ---------------------------------------------------------------- the batch
    def run(self, jobs: Sequence[Job], /) -> list[Generated | Scored]:
        """Answer every job; one result per job, in the order of ``jobs``."""
        out: list[Generated | Scored | None] = [None] * len(jobs)
        order = sorted(range(len(jobs)), key=lambda k: (jobs[k].ids, jobs[k].index))
        free = [k for k in order if not jobs[k].choices]
        choice = [k for k in order if jobs[k].choices]
        for chunk in chunks(free, lambda k: 1, self.batch_size):
            _store(chunk, self.generate_chunk([jobs[k] for k in chunk]), out)
        pair_budget = 2 * self.batch_size
        for chunk in chunks(choice, lambda k: len(jobs[k].choices), pair_budget):
            _store(chunk, self.score_chunk([jobs[k] for k in chunk]), out)
        assert all(r is not None for r in out), "every job must get a result"
        return [r for r in out if r is not None]

    def generate_chunk(self, rows: Sequence[Job]) -> list[Generated]:
        """Generate for ``rows`` (sorted by ids, ideally) as one batch."""
        with torch.inference_mode():
            state, cached = self.prefill(rows)
            tokens, unsure = self.decode(rows, state, guard=len(rows) > 1)
            for r in unsure:
                tokens[r] = self._canonical_tokens(rows[r])
        return [
            Generated(tuple(t), self._stopped(job, t), c)
            for job, t, c in zip(rows, tokens, cached, strict=True)
        ]

    def score_chunk(self, rows: Sequence[Job]) -> list[Scored]:
        """Score the choices of ``rows`` (sorted by ids, ideally) as one batch."""
        with torch.inference_mode():
            state, cached = self.prefill(rows)
            scores = score_choices(self._forward, state, [j.choices for j in rows], self.pad)
            if len(rows) > 1 and self.margin > 0:
                for r, row_scores in enumerate(scores):
                    if score_margin(row_scores) < self.margin:
                        scores[r] = self._canonical_scores(rows[r])
        return [Scored(tuple(s), c) for s, c in zip(scores, cached, strict=True)]

    def _canonical_tokens(self, job: Job) -> list[int]:
        """Decode ``job`` on the canonical path: alone, whole prompt, one token at a time."""
        self.canonical_reruns += 1
        state, _ = self.prefill([job])
        return self.decode([job], state, guard=False)[0][0]

    def _canonical_scores(self, job: Job) -> list[float]:
        """Score ``job``'s choices on the canonical path: alone, whole prompt."""
        self.canonical_reruns += 1
        state = self.prefill([job])[0]
        return score_choices(self._forward, state, [job.choices], self.pad)[0]

    def _stopped(self, job: Job, tokens: Sequence[int]) -> bool:
        return bool(tokens) and tokens[-1] in self.eos and not job.ignore_eos

    # ------------------------------------------------------------------ forward
    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        cache: DynamicCache,
        keep: int,
        kind: str,
    ) -> torch.Tensor:
        """Run the model on ``ids`` after ``cache``; return float32 logits of the last ``keep``.

        ``kind`` labels the pass for the step timer (:data:`llmsql.engine.timing.KINDS`).
        """
        hook = self.after_pass
        if self.timer is None and hook is None:
            return self._call(ids, mask, pos, cache, keep)
        timer = self.timer if self.timer is not None else StepTimer()
        with timer.step(kind, mask[:, -ids.shape[1] :], mask):
            logits = self._call(ids, mask, pos, cache, keep)
        if hook is not None:
            hook(timer.steps[-1])
        return logits

    def _call(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: DynamicCache,
        keep: int,
    ) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        )
        logits: torch.Tensor = out.logits
        return logits.float()

    # ------------------------------------------------------------------ prefill
    def prefill(self, rows: Sequence[Job]) -> tuple[Rows, list[int]]:
        """Run the rows' prompts, each group prefix once; return the state and cached counts."""
        groups = plan_prefix_groups([j.ids for j in rows])
        prefix_lens = [g.prefix_len for g in groups for _ in range(g.start, g.stop)]
        cache, prefix_mask = self._prefix_cache(rows, groups)
        suffixes = [j.ids[p:] for j, p in zip(rows, prefix_lens, strict=True)]
        ids, smask = left_pad(suffixes, self.pad, self.device)
        starts = long_tensor(prefix_lens, self.device)
        pos = (starts[:, None] + smask.cumsum(-1) - 1).clamp(min=0)
        mask = cat_columns(prefix_mask, smask)
        logits = self._forward(ids, mask, pos, cache, 1, "prefill")[:, -1]
        next_pos = starts + smask.sum(-1)
        return Rows(cache, mask, next_pos, logits), cached_counts([j.index for j in rows], groups)

    def _prefix_cache(
        self, rows: Sequence[Job], groups: Sequence[PrefixGroup]
    ) -> tuple[DynamicCache, torch.Tensor]:
        """Compute each shared group prefix once; copy its KV to every member row.

        Rows without a shared prefix borrow any group's KV row with an all-zero mask, so the
        borrowed keys are never attended to.
        """
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        shared = [g for g in groups if g.prefix_len > 0]
        if not shared:
            return cache, long_tensor([[] for _ in rows], self.device)
        ids, gmask = left_pad([rows[g.start].ids[: g.prefix_len] for g in shared], self.pad,
                              self.device)
        self._forward(ids, gmask, (gmask.cumsum(-1) - 1).clamp(min=0), cache, 1, "prefix")
        source = [0] * len(rows)
        for k, g in enumerate(shared):
            source[g.start : g.stop] = [k] * (g.stop - g.start)
        index = long_tensor(source, self.device)
        cache.batch_select_indices(index)
        has_prefix = long_tensor(
            [g.prefix_len > 0 for g in groups for _ in range(g.start, g.stop)], self.device
        )
        return cache, gmask[index] * has_prefix[:, None]

    # ------------------------------------------------------------------- decode
    def decode(
        self, rows: Sequence[Job], state: Rows, *, guard: bool
    ) -> tuple[list[list[int]], list[int]]:
        """Generate for every row; return each row's tokens (stop token included).

        With ``guard``, a greedy row whose top-2 logits come within the invariance margin
        stops there and is listed in the second return value (its tokens are then partial):
        the caller answers it on the canonical path.
        """
        # one loop over every live row per step: splitting it would pass eight parallel
        # per-row lists around
        budgets = [j.budget for j in rows]
        pickers = [self._picker(j) for j in rows]
        greedy = [j.temperature <= 0 for j in rows]
        guarded = [guard and self.margin > 0 and g for g in greedy]
        grammars = [j.grammar for j in rows]
        gstate = [g.initial if g is not None else 0 for g in grammars]
        outputs: list[list[int]] = [[] for _ in rows]
        unsure: list[int] = []
        # slots[k]: the row that state row k decodes, or None once it finished. Finished
        # rows are dropped from the KV cache only when a quarter of the rows are done:
        # each drop copies the whole cache, which costs more than a few padded rows.
        slots: list[int | None] = [i if budgets[i] > 0 else None for i in range(len(rows))]
        state, slots = _compact(state, slots)
        while slots:
            live = [(k, i) for k, i in enumerate(slots) if i is not None]
            logits = self._constrain(state.logits, live, grammars, gstate, outputs, budgets)
            best = logits.argmax(-1).tolist() if any(greedy[i] for _, i in live) else []
            close = self._near_ties(logits) if any(guarded[i] for _, i in live) else None
            feed = [self.pad] * len(slots)
            for k, i in live:
                tok = best[k] if greedy[i] else pickers[i](logits[k])
                outputs[i].append(tok)
                feed[k] = tok
                finished = self._finished(rows[i], outputs[i])
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
            state, slots = _compact(state, slots, feed)
            if slots:
                self._step(state, feed)
        return outputs, sorted(unsure)

    def _constrain(
        self,
        logits: torch.Tensor,
        live: Sequence[tuple[int, int]],
        grammars: Sequence[Grammar | None],
        states: Sequence[int],
        outputs: Sequence[Sequence[int]],
        budgets: Sequence[int],
    ) -> torch.Tensor:
        """Mask each grammar row's logits to the tokens its grammar allows in its budget.

        ``live`` pairs a state row with the job row it decodes.
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
            allowed = g.mask(states[i], left, vocab, self.device)
            out[k] = out[k].masked_fill(~allowed, float("-inf"))
        return out

    def _near_ties(self, logits: torch.Tensor) -> list[bool]:
        """Per row: whether the two largest logits are within the invariance margin."""
        top = logits.topk(2, dim=-1).values
        return [bool(m) for m in (top[:, 0] - top[:, 1]) < self.margin]

    def _finished(self, job: Job, tokens: list[int]) -> bool:
        stopped = tokens[-1] in self.eos and not job.ignore_eos
        return stopped or len(tokens) >= job.budget

    def _step(self, state: Rows, tokens: list[int]) -> None:
        """Feed one token per row; update ``state`` in place."""
        ids = long_tensor(tokens, self.device)[:, None]
        state.mask = cat_columns(state.mask, ids.new_ones(ids.shape))
        logits = self._forward(ids, state.mask, state.next_pos[:, None], state.cache, 1, "decode")
        state.logits = logits[:, -1]
        state.next_pos = state.next_pos + 1

    def _picker(self, job: Job) -> Callable[[torch.Tensor], int]:
        """The token picker of a job: argmax, or seeded sampling when temperature > 0."""
        if job.temperature <= 0:
            return lambda logits: int(torch.argmax(logits))  # ties: the lowest token id
        generator = torch.Generator(device=self.device)
        if job.seed is None:
            generator.seed()
        else:
            generator.manual_seed(job.seed)
        temperature = job.temperature

        def sample(logits: torch.Tensor) -> int:
            probs = torch.softmax(logits / temperature, dim=-1)
            return int(torch.multinomial(probs, 1, generator=generator))

        return sample


def _compact(
    state: Rows, slots: list[int | None], feed: list[int] | None = None
) -> tuple[Rows, list[int | None]]:
    """Drop finished rows from ``state`` once they are a quarter of it (all: none left).

    ``feed`` (the next tokens, one per state row) is compacted alongside, in place.
    """
    done = sum(i is None for i in slots)
    if done == 0 or (done * 4 < len(slots) and done < len(slots)):
        return state, slots
    going = [k for k, i in enumerate(slots) if i is not None]
    if feed is not None:
        feed[:] = [feed[k] for k in going]
    return state.keep(going), [slots[k] for k in going]


def _store(
    positions: Sequence[int], results: Sequence[Generated | Scored],
    out: list[Generated | Scored | None],
) -> None:
    for k, r in zip(positions, results, strict=True):
        out[k] = r
