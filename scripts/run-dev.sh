#!/usr/bin/env bash
# Runs the daemon on the development config, on a fresh Debian 12 machine
# with Rust (rustup) and nothing else: first installs what the build needs
# and is missing (as root, or through sudo), like scripts/test.sh does.
#
#   scripts/run-dev.sh [ARGS...]    = cargo run --release -- run --config docs/examples/dev.yaml ARGS...
#
# State goes to ./data; the API listens on 127.0.0.1:8500 and ./data/api.sock.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# What the build itself needs from Debian: a C toolchain for the bundled
# SQLite and ring. (cmake is only for the tests' simulated MQTT devices,
# Eclipse Paho C; scripts/test.sh installs it.)
packages=(gcc libc6-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

exec cargo run --release --locked -- run --config docs/examples/dev.yaml "$@"
