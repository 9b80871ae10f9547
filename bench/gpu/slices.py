#!/usr/bin/env python3
"""Cut the benchmark tables into the slices sent to the GPU machine (git-ignored folder).

Each slice holds the first N rows of the workload's table (by its key), plus a shuffled
copy (numpy.random.default_rng(0).permutation(N)), so the three configurations read the
same rows. Usage: python bench/gpu/slices.py --out .gpudata [--rows W1=5000 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import duckdb
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.gpu.workloads import TABLES

DEFAULT_ROWS = {"movie_reviews": 5000, "beer_reviews": 10000, "squad_dev": 5000,
                "movies_small": None}


def cut(datasets: Path, out: Path, rows: dict[str, int | None]) -> None:
    """Write ``<name>.parquet`` and ``<name>_shuffled.parquet`` for every table."""
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    for name, t in TABLES.items():
        n = rows.get(name, t.rows)
        src = (datasets / t.path).as_posix()
        order = f"ORDER BY {t.key}" if t.key else ""
        limit = f"LIMIT {n}" if n else ""
        table = con.sql(f"SELECT * FROM '{src}' {order} {limit}").to_arrow_table()
        perm = np.random.default_rng(0).permutation(table.num_rows)
        con.register("t", table)
        con.sql(f"COPY t TO '{out / (name + '.parquet')}' (FORMAT parquet, COMPRESSION zstd)")
        con.register("s", table.take(perm))
        con.sql(f"COPY s TO '{out / (name + '_shuffled.parquet')}' "
                "(FORMAT parquet, COMPRESSION zstd)")
        print(f"{name}: {table.num_rows} rows")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=str(REPO.parent / "shared" / "datasets"))
    ap.add_argument("--out", default=str(REPO / ".gpudata"))
    ap.add_argument("--rows", action="append", default=[], metavar="TABLE=N")
    a = ap.parse_args()
    rows: dict[str, int | None] = dict(DEFAULT_ROWS)
    for spec in a.rows:
        k, _, v = spec.partition("=")
        rows[k] = int(v) if v else None
    cut(Path(a.datasets), Path(a.out), rows)


if __name__ == "__main__":
    main()
