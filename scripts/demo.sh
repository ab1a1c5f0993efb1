#!/usr/bin/env bash
# Builds and runs the demo program (examples/hive_demo.cpp); arguments go to the program.
#   bash scripts/demo.sh [args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ ! -f examples/hive_demo.cpp ]]; then
  echo "demo.sh: examples/hive_demo.cpp does not exist yet, so there is no demo to run" >&2
  exit 1
fi

bash scripts/setup.sh

mkdir -p build
# The configure log only matters when it fails; the demo's own output is what to read.
if ! cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >build/configure-demo.log 2>&1; then
  cat build/configure-demo.log >&2
  echo "demo.sh: configuring build/ failed (log above)" >&2
  exit 1
fi
cmake --build build --target hive_demo -j "$(nproc)"
exec build/examples/hive_demo "$@"
