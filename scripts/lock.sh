#!/usr/bin/env bash
# Refresh constraints.txt on purpose: install the newest versions pyproject.toml allows in a
# fresh virtual environment, run the whole default suite there, and only if it passes write
# the environment's versions as the new lock. Review the diff before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
freeze=$(mktemp)
LLMSQL_FREEZE="$freeze" bash scripts/test_versions.sh latest "$@"
{
  echo "# The tested set of versions (a lock): the README's install and test commands install with"
  echo "# pip -c constraints.txt. Refresh it deliberately with scripts/lock.sh (fresh venv, newest"
  echo "# versions, full suite) and commit the result. Python 3.11, x86_64, CPU."
  grep -v '^#' "$freeze" | sort -f
} > constraints.txt
rm -f "$freeze"
git --no-pager diff --stat constraints.txt
