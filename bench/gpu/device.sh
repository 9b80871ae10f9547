#!/usr/bin/env bash
# On the GPU machine (repository root): unpack the staged vLLM 0.26 bundle and llmsql's
# missing wheels (duckdb, sqlglot), then run bench/gpu/run_gpu.py with the given arguments.
# Needs .stage (../shared/gpu/stage_vllm.sh), .whl and .gpudata (bench/gpu/prepare.sh).
set -uo pipefail
S=/tmp/vsite
mkdir -p "$S" /tmp/site
tar -C "$S" -xJf .stage/vllm_bundle.tar.xz || exit 9
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 8
export PYTHONPATH="$S:/tmp/site:$PWD" VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 \
  DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/gpu/run_gpu.py "$@"
