#!/usr/bin/env bash
# Benchmarks (`make bench`): figures printed, nothing asserted. The scorer's runs first;
# then the local control plane comes up for the operator's (and down after, unless it was
# already running).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/setup.sh
eval "$(scripts/env.sh)"

# The scorer benchmark needs no cluster: run it first, on a quiet machine.
printf '\n==> scorer: batch and serve against the seed_python baseline, same run, same data\n'
cargo bench --locked -p millrace-scorer --bench hybrid

printf '\n==> autoscaling: a simulated day, GPU replica-hours per strategy\n'
cargo run --quiet --locked --release -p millrace-operator --bin millrace-simulate

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
