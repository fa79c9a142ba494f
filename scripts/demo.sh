#!/usr/bin/env bash
# The main job (`make demo`): the local control plane on embedded defaults, the operator,
# and the example InferenceDeployment, narrated:
#   node pools → CRD → operator → `kubectl apply` of the example → its children, scorers on
#   GPU nodes, Ready → a bad spec refused by the API server → a batch run that the operator
#   refuses to publish because no shard confirmed it → deletion cleaning the Redis keys.
# Cleans up on exit or Ctrl-C; a cluster that was already running is left running.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

scripts/setup.sh
eval "$(scripts/env.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/millrace/target}

work=$(mktemp -d)
started= operator_pid= redis_pid=
cleanup() {
  set +e
  kubectl delete namespace millrace-demo --ignore-not-found --wait=false >/dev/null 2>&1
  [ -n "$operator_pid" ] && kill "$operator_pid" 2>/dev/null && wait "$operator_pid" 2>/dev/null
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null
  if [ -n "$started" ]; then say "Stopping the local control plane"; e2e/cluster down; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "Building the operator"
cargo build --quiet --locked -p millrace-operator

if e2e/cluster status >/dev/null 2>&1; then
  say "Using the local control plane that is already running"
else
  say "Starting the local control plane (etcd, kube-apiserver, controller manager, scheduler, kwok)"
  e2e/cluster up
  started=1
fi
e2e/cluster status | tail -n 6

say "A Redis for the predictions (port 26379)"
redis-server --bind 127.0.0.1 --port 26379 --save '' --appendonly no >"$work/redis.log" 2>&1 &
redis_pid=$!
until redis-cli -p 26379 ping >/dev/null 2>&1; do sleep 0.1; done

say "Installing the CRD and starting the operator"
run kubectl apply --server-side -f crds/inferencedeployments.millrace.dev.yaml
kubectl wait --for=condition=Established crd/inferencedeployments.millrace.dev >/dev/null
"$CARGO_TARGET_DIR/debug/millrace-operator" --lease-namespace default --admin-addr 127.0.0.1:0 \
  >"$work/operator.log" 2>&1 &
operator_pid=$!

say "kubectl apply of examples/churn/inferencedeployment.yaml (Redis pointed at the local one)"
kubectl create namespace millrace-demo >/dev/null
sed 's|redis://redis.ml.svc:6379/0|redis://127.0.0.1:26379/0|' examples/churn/inferencedeployment.yaml >"$work/churn.yaml"
run kubectl apply -n millrace-demo -f "$work/churn.yaml"
kubectl wait -n millrace-demo --for=condition=Ready infd/churn --timeout=60s >/dev/null
run kubectl get -n millrace-demo infd
run kubectl get -n millrace-demo deployment,service,configmap,pdb,cronjob -l millrace.dev/inference-deployment=churn
say "The scorer runs on a GPU node and holds one GPU"
kubectl get -n millrace-demo pods -l app.kubernetes.io/component=scorer \
  -o custom-columns='POD:.metadata.name,NODE:.spec.nodeName,GPU:.spec.containers[0].resources.limits.nvidia\.com/gpu,STATUS:.status.phase'

say "A bad spec never reaches the operator: the API server names the field"
printf '$ kubectl patch infd churn -p {"spec":{"cache":{"maxStaleness":"48h"}}}\n'
kubectl patch -n millrace-demo infd churn --type=merge -p '{"spec":{"cache":{"maxStaleness":"48h"}}}' 2>&1 || true

say "Run the batch now: 8 shards as an Indexed Job"
run kubectl annotate -n millrace-demo infd churn millrace.dev/run-batch=demo-1
kubectl wait -n millrace-demo --for=condition=BatchSucceeded=False infd/churn --timeout=60s >/dev/null
run kubectl get -n millrace-demo jobs
printf '\nThe simulated shards exited 0 but none recorded completion in Redis (kwok simulates\n'
printf 'the pods; no scorer ran), so the operator refuses to publish the generation:\n'
kubectl get -n millrace-demo infd churn \
  -o jsonpath='{range .status.conditions[?(@.type=="BatchSucceeded")]}  BatchSucceeded={.status} ({.reason}): {.message}{"\n"}{end}'

say "Deleting the resource removes its children and its Redis keys, nothing else"
redis-cli -p 26379 set 'mr:millrace-demo/churn:3:rt:{user_1}' x >/dev/null
redis-cli -p 26379 set 'someone-else:key' x >/dev/null
run kubectl delete -n millrace-demo infd churn --cascade=foreground --wait=true --timeout=60s
kubectl wait -n millrace-demo --for=delete pod -l millrace.dev/inference-deployment=churn --timeout=60s >/dev/null 2>&1 || true
printf 'keys left in Redis: %s\n' "$(redis-cli -p 26379 --raw keys '*' | tr '\n' ' ')"
run kubectl get -n millrace-demo all
say "Done. The operator's log is below."
tail -n 5 "$work/operator.log"
