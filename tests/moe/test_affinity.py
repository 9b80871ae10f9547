"""Row order by predicted experts (llmsql.moe.affinity, no torch): signatures from a routing
table, the greedy chain that keeps prefix groups contiguous, the table file, and when the cost
model says ordering can pay."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from llmsql.errors import ConfigError
from llmsql.moe.affinity import (
    RoutingTable,
    load_table,
    order_rows,
    ordering_pays,
    save_table,
    signature,
    step_cost,
    table_path,
)
from llmsql.moe.plan import MoEShape

TABLE = RoutingTable(layers=(1, 3), num_experts=8, top_k=2,
                     experts={10: ((0, 1), (2, 3)), 11: ((6, 7), (4, 5)), 12: ((0, 7), (2, 5))},
                     model="tiny", tokens_seen=99)
OLMOE = MoEShape(moe_layers=16, experts=64, top_k=8, hidden=2048, intermediate=1024)


def _groups(rng: random.Random, n: int) -> list[list[int]]:
    cuts = sorted(rng.sample(range(1, n), rng.randint(0, min(4, n - 1))))
    edges = [0, *cuts, n]
    return [list(range(a, b)) for a, b in itertools.pairwise(edges)]


@pytest.mark.parametrize("seed", range(20))
def test_order_is_a_permutation_keeping_groups_contiguous_and_in_order(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    groups = _groups(rng, n) if n > 1 else [[0]]
    sigs = [rng.getrandbits(24) for _ in range(n)]
    out = order_rows(groups, sigs, batch_size=rng.randint(1, 6), window=rng.randint(1, 8))
    assert sorted(out) == list(range(n))
    pos = 0
    for group in groups:  # each group occupies the next len(group) positions
        assert sorted(out[pos:pos + len(group)]) == group
        pos += len(group)


def test_rows_that_route_alike_share_a_step() -> None:
    a, b = 0b0011, 0b1100
    sigs = [a, b, a, b, a, b, a, b]
    out = order_rows([list(range(8))], sigs, batch_size=4)
    assert {sigs[r] for r in out[:4]} == {a} and {sigs[r] for r in out[4:]} == {b}
    assert step_cost(out, sigs, 4) == 4 < step_cost(range(8), sigs, 4) == 8
    # a group boundary is kept: rows cannot move across it
    assert order_rows([[0, 1], [2, 3, 4, 5, 6, 7]], sigs, batch_size=2)[:2] in ([0, 1], [1, 0])


def test_one_row_per_step_keeps_the_input_order() -> None:
    # a step of one row needs that row's experts whatever the order: nothing to gain
    sigs = [0b0001, 0b0010, 0b0001, 0b0011]
    assert order_rows([[0, 1, 2, 3]], sigs, batch_size=1) == [0, 1, 2, 3]
    assert order_rows([[0, 1, 2, 3]], sigs, batch_size=2) == [0, 2, 3, 1]


@pytest.mark.parametrize("seed", range(30))
def test_never_more_predicted_experts_per_step_than_the_input_order(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(2, 7)
    groups = _groups(rng, n)
    sigs = [rng.getrandbits(6) for _ in range(n)]
    size = rng.randint(1, 3)
    given = [r for g in groups for r in g]
    out = order_rows(groups, sigs, batch_size=size, window=rng.randint(1, 4))
    assert step_cost(out, sigs, size) <= step_cost(given, sigs, size)
    # and never below the best order that keeps the groups (brute force)
    best = min(step_cost([r for part in parts for r in part], sigs, size)
               for parts in itertools.product(*(itertools.permutations(g) for g in groups)))
    assert step_cost(out, sigs, size) >= best


def test_signature_bits_are_layer_position_times_experts_plus_expert() -> None:
    assert signature(TABLE, [10]) == sum(1 << b for b in (0, 1, 8 + 2, 8 + 3))
    assert signature(TABLE, [10, 10, 999]) == signature(TABLE, [10])  # unknown: nothing
    assert signature(TABLE, []) == 0
    assert (signature(TABLE, [10]) & signature(TABLE, [11])) == 0
    assert (signature(TABLE, [10]) & signature(TABLE, [12])).bit_count() == 2


def test_table_round_trips_next_to_the_predictor(tmp_path: Path) -> None:
    path = table_path(tmp_path / "llmsql_moe" / "predictor.pt")
    assert path.name == "predictor.routing.json"
    save_table(TABLE, path)
    back = load_table(path)
    assert back == TABLE and dict(back.experts) == dict(TABLE.experts)


@pytest.mark.parametrize(("content", "message"), [
    (None, "unreadable (FileNotFoundError"),
    ("{not json", "unreadable (JSONDecodeError"),
    ('{"format": "something-else"}', "not a routing table"),
    ('{"format": "llmsql-routing-table", "version": 99}', "format version 99, not 1"),
    ('{"format": "llmsql-routing-table", "version": 1, "layers": [0]}', "malformed content"),
    ('{"format": "llmsql-routing-table", "version": 1, "layers": [0], "num_experts": 2, '
     '"top_k": 1, "experts": {"5": [[7]]}}', "malformed content"),
])
def test_unusable_table_files_are_config_errors(tmp_path: Path, content: str | None,
                                                message: str) -> None:
    path = tmp_path / "predictor.routing.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match="cannot load the routing table") as err:
        load_table(path)
    assert message in str(err.value)
    assert "llmsql moe-profile" in str(err.value)


def test_table_json_is_what_the_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    save_table(TABLE, path)
    data = json.loads(path.read_text())
    assert data["format"] == "llmsql-routing-table" and data["version"] == 1
    assert data["experts"]["11"] == [[6, 7], [4, 5]]


def test_ordering_pays_only_for_decoding_small_steps_with_a_per_expert_plan() -> None:
    ok, why = ordering_pays(OLMOE, slots=410, step_rows=4, answer_tokens=32, plan="lru")
    assert ok and why.startswith("plan lru at 4 rows per step")
    assert not ordering_pays(OLMOE, slots=410, step_rows=4, answer_tokens=0)[0]
    assert "scored choices" in ordering_pays(OLMOE, slots=410, step_rows=4, answer_tokens=0)[1]
    assert "at most 2 token(s)" in ordering_pays(OLMOE, slots=410, step_rows=4,
                                                 answer_tokens=2)[1]
    assert ordering_pays(OLMOE, slots=1024, step_rows=4, answer_tokens=32) == (
        False, "every expert fits on the GPU")
    assert ordering_pays(OLMOE, slots=410, step_rows=4, answer_tokens=32,
                         plan="layer_sweep")[1].startswith("layer_sweep streams every expert")
    ok, why = ordering_pays(OLMOE, slots=410, step_rows=16, answer_tokens=32, plan="lru")
    assert not ok and "88% of each layer's experts" in why
