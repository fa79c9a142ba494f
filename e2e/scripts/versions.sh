# Pinned versions of the local control plane, and where their binaries are cached.
# Sourced by the e2e scripts. The Go modules under e2e/go/ pin the same versions; the cache
# directory name carries a hash of each module's go.sum so a changed pin rebuilds.
# shellcheck shell=bash

KUBERNETES_VERSION=v1.36.3
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0

MILLRACE_CACHE=${MILLRACE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/millrace}
_e2e_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_sum() { sha256sum "$_e2e_dir/go/$1/go.sum" | cut -c1-12; }
KUBERNETES_BIN=$MILLRACE_CACHE/tools/kubernetes-$KUBERNETES_VERSION-$(_sum kubernetes)
ETCD_BIN=$MILLRACE_CACHE/tools/etcd-$ETCD_VERSION-$(_sum etcd)
KWOK_BIN=$MILLRACE_CACHE/tools/kwok-$KWOK_VERSION-$(_sum kwok)
# -k8s: built with its default Kubernetes version set (see build-tools.sh).
HELM_BIN=$MILLRACE_CACHE/tools/helm-$HELM_VERSION-$(_sum helm)-k8s
# controller-gen and, under crds/, the ServiceMonitor and PrometheusRule CRDs it generates
# from the Prometheus Operator API types pinned in e2e/go/monitoring.
MONITORING_DIR=$MILLRACE_CACHE/tools/monitoring-$(_sum monitoring)
# Object-store emulators for the gs:// and az:// tests: fake-gcs-server (Go, e2e/go/gcs) and
# Azurite (npm, Microsoft's Azure Storage emulator).
FAKE_GCS_BIN=$MILLRACE_CACHE/tools/fake-gcs-server-$(_sum gcs)
AZURITE_VERSION=3.37.0
AZURITE_DIR=$MILLRACE_CACHE/tools/azurite-$AZURITE_VERSION
TOOLS_BIN=$MILLRACE_CACHE/bin
