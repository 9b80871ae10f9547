"""The learned expert predictor: it beats chance, the best fixed guess and the next-router
predictor on the real routing of a tiny MoE trained on ../shared/datasets text; it keeps the
Predictor contract; training is deterministic; stored predictors round-trip and bad files say
how to fix them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from llmsql.engine import from_config  # noqa: E402
from llmsql.engine.moe.learned import (  # noqa: E402
    LearnedPredictor,
    PredictorMetrics,
    evaluate_predictor,
    load_predictor,
    save_predictor,
    train_predictor,
)
from llmsql.engine.moe.predictors import routers_of  # noqa: E402
from llmsql.engine.moe.tiny import (  # noqa: E402
    BYTE_VOCAB_SIZE,
    lm_loss,
    read_texts,
    text_token_ids,
    tiny_moe_config,
    train_tiny_moe,
)
from llmsql.engine.moe.trace import RoutingTrace, record_routing  # noqa: E402
from llmsql.errors import ConfigError  # noqa: E402
from llmsql.moe.options import default_profile_path  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
SHARED = Path(os.environ.get("LLMSQL_SHARED", REPO.parent / "shared"))
REVIEWS = SHARED / "datasets" / "rotten_tomatoes_flatiron" / "reviews.parquet"


@pytest.fixture(scope="module")
def random_trace() -> RoutingTrace:
    """Routing of a tiny random OLMoE (4 MoE layers, 8 experts, top-2) on random ids."""
    torch.set_num_threads(1)
    model = from_config(tiny_moe_config(96, layers=4, hidden=32, intermediate=48), seed=0,
                        dtype="float32")
    ids = torch.randint(3, 96, (24, 40), generator=torch.Generator().manual_seed(0))
    return record_routing(model, [ids[:12], ids[12:]])


@pytest.fixture(scope="module")
def small(random_trace: RoutingTrace) -> tuple[LearnedPredictor, PredictorMetrics]:
    return train_predictor(random_trace, hidden_size=32, epochs=3, lookahead=2)


@pytest.fixture(scope="module")
def trained_moe() -> dict[str, Any]:
    """A 4-layer, 8-expert, top-2 OLMoE (hidden 64) trained 150 steps on Rotten Tomatoes
    reviews (byte-level), its routing recorded on 150 reviews it never saw (the predictor's
    training trace) and on 60 others (a separate evaluation trace)."""
    if not REVIEWS.is_file():
        pytest.skip(f"the shared datasets are absent ({REVIEWS}); set LLMSQL_SHARED to the "
                    "folder holding datasets/")
    torch.set_num_threads(1)
    train_texts = text_token_ids(read_texts(REVIEWS, "review", limit=3000))
    record = text_token_ids(read_texts(REVIEWS, "review", limit=150, skip=3000))
    held = text_token_ids(read_texts(REVIEWS, "review", limit=60, skip=3150))
    config = tiny_moe_config(BYTE_VOCAB_SIZE, layers=4, experts=8, top_k=2, hidden=64,
                             intermediate=128)
    model = train_tiny_moe(train_texts, config, steps=150, batch_rows=8, seq_len=64, seed=0)
    trace = record_routing(model, [record[i:i + 16] for i in range(0, len(record), 16)])
    return {"model": model, "trace": trace, "eval": record_routing(model, [held]),
            "held": held, "routers": routers_of(model, trace.layers)}


def test_the_learned_predictor_beats_chance_on_real_routing(trained_moe: dict[str, Any]) -> None:
    model, trace = trained_moe["model"], trained_moe["trace"]
    # training learned the text (a uniform byte guess is ln 257 = 5.55 nats)
    assert lm_loss(model, trained_moe["held"]) < 3.0
    predictor, fit = train_predictor(trace, hidden_size=128, epochs=15,
                                     routers=trained_moe["routers"])
    assert fit.heldout_tokens == round(trace.num_tokens * 0.1) > 1000
    measured = evaluate_predictor(predictor, trained_moe["eval"], routers=trained_moe["routers"])
    for name, m in (("held-out 10%", fit), ("separate reviews", measured)):
        for d in m.distances:
            print(f"{name} j={d.distance}: learned precision@k {d.precision:.3f} "
                  f"recall@2k {d.recall_2k:.3f} | next-router {d.next_router_precision:.3f} "
                  f"| best fixed {d.best_fixed_precision:.3f} | chance {m.chance:.3f}")
    one, two = measured.at(1), measured.at(2)
    assert measured.chance == 2 / 8
    # measured (seed 0): learned 0.95 / 0.94, next-router 0.76 / 0.66, best fixed 0.53 / 0.56,
    # chance 0.25: margins far beyond the noise of ~6,000 evaluated tokens (sd < 0.01)
    assert one.precision > measured.chance + 0.4
    assert one.precision > one.best_fixed_precision + 0.2  # it reads the hidden state
    assert one.next_router_precision is not None
    assert one.precision > one.next_router_precision + 0.05
    assert two.precision > two.best_fixed_precision + 0.2
    assert one.recall == one.precision and one.recall_2k >= one.precision
    assert fit.at(1).precision > fit.chance + 0.4
    # predict: expected tokens per expert, summing to about tokens x top_k
    layer, later = trace.layers[0], trace.layers[1]
    evaluated = trained_moe["eval"]
    scores = predictor.predict(layer, evaluated.hidden[layer], evaluated.routes[layer], 1)
    assert list(scores) == [later]
    expected = 2 * evaluated.num_tokens
    assert abs(float(scores[later].sum()) - expected) < 0.1 * expected


def test_predict_keeps_the_predictor_contract(
    random_trace: RoutingTrace, small: tuple[LearnedPredictor, PredictorMetrics]
) -> None:
    predictor, _ = small
    layers = random_trace.layers
    hidden = random_trace.hidden[layers[0]][:50]  # float16, as recorded
    routes = random_trace.routes[layers[0]][:50]
    out = predictor.predict(layers[0], hidden, routes, 2)
    assert list(out) == [layers[1], layers[2]]
    for scores in out.values():
        assert scores.shape == (8,) and scores.dtype == torch.float32
        assert bool((scores >= 0).all())
        # probabilities of each expert's use: about top_k experts per token
        assert 0.5 * 50 * 2 < float(scores.sum()) < 2.0 * 50 * 2
    bf16 = predictor.predict(layers[0], hidden.bfloat16(), routes, 2)  # any dtype in
    torch.testing.assert_close(bf16[layers[1]], out[layers[1]], atol=0.5, rtol=0.05)
    fewer = predictor.predict(layers[0], hidden, routes, 1)
    assert list(fewer) == [layers[1]]
    torch.testing.assert_close(fewer[layers[1]], out[layers[1]])
    assert list(predictor.predict(layers[0], hidden, routes, 9)) == [layers[1], layers[2]]
    assert list(predictor.predict(layers[-2], hidden, routes, 2)) == [layers[-1]]
    assert predictor.predict(layers[-1], hidden, routes, 2) == {}
    assert predictor.predict(99, hidden, routes, 2) == {}
    assert predictor.name == "learned" and not predictor.training


def test_training_is_deterministic_and_leaves_the_global_rng_alone(
    random_trace: RoutingTrace, small: tuple[LearnedPredictor, PredictorMetrics]
) -> None:
    state = torch.random.get_rng_state()
    again, metrics = train_predictor(random_trace, hidden_size=32, epochs=3, lookahead=2)
    assert torch.equal(state, torch.random.get_rng_state())
    first, first_metrics = small
    assert metrics == first_metrics
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    other, _ = train_predictor(random_trace, hidden_size=32, epochs=3, lookahead=2, seed=1)
    assert not torch.equal(other.state_dict()["nets.0.net.0.weight"],
                           first.state_dict()["nets.0.net.0.weight"])


def test_save_and_load_round_trip(
    random_trace: RoutingTrace, small: tuple[LearnedPredictor, PredictorMetrics],
    tmp_path: Path,
) -> None:
    predictor, metrics = small
    path = default_profile_path(tmp_path / "model")
    assert path == tmp_path / "model" / "llmsql_moe" / "predictor.pt"
    save_predictor(predictor, metrics, path)
    back, back_metrics = load_predictor(path)
    assert back_metrics == metrics and not back.training
    layer = random_trace.layers[0]
    hidden, routes = random_trace.hidden[layer], random_trace.routes[layer]
    expected = predictor.predict(layer, hidden, routes, 2)
    got = back.predict(layer, hidden, routes, 2)
    assert list(got) == list(expected)
    for key in got:
        torch.testing.assert_close(got[key], expected[key])
    shown = json.loads(path.with_suffix(".json").read_text())
    assert shown["metrics"]["distances"][0]["precision"] == metrics.at(1).precision
    assert shown["predictor"]["lookahead"] == 2


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated", "trace", "malformed"])
def test_bad_predictor_files_raise_config_error(
    case: str, random_trace: RoutingTrace, small: tuple[LearnedPredictor, PredictorMetrics],
    tmp_path: Path,
) -> None:
    path = tmp_path / "predictor.pt"
    if case != "missing":
        save_predictor(*small, path)
    if case == "garbage":
        path.write_text("not a predictor")
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif case == "trace":
        random_trace.save(path)
    elif case == "malformed":
        data = torch.load(path, weights_only=True)
        data["state_dict"].pop("nets.0.net.0.weight")
        torch.save(data, path)
    with pytest.raises(ConfigError) as info:
        load_predictor(path)
    assert str(path) in str(info.value) and "llmsql moe-profile" in str(info.value)


def test_evaluation_counts_overlaps_exactly() -> None:
    """On a hand-made trace: 4 tokens, 4 experts, top-1, layer 0's hidden states one-hot, the
    next-router weight the identity (token t -> expert t) and the true layer-1 routes
    0, 0, 0, 3: next-router precision 2/4, best fixed guess (expert 0) 3/4."""
    hidden = torch.eye(4, dtype=torch.float16)
    routes = torch.tensor([[0], [0], [0], [3]], dtype=torch.int32)
    trace = RoutingTrace((0, 1), 4, 1, {0: hidden, 1: hidden}, {0: routes, 1: routes})
    predictor, fit = train_predictor(trace, hidden_size=8, epochs=1, lookahead=3)
    assert (fit.train_tokens, fit.heldout_tokens) == (3, 1)
    metrics = evaluate_predictor(predictor, trace, routers={1: torch.eye(4)})
    assert metrics.train_tokens == 0 and metrics.heldout_tokens == 4
    assert [d.distance for d in metrics.distances] == [1]  # only one layer ahead exists
    d = metrics.at(1)
    assert (d.next_router_precision, d.best_fixed_precision) == (0.5, 0.75)
    assert d.precision in (0.0, 0.25, 0.5, 0.75, 1.0) and d.recall_2k >= d.precision
    assert evaluate_predictor(predictor, trace).at(1).next_router_precision is None
    one_layer = RoutingTrace((0,), 4, 1, {0: hidden}, {0: routes})
    with pytest.raises(ConfigError, match="at least 2"):
        train_predictor(one_layer)


def test_tiny_moe_training_is_deterministic_and_learns() -> None:
    torch.set_num_threads(1)
    texts = text_token_ids(["the cat sat on the mat. " * 8, "a dog ran in the park. " * 8])
    config = tiny_moe_config(BYTE_VOCAB_SIZE, layers=2, experts=4, hidden=32, intermediate=32)
    untrained = lm_loss(from_config(config, seed=0, dtype="float32"), texts, seq_len=32)
    one = train_tiny_moe(texts, config, steps=25, batch_rows=4, seq_len=32, seed=0)
    two = train_tiny_moe(texts, config, steps=25, batch_rows=4, seq_len=32, seed=0)
    assert not one.training
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert lm_loss(one, texts, seq_len=32) < untrained - 1.0


def test_tiny_configs_and_text_helpers(tmp_path: Path) -> None:
    mixtral = tiny_moe_config(300, family="mixtral", experts=4, top_k=1)
    assert (type(mixtral).__name__, mixtral.num_local_experts, mixtral.num_experts_per_tok) == (
        "MixtralConfig", 4, 1)
    assert type(tiny_moe_config(300)).__name__ == "OlmoeConfig"
    with pytest.raises(ConfigError, match="family"):
        tiny_moe_config(300, family="llama")
    with pytest.raises(ConfigError, match="top_k"):
        tiny_moe_config(300, experts=2, top_k=3)
    assert text_token_ids(["ab", "", "é"]) == [[97, 98], [195, 169]]
    with pytest.raises(ConfigError, match="fewer than seq_len"):
        train_tiny_moe([[1, 2, 3]], tiny_moe_config(BYTE_VOCAB_SIZE), steps=1)
    with pytest.raises(ConfigError, match="missing.parquet"):
        read_texts(tmp_path / "missing.parquet", "review")
