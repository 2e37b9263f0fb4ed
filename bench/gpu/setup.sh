#!/usr/bin/env bash
# On the GPU machine, in the repository root, after bench/gpu/fetch.sh here and the TE parts were
# staged under /tmp/te (docs/performance.md, "Running the benchmarks on a GPU"). Makes a venv on
# top of the machine's own packages (torch, transformers) in /tmp/venv, installs the carried
# wheels into it, joins and installs TE's core wheel, and builds TE's PyTorch extension from its
# sdist once per machine (time-boxed: TE_BUILD_TIMEOUT seconds, default 480). Without TE the
# benchmarks still run, on Megatron's local layer spec; the last lines say which.
# Use:  source bench/gpu/setup.sh   (puts the venv first on PATH for the commands that follow;
# idempotent: a second source on the same machine installs and builds nothing again)
VENV=/tmp/venv
if [ ! -x "$VENV/bin/python3" ]; then
    python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/python3" -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl
fi
export PATH="$VENV/bin:$PATH" PYTHONPATH="$PWD"
if [ -f /tmp/te/NAME ] && [ ! -f "$VENV/.te_tried" ]; then  # one attempt per machine
    touch "$VENV/.te_tried"
    wheel=/tmp/te/$(cat /tmp/te/NAME)
    cat /tmp/te/part-* > "$wheel"
    python3 -m pip install -q --no-index --no-deps --no-cache-dir "$wheel"
    start=$(date +%s)
    NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=16 timeout "${TE_BUILD_TIMEOUT:-480}" \
        python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        .whl/transformer_engine_torch-2.11.0.tar.gz
    echo "transformer_engine_torch build: rc=$? after $(( $(date +%s) - start )) s"
fi
python3 - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
try:
    import transformer_engine
    import transformer_engine.pytorch  # noqa: F401
    print("transformer_engine", transformer_engine.__version__)
except Exception as e:  # the benchmarks fall back to the local spec
    print("transformer_engine unavailable:", type(e).__name__, str(e)[:300])
import megatron.core, trl, datasets
print("megatron-core", megatron.core.__version__, "trl", trl.__version__, "datasets",
      datasets.__version__)
PYEOF
