SUMMARY = "konsul-edge and what an edge node needs around it"
DESCRIPTION = "Pulls in the konsul-edge daemon plus the CA bundle it needs \
               for TLS to the cloud hub and MQTT brokers, and recommends a \
               local broker when meta-networking is in the build."
BUGTRACKER = "https://github.com/konsul/konsul-edge/issues"
SECTION = "net"
LICENSE = "MIT"

inherit packagegroup

RDEPENDS:${PN} = "\
    ca-certificates \
    konsul-edge \
"

# A broker on the device is the common layout (board edge.yaml files use
# tcp://localhost:1883) but not required: some sites run it elsewhere.
# mosquitto lives in meta-networking, which this layer does not depend on:
# dynamic-layers/networking-layer/ adds the recommendation when that layer
# is present (BBFILES_DYNAMIC in conf/layer.conf). An RRECOMMENDS naming a
# recipe no layer provides stops the image from resolving.
