#!/usr/bin/env bash
# The main job: a small local swarm of averaging peers (examples/averaging_peer.cpp) that train
# one classifier together on loopback TCP, then a single peer trained alone on the same number
# of samples, and a summary of their test accuracies.
#
#   bash scripts/demo.sh [--peers 4] [--epochs 4] [--train_samples 24000] [--data_dir DIR]
#                        [--compression float16] [--averaging_period 25] [--strategy butterfly|gloo]
#   bash scripts/demo.sh --collaborative [--diloco] [flags of examples/collaborative.cpp]
#
# --collaborative runs examples/collaborative instead: the target-batch-size optimizer (or,
# with --diloco, DiLoCo) on Fashion-MNIST, one peer joining late and one leaving, against one
# machine trained on the same total samples; the flags after it go to that program.
#
# The first peer starts the swarm and prints the --initial_peers line; the others join through
# it, download its state, and each trains on its own shard (train_samples / peers images),
# averaging parameters with the others in the background. --data_dir points at CIFAR-10's
# binary files; without it the peers use Fashion-MNIST (Debian's dataset-fashion-mnist).
# --strategy gloo averages through libtorch's Gloo (averaging::Gloo) instead of butterfly.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

peers=4
epochs=4
train_samples=24000
period=25
compression=float16
strategy=butterfly
data_dir=""
if [[ "${1:-}" == "--collaborative" ]]; then
  shift
  args=()
  for a in "$@"; do
    if [[ "$a" == "--diloco" ]]; then args+=(--mode diloco); else args+=("$a"); fi
  done
  bash scripts/setup.sh
  mkdir -p build
  if ! cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >build/configure-demo.log 2>&1; then
    cat build/configure-demo.log >&2
    echo "demo.sh: configuring build/ failed (log above)" >&2
    exit 1
  fi
  cmake --build build --target collaborative -j "$(nproc)"
  exec build/examples/collaborative "${args[@]}"
fi
while [[ $# -gt 0 ]]; do
  case "$1" in
    --peers) peers="$2"; shift 2 ;;
    --epochs) epochs="$2"; shift 2 ;;
    --train_samples) train_samples="$2"; shift 2 ;;
    --averaging_period) period="$2"; shift 2 ;;
    --compression) compression="$2"; shift 2 ;;
    --strategy) strategy="$2"; shift 2 ;;
    --data_dir) data_dir="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ "$peers" =~ ^[0-9]+$ ]] || (( peers < 2 )); then
  echo "demo.sh: --peers must be at least 2" >&2
  exit 2
fi

bash scripts/setup.sh

mkdir -p build
# The configure log only matters when it fails; the peers' output is what to read.
if ! cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >build/configure-demo.log 2>&1; then
  cat build/configure-demo.log >&2
  echo "demo.sh: configuring build/ failed (log above)" >&2
  exit 1
fi
cmake --build build --target averaging_peer -j "$(nproc)"

logs=build/demo
rm -rf "$logs"
mkdir -p "$logs"
common=(--train_samples "$train_samples" --epochs "$epochs" --averaging_period "$period"
        --compression "$compression" --strategy "$strategy" --target_group_size "$peers" --prefix demo)
[[ -n "$data_dir" ]] && common+=(--data_dir "$data_dir")

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Runs peer $1 with the remaining arguments; its lines are shown prefixed and kept in a log.
run_peer() {
  local i="$1"; shift
  build/examples/averaging_peer --shard "$i/$peers" "${common[@]}" "$@" 2>&1 |
    sed -u "s/^/[peer $i] /" | tee "$logs/peer$i.log" &
  pids+=("$!")
}

echo "== starting peer 0 (a new swarm)"
run_peer 0
address=""
for _ in $(seq 1 600); do  # up to 60 s: loading the data and starting the DHT
  address=$(grep -o -- '--initial_peers [^ ]*' "$logs/peer0.log" 2>/dev/null | head -1 | cut -d' ' -f2 || true)
  [[ -n "$address" ]] && break
  if ! kill -0 "${pids[0]}" 2>/dev/null; then break; fi
  sleep 0.1
done
if [[ -z "$address" ]]; then
  echo "demo.sh: peer 0 did not print its address (log: $logs/peer0.log)" >&2
  exit 1
fi
echo "== peers 1..$((peers - 1)) join through $address"
for ((i = 1; i < peers; i++)); do run_peer "$i" --initial_peers "$address"; done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
pids=()
if (( status != 0 )); then
  echo "demo.sh: a peer failed (logs in $logs/)" >&2
  exit 1
fi

echo "== baseline: one peer alone, on the same number of samples as each swarm peer"
build/examples/averaging_peer --shard "0/$peers" "${common[@]}" --alone 2>&1 |
  sed -u "s/^/[alone] /" | tee "$logs/alone.log" | grep -v ' epoch '

accuracy() { grep -o 'test accuracy: [0-9.]*%' "$1" | tail -1 | cut -d' ' -f3; }
rounds() { grep -c 'Finished averaging round' "$1" || true; }
echo
echo "== summary: test accuracy"
for ((i = 0; i < peers; i++)); do
  printf '  swarm peer %d: %7s   (%s averaging rounds)\n' "$i" "$(accuracy "$logs/peer$i.log")" "$(rounds "$logs/peer$i.log")"
done
printf '  alone:        %7s   (same %s samples per epoch, no averaging)\n' "$(accuracy "$logs/alone.log")" \
  "$((train_samples / peers))"
