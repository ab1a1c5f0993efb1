#!/usr/bin/env bash
# Builds the tests under sanitizers, each mode in a build tree of its own, and runs them with
# ctest (docs/sanitizers.md). Exits non-zero when set-up, the build or a test fails, no test
# ran, or a sanitizer reported anything, in a test or in a program that a test started.
#
#   scripts/sanitize.sh asan [--all] [--configure-only]
#   scripts/sanitize.sh tsan [--configure-only]
#
#   asan              AddressSanitizer, LeakSanitizer and UBSan, in build-asan/: the torch-free
#                     suite (hive_core_tests) and, as root, the multi-host tests (the real
#                     programs on namespace hosts; four of them link libtorch and are built too)
#   asan --all        every test scripts/test.sh runs, the torch suite included (libtorch
#                     itself is not instrumented: what happens inside it goes unchecked)
#   tsan              ThreadSanitizer, in build-tsan/ configured without libtorch:
#                     hive_core_tests (core/, net/, dht/)
#   --configure-only  configure the tree and name what would be built and run
#
# Reports go to build-<mode>/sanitizer-logs/, one file per process that reported, and their
# summaries are printed at the end. Suppressions, each with its reason, are in
# tests/sanitizers/. ASAN_OPTIONS, UBSAN_OPTIONS, LSAN_OPTIONS and TSAN_OPTIONS from the
# environment are appended to the script's, so they win.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() { sed -n '6,7p' "${BASH_SOURCE[0]}" | sed 's/^#  */usage: /' >&2; exit 2; }

help() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0; }

mode="${1:-}"
[[ "$mode" == -h || "$mode" == --help ]] && help
[[ "$mode" == asan || "$mode" == tsan ]] || usage
shift
all=0
configure_only=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --all) [[ "$mode" == asan ]] || usage; all=1 ;;
    --configure-only) configure_only=1 ;;
    -h|--help) help ;;
    *) echo "sanitize.sh: unknown argument $1" >&2; usage ;;
  esac
  shift
done

bash scripts/setup.sh

root="$PWD"
build="build-$mode"
logs="$root/$build/sanitizer-logs"
supp="$root/tests/sanitizers"
# Sanitized code runs several times slower; the timeouts inside the tests stay as they are,
# only ctest's limit per test grows.
configure=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DHIVE_TEST_TIMEOUT=900)
if [[ "$mode" == asan ]]; then
  flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
  targets=(hive_core_tests)
  tests='^core/'
  if (( all )); then
    targets=(hive_tests)
    tests=''
  elif [[ $(id -u) -eq 0 ]]; then
    # Without root the multi-host tests only report themselves skipped: not worth building.
    targets+=(hive_multihost_tests)
    tests='^(core|multihost)/'
  fi
else
  # -Wno-tsan: GCC warns that TSan ignores std::atomic_thread_fence, once per handler type
  # (Asio fences its handler invocations). Fences only order what the scheduler's mutex
  # already orders, and no report has come from them.
  flags="-fsanitize=thread -fno-omit-frame-pointer -Wno-tsan"
  # Only hive::core: a torch-free tree, so nothing here can pull in libtorch by accident.
  configure+=(-DCMAKE_DISABLE_FIND_PACKAGE_Torch=ON)
  targets=(hive_core_tests)
  tests='^core/'
fi
configure+=("-DCMAKE_CXX_FLAGS=$flags" "-DCMAKE_EXE_LINKER_FLAGS=$flags")

# Reports go to files (log_path, named <mode>.<program>.<pid>), so that a child process's
# report is not lost in a pipe that a test reads and drops.
common="log_path=$logs/$mode:log_exe_name=1:print_summary=1"
export ASAN_OPTIONS="$common:detect_leaks=1:halt_on_error=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
export UBSAN_OPTIONS="$common:halt_on_error=1:print_stacktrace=1:suppressions=$supp/ubsan.supp${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
# halt_on_error=0: one run collects every race (a racy process still exits with 66).
export TSAN_OPTIONS="$common:halt_on_error=0:second_deadlock_stack=1:history_size=4:suppressions=$supp/tsan.supp${TSAN_OPTIONS:+:$TSAN_OPTIONS}"

start=$SECONDS
cmake -S . -B "$build" "${configure[@]}"
if (( configure_only )); then
  echo "sanitize.sh: $build configured; would build ${targets[*]} and run ctest -R '${tests:-.*}'"
  for t in "${targets[@]}"; do
    cmake --build "$build" --target help | grep -Eq "^(\.\.\. )?$t(:| |$)" ||
      { echo "sanitize.sh: $build has no target $t" >&2; exit 1; }
  done
  exit 0
fi
TIMEFORMAT="sanitize.sh: $mode: build: %0R s wall, %0U s user + %0S s sys"
time cmake --build "$build" --target "${targets[@]}" -j "$(nproc)"
built=$SECONDS

rm -rf "$logs"
mkdir -p "$logs"
ctest_args=(--test-dir "$build" --output-on-failure -j 2 --no-tests=error)
[[ -n "$tests" ]] && ctest_args+=(-R "$tests")
# UBSan checks a vptr it has not seen before by reading the object's memory through a pipe;
# the descriptor-exhaustion test leaves the process no descriptor for one, so UBSan reports
# the std::system_error that Asio builds for the refused accept as having an invalid vptr
# (docs/sanitizers.md, "What it found"). A suppression cannot match: the type is unknown
# when the probe fails. The test runs in every plain run of the suite.
[[ "$mode" == asan ]] && ctest_args+=(-E 'descriptor exhaustion')
status=0
TIMEFORMAT="sanitize.sh: $mode: tests: %0R s wall, %0U s user + %0S s sys"
time ctest "${ctest_args[@]}" || status=$?
tested=$SECONDS

reports=("$logs"/*)
if [[ -e "${reports[0]}" ]]; then
  for r in "${reports[@]}"; do
    echo "==== sanitize.sh: $r"
    grep -h '^SUMMARY' "$r" | sort | uniq -c
  done
  echo "==== sanitize.sh: the first report of ${reports[0]##*/} in full"
  sed -n '1,/^SUMMARY/p' "${reports[0]}"
  echo "sanitize.sh: ${#reports[@]} process(es) reported findings (summaries above; reports in $logs)" >&2
  (( status )) || status=1
fi
echo "sanitize.sh: $mode: configure and build $((built - start)) s, tests $((tested - built)) s (wall)"
exit "$status"
