#!/usr/bin/env bash
# Fetches, on a machine with package-registry access, what the GPU machine lacks (it has Python
# 3.12, torch 2.11+cu130, transformers, psutil; no megatron-core, TE, trl, datasets), into two
# git-ignored folders of the repository root that `run`'s `carry` takes along:
#   .whl/  pure-Python and cp312 wheels (~5 MB) plus the transformer_engine_torch sdist;
#   .te/   transformer-engine-cu13 (179 MB) split into 60 MB parts (one part per call: carry <= 64 MiB).
# Then follow docs/performance.md ("Running the benchmarks on a GPU").
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
FETCH=("$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12
       --implementation cp "${PLATFORMS[@]}")
rm -rf .whl .te && mkdir -p .whl .te
"${FETCH[@]}" -d .whl megatron-core==0.16.1 transformer-engine==2.11.0 trl==1.16.0 \
    datasets==5.2.0 dill==0.4.0 multiprocess==0.70.18
# The PyTorch extension of TE is only an sdist (28 C++ files, built there against torch 2.11).
"$PY" - <<'PYEOF'
import json, urllib.request
index = "https://pypi.org/simple/transformer-engine-torch/"
req = urllib.request.Request(index, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
files = json.load(urllib.request.urlopen(req))["files"]
name = "transformer_engine_torch-2.11.0.tar.gz"
url = next(f["url"] for f in files if f["filename"] == name)
urllib.request.urlretrieve(url, f".whl/{name}")
PYEOF
"${FETCH[@]}" -d .te transformer-engine-cu13==2.11.0
(cd .te && split -b 60M transformer_engine_cu13-*.whl part- && ls transformer_engine_cu13-*.whl > NAME \
    && rm transformer_engine_cu13-*.whl)
du -sh .whl .te/part-*
