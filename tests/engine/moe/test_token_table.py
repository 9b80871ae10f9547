"""The routing table (engine/moe/token_table.py): traces keep their token ids (and older
traces without them still load), the table keeps each token's most frequent experts per layer,
and ``llmsql moe-profile`` stores it beside the predictor, where it reads back."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llmsql.engine import from_config  # noqa: E402
from llmsql.engine.moe.token_table import routing_table  # noqa: E402
from llmsql.engine.moe.trace import RoutingTrace, record_routing  # noqa: E402
from llmsql.errors import ConfigError  # noqa: E402
from llmsql.moe.affinity import load_table, signature, table_path  # noqa: E402
from tests.engine.conftest import mixtral_config  # noqa: E402

PROMPTS = [[5, 9, 14, 3, 7, 22, 40], [11, 12], [8, 30, 31, 32, 33], [60]]


def _trace(ids: list[int], routes: dict[int, list[list[int]]]) -> RoutingTrace:
    n = len(ids)
    hidden = {i: torch.zeros(n, 2, dtype=torch.float16) for i in routes}
    return RoutingTrace(tuple(routes), 4, 2, hidden,
                        {i: torch.tensor(r, dtype=torch.int32) for i, r in routes.items()},
                        token_ids=torch.tensor(ids, dtype=torch.int32))


def test_the_table_keeps_each_tokens_most_frequent_experts_per_layer() -> None:
    trace = _trace([7, 7, 7, 9], {0: [[0, 1], [1, 2], [1, 0], [3, 2]],
                                  2: [[3, 2], [3, 2], [0, 1], [0, 1]]})
    table = routing_table(trace)
    assert table.layers == (0, 2) and table.num_experts == 4 and table.top_k == 2
    assert table.experts[7] == ((1, 0), (2, 3))  # counts 3, 2 / ties 2-2: the lower first
    assert table.experts[9] == ((2, 3), (0, 1))
    assert list(routing_table(trace, max_tokens=1).experts) == [7]  # the most frequent


def test_a_trace_without_token_ids_loads_but_makes_no_table(tmp_path: Path) -> None:
    trace = _trace([1, 2], {0: [[0, 1], [2, 3]]})
    old = RoutingTrace(trace.layers, 4, 2, trace.hidden, trace.routes)  # as before ids
    old.save(tmp_path / "old.pt")
    back = RoutingTrace.load(tmp_path / "old.pt")
    assert back.token_ids is None
    with pytest.raises(ConfigError, match="no token ids"):
        routing_table(back)
    trace.save(tmp_path / "new.pt")
    assert RoutingTrace.load(tmp_path / "new.pt").token_ids.tolist() == [1, 2]


def test_recorded_token_ids_line_up_with_the_routes() -> None:
    model = from_config(mixtral_config(), seed=0, dtype="float32")
    trace = record_routing(model, [PROMPTS], max_tokens=10, seed=1)  # a subsample of 15
    assert trace.token_ids is not None and trace.token_ids.shape == (10,)
    assert set(trace.token_ids.tolist()) <= {t for p in PROMPTS for t in p}
    # each kept token's route is what the full recording gave that token
    full = record_routing(model, [PROMPTS])
    by_token = {int(t): full.routes[full.layers[0]][k].tolist()
                for k, t in enumerate(full.token_ids)}
    for k, t in enumerate(trace.token_ids.tolist()):
        assert trace.routes[trace.layers[0]][k].tolist() == by_token[t]


def test_moe_profile_stores_the_table_beside_the_predictor(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llmsql.engine.moe.learned", reason="the predictor trainer is missing")
    from llmsql.cli import main
    from tests.moe_fixtures import write_tiny_moe

    tiny = write_tiny_moe(tmp_path / "tiny-mixtral")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Review {i}: fine, I loved it" for i in range(6)))
    out = tmp_path / "profile" / "pred.pt"
    code = main(["moe-profile", "--model", str(tiny), "--prompts", str(prompts), "--out",
                 str(out), "--lookahead", "1"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    path = table_path(out)
    assert path == tmp_path / "profile" / "pred.routing.json" and str(path) in printed.out
    table = load_table(path)
    assert table.layers == (0, 1) and table.num_experts == 4 and table.top_k == 2
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tiny / "tokenizer.json")).encode(" loved").ids
    assert all(t in table.experts for t in ids)
    assert signature(table, ids).bit_count() >= 2  # two layers, top-2 each
