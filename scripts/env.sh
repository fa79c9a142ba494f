#!/usr/bin/env bash
# Prints the environment the tests and the demo run with, as export lines:
#   eval "$(scripts/env.sh)"
# ORT_DYLIB_PATH points the `ort` crate (load-dynamic) at the wheel's ONNX Runtime library;
# PATH gains the pinned control-plane tools; KUBECONFIG names the local cluster's admin config.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
lib=$(ls "$root"/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1 || true)
[ -n "$lib" ] && echo "export ORT_DYLIB_PATH=$lib"
"$root/e2e/cluster" env
