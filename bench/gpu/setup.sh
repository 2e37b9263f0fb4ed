#!/usr/bin/env bash
# Use, on the GPU machine in the repository root, with .whl/ carried (bench/gpu/fetch.sh made it):
#     source bench/gpu/setup.sh && bash bench/gpu/run_all.sh
# Installs the carried wheels into $MEGASIMPO_SITE (default /tmp/site) with pip --target, first on
# PYTHONPATH so they sit over the image's own packages. Not a venv: the image's python3 is itself
# a venv (/opt/torch/.venv), and a venv made from it would not see its torch. No network there,
# so --no-index --no-deps. Then checks that TE works (import + one bf16 te.Linear forward); if
# not, removes TE, because a TE core without a loadable torch extension makes `import
# megatron.core` raise FileNotFoundError, and the runs go on without TE (MEGASIMPO_TE_OK=0).
# Idempotent: a second source on the same machine installs and checks nothing again. Sourced, so
# it returns (never exits) and leaves `set -u` on only for the caller's later lines.
set -u
export RUN_ALL_T0=${RUN_ALL_T0:-$(date +%s)}  # run_all.sh's budget counts from here
MEGASIMPO_SITE=${MEGASIMPO_SITE:-/tmp/site}
export PYTHONPATH="$MEGASIMPO_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NVTE_FRAMEWORK=pytorch  # TE raises, instead of warning, when its torch extension won't load

_setup_main() {
    local site=$MEGASIMPO_SITE t0
    t0=$(date +%s)
    if [ -f "$site/.installed" ]; then
        echo "setup: wheels already installed in $site"
    else
        if ! ls .whl/*.whl >/dev/null 2>&1; then
            echo "setup: no .whl/*.whl here: run bench/gpu/fetch.sh on the CPU machine and carry .whl"
            return 1
        fi
        # --no-compile: bytecode for ~500 MB of files costs more than the runs gain from it
        if ! timeout 180 python3 -m pip install -q --disable-pip-version-check --no-index \
                --no-deps --no-compile --target "$site" .whl/*.whl; then
            echo "setup: pip install into $site failed"
            return 1
        fi
        # TE's Python part imports jax when jax is installed (it is on this image); we carry no
        # TE JAX extension, so that costs every process seconds for a warning
        rm -rf "$site/transformer_engine/jax"
        touch "$site/.installed"
        echo "setup: installed $(ls .whl/*.whl | wc -l) wheels into $site in $(( $(date +%s) - t0 )) s"
    fi

    if [ ! -f "$site/.te_ok" ]; then
        # the traceback goes to a file; only its tail is printed (the call returns 12,000 chars)
        timeout 120 python3 - >"$site/te_check.log" 2>&1 <<'PYEOF'
import torch
import transformer_engine
import transformer_engine.pytorch as te

lin = te.Linear(1024, 1024, params_dtype=torch.bfloat16, device="cuda")
y = lin(torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16))
torch.cuda.synchronize()
assert torch.isfinite(y.float()).all(), "te.Linear gave non-finite values"
print("setup: transformer_engine", transformer_engine.__version__, "bf16 te.Linear forward ok")
PYEOF
        local rc=$?
        tail -n 6 "$site/te_check.log"
        if [ "$rc" = 0 ]; then
            echo 1 > "$site/.te_ok"
        else
            echo "setup: Transformer Engine unusable (above); removing it, runs go on without TE"
            rm -rf "$site"/transformer_engine "$site"/transformer_engine*.dist-info
            echo 0 > "$site/.te_ok"
        fi
    fi
    MEGASIMPO_TE_OK=$(cat "$site/.te_ok")
    export MEGASIMPO_TE_OK
    # Without TE, train's --attention-backend auto resolves to sdpa by itself (layer_spec.py).
    timeout 120 python3 -c '
import torch, megatron.core, trl, datasets, transformers
cuda = torch.cuda.is_available()
print("setup: torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if cuda else "NO GPU")
print("setup: megatron-core", megatron.core.__version__, "trl", trl.__version__,
      "datasets", datasets.__version__, "transformers", transformers.__version__)' \
        || echo "setup: importing the stack failed (above): the bench rows will fail too"
    echo "setup: MEGASIMPO_TE_OK=$MEGASIMPO_TE_OK; $(( $(date +%s) - t0 )) s"
}
_setup_main
