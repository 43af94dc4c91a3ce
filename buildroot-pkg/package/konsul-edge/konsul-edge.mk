################################################################################
#
# konsul-edge
#
################################################################################

KONSUL_EDGE_VERSION = 0.1.0
KONSUL_EDGE_SITE = $(call github,konsul,konsul-edge,v$(KONSUL_EDGE_VERSION))
# Own code; the vendored crates' licenses (MIT, BSD-3-Clause, ISC, Zlib)
# are appended by cargo-package as "vendored dependencies licenses".
KONSUL_EDGE_LICENSE = Apache-2.0
KONSUL_EDGE_LICENSE_FILES = LICENSE

KONSUL_EDGE_BOARD = $(call qstrip,$(BR2_PACKAGE_KONSUL_EDGE_BOARD))

# Building a checkout (KONSUL_EDGE_OVERRIDE_SRCDIR in local.mk, see
# README.md): leave the developer's build output behind, which is many GB
# and nothing this build reads.
KONSUL_EDGE_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = \
	--exclude=/target --exclude=/fuzz/target --exclude=/data

# Features are chosen here, never by Cargo.toml's defaults (those suit
# developer builds). cargo-package runs `cargo build` and then
# `cargo install`; both must see the same features or the install step
# rebuilds a different binary.
KONSUL_EDGE_CARGO_FEATURES =
ifeq ($(BR2_PACKAGE_KONSUL_EDGE_BUNDLED_SQLITE),y)
KONSUL_EDGE_CARGO_FEATURES += bundled-sqlite
KONSUL_EDGE_LICENSE += , blessing (bundled SQLite)
else
# libsqlite3-sys finds the target's libsqlite3 through pkg-config;
# rusqlite 0.43 needs SQLite >= 3.44 (sqlite3_set_clientdata).
KONSUL_EDGE_DEPENDENCIES += host-pkgconf sqlite
endif
ifeq ($(BR2_PACKAGE_KONSUL_EDGE_MQTT),y)
# Our own client in Rust (docs/decisions/0021); mqtts:// uses the rustls
# stack sync links anyway: no C library, no cmake, no OpenSSL.
KONSUL_EDGE_CARGO_FEATURES += mqtt
endif
ifeq ($(BR2_PACKAGE_KONSUL_EDGE_SPARKPLUG),y)
KONSUL_EDGE_CARGO_FEATURES += sparkplug
# Eclipse Tahu's schema, compiled into the binary's message code.
KONSUL_EDGE_LICENSE += , EPL-2.0 (Sparkplug B schema)
KONSUL_EDGE_LICENSE_FILES += proto/sparkplug_b/sparkplug_b.proto
endif
ifeq ($(BR2_PACKAGE_KONSUL_EDGE_HAWKBIT),y)
KONSUL_EDGE_CARGO_FEATURES += hawkbit
endif
ifeq ($(BR2_PACKAGE_KONSUL_EDGE_FLEET_UI),y)
KONSUL_EDGE_CARGO_FEATURES += fleet-ui
endif
# Sync, D-Bus and OTA are always built in: no options.

KONSUL_EDGE_CARGO_OPTS = --no-default-features \
	$(if $(strip $(KONSUL_EDGE_CARGO_FEATURES)),--features "$(strip $(KONSUL_EDGE_CARGO_FEATURES))")
KONSUL_EDGE_CARGO_BUILD_OPTS = $(KONSUL_EDGE_CARGO_OPTS)
KONSUL_EDGE_CARGO_INSTALL_OPTS = $(KONSUL_EDGE_CARGO_OPTS)

# The config names the broker/hub and credential file paths: readable by
# the daemon's group only. The state directory is the daemon's alone.
define KONSUL_EDGE_INSTALL_CONFIG
	@test -f $(@D)/board-configs/$(KONSUL_EDGE_BOARD)/edge.yaml || \
		{ echo "konsul-edge: no board-configs/$(KONSUL_EDGE_BOARD)/edge.yaml" \
			"(BR2_PACKAGE_KONSUL_EDGE_BOARD)"; exit 1; }
	$(INSTALL) -D -m 0640 $(@D)/board-configs/$(KONSUL_EDGE_BOARD)/edge.yaml \
		$(TARGET_DIR)/etc/konsul-edge/edge.yaml
endef
KONSUL_EDGE_POST_INSTALL_TARGET_HOOKS += KONSUL_EDGE_INSTALL_CONFIG

define KONSUL_EDGE_USERS
	konsul -1 konsul -1 * /var/lib/konsul-edge - - Konsul edge daemon
endef

define KONSUL_EDGE_PERMISSIONS
	/etc/konsul-edge d 0750 0 konsul - - - - -
	/etc/konsul-edge/edge.yaml f 0640 0 konsul - - - - -
	/var/lib/konsul-edge d 0750 konsul konsul - - - - -
endef

# The unit is the only supported way to run the daemon (Type=notify,
# watchdog, sandbox); Buildroot's systemd preset enables it and the
# reboot path unit (the A/B OTA reboot hand-off, see the unit's comment).
define KONSUL_EDGE_INSTALL_INIT_SYSTEMD
	$(INSTALL) -D -m 0644 $(@D)/systemd/konsul-edge.service \
		$(TARGET_DIR)/usr/lib/systemd/system/konsul-edge.service
	$(INSTALL) -D -m 0644 $(@D)/systemd/konsul-edge-reboot.path \
		$(TARGET_DIR)/usr/lib/systemd/system/konsul-edge-reboot.path
	$(INSTALL) -D -m 0644 $(@D)/systemd/konsul-edge-reboot.service \
		$(TARGET_DIR)/usr/lib/systemd/system/konsul-edge-reboot.service
	$(INSTALL) -D -m 0644 $(@D)/systemd/sysusers.d/konsul-edge.conf \
		$(TARGET_DIR)/usr/lib/sysusers.d/konsul-edge.conf
	$(INSTALL) -D -m 0644 $(@D)/systemd/tmpfiles.d/konsul-edge.conf \
		$(TARGET_DIR)/usr/lib/tmpfiles.d/konsul-edge.conf
	$(INSTALL) -D -m 0644 $(@D)/systemd/io.konsul.Edge1.conf \
		$(TARGET_DIR)/usr/share/dbus-1/system.d/io.konsul.Edge1.conf
	$(INSTALL) -D -m 0644 $(@D)/systemd/io.konsul.Edge1.service \
		$(TARGET_DIR)/usr/share/dbus-1/system-services/io.konsul.Edge1.service
	if grep -qE '^[[:space:]]*backend:[[:space:]]*rauc' \
		$(@D)/board-configs/$(KONSUL_EDGE_BOARD)/edge.yaml; then \
		$(INSTALL) -D -m 0644 $(@D)/systemd/konsul-edge-rauc.conf \
			$(TARGET_DIR)/usr/share/dbus-1/system.d/konsul-edge-rauc.conf; \
	fi
	if [ -f $(@D)/board-configs/$(KONSUL_EDGE_BOARD)/50-ota-bootenv.conf ]; then \
		$(INSTALL) -D -m 0644 $(@D)/board-configs/$(KONSUL_EDGE_BOARD)/50-ota-bootenv.conf \
			$(TARGET_DIR)/usr/lib/systemd/system/konsul-edge.service.d/50-ota-bootenv.conf; \
	fi
endef

$(eval $(cargo-package))
