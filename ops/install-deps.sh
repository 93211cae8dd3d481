#!/usr/bin/env bash
# Installs the system packages the test suite needs, if any is missing:
# redis-server and etcd (real backends for tests), protoc (etcd-client's build),
# prometheus (promtool and the real-Prometheus test), Xvfb and nasm (the media layer).
# Debian/Ubuntu only; needs root or sudo. Safe to run repeatedly.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server redis-tools)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
# promtool (rule checks and tests in ops/check-ops.sh) ships only in the server package.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# Xvfb for the media tests (agent/tests/media_x11.rs); nasm for OpenH264's SIMD kernels.
command -v Xvfb >/dev/null 2>&1 || need+=(xvfb)
command -v nasm >/dev/null 2>&1 || need+=(nasm)
# The Python gRPC example client (ops/examples/python), run by loadtest/tests/tenant_auth.rs.
/usr/bin/python3 -c 'import grpc, google.protobuf' >/dev/null 2>&1 || need+=(python3 python3-grpcio python3-protobuf)
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then sudo=(); elif command -v sudo >/dev/null 2>&1; then sudo=(sudo); else
  echo "missing packages: ${need[*]} (install them, or run as root)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing packages: ${need[*]}; this script knows only apt-get, install them by hand" >&2
  exit 1
fi
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
# Debian's packages start their own daemons where they can; tests start private ones on
# free ports and never use those.
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
