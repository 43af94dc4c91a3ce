//! What external clients and the CLI read: services, devices, status,
//! and the interface document against live introspection.

use super::*;

#[test]
fn external_clients_read_services_and_devices() {
    let dir = tempfile::tempdir().unwrap();
    // A device record as the MQTT bridge writes it, put in the store before
    // the daemon starts (the bridge is not in this build).
    {
        let store = konsul_edge::store::Store::open(konsul_edge::store::StoreOptions {
            path: dir.path().join("konsul.db"),
            max_size: 8 << 20,
            node_id: "test-node".into(),
        })
        .unwrap();
        smol::block_on(store.call(|db| {
            db.tx(|tx| {
                konsul_edge::registry::commit(
                    tx,
                    konsul_edge::store::Kind::Device,
                    "sensor-1",
                    Some("sensor-1"),
                    Some(r#"{"id":"sensor-1","type":"sensor","firmware_version":"1.2.0","telemetry_interval_ms":30000}"#.into()),
                )
            })
        }))
        .unwrap()
        .unwrap();
        store.close();
    }
    let bus = Bus::start(dir.path(), Policy::Open);
    bus.config(dir.path(), "");
    let d = Daemon::start(dir.path());
    let r = d.put(
        "/register",
        r#"{"name":"web","address":"10.0.0.5","port":8080,"tags":["http"],"meta":{"zone":"a"}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // As another user: reads are open.
    let list = call_json(&bus, true, "io.konsul.Edge1.Registry", "ListServices", &[]);
    let services = list[0].as_array().unwrap();
    assert_eq!(services.len(), 1);
    let web = plain(&services[0]);
    assert_eq!(web["name"], "web");
    assert_eq!(web["port"], 8080);
    assert_eq!(web["tags"], serde_json::json!(["http"]));
    assert_eq!(web["health"], "passing");
    assert_eq!(plain(&web["meta"])["zone"], "a");

    let one = call_json(
        &bus,
        true,
        "io.konsul.Edge1.Registry",
        "GetService",
        &["s", "web"],
    );
    assert_eq!(plain(&one[0])["address"], "10.0.0.5");

    let devices = call_json(&bus, true, "io.konsul.Edge1.Devices", "ListDevices", &[]);
    let dev = plain(&devices[0][0]);
    assert_eq!(dev["id"], "sensor-1");
    assert_eq!(dev["firmware_version"], "1.2.0");
    // The same view as HTTP's: health and last-seen, not the raw record.
    assert!(dev["health"].is_string(), "{dev}");
    assert!(dev.get("last_seen").is_some(), "{dev}");
    let one = call_json(
        &bus,
        true,
        "io.konsul.Edge1.Devices",
        "GetDevice",
        &["s", "sensor-1"],
    );
    assert_eq!(plain(&one[0])["type"], "sensor");
    let alerts = call_json(&bus, true, "io.konsul.Edge1.Devices", "ListAlerts", &[]);
    assert_eq!(alerts[0], serde_json::json!([]));

    // Failures carry our error names.
    let (ok, out) = dbus_send(
        &bus,
        true,
        "io.konsul.Edge1.Devices.GetDevice",
        &["string:nope"],
    );
    assert!(
        !ok && out.contains("io.konsul.Edge1.Error.NotFound"),
        "{out}"
    );
    let (ok, out) = dbus_send(
        &bus,
        false,
        "io.konsul.Edge1.Registry.GetService",
        &["string:nope"],
    );
    assert!(
        !ok && out.contains("io.konsul.Edge1.Error.NotFound"),
        "{out}"
    );

    // Properties, read with gdbus-independent busctl.
    let out = busctl(
        &bus,
        true,
        &[
            "get-property",
            NAME,
            PATH,
            "io.konsul.Edge1.Registry",
            "NodeId",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"s "test-node""#
    );
    let out = busctl(
        &bus,
        true,
        &["get-property", NAME, PATH, "io.konsul.Edge1.Ota", "State"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"s "unavailable""#
    );
}

#[test]
fn interface_document_matches_introspection() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start(dir.path(), Policy::Open);
    bus.config(dir.path(), "");
    let _d = Daemon::start(dir.path());
    let out = busctl(
        &bus,
        true,
        &[
            "--json=short",
            "call",
            NAME,
            PATH,
            "org.freedesktop.DBus.Introspectable",
            "Introspect",
        ],
    );
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let live = j["data"][0].as_str().unwrap().trim_start().to_string();
    let doc_path = repo_file("docs/dbus/io.konsul.Edge1.xml");
    if std::env::var_os("KONSUL_BLESS").is_some() {
        std::fs::write(&doc_path, &live).unwrap();
    }
    let doc = std::fs::read_to_string(&doc_path).unwrap_or_default();
    assert!(
        doc == live,
        "docs/dbus/io.konsul.Edge1.xml differs from what the service introspects; \
         if the interface change is intended, run `KONSUL_BLESS=1 cargo test --test dbus interface_document` \
         and review the diff. Live document:\n{live}"
    );
}

#[test]
fn cli_status_services_and_daemon_down() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start(dir.path(), Policy::Open);

    // No daemon on the bus yet.
    let out = cli(&bus, &["status"]);
    assert_eq!(out.status.code(), Some(69), "EX_UNAVAILABLE");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("konsul-edge is not running"), "{err}");
    assert!(out.stdout.is_empty());
    // No bus at all.
    let out = run_bounded(Command::new(BIN).args([
        "services",
        "--bus",
        &format!("unix:path={}", dir.path().join("none").display()),
    ]));
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to the D-Bus"));

    bus.config(dir.path(), "");
    let d = Daemon::start(dir.path());
    assert_eq!(
        d.put(
            "/register",
            r#"{"name":"web","address":"10.0.0.5","port":8080,"tags":["http","v1"]}"#
        )
        .status,
        200
    );
    assert_eq!(
        d.put(
            "/register",
            r#"{"id":"db-1","name":"db","address":"10.0.0.6","port":5432}"#
        )
        .status,
        200
    );

    let out = cli(&bus, &["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with(&format!(
            "konsul-edge {} on node test-node, up ",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(
        text.contains("registry: 2 services, 0 keys, 0 devices, 0 alerts"),
        "{text}"
    );
    assert!(
        text.contains("sync:     standalone (no hub configured), 2 changes pending"),
        "{text}"
    );
    assert!(text.contains("ota:      unavailable"), "{text}");

    let out = cli(&bus, &["status", "--json"]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["node_id"], "test-node");
    assert_eq!(j["services"], 2);
    assert_eq!(j["sync"]["enabled"], false);
    assert_eq!(j["ota"]["state"], "unavailable");

    // Another user reads the same, through the bus given with --bus.
    let out = run_bounded(Command::new("setpriv").args(NOBODY).args([
        BIN,
        "services",
        "--json",
        "--bus",
        &bus.address,
    ]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        j,
        serde_json::json!([
            {"id": "db-1", "name": "db", "address": "10.0.0.6", "port": 5432,
             "health": "passing", "create_index": 2, "modify_index": 2},
            {"id": "web", "name": "web", "address": "10.0.0.5", "port": 8080,
             "tags": ["http", "v1"], "health": "passing", "create_index": 1, "modify_index": 1},
        ])
    );
    let out = cli(&bus, &["services"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ID    NAME  ADDRESS   PORT  HEALTH   TAGS\n\
         db-1  db    10.0.0.6  5432  passing  -\n\
         web   web   10.0.0.5  8080  passing  http,v1\n"
    );

    // kv through the CLI; refused for another user with 77.
    let out = cli(&bus, &["kv", "put", "cfg/x", "42", "--cas", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&cli(&bus, &["kv", "get", "cfg/x"]).stdout),
        "42\n"
    );
    let out = run_bounded(Command::new("setpriv").args(NOBODY).args([
        BIN,
        "kv",
        "put",
        "cfg/x",
        "43",
        "--bus",
        &bus.address,
    ]));
    assert_eq!(
        out.status.code(),
        Some(77),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&bus, &["kv", "get", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("io.konsul.Edge1.Error.NotFound"));
    let out = cli(&bus, &["sync", "status"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "sync: standalone (no hub configured), 3 changes pending\n"
    );

    // The daemon stops: the CLI says so.
    let mut d = d;
    assert!(d.stop().success());
    let out = cli(&bus, &["services", "--json"]);
    assert_eq!(out.status.code(), Some(69));
    assert!(String::from_utf8_lossy(&out.stderr).contains("konsul-edge is not running"));
}

#[test]
fn the_data_budget_and_the_link_show_on_the_bus_and_in_sync_status() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start(dir.path(), Policy::Open);
    // A hub nobody answers on: the budget is still there to read.
    let dead = common::broker::free_port();
    bus.config(
        dir.path(),
        &format!(
            "cloud: {{server_address: 'http://127.0.0.1:{dead}', \
             data_budget: {{limit: 1Mi, period: month}}}}\n"
        ),
    );
    let _d = Daemon::start(dir.path());
    let prop = |name: &str| {
        let out = busctl(
            &bus,
            true,
            &["get-property", NAME, PATH, "io.konsul.Edge1.Sync", name],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    eventually("the budget on the bus", || {
        prop("DataBudget") == "t 1048576"
    });
    // Connection attempts that reached nothing cost nothing.
    assert_eq!(prop("DataBudgetRemaining"), "t 1048576");
    assert_eq!(prop("DataBudgetUsed"), "t 0");
    let out = cli(&bus, &["sync", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("data budget 0 of 1048576 bytes used"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
