#!/usr/bin/env bash
# The GPU recipe: N training ranks on GPUs 0..N-1 (NPROC, default 2), the Whisper worker (large-v3)
# on GPU N. The first argument may name a preset (llasa-1b, llasa-3b, llasa-8b; default llasa-1b);
# the rest pass through and override it:
#   bash train.sh --data my_korean.jsonl --val-data my_val.jsonl --language ko --steps 500
#   NPROC=4 bash train.sh llasa-8b --data my_korean.jsonl --language ko      # 5 GPUs in all
#   bash train.sh --data seedtts/en/meta.lst --language en --sim-guard       # voice prompts (rows with prompt_wav)
# On a preemptible cluster, re-queue the same command with --resume auto.
set -euo pipefail
cd "$(dirname "$0")"
PRESET=llasa-1b
if [[ $# -gt 0 && "$1" != -* ]]; then PRESET="$1"; shift; fi
NPROC="${NPROC:-2}"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 "$NPROC")}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
exec torchrun --standalone --nproc_per_node="$NPROC" grpo.py \
    --preset "$PRESET" --whisper-device "cuda:$NPROC" --out "runs/$PRESET" "$@"
