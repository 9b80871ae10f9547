"""Worker profiles: the row-cost fit, JSON round trips and the atomic store."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llmsql.errors import ConfigError
from llmsql.placement import (
    FORMAT_VERSION,
    LayerProfile,
    Link,
    ProfileStore,
    RowCost,
    WorkerProfile,
    fit_row_cost,
)


def _profile(kind: str = "local", machine: str = "host-a", a: float = 0.2) -> WorkerProfile:
    layers = LayerProfile((0.001, 0.002, 0.0015), 0.0007, 576 * 2)
    return WorkerProfile(
        kind, "HuggingFaceTB/SmolLM2-135M-Instruct", machine, RowCost(a, 0.0012, 0.031), layers, 4
    )


def test_fit_recovers_a_noisy_linear_model() -> None:
    rng = random.Random(7)
    truth = RowCost(0.15, 0.0009, 0.027)
    samples = []
    for _ in range(200):
        p, o = rng.randint(10, 2000), rng.randint(1, 200)
        samples.append((p, o, truth.seconds(p, o) * rng.uniform(0.98, 1.02)))
    fit = fit_row_cost(samples)
    assert fit.a == pytest.approx(truth.a, abs=0.05)
    assert fit.b == pytest.approx(truth.b, rel=0.05)
    assert fit.c == pytest.approx(truth.c, rel=0.05)


def test_fit_drops_a_term_the_samples_do_not_vary() -> None:
    fit = fit_row_cost([(100, 8, 1.1), (200, 8, 1.2), (400, 8, 1.4)])
    assert fit.c == 0.0
    assert fit.b == pytest.approx(0.001)
    assert fit.seconds(300, 8) == pytest.approx(1.3)


def test_fit_rejects_no_samples_and_negative_values() -> None:
    with pytest.raises(ConfigError, match="no samples"):
        fit_row_cost([])
    with pytest.raises(ConfigError, match="negative"):
        fit_row_cost([(10, 1, -1.0)])


def test_seconds_is_never_negative() -> None:
    assert RowCost(-5.0, 0.0, 0.0).seconds(1, 1) == 0.0


def test_link_and_layers() -> None:
    link = Link(bandwidth=1e9, latency=0.002)
    assert link.transfer_seconds(5e8, messages=3) == pytest.approx(0.506)
    layers = LayerProfile((0.001, 0.002, 0.003), 0.004, 1024)
    assert layers.num_layers == 3
    assert layers.seconds_for(1, 3, tokens=100) == pytest.approx(0.5)
    assert layers.seconds_for(0, 0, tokens=100, head=True) == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="bandwidth"):
        Link(0.0, 0.0)
    with pytest.raises(ConfigError, match="at least one layer"):
        LayerProfile((), 0.0, 10)
    with pytest.raises(ConfigError, match="non-negative"):
        LayerProfile((0.1, -0.1), 0.0, 10)
    with pytest.raises(ConfigError, match="concurrency"):
        WorkerProfile("gpu", "m", "h", RowCost(0, 0, 0), None, 0)


def test_json_round_trip_and_version() -> None:
    profile = _profile()
    text = profile.to_json()
    assert json.loads(text)["format"] == FORMAT_VERSION
    assert WorkerProfile.from_json(text) == profile
    no_layers = WorkerProfile("gpu", "m", "h", RowCost(1.0, 0.0, 0.0))
    assert WorkerProfile.from_json(no_layers.to_json()) == no_layers
    body = json.loads(text)
    body["format"] = 99
    with pytest.raises(ConfigError, match="format 99"):
        WorkerProfile.from_json(json.dumps(body))
    with pytest.raises(ConfigError, match="not valid"):
        WorkerProfile.from_json("{not json")
    del body["row_cost"]
    body["format"] = FORMAT_VERSION
    with pytest.raises(ConfigError, match="not valid"):
        WorkerProfile.from_json(json.dumps(body))


def test_store_saves_gets_and_replaces(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "profiles")
    assert store.get("local", "HuggingFaceTB/SmolLM2-135M-Instruct", "host-a") is None
    assert store.all() == ()
    first = _profile()
    path = store.save(first)
    assert path.parent == tmp_path / "profiles"
    assert store.get("local", first.model_id, "host-a") == first
    other = _profile(kind="gpu", machine="host-b")
    store.save(other)
    newer = _profile(a=0.9)
    assert store.save(newer) == path
    assert store.get("local", first.model_id, "host-a") == newer
    assert store.get("gpu", first.model_id, "host-b") == other
    assert store.get("gpu", first.model_id, "host-a") is None
    assert sorted(p.kind for p in store.all()) == ["gpu", "local"]
    # no temp files left behind
    assert [p.name for p in (tmp_path / "profiles").iterdir() if p.name.startswith(".tmp")] == []


def test_store_keys_do_not_collide_after_sanitising(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path)
    a = WorkerProfile("local", "org/model", "h", RowCost(1.0, 0.0, 0.0))
    b = WorkerProfile("local", "org_model", "h", RowCost(2.0, 0.0, 0.0))
    store.save(a)
    store.save(b)
    assert store.get("local", "org/model", "h") == a
    assert store.get("local", "org_model", "h") == b
