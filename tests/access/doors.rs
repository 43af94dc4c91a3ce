//! Every mutating route and method through every door, and the same bad
//! request over HTTP and D-Bus.

use super::*;

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

/// The sync state is one read with one answer: a local user who may read
/// it on D-Bus (the Sync properties) and in `/v1/edge/status` may read it
/// at `/v1/edge/sync` too, over TCP and the Unix socket.
#[test]
fn a_user_who_reads_the_sync_state_through_one_door_reads_it_through_every_door() {
    let dir = tempfile::tempdir().unwrap();
    let bus = shipped_bus(dir.path());
    let d = start(dir.path(), &bus, "", "");
    let (ok, props) = dbus(
        &bus,
        true,
        "org.freedesktop.DBus.Properties.GetAll",
        &["io.konsul.Edge1.Sync"],
    );
    assert!(ok && props.contains("PendingChanges"), "{props}");
    let status = request_anon(&d.addr, "GET", "/v1/edge/status", None, &[]);
    assert_eq!(status.status, 200, "{}", status.text());
    assert!(status.json()["sync"].is_object(), "{}", status.text());

    let r = request_anon(&d.addr, "GET", "/v1/edge/sync", None, &[]);
    assert_eq!(r.status, 200, "anonymous GET /v1/edge/sync: {}", r.text());
    assert_eq!(
        r.json()["pending_changes"],
        status.json()["sync"]["pending_changes"]
    );
    let (code, body) = unix_http(&d.dir.join("api.sock"), true, "GET", "/v1/edge/sync", None);
    assert_eq!(code, 200, "nobody over the Unix socket: {body}");
    // Reading is all it grants.
    let r = request_anon(&d.addr, "POST", "/v1/edge/sync/now", None, &[]);
    assert!(r.status == 401 || r.status == 403, "{}", r.text());
}
