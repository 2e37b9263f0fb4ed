#!/usr/bin/env bash
# Run HERE (the CPU machine, which reaches PyPI), before any device call. Fills the git-ignored
# .whl/ with every wheel the GPU machine lacks, so that one run(carry=[".whl"]) call installs
# everything offline (bench/gpu/setup.sh) and no call builds anything there.
#
# The GPU image (/work/.library/device/KINDS.md) already has python3 3.12, torch 2.11+cu130,
# transformers, huggingface-hub, pandas, pyarrow, xxhash, fsspec, einops, onnx, onnxscript. It lacks
# megatron-core, Transformer Engine, trl, datasets (+ dill, multiprocess) and pydantic (TE needs it).
# Versions are the ones this repository's CPU venv tests with. accelerate and einops are on the
# image already; they are carried anyway (small) so the device does not depend on a reading of
# its package list.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# Prebuilt Transformer Engine wheels (sm_90 core + torch extension), where someone has built them:
# the directory MEGASIMPO_TE_WHEELS names (SHARED_WHEELS, its older name, still works). A user
# without such wheels installs TE itself instead (docs/performance.md, "Installing Transformer
# Engine"): pip install -e ".[te]", or an NGC PyTorch container.
SHARED=${MEGASIMPO_TE_WHEELS:-${SHARED_WHEELS:-}}
TE_WHEELS=(transformer_engine_cu13-2.11.0-py3-none-manylinux_2_28_x86_64.whl
           transformer_engine_torch-2.11.0-cp312-cp312-linux_x86_64.whl)
PINS=(megatron-core==0.16.1
      transformer-engine==2.11.0  # TE's Python part; TE's import checks this distribution is there
      trl==1.16.0 accelerate==1.15.0
      datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
      pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
      einops==0.8.2)

[ -n "$SHARED" ] || { echo "fetch.sh: set MEGASIMPO_TE_WHEELS to the directory holding" \
    "${TE_WHEELS[*]}" >&2; exit 1; }
for w in "${TE_WHEELS[@]}"; do
    [ -f "$SHARED/$w" ] || { echo "fetch.sh: $SHARED/$w missing (MEGASIMPO_TE_WHEELS=$SHARED)" >&2; exit 1; }
done
rm -rf .whl .te && mkdir -p .whl  # .te/: the old runbook's TE parts, never carried now
# Wheels only (no sdist is built anywhere), for the device's CPython 3.12 on x86-64 Linux.
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl "${PINS[@]}"
for w in "${TE_WHEELS[@]}"; do cp "$SHARED/$w" .whl/; done

ls -l .whl | awk 'NR > 1 {printf "  %7.2f MiB  %s\n", $5 / 1048576, $9}'
# The size check (working tree + .whl/ under the 64 MiB a call carries) and the rows' flags
bash bench/gpu/run_all.sh --dry-run
