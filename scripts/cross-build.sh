#!/usr/bin/env bash
# Cross-build konsul-edge for the boards we ship (aarch64, armv7) and
# smoke-run the results under qemu-user.
#
#   scripts/cross-build.sh [aarch64|armv7|all] [--build-only]
#
# Installs missing toolchain pieces (rustup targets, Debian cross gcc,
# qemu-user-static), builds `cargo build --release --locked --target T`
# into target/cross (not target/: a second build directory means we never
# wait on, or invalidate, the developer's own build lock), then runs the
# binary under qemu: --version, check-config on every board config, a
# negative check-config, and `selftest` against a throwaway data dir.
#
# Linkers and the `cc` crate's compilers are passed as environment
# variables, not .cargo/config.toml, so that a developer's `cargo build`
# and the Yocto/Buildroot builds (which write their own cargo config) never
# see settings meant for this script.
#
# Output: one "PASS:", "FAIL:" or "SKIP:" line per check; exit status is
# non-zero if anything FAILed. Build times are printed as "TIME:" lines.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cross}"
# Be a good neighbour on a shared 2-core machine; CI sets KONSUL_NICE="".
NICE=${KONSUL_NICE-nice -n 10}

# Exit codes the daemon documents (sysexits): 64 usage, 78 bad config.
EX_USAGE=64
EX_CONFIG=78

want=all
build_only=0
for arg in "$@"; do
    case "$arg" in
        aarch64|armv7|all) want=$arg ;;
        --build-only) build_only=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "usage: $0 [aarch64|armv7|all] [--build-only]" >&2; exit $EX_USAGE ;;
    esac
done

failures=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }
skip() { echo "SKIP: $*"; }

# arch -> rust triple, GNU prefix, Debian packages, qemu binary
triple_of() { case $1 in aarch64) echo aarch64-unknown-linux-gnu ;; armv7) echo armv7-unknown-linux-gnueabihf ;; esac; }
gnu_of()    { case $1 in aarch64) echo aarch64-linux-gnu ;; armv7) echo arm-linux-gnueabihf ;; esac; }
debs_of()   { case $1 in aarch64) echo gcc-aarch64-linux-gnu libc6-dev-arm64-cross ;; armv7) echo gcc-arm-linux-gnueabihf libc6-dev-armhf-cross ;; esac; }
qemu_of()   { case $1 in aarch64) echo qemu-aarch64-static ;; armv7) echo qemu-arm-static ;; esac; }

case $want in
    all) arches="aarch64 armv7" ;;
    *) arches=$want ;;
esac

ensure_debs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "FAIL: need root to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    # Only refresh the index when something is actually missing: keeps the
    # common (already provisioned) case offline and fast.
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_toolchain() {
    local arch=$1 triple
    triple=$(triple_of "$arch")
    if ! rustup target list --installed | grep -qx "$triple"; then
        rustup target add "$triple"
    fi
    # shellcheck disable=SC2046 # word splitting of the package list is intended
    ensure_debs $(debs_of "$arch") qemu-user-static
}

cross_env() {
    local arch=$1 triple gnu up low
    triple=$(triple_of "$arch")
    gnu=$(gnu_of "$arch")
    up=$(echo "$triple" | tr 'a-z-' 'A-Z_')
    low=$(echo "$triple" | tr '-' '_')
    export "CARGO_TARGET_${up}_LINKER=${gnu}-gcc"
    # gcc drives the LLVM linker rustup ships (rust-lld, through its gcc-ld
    # wrapper), which packs relative relocations (DT_RELR: glibc >= 2.36)
    # and does not pad the file to 64 KiB segment frames; Debian 12's GNU
    # ld does neither for aarch64. 190 KB of the 4 MiB budget:
    # docs/decisions/0007-binary-size.md ("Linker").
    local gcc_ld
    gcc_ld="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/bin/gcc-ld"
    export "CARGO_TARGET_${up}_RUSTFLAGS=-C link-arg=-fuse-ld=lld -C link-arg=-B${gcc_ld} -C link-arg=-Wl,-z,pack-relative-relocs"
    # The `cc` crate (libsqlite3-sys's bundled SQLite, ring later) reads these.
    export "CC_${low}=${gnu}-gcc"
    export "AR_${low}=${gnu}-ar"
}

bin_path() { echo "$CARGO_TARGET_DIR/$(triple_of "$1")/release/konsul-edge"; }

build() {
    local arch=$1 triple start end
    triple=$(triple_of "$arch")
    cross_env "$arch"
    start=$(date +%s)
    if $NICE cargo build --release --locked --target "$triple"; then
        end=$(date +%s)
        echo "TIME: cargo build --release --target $triple: $((end - start))s"
        pass "build $triple"
        return 0
    fi
    fail "build $triple"
    return 1
}

# Runs the target binary under qemu-user with the cross sysroot, so the
# dynamic loader and glibc of the target are used, as on the board.
qrun() {
    local arch=$1; shift
    local gnu
    gnu=$(gnu_of "$arch")
    "$(qemu_of "$arch")" -L "/usr/$gnu" "$(bin_path "$arch")" "$@"
}

smoke() {
    local arch=$1 out rc cfg tmp
    local version
    version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)

    if out=$(qrun "$arch" --version 2>&1) && grep -q "konsul-edge.*$version" <<<"$out"; then
        pass "$arch --version: $out"
    else
        fail "$arch --version (expected 'konsul-edge $version', got: '${out}')"
        # A binary that cannot report its version is not worth probing further.
        return 0
    fi

    for cfg in board-configs/*/edge.yaml; do
        [ -e "$cfg" ] || continue
        set +e
        out=$(qrun "$arch" check-config "$cfg" 2>&1); rc=$?
        set -e
        if [ $rc -eq 0 ]; then
            pass "$arch check-config $cfg"
        elif [ $rc -eq $EX_USAGE ]; then
            skip "$arch check-config $cfg: subcommand not available in this build (exit 64): $out"
        else
            fail "$arch check-config $cfg (exit $rc): $out"
        fi
    done

    # A check-config that accepts everything would pass the loop above;
    # make sure a config with an unknown key is rejected as EX_CONFIG.
    tmp=$(mktemp -d)
    printf 'mode: edge\nno_such_key: 1\n' >"$tmp/bad.yaml"
    set +e
    out=$(qrun "$arch" check-config "$tmp/bad.yaml" 2>&1); rc=$?
    set -e
    if [ $rc -eq $EX_CONFIG ]; then
        pass "$arch check-config rejects an unknown key (exit 78)"
    elif [ $rc -eq $EX_USAGE ]; then
        skip "$arch check-config negative test: subcommand not available in this build"
    else
        fail "$arch check-config on a bad config exited $rc, expected 78: $out"
    fi

    set +e
    out=$(qrun "$arch" selftest --data-dir "$tmp/data" 2>&1); rc=$?
    set -e
    if [ $rc -eq 0 ] && grep -q OK <<<"$out"; then
        pass "$arch selftest: $(tail -n1 <<<"$out")"
    elif [ $rc -eq $EX_USAGE ]; then
        skip "$arch selftest: subcommand not available in this build (exit 64)"
    else
        fail "$arch selftest (exit $rc): $out"
    fi
    rm -rf "$tmp"
}

for arch in $arches; do
    ensure_toolchain "$arch"
    if build "$arch" && [ $build_only -eq 0 ]; then
        smoke "$arch"
    fi
done

if [ $failures -ne 0 ]; then
    echo "cross-build: $failures check(s) failed"
    exit 1
fi
echo "cross-build: all checks passed"
