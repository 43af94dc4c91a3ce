#!/usr/bin/env bash
# Runs every test konsul-edge has, on a fresh Debian 12 machine with Rust:
# installs what is missing (as root, or through sudo), then formatting, lints,
# unit and integration tests (real SQLite files, real processes, a real
# mosquitto broker and dbus-daemon where a test needs them), and the
# packaging checks (recipes, cross builds, footprint).
#
#   scripts/test.sh            everything (what CI runs)
#   scripts/test.sh --quick    skip the packaging checks and cross builds
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
[ "${1:-}" = "--quick" ] && quick=true

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages the tests use; installed only when missing.
packages=(python3 cmake pkg-config mosquitto mosquitto-clients dbus curl systemd util-linux libglib2.0-bin openssl
          u-boot-tools libubootenv-tool grub-common cpio rauc rauc-service squashfs-tools
          chromium chromium-driver python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done

# python_venv NAME PACKAGES...: a venv with pinned packages under
# $KONSUL_TOOLS_DIR (made only when missing or when the pins change);
# prints its python.
python_venv() {
  local name=$1; shift
  local venv="${KONSUL_TOOLS_DIR:-/var/tmp/konsul-tools}/$name"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.pins" 2>/dev/null)" != "$*" ]; then
    # Debian's python3 ships venv/ensurepip separately.
    python3 -c 'import ensurepip' 2>/dev/null || {
      sudo_if_needed apt-get update -qq
      sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    }
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 && "$venv/bin/pip" install -q "$@" >&2 && echo "$*" > "$venv/.pins"
  fi
  echo "$venv/bin/python"
}

# tests/sparkplug.rs: a third-party Sparkplug B host application.
KONSUL_TEST_PYTHON=$(python_venv test-python pysparkplug==0.6.1 paho-mqtt==1.6.1 protobuf==7.36.2)
export KONSUL_TEST_PYTHON
# tests/fleet_ui: the hub's fleet page in headless chromium.
TEST_SELENIUM_PYTHON=$(python_venv selenium-4.51.0 selenium==4.51.0)
export TEST_SELENIUM_PYTHON
# tests/hawkbit.rs: gooseBit, a DDI server, for the hawkBit client.
KONSUL_TEST_GOOSEBIT=$(python_venv goosebit-0.2.12 goosebit==0.2.12)
export KONSUL_TEST_GOOSEBIT

step() { echo; echo "==> $*"; }
started=$(date +%s)

step "cargo fmt --check"
cargo fmt --all -- --check

step "structure: no import cycle, no file over 800 lines, every module documented"
python3 scripts/check-structure.py

step "cargo clippy -- -D warnings (default features, with the hub's fleet-ui, without mqtt)"
cargo clippy --locked --all-targets -- -D warnings
cargo clippy --locked --all-targets --features fleet-ui -- -D warnings
# An image without the MQTT bridge (Yocto/Buildroot PACKAGECONFIG) must
# still build: a misplaced #[cfg] once broke it unnoticed.
cargo clippy --locked --lib --bins --no-default-features --features bundled-sqlite -- -D warnings

step "cargo test"
rm -f target/tmp/faults-summary.txt
cargo test --locked 2>&1 | tee target/test-output.txt
# The hub's fleet page is a feature of hub builds (decisions/0009).
cargo test --locked --features fleet-ui --test fleet_ui 2>&1 | tee -a target/test-output.txt
# Fail loudly if the harness ran nothing at all.
grep -q "test result: ok" target/test-output.txt
# The fault harness's line of counts per scenario (tests/faults/).
cat target/tmp/faults-summary.txt 2>/dev/null || true

if ! $quick && [ -x scripts/ci-packaging.sh ]; then
  step "packaging checks (scripts/ci-packaging.sh)"
  scripts/ci-packaging.sh
fi

echo
echo "==> all checks passed in $(( $(date +%s) - started ))s"
