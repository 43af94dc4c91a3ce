//! The D-Bus API and the CLI against the real binary on a private
//! dbus-daemon. Clients are external tools (busctl, dbus-send,
//! dbus-monitor) and our own CLI; "another user" is uid/gid 65534 via
//! setpriv with no supplementary groups. Every wait has a deadline; the
//! signal tests wait for dbus-monitor's own NameLost (it is monitoring from
//! then on) instead of sleeping.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use common::*;

const NAME: &str = "io.konsul.Edge1";
const PATH: &str = "/io/konsul/Edge1";
const NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];

/// Which policy the private bus enforces.
enum Policy {
    /// Everything allowed: access control is the daemon's alone.
    Open,
    /// system.conf's defaults plus our systemd/io.konsul.Edge1.conf.
    System,
}

struct Bus {
    child: Child,
    address: String,
}

impl Bus {
    fn start(dir: &Path, policy: Policy) -> Bus {
        // The client runs as nobody: it must reach the socket.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let rules = match policy {
            Policy::Open => OPEN_BUS_POLICY.to_string(),
            Policy::System => shipped_bus_policy(),
        };
        let (child, address) = private_bus_with(dir, &rules);
        Bus { child, address }
    }

    /// A daemon config with D-Bus on this bus.
    fn config(&self, dir: &Path, extra: &str) {
        write_config(
            dir,
            &format!(
                "dbus:\n  enabled: true\n  bus: \"{}\"\n{extra}",
                self.address
            ),
        );
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Lines of a pipe, on a channel (echoed for the test log).
fn lines_of(
    pipe: impl std::io::Read + Send + 'static,
    tag: &'static str,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            eprintln!("[{tag}] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `[setpriv ...] busctl --address=A <args>`.
fn busctl(bus: &Bus, as_nobody: bool, args: &[&str]) -> Output {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(NOBODY).arg("busctl");
        c
    } else {
        Command::new("busctl")
    };
    cmd.arg(format!("--address={}", bus.address))
        .arg("--timeout=15")
        .args(args);
    run_bounded(&mut cmd)
}

/// `busctl --json=short call NAME PATH IFACE METHOD [SIG ARGS...]`: the
/// reply's `data` array.
fn call_json(
    bus: &Bus,
    as_nobody: bool,
    iface: &str,
    method: &str,
    args: &[&str],
) -> serde_json::Value {
    let mut all = vec!["--json=short", "call", NAME, PATH, iface, method];
    all.extend_from_slice(args);
    let out = busctl(bus, as_nobody, &all);
    assert!(
        out.status.success(),
        "{iface}.{method} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    j["data"].clone()
}

/// dbus-send, which names the D-Bus error on failure: (success, output).
fn dbus_send(bus: &Bus, as_nobody: bool, iface_method: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(NOBODY).arg("dbus-send");
        c
    } else {
        Command::new("dbus-send")
    };
    cmd.arg(format!("--bus={}", bus.address))
        .args(["--print-reply", "--reply-timeout=15000"])
        .arg(format!("--dest={NAME}"))
        .arg(PATH)
        .arg(iface_method)
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

/// gdbus, for calls with `a{sv}` arguments (GVariant text syntax), which
/// dbus-send cannot build; it names the D-Bus error on failure.
fn gdbus(bus: &Bus, as_nobody: bool, iface_method: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(NOBODY).arg("gdbus");
        c
    } else {
        Command::new("gdbus")
    };
    cmd.args([
        "call",
        "--address",
        &bus.address,
        "--dest",
        NAME,
        "--object-path",
        PATH,
    ])
    .args(["--timeout", "15", "--method", iface_method])
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

/// Unpacks busctl's JSON for a{sv}: {"key": {"type":..,"data":..}} -> data.
fn plain(dict: &serde_json::Value) -> serde_json::Value {
    match dict {
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), v["data"].clone()))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        other => other.clone(),
    }
}

/// dbus-monitor watching our name; returns once it is monitoring.
struct Monitor {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Monitor {
    fn start(bus: &Bus) -> Monitor {
        let mut child = Command::new("dbus-monitor")
            .args(["--address", &bus.address, &format!("sender='{NAME}'")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dbus-monitor");
        let lines = lines_of(child.stdout.take().unwrap(), "monitor");
        let m = Monitor { child, lines };
        // BecomeMonitor makes the bus take the monitor's name away: once
        // NameLost arrives, every later matching message reaches us.
        m.wait_block(|b| b.contains("member=NameLost"))
            .expect("dbus-monitor did not start monitoring");
        m
    }

    /// Waits for one message (header line plus argument lines) matching
    /// `pred`; messages are separated by their header lines.
    fn wait_block(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        let end = Instant::now() + DEADLINE;
        let mut block = String::new();
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            let header = ["signal ", "method ", "error ", "method return "]
                .iter()
                .any(|h| line.starts_with(h));
            if header && !block.is_empty() {
                if pred(&block) {
                    return Some(block);
                }
                block.clear();
            }
            block.push_str(&line);
            block.push('\n');
            // A message whose arguments are complete when the next header
            // arrives; check eagerly too, for the last message we wait for.
            if pred(&block) {
                return Some(block);
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(bus: &Bus, args: &[&str]) -> Output {
    run_bounded(
        Command::new(BIN)
            .args(args)
            .env("KONSUL_DBUS_BUS", &bus.address)
            .env("KONSUL_LOG", "warn"),
    )
}

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
