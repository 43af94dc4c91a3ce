//! The bus itself: signals that follow writes, the shipped bus policy,
//! and a second daemon on the same name.

use super::*;

#[test]
fn signals_follow_http_writes_and_sync_state() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start(dir.path(), Policy::Open);
    // A hub address makes SyncNow meaningful; nothing listens there, and
    // this build has no sync client yet, so the request just queues.
    bus.config(dir.path(), "cloud:\n  server_address: http://127.0.0.1:9\n");
    let d = Daemon::start(dir.path());
    let mon = Monitor::start(&bus);

    let r = d.put(
        "/register",
        r#"{"name":"web","address":"10.0.0.5","port":8080}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let sig = mon
        .wait_block(|b| b.contains("member=ServiceChanged") && b.contains(r#"string "upsert""#))
        .expect("ServiceChanged after the HTTP registration");
    assert!(sig.contains(r#"string "web""#), "{sig}");
    assert!(sig.contains("interface=io.konsul.Edge1.Registry"), "{sig}");
    let sig = mon
        .wait_block(|b| {
            b.contains("member=PropertiesChanged")
                && b.contains("PendingChanges")
                && b.contains("uint64 ")
        })
        .expect("PropertiesChanged on io.konsul.Edge1.Sync");
    assert!(sig.contains(r#"string "io.konsul.Edge1.Sync""#), "{sig}");
    assert!(sig.contains("uint64 1"), "{sig}");

    assert_eq!(d.put("/kv/a", r#"{"value":"1"}"#).status, 200);
    mon.wait_block(|b| b.contains("member=KeyChanged") && b.contains(r#"string "a""#))
        .expect("KeyChanged");
    assert_eq!(d.delete("/deregister/web").status, 200);
    mon.wait_block(|b| b.contains("member=ServiceChanged") && b.contains(r#"string "delete""#))
        .expect("ServiceChanged on deregistration");

    // SyncNow: root may, and the hub is configured.
    let out = busctl(
        &bus,
        false,
        &["call", NAME, PATH, "io.konsul.Edge1.Sync", "SyncNow"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = busctl(
        &bus,
        true,
        &[
            "get-property",
            NAME,
            PATH,
            "io.konsul.Edge1.Sync",
            "Enabled",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "b true");
}

#[test]
fn the_bus_policy_file_lets_the_daemon_decide_and_keeps_other_interfaces_closed() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start(dir.path(), Policy::System);
    bus.config(dir.path(), "");
    // Owning the name under system.conf's "deny own" default proves the
    // policy's <allow own> for root.
    let d = Daemon::start(dir.path());
    assert_eq!(
        d.put(
            "/register",
            r#"{"name":"web","address":"10.0.0.5","port":80}"#
        )
        .status,
        200
    );

    let list = call_json(&bus, true, "io.konsul.Edge1.Registry", "ListServices", &[]);
    assert_eq!(list[0].as_array().unwrap().len(), 1);
    call_json(&bus, true, "io.konsul.Edge1.Kv", "List", &["s", ""]);
    call_json(&bus, true, "io.konsul.Edge1.Devices", "ListDevices", &[]);
    call_json(&bus, true, "io.konsul.Edge1.Registry", "Status", &[]);
    let out = busctl(
        &bus,
        true,
        &[
            "get-property",
            NAME,
            PATH,
            "io.konsul.Edge1.Sync",
            "PendingChanges",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = busctl(&bus, true, &["introspect", NAME, PATH]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The bus lets the call through and the daemon's access policy (the
    // one HTTP applies) refuses it.
    let (ok, out) = gdbus(
        &bus,
        true,
        "io.konsul.Edge1.Kv.Put",
        &["'k'", "'v'", "@a{sv} {}"],
    );
    assert!(
        !ok && out.contains("io.konsul.Edge1.Error.AccessDenied"),
        "{out}"
    );
    let (ok, out) = dbus_send(&bus, true, "io.konsul.Edge1.Sync.SyncNow", &[]);
    assert!(
        !ok && out.contains("io.konsul.Edge1.Error.AccessDenied"),
        "{out}"
    );
    // An interface the file does not list stays closed at the bus.
    let (ok, out) = dbus_send(&bus, true, "io.konsul.Edge1.Nope.Method", &[]);
    assert!(
        !ok && out.contains("org.freedesktop.DBus.Error.AccessDenied"),
        "{out}"
    );
    let (ok, out) = gdbus(
        &bus,
        false,
        "io.konsul.Edge1.Kv.Put",
        &["'k'", "'v'", "@a{sv} {}"],
    );
    assert!(ok, "root may write: {out}");
}

#[test]
fn a_second_daemon_on_the_same_bus_fails_before_ready() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start(dir.path(), Policy::Open);
    bus.config(dir.path(), "");
    let _first = Daemon::start(dir.path());
    let dir2 = tempfile::tempdir().unwrap();
    bus.config(dir2.path(), "");
    let out = run_bounded(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(dir2.path().join("edge.yaml"))
            .env_remove("NOTIFY_SOCKET"),
    );
    assert_eq!(out.status.code(), Some(69), "EX_UNAVAILABLE");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot own io.konsul.Edge1"), "{err}");
    assert!(!err.contains(" ready in "), "{err}");
}
