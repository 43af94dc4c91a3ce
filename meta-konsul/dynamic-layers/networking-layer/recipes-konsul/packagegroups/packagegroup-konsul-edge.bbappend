# Parsed only when meta-networking (collection "networking-layer") is in
# the build: see BBFILES_DYNAMIC in conf/layer.conf. A broker on the device
# is the common layout (board edge.yaml files use tcp://localhost:1883), so
# recommend mosquitto where a layer provides it.
RRECOMMENDS:${PN} += "mosquitto"
