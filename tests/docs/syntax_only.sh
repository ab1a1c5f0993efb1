#!/bin/sh
# The compiler launcher of the docs snippets: runs the compile command it is given with
# -fsyntax-only (parsing and template instantiation, no code generation: 45 s instead of
# 4 min for the snippets' translation unit), then creates the empty object the build expects.
# The object is never linked; the dependency file is still written, so a header change
# re-checks the snippets.
set -eu
out=""
prev=""
for arg in "$@"; do
  if [ "$prev" = "-o" ]; then out="$arg"; fi
  prev="$arg"
done
"$@" -fsyntax-only
if [ -n "$out" ]; then : > "$out"; fi
