//! Konsul's policy files loaded unchanged, files named in requests, the
//! Unix socket's ownership and one status view.

use super::*;

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
