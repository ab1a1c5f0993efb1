#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz, docs/fuzzing.md) with clang, AddressSanitizer and
# UBSan in build-fuzz/, and runs each one from a copy of its seed corpus. Prints one summary line
# per target and exits non-zero when a target crashed, leaked, timed out or ran out of memory,
# or did not build. CI runs it with --seconds 30.
#
#   scripts/fuzz.sh [--seconds N | --runs N] [--only fuzz_a,fuzz_b] [--rss-limit-mb N]
#                   [--timeout N] [--merge] [--no-run]
#
#   --seconds N      run each target for N seconds (default 30)
#   --runs N         run each target for N inputs instead
#   --only LIST      only these targets (comma-separated names)
#   --rss-limit-mb N memory limit of one target, in MB (default 4096)
#   --timeout N      seconds one input may take before it counts as a hang (default 60)
#   --merge          afterwards, merge what the runs found into tests/fuzz/corpus/<target>
#                    (minimized: only inputs that add coverage)
#   --no-run         configure and build only
#
# Working corpora, crash/leak/timeout inputs and logs go to build-fuzz/fuzz-work/<target>/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=30
runs=
only=
rss_limit_mb=4096
timeout=60
merge=0
run=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) seconds="$2"; runs=; shift 2 ;;
    --runs) runs="$2"; shift 2 ;;
    --only) only="$2"; shift 2 ;;
    --rss-limit-mb) rss_limit_mb="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --merge) merge=1; shift ;;
    --no-run) run=0; shift ;;
    -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "fuzz.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for n in "$seconds" "$rss_limit_mb" "$timeout" ${runs:+"$runs"}; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: '$n' is not a whole number" >&2; exit 2; }
done

# clang, and libclang-rt-14-dev for libFuzzer and the sanitizer runtimes.
bash scripts/setup.sh clang libclang-rt-14-dev

started=$(date +%s)
# Only the fuzz targets: tests, examples and benchmarks are built by other scripts (and with g++).
mkdir -p build-fuzz
CC=clang CXX=clang++ cmake -S . -B build-fuzz -DHIVE_BUILD_FUZZ=ON -DHIVE_BUILD_TESTS=OFF \
  -DHIVE_BUILD_EXAMPLES=OFF -DHIVE_BUILD_BENCH=OFF -DHIVE_INSTALL=OFF >build-fuzz/configure.log 2>&1 \
  || { cat build-fuzz/configure.log >&2; exit 1; }
cmake --build build-fuzz --target hive_fuzzers -j "$(nproc)"
built=$(date +%s)
echo "fuzz.sh: configured and built in $((built - started)) s"
[[ $run -eq 1 ]] || exit 0

targets=()
for src in tests/fuzz/fuzz_*.cpp; do
  name=$(basename "$src" .cpp)
  if [[ -n "$only" && ",$only," != *",$name,"* ]]; then continue; fi
  targets+=("$name")
done
[[ ${#targets[@]} -gt 0 ]] || { echo "fuzz.sh: no target matches --only '$only'" >&2; exit 2; }

# Torch's own thread pool only adds noise to one input at a time.
export OMP_NUM_THREADS=1
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"

failed=0
summary=()
for name in "${targets[@]}"; do
  binary="build-fuzz/tests/fuzz/$name"
  work="build-fuzz/fuzz-work/$name"
  if [[ ! -x "$binary" ]]; then
    summary+=("$name: not built (needs libtorch?): FAILED")
    failed=1
    continue
  fi
  mkdir -p "$work/corpus" "$work/artifacts"
  rm -f "$work"/artifacts/*
  # A copy of the seeds: the runs add their finds to build-fuzz, never to tests/fuzz/corpus.
  if [[ -d "tests/fuzz/corpus/$name" ]]; then cp -f "tests/fuzz/corpus/$name"/* "$work/corpus/"; fi
  limit=(-max_total_time="$seconds")
  [[ -n "$runs" ]] && limit=(-runs="$runs")
  log="$work/run.log"
  t0=$(date +%s)
  set +e
  "$binary" "$work/corpus" "${limit[@]}" -detect_leaks=1 -rss_limit_mb="$rss_limit_mb" -timeout="$timeout" \
    -artifact_prefix="$work/artifacts/" -print_final_stats=1 >"$log" 2>&1
  status=$?
  set -e
  elapsed=$(( $(date +%s) - t0 ))
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  # slow-unit-* inputs only took longer than 10 s (a loaded machine): not failures.
  artifact=$(ls "$work"/artifacts/ 2>/dev/null | grep -v '^slow-unit-' | head -1 || true)
  if [[ $status -eq 0 && -z "$artifact" ]]; then
    result=ok
  else
    failed=1
    case "$artifact" in
      crash-*) result="CRASH" ;;
      leak-*) result="LEAK" ;;
      timeout-*) result="TIMEOUT" ;;
      oom-*) result="OUT OF MEMORY" ;;
      *) result="FAILED (exit $status)" ;;
    esac
    result+=" ${artifact:+$work/artifacts/$artifact }(log: $log)"
    tail -40 "$log" >&2
  fi
  summary+=("$name: ${execs:-0} executions in ${elapsed} s (${rate:-0} exec/s): $result")
  if [[ $merge -eq 1 && $status -eq 0 ]]; then
    mkdir -p "tests/fuzz/corpus/$name"
    "$binary" -merge=1 "tests/fuzz/corpus/$name" "$work/corpus" >"$work/merge.log" 2>&1
  fi
done

echo "fuzz.sh: ${#targets[@]} targets, $(( $(date +%s) - started )) s in all"
printf '%s\n' "${summary[@]}"
exit $failed
