SUMMARY = "Konsul edge node: local service registry, MQTT bridge, offline-first sync"
DESCRIPTION = "konsul-edge keeps a Konsul-compatible service registry and KV \
               store in SQLite on the device, bridges MQTT devices into it, \
               syncs with a Konsul cloud hub when connected and coordinates \
               A/B OTA updates."
# nooelint: oelint.vars.homepageping - checked offline in CI; the URL is the project's repository
HOMEPAGE = "https://github.com/konsul/konsul-edge"
BUGTRACKER = "https://github.com/konsul/konsul-edge/issues"
SECTION = "net"
CVE_PRODUCT = "konsul-edge"

# konsul-edge itself is Apache-2.0. What the statically linked crates add
# (build-only proc-macro crates excluded): MIT or MIT/Apache-2.0 dual
# (taken as MIT), prost (Apache-2.0), snap and subtle (BSD-3-Clause), ring,
# rustls-webpki and untrusted (ISC), foldhash (Zlib); the bundled SQLite,
# when enabled, is public domain. Re-check on Cargo.lock changes:
#   cargo tree -e normal --target aarch64-unknown-linux-gnu --prefix none -f '{p} {l}' | sort -u
LICENSE = "Apache-2.0 & MIT & BSD-3-Clause & ISC & Zlib"
LICENSE:append = "${@bb.utils.contains('PACKAGECONFIG', 'bundled-sqlite', ' & PD', '', d)}"
# The Sparkplug B schema (Eclipse Tahu's sparkplug_b.proto, EPL-2.0) is
# compiled into the binary's message code when that feature is on.
LICENSE:append = "${@bb.utils.contains('PACKAGECONFIG', 'sparkplug', ' & EPL-2.0', '', d)}"
# LICENSE is the repository's own (Apache-2.0); the crates' licenses above
# travel in their crate archives.
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"
LIC_FILES_CHKSUM:append = "${@bb.utils.contains('PACKAGECONFIG', 'sparkplug', ' file://proto/sparkplug_b/sparkplug_b.proto;beginline=1;endline=7;md5=030d91fcc47d0f3d747006e3a6f3d48b', '', d)}"

# Without the bundled-sqlite feature (the default, below) libsqlite3-sys
# links the image's libsqlite3, found through pkg-config. rusqlite 0.43
# needs SQLite >= 3.44 (sqlite3_set_clientdata), which OE-Core has had
# since scarthgap.
DEPENDS += "${@bb.utils.contains('PACKAGECONFIG', 'bundled-sqlite', '', 'sqlite3', d)}"

# The layer lives in the same repository as the code, so the recipe builds
# the tagged release commit from git. Until v0.1.0 is tagged there is no
# commit to pin: set SRCREV:pn-konsul-edge in local.conf, or build the
# working tree with externalsrc/devtool (see meta-konsul/README.md). The
# all-zero placeholder makes the recipe skip itself with that message
# instead of failing at fetch time.
SRC_URI = "git://github.com/konsul/konsul-edge.git;protocol=https;branch=main"
SRCREV = "0000000000000000000000000000000000000000"

require ${BPN}-crates.inc

inherit cargo cargo-update-recipe-crates pkgconfig systemd useradd

# Cargo features come from PACKAGECONFIG: each flag's first field is the
# Cargo feature it enables, and the build always passes
# --no-default-features so Cargo.toml's defaults (meant for developer
# builds) never leak into images.
#
# Default: link the image's libsqlite3 (one copy, security updates via the
# sqlite3 recipe) instead of the SQLite amalgamation bundled in the binary.
PACKAGECONFIG ??= "mqtt sparkplug hawkbit"
PACKAGECONFIG[bundled-sqlite] = "bundled-sqlite,,,"
# The MQTT bridge: our own client in Rust (docs/decisions/0021), TLS
# through rustls as for sync: no cmake, no OpenSSL.
PACKAGECONFIG[mqtt] = "mqtt,,,"
# The Sparkplug B edge node on the same client, idle until
# `sparkplug.enabled` in edge.yaml (docs/decisions/0022). Needs mqtt.
PACKAGECONFIG[sparkplug] = "sparkplug,,,"
# The hawkBit DDI client: hawkBit, gooseBit and servers built on hawkBit
# drive the A/B coordinator; idle until `hawkbit.server` (docs/decisions/0032).
PACKAGECONFIG[hawkbit] = "hawkbit,,,"
# The hub's fleet page at /ui/ (docs/decisions/0009): for images that run
# `konsul-edge hub`; about 38 KB an edge image need not carry.
PACKAGECONFIG[fleet-ui] = "fleet-ui,,,"
# D-Bus (zbus, pure Rust), sync and OTA are always built in: no flags. D-Bus
# needs a bus daemon (dbus or dbus-broker) at run time, which every systemd
# image has. See docs/decisions/0013-zbus.md.

# nooelint: oelint.vars.mispell.unknown - recipe-local helper, not a misspelt OE variable
KONSUL_CARGO_FEATURES = "${@','.join(d.getVar('PACKAGECONFIG_CONFARGS').split())}"
CARGO_BUILD_FLAGS += "--no-default-features ${@'--features ' + d.getVar('KONSUL_CARGO_FEATURES') if d.getVar('KONSUL_CARGO_FEATURES') else ''}"

# Cargo.toml's release profile strips the binary for developer builds; let
# OE strip it instead so ${PN}-dbg keeps the symbols and the already-stripped
# QA check stays meaningful.
export CARGO_PROFILE_RELEASE_STRIP = "false"

# Which board-configs/<dir> provides /etc/konsul-edge/edge.yaml (and the OTA
# drop-in, if the board has one). Defaults follow MACHINE for the boards we
# ship; anything else gets the generic profile (standalone, no OTA).
KONSUL_EDGE_BOARD ?= "${@{'raspberrypi4-64': 'raspberrypi4-64', 'qemuarm64': 'qemuarm64', 'beaglebone-yocto': 'beaglebone'}.get(d.getVar('MACHINE'), 'generic')}"
# The installed config differs per board, so the package does too.
PACKAGE_ARCH = "${@'${TUNE_PKGARCH}' if d.getVar('KONSUL_EDGE_BOARD') == 'generic' else '${MACHINE_ARCH}'}"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --user-group --no-create-home \
                       --home-dir ${localstatedir}/lib/konsul-edge \
                       --shell ${base_sbindir}/nologin konsul"

SYSTEMD_SERVICE:${PN} = "konsul-edge.service konsul-edge-reboot.path"
SYSTEMD_AUTO_ENABLE:${PN} = "enable"

# nooelint: oelint.task.noanonpython - SkipRecipe must happen at parse time to give a clear reason
python () {
    if d.getVar('SRCREV') == '0' * 40 and not d.getVar('EXTERNALSRC'):
        raise bb.parse.SkipRecipe("no release commit to build yet: set SRCREV:pn-konsul-edge "
                                  "or use externalsrc (see meta-konsul/README.md)")
}

do_install:append() {
    # The unit names /usr/bin and /etc literally (that is where both
    # Yocto and Buildroot put them by default); follow a custom prefix.
    install -d ${D}${systemd_system_unitdir}
    sed -e 's,/usr/bin/,${bindir}/,g' -e 's,/etc/,${sysconfdir}/,g' \
        ${S}/systemd/konsul-edge.service > ${D}${systemd_system_unitdir}/konsul-edge.service
    chmod 0644 ${D}${systemd_system_unitdir}/konsul-edge.service

    if [ -f ${S}/board-configs/${KONSUL_EDGE_BOARD}/50-ota-bootenv.conf ]; then
        install -D -m 0644 ${S}/board-configs/${KONSUL_EDGE_BOARD}/50-ota-bootenv.conf \
            ${D}${systemd_system_unitdir}/konsul-edge.service.d/50-ota-bootenv.conf
    fi

    # The reboot hand-off for A/B OTA: the unprivileged daemon touches
    # /run/konsul-edge/reboot-requested (ota.reboot_command in the board
    # configs) and this root-owned path/service pair reboots.
    for unit in konsul-edge-reboot.path konsul-edge-reboot.service; do
        sed -e 's,/usr/bin/,${bindir}/,g' -e 's,/bin/,${base_bindir}/,g' \
            ${S}/systemd/$unit > ${D}${systemd_system_unitdir}/$unit
        chmod 0644 ${D}${systemd_system_unitdir}/$unit
    done

    install -D -m 0644 ${S}/systemd/sysusers.d/konsul-edge.conf \
        ${D}${nonarch_libdir}/sysusers.d/konsul-edge.conf

    # D-Bus: the bus policy for io.konsul.Edge1 and the activation file
    # (which names the binary and config paths, like the unit).
    install -D -m 0644 ${S}/systemd/io.konsul.Edge1.conf \
        ${D}${datadir}/dbus-1/system.d/io.konsul.Edge1.conf
    install -d ${D}${datadir}/dbus-1/system-services
    sed -e 's,/usr/bin/,${bindir}/,g' -e 's,/etc/,${sysconfdir}/,g' \
        ${S}/systemd/io.konsul.Edge1.service \
        > ${D}${datadir}/dbus-1/system-services/io.konsul.Edge1.service
    chmod 0644 ${D}${datadir}/dbus-1/system-services/io.konsul.Edge1.service
    # RAUC boards: RAUC's own policy admits root only; this lets user
    # konsul drive the installer.
    if grep -qE '^[[:space:]]*backend:[[:space:]]*rauc' ${S}/board-configs/${KONSUL_EDGE_BOARD}/edge.yaml; then
        install -D -m 0644 ${S}/systemd/konsul-edge-rauc.conf \
            ${D}${datadir}/dbus-1/system.d/konsul-edge-rauc.conf
    fi
    install -D -m 0644 ${S}/systemd/tmpfiles.d/konsul-edge.conf \
        ${D}${nonarch_libdir}/tmpfiles.d/konsul-edge.conf

    # Config may carry broker credentials paths and cloud URLs: readable by
    # the daemon's group, not by everyone.
    install -d -m 0750 -g konsul ${D}${sysconfdir}/konsul-edge
    install -m 0640 -g konsul ${S}/board-configs/${KONSUL_EDGE_BOARD}/edge.yaml \
        ${D}${sysconfdir}/konsul-edge/edge.yaml

    install -d -m 0750 -o konsul -g konsul ${D}${localstatedir}/lib/konsul-edge
}

FILES:${PN} += "${systemd_system_unitdir}/konsul-edge.service.d \
                ${systemd_system_unitdir}/konsul-edge-reboot.service \
                ${datadir}/dbus-1/system.d/io.konsul.Edge1.conf \
                ${datadir}/dbus-1/system.d/konsul-edge-rauc.conf \
                ${datadir}/dbus-1/system-services/io.konsul.Edge1.service \
                ${nonarch_libdir}/sysusers.d/konsul-edge.conf \
                ${nonarch_libdir}/tmpfiles.d/konsul-edge.conf \
                ${localstatedir}/lib/konsul-edge"
CONFFILES:${PN} = "${sysconfdir}/konsul-edge/edge.yaml"
