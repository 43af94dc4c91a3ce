#!/usr/bin/env bash
# Debian packages of konsul-edge (amd64, arm64, armhf) from release
# binaries that are already built: nothing is compiled again.
#
#   scripts/build-deb.sh [amd64|arm64|armhf|all]   (default all)
#
# Needs $CARGO_TARGET_DIR/release/konsul-edge (host; scripts/footprint.sh
# builds it) and $CARGO_TARGET_DIR/<triple>/release/konsul-edge
# (scripts/cross-build.sh). CARGO_TARGET_DIR defaults to target/cross, like
# those scripts. Installs the pinned cargo-deb (into $KONSUL_TOOLS_DIR) and
# lintian if missing. Writes $CARGO_TARGET_DIR/debian/konsul-edge_*.deb and
# prints one PASS/FAIL line per package built and per lintian run.
#
# The package's contents are listed in Cargo.toml [package.metadata.deb];
# /etc/konsul-edge/edge.yaml is generated here by the host binary's `init`
# (no hub, no broker, node id left to the host name), so the conffile is
# what `konsul-edge init` writes, never a second hand-kept copy.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CARGO_DEB_VERSION=3.8.0
# The glibc the package's Depends: line promises (Cargo.toml); Debian 12
# and Raspberry Pi OS 12 ship 2.36. The ARM builds' packed relocations
# (DT_RELR, scripts/cross-build.sh) need exactly that.
GLIBC_MAX=2.36
TOOLS=${KONSUL_TOOLS_DIR:-/var/tmp/konsul-tools}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cross}"
OUT="$CARGO_TARGET_DIR/debian"

want=${1:-all}
case $want in
    all) arches="amd64 arm64 armhf" ;;
    amd64|arm64|armhf) arches=$want ;;
    *) echo "usage: $0 [amd64|arm64|armhf|all]" >&2; exit 64 ;;
esac

failures=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

triple_of() { case $1 in amd64) echo "" ;; arm64) echo aarch64-unknown-linux-gnu ;; armhf) echo armv7-unknown-linux-gnueabihf ;; esac; }
bin_of() { local t; t=$(triple_of "$1"); echo "$CARGO_TARGET_DIR/${t:+$t/}release/konsul-edge"; }

cargo_deb="$TOOLS/cargo-deb-$CARGO_DEB_VERSION/bin/cargo-deb"
if [ ! -x "$cargo_deb" ]; then
    echo "installing cargo-deb $CARGO_DEB_VERSION into $TOOLS"
    # In a temporary target dir of its own, not in our release builds'.
    env -u CARGO_TARGET_DIR ${KONSUL_NICE-nice -n 10} cargo install -q --locked cargo-deb --version "$CARGO_DEB_VERSION" \
        --root "$TOOLS/cargo-deb-$CARGO_DEB_VERSION" || { fail "install cargo-deb $CARGO_DEB_VERSION"; exit 1; }
fi
if ! command -v lintian >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lintian >/dev/null
fi

host_bin=$(bin_of amd64)
if [ ! -x "$host_bin" ]; then
    fail "no host binary at $host_bin to generate the config with (run scripts/footprint.sh)"
    exit 1
fi
mkdir -p packaging/deb/generated "$OUT"
if ! "$host_bin" init --cloud-address "" --mqtt-broker "" --node-id "" \
        --output packaging/deb/generated/edge.yaml --force >/dev/null ||
   ! "$host_bin" check-config packaging/deb/generated/edge.yaml >/dev/null; then
    fail "generate /etc/konsul-edge/edge.yaml with konsul-edge init"
    exit 1
fi

# What the binary needs from the system must be what Depends: says.
check_deps() { # arch binary
    local needed glibc
    needed=$(readelf -d "$2" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort | tr '\n' ' ')
    glibc=$(readelf -W --dyn-syms "$2" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
    # Packed relative relocations are a loader feature, named by a version
    # need rather than a symbol: glibc 2.36.
    if readelf -W -V "$2" | grep -q GLIBC_ABI_DT_RELR; then
        glibc=$(printf '%s\n2.36\n' "$glibc" | sort -V | tail -n1)
    fi
    for lib in $needed; do
        case $lib in
            libc.so.6|libm.so.6|libgcc_s.so.1|ld-linux*) ;;
            *) fail "$1: the binary needs $lib, which Depends: does not name"; return 1 ;;
        esac
    done
    if [ "$(printf '%s\n%s\n' "$glibc" "$GLIBC_MAX" | sort -V | tail -n1)" != "$GLIBC_MAX" ]; then
        fail "$1: the binary needs glibc $glibc, Depends: says >= $GLIBC_MAX"
        return 1
    fi
    pass "$1: links $needed(glibc <= $glibc), as Depends: says"
}

version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)
for arch in $arches; do
    bin=$(bin_of "$arch")
    if [ ! -x "$bin" ]; then
        fail "$arch: no release binary at $bin"
        continue
    fi
    check_deps "$arch" "$bin" || continue
    triple=$(triple_of "$arch")
    deb="$OUT/konsul-edge_${version}-1_${arch}.deb"
    rm -f "$deb"
    # --no-strip: the release profile strips already, and a cross strip
    # would need the target's binutils.
    if "$cargo_deb" deb --no-build --no-strip --locked ${triple:+--target "$triple"} \
            --output "$deb" >/dev/null && [ -f "$deb" ]; then
        pass "$arch: built $(basename "$deb") ($(stat -c %s "$deb") B)"
    else
        fail "$arch: cargo deb"
        continue
    fi
    # Findings of severity warning or error fail; each override in
    # packaging/deb/lintian-overrides carries its reason.
    if lintian --fail-on error,warning --display-level '>=warning' "$deb"; then
        pass "$arch: lintian"
    else
        fail "$arch: lintian"
    fi
done

[ $failures -eq 0 ]
