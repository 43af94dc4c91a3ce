SUMMARY = "konsul-edge and what an edge node needs around it"
DESCRIPTION = "Pulls in the konsul-edge daemon plus the CA bundle it needs \
               for TLS to the cloud hub and MQTT brokers, and recommends a \
               local broker."
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
# mosquitto comes from meta-networking; RRECOMMENDS keeps this layer free
# of a hard dependency on meta-oe.
RRECOMMENDS:${PN} = "\
    mosquitto \
"
