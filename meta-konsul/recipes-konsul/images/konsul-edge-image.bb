SUMMARY = "Minimal systemd image running konsul-edge"
DESCRIPTION = "A small console image that boots straight into konsul-edge: \
               a starting point for product images, and what the board \
               profiles in board-configs/ are tested against."
BUGTRACKER = "https://github.com/konsul/konsul-edge/issues"
SECTION = "images"
LICENSE = "MIT"

inherit core-image features_check

# The daemon is supervised by systemd (Type=notify, watchdog, sandboxing),
# and only a systemd unit is shipped.
REQUIRED_DISTRO_FEATURES = "systemd"

IMAGE_INSTALL = "\
    packagegroup-core-boot \
    packagegroup-konsul-edge \
    ${CORE_IMAGE_EXTRA_INSTALL} \
"

IMAGE_LINGUAS = ""

# Room for the SQLite store to grow before a data partition is set up;
# board images with A/B layouts size their partitions in their wks files.
IMAGE_ROOTFS_EXTRA_SPACE = "131072"
