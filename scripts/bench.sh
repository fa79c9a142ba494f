#!/usr/bin/env bash
# Benchmarks (`make bench`): figures printed, nothing asserted. Brings the local control
# plane up for the run (and down after, unless it was already running).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/setup.sh
eval "$(scripts/env.sh)"

started=
cleanup() { if [ -n "$started" ]; then e2e/cluster down; fi; }
trap cleanup EXIT
trap 'exit 130' INT TERM
if ! e2e/cluster status >/dev/null 2>&1; then
  e2e/cluster up
  started=1
fi

printf '\n==> operator: reconcile latency, memory, idle CPU\n'
cargo bench --locked -p millrace-operator --bench reconcile
