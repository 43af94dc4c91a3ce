#!/usr/bin/env bash
# Installs the amd64 Debian package on this machine and checks it as an
# operator would meet it, then purges it. Root only (dpkg); CI runs it from
# scripts/ci-packaging.sh after scripts/build-deb.sh.
#
#   scripts/deb-test.sh [PATH.deb]   (default: the amd64 .deb build-deb.sh wrote)
#
# 1. dpkg -i: user, files, owners and modes as the unit expects; conffile;
#    units enabled but the daemon not started.
# 2. `konsul-edge check-config /etc/konsul-edge/edge.yaml`, as root and as
#    user konsul.
# 3. The daemon as user konsul with the packaged config, set up the way
#    the unit sets it up (RuntimeDirectory, WorkingDirectory, UMask), on a
#    bus run from the system's own system.conf (so the packaged policy
#    decides whether konsul may own io.konsul.Edge1), until `konsul-edge
#    status` answers. There is no systemd PID 1 here. Then the seed's steps
#    on the installed package: init --force, the daemon, status.
# 4. dpkg -r keeps config and state; dpkg -P removes them.
#
# The bus is a private dbus-daemon (its own socket; DBUS_SYSTEM_BUS_ADDRESS
# points the daemon and the CLI at it) and HTTP listens on an ephemeral
# port (KONSUL_HTTP_LISTEN): nothing of the machine's is taken over. On any
# exit the package is purged, and user/group konsul are removed if this
# script created them, so the machine is left as it was found.
#
# Prints PASS/FAIL per check and "deb-test: N passed, M failed".
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target/cross}"
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)
DEB=${1:-$CARGO_TARGET_DIR/debian/konsul-edge_${version}-1_amd64.deb}
CONF=/etc/konsul-edge/edge.yaml
# Seconds to wait for the daemon to answer; it is ready in well under one.
READY_TIMEOUT=30

passed=0
failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
check() { # description command...
    local d=$1; shift
    if "$@"; then pass "$d"; else fail "$d"; fi
}
summary() { echo "deb-test: $passed passed, $failed failed"; }

if [ "$(id -u)" != 0 ]; then
    echo "FAIL: deb-test needs root (dpkg -i)"; exit 1
fi
if [ ! -f "$DEB" ]; then
    echo "FAIL: no package at $DEB (run scripts/build-deb.sh amd64)"; exit 1
fi
if dpkg-query -W -f='${Status}' konsul-edge 2>/dev/null | grep -q 'installed\|config-files'; then
    echo "FAIL: konsul-edge is already installed here; this test would purge it"; exit 1
fi
for tool in dbus-daemon curl setpriv; do
    command -v "$tool" >/dev/null || { echo "FAIL: deb-test needs $tool"; exit 1; }
done

had_user=false; getent passwd konsul >/dev/null && had_user=true
had_group=false; getent group konsul >/dev/null && had_group=true
work=$(mktemp -d)
chmod 0755 "$work"
bus_pid=""
daemon_pid=""

cleanup() {
    [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    [ -n "$bus_pid" ] && kill "$bus_pid" 2>/dev/null && wait "$bus_pid" 2>/dev/null
    if dpkg-query -W konsul-edge >/dev/null 2>&1; then
        dpkg -P konsul-edge >/dev/null 2>&1 || echo "deb-test: could not purge konsul-edge"
    fi
    rm -rf /run/konsul-edge
    $had_user || ! getent passwd konsul >/dev/null || userdel konsul
    $had_group || ! getent group konsul >/dev/null || groupdel konsul
    [ -n "${KEEP_WORK:-}" ] && echo "kept $work" || rm -rf "$work"
}
trap cleanup EXIT
# A timeout's SIGTERM runs the cleanup too.
trap 'exit 124' TERM INT

# mode owner:group of PATH
stat_is() { [ "$(stat -c '%a %U:%G' "$2" 2>/dev/null)" = "$1" ] || { echo "  $2: $(stat -c '%a %U:%G' "$2" 2>&1), want $1"; false; }; }
# the installed file is the repository's, byte for byte
same_as_repo() { cmp -s "$1" "$2" || { echo "  $2 differs from $1"; false; }; }

# --- 1. install --------------------------------------------------------------
if out=$(dpkg -i "$DEB" 2>&1); then
    pass "dpkg -i $(basename "$DEB")"
else
    echo "$out"; fail "dpkg -i $(basename "$DEB")"; summary; exit 1
fi

user_ok() {
    local home shell
    IFS=: read -r _ _ uid _ _ home shell < <(getent passwd konsul) || return 1
    [ "$uid" -lt 1000 ] && [ "$home" = /var/lib/konsul-edge ] && [[ $shell == */nologin ]] &&
        getent group konsul >/dev/null || { echo "  $(getent passwd konsul)"; false; }
}
check "systemd-sysusers created system user konsul (home /var/lib/konsul-edge, nologin)" user_ok
check "/usr/bin/konsul-edge 755 root:root" stat_is "755 root:root" /usr/bin/konsul-edge
check "/etc/konsul-edge 750 root:konsul" stat_is "750 root:konsul" /etc/konsul-edge
check "$CONF 640 root:konsul" stat_is "640 root:konsul" "$CONF"
check "/var/lib/konsul-edge 750 konsul:konsul (the unit's StateDirectory)" \
    stat_is "750 konsul:konsul" /var/lib/konsul-edge
check "$CONF is a conffile" \
    bash -c "dpkg-query -W -f='\${Conffiles}' konsul-edge | grep -q '^ $CONF '"
for pair in \
    systemd/konsul-edge.service:/usr/lib/systemd/system/konsul-edge.service \
    systemd/konsul-edge-reboot.path:/usr/lib/systemd/system/konsul-edge-reboot.path \
    systemd/konsul-edge-reboot.service:/usr/lib/systemd/system/konsul-edge-reboot.service \
    systemd/sysusers.d/konsul-edge.conf:/usr/lib/sysusers.d/konsul-edge.conf \
    systemd/tmpfiles.d/konsul-edge.conf:/usr/lib/tmpfiles.d/konsul-edge.conf \
    systemd/io.konsul.Edge1.conf:/usr/share/dbus-1/system.d/io.konsul.Edge1.conf \
    systemd/io.konsul.Edge1.service:/usr/share/dbus-1/system-services/io.konsul.Edge1.service; do
    check "${pair#*:} is ${pair%%:*}" same_as_repo "${pair%%:*}" "${pair#*:}"
done
# What the unit names exists: binary, config, user (verify resolves them).
check "systemd-analyze verify of the installed unit" \
    bash -c '[ -z "$(systemd-analyze verify konsul-edge.service 2>&1)" ]'
check "konsul-edge.service and konsul-edge-reboot.path enabled" \
    test -L /etc/systemd/system/multi-user.target.wants/konsul-edge.service -a \
         -L /etc/systemd/system/multi-user.target.wants/konsul-edge-reboot.path
check "the daemon was not started" bash -c '! pgrep -u konsul -x konsul-edge >/dev/null'
# 0750 root:konsul keeps other users out of the config.
check "another user cannot read $CONF" \
    bash -c "! setpriv --reuid=65534 --regid=65534 --clear-groups cat $CONF >/dev/null 2>&1"

# --- 2. check-config ---------------------------------------------------------
check "konsul-edge check-config $CONF (root)" \
    bash -c "konsul-edge check-config $CONF >/dev/null"
as_konsul() { setpriv --reuid=konsul --regid=konsul --init-groups --inh-caps=-all "$@"; }
check "konsul-edge check-config $CONF (user konsul)" \
    as_konsul konsul-edge check-config "$CONF"

# --- 3. the daemon under the packaged user -----------------------------------
# The system's own bus configuration: /usr/share/dbus-1/system.conf, which
# reads the packaged policy from /usr/share/dbus-1/system.d/.
coproc BUS { exec dbus-daemon --config-file=/usr/share/dbus-1/system.conf --nofork --nopidfile \
    --address="unix:path=$work/system_bus_socket" --print-address 2>&1; }
bus_pid=$BUS_PID
bus_addr=""
read -r -t 10 -u "${BUS[0]}" bus_addr || true
export DBUS_SYSTEM_BUS_ADDRESS=$bus_addr
if [[ $bus_addr != unix:* ]]; then
    fail "a bus with the system's configuration ($bus_addr)"; summary; exit 1
fi

# Runs the daemon as the unit would (User=, Group=, RuntimeDirectory=,
# WorkingDirectory=, UMask=) and waits until `konsul-edge status` answers
# over the bus: the daemon owns io.konsul.Edge1 before it is ready.
start_daemon() { # label
    install -d -m 0755 -o konsul -g konsul /run/konsul-edge
    (cd /var/lib/konsul-edge && umask 0077 &&
        exec setpriv --reuid=konsul --regid=konsul --init-groups --inh-caps=-all \
            env KONSUL_HTTP_LISTEN=127.0.0.1:0 konsul-edge run --config "$CONF") \
        >"$work/daemon-$1.log" 2>&1 &
    daemon_pid=$!
    local deadline=$((SECONDS + READY_TIMEOUT))
    while [ $SECONDS -lt $deadline ]; do
        if ! kill -0 "$daemon_pid" 2>/dev/null; then
            wait "$daemon_pid"; echo "  daemon exited with $?:"; sed 's/^/  | /' "$work/daemon-$1.log"
            daemon_pid=""; return 1
        fi
        # Ask over the bus only once the daemon is ready (it owns the name
        # by then): a call to a name nobody owns yet makes this bus, run
        # without systemd, D-Bus-activate a second daemon from the packaged
        # activation file, and the two race on a new database.
        if curl -sf --max-time 2 --unix-socket /run/konsul-edge/api.sock -o /dev/null \
            http://localhost/health/ready; then
            konsul-edge status >"$work/status-$1.txt" 2>&1 && return 0
        fi
        sleep 0.1
    done
    echo "  no answer within ${READY_TIMEOUT}s:"; sed 's/^/  | /' "$work/daemon-$1.log"
    return 1
}
stop_daemon() {
    local rc
    kill -TERM "$daemon_pid"; wait "$daemon_pid"; rc=$?
    daemon_pid=""
    [ $rc -eq 0 ] || { echo "  exit status $rc"; false; }
}

if start_daemon packaged; then
    pass "the daemon runs as user konsul with $CONF and answers konsul-edge status over the bus"
    check "the daemon's process is user konsul" \
        bash -c "[ \"\$(ps -o user= -p $daemon_pid)\" = konsul ]"
    check "status names this host as the node (node_id left to the host name)" \
        grep -q "$(hostname)" "$work/status-packaged.txt"
    check "/health/ready on /run/konsul-edge/api.sock" \
        curl -sf --max-time 5 --unix-socket /run/konsul-edge/api.sock -o /dev/null http://localhost/health/ready
    check "/var/lib/konsul-edge/konsul.db 600 konsul:konsul" \
        stat_is "600 konsul:konsul" /var/lib/konsul-edge/konsul.db
    check "SIGTERM stops the daemon cleanly" stop_daemon
else
    fail "the daemon runs as user konsul with $CONF and answers konsul-edge status over the bus"
fi

# The seed's install steps, on the installed package. The hub and broker
# are closed local ports: the node is offline-first and starts regardless.
# (No --node-id: the database made above already names this host, and a
# node keeps the id its database was created with.)
if konsul-edge init --force --cloud-address https://127.0.0.1:9 --mqtt-broker tcp://127.0.0.1:9 \
        >/dev/null &&
   konsul-edge check-config "$CONF" >/dev/null && start_daemon init; then
    pass "init --force, then the daemon, then konsul-edge status"
    check "status shows the hub init wrote (sync to 127.0.0.1:9 fails)" \
        grep -q "127.0.0.1:9" "$work/status-init.txt"
    check "SIGTERM stops the daemon cleanly" stop_daemon
else
    fail "init --force, then the daemon, then konsul-edge status"
fi

# --- 4. remove and purge -----------------------------------------------------
check "dpkg -r konsul-edge" bash -c 'dpkg -r konsul-edge >/dev/null 2>&1'
check "after dpkg -r: status config-files" \
    bash -c "[ \"\$(dpkg-query -W -f='\${Status}' konsul-edge)\" = 'deinstall ok config-files' ]"
check "after dpkg -r: binary gone" test ! -e /usr/bin/konsul-edge
check "after dpkg -r: $CONF kept" test -f "$CONF"
check "after dpkg -r: state kept (/var/lib/konsul-edge/konsul.db)" test -f /var/lib/konsul-edge/konsul.db
check "dpkg -P konsul-edge" bash -c 'dpkg -P konsul-edge >/dev/null 2>&1'
check "after dpkg -P: /etc/konsul-edge gone" test ! -e /etc/konsul-edge
check "after dpkg -P: /var/lib/konsul-edge gone" test ! -e /var/lib/konsul-edge
check "after dpkg -P: no statoverride left" \
    bash -c '! dpkg-statoverride --list "/etc/konsul-edge*" | grep -q .'
check "after dpkg -P: no enablement left" \
    test ! -e /etc/systemd/system/multi-user.target.wants/konsul-edge.service -a \
         ! -L /etc/systemd/system/multi-user.target.wants/konsul-edge.service
check "after dpkg -P: the package is unknown to dpkg" \
    bash -c '! dpkg-query -W konsul-edge >/dev/null 2>&1'

summary
[ $failed -eq 0 ]
