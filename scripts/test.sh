#!/usr/bin/env bash
# The whole test suite, as CI runs it (`make test`): setup, static checks, then every Rust
# test with the local control plane up, then the control plane's own lifecycle checks.
# The cluster is always torn down, also on failure or Ctrl-C.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
step() { printf '\n==> %s\n' "$*"; }
t_start=$SECONDS

step "setup"
scripts/setup.sh
eval "$(scripts/env.sh)"

step "format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

step "generated files (CRD, chart copy, reference) match the code"
cargo run --quiet --locked -p millrace-crds --bin crdgen -- --check

step "build the tests"
cargo test --workspace --locked --no-run

step "container images (the test build's binaries; make images builds release)"
scripts/images.sh --profile debug --out "${MILLRACE_CACHE:-$HOME/.cache/millrace}/images-test"

step "helm"
helm version --short
helm lint --strict charts/millrace

step "local control plane up"
cluster_started=
teardown() {
  if [ -n "$cluster_started" ]; then
    e2e/cluster down || true
  fi
}
trap teardown EXIT
trap 'exit 130' INT TERM
t_up=$SECONDS
e2e/cluster up
cluster_started=1
echo "cluster up took $((SECONDS - t_up))s"
kubectl version
e2e/scripts/check-cluster-lifecycle.sh while-running

step "tests"
cargo test --workspace --locked

step "local control plane down"
e2e/cluster down
cluster_started=
e2e/scripts/check-cluster-lifecycle.sh after-down

echo "test suite finished in $((SECONDS - t_start))s"
