//! One access policy behind every door: each mutating HTTP route and D-Bus
//! method, tried as anonymous TCP, TCP with a valid and with a wrong token,
//! the Unix socket as nobody and as root, and D-Bus (a private bus whose
//! policy is the shipped one) as nobody and as root. Each door must give
//! the same allow or deny, and a denial must change nothing. Plus: the same
//! bad request gets the same error class over HTTP and D-Bus, Konsul's own
//! policy files load unchanged and are enforced (and reloaded on SIGHUP),
//! and the daemon never reads a file for a caller who cannot.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::*;

const NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];
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

fn as_user(nobody: bool, program: &str) -> Command {
    if nobody {
        let mut c = Command::new("setpriv");
        c.args(NOBODY).arg(program);
        c
    } else {
        Command::new(program)
    }
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
    let mut cmd = as_user(nobody, "gdbus");
    cmd.args(["call", "--address", &bus.address])
        .args([
            "--dest",
            "io.konsul.Edge1",
            "--object-path",
            "/io/konsul/Edge1",
        ])
        .args(["--timeout", "15", "--method", method])
        .args(args);
    let out = run_bounded(&mut cmd);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
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

#[test]
fn every_door_gives_the_same_answer_and_a_denial_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bus = shipped_bus(dir.path());
    let d = start(dir.path(), &bus, "", "");
    let admin = [("X-API-Key", ADMIN_TOKEN)];
    let setup = |m, p: &str, b: &str| {
        let r = request_anon(&d.addr, m, p, Some(b.as_bytes()), &admin);
        assert_eq!(r.status, 200, "{p}: {}", r.text());
    };
    setup(
        "PUT",
        "/register",
        r#"{"name":"web","address":"10.0.0.5","port":80}"#,
    );
    setup("PUT", "/kv/keep", r#"{"value":"1"}"#);
    let snap = |d: &Daemon| {
        let r = |p: &str| request_anon(&d.addr, "GET", p, None, &admin).json();
        serde_json::json!([
            r("/v1/edge/status")["modify_index"],
            r("/v1/edge/services"),
            r("/kv/"),
            r("/v1/edge/firmware"),
            r("/v1/edge/rollouts"),
        ])
    };

    let denied_doors = [
        Door::Anonymous,
        Door::WrongToken,
        Door::UnixNobody,
        Door::DbusNobody,
    ];
    let admin_doors = [Door::GoodToken, Door::UnixRoot, Door::DbusRoot];
    let mut table = Vec::new();
    for door in denied_doors {
        for op in ops(&format!("{door:?}").to_lowercase())
            .iter()
            .filter(|o| !o.open)
        {
            let before = snap(&d);
            if let Some(allowed) = attempt(&d, &bus, door, op) {
                table.push(format!(
                    "{door:?} {}: {}",
                    op.name,
                    if allowed { "allow" } else { "deny" }
                ));
                assert!(!allowed, "{door:?} may {}", op.name);
                assert_eq!(
                    snap(&d),
                    before,
                    "{door:?} {}: a denial changed state",
                    op.name
                );
            }
        }
    }
    // Registering a new service is the local-app right every door but a
    // wrong token shares.
    for door in [Door::Anonymous, Door::UnixNobody, Door::DbusNobody] {
        for op in ops(&format!("{door:?}").to_lowercase())
            .iter()
            .filter(|o| o.open)
        {
            if let Some(allowed) = attempt(&d, &bus, door, op) {
                assert!(allowed, "{door:?} may not {}", op.name);
            }
        }
    }
    assert_eq!(
        request_anon(&d.addr, "GET", "/services/web", None, &admin).json()["address"],
        "10.0.0.5",
        "nobody took web over"
    );
    for door in admin_doors {
        for op in ops(&format!("{door:?}").to_lowercase()) {
            if let Some(allowed) = attempt(&d, &bus, door, &op) {
                table.push(format!(
                    "{door:?} {}: {}",
                    op.name,
                    if allowed { "allow" } else { "deny" }
                ));
                assert!(allowed, "{door:?} may not {}", op.name);
            }
        }
    }
    eprintln!("{}", table.join("\n"));
    assert!(
        table.len() > 60,
        "the table covers the doors: {}",
        table.len()
    );
    // Refusals are journalled once each, without the token.
    let refused = d.wait_log(|l| l.contains("access denied: user:nobody"));
    assert!(refused.is_some());
}

#[test]
fn the_same_bad_request_gets_the_same_class_over_http_and_dbus() {
    let dir = tempfile::tempdir().unwrap();
    let bus = shipped_bus(dir.path());
    let d = start(dir.path(), &bus, "", "");
    let admin = [("X-API-Key", ADMIN_TOKEN)];
    let http = |m: &str, p: &str, b: Option<&str>| {
        request_anon(&d.addr, m, p, b.map(str::as_bytes), &admin)
    };
    let name = |args: &[&str], method: &str| {
        let (ok, out) = dbus(&bus, false, method, args);
        assert!(!ok, "{method} succeeded: {out}");
        out
    };
    // OTA not configured.
    let r = http(
        "POST",
        "/v1/edge/ota/install",
        Some(r#"{"path":"/nonexistent"}"#),
    );
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"], "Service Unavailable");
    assert!(name(&["'/nonexistent'"], "io.konsul.Edge1.Ota.Install").contains("Error.Unavailable"));
    // Sync disabled.
    let r = http("POST", "/v1/edge/sync/now", None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(name(&[], "io.konsul.Edge1.Sync.SyncNow").contains("Error.Unavailable"));
    // A CAS conflict.
    assert_eq!(http("PUT", "/kv/k", Some(r#"{"value":"1"}"#)).status, 200);
    let r = http("PUT", "/kv/k", Some(r#"{"value":"2","cas":0}"#));
    assert_eq!(r.status, 409);
    assert_eq!(r.json()["error"], "CAS conflict");
    assert!(name(
        &["'k'", "'2'", "{'cas': <uint64 0>}"],
        "io.konsul.Edge1.Kv.Put"
    )
    .contains("Error.CasConflict"));
    // A missing key.
    assert_eq!(http("GET", "/kv/nope", None).status, 404);
    assert!(name(&["'nope'"], "io.konsul.Edge1.Kv.Get").contains("Error.NotFound"));
    // A full store: fill it through HTTP until it says so.
    let value = "v".repeat(60_000);
    let mut full = None;
    for i in 0..400 {
        let r = http(
            "PUT",
            &format!("/kv/fill/{i}"),
            Some(&format!(r#"{{"value":"{value}"}}"#)),
        );
        if r.status == 507 {
            full = Some(r);
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let full = full.expect("the 8 MiB store never filled");
    assert_eq!(full.json()["error"], "Insufficient Storage");
    let out = name(
        &["'fill/more'", &format!("'{value}'"), "@a{sv} {}"],
        "io.konsul.Edge1.Kv.Put",
    );
    assert!(out.contains("Error.StorageFull"), "{out}");
    // No path or SQL leaves through either door.
    assert!(!full.text().contains(".db"), "{}", full.text());
    assert!(!out.contains(".db"), "{out}");
}

/// Konsul's docs/acl.md policies, verbatim.
const DOCS_ADMIN: &str = r#"{
  "name": "admin",
  "description": "Full administrative access",
  "kv": [
    {
      "path": "*",
      "capabilities": ["read", "write", "list", "delete"]
    }
  ],
  "service": [
    {
      "name": "*",
      "capabilities": ["read", "write", "list", "register", "deregister"]
    }
  ],
  "health": [
    {
      "capabilities": ["read", "write"]
    }
  ],
  "backup": [
    {
      "capabilities": ["create", "restore", "export", "import"]
    }
  ],
  "admin": [
    {
      "capabilities": ["read", "write", "admin"]
    }
  ]
}"#;

const DOCS_DEVELOPER: &str = r#"{
  "name": "developer",
  "kv": [
    {
      "path": "secrets/**",
      "capabilities": ["deny"]
    },
    {
      "path": "app/**",
      "capabilities": ["read", "write"]
    }
  ]
}"#;

#[test]
fn konsul_policy_files_load_unchanged_are_enforced_and_reload_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let bus = shipped_bus(dir.path());
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(policies.join("admin.json"), DOCS_ADMIN).unwrap();
    std::fs::write(policies.join("developer.json"), DOCS_DEVELOPER).unwrap();
    let dev = token_file(dir.path(), "dev.token", DEV_TOKEN);
    let konsul_admin = token_file(dir.path(), "kadmin.token", "konsul-admin-token-0123");
    let d = start(
        dir.path(),
        &bus,
        &format!("  policy_dir: {}\n", policies.display()),
        &format!(
            "    - name: dev\n      file: {}\n      policies: [developer]\n    - name: kadmin\n      file: {}\n      policies: [admin]\n",
            dev.display(),
            konsul_admin.display()
        ),
    );
    let as_dev = |m: &str, p: &str, b: Option<&str>| {
        request_anon(
            &d.addr,
            m,
            p,
            b.map(str::as_bytes),
            &[("Authorization", &format!("Bearer {DEV_TOKEN}"))],
        )
    };
    assert_eq!(
        as_dev("PUT", "/kv/app/x", Some(r#"{"value":"1"}"#)).status,
        200
    );
    assert_eq!(as_dev("GET", "/kv/app/x", None).status, 200);
    let r = as_dev("PUT", "/kv/secrets/a", Some(r#"{"value":"1"}"#));
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json(),
        serde_json::json!({"error": "forbidden", "message": "insufficient permissions",
                           "resource": "kv", "capability": "write"})
    );
    assert_eq!(
        as_dev("DELETE", "/kv/app/x", None).status,
        403,
        "no delete granted"
    );
    assert_eq!(
        as_dev(
            "PUT",
            "/register",
            Some(r#"{"name":"a","address":"1.1.1.1","port":1}"#)
        )
        .status,
        403
    );
    // Konsul's admin policy covers Konsul's resources, not the edge's own.
    let kadmin = [("X-API-Key", "konsul-admin-token-0123")];
    let r = request_anon(
        &d.addr,
        "PUT",
        "/kv/any/where",
        Some(br#"{"value":"1"}"#),
        &kadmin,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = request_anon(&d.addr, "POST", "/v1/edge/sync/now", None, &kadmin);
    assert_eq!(r.status, 403, "{}", r.text());

    // A changed policy takes effect on SIGHUP, without a restart.
    std::fs::write(
        policies.join("developer.json"),
        DOCS_DEVELOPER.replace(r#""read", "write""#, r#""read""#),
    )
    .unwrap();
    d.signal("HUP");
    assert!(d.wait_log(|l| l.contains("acl reloaded")).is_some());
    assert_eq!(
        as_dev("PUT", "/kv/app/y", Some(r#"{"value":"1"}"#)).status,
        403
    );
    // A broken file keeps the rules in force.
    std::fs::write(policies.join("developer.json"), "{ not json").unwrap();
    d.signal("HUP");
    assert!(d
        .wait_log(|l| l.contains("previous access rules stay"))
        .is_some());
    assert_eq!(
        as_dev("GET", "/kv/app/x", None).status,
        200,
        "still allowed to read"
    );
}

#[test]
fn the_daemon_reads_no_file_for_a_caller_who_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let bus = shipped_bus(dir.path());
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("ota.json"),
        r#"{"name":"ota-operator","edge":[{"path":"ota","capabilities":["read","write"]}]}"#,
    )
    .unwrap();
    let d = start(
        dir.path(),
        &bus,
        &format!(
            "  policy_dir: {}\n  users:\n    nobody: [ota-operator]\n",
            policies.display()
        ),
        "",
    );
    // A bundle in a root-only directory, and one anyone may read.
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::write(secret.join("bundle.raucb"), "x").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let public = dir.path().join("public.raucb");
    std::fs::write(&public, "x").unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o644)).unwrap();

    let sock = d.dir.join("api.sock");
    let body = |p: &Path| format!(r#"{{"path":"{}"}}"#, p.display());
    let (status, text) = unix_http(
        &sock,
        true,
        "POST",
        "/v1/edge/ota/install",
        Some(&body(&secret.join("bundle.raucb"))),
    );
    assert_eq!(status, 403, "{text}");
    // The same user may name a file it can read: the request reaches the
    // coordinator (which has no backend in this config).
    let (status, text) = unix_http(
        &sock,
        true,
        "POST",
        "/v1/edge/ota/install",
        Some(&body(&public)),
    );
    assert_eq!(status, 503, "{text}");
    // Over D-Bus, the same rule.
    let (ok, out) = dbus(
        &bus,
        true,
        "io.konsul.Edge1.Ota.Install",
        &[&format!("'{}'", secret.join("bundle.raucb").display())],
    );
    assert!(!ok && out.contains("AccessDenied"), "{out}");
    let (ok, out) = dbus(
        &bus,
        true,
        "io.konsul.Edge1.Ota.Install",
        &[&format!("'{}'", public.display())],
    );
    assert!(!ok && out.contains("Unavailable"), "{out}");
    // Anonymous TCP never reaches it, ACLs or not.
    let r = request_anon(
        &d.addr,
        "POST",
        "/v1/edge/ota/install",
        Some(body(&public).as_bytes()),
        &[],
    );
    assert_eq!(r.status, 401);
}

#[test]
fn a_second_daemon_does_not_take_the_first_ones_socket() {
    let dir = tempfile::tempdir().unwrap();
    let bus = shipped_bus(dir.path());
    let d = start(dir.path(), &bus, "", "");
    let sock = d.dir.join("api.sock");
    let other = tempfile::tempdir().unwrap();
    std::fs::write(
        other.path().join("edge.yaml"),
        format!(
            "node_id: second\nstorage:\n  path: {}\nhttp:\n  listen: 127.0.0.1:0\n  unix_socket: {}\n",
            other.path().join("k.db").display(),
            sock.display()
        ),
    )
    .unwrap();
    let out = run_bounded(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(other.path().join("edge.yaml"))
            .env_remove("NOTIFY_SOCKET"),
    );
    assert_eq!(
        out.status.code(),
        Some(69),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("another process is serving this socket"));
    let (status, _) = unix_http(&sock, false, "GET", "/health/live", None);
    assert_eq!(status, 200, "the first daemon still serves its socket");
}

#[test]
fn status_json_and_the_http_status_carry_the_same_fields() {
    let dir = tempfile::tempdir().unwrap();
    let bus = shipped_bus(dir.path());
    let d = start(dir.path(), &bus, "", "");
    let out = run_bounded(Command::new(BIN).args(["status", "--json", "--bus", &bus.address]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let http = request_anon(
        &d.addr,
        "GET",
        "/v1/edge/status",
        None,
        &[("X-API-Key", ADMIN_TOKEN)],
    )
    .json();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&cli), keys(&http), "cli {cli}\nhttp {http}");
    assert_eq!(cli["node_id"], http["node_id"]);
    assert_eq!(cli["ota"]["state"], http["ota"]["state"]);
}
