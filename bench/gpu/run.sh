#!/usr/bin/env bash
# On the GPU machine after `source bench/gpu/setup.sh`: the benchmarks in priority order, each
# merging into bench/results/<device>.json, copied to $OUT after every step so a run cut off by
# the call's time limit still returns what finished. Pick steps with STEPS="step ..." (default all).
set -u
export PYTHONUNBUFFERED=1
save() { cp bench/results/*.json "${OUT:-/tmp}/" 2>/dev/null; }
step() {  # name, command...
    case " ${STEPS:-gputests step8b trl logprobs step1b trl1b fp8} " in *" $1 "*) ;; *) return ;; esac
    echo "=== $1: ${*:2}"; local t=$(date +%s)
    "${@:2}" 2>&1 | tail -40
    echo "=== $1 done in $(( $(date +%s) - t )) s"; save
}
step gputests python3 -m pytest tests/gpu -q -x
step step8b   python3 bench/bench_step.py --shape 8b-width
step trl      python3 bench/bench_trl.py --shape 8b-width
step logprobs python3 bench/bench_logprobs.py --tokens 4x4096 --vocab 128256 --hidden 4096
step step1b   python3 bench/bench_step.py --shape 1b --tag 1b
step trl1b    python3 bench/bench_trl.py --shape 1b --tag 1b
step fp8      python3 bench/bench_step.py --shape 8b-width --precision fp8 --tag fp8
