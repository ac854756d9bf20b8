#!/usr/bin/env bash
# One check of moelpr's training on the GPU at hand, printed as one table (docs/benchmarks.md §7): the device and
# its compute capability, torch.compile's graph breaks, host syncs per training step, a tiny training whose loss
# falls, the MoE block against the loop reference and transformers' grouped-mm experts (eager and compiled), the
# training step against dense fine-tuning, and the peak memory against docs/scaling.md's plan.
#
#   bash bench/gpu_check.sh           # one GPU: under 8 minutes (parts that would not fit the budget are skipped)
#   bash bench/gpu_check.sh --cpu     # every part that runs without a GPU, at toy sizes
#
# Any other argument goes to bench/gpu_check.py (--budget SECONDS, --train-steps N). PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 "${PYTHON:-python}" bench/gpu_check.py "$@"
