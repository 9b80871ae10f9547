#!/usr/bin/env bash
# On a machine with PyPI access, from the repository root: stage everything the GPU run
# needs into git-ignored folders (about 61 MB, under one transfer's 64 MiB):
#   .stage    vLLM 0.26.0 bundle + Llama-3-8B-shaped config with the embedded tokenizer
#   .whl      duckdb and sqlglot wheels for the GPU image's Python 3.12
#   .gpudata  the workload slices (first N rows by key, plus a seed-0 shuffled copy)
set -euo pipefail
cd "$(dirname "$0")/../.."
TOK=$(python3 -c 'from llmsql.models import resolve_model; print(resolve_model(None))')
[ -f .stage/vllm_bundle.tar.xz ] || bash ../shared/gpu/stage_vllm.sh .stage "$TOK"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  duckdb==2.0.0 "sqlglot==$(python3 -c "import sqlglot; print(sqlglot.__version__)")" \
  lm-format-enforcer==0.11.3 interegular==0.3.3  # vLLM 0.26 imports lmformatenforcer when validating structured outputs
python3 bench/gpu/slices.py --out .gpudata "$@"
