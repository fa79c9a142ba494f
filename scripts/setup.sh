#!/usr/bin/env bash
# One idempotent setup for a fresh machine, called by both README commands (make demo, make
# test). Installs only what is missing, so a second run takes seconds:
#   - Debian packages: redis-server and redis-tools (the real Redis the tests run against),
#     wrk (the benchmark's load generator), lua5.1 (the Argo CD health check's tests),
#     umoci and jq (OCI images without Docker)
#   - .venv: the PyPI onnxruntime wheel (its libonnxruntime.so backs the `ort` crate), the
#     onnx/numpy packages that make test models, moto (S3 for tests), the Azure SDK (to
#     seed Azurite) and the benchmark
#     baseline's own dependencies (pandas, pyarrow, FastAPI, uvicorn, redis-py)
#   - the local control plane's binaries, built from pinned Go modules, and the object-store
#     emulators behind the gs:// and az:// tests (fake-gcs-server from Go, Azurite from npm)
#     (e2e/scripts/build-tools.sh)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '[setup] %s\n' "$*" >&2; }

need_cmd() {
  command -v "$1" >/dev/null 2>&1 || { log "error: $1 is required ($2)"; exit 1; }
}
need_cmd go "the local control plane is built from Go modules"
need_cmd cargo "Millrace is a Rust workspace"
need_cmd python3 "ONNX Runtime comes from the PyPI wheel in a virtualenv"
need_cmd npm "the az:// tests run Azurite, the Azure Storage emulator, from npm"

# --- Debian packages --------------------------------------------------------------------
apt_missing=()
command -v redis-server >/dev/null 2>&1 || apt_missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || apt_missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || apt_missing+=(openssl)
command -v curl >/dev/null 2>&1 || apt_missing+=(curl)
# wrk: the HTTP load generator of the serving benchmark (the baseline's own tool).
command -v wrk >/dev/null 2>&1 || apt_missing+=(wrk)
# lua5.1: runs the Argo CD health check against its fixtures (Argo CD embeds Lua 5.1).
command -v lua5.1 >/dev/null 2>&1 || apt_missing+=(lua5.1)
# umoci and jq: `make images` assembles OCI images without a Docker engine and checks them.
command -v umoci >/dev/null 2>&1 || apt_missing+=(umoci)
command -v jq >/dev/null 2>&1 || apt_missing+=(jq)
if [ ${#apt_missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${apt_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Install without starting the packaged service: tests start their own servers.
  policy=/usr/sbin/policy-rc.d
  created_policy=
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1; fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
  [ -n "$created_policy" ] && rm -f "$policy"
fi

# --- Rust components ----------------------------------------------------------------------
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    log "installing the rust $component component"
    rustup component add "$component"
  fi
done

# --- Python virtualenv with ONNX Runtime --------------------------------------------------
venv=$root/.venv
stamp=$venv/.requirements.sha256
want=$(sha256sum "$root/scripts/requirements.txt" | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating the Python environment in .venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/scripts/requirements.txt"
  echo "$want" >"$stamp"
fi

# --- Go-built control plane ---------------------------------------------------------------
"$root/e2e/scripts/build-tools.sh" >/dev/null
log "ready"
