"""The co-serving token rule (after FlexLLM): inference tokens first, fine-tuning fills the rest.

Pure arithmetic, no torch: FlexLLM's ``prepare_next_fwd_batch`` takes the running decode and
prefill tokens, then gives the training sequence ``min(tokens_left_in_sample,
max_fwd_finetuning_tokens_per_batch, max_tokens_per_batch - active_tokens)`` tokens.
"""

from __future__ import annotations

from llmsql.errors import ConfigError


def plan_iteration(
    inference_tokens: int, token_budget: int, pending_forward_tokens: int,
    max_finetune_tokens: int,
) -> int:
    """How many fine-tuning forward tokens one co-serving iteration runs.

    Args:
        inference_tokens: Tokens the iteration's inference part takes (decode plus prefill).
        token_budget: The iteration's token budget (``max_tokens_per_batch``).
        pending_forward_tokens: Tokens of the training sequence not yet forwarded.
        max_finetune_tokens: The cap on fine-tuning tokens per iteration.

    Returns:
        ``min(pending, cap, budget - inference)``, never below 0 (inference over budget
        leaves nothing).

    Raises:
        ConfigError: an argument is negative, or the budget is 0.

    >>> plan_iteration(100, 256, 1000, 128)  # the cap binds
    128
    >>> plan_iteration(200, 256, 1000, 128)  # what inference leaves binds
    56
    >>> plan_iteration(10, 256, 7, 128)  # the end of the sample binds
    7
    >>> plan_iteration(300, 256, 1000, 128)  # inference over budget: no fine-tuning
    0
    >>> plan_iteration(0, 256, 0, 128)  # nothing left to forward
    0
    """
    values = {"inference_tokens": inference_tokens, "token_budget": token_budget,
              "pending_forward_tokens": pending_forward_tokens,
              "max_finetune_tokens": max_finetune_tokens}
    for name, value in values.items():
        if value < 0:
            msg = (f"{name} = {value} is negative in plan_iteration; pass a token count "
                   ">= 0")
            raise ConfigError(msg)
    if token_budget == 0:
        msg = "token_budget = 0 in plan_iteration leaves no room for any token; pass >= 1"
        raise ConfigError(msg)
    return max(0, min(pending_forward_tokens, max_finetune_tokens,
                      token_budget - inference_tokens))
