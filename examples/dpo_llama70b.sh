#!/usr/bin/env bash
# DPO baseline for Llama-3-70B(-Instruct): the SimPO launcher with --loss dpo and a live, frozen
# reference model (a bf16 copy at the same layout; the planner budgets its memory).
#
# Same environment as simpo_llama70b.sh (CKPT, DATA, OUT, NNODES, NODE_RANK, MASTER_ADDR, ...,
# DRY_RUN=1 to print the plan and the command). REF=precomputed uses reference log-probs scored
# ahead by `python -m megasimpo score` (PREFIX.ref_logps.jsonl next to each dataset) instead.
set -euo pipefail

export LOSS=dpo
export REF="${REF:-live}"
export OUT="${OUT:-/runs/dpo-llama3-70b}"
exec bash "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/simpo_llama70b.sh" "$@"
