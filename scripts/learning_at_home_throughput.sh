#!/usr/bin/env bash
# Learning@home's throughput experiment (examples/learning_at_home_throughput.cpp): DMoE
# trainers against a model-parallel pipeline over the same layers as the per-hop latency grows.
# Installs what it needs (gnuplot for the plot), builds, runs; results go to
# build/learning_at_home_throughput/ (throughput.csv, throughput.png).
#
#   bash scripts/learning_at_home_throughput.sh [flags of learning_at_home_throughput]
#       on the emulator (one process), e.g. --trainers 32 --latencies 0,100,200
#   bash scripts/learning_at_home_throughput.sh tcp [flags]
#       against real hive-server processes on this machine (127.0.0.1), one per "GPU"; the model
#       is set by the environment (SERVERS=2 LAYERS_PER_SERVER=2 EXPERTS_PER_LAYER=1
#       HIDDEN_DIM=512 BLOCK=ffn), so do not repeat those flags; results go to
#       build/learning_at_home_throughput/tcp/
# BUILD_DIR=other-build picks another build tree (default build).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

mode=emulator
if [[ "${1:-}" == "tcp" ]]; then
  mode=tcp
  shift
fi

bash scripts/setup.sh gnuplot-nox
build=${BUILD_DIR:-build}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
targets=(learning_at_home_throughput)
[[ $mode == tcp ]] && targets+=(hive-server)
cmake --build "$build" --target "${targets[@]}" -j "$(nproc)"

out=$build/learning_at_home_throughput
if [[ $mode == emulator ]]; then
  exec "$build"/examples/learning_at_home_throughput --out "$out" "$@"
fi

servers=${SERVERS:-2}
layers_per_server=${LAYERS_PER_SERVER:-2}
experts_per_layer=${EXPERTS_PER_LAYER:-1}
hidden_dim=${HIDDEN_DIM:-512}
block=${BLOCK:-ffn}
layers=$((servers * layers_per_server))
logs=$out/tcp
mkdir -p "$logs"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# Every server serves the whole model (L layers x E experts); the client picks one server per
# expert. Each prints its address once it listens.
hosts=()
for ((s = 0; s < servers; s++)); do
  log=$logs/server$s.log
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$build"/examples/hive-server --expert_cls "$block" --hidden_dim "$hidden_dim" \
    --expert_pattern "expert.[0:$layers].[0:$experts_per_layer]" --listen_on 127.0.0.1:0 >"$log" 2>&1 &
  pids+=($!)
  address=
  for _ in $(seq 1 240); do  # at most 2 minutes for libtorch to load and the server to listen
    address=$(sed -n 's/^Running a server at \([0-9.]*:[0-9]*\) .*/\1/p' "$log" | head -n 1)
    [[ -n $address ]] && break
    kill -0 "${pids[-1]}" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.5
  done
  [[ -n $address ]] || { echo "hive-server $s did not start; see $log" >&2; exit 1; }
  echo "hive-server $s at $address"
  hosts+=("$address")
done

"$build"/examples/learning_at_home_throughput --hosts "$(IFS=,; echo "${hosts[*]}")" \
  --layers_per_server "$layers_per_server" --experts_per_layer "$experts_per_layer" --hidden_dim "$hidden_dim" \
  --block "$block" --out "$logs" "$@"
