#!/usr/bin/env bash
# Run the tests against other versions than the lock, in a fresh virtual environment.
#   bash scripts/test_versions.sh latest   # newest versions pyproject.toml allows: whole suite
#   bash scripts/test_versions.sh oldest   # floors of the core dependencies (constraints-oldest.txt):
#                                          # result, DataFrame and session tests, no model
# Run by hand (not in CI); record the outcome in bench/results/versions.md.
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:?usage: scripts/test_versions.sh latest|oldest [pytest args]}
shift
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
# shellcheck disable=SC1091
. "$tmp/venv/bin/activate"
case "$which" in
  latest)
    LLMSQL_UNCONSTRAINED=1 bash scripts/test.sh "$@"
    pip freeze --exclude-editable > "${LLMSQL_FREEZE:-/dev/null}" ;;
  oldest)
    pip install --disable-pip-version-check -q --only-binary=:all: -c constraints-oldest.txt \
      -e . polars pytest pytest-timeout
    pip freeze --exclude-editable | grep -iE '^(duckdb|numpy|pandas|polars|pyarrow|sqlglot)=='
    python -m pytest -m "not model and not spark and not vllm" \
      tests/test_result.py tests/test_dataframe.py tests/test_session.py llmsql/frames.py "$@" ;;
  *) echo "usage: scripts/test_versions.sh latest|oldest" >&2; exit 2 ;;
esac
