#!/usr/bin/env bash
# Live inference while training (examples/live_inference.cpp): a swarm of averaging peers trains
# Fashion-MNIST in one process while clients stream test batches to it, served from snapshots,
# from a replica and from live weights. Installs what it needs (gnuplot for the plot), builds,
# runs; results go to build/live_inference/ (live_inference.csv, live_inference.png).
#
#   bash scripts/live_inference.sh [flags of live_inference, e.g. --clients 8 --phase_seconds 30]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh gnuplot-nox
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build --target live_inference -j "$(nproc)"
exec build/examples/live_inference --out build/live_inference "$@"
