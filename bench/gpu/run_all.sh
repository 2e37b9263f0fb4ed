#!/usr/bin/env bash
# The GPU benchmarks in ONE device call, in priority order, under a wall-clock budget:
#     source bench/gpu/setup.sh && bash bench/gpu/run_all.sh --budget 500
#     ROWS="step8b fp8" bash bench/gpu/run_all.sh ...   (a subset, e.g. to re-run what failed)
#     bash bench/gpu/run_all.sh --dry-run               (here, on CPU: checks, runs nothing heavy)
# Before each row the time left is checked against the row's estimate: a row that would not fit
# is skipped (and says so), so the call ends inside its limit with every finished row's results.
# A row that runs is killed when the budget runs out. After every row, bench/results/*.json and
# the logs go to $OUT, which the device call brings back even when it is cut off.
# RUN_ALL_FAKE=1 runs the same loop with each row's command replaced by an echo that "takes" the
# row's estimate on a simulated clock, as --dry-run's projection does (for tests).
set -u
cd "$(dirname "$0")/../.."

usage() { echo "usage: [ROWS='smoke trl ...'] bash bench/gpu/run_all.sh [--dry-run] [--budget SECONDS]"; }
BUDGET=500 DRY=0
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --budget) BUDGET=${2:-}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "run_all: --budget takes whole seconds" >&2; exit 2; }

# Rows, highest priority first: name, estimate in seconds on one H200 (a guess until a GPU run
# measures it: rows.tsv records each row's real time), then what python3 runs. The bench_step
# rows take 3 warm-up and 5 timed steps (not 10) so that the first four rows fit 500 s.
ROW_TABLE="
smoke     45  bench/gpu/smoke.py
gputests  90  -m pytest tests/gpu -q -x
step8b   180  bench/bench_step.py --shape 8b-width --warmup 3 --steps 5
trl      120  bench/bench_trl.py --shape 8b-width --warmup 3 --steps 5
logprobs  30  bench/bench_logprobs.py --tokens 4x4096 --vocab 128256 --hidden 4096
moe      150  bench/bench_step.py --shape 30b-a3b-width --warmup 3 --steps 5 --tag moe
fp8      150  bench/bench_step.py --shape 8b-width --warmup 3 --steps 5 --precision fp8 --tag fp8
step1b   120  bench/bench_step.py --shape 1b --warmup 3 --steps 5 --tag 1b
"
declare -A EST CMD
ORDER=()
while read -r name est cmd; do
    [ -n "$name" ] || continue
    ORDER+=("$name"); EST[$name]=$est; CMD[$name]=$cmd
done <<< "$ROW_TABLE"

SELECTED=()  # ROWS picks rows; they still run in the table's (priority) order
for name in ${ROWS:-${ORDER[*]}}; do
    [ -n "${EST[$name]:-}" ] || { echo "run_all: unknown row '$name' (rows: ${ORDER[*]})" >&2; exit 2; }
done
for name in "${ORDER[@]}"; do
    case " ${ROWS:-${ORDER[*]}} " in *" $name "*) SELECTED+=("$name") ;; esac
done

PY=${PYTHON:-python3}
if [ "$DRY" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi

mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }

# What a run(carry=[".whl"]) call takes along: git-tracked and untracked-not-ignored files, + .whl/
check_carry() {
    local wheels=${RUN_ALL_WHEELS_DIR:-.whl} tree whl=0 total
    tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
           | awk '{s += $1} END {print s + 0}')
    if [ -d "$wheels" ] && [ -n "$(ls -A "$wheels")" ]; then
        whl=$(du -sb "$wheels" | cut -f1)
    else
        echo "WARNING: no wheels in $wheels: run bench/gpu/fetch.sh first (counting the working tree only)"
    fi
    total=$(( tree + whl ))
    echo "carry: working tree $(mib "$tree") MiB + $wheels $(mib "$whl") MiB = $(mib "$total") MiB (limit 64 MiB)"
    [ "$total" -lt $(( 64 * 1048576 )) ] || { echo "ERROR: the carry is over 64 MiB"; return 1; }
}

# Each selected row's script exists and its --help lists every flag the row passes (one --help
# a script: each costs a torch import)
check_flags() {
    local name words script flag bad=0
    declare -A help
    for name in "${SELECTED[@]}"; do
        read -r -a words <<< "${CMD[$name]}"
        if [ "${words[0]}" = -m ]; then  # pytest: only its test folder to check
            [ -d "${words[2]}" ] || { echo "ERROR: $name: no ${words[2]}"; bad=1; }
            continue
        fi
        script=${words[0]}
        [ -f "$script" ] || { echo "ERROR: $name: no $script"; bad=1; continue; }
        [ -n "${help[$script]:-}" ] || help[$script]=$("$PY" "$script" --help 2>&1) || {
            echo "ERROR: $name: $PY $script --help failed: ${help[$script]: -300}"; bad=1; continue; }
        for flag in "${words[@]:1}"; do
            case $flag in --*) ;; *) continue ;; esac
            grep -qE -- "${flag}([^a-z-]|\$)" <<< "${help[$script]}" \
                || { echo "ERROR: $name: $script --help has no $flag"; bad=1; }
        done
    done
    [ "$bad" = 0 ] && echo "flags: every row's script exists and its --help lists the row's flags"
    return "$bad"
}

te_ok() {  # whether TE imports (setup.sh says so in MEGASIMPO_TE_OK; else ask once)
    if [ -z "${MEGASIMPO_TE_OK:-}" ]; then
        if [ "$DRY" = 1 ] || [ "$FAKE" = 1 ]; then
            MEGASIMPO_TE_OK=1  # unknown without a GPU: project as if TE works
        else
            timeout 120 "$PY" -c "import transformer_engine.pytorch" >/dev/null 2>&1 \
                && MEGASIMPO_TE_OK=1 || MEGASIMPO_TE_OK=0
        fi
    fi
    [ "$MEGASIMPO_TE_OK" = 1 ]
}

FAKE=${RUN_ALL_FAKE:-0}
CLOCK=0  # the simulated clock of --dry-run and RUN_ALL_FAKE=1: each row run spends its estimate
if [ "$DRY" = 1 ]; then
    echo "run_all: dry run, budget $BUDGET s; rows in priority order, each with its estimate:"
else
    export OUT=${OUT:-/tmp/run_all}  # smoke.py writes its JSON there too
    mkdir -p "$OUT/logs"
    LOG=$OUT/run_all.log
    T0=${RUN_ALL_T0:-$(date +%s)}  # setup.sh's start when it was sourced: the whole call counts
    printf 'row\tstatus\trc\tseconds\testimate\n' > "$OUT/rows.tsv"
    save() { cp -f bench/results/*.json "$OUT"/ 2>/dev/null; }
    trap save EXIT
    echo "run_all: budget $BUDGET s from $(date -d "@$T0" +%T); rows: ${SELECTED[*]}" | tee -a "$LOG"
fi

say() { if [ "$DRY" = 1 ]; then echo "$*"; else echo "$*" | tee -a "$LOG"; fi; }
row_done() {  # name status rc seconds
    [ "$DRY" = 1 ] || printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${EST[$1]}" >> "$OUT/rows.tsv"
}

FAILED=() SKIPPED=()
i=0
for name in "${SELECTED[@]}"; do
    i=$(( i + 1 ))
    est=${EST[$name]}
    if [ "$DRY" = 1 ] || [ "$FAKE" = 1 ]; then
        left=$(( BUDGET - CLOCK ))
    else
        left=$(( BUDGET - ($(date +%s) - T0) ))
    fi
    line=$(printf '%d. %-9s ~%3d s  python3 %s' "$i" "$name" "$est" "${CMD[$name]}")
    if [ "$name" = fp8 ] && ! te_ok; then
        say "$line  -> SKIP: Transformer Engine did not import"
        SKIPPED+=("$name"); row_done "$name" skip-no-te - 0; continue
    fi
    if [ "$left" -lt "$est" ]; then
        say "$line  -> SKIP: ${left} s left < ~${est} s"
        SKIPPED+=("$name"); row_done "$name" skip-budget - 0; continue
    fi
    if [ "$DRY" = 1 ]; then
        say "$line  -> would run (${left} s left)"
        CLOCK=$(( CLOCK + est )); continue
    fi
    say "=== $line  (${left} s left)"
    t=$(date +%s)
    if [ "$FAKE" = 1 ]; then
        echo "FAKE-RUN $name: python3 ${CMD[$name]}" > "$OUT/logs/$name.log"; rc=0
        CLOCK=$(( CLOCK + est ))
    else  # the row may use what is left, no more; its whole output goes to logs/<row>.log
        timeout -k 10 "$left" "$PY" ${CMD[$name]} > "$OUT/logs/$name.log" 2>&1; rc=$?
    fi
    tail -n 15 "$OUT/logs/$name.log"  # the call returns only the last 12,000 characters
    secs=$(( $(date +%s) - t ))
    case $rc in 0) note= ;; 124|137) note=" (cut: the budget ran out)" ;; *) note=" (FAILED)" ;; esac
    say "=== $name: rc=$rc in $secs s$note"
    [ "$rc" = 0 ] || FAILED+=("$name")
    row_done "$name" ran "$rc" "$secs"
    save
done

if [ "$DRY" = 1 ]; then
    bad=0
    check_carry || bad=1
    check_flags || bad=1
    [ "$bad" = 0 ] && echo "dry run: OK" || echo "dry run: FAILED"
    exit "$bad"
fi
say "run_all: failed: ${FAILED[*]:-none}; skipped: ${SKIPPED[*]:-none}; $(( $(date +%s) - T0 )) s; results in $OUT"
[ "${#FAILED[@]}" = 0 ]
