"""A fine-tuning step cut into token chunks (forward) and layer groups (backward), so that a
co-serving loop can interleave it with inference iterations (after FlexLLM).

:class:`ChunkedStep` holds one training sequence. ``forward_some(n)`` runs its next ``n``
tokens through every decoder layer, one layer at a time: each layer's input is a detached
tensor that requires grad, so each layer has its own autograd graph. Later chunks attend to
earlier chunks' keys and values through the model's KV cache (like chunked prefill), and the
cache keeps their graph, so a later chunk's loss reaches an earlier chunk's adapters. The
head (final norm, LM head, cross-entropy) runs per chunk right away and its logits are freed.
Once every token is forwarded, ``backward_some(k)`` runs the backward of the next ``k``
layers from the last one down: ``torch.autograd.backward`` of the layer's outputs (all
chunks) with the gradients that reached the next layer's inputs. LoRA gradients accumulate in
``.grad`` as one plain backward would put them there: the loss is the mean cross-entropy over
the sequence's labelled tokens, exactly transformers' causal-LM loss.

Memory: every layer's graph is kept until its backward (as much as a plain backward);
recomputing a layer's internals in its backward (FlexLLM's graph pruning) is left to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812

from llmsql.engine.layers import decoder, embed, head, layer_masks, layer_types, num_layers
from llmsql.errors import ConfigError, ExecutionError

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel

IGNORE = -100
"""The label of a token that counts for no loss (transformers' convention)."""


class ChunkedStep:
    """One training sequence's forward and backward, run a piece at a time.

    Args:
        model: A Llama-style causal LM (see :mod:`llmsql.engine.layers`) whose trainable
            parameters (e.g. from :func:`~llmsql.engine.finetune.attach_lora`) require grad.
        input_ids: The sequence's token ids, (tokens,) or (1, tokens).
        labels: Labels as for ``model(input_ids, labels=labels)`` (the token at ``t + 1``
            is what position ``t`` predicts; :data:`IGNORE` counts for nothing); default:
            ``input_ids``.

    Raises:
        ConfigError: more than one row, an empty sequence, labels of another shape, or no
            token with a label to predict.
    """

    def __init__(self, model: PreTrainedModel, input_ids: torch.Tensor,
                 labels: torch.Tensor | None = None) -> None:
        """Prepare the step; nothing runs yet."""
        from transformers import DynamicCache

        self.model = model
        self.ids = _one_row(input_ids)
        labels = self.ids if labels is None else _one_row(labels)
        if labels.shape != self.ids.shape:
            msg = (f"labels have shape {tuple(labels.shape)} but input_ids "
                   f"{tuple(self.ids.shape)} in ChunkedStep; pass one label per token")
            raise ConfigError(msg)
        self.targets = torch.full_like(labels, IGNORE)
        self.targets[:, :-1] = labels[:, 1:]
        self.labelled = int((self.targets != IGNORE).sum())
        if self.labelled == 0:
            msg = ("no token of the training sequence has a label to predict; give at "
                   "least one label other than -100 after the first token")
            raise ConfigError(msg)
        self.layers = num_layers(model)
        self._cache: DynamicCache | None = DynamicCache(config=model.config)
        # _inputs[l][c]: chunk c's detached input to layer l (l == layers: to the head);
        # _outputs[l][c]: its output of layer l, the root of that layer's graph
        self._inputs: list[list[torch.Tensor]] = [[] for _ in range(self.layers + 1)]
        self._outputs: list[list[torch.Tensor]] = [[] for _ in range(self.layers)]
        self.forwarded = 0
        self.next_backward = self.layers  # layers below this one still need their backward
        self.loss_sum = 0.0

    @property
    def tokens(self) -> int:
        """The sequence's length."""
        return int(self.ids.shape[1])

    @property
    def pending_forward_tokens(self) -> int:
        """Tokens not yet forwarded."""
        return self.tokens - self.forwarded

    @property
    def pending_backward_layers(self) -> int:
        """Layers whose backward has not run yet."""
        return self.next_backward

    @property
    def done(self) -> bool:
        """Whether the forward and the backward have both finished."""
        return self.pending_forward_tokens == 0 and self.next_backward == 0

    @property
    def loss(self) -> float:
        """The mean cross-entropy over the labelled tokens forwarded so far (the step's
        loss once every token is forwarded).
        """
        return self.loss_sum

    def forward_some(self, tokens: int, /) -> int:
        """Run the next ``tokens`` tokens (fewer at the end) through every layer and the
        head; returns how many ran.

        Raises:
            ConfigError: ``tokens`` < 0.
        """
        if tokens < 0:
            msg = f"forward_some({tokens}): pass a token count >= 0"
            raise ConfigError(msg)
        start, count = self.forwarded, min(tokens, self.pending_forward_tokens)
        if count == 0:
            return 0
        with torch.enable_grad():
            hidden = embed(self.model, self.ids[:, start:start + count])
            run = _LayerRunner(self.model, hidden, self._cache)
            for layer in range(self.layers):
                x = hidden.detach().requires_grad_(layer > 0)
                hidden = run(layer, x)
                self._inputs[layer].append(x)
                self._outputs[layer].append(hidden)
            self._head(hidden, self.targets[:, start:start + count])
        self.forwarded += count
        return count

    def _head(self, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        x = hidden.detach().requires_grad_(True)
        logits = head(self.model, x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                               targets.reshape(-1), ignore_index=IGNORE,
                               reduction="sum") / self.labelled
        if (targets != IGNORE).any():
            loss.backward()
            self.loss_sum += float(loss.detach())
        else:
            x.grad = torch.zeros_like(x)
        self._inputs[self.layers].append(x)

    def backward_some(self, layers: int, /) -> int:
        """Run the backward of the next ``layers`` layers (fewer at the bottom), from the
        last layer down; returns how many ran.

        Raises:
            ConfigError: ``layers`` < 0.
            ExecutionError: tokens are still waiting for their forward.
        """
        if layers < 0:
            msg = f"backward_some({layers}): pass a layer count >= 0"
            raise ConfigError(msg)
        if layers and self.next_backward and self.pending_forward_tokens:
            msg = (f"backward_some: {self.pending_forward_tokens} tokens still wait for "
                   "their forward; call forward_some until pending_forward_tokens is 0")
            raise ExecutionError(msg)
        ran = 0
        while ran < layers and self.next_backward > 0:
            layer = self.next_backward - 1
            grads = [x.grad for x in self._inputs[layer + 1]]
            torch.autograd.backward(self._outputs[layer], grads)
            self._inputs[layer + 1], self._outputs[layer] = [], []
            self.next_backward, ran = layer, ran + 1
        if self.next_backward == 0:
            self._inputs[0], self._cache = [], None
        return ran

    def run(self, *, chunk_tokens: int, layers_per_step: int) -> float:
        """Run the whole step: forward in chunks of ``chunk_tokens``, then backward
        ``layers_per_step`` layers at a time; returns the loss.

        Raises:
            ConfigError: a count below 1.
        """
        if chunk_tokens < 1 or layers_per_step < 1:
            msg = (f"chunk_tokens = {chunk_tokens}, layers_per_step = {layers_per_step} in "
                   "ChunkedStep.run; pass counts >= 1")
            raise ConfigError(msg)
        while self.pending_forward_tokens:
            self.forward_some(chunk_tokens)
        while self.pending_backward_layers:
            self.backward_some(layers_per_step)
        return self.loss


class _LayerRunner:
    """Runs one chunk through decoder layers one at a time, with the chunk's positions,
    attention masks and rotary embeddings computed once (what
    :func:`~llmsql.engine.layers.run_layers` computes per call): every layer's cache holds
    the same tokens before the chunk, so one set serves all layers. Saves a mask and a
    rotary computation per layer per piece, which dominate a short piece's CPU time.
    """

    def __init__(self, model: PreTrainedModel, hidden: torch.Tensor,
                 cache: DynamicCache | None) -> None:
        self.base = decoder(model)
        count = len(self.base.layers)
        past = cache.get_seq_length(0) if cache is not None else 0
        self.position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + past)[None]
        self.types = layer_types(model.config, count)
        self.masks = layer_masks(model, hidden, None, cache, self.position_ids, self.types, 0)
        self.rotary = self.base.rotary_emb(hidden, self.position_ids)
        self.cache = cache

    def __call__(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base.layers[layer](
            hidden, attention_mask=self.masks[self.types[layer]],
            position_embeddings=self.rotary, position_ids=self.position_ids,
            past_key_values=self.cache, use_cache=self.cache is not None,
        )
        return out


def _one_row(ids: torch.Tensor) -> torch.Tensor:
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:  # noqa: PLR2004
        msg = (f"a training sequence of shape {tuple(ids.shape)} in ChunkedStep; pass one "
               "non-empty row, (tokens,) or (1, tokens)")
        raise ConfigError(msg)
    return ids
