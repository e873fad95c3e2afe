#!/usr/bin/env bash
# GPU readiness figures (issue #11): bf16 LoRA MFU on a llama3_2_1b-shaped model, h2o vs full
# decode tok/s and peak memory at 8k and 32k (SDPA flash), an FSDP smoke run and a QLoRA smoke
# run, on one GPU in <= 8 minutes. Without CUDA it prints what it would measure and exits 0.
# CI never runs it.
#   scripts/gpu_check.sh                       # everything
#   scripts/gpu_check.sh --sections decode --lengths 8192
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
# 470 s: the 8-minute bound with room for the interpreter to start and the report to print.
exec timeout --signal=INT --kill-after=10 470 "$PYTHON" scripts/gpu_check.py "$@"
