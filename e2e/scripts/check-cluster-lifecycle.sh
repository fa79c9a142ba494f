#!/usr/bin/env bash
# Checks on e2e/cluster itself, which the Rust tests cannot make from inside the cluster:
#   while-running  a second `up` is refused and says why; `status` reports every component;
#                  the binaries report the pinned versions
#   after-down     every process the cluster started is gone and no port is still bound
set -euo pipefail

e2e_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=e2e/scripts/versions.sh
source "$e2e_dir/scripts/versions.sh"
state=${MILLRACE_CLUSTER_DIR:-$MILLRACE_CACHE/cluster}
port_base=${MILLRACE_PORT_BASE:-26400}

passed=0 failed=0
check() {
  local what=$1; shift
  if "$@"; then passed=$((passed + 1)); echo "ok   $what"
  else failed=$((failed + 1)); echo "FAIL $what"; fi
}

second_up_is_refused() {
  local out
  if out=$("$e2e_dir/cluster" up 2>&1); then return 1; fi
  grep -q "already running" <<<"$out"
}
status_reports_all_running() {
  local out
  out=$("$e2e_dir/cluster" status) || return 1
  [ "$(grep -c ' running (pid' <<<"$out")" -eq 5 ] && [ "$(grep -c ' True ' <<<"$out")" -eq 5 ]
}
# The output is read whole before it is searched: `grep -q` in a pipe exits at its first
# match, and under pipefail a binary still printing then dies of SIGPIPE and fails the check.
reports_version() {
  local out
  out=$("$TOOLS_BIN/$1" "${@:3}" 2>&1) || return 1
  grep -q -- "$2" <<<"$out"
}
no_component_process_left() {
  local f
  for f in "$state"/pids/*.pid; do [ -e "$f" ] && return 1; done
  ! pgrep -f "$TOOLS_BIN/" >/dev/null
}
no_port_bound() {
  local offset
  for offset in 43 57 59 79 80; do
    (exec 3<>"/dev/tcp/127.0.0.1/$((port_base + offset))") 2>/dev/null && return 1
  done
  return 0
}

case "${1:-}" in
  while-running)
    check "a second 'up' is refused while the cluster runs" second_up_is_refused
    check "'status' shows 5 running components and 5 Ready nodes" status_reports_all_running
    check "kube-apiserver reports $KUBERNETES_VERSION" reports_version kube-apiserver "Kubernetes $KUBERNETES_VERSION" --version
    check "kube-controller-manager reports $KUBERNETES_VERSION" reports_version kube-controller-manager "Kubernetes $KUBERNETES_VERSION" --version
    check "kube-scheduler reports $KUBERNETES_VERSION" reports_version kube-scheduler "Kubernetes $KUBERNETES_VERSION" --version
    check "etcd reports ${ETCD_VERSION#v}" reports_version etcd "etcd Version: ${ETCD_VERSION#v}" --version
    check "kwok reports $KWOK_VERSION" reports_version kwok "$KWOK_VERSION" --version
    check "helm reports $HELM_VERSION" reports_version helm "$HELM_VERSION" version --short
    ;;
  after-down)
    check "no process of the cluster is left" no_component_process_left
    check "no port of the cluster is still bound" no_port_bound
    ;;
  *) echo "usage: $0 while-running|after-down" >&2; exit 2 ;;
esac
echo "cluster checks: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
