"""llmsql's own PyTorch engine: run a transformers causal LM on batches of token ids.

The ``transformers`` backend (:mod:`llmsql.backends.transformers`) is a thin facade over
this package: it parses options, tokenizes prompts (chat template) and maps requests and
responses; everything that runs the model lives here. Importing this package imports torch
and transformers, so nothing that ``import llmsql`` imports may import it (backends import it
inside functions).

Modules:

- :mod:`~llmsql.engine.model`: get a model: :func:`load_model` from a Hugging Face folder
  (with :func:`load_tokenizer`), or :func:`from_config` with random weights from a seed
  (benchmarks on real architectures); dtype, device and thread settings.
- :mod:`~llmsql.engine.runner`: :class:`Engine`, the batched prefill/decode loop:
  shared-prefix KV (each prefix group computed once, :mod:`~llmsql.engine.prefix`), slots
  and compaction of finished rows, grammar-constrained decoding, seeded sampling, and the
  batch-invariance guard (near-tied decisions re-run on the canonical path).
- :mod:`~llmsql.engine.choices`: constrained choice: ``log P(choice tokens + <eos> |
  prompt)`` for every choice, the best choice, and the choices' probabilities renormalized
  over the choices (what LLM_SCORE reads).
- :mod:`~llmsql.engine.attention`: the attention the engine registers (SDPA, with a
  copy-free grouped-query decode step).
- :mod:`~llmsql.engine.state`: a batch's decoding state and tensor helpers.

Seams (where the next features plug in; each is a plain function or object, tested on tiny
random-weight configs):

- **Expert modules** (:mod:`~llmsql.engine.experts`, for MoE expert offload):
  ``replace_experts(model, factory)`` swaps every layer's ``experts`` module (transformers
  v5's fused ``*Experts`` of Mixtral, Qwen2/3-MoE, OLMoE) for ``factory(name, module)``; the
  replacement is called as ``experts(hidden_states, top_k_index, top_k_weights)``, like the
  original, so an offloading cache with prefetching drops in. ``find_experts(model)`` lists
  them.
- **Adapters** (:mod:`~llmsql.engine.adapters`, for LoRA training co-served with queries):
  ``add_adapters(model, targets, factory)`` wraps the ``nn.Linear`` modules named in
  ``targets`` (e.g. ``("q_proj", "v_proj")``) as ``base(x) + adapter(x)``; ``lora(rank=,
  alpha=)`` builds zero-initialized LoRA adapters (outputs unchanged until trained), and
  ``adapter_parameters(model)`` is what an optimizer updates.
- **A range of layers** (:mod:`~llmsql.engine.layers`, for splitting a model across
  workers): ``run_layers(model, hidden, i, j, position_ids=, attention_mask=, cache=)`` runs
  decoder layers ``i..j-1`` on given hidden states; with ``embed(model, ids)`` and
  ``head(model, hidden)`` (final norm and LM head) the pieces compose to the full forward.
- **Split across processes** (:mod:`~llmsql.engine.split`, imported on its own):
  ``SplitGenerator(model, k, SplitServer(source))`` runs layers ``[0, k)`` here and the rest
  in a server process on 127.0.0.1, giving the unsplit model's greedy tokens.
- **Step times** (:mod:`~llmsql.engine.timing`, for a fitted cost model): set
  ``engine.timer = StepTimer()`` and every forward pass appends a ``StepTime`` (kind:
  prefix, prefill, decode or score; rows; new tokens ``Σl`` and ``Σl²``; context tokens
  ``ΣL_ctx``; seconds), the figures of the prefill ``A + B·Σl + C·Σl²`` and decode
  ``α + β·B + γ·ΣL_ctx`` models. ``engine.after_pass`` (a callable or None) is called
  with each pass's ``StepTime`` right after the pass, in the thread that ran it.
- **Fine-tuning co-served with inference** (:mod:`llmsql.engine.finetune`, imported on
  its own): ``attach_lora``, ``Trainer`` (AdamW on token sequences, in pieces, with
  atomic checkpoints and resume) and ``CoServer`` (trains in the background while no
  inference runs and, through ``after_pass``, fits a piece after each inference pass under
  the time-per-token objective).

A minimal run on random weights::

    from transformers import LlamaConfig
    from llmsql.engine import Engine, Job, from_config

    model = from_config(LlamaConfig(hidden_size=64, num_hidden_layers=2, ...), seed=0)
    engine = Engine(model, eos=[2], pad=0)
    (out,) = engine.run([Job(0, (1, 5, 9), budget=8)])
"""

from __future__ import annotations

from llmsql.engine.adapters import AdaptedLinear, LoRA, adapter_parameters, add_adapters, lora
from llmsql.engine.attention import ATTENTION, attention_implementation
from llmsql.engine.choices import best_choice, choice_probabilities, score_margin
from llmsql.engine.experts import find_experts, replace_experts
from llmsql.engine.layers import decoder, embed, head, num_layers, run_layers
from llmsql.engine.model import (
    DTYPES,
    from_config,
    load_model,
    load_tokenizer,
    pad_id,
    resolve_dtype,
    set_threads,
    stop_ids,
    torch_dtype,
)
from llmsql.engine.prefix import (
    MIN_SHARED_PREFIX,
    PrefixGroup,
    common_prefix_len,
    plan_prefix_groups,
)
from llmsql.engine.runner import (
    DEFAULT_BATCH_SIZE,
    INVARIANCE_MARGIN,
    Engine,
    Generated,
    Grammar,
    Job,
    Scored,
)
from llmsql.engine.timing import StepTime, StepTimer

__all__ = [
    "ATTENTION",
    "DEFAULT_BATCH_SIZE",
    "DTYPES",
    "INVARIANCE_MARGIN",
    "MIN_SHARED_PREFIX",
    "AdaptedLinear",
    "Engine",
    "Generated",
    "Grammar",
    "Job",
    "LoRA",
    "PrefixGroup",
    "Scored",
    "StepTime",
    "StepTimer",
    "adapter_parameters",
    "add_adapters",
    "attention_implementation",
    "best_choice",
    "choice_probabilities",
    "common_prefix_len",
    "decoder",
    "embed",
    "find_experts",
    "from_config",
    "head",
    "load_model",
    "load_tokenizer",
    "lora",
    "num_layers",
    "pad_id",
    "plan_prefix_groups",
    "replace_experts",
    "resolve_dtype",
    "run_layers",
    "score_margin",
    "set_threads",
    "stop_ids",
    "torch_dtype",
]
