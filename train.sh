#!/usr/bin/env bash
# The 3-GPU recipe: two training ranks on GPUs 0 and 1, the Whisper worker (large-v3) on GPU 2,
# the seed's settings (llasa-1b preset). Extra arguments pass through and override the preset:
#   bash train.sh --data my_korean.jsonl --val-data my_val.jsonl --language ko --steps 500
set -euo pipefail
cd "$(dirname "$0")"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0,1,2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
exec torchrun --standalone --nproc_per_node=2 grpo.py \
    --preset llasa-1b --whisper-device cuda:2 --out runs/llasa-1b "$@"
