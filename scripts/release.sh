#!/usr/bin/env bash
# The release run: what a release is checked with beyond CI, whose 90 minutes on 2 cores hold
# the tests and 30 s of fuzzing but not the sanitizers (docs/sanitizers.md, "What it costs").
# Runs the stages in order, goes on past one that fails, keeps each stage's output in
# <out>/<stage>.log and writes <out>/summary.md; exits non-zero when any stage failed.
#
#   scripts/release.sh [--out DIR] [--stages tests,bench,asan,tsan,fuzz] [--fuzz_seconds N]
#                      [--bench_runs LIST]
#
#   --out DIR          where the logs and results go (default build-release/<commit>-<UTC time>)
#   --stages LIST      which stages to run, comma-separated; they run in the order below
#   --fuzz_seconds N   seconds per fuzz target in the fuzz stage (default 600)
#   --bench_runs LIST  only these runs of the bench stage, comma-separated (names: --help)
#
# Stages:
#   tests  scripts/test.sh: builds build/, runs every test and 30 s of each fuzz target (CI's run)
#   bench  builds the benchmarks in build/ and runs each with the arguments docs/benchmarks.md
#          reports; each run's log goes to <out>/bench/<run>.log and its last line (one JSON
#          object) into <out>/bench.jsonl with the command and the load average before it.
#          Run on an otherwise idle machine: the figures are only as quiet as the machine.
#   asan   scripts/sanitize.sh asan --all: every test under ASan, LSan and UBSan (build-asan/)
#   tsan   scripts/sanitize.sh tsan: the torch-free suite under ThreadSanitizer (build-tsan/)
#   fuzz   scripts/fuzz.sh --seconds N: each fuzz target for N s under ASan and UBSan
#
# Each stage's own script installs what it needs; the first build of each tree is the long part
# (on 2 cores: build/ about 25 min, build-asan/ with the torch suite about 80).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

all_stages=(tests bench asan tsan fuzz)
usage() { sed -n '7,8p' "${BASH_SOURCE[0]}" | sed '1s/^#  */usage: /; 2s/^#  */       /' >&2; exit 2; }

out=
only_runs=
help=0
stages="$(IFS=,; echo "${all_stages[*]}")"
fuzz_seconds=600
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) [[ $# -ge 2 ]] || usage; out="$2"; shift 2 ;;
    --stages) [[ $# -ge 2 ]] || usage; stages="$2"; shift 2 ;;
    --fuzz_seconds) [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || usage; fuzz_seconds="$2"; shift 2 ;;
    --bench_runs) [[ $# -ge 2 ]] || usage; only_runs="$2"; shift 2 ;;
    -h|--help) help=1; shift ;;
    *) echo "release.sh: unknown argument '$1' (see --help)" >&2; usage ;;
  esac
done

declare -A wanted=()
IFS=, read -r -a requested <<<"$stages"
for s in "${requested[@]}"; do
  [[ " ${all_stages[*]} " == *" $s "* ]] ||
    { echo "release.sh: unknown stage '$s' (stages: ${all_stages[*]})" >&2; exit 2; }
  wanted[$s]=1
done
[[ ${#wanted[@]} -gt 0 ]] || { echo "release.sh: no stage given" >&2; exit 2; }

# The benchmark runs: <run name> <program> [arguments]. The throughput presets and the
# 4-expert, 8-client, 256-row configuration are issue 19's item 2; the DHT runs its item 1.
bench_runs=(
  "rpc bench_rpc"
  "relay bench_relay"
  "trust bench_trust"
  "dht benchmark_dht"
  "dht_kill_0.2 benchmark_dht --kill_fraction 0.2"
  "averaging benchmark_averaging"
  "throughput_default benchmark_throughput --preset default"
  "throughput_ffn_forward benchmark_throughput --preset ffn_forward"
  "throughput_minimalistic benchmark_throughput --preset minimalistic"
  "throughput_4x8x256 benchmark_throughput --num_experts 4 --num_clients 8 --batch_size 256"
  "inference benchmark_inference"
)

if (( help )); then
  sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo
  echo "Runs of the bench stage (name: program and arguments):"
  for run in "${bench_runs[@]}"; do
    read -r -a words <<<"$run"
    echo "  ${words[0]}: ${words[*]:1}"
  done
  exit 0
fi
if [[ -n "$only_runs" ]]; then
  chosen=()
  IFS=, read -r -a names <<<"$only_runs"
  for name in "${names[@]}"; do
    found=
    for run in "${bench_runs[@]}"; do [[ "${run%% *}" == "$name" ]] && found=$run; done
    [[ -n "$found" ]] || { echo "release.sh: no bench run named '$name' (see --help)" >&2; exit 2; }
    chosen+=("$found")
  done
  bench_runs=("${chosen[@]}")
fi

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
started_at=$(date -u +%Y%m%dT%H%M%SZ)
out="${out:-build-release/$commit-$started_at}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary="$out/summary.md"

json_string() {  # $1 as a JSON string literal
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$s"
}

# Called where errexit does not apply (a stage's failure must not end the run), so every step
# checks its own status.
stage_bench() {
  local programs=() run words
  for run in "${bench_runs[@]}"; do
    read -r -a words <<<"$run"
    [[ " ${programs[*]} " == *" ${words[1]} "* ]] || programs+=("${words[1]}")
  done
  bash scripts/setup.sh || return
  cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo || return
  cmake --build build --target "${programs[@]}" -j "$(nproc)" || return
  mkdir -p "$out/bench" || return
  : >"$out/bench.jsonl" || return
  local bad=0 i=0 name load last status
  for run in "${bench_runs[@]}"; do
    read -r -a words <<<"$run"
    name=${words[0]}
    i=$((i + 1))
    load=$(cut -d' ' -f1 /proc/loadavg)
    echo "release.sh: bench [$i/${#bench_runs[@]}] $name: build/bench/${words[*]:1} (load average $load)"
    status=0
    "build/bench/${words[1]}" "${words[@]:2}" >"$out/bench/$name.log" 2>&1 || status=$?
    last=$(tail -n 1 "$out/bench/$name.log")
    if [[ $status -ne 0 || "$last" != \{* ]]; then
      echo "release.sh: bench $name FAILED (exit $status); the end of its log:" >&2
      tail -n 20 "$out/bench/$name.log" >&2
      bad=1
      continue
    fi
    echo "$last"
    printf '{"run":%s,"command":%s,"load_average_before":%s,"result":%s}\n' \
      "$(json_string "$name")" "$(json_string "build/bench/${words[*]:1}")" "$load" "$last" \
      >>"$out/bench.jsonl"
  done
  return "$bad"
}

run_stage() {  # $1 stage; its output goes to the terminal and to <out>/<stage>.log
  local stage=$1 status=0 began=$SECONDS
  echo "release.sh: ==== $stage: started $(date -u +%H:%M:%S) UTC, log $out/$stage.log"
  # pipefail: the pipeline's status is the stage's (tee does not fail).
  {
    case "$stage" in
      tests) bash scripts/test.sh ;;
      bench) stage_bench ;;
      asan) bash scripts/sanitize.sh asan --all ;;
      tsan) bash scripts/sanitize.sh tsan ;;
      fuzz) bash scripts/fuzz.sh --seconds "$fuzz_seconds" ;;
    esac
  } 2>&1 | tee "$out/$stage.log" || status=$?
  local took=$((SECONDS - began)) verdict=passed
  [[ $status -eq 0 ]] || verdict="FAILED (exit $status)"
  echo "release.sh: ==== $stage: $verdict in $took s"
  printf '| %s | %s | %d | %s |\n' "$stage" "$verdict" "$took" "$stage.log" >>"$summary"
  [[ $status -eq 0 ]] || failed+=("$stage")
}

{
  echo "# Release run of $commit"
  echo
  echo "Started $started_at on $(nproc) cores, $(uname -sr)$(git diff --quiet HEAD 2>/dev/null || echo ', with uncommitted changes')."
  echo
  echo "| stage | result | seconds | log |"
  echo "| --- | --- | ---: | --- |"
} >"$summary"

failed=()
for stage in "${all_stages[@]}"; do
  [[ -n "${wanted[$stage]:-}" ]] || continue
  run_stage "$stage"
done

if [[ -n "${wanted[bench]:-}" && -s "$out/bench.jsonl" ]]; then
  { echo; echo "Benchmarks: one line per run in bench.jsonl."; } >>"$summary"
fi
echo "release.sh: summary in $summary"
cat "$summary"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "release.sh: failed: ${failed[*]}" >&2
  exit 1
fi
