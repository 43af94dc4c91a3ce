//! The commented config `konsul-edge init` writes: every section a device
//! needs, with the values the board configs ship.
//!
//! Without a node id the file leaves `node_id` (and the MQTT client id
//! derived from it) unset, so each device takes its host name when the
//! daemon starts: that is the config a distribution package ships, built
//! once for every machine that installs it.

/// The commented config `konsul-edge init` writes. `node_id: None` leaves
/// the id to the host name at start-up.
pub fn render_init(cloud_address: &str, mqtt_broker: &str, node_id: Option<&str>) -> String {
    let mqtt_enabled = !mqtt_broker.is_empty();
    let broker = if mqtt_enabled {
        mqtt_broker
    } else {
        "tcp://localhost:1883"
    };
    let (node_id_line, client_id_line) = match node_id {
        Some(id) => (
            format!("node_id: {id}"),
            format!("  client_id: konsul-edge-{id}"),
        ),
        None => (
            "# node_id: unset, so the host name when the daemon starts".to_string(),
            "  # client_id: konsul-edge-<node_id> (the default)".to_string(),
        ),
    };
    format!(
        r#"# konsul-edge configuration, written by `konsul-edge init`.
# Check it with `konsul-edge check-config FILE`. Drop-ins in config.d/*.yaml
# next to this file are merged over it in name order, then KONSUL_* variables
# (KONSUL_MODE, KONSUL_CLOUD_ADDRESS, KONSUL_MQTT_ENABLED, KONSUL_<SECTION>_<KEY>).
mode: edge
{node_id_line}
log_level: info            # error | warn | info | debug | trace (KONSUL_LOG)

resources:
  memory_limit: 50Mi       # `konsul-edge systemd-dropin` writes the unit's MemoryMax from it
  cpu_limit: 0.1           # ... and CPUQuota (10%)
  storage_limit: 500Mi     # all of it: database 20%, OTA staging 30%, firmware the rest

cloud:
  # The hub this edge syncs with; "" runs standalone (changes stay queued).
  server_address: "{cloud_address}"
  sync_interval: 300s
  offline_queue_size: 10000
  retry_backoff: exponential

storage:
  type: sqlite
  path: /var/lib/konsul-edge/konsul.db
  max_size: 100Mi          # writes past this fail cleanly with 507

mqtt:
  enabled: {mqtt_enabled}
  broker: {broker}
{client_id_line}
  qos: 1
  topics:
    - devices/+/register
    - devices/+/telemetry
    - devices/+/heartbeat
    - devices/+/events
    - devices/+/status     # device last wills
  max_payload_size: 64Ki   # larger device messages are rejected

services:
  max_local_services: 100
  cache_ttl: 3600s
  default_ttl: 0s          # 0s: services without a ttl never expire

sync:
  mode: delta              # delta | full
  compression: true
  conflict_resolution: last-write-wins   # or crdt

http:
  listen: 127.0.0.1:8500   # the local Konsul-compatible API
  max_body_size: 1Mi
{ACCESS_SECTIONS}"#
    )
}

/// The local access every device gets, word for word the same in every
/// `board-configs/*/edge.yaml` (a test holds them to it): the Unix-socket
/// listener, D-Bus for the CLI, and ACLs on with the shipped policies
/// written out. A token entry stays commented: a listed token file that
/// is missing stops the daemon.
pub const ACCESS_SECTIONS: &str = r#"  # Local apps and the operator: callers are known by uid, no token needed.
  # Root, user konsul and group konsul are admins; other users get
  # acl.local_policy. The unit's RuntimeDirectory= creates /run/konsul-edge.
  unix_socket: /run/konsul-edge/api.sock

dbus:
  enabled: true            # io.konsul.Edge1: `konsul-edge status`, `kv`, `ota` ...
  bus: system

# Who may do what, over TCP, the Unix socket and D-Bus alike. Policies are
# Konsul's ACL JSON (files in policy_dir); the built-in ones are
#   builtin:admin      everything
#   builtin:anonymous  read services, KV, devices and alerts; register new
#                      services (not take over existing ones); no KV writes
#   builtin:open       every Konsul route; the edge's own routes read-only
#   builtin:probe      health probes only
#   builtin:none       nothing
# Anonymous TCP never reaches the edge's admin routes (OTA, firmware,
# rollouts, sync control), whatever a policy says.
# `systemctl reload konsul-edge` (SIGHUP) re-reads policies and tokens.
acl:
  enabled: true
  # policy_dir: /etc/konsul-edge/policies
  anonymous_policy: "builtin:anonymous"   # TCP callers without a token
  local_policy: "builtin:anonymous"       # other local users (socket, D-Bus)
  admin_group: konsul                     # its members get builtin:admin
  # users:                                # local user -> policies
  #   app: ["builtin:open"]
  # groups: {}
  # A token for an app that talks TCP (header X-API-Key or Authorization:
  # Bearer). A listed token file that is missing stops the daemon, so
  # create it first, readable by the app and the daemon's group only:
  #   install -m 0640 -o app -g konsul /dev/null /etc/konsul-edge/tokens/app.token
  #   head -c 32 /dev/urandom | base64 > /etc/konsul-edge/tokens/app.token
  # then uncomment these lines and `systemctl reload konsul-edge`:
  # tokens:
  #   - name: app
  #     file: /etc/konsul-edge/tokens/app.token
  #     policies: ["builtin:open"]
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn init_output_is_a_valid_config() {
        let text = render_init(
            "https://hub.example:8500",
            "tcp://localhost:1883",
            Some("n1"),
        );
        let c = Config::from_yaml(&text, "init").unwrap();
        assert!(c.mqtt.enabled);
        assert_eq!(c.cloud.server_address, "https://hub.example:8500");
        assert!(c.dbus.enabled && c.acl.enabled);
        assert_eq!(
            c.http.unix_socket.as_deref(),
            Some(std::path::Path::new("/run/konsul-edge/api.sock"))
        );
        assert_eq!(c.acl.anonymous_policy, "builtin:anonymous");
        assert_eq!(c.node_id.as_deref(), Some("n1"));
        assert_eq!(c.mqtt.client_id, "konsul-edge-n1");
    }

    /// The packaged config is generated on a build host: it must not carry
    /// that host's name into every device that installs it.
    #[test]
    fn init_without_a_node_id_leaves_it_to_the_host_name() {
        let text = render_init("", "", None);
        let c = Config::from_yaml(&text, "init").unwrap();
        assert_eq!(c.node_id, None);
        assert!(c.mqtt.client_id.is_empty(), "the default, from the node id");
        assert!(!c.mqtt.enabled);
        assert!(c.dbus.enabled && c.acl.enabled);
    }
}
