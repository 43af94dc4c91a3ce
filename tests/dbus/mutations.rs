//! Writes over D-Bus: the daemon's own access check, firmware and
//! rollouts over D-Bus and the CLI, and sync control without a hub.

use super::*;

#[test]
fn mutations_need_root_or_group_konsul_checked_in_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    // The bus allows everything: any refusal is the daemon's own.
    let bus = Bus::start(dir.path(), Policy::Open);
    bus.config(dir.path(), "");
    let d = Daemon::start(dir.path());

    for (method, args) in [
        ("io.konsul.Edge1.Kv.Put", vec!["'k'", "'v'", "@a{sv} {}"]),
        ("io.konsul.Edge1.Kv.Delete", vec!["'k'", "@a{sv} {}"]),
        (
            "io.konsul.Edge1.Registry.DeregisterService",
            vec!["'web'", "@a{sv} {}"],
        ),
        ("io.konsul.Edge1.Sync.SyncNow", vec![]),
    ] {
        let (ok, out) = gdbus(&bus, true, method, &args);
        assert!(!ok, "{method} as nobody succeeded: {out}");
        assert!(
            out.contains("io.konsul.Edge1.Error.AccessDenied"),
            "{method}: {out}"
        );
    }
    // Registering a new service is every local app's right; taking over
    // one that exists (another address) is not.
    let r = d.put(
        "/register",
        r#"{"name":"evil","address":"10.0.0.1","port":1}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let out = busctl(
        &bus,
        true,
        &[
            "call",
            NAME,
            PATH,
            "io.konsul.Edge1.Registry",
            "RegisterService",
            "a{sv}a{sv}",
            "3",
            "name",
            "s",
            "evil",
            "address",
            "s",
            "1.2.3.4",
            "port",
            "q",
            "1",
            "0",
        ],
    );
    assert!(!out.status.success());
    assert_eq!(
        d.get("/services/evil").json()["address"],
        "10.0.0.1",
        "the registration was not taken over"
    );
    assert_eq!(d.get("/kv/k").status, 404);
    assert!(d
        .wait_log(|l| l.contains("access denied: user:nobody"))
        .is_some());

    // Reads still work for that user...
    let keys = call_json(&bus, true, "io.konsul.Edge1.Kv", "List", &["s", ""]);
    assert_eq!(keys[0], serde_json::json!([]));
    // ...and root may write, with CAS in the options.
    let idx = call_json(
        &bus,
        false,
        "io.konsul.Edge1.Kv",
        "Put",
        &["ssa{sv}", "k", "v1", "1", "cas", "t", "0"],
    );
    let idx = idx[0].as_u64().unwrap();
    assert_eq!(d.get("/kv/k").json()["value"], "v1");
    let (ok, out) = gdbus(
        &bus,
        false,
        "io.konsul.Edge1.Kv.Put",
        &["'k'", "'v2'", "{'cas': <uint64 0>}"],
    );
    assert!(
        !ok && out.contains("io.konsul.Edge1.Error.CasConflict"),
        "{out}"
    );
    let (ok, out) = gdbus(
        &bus,
        false,
        "io.konsul.Edge1.Kv.Put",
        &["'k'", "'v2'", "{'cass': <uint64 1>}"],
    );
    assert!(
        !ok && out.contains("io.konsul.Edge1.Error.InvalidArgument"),
        "{out}"
    );
    let entry = call_json(&bus, true, "io.konsul.Edge1.Kv", "Get", &["s", "k"]);
    assert_eq!(plain(&entry[0])["modify_index"], idx);
    let out = busctl(
        &bus,
        false,
        &[
            "call",
            NAME,
            PATH,
            "io.konsul.Edge1.Registry",
            "RegisterService",
            "a{sv}a{sv}",
            "2",
            "name",
            "s",
            "web",
            "address",
            "s",
            "1.2.3.4",
            "0",
        ],
    );
    assert!(!out.status.success(), "port is required");
    let (ok, out) = gdbus(
        &bus,
        false,
        "io.konsul.Edge1.Registry.RegisterService",
        &["{'name': <'web'>}", "@a{sv} {}"],
    );
    assert!(
        !ok && out.contains("io.konsul.Edge1.Error.InvalidArgument"),
        "{out}"
    );
}

#[test]
fn firmware_and_rollouts_over_dbus_and_the_cli() {
    use ring::signature::KeyPair;
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start(dir.path(), Policy::Open);
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let key = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public = konsul_edge::firmware::base64_encode(key.public_key().as_ref());
    bus.config(
        dir.path(),
        &format!("firmware:\n  public_keys: [\"{public}\"]\n"),
    );
    let d = Daemon::start(dir.path());
    let img = vec![7u8; 5000];
    let digest = ring::digest::digest(&ring::digest::SHA256, &img);
    let sha = konsul_edge::firmware::hex(digest.as_ref());
    let sig = konsul_edge::firmware::hex(key.sign(digest.as_ref()).as_ref());
    let r = request(
        &d.addr,
        "PUT",
        &format!("/v1/edge/firmware?device_type=sensor&version=2.0.0&sha256={sha}&signature={sig}"),
        Some(&img),
        &[],
    );
    assert_eq!(r.status, 201, "{}", r.text());

    let out = cli(&bus, &["firmware"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("sensor") && text.contains(&sha[..16]),
        "{text}"
    );
    // Starting a rollout is a mutation: refused to nobody.
    let (ok, err) = gdbus(
        &bus,
        true,
        "io.konsul.Edge1.Firmware.StartRollout",
        &["{'device_type': <'sensor'>, 'version': <'2.0.0'>}"],
    );
    assert!(!ok && err.contains("AccessDenied"), "{err}");
    let out = cli(
        &bus,
        &["rollout", "start", "sensor", "2.0.0", "--wave-size", "5"],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = text
        .strip_prefix("rollout ")
        .and_then(|t| t.split_whitespace().next())
        .unwrap_or_else(|| panic!("{text}"))
        .to_owned();
    let out = cli(&bus, &["rollouts", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["wave_size"], 5);
    let out = cli(&bus, &["rollout", "show", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("rollout {id}: sensor 2.0.0")));
    let out = cli(&bus, &["rollout", "show", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));
    // With no devices of the type it completes at once; abort is refused then.
    let out = cli(&bus, &["rollout", "abort", &id]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot abort"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sync_now_without_a_hub_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::start(dir.path(), Policy::Open);
    bus.config(dir.path(), "");
    let _d = Daemon::start(dir.path());
    let (ok, out) = dbus_send(&bus, false, "io.konsul.Edge1.Sync.SyncNow", &[]);
    assert!(
        !ok && out.contains("io.konsul.Edge1.Error.Unavailable"),
        "{out}"
    );
}
