#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine, and nothing that is
# already there: C build tools for pingora (cmake, pkg-config, OpenSSL headers), the servers
# the integration tests start (redis-server, nginx, prometheus/promtool), wrk for the
# benchmark, the Python test client (the official openai SDK, pytest, PyJWT), and cargo-fuzz
# for `make fuzz` (run with the nightly toolchain: `cargo +nightly fuzz`).
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v pkg-config >/dev/null || need+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
command -v redis-server >/dev/null || need+=(redis-server)
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
command -v promtool >/dev/null || need+=(prometheus)
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
PY=${PYTHON:-python3}
if ! $PY -c 'import openai, pytest, jwt, httpx, cryptography, yaml, websockets, h2' 2>/dev/null; then
  echo "installing Python test packages"
  $PY -m pip install -q -r tests/integration/requirements.txt
fi
if ! command -v cargo-fuzz >/dev/null; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
rustup toolchain list 2>/dev/null | grep -q '^nightly' ||
  echo "note: no nightly toolchain; make fuzz needs one (rustup toolchain install nightly)"
