#!/usr/bin/env bash
# The main job (`make demo`): bring up the local control plane on embedded defaults and show
# what Millrace runs on: a CPU pool and a tainted GPU pool, and a GPU workload placed by the
# real scheduler. Later issues grow this into the full hybrid-inference story.
# Cleans up on exit or Ctrl-C; a cluster that was already running is left running.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
say() { printf '\n\033[1m%s\033[0m\n' "$*"; }

scripts/setup.sh
eval "$(scripts/env.sh)"

started=
cleanup() {
  kubectl delete namespace millrace-demo --ignore-not-found --wait=false >/dev/null 2>&1 || true
  if [ -n "$started" ]; then say "Stopping the local control plane"; e2e/cluster down; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if e2e/cluster status >/dev/null 2>&1; then
  say "Using the local control plane that is already running"
else
  say "Starting the local control plane (etcd, kube-apiserver, controller manager, scheduler, kwok)"
  e2e/cluster up
  started=1
fi

say "The node pools: three CPU nodes, and two GPU nodes that only GPU workloads tolerate"
e2e/cluster status

say "A scorer-shaped Deployment asking for one GPU on the gpu pool"
kubectl create namespace millrace-demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -n millrace-demo -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: scorer-demo}
spec:
  replicas: 2
  selector: {matchLabels: {app: scorer-demo}}
  template:
    metadata: {labels: {app: scorer-demo}}
    spec:
      nodeSelector: {pool: gpu}
      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
      containers:
      - name: scorer
        image: millrace.dev/scorer:demo
        resources: {limits: {nvidia.com/gpu: "1"}}
YAML
kubectl rollout status -n millrace-demo deployment/scorer-demo --timeout=60s
say "Where the scheduler put them"
kubectl get pods -n millrace-demo -o wide
