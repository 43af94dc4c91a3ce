#!/usr/bin/env bash
# Binary footprint of konsul-edge per target, against the budget in
# docs/architecture.md (stripped aarch64 binary <= 4 MiB).
#
#   scripts/footprint.sh [--features-cost]
#
# Default: release-builds x86_64 (host), aarch64 and armv7 (the latter two
# via scripts/cross-build.sh --build-only) into target/cross, strips a copy
# of each binary with the target's binutils and prints its size in bytes.
# Fails if aarch64 exceeds the 4194304-byte budget.
#
# --features-cost: additionally builds the host binary once per feature
# set read from Cargo.toml [features] (no features, each feature alone,
# the default set, all features) and prints each size and its delta
# against the no-feature build. Host-only: a build without
# `bundled-sqlite` links the system libsqlite3, which Debian provides for
# the host (libsqlite3-dev, installed if missing) but not for the cross
# sysroots. The deltas carry over to the other targets closely enough to
# decide what a feature costs. Note rusqlite 0.43 needs SQLite >= 3.44
# (sqlite3_set_clientdata); Debian 12 ships 3.40, so there the no-feature
# build fails to link and is reported as such (Yocto/Buildroot are newer).
# The delta base is the first feature set that builds.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cross}"
NICE=${KONSUL_NICE-nice -n 10}
BUDGET_AARCH64=4194304
# Unwind tables are discarded by build.rs in release builds; a build that
# keeps them (KONSUL_KEEP_UNWIND_TABLES=1, for profiling) is ~730 KB larger
# and is not what ships, so it is not held to the budget.
if [ "${KONSUL_KEEP_UNWIND_TABLES:-}" = 1 ]; then
    echo "FAIL: footprint measures what ships; unset KONSUL_KEEP_UNWIND_TABLES" >&2
    exit 64
fi

features_cost=0
for arg in "$@"; do
    case "$arg" in
        --features-cost) features_cost=1 ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "usage: $0 [--features-cost]" >&2; exit 64 ;;
    esac
done

failures=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

stripped_size() { # strip-tool binary -> bytes
    cp "$2" "$work/bin"
    "$1" --strip-all "$work/bin"
    stat -c %s "$work/bin"
}

start=$(date +%s)
if $NICE cargo build --release --locked -q; then
    echo "TIME: cargo build --release (host): $(( $(date +%s) - start ))s"
else
    echo "FAIL: host release build"
    failures=$((failures + 1))
fi
# Sizes below are checked for presence; build failures are reported there.
bash scripts/cross-build.sh all --build-only | grep -E '^(TIME|PASS|FAIL|SKIP)' || true

declare -A BIN STRIP
BIN[x86_64]="$CARGO_TARGET_DIR/release/konsul-edge"
STRIP[x86_64]=strip
BIN[aarch64]="$CARGO_TARGET_DIR/aarch64-unknown-linux-gnu/release/konsul-edge"
STRIP[aarch64]=aarch64-linux-gnu-strip
BIN[armv7]="$CARGO_TARGET_DIR/armv7-unknown-linux-gnueabihf/release/konsul-edge"
STRIP[armv7]=arm-linux-gnueabihf-strip

printf '%-8s %12s %10s  %s\n' target bytes MiB note
for t in x86_64 aarch64 armv7; do
    if [ ! -x "${BIN[$t]}" ]; then
        echo "FAIL: footprint $t: no binary at ${BIN[$t]}"
        failures=$((failures + 1))
        continue
    fi
    size=$(stripped_size "${STRIP[$t]}" "${BIN[$t]}")
    note=""
    if [ "$t" = aarch64 ]; then
        if [ "$size" -gt $BUDGET_AARCH64 ]; then
            note="OVER BUDGET by $((size - BUDGET_AARCH64)) bytes (budget $BUDGET_AARCH64): docs/decisions/0007-binary-size.md"
            failures=$((failures + 1))
        else
            note="budget $BUDGET_AARCH64, $((BUDGET_AARCH64 - size)) bytes left"
        fi
    fi
    printf '%-8s %12d %10s  %s\n' "$t" "$size" "$(awk "BEGIN{printf \"%.2f\", $size/1048576}")" "$note"
done
if [ $failures -eq 0 ]; then
    echo "PASS: footprint (aarch64 stripped <= $BUDGET_AARCH64 bytes)"
else
    echo "FAIL: footprint"
fi

if [ $features_cost -eq 1 ]; then
    if ! dpkg-query -W -f='${Status}' libsqlite3-dev 2>/dev/null | grep -q 'install ok installed'; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libsqlite3-dev pkg-config >/dev/null
    fi
    # name<TAB>cargo feature args, one set per line, from Cargo.toml.
    sets=$(python3 - <<'EOF'
import tomllib
feats = tomllib.load(open("Cargo.toml", "rb")).get("features", {})
named = sorted(f for f in feats if f != "default")
print("none\t--no-default-features")
for f in named:
    print(f"{f}\t--no-default-features --features {f}")
if "default" in feats:
    print(f"default ({','.join(feats['default']) or 'empty'})\t")
if len(named) > 1:
    print("all\t--all-features")
EOF
)
    echo
    echo "Feature cost (host x86_64, stripped bytes; delta vs no features):"
    base=""
    while IFS=$'\t' read -r name args; do
        # shellcheck disable=SC2086 # args is a word list by design
        if ! $NICE cargo build --release --locked -q $args; then
            echo "FAIL: build with features: $name"
            failures=$((failures + 1))
            continue
        fi
        size=$(stripped_size strip "$CARGO_TARGET_DIR/release/konsul-edge")
        [ -z "$base" ] && base=$size
        printf '  %-28s %10d  %+10d\n' "$name" "$size" $((size - base))
    done <<<"$sets"
    # Leave the default-feature host binary in place for later steps.
    $NICE cargo build --release --locked -q
fi

[ $failures -eq 0 ]
