#!/usr/bin/env bash
# Builds the test binaries in build/ (RelWithDebInfo) and runs every test with ctest. This is
# what CI runs; exits non-zero when set-up, the build or any test fails, or no test ran.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

jobs=$(nproc)
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo
# Only the tests: examples and benchmarks cost minutes of libtorch compiles that CI's
# budget is better spent on. hive_tests depends on every test binary.
cmake --build build --target hive_tests -j "$jobs"
# -j2: each test binary is itself multithreaded, more would only oversubscribe 2 cores.
# --no-tests=error: a build that registered nothing must not pass as "no failures".
ctest --test-dir build --output-on-failure -j 2 --no-tests=error
