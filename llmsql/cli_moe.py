"""The command line's expert offload parts (issue 15): the ``--expert-cache``, ``--moe-plan``,
``--predictor``, ``--lookahead`` and ``--moe-profile`` flags of ``run``, ``explain`` and
``serve``, and the ``llmsql moe-profile`` command.

``llmsql moe-profile --model DIR --sql "SELECT ..."`` renders the query's own LLM prompts (a
dry run: no model answers anything), tokenizes them as the transformers backend does (the
chat template), runs them through the model recording each MoE layer's routing
(:func:`llmsql.engine.moe.trace.record_routing`), trains the learned expert predictor on that
trace (:func:`llmsql.engine.moe.learned.train_predictor`), stores it next to the model
(``<model>/llmsql_moe/predictor.pt``, its measured figures in ``predictor.json``), where
``predictor='auto'`` finds it, and prints the held-out precision per lookahead distance. Beside
it goes the routing table the ``expert_order`` rule orders rows with
(``predictor.routing.json``, :mod:`llmsql.engine.moe.token_table`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmsql.errors import ConfigError
from llmsql.moe.affinity import table_path

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--expert-cache", "expert_cache", "transformers backend, a mixture-of-experts model: GPU "
     "memory for experts, bytes ('24GB') or a share of all experts ('0.4'); the rest stay in "
     "host memory"),
    ("--moe-plan", "moe_plan", "with --expert-cache: auto (default: the cost model picks per "
     "call), predictive, layer_sweep or lru"),
    ("--predictor", "predictor", "with --expert-cache: auto (default), learned, next_router "
     "or none"),
    ("--lookahead", "lookahead", "with --expert-cache: MoE layers the predictor prefetches "
     "ahead (default 2)"),
    ("--moe-profile", "moe_profile", "with --expert-cache: a routing profile file (default: "
     "the one llmsql moe-profile stored with the model)"),
)
"""(flag, backend option, help) of each expert offload flag."""

DEFAULT_ROWS = 500
BATCH_ROWS = 8
"""Prompts per forward pass while recording routing."""


def add_moe_flags(p: argparse.ArgumentParser) -> None:
    """Add the expert offload flags to a subcommand."""
    metavars = {"expert_cache": "SIZE", "moe_plan": "PLAN", "predictor": "NAME",
                "lookahead": "N", "moe_profile": "FILE"}
    for flag, dest, text in FLAGS:
        p.add_argument(flag, dest=dest, metavar=metavars[dest], help=text)


def moe_flag_options(args: argparse.Namespace) -> dict[str, Any]:
    """The backend options the expert offload flags give (only those given)."""
    out: dict[str, Any] = {}
    for _, dest, _ in FLAGS:
        value = getattr(args, dest, None)
        if value is not None:
            out[dest] = value
    return out


# ---- llmsql moe-profile ------------------------------------------------------------------


def add_profile_command(sub: Any) -> None:
    """The ``moe-profile`` subcommand's arguments."""
    p = sub.add_parser("moe-profile", help="record a mixture-of-experts model's routing on a "
                       "query's own prompts and train the expert predictor stored with it")
    p.add_argument("--model", required=True, help="the MoE model folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sql", help="the query whose LLM prompts to record (rendered by a dry "
                     "run: no model answers them)")
    src.add_argument("--prompts", metavar="FILE", help="prompts, one a line: JSON lines with "
                     "a 'prompt' key (as llmsql explain --prompts writes) or plain text")
    p.add_argument("--database", metavar="FILE", help="--sql: the DuckDB database it reads "
                   "(default: in memory)")
    p.add_argument("--table", "-t", action="append", default=[], metavar="NAME=PATH",
                   help="--sql: register a parquet/csv/json file as a table (repeatable)")
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="record at most this many "
                   f"distinct prompts (default {DEFAULT_ROWS})")
    p.add_argument("--lookahead", type=int, default=2, help="MoE layers ahead the predictor "
                   "learns to predict (default 2)")
    p.add_argument("--out", metavar="PATH", help="where to store the predictor (default: "
                   "MODEL/llmsql_moe/predictor.pt, found there by predictor='auto')")
    p.add_argument("--device", default="cpu", help="where the model runs while recording "
                   "(cpu or cuda; default cpu)")
    p.add_argument("--dtype", default="auto", help="the model's weight type while recording "
                   "(default: float32 on the CPU, bfloat16 on a GPU)")


def cmd_profile(args: argparse.Namespace) -> int:
    """Run ``llmsql moe-profile``."""
    from llmsql.models import model_max_len, resolve_model

    if args.rows < 1:
        msg = f"--rows {args.rows}: give a whole number of prompts >= 1"
        raise ConfigError(msg)
    folder = resolve_model(args.model)
    if not _is_moe(folder):  # before its weights load
        msg = (f"--model {args.model}: not a mixture-of-experts model (its config.json has no "
               "num_experts / num_local_experts); moe-profile records expert routing, so give "
               "a Mixtral, Qwen2/3-MoE or OLMoE model folder")
        raise ConfigError(msg)
    prompts = _query_prompts(args) if args.sql is not None else _file_prompts(args.prompts)
    prompts = list(dict.fromkeys(prompts))[: args.rows]
    if not prompts:
        msg = "no prompts to record: the query sends no LLM prompt (or the file is empty)"
        raise ConfigError(msg)
    trace, metrics, path = _profile(folder, prompts, args, model_max_len(folder))
    print(f"recorded routing of {trace.prompts} prompts ({trace.tokens_seen:,} tokens, "
          f"{trace.num_tokens:,} kept) over {len(trace.layers)} MoE layers of "
          f"{trace.num_experts} experts, top-{trace.top_k}")
    for line in metrics_lines(metrics):
        print(line)
    print(f"wrote {path}, {path.with_suffix('.json')} and {table_path(path)}")
    return 0


def _profile(folder: Path, prompts: Sequence[str], args: argparse.Namespace, max_len: int
             ) -> tuple[Any, Any, Path]:
    """Record, train and save; returns the trace, the metrics and the predictor's path."""
    from llmsql.backends.transformers import prompt_ids
    from llmsql.engine import load_model, load_tokenizer
    from llmsql.engine.moe import routers_of
    from llmsql.engine.moe.learned import save_predictor, train_predictor
    from llmsql.engine.moe.token_table import routing_table
    from llmsql.engine.moe.trace import record_routing
    from llmsql.moe.affinity import save_table
    from llmsql.moe.options import default_profile_path

    tokenizer = load_tokenizer(folder)
    ids = sorted((prompt_ids(tokenizer, p)[:max_len] for p in prompts), key=len)
    model = load_model(folder, device=args.device, dtype=args.dtype)
    batches = [ids[i:i + BATCH_ROWS] for i in range(0, len(ids), BATCH_ROWS)]
    trace = record_routing(model, batches)
    predictor, metrics = train_predictor(trace, lookahead=args.lookahead,
                                         routers=routers_of(model, trace.layers))
    path = Path(args.out).expanduser() if args.out else default_profile_path(folder)
    save_predictor(predictor, metrics, path)
    save_table(routing_table(trace), table_path(path))  # the expert_order rule's table
    return trace, metrics, path


def metrics_lines(metrics: Any) -> list[str]:
    """The measured figures per lookahead distance, as the command prints them."""
    lines = [f"held-out tokens {metrics.heldout_tokens:,} (trained on "
             f"{metrics.train_tokens:,}); chance precision {metrics.chance:.0%}"]
    for d in metrics.distances:
        nxt = ("" if d.next_router_precision is None
               else f", next-router {d.next_router_precision:.0%}")
        lines.append(f"  {d.distance} layer(s) ahead: precision {d.precision:.0%}, recall "
                     f"{d.recall:.0%}, recall at 2k {d.recall_2k:.0%} (best fixed experts "
                     f"{d.best_fixed_precision:.0%}{nxt})")
    return lines


def _is_moe(folder: Path) -> bool:
    from llmsql.backends.moe_glue import moe_shape

    try:
        moe_shape(folder)
    except ConfigError:
        return False
    return True


def _query_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts ``--sql`` sends, in send order, from a dry run on its database."""
    import llmsql

    with llmsql.connect(backend="transformers", model=args.model, dry_run=True,
                        database=args.database or ":memory:", cache=False,
                        progress=False) as con:
        for spec in args.table:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                msg = f"--table {spec!r} must look like NAME=PATH, e.g. reviews=data.parquet"
                raise ConfigError(msg)
            con.register(name, path)
        return list(con.explain(args.sql).prompts)


def _file_prompts(path: str) -> list[str]:
    """Prompts of a file: JSON lines with a ``prompt`` key, or one plain text a line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        msg = f"--prompts {path!r}: cannot read it ({exc.strerror}); give a readable file"
        raise ConfigError(msg) from None
    return [p for p in map(_prompt_of, lines) if p]


def _prompt_of(line: str) -> str:
    if line.lstrip().startswith("{"):
        try:
            data = json.loads(line)
        except ValueError:
            return line
        if isinstance(data, dict) and isinstance(data.get("prompt"), str):
            return str(data["prompt"])
    return line.strip()
