#!/usr/bin/env bash
# Builds the test binaries in build/ (RelWithDebInfo) and runs every test with ctest, then runs
# each fuzz target for 30 s (scripts/fuzz.sh). This is what CI runs; exits non-zero when set-up,
# a build or any test fails, no test ran, or a fuzz target found a crash, leak or hang.
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
# Every libFuzzer target for 30 s from its seeds, under ASan and UBSan (a clang build in
# build-fuzz/; docs/fuzzing.md).
bash scripts/fuzz.sh --seconds 30
