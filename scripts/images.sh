#!/usr/bin/env bash
# `make images`: the operator and scorer OCI images, built without a Docker engine.
#
# The Dockerfiles in images/ are for registries' CI; this script makes the same images here:
#   1. a distroless-style base root filesystem from Debian packages (libc6, libgcc-s1,
#      libstdc++6, ca-certificates) fetched with `apt-get download` and unpacked with
#      `dpkg-deb -x` (no maintainer scripts, no chroot, no shell), plus a nonroot user 65532
#      and the CA bundle;
#   2. the binaries from cargo (release by default) and, for the scorer, libonnxruntime.so
#      from the PyPI wheel in .venv (the same ONNX Runtime the tests run);
#   3. an OCI image layout per image with umoci: the base layer, the app layer, and the
#      config (user 65532, entrypoint, ORT_DYLIB_PATH, OCI labels).
# Then it checks what can be checked without a container runtime: hadolint on every
# Dockerfile, each image's config (non-root user, entrypoint), and the binaries run inside
# the image's own root filesystem (chroot): `--version` for both, and the scorer serving a
# real ONNX model until /readyz answers 200, which proves ONNX Runtime loads from the image.
#
# usage: scripts/images.sh [--profile release|debug] [--out DIR]
#   --profile debug   reuse the test build (what `make test` checks); default release
#   --out DIR         where the OCI layouts go (default ~/.cache/millrace/images)
# Copy an image to a registry with skopeo: skopeo copy oci:DIR/millrace-operator:0.1.0 docker://...
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
log() { printf '[images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

profile=release
out=${MILLRACE_CACHE:-$HOME/.cache/millrace}/images
while [ $# -gt 0 ]; do
  case $1 in
    --profile) profile=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) die "unknown argument $1 (see the header of $0)" ;;
  esac
done
case $profile in release | debug) ;; *) die "--profile is release or debug" ;; esac

command -v umoci >/dev/null || die "umoci is missing: run scripts/setup.sh"
[ -x .venv/bin/hadolint ] || die "hadolint is missing from .venv: run scripts/setup.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/millrace/target}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
ort_lib=$(ls .venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1)
ort_name=$(basename "$ort_lib")

log "hadolint images/*.Dockerfile"
.venv/bin/hadolint images/*.Dockerfile

cargo_flags=(--locked -p millrace-operator -p millrace-scorer --bin millrace-operator --bin millrace-scorer)
[ "$profile" = release ] && cargo_flags+=(--release)
log "building the binaries ($profile)"
cargo build --quiet "${cargo_flags[@]}"
bin_dir=$CARGO_TARGET_DIR/$profile

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- 1. the base root filesystem -----------------------------------------------------------
debs=${MILLRACE_CACHE:-$HOME/.cache/millrace}/debs
mkdir -p "$debs"
packages=(libc6 libgcc-s1 gcc-12-base libstdc++6 ca-certificates)
missing=()
for p in "${packages[@]}"; do
  compgen -G "$debs/${p}_*.deb" >/dev/null || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "downloading Debian packages: ${missing[*]}"
  (cd "$debs" && apt-get download "${missing[@]}" >/dev/null 2>&1) ||
    (apt-get update -qq && cd "$debs" && apt-get download "${missing[@]}" >/dev/null)
fi
base=$work/base
mkdir -p "$base"
for p in "${packages[@]}"; do dpkg-deb -x "$(ls "$debs/${p}"_*.deb | head -n1)" "$base"; done
rm -rf "$base"/usr/share/{doc,man,info,lintian} "$base"/usr/share/locale "$base"/etc/init.d
# update-ca-certificates is a maintainer script we do not run: make its bundle ourselves.
mkdir -p "$base/etc/ssl/certs"
find "$base/usr/share/ca-certificates" -name '*.crt' -print0 | sort -z | xargs -0 cat >"$base/etc/ssl/certs/ca-certificates.crt"
rm -rf "$base/usr/sbin" "$base/sbin" "$base/usr/bin" "$base/bin"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$base/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$base/etc/group"
mkdir -p "$base/tmp" "$base/home/nonroot"
chmod 1777 "$base/tmp"
chown 65532:65532 "$base/home/nonroot"

# --- 2 and 3. the images ----------------------------------------------------------------
# image NAME ENTRYPOINT_BINARY PORT [extra umoci config args...]; the app layer is $work/NAME
image() {
  local name=$1 binary=$2 port=$3; shift 3
  local layout=$out/$name ref="$out/$name:$version"
  rm -rf "$layout"
  umoci init --layout "$layout"
  umoci new --image "$ref"
  umoci insert --image "$ref" "$base" /
  umoci insert --image "$ref" "$work/$name" /
  umoci config --image "$ref" \
    --config.user 65532:65532 \
    --config.entrypoint "/usr/local/bin/$binary" \
    --config.exposedports "$port/tcp" \
    --config.workingdir / \
    --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --config.label org.opencontainers.image.title="$name" \
    --config.label org.opencontainers.image.version="$version" \
    --config.label org.opencontainers.image.source=https://github.com/millrace-dev/millrace \
    --config.label org.opencontainers.image.licenses=Apache-2.0 \
    "$@"
  umoci gc --layout "$layout"
  log "built $ref ($(du -sh "$layout" | cut -f1))"
}

mkdir -p "$out"
install -D -m 0755 "$bin_dir/millrace-operator" "$work/millrace-operator/usr/local/bin/millrace-operator"
image millrace-operator millrace-operator 8081
install -D -m 0755 "$bin_dir/millrace-scorer" "$work/millrace-scorer/usr/local/bin/millrace-scorer"
install -D -m 0644 "$ort_lib" "$work/millrace-scorer/usr/local/lib/$ort_name"
image millrace-scorer millrace-scorer 8080 --config.env "ORT_DYLIB_PATH=/usr/local/lib/$ort_name"

# --- checks -------------------------------------------------------------------------------
# config NAME: the image config as JSON (index -> manifest -> config blob).
config() {
  local layout=$out/$1
  python3 - "$layout" <<'PY'
import json, sys
layout = sys.argv[1]
blob = lambda d: f"{layout}/blobs/{d.replace(':', '/')}"
index = json.load(open(f"{layout}/index.json"))
manifest = json.load(open(blob(index["manifests"][0]["digest"])))
print(json.dumps(json.load(open(blob(manifest["config"]["digest"])))))
PY
}
for name in millrace-operator millrace-scorer; do
  cfg=$(config "$name")
  user=$(jq -r '.config.User' <<<"$cfg")
  entry=$(jq -r '.config.Entrypoint | join(" ")' <<<"$cfg")
  [ "$user" = 65532:65532 ] || die "$name runs as '$user', not 65532:65532"
  [ "$entry" = "/usr/local/bin/$name" ] || die "$name entrypoint is '$entry'"
  bundle=$work/bundle-$name
  umoci unpack --image "$out/$name:$version" "$bundle" >/dev/null
  rootfs=$bundle/rootfs
  [ ! -e "$rootfs/bin/sh" ] && [ ! -e "$rootfs/usr/bin/sh" ] || die "$name has a shell"
  got=$(chroot --userspec=65532:65532 "$rootfs" "/usr/local/bin/$name" --version)
  log "$name: user $user, entrypoint $entry, no shell, runs in its rootfs: $got"
done

# The scorer in its own root filesystem, as the nonroot user, serving a real model.
rootfs=$work/bundle-millrace-scorer/rootfs
model_dir=$rootfs/tmp/model
mkdir -p "$model_dir"
.venv/bin/python scorer/tests/support/make_model.py "$model_dir" 4 2 >/dev/null
chown -R 65532:65532 "$model_dir"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$model_dir/config.json" <<EOF
{"resource": {"namespace": "images", "name": "check"},
 "model": {"uri": "file:///tmp/model/model.onnx", "path": "/tmp/model/model.onnx", "version": "1",
           "inputs": ["a", "b", "c", "d"], "output": "y"},
 "executionProviders": ["cpu"], "keyPrefix": "images/check",
 "features": {"requestTime": [], "timeZone": "UTC", "missing": {"policy": "fill", "fillValue": 0.0}},
 "cache": {"redisCluster": false, "batchTTL": "1h", "realtimeTTL": "1m", "maxStaleness": "1h",
           "memory": {"maxEntries": 10, "ttl": "1s"}},
 "serving": {"port": $port, "topology": "unified", "latencyBudget": "100ms", "fallback": {"default": 0.5},
             "microBatch": {"maxBatchSize": 8, "maxDelay": "1ms"}}}
EOF
env -i ORT_DYLIB_PATH="/usr/local/lib/$ort_name" "$(command -v chroot)" --userspec=65532:65532 "$rootfs" \
  /usr/local/bin/millrace-scorer serve --config /tmp/model/config.json \
  --redis-url redis://127.0.0.1:1/0 --listen "127.0.0.1:$port" >"$work/scorer.log" 2>&1 &
scorer_pid=$!
ready=
for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then ready=1; break; fi
  kill -0 "$scorer_pid" 2>/dev/null || break
  sleep 0.1
done
kill "$scorer_pid" 2>/dev/null || true
wait "$scorer_pid" 2>/dev/null || true
[ -n "$ready" ] || { cat "$work/scorer.log" >&2; die "the scorer never became ready inside its image"; }
log "millrace-scorer: loaded a real ONNX model with the image's ONNX Runtime and answered /readyz"
log "done: OCI layouts in $out (millrace-operator:$version, millrace-scorer:$version)"
