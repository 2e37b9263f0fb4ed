#!/usr/bin/env bash
# SimPO preference training of Llama-3-70B(-Instruct) with megasimpo, multi-node torchrun.
#
# Start it once per node (examples/README.md walks through the whole pipeline):
#   SLURM:    srun --nodes=8 --ntasks-per-node=1 --gpus-per-node=8 bash examples/simpo_llama70b.sh
#   by hand:  NNODES=8 NODE_RANK=<0..7> MASTER_ADDR=<node 0> bash examples/simpo_llama70b.sh
#   preview:  DRY_RUN=1 bash examples/simpo_llama70b.sh    # prints the plan and the command only
#
# Everything comes from the environment, with the defaults below. The parallel layout (TP, PP,
# VPP, CP, DP, micro-batches, recompute) is not set here: `megasimpo train` plans it from the
# checkpoint, the world size and the GPU memory, prints it and saves it to OUT/config.yaml.
# Override parts of it with EXTRA_ARGS, e.g. EXTRA_ARGS="--tp 8 --pp 4".
# LOSS=dpo trains DPO with a live reference model instead (that is all dpo_llama70b.sh does).
# LORA_RANK=16 trains LoRA adapters (alpha 2r) on the frozen base: one node is then enough
# (NNODES=1), and DPO's live reference is the same model with its adapters off.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"          # the interpreter with megasimpo installed (pip install -e .)
TORCHRUN="${TORCHRUN:-torchrun}"
LOSS="${LOSS:-simpo}"               # simpo | dpo | ipo | cpo | orpo | rdpo
REF="${REF:-live}"                  # reference for dpo/ipo/rdpo: live | precomputed

# ---- inputs, outputs, run length
CKPT="${CKPT:-/checkpoints/llama3-70b-instruct}"  # tools/convert_hf.py import --out CKPT
DATA="${DATA:-/data/ultrafeedback/train}"         # tools/preprocess_data.py --out PREFIX
EVAL_DATA="${EVAL_DATA-${DATA}_eval}"             # written by --split-eval; EVAL_DATA= to skip
OUT="${OUT:-/runs/${LOSS}-llama3-70b}"            # the same OUT again resumes from its checkpoint
SEQ_LENGTH="${SEQ_LENGTH:-2048}"                  # = preprocess_data.py --max-length
GLOBAL_BATCH_SIZE="${GLOBAL_BATCH_SIZE:-128}"     # pairs per optimizer step (SimPO's setting)
EPOCHS="${EPOCHS:-1}"
SAVE_INTERVAL="${SAVE_INTERVAL:-100}"             # resumable checkpoint every N steps
EVAL_INTERVAL="${EVAL_INTERVAL:-50}"
GPU_MEM_GB="${GPU_MEM_GB:-80}"                    # DRY_RUN plan only; train asks the GPU itself
LORA_RANK="${LORA_RANK:-0}"                       # > 0: LoRA of that rank (train and plan)
EXTRA_ARGS="${EXTRA_ARGS:-}"                      # more `megasimpo train` flags, word-split

# ---- the nodes of this job: SLURM's variables, else NNODES / NODE_RANK / MASTER_ADDR
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
NNODES="${NNODES:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-8}}}"  # 70B wants 8 x 8 H100
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${MASTER_ADDR:-}" ]]; then
  nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
  if [[ -z "$nodelist" ]]; then
    MASTER_ADDR=localhost  # fine for one node; more nodes need MASTER_ADDR (checked below)
  elif command -v scontrol >/dev/null 2>&1; then
    MASTER_ADDR="$(scontrol show hostnames "$nodelist" | head -n 1)"
  else  # no scontrol: first host of "a,b,c", or of "node[03-10,12]" -> node03
    first="${nodelist%%,*}"
    if [[ "$first" == *"["* ]]; then
      range="${first#*[}"; range="${range%%]*}"; range="${range%%-*}"
      first="${first%%[*}${range}"
    fi
    MASTER_ADDR="$first"
  fi
fi
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))

# ---- CUDA / NCCL environment
# One hardware work queue per GPU: Megatron issues its tensor/sequence-parallel communication
# kernels so that they overlap the GEMMs in launch order; more queues reorder them (and
# Megatron warns or asserts).
export CUDA_DEVICE_MAX_CONNECTIONS=1
# A failed or stuck collective aborts the process (torchrun then stops every rank) instead of
# hanging the whole job until its wall-clock limit; resume restarts from the last checkpoint.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Release NCCL's buffers as soon as a collective finishes rather than through the caching
# allocator's stream bookkeeping: lower peak memory.
export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
# NVLink SHARP (NVLS) on NVSwitch H100 nodes reserves extra GPU memory per communicator, which the
# planner's fixed overhead does not include; set 1 to trade that memory for faster TP reductions.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
# InfiniBand retry timeout 4.096 us x 2^22 ~ 17 s (NCCL's default 2^20 ~ 4 s): rides out
# transient fabric congestion on 64+ GPUs instead of failing the job.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# Keep InfiniBand/RoCE on (1 forces TCP sockets: only for debugging). Cluster-specific choices
# (NCCL_IB_HCA, NCCL_SOCKET_IFNAME for the bootstrap interface) are left to the job environment.
export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Activations of many sizes come and go every micro-batch: growable segments fragment less.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

# ---- the command
TRAIN=(-m megasimpo train --load "$CKPT" --data "$DATA" --out "$OUT" --loss "$LOSS"
       --seq-length "$SEQ_LENGTH" --global-batch-size "$GLOBAL_BATCH_SIZE" --epochs "$EPOCHS"
       --save-interval "$SAVE_INTERVAL")
if [[ -n "$EVAL_DATA" ]]; then
  TRAIN+=(--eval-data "$EVAL_DATA" --eval-interval "$EVAL_INTERVAL")
fi
REF_ARGS=()
case "$LOSS" in dpo|ipo|rdpo) REF_ARGS=(--ref "$REF") ;; esac
TRAIN+=(${REF_ARGS[@]+"${REF_ARGS[@]}"})
LORA_ARGS=()
if [[ "$LORA_RANK" != 0 ]]; then
  LORA_ARGS=(--lora-rank "$LORA_RANK")
fi
TRAIN+=(${LORA_ARGS[@]+"${LORA_ARGS[@]}"})
# shellcheck disable=SC2206  # EXTRA_ARGS is meant to be word-split into flags
TRAIN+=($EXTRA_ARGS)
CMD=($TORCHRUN --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "${TRAIN[@]}")

if [[ "${DRY_RUN:-0}" != "0" ]]; then
  if [[ -e "$CKPT" ]]; then
    MODEL=(--load "$CKPT")
  else
    MODEL=(--hf-config "$HERE/configs/llama3_70b.json")
    echo "# $CKPT does not exist: planning with the bundled Llama-3-70B config.json"
  fi
  PLAN=("$PYTHON" -m megasimpo plan "${MODEL[@]}" --gpus "$WORLD_SIZE"
        --gpus-per-node "$GPUS_PER_NODE" --gpu-mem-gb "$GPU_MEM_GB" --seq-length "$SEQ_LENGTH"
        --loss "$LOSS" --global-batch-size "$GLOBAL_BATCH_SIZE" ${REF_ARGS[@]+"${REF_ARGS[@]}"}
        ${LORA_ARGS[@]+"${LORA_ARGS[@]}"})
  echo "# plan for $NNODES node(s) x $GPUS_PER_NODE GPUs:"
  echo "$(printf '%q ' "${PLAN[@]}")"
  status=0
  "${PLAN[@]}" || status=$?
  echo
  echo "# DRY_RUN: would run on node $NODE_RANK of $NNODES (master $MASTER_ADDR:$MASTER_PORT):"
  echo "$(printf '%q ' "${CMD[@]}")"
  exit "$status"  # non-zero when the plan says the job cannot fit
fi

if [[ "$NNODES" -gt 1 && "$MASTER_ADDR" == localhost ]]; then
  echo "$(basename "$0"): error: NNODES=$NNODES but MASTER_ADDR is not set (and no SLURM job);" \
       "set MASTER_ADDR to node 0's address and NODE_RANK on every node" >&2
  exit 2
fi
exec "${CMD[@]}"
