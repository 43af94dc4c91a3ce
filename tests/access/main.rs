//! One access policy behind every door: each mutating HTTP route and D-Bus
//! method, tried as anonymous TCP, TCP with a valid and with a wrong token,
//! the Unix socket as nobody and as root, and D-Bus (a private bus whose
//! policy is the shipped one) as nobody and as root. Each door must give
//! the same allow or deny, and a denial must change nothing. Plus: the same
//! bad request gets the same error class over HTTP and D-Bus, Konsul's own
//! policy files load unchanged and are enforced (and reloaded on SIGHUP),
//! and the daemon never reads a file for a caller who cannot.

#[path = "../common/mod.rs"]
mod common;

mod doors;
mod policies;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::*;

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
const DEV_TOKEN: &str = "developer-token-0123456789";

struct Bus {
    child: Child,
    address: String,
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private bus whose policy is the shipped one.
fn shipped_bus(dir: &Path) -> Bus {
    let rules = shipped_bus_policy();
    let (child, address) = private_bus_with(dir, &rules);
    Bus { child, address }
}

fn token_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, secret).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// A daemon with D-Bus on `bus`, the Unix socket, ACLs on with their
/// shipped defaults, an admin token, more `acl` keys (indented two
/// spaces) and more tokens (list items indented four).
fn start(dir: &Path, bus: &Bus, acl_keys: &str, tokens: &str) -> Daemon {
    // nobody must reach the socket and the bus inside the test dir.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let admin = token_file(dir, "admin.token", ADMIN_TOKEN);
    write_config(
        dir,
        &format!(
            "  unix_socket: {}\ndbus:\n  enabled: true\n  bus: \"{}\"\nacl:\n  enabled: true\n{acl_keys}  tokens:\n    - name: ops\n      file: {}\n      policies: [\"builtin:admin\"]\n{tokens}",
            dir.join("api.sock").display(),
            bus.address,
            admin.display(),
        ),
    );
    Daemon::start(dir)
}

/// curl over the Unix socket: (status, body).
fn unix_http(
    sock: &Path,
    nobody: bool,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let mut cmd = as_user(nobody, "curl");
    cmd.args([
        "-s",
        "-w",
        "\n%{http_code}",
        "--max-time",
        "15",
        "-X",
        method,
    ])
    .arg("--unix-socket")
    .arg(sock)
    .args(["-H", "Content-Type: application/json"]);
    if let Some(b) = body {
        cmd.args(["--data-binary", b]);
    }
    cmd.arg(format!("http://localhost{path}"));
    let out = run_bounded(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// gdbus call: (ok, output naming the D-Bus error on failure).
fn dbus(bus: &Bus, nobody: bool, method: &str, args: &[&str]) -> (bool, String) {
    gdbus_call(&bus.address, nobody, method, args)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Door {
    Anonymous,
    GoodToken,
    WrongToken,
    UnixNobody,
    UnixRoot,
    DbusNobody,
    DbusRoot,
}

/// One mutation, as an HTTP request and (where there is one) a D-Bus call.
struct Op {
    name: &'static str,
    http: Option<(&'static str, String, Option<String>)>,
    dbus: Option<(&'static str, Vec<String>)>,
    /// Allowed for callers without rights too (the shipped local-app
    /// policy: registering a new service, refreshing one).
    open: bool,
}

fn ops(tag: &str) -> Vec<Op> {
    let sha = "ab".repeat(32);
    let empty = "@a{sv} {}".to_string();
    let s = |v: &str| format!("'{v}'");
    vec![
        Op {
            name: "register a new service",
            http: Some((
                "PUT",
                "/register".into(),
                Some(format!(
                    r#"{{"name":"app-{tag}","address":"10.1.1.1","port":81}}"#
                )),
            )),
            dbus: Some((
                "io.konsul.Edge1.Registry.RegisterService",
                vec![
                    format!(
                        "{{'name': <'app-{tag}-d'>, 'address': <'10.1.1.1'>, 'port': <uint16 81>}}"
                    ),
                    empty.clone(),
                ],
            )),
            open: true,
        },
        Op {
            name: "take over another's service",
            http: Some((
                "PUT",
                "/register".into(),
                Some(r#"{"name":"web","address":"6.6.6.6","port":80}"#.into()),
            )),
            dbus: Some((
                "io.konsul.Edge1.Registry.RegisterService",
                vec![
                    "{'name': <'web'>, 'address': <'6.6.6.6'>, 'port': <uint16 80>}".into(),
                    empty.clone(),
                ],
            )),
            open: false,
        },
        Op {
            name: "deregister",
            http: Some(("DELETE", "/deregister/web".into(), None)),
            dbus: Some((
                "io.konsul.Edge1.Registry.DeregisterService",
                vec![s("web"), empty.clone()],
            )),
            open: false,
        },
        Op {
            name: "kv put",
            http: Some((
                "PUT",
                format!("/kv/acl/{tag}"),
                Some(r#"{"value":"x"}"#.into()),
            )),
            dbus: Some((
                "io.konsul.Edge1.Kv.Put",
                vec![s(&format!("acl/{tag}-d")), s("x"), empty.clone()],
            )),
            open: false,
        },
        Op {
            name: "kv delete",
            http: Some(("DELETE", "/kv/keep".into(), None)),
            dbus: Some(("io.konsul.Edge1.Kv.Delete", vec![s("keep"), empty.clone()])),
            open: false,
        },
        Op {
            name: "batch set",
            http: Some((
                "POST",
                "/batch/kv/set".into(),
                Some(r#"{"items":{"batch":"1"}}"#.into()),
            )),
            dbus: None,
            open: false,
        },
        Op {
            name: "batch delete",
            http: Some((
                "POST",
                "/batch/kv/delete".into(),
                Some(r#"{"keys":["keep"]}"#.into()),
            )),
            dbus: None,
            open: false,
        },
        Op {
            name: "sync now",
            http: Some(("POST", "/v1/edge/sync/now".into(), None)),
            dbus: Some(("io.konsul.Edge1.Sync.SyncNow", vec![])),
            open: false,
        },
        Op {
            name: "ota install",
            http: Some((
                "POST",
                "/v1/edge/ota/install".into(),
                Some(r#"{"path":"/etc/shadow"}"#.into()),
            )),
            dbus: Some(("io.konsul.Edge1.Ota.Install", vec![s("/etc/shadow")])),
            open: false,
        },
        Op {
            name: "ota mark good",
            http: None,
            dbus: Some(("io.konsul.Edge1.Ota.MarkGood", vec![])),
            open: false,
        },
        Op {
            name: "ota mark bad",
            http: None,
            dbus: Some(("io.konsul.Edge1.Ota.MarkBad", vec![])),
            open: false,
        },
        Op {
            name: "ota reboot",
            http: None,
            dbus: Some(("io.konsul.Edge1.Ota.Reboot", vec![])),
            open: false,
        },
        Op {
            name: "host rollout",
            http: Some((
                "POST",
                "/v1/edge/ota/rollouts".into(),
                Some(r#"{"id":"h1"}"#.into()),
            )),
            dbus: None,
            open: false,
        },
        Op {
            name: "firmware upload",
            http: Some(("PUT", "/v1/edge/firmware".into(), Some("{}".into()))),
            dbus: None,
            open: false,
        },
        Op {
            name: "firmware delete",
            http: Some(("DELETE", format!("/v1/edge/firmware/{sha}"), None)),
            dbus: None,
            open: false,
        },
        Op {
            name: "rollout start",
            http: Some((
                "POST",
                "/v1/edge/rollouts".into(),
                Some(r#"{"device_type":"x","version":"1"}"#.into()),
            )),
            dbus: Some((
                "io.konsul.Edge1.Firmware.StartRollout",
                vec!["{'device_type': <'x'>, 'version': <'1'>}".into()],
            )),
            open: false,
        },
        Op {
            name: "rollout pause",
            http: Some(("POST", "/v1/edge/rollouts/r1/pause".into(), None)),
            dbus: Some(("io.konsul.Edge1.Firmware.PauseRollout", vec![s("r1")])),
            open: false,
        },
        Op {
            name: "rollout resume",
            http: Some(("POST", "/v1/edge/rollouts/r1/resume".into(), None)),
            dbus: Some(("io.konsul.Edge1.Firmware.ResumeRollout", vec![s("r1")])),
            open: false,
        },
        Op {
            name: "rollout abort",
            http: Some(("POST", "/v1/edge/rollouts/r1/abort".into(), None)),
            dbus: Some(("io.konsul.Edge1.Firmware.AbortRollout", vec![s("r1")])),
            open: false,
        },
    ]
}

/// Some(true) allowed, Some(false) denied, None: the door has no such call.
fn attempt(d: &Daemon, bus: &Bus, door: Door, op: &Op) -> Option<bool> {
    let sock = d.dir.join("api.sock");
    let http_denied = |status: u16| status == 401 || status == 403;
    match door {
        Door::Anonymous | Door::GoodToken | Door::WrongToken => {
            let (method, path, body) = op.http.as_ref()?;
            let headers: Vec<(&str, &str)> = match door {
                Door::GoodToken => vec![("Authorization", "Bearer admin-token-0123456789abcdef")],
                Door::WrongToken => vec![("X-API-Key", "not-the-token-at-all-000")],
                _ => vec![],
            };
            let r = request_anon(
                &d.addr,
                method,
                path,
                body.as_deref().map(str::as_bytes),
                &headers,
            );
            if door == Door::WrongToken {
                assert_eq!(r.status, 401, "{}: a wrong token is 401", op.name);
                assert_eq!(r.json(), serde_json::json!({"error": "unauthorized"}));
            }
            Some(!http_denied(r.status))
        }
        Door::UnixNobody | Door::UnixRoot => {
            let (method, path, body) = op.http.as_ref()?;
            let (status, _) = unix_http(
                &sock,
                door == Door::UnixNobody,
                method,
                path,
                body.as_deref(),
            );
            assert_ne!(status, 0, "{}: no answer over the Unix socket", op.name);
            Some(!http_denied(status))
        }
        Door::DbusNobody | Door::DbusRoot => {
            let (method, args) = op.dbus.as_ref()?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (ok, out) = dbus(bus, door == Door::DbusNobody, method, &args);
            Some(ok || !out.contains("AccessDenied"))
        }
    }
}
