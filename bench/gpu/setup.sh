#!/usr/bin/env bash
# On the GPU machine, in the repository root, after bench/gpu/fetch.sh here and the TE parts were
# staged under /tmp/te (docs/performance.md, "Running the benchmarks on a GPU"). Installs the
# carried wheels into /tmp/site, joins and installs TE's core wheel, and builds TE's PyTorch
# extension from its sdist (time-boxed: TE_BUILD_TIMEOUT seconds, default 480). Without TE the
# benchmarks still run, on Megatron's local layer spec; the log says which.
# Use:  source bench/gpu/setup.sh   (exports PYTHONPATH for the commands that follow)
SITE=/tmp/site
mkdir -p "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || return 1 2>/dev/null || exit 1
export PYTHONPATH="$SITE:$PWD"
if [ -f /tmp/te/NAME ] && [ ! -f "$SITE/.te_done" ]; then
    wheel=/tmp/te/$(cat /tmp/te/NAME)
    cat /tmp/te/part-* > "$wheel"
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --target "$SITE" "$wheel"
    start=$(date +%s)
    NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=16 timeout "${TE_BUILD_TIMEOUT:-480}" \
        python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
        --target "$SITE" .whl/transformer_engine_torch-2.11.0.tar.gz \
        && touch "$SITE/.te_done"
    echo "transformer_engine_torch build: rc=$? after $(( $(date +%s) - start )) s"
fi
python3 - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name())
try:
    import transformer_engine.pytorch as te  # noqa: F401
    import transformer_engine
    print("transformer_engine", transformer_engine.__version__)
except Exception as e:  # the benchmarks fall back to the local spec
    print("transformer_engine unavailable:", type(e).__name__, str(e)[:300])
import megatron.core, trl
print("megatron-core", megatron.core.__version__, "trl", trl.__version__)
PYEOF
