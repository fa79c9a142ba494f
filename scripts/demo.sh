#!/usr/bin/env bash
# The main job (`make demo`): Millrace end to end on the local control plane, narrated.
#   control plane (etcd, kube-apiserver, controller manager, scheduler, kwok GPU and CPU
#   nodes) → `helm install` of the chart (CRD, RBAC, ServiceAccount) → the operator running
#   with that ServiceAccount's token, so it has exactly the chart's RBAC → the story
#   (millrace_e2e::story, the same one operator/tests/story.rs asserts): the example's
#   model and users in S3, `kubectl apply`, a bad spec refused, real scorer and batch
#   processes started from the pod specs the operator rendered, batch hits, real-time
#   misses, a fallback while Redis is down, the autoscaler reacting to a miss spike, and
#   deletion cleaning Redis.
# Cleans up on exit or Ctrl-C; a cluster that was already running is left running.
# DEMO_USERS=N changes the example's size (default 20000).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

scripts/setup.sh
eval "$(scripts/env.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/millrace/target}

work=$(mktemp -d)
release=millrace
system_ns=millrace-system
demo_ns=millrace-demo
started= operator_pid= installed=
cleanup() {
  set +e
  [ -n "$operator_pid" ] && kill "$operator_pid" 2>/dev/null && wait "$operator_pid" 2>/dev/null
  kubectl delete namespace "$demo_ns" --ignore-not-found --wait=false >/dev/null 2>&1
  if [ -n "$installed" ]; then helm uninstall "$release" -n "$system_ns" >/dev/null 2>&1; fi
  kubectl delete namespace "$system_ns" --ignore-not-found --wait=false >/dev/null 2>&1
  if [ -n "$started" ]; then say "Stopping the local control plane"; e2e/cluster down; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "Building the operator, the scorer and the story"
cargo build --quiet --locked -p millrace-operator -p millrace-scorer -p millrace-e2e \
  --bin millrace-operator --bin millrace-scorer --bin millrace-story
bin=$CARGO_TARGET_DIR/debug

if e2e/cluster status >/dev/null 2>&1; then
  say "Using the local control plane that is already running"
else
  say "Starting the local control plane (etcd, kube-apiserver, controller manager, scheduler, kwok)"
  e2e/cluster up
  started=1
fi
run kubectl get nodes -L pool -o custom-columns='NODE:.metadata.name,POOL:.metadata.labels.pool,GPUS:.status.allocatable.nvidia\.com/gpu'

say "helm install the chart: the CRD, the operator's ServiceAccount and least-privilege RBAC"
# replicaCount=0: kwok nodes cannot run the operator's image, so the operator runs here,
# as the chart's ServiceAccount (below), with the environment of the chart's pod spec.
run helm install "$release" charts/millrace -n "$system_ns" --create-namespace \
  --take-ownership --set replicaCount=0 --wait
installed=1
sa=system:serviceaccount:$system_ns:$release
printf '\nWhat the ServiceAccount may do (kubectl auth can-i --as %s):\n' "$sa"
for check in "patch inferencedeployments.millrace.dev" "patch deployments.apps/scale" \
  "get secrets" "list secrets" "delete deployments.apps" "create pods" "get nodes"; do
  # shellcheck disable=SC2086
  printf '  %-42s %s\n' "$check" "$(kubectl auth can-i $check --as "$sa" -A 2>/dev/null || true)"
done

say "The operator, with only the chart's RBAC (a ServiceAccount token)"
token=$(kubectl create token "$release" -n "$system_ns" --duration 2h)
server=$(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.server}')
ca=$(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
cat >"$work/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "$server", certificate-authority-data: "$ca"}}]
users: [{name: millrace, user: {token: "$token"}}]
contexts: [{name: millrace, context: {cluster: local, user: millrace}}]
current-context: millrace
EOF
# The environment the chart gives the operator's container (plain values only; the pod's
# name and namespace are the downward API's).
mapfile -t chart_env < <(kubectl get deployment "$release" -n "$system_ns" -o json |
  jq -r '.spec.template.spec.containers[0].env[] | select(.value != null) | "\(.name)=\(.value)"')
env "${chart_env[@]}" KUBECONFIG="$work/kubeconfig" POD_NAME=millrace-demo-operator \
  POD_NAMESPACE="$system_ns" MILLRACE_ADMIN_ADDR=127.0.0.1:0 RUST_LOG=info,kube=warn \
  "$bin/millrace-operator" >"$work/operator.log" 2>&1 &
operator_pid=$!
printf 'millrace-operator (pid %s) with %s; log: %s\n' "$operator_pid" "${chart_env[*]}" "$work/operator.log"
until grep -q "became the leader" "$work/operator.log"; do
  kill -0 "$operator_pid" 2>/dev/null || { cat "$work/operator.log"; exit 1; }
  sleep 0.2
done

"$bin/millrace-story" --namespace "$demo_ns" --scorer "$bin/millrace-scorer" \
  --users "${DEMO_USERS:-20000}"

say "Done. The operator never needed more than the chart grants:"
if grep -qi forbidden "$work/operator.log"; then
  grep -i forbidden "$work/operator.log" | head -n 3
else
  printf 'no RBAC denial in its log (%s lines).\n' "$(wc -l <"$work/operator.log")"
fi
