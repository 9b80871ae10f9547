"""Rule: within the prefix groups, send rows whose predicted experts overlap in the same step.

With expert offload (``expert_cache``) a mixture-of-experts model computes each engine step
with the union of its rows' experts; a step whose rows route alike needs fewer experts, so
fewer are copied to the GPU and more of them stay cached over the step's decode steps. This
rule predicts each row's experts from the routing table ``llmsql moe-profile`` stores with the
model (:mod:`llmsql.moe.affinity`: the table's experts for the last
:data:`~llmsql.moe.affinity.SIGNATURE_TOKENS` tokens of the prompt) and chains the rows of each
prefix group greedily (:func:`~llmsql.moe.affinity.order_rows`); it then cuts the send order
into batches of the engine's step size (the transformers backend's ``batch_size``), since the
engine sorts each batch it gets by token ids: only which rows share a step is the rule's.

It applies only to calls on a model with expert offload options and a stored routing table,
and only where the cost model says a step can use few of a layer's experts
(:func:`~llmsql.moe.affinity.ordering_pays`: free-text answers, a per-expert plan, small
steps) and the table predicts at least :data:`~llmsql.moe.affinity.MIN_PREDICTED_SAVING`
fewer experts per step; otherwise the order is left as it is, with a note saying why (no
note without expert offload). bench/results/moe_row_order.md measures what it does to the
expert cache.

Invariant: the multiset of prompts and every prompt's text are unchanged, so are the answers;
the prefix groups (runs of prompts sharing the same whole lines with their neighbours,
:func:`flat_groups`) stay contiguous and in order, and the whole-line prefix each prompt shares
with the one before it never shrinks in total (checked: else the order is kept). Assumes
``reorder_prompts`` ran first; ``warm_prefixes`` keeps these batch bounds on the transformers
backend (it shares a batch's prefixes itself), and ``batch_by_length`` only subdivides them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from llmsql.moe.affinity import (
    MIN_PREDICTED_SAVING,
    SIGNATURE_TOKENS,
    ExpertRouting,
    load_table,
    order_rows,
    signature,
    step_cost,
    table_path,
)
from llmsql.optimizer.prefix_groups import lcp

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from llmsql.backends.base import BackendSpec
    from llmsql.optimizer.context import RuleContext
    from llmsql.plan import PromptBatch

CHARS_PER_TOKEN_MAX = 8
"""Characters read from a prompt's end per signature token (tokens are rarely longer)."""
_MEMO: dict[tuple[str, int], ExpertRouting | None] = {}
_MEMO_SIZE = 8


def expert_order(batch: PromptBatch, ctx: RuleContext, /) -> PromptBatch:
    """Order each prefix group's rows by predicted experts, in steps of the engine's size."""
    routing = ctx.experts(batch.call.options.model) if ctx.experts is not None else None
    order = batch.send_order()
    if routing is None or not ctx.reorder or len(order) < 2:
        return batch
    why = _why_not(batch, ctx, routing)
    if why is not None:
        return _noted(batch, f"rows keep the prefix-group order ({why})")
    batch = batch.with_rendered()
    prompts = [batch.prompt(i) for i in order]
    sigs = _signatures(prompts, routing)
    groups, step, n = flat_groups(prompts), routing.step_rows, len(order)
    chosen = order_rows(groups, sigs, batch_size=step)
    if chosen == list(range(n)):
        return _noted(batch, f"the prefix-group order is kept (no order within its "
                      f"{len(groups)} prefix group(s) gives batches of {step} fewer predicted "
                      "experts)")
    if _shared_lines(prompts, chosen) < _shared_lines(prompts, range(n)):
        return _noted(batch, "the prefix-group order is kept (reordering would share fewer "
                      "prompt lines between neighbours)")
    steps = -(-n // step)
    before, after = step_cost(range(n), sigs, step), step_cost(chosen, sigs, step)
    if after > (1 - MIN_PREDICTED_SAVING) * before:
        return _noted(batch, f"the prefix-group order is kept (batches of {step} would need "
                      f"{1 - after / before:.0%} fewer predicted experts, under the "
                      f"{MIN_PREDICTED_SAVING:.0%} that could pay for moving rows)")
    moved = sum(1 for k, p in enumerate(chosen) if k != p)
    batch = _noted(batch, f"{moved} of {n} prompts moved within {len(groups)} prefix group(s),"
                   f" {steps} batch(es) of {step}: predicted experts per batch "
                   f"{before / steps:.0f} -> {after / steps:.0f} "
                   f"({routing.pays(_answer_tokens(batch, ctx))[1]})")
    return dataclasses.replace(batch, order=tuple(order[p] for p in chosen),
                               batches=tuple(range(0, n, step)))


def _noted(batch: PromptBatch, note: str) -> PromptBatch:
    return dataclasses.replace(batch, notes=(*batch.notes, f"expert_order: {note}"))


def _signatures(prompts: Sequence[str], routing: ExpertRouting) -> list[int]:
    """Each prompt's predicted experts: the table's for its last tokens."""
    table, tokenize = routing.table, routing.tokenize
    assert table is not None  # (_why_not checked)
    assert tokenize is not None
    chars = SIGNATURE_TOKENS * CHARS_PER_TOKEN_MAX
    return [signature(table, list(tokenize(p[-chars:]))[-SIGNATURE_TOKENS:]) for p in prompts]


def _answer_tokens(batch: PromptBatch, ctx: RuleContext) -> int:
    """Tokens the call decodes per row (0 for constrained choices: scored, not decoded)."""
    spec = batch.call.kind.spec
    if spec.constraints(batch.call.options, ctx.capabilities).choices:
        return 0
    return batch.call.options.max_tokens or spec.default_max_tokens


def _why_not(batch: PromptBatch, ctx: RuleContext, routing: ExpertRouting) -> str | None:
    """Why the rule leaves this call's order alone (None: it orders it)."""
    if routing.table is None or routing.tokenize is None:
        return f"no routing table at {routing.table_file}: run llmsql moe-profile"
    pays, why = routing.pays(_answer_tokens(batch, ctx))
    return None if pays else why


def _line_share(a: str, b: str) -> int:
    """Characters of the whole lines ``a`` and ``b`` share at their start."""
    return a.rfind("\n", 0, lcp(a, b)) + 1


def flat_groups(prompts: Sequence[str]) -> list[list[int]]:
    """Positions of ``prompts`` cut into runs within which every prompt shares the same whole
    lines with the one before it: a prompt joins the previous one's run when the lines they
    share are at least as many as either neighbour pair shares (so no deeper group is split).
    Within a run of a sorted order, any order keeps each prompt's shared lines.

    >>> flat_groups(["Q\\na\\nx\\n", "Q\\na\\ny\\n", "Q\\nb\\nx\\n", "Q\\nb\\ny\\n", "Q\\nc\\n"])
    [[0, 1], [2, 3], [4]]
    """
    shares = [_line_share(prompts[k - 1], prompts[k]) for k in range(1, len(prompts))]
    groups: list[list[int]] = [[0]] if prompts else []
    for k in range(1, len(prompts)):
        here = shares[k - 1]
        before = shares[k - 2] if k >= 2 else -1
        after = shares[k] if k < len(shares) else -1
        if here >= before and here >= after:
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


def _shared_lines(prompts: Sequence[str], order: Sequence[int]) -> int:
    """Whole-line characters each prompt shares with the one before it, summed."""
    seq = list(order)
    return sum(_line_share(prompts[a], prompts[b]) for a, b in zip(seq, seq[1:], strict=False))


@dataclasses.dataclass(frozen=True, slots=True)
class SpecRouting:
    """The rule context's ``experts`` lookup for a session's backend spec (picklable: Spark
    tasks carry it, and the workers read the model's files themselves).
    """

    spec: BackendSpec

    def __call__(self, model: str | None, /) -> ExpertRouting | None:
        """:func:`expert_routing` of the spec for ``model`` (None: the spec's own)."""
        spec = self.spec if model is None else dataclasses.replace(self.spec, model=model)
        return expert_routing(spec)


def expert_routing(spec: BackendSpec) -> ExpertRouting | None:
    """What ``expert_order`` knows of ``spec``'s model: None without expert offload options
    or when the model is not on disk; else its shape, cache and step size, and its routing
    table when ``llmsql moe-profile`` stored one (remembered per spec and table file).

    Raises:
        ConfigError: bad MoE options, or an unreadable routing table.
    """
    from llmsql.backends.moe_glue import (
        batch_rows,
        model_shape,
        moe_backend_options,
        predictor_accuracy,
        shape_dtype,
    )
    from llmsql.models import local_model_folder
    from llmsql.moe.options import profile_path
    from llmsql.moe.plan import slots_for

    options = dict(spec.options)
    moe = moe_backend_options(spec.kind, options)
    folder = local_model_folder(spec.model) if moe is not None else None
    if moe is None or folder is None:
        return None
    profile = profile_path(moe, folder)
    assert profile is not None  # a folder is given
    file = table_path(profile)
    key = (repr(spec), file.stat().st_mtime_ns if file.is_file() else 0)
    if key in _MEMO:
        return _MEMO[key]
    shape = model_shape(folder, moe, dtype=shape_dtype(options))
    table = load_table(file) if file.is_file() else None
    routing = ExpertRouting(
        shape, slots_for(shape, moe.expert_cache), batch_rows(options), table, str(file),
        tokenize=_tokenizer(spec.model) if table is not None else None, plan=moe.plan,
        accuracy=predictor_accuracy(folder, moe)[0], lookahead=moe.lookahead)
    if len(_MEMO) >= _MEMO_SIZE:
        _MEMO.pop(next(iter(_MEMO)))
    _MEMO[key] = routing
    return routing


def _tokenizer(model: str | None) -> Callable[[str], list[int]] | None:
    """The model's bare-text tokenizer (None when its tokenizer is not on disk)."""
    from llmsql.tokens import PromptTokenizer

    counter = PromptTokenizer.load(model, chat_template=False)
    return counter.text_ids if counter is not None else None
