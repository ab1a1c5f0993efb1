#!/usr/bin/env bash
# The Learning@home convergence grid (examples/learning_at_home.cpp) on hive's emulator:
# expert servers, a client DHT and the trainers in one process on net::Simulated, trained on
# Fashion-MNIST. Installs what it needs (gnuplot for the plots), builds, runs; results go to
# build/learning_at_home/ (one CSV per run, accuracy_<delay>ms.png per delay).
#
#   bash scripts/learning_at_home.sh                                   # reduced grid, 11 min on 2 cores
#   bash scripts/learning_at_home.sh --setup 1000ms-64-experts --seeds 1337,1338,1339,1340,1341
#   bash scripts/learning_at_home.sh --full --hidden_dim 128          # every setup and seed
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh gnuplot-nox
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build --target learning_at_home -j "$(nproc)"
exec build/examples/learning_at_home --out build/learning_at_home "$@"
