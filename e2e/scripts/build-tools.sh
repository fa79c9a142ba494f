#!/usr/bin/env bash
# Builds the local control plane's binaries (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm, controller-gen) and the GCS emulator (fake-gcs-server)
# from the pinned Go modules under e2e/go/, installs the Azure Storage emulator (Azurite)
# from npm, and caches
# them by version outside the work tree so a second run costs nothing.
#
# Each tool family is its own Go module so that their dependency versions never pull on each
# other (helm and kwok track newer k8s.io libraries than the control plane we pin).
#
# usage: e2e/scripts/build-tools.sh        prints the bin directory on stdout when done
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=e2e/scripts/versions.sh
source "$here/scripts/versions.sh"

log() { printf '[build-tools] %s\n' "$*" >&2; }

# build MODULE_DIR OUT_DIR LDFLAGS PKG...  (each PKG is a main package; binary = last path part)
build() {
  local moddir=$1 out=$2 ldflags=$3; shift 3
  local pkg name missing=()
  for pkg in "$@"; do
    name=${pkg##*/}
    # etcd's main package is the module root of go.etcd.io/etcd/server/v3.
    [ "$name" = v3 ] && name=etcd
    [ -x "$out/$name" ] || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  mkdir -p "$out"
  for pkg in "${missing[@]}"; do
    name=${pkg##*/}; [ "$name" = v3 ] && name=etcd
    log "building $name into $out (a cold build takes minutes)"
    ( cd "$moddir" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w $ldflags" -o "$out/$name.tmp" "$pkg" )
    mv "$out/$name.tmp" "$out/$name"
  done
}

k8s_ldflags() {
  local v=$KUBERNETES_VERSION major minor
  major=${v#v}; major=${major%%.*}
  minor=${v#v"$major".}; minor=${minor%%.*}
  local f=""
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    f+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    f+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$f"
}

build "$here/go/kubernetes" "$KUBERNETES_BIN" "$(k8s_ldflags)" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
build "$here/go/etcd" "$ETCD_BIN" "" go.etcd.io/etcd/server/v3
build "$here/go/kwok" "$KWOK_BIN" "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
  sigs.k8s.io/kwok/cmd/kwok
# Like Helm's own release build, the default Kubernetes version of `helm template` and
# `helm lint` (without --kube-version) is the client-go minor Helm is built against; a plain
# `go build` would leave it at v1.20 and refuse charts that need a newer cluster.
helm_k8s_minor=$(sed -n 's/^[[:space:]]*k8s.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$here/go/helm/go.mod")
build "$here/go/helm" "$HELM_BIN" "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
  -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$helm_k8s_minor \
  -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$helm_k8s_minor" \
  helm.sh/helm/v3/cmd/helm

build "$here/go/monitoring" "$MONITORING_DIR" "" sigs.k8s.io/controller-tools/cmd/controller-gen
# The monitoring.coreos.com CRDs the chart's ServiceMonitors and PrometheusRule are checked
# against (server-side dry-run), generated from the pinned API types like upstream does.
if [ ! -s "$MONITORING_DIR/crds/monitoring.coreos.com_servicemonitors.yaml" ]; then
  log "generating the monitoring.coreos.com CRDs"
  # `go list -m` names a module's directory only once it is in the module cache, and building
  # controller-gen does not fetch the API types: download them first (a fresh machine has
  # nothing cached), and refuse an empty answer rather than run controller-gen elsewhere.
  types=$(cd "$here/go/monitoring" && GOFLAGS=-mod=mod go mod download -json \
    github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  if [ -z "$types" ] || [ ! -d "$types/v1" ]; then
    log "could not find the monitoring.coreos.com API types in the Go module cache ('$types')"
    exit 1
  fi
  rm -rf "$MONITORING_DIR/crds.tmp" && mkdir -p "$MONITORING_DIR/crds.tmp"
  ( cd "$types" && "$MONITORING_DIR/controller-gen" crd:crdVersions=v1,maxDescLen=0 paths=./v1/... \
      output:crd:dir="$MONITORING_DIR/crds.tmp" )
  rm -rf "$MONITORING_DIR/crds" && mv "$MONITORING_DIR/crds.tmp" "$MONITORING_DIR/crds"
fi

# The object-store emulators behind the gs:// and az:// tests.
build "$here/go/gcs" "$FAKE_GCS_BIN" "" github.com/fsouza/fake-gcs-server
if [ ! -x "$AZURITE_DIR/node_modules/.bin/azurite-blob" ]; then
  log "installing Azurite $AZURITE_VERSION from npm into $AZURITE_DIR"
  mkdir -p "$AZURITE_DIR"
  npm install --prefix "$AZURITE_DIR" --no-audit --no-fund --silent "azurite@$AZURITE_VERSION" >&2
fi

# One directory of symlinks so PATH needs a single entry.
mkdir -p "$TOOLS_BIN"
for f in "$KUBERNETES_BIN"/* "$ETCD_BIN"/* "$KWOK_BIN"/* "$HELM_BIN"/* "$FAKE_GCS_BIN"/* \
  "$AZURITE_DIR/node_modules/.bin/azurite-blob"; do
  ln -sfn "$f" "$TOOLS_BIN/$(basename "$f")"
done
echo "$TOOLS_BIN"
