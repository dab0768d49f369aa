#!/usr/bin/env bash
# Coverage-guided fuzzing of authentik-core with libFuzzer on the stable toolchain.
#   fuzz/run.sh build                 build every target (build/target-fuzz)
#   fuzz/run.sh smoke [TARGET...]     `make fuzz-smoke`: each target a few seconds from the
#                                     committed corpus (FUZZ_SMOKE_SECONDS=5, FUZZ_SMOKE_RUNS=20000)
#   fuzz/run.sh fuzz [TARGET...]      `make fuzz`: each target FUZZ_SECONDS (300), one at a time;
#                                     FUZZ_RUNS=N stops a target after N executions instead
#   fuzz/run.sh run TARGET [ARGS...]  the target binary with libFuzzer ARGS (e.g. a crash file
#                                     to reproduce it, or -runs=10000000)
#   fuzz/run.sh gen-corpus            regenerate the generated seeds (gen_*) in fuzz/corpus/
#   fuzz/run.sh list                  the targets
# Working corpora (what fuzzing adds) go to build/fuzz/corpus/<target>, crashes to
# build/fuzz/artifacts/<target>/. Any crash fails the run (exit 1).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fuzz_dir="$root/fuzz"
work="$root/build/fuzz"
export CARGO_TARGET_DIR="$root/build/target-fuzz"
CARGO=${CARGO:-cargo}

TARGETS=(cookie session_record pending_login record_roundtrip discovery jwks token_response
    jwt_header id_token redirect request unauth_paths identity authorization outpost forward)

# Sanitizer coverage by LLVM passes (stable codegen options; no sanitizer runtime needed):
# inline 8-bit edge counters + PC table for libFuzzer's coverage, comparison tracing for its
# value profile and dictionary, and `cfg(fuzzing)` as cargo-fuzz sets it.
RUSTFLAGS_FUZZ=(
    -Cpasses=sancov-module
    -Cllvm-args=-sanitizer-coverage-level=4
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
    -Cllvm-args=-sanitizer-coverage-pc-table
    -Cllvm-args=-sanitizer-coverage-trace-compares
    --cfg fuzzing
)
host=$(rustc -vV | sed -n 's/^host: //p')
bin_dir="$CARGO_TARGET_DIR/$host/release"

say() { echo "fuzz: $*"; }
die() {
    echo "fuzz: error: $*" >&2
    exit 1
}

build() {
    command -v "${CXX:-c++}" >/dev/null 2>&1 || die "no C++ compiler (${CXX:-c++}) for libFuzzer: run .ci/deps.sh build"
    say "building ${#TARGETS[@]} targets into build/target-fuzz"
    # An explicit --target keeps RUSTFLAGS off build scripts and proc-macros (they must not be
    # instrumented: they are not linked with libFuzzer).
    local bins=() t
    for t in "${TARGETS[@]}"; do bins+=(--bin "$t"); done
    # Not --locked: fuzz/Cargo.lock pins every version, and cargo only adds what a new core
    # dependency needs (commit the updated lock then).
    (cd "$fuzz_dir" && RUSTFLAGS="${RUSTFLAGS_FUZZ[*]}" "$CARGO" build --release \
        --target "$host" "${bins[@]}")
}

check_target() {
    local t
    for t in "${TARGETS[@]}"; do [ "$t" = "$1" ] && return 0; done
    die "unknown target \"$1\" (fuzz/run.sh list)"
}

# run_target TARGET LOG [libFuzzer args...]: fuzz from the committed corpus (read-only) plus the
# working corpus (grows); prints one summary line; returns libFuzzer's status.
run_target() {
    local target=$1 log=$2
    shift 2
    local corpus="$work/corpus/$target" artifacts="$work/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    # Inputs longer than core accepts only cost time: return URLs stop at MAX_RETURN_URL (2048).
    local max_len=8192
    case "$target" in
    redirect) max_len=2100 ;;
    request | unauth_paths | cookie | jwt_header | forward) max_len=4096 ;;
    esac
    local args=(-artifact_prefix="$artifacts/" -print_final_stats=1 -timeout=10 -rss_limit_mb=2048
        -max_len="$max_len" "$@")
    [ -f "$fuzz_dir/dict/$target.dict" ] && args+=(-dict="$fuzz_dir/dict/$target.dict")
    local status=0 started ended
    started=$(date +%s.%N)
    nice -n "${FUZZ_NICE:-10}" "$bin_dir/$target" "${args[@]}" "$corpus" "$fuzz_dir/corpus/$target" \
        >"$log" 2>&1 || status=$?
    ended=$(date +%s.%N)
    local counters execs rate cov ft
    counters=$(sed -n 's/^INFO: Loaded [0-9]* modules *(\([0-9]*\) inline 8-bit counters).*/\1/p' "$log" | head -n1)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    # libFuzzer's own average is 0 below one second: wall time of the whole run instead.
    rate=$(awk -v n="${execs:-0}" -v a="$started" -v b="$ended" 'BEGIN { printf "%d", n / (b - a) }')
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n1 | cut -d' ' -f2 || true)
    ft=$(grep -o 'ft: [0-9]*' "$log" | tail -n1 | cut -d' ' -f2 || true)
    printf 'fuzz: %-16s execs %10s  exec/s %7s  cov %5s  ft %6s  counters %s  (%.0f s)\n' \
        "$target" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${counters:-0}" \
        "$(awk -v a="$started" -v b="$ended" 'BEGIN { print b - a }')"
    if [ "${counters:-0}" -eq 0 ]; then
        echo "fuzz: $target has no coverage instrumentation (no inline 8-bit counters); log: $log" >&2
        return 1
    fi
    if [ "$status" -ne 0 ]; then
        echo "fuzz: $target FAILED (status $status); last lines of $log:" >&2
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written|artifact_prefix' "$log" | head -n 20 >&2 || true
        tail -n 30 "$log" >&2
        return 1
    fi
}

run_all() {
    local mode=$1
    shift
    local targets=("$@") failed=() t
    [ "${#targets[@]}" -gt 0 ] || targets=("${TARGETS[@]}")
    for t in "${targets[@]}"; do check_target "$t"; done
    build
    mkdir -p "$work/logs"
    for t in "${targets[@]}"; do
        local log="$work/logs/$t.$mode.log"
        if [ "$mode" = smoke ]; then
            run_target "$t" "$log" -runs="${FUZZ_SMOKE_RUNS:-20000}" \
                -max_total_time="${FUZZ_SMOKE_SECONDS:-5}" || failed+=("$t")
        else
            local limit=(-max_total_time="${FUZZ_SECONDS:-300}")
            [ -n "${FUZZ_RUNS:-}" ] && limit=(-runs="$FUZZ_RUNS")
            run_target "$t" "$log" "${limit[@]}" || failed+=("$t")
        fi
    done
    if [ "${#failed[@]}" -gt 0 ]; then
        die "${#failed[@]} target(s) failed: ${failed[*]} (crash inputs in build/fuzz/artifacts/)"
    fi
    say "${#targets[@]} target(s), no crash"
}

cmd=${1:-smoke}
shift || true
case "$cmd" in
build) build ;;
smoke | fuzz) run_all "$cmd" "$@" ;;
run)
    [ $# -ge 1 ] || die "usage: fuzz/run.sh run TARGET [libFuzzer args...]"
    check_target "$1"
    build
    target=$1
    shift
    extra=()
    [ -f "$fuzz_dir/dict/$target.dict" ] && extra+=(-dict="$fuzz_dir/dict/$target.dict")
    exec "$bin_dir/$target" "${extra[@]}" "$@"
    ;;
gen-corpus)
    # A plain (uninstrumented) build: gen_corpus is no fuzz target and has no libFuzzer to link.
    (cd "$fuzz_dir" && RUSTFLAGS='' CARGO_TARGET_DIR="$CARGO_TARGET_DIR/plain" "$CARGO" run \
        --release --bin gen_corpus -- "$fuzz_dir/corpus")
    say "wrote the gen_* seeds into fuzz/corpus/"
    ;;
list) printf '%s\n' "${TARGETS[@]}" ;;
*) die "unknown command \"$cmd\" (build, smoke, fuzz, run, gen-corpus, list)" ;;
esac
