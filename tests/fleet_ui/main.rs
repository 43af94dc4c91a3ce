//! The hub's fleet page in a real browser: a hub, two edges with their own
//! mosquitto and registered devices, and headless Chromium driven by
//! `drive.py` (selenium) one step at a time. Every browser step waits on a
//! condition with a deadline; screenshots go to `target/fleet-ui/`.
//!
//! Needs the venv `scripts/test.sh` makes: its python in
//! `TEST_SELENIUM_PYTHON`. Without it the test fails and says so.

#[path = "../common/mod.rs"]
mod common;

mod api;
mod edge_report;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::broker::Broker;
use common::*;
use konsul_edge::firmware::{base64_encode, hex};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{json, Value};

/// The longest one browser step may wait for its condition.
const STEP: Duration = Duration::from_secs(40);

/// The selenium driver process and its line protocol.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    answers: mpsc::Receiver<String>,
    shots: PathBuf,
}

/// The venv's python; the test fails (never passes quietly) without it.
fn selenium_python() -> String {
    let python = std::env::var("TEST_SELENIUM_PYTHON").unwrap_or_default();
    assert!(
        !python.is_empty() && Path::new(&python).exists(),
        "TEST_SELENIUM_PYTHON is not set to a python with selenium: run scripts/test.sh \
         (it installs chromium, chromium-driver and a selenium venv, then sets it)"
    );
    python
}

impl Browser {
    fn start(python: &str, profile: &Path) -> Browser {
        let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fleet-ui");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fleet_ui/drive.py");
        let mut child = Command::new(python)
            .arg(&script)
            .arg(&shots)
            .arg(profile)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {python}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut b = Browser {
            child,
            stdin,
            answers,
            shots,
        };
        let version = b.answer("browser start");
        eprintln!("chromium {version}");
        b
    }

    fn answer(&mut self, what: &str) -> Value {
        let line = self
            .answers
            .recv_timeout(STEP + Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("the browser driver did not answer `{what}` in time"));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], true, "browser step {what}: {}", v["error"]);
        v["value"].clone()
    }

    /// Runs one step; fails the test with the driver's error.
    fn step(&mut self, mut step: Value) -> Value {
        step["timeout"] = json!(STEP.as_secs());
        writeln!(self.stdin, "{step}").unwrap();
        self.answer(&step.to_string())
    }

    fn wait(&mut self, css: &str, cond: Value) -> Value {
        let mut s = json!({"step": "wait", "css": css});
        if let (Some(s), Some(c)) = (s.as_object_mut(), cond.as_object()) {
            s.extend(c.clone());
        }
        self.step(s)
    }

    fn click(&mut self, css: &str) {
        self.step(json!({"step": "click", "css": css}));
    }

    fn rows(&mut self) -> Vec<Value> {
        let v = self.step(json!({"step": "rows"}));
        v.as_array().cloned().unwrap_or_default()
    }

    fn shot(&mut self, name: &str) {
        let path = self.step(json!({"step": "shot", "name": name}));
        assert!(
            self.shots.join(format!("{name}.png")).exists(),
            "screenshot {path}"
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"step": "quit"}));
        let (tx, rx) = mpsc::channel();
        let pid = self.child.id();
        std::thread::spawn(move || {
            if rx.recv_timeout(Duration::from_secs(20)).is_err() {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        });
        let _ = self.child.wait();
        let _ = tx.send(());
    }
}

struct Signer(Ed25519KeyPair);

impl Signer {
    fn new() -> Signer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Signer(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap())
    }
}

fn config(dir: &Path, node: &str, signer: &Signer, extra: &str) {
    let text = format!(
        "mode: edge\nnode_id: {node}\nstorage:\n  path: {}\n  max_size: 32Mi\nhttp:\n  listen: 127.0.0.1:0\n\
         firmware:\n  max_size: 1Mi\n  public_keys: [\"{}\"]\n{extra}",
        dir.join("konsul.db").display(),
        base64_encode(signer.0.public_key().as_ref())
    );
    std::fs::write(dir.join("edge.yaml"), text).unwrap();
}

/// An edge syncing every second, with its own broker and devices.
struct Edge {
    d: Daemon,
    broker: Broker,
    _dir: tempfile::TempDir,
}

impl Edge {
    fn start(hub: &Daemon, signer: &Signer, node: &str, devices: &[&str]) -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(dir.path());
        config(
            dir.path(),
            node,
            signer,
            &format!(
                "mqtt:\n  enabled: true\n  broker: {}\n  client_id: fleet-{node}\n  qos: 1\n\
                 cloud: {{server_address: 'http://{}', sync_interval: 1s}}\n",
                broker.url(),
                hub.addr
            ),
        );
        let d = Daemon::start(dir.path());
        let connected = |l: &str| l.contains("mqtt::bridge: connected to ");
        if !d.early.iter().any(|l| connected(l)) {
            d.wait_log(connected).expect("edge connects to its broker");
        }
        let e = Edge {
            d,
            broker,
            _dir: dir,
        };
        for id in devices {
            e.publish(
                &format!("devices/{id}/register"),
                &json!({"type": "sensor", "firmware_version": "1.0.0", "telemetry_interval": "1h"})
                    .to_string(),
            );
        }
        e
    }

    fn publish(&self, topic: &str, payload: &str) {
        let out = run_bounded(Command::new("mosquitto_pub").args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.broker.port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            payload,
        ]));
        assert!(out.status.success(), "mosquitto_pub: {out:?}");
    }
}

/// The hub's fleet list, once `pred` holds.
fn fleet_edges(hub: &Daemon, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(40), || {
        let r = hub.get("/v1/edge/fleet/edges");
        (r.status == 200 && pred(&r.json())).then(|| r.json())
    })
}

/// One sync request as an edge sends it (uncompressed), which the hub
/// must take.
fn post_sync(hub: &Daemon, body: &[u8]) {
    let r = request_anon(
        &hub.addr,
        "POST",
        "/v1/edge/sync",
        Some(body),
        &[("Content-Type", "application/x-protobuf")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

fn cell(row: &Value, i: usize) -> String {
    row["cells"][i].as_str().unwrap_or("").to_owned()
}

#[test]
fn the_fleet_page_lists_edges_marks_stale_ones_shows_alerts_live_and_pauses_a_rollout() {
    let python = selenium_python();
    let signer = Signer::new();
    let hub_dir = tempfile::tempdir().unwrap();
    // Edges are expected every second: stale after 2 s * 2 + 5 s.
    config(
        hub_dir.path(),
        "fleet-hub",
        &signer,
        "cloud: {sync_interval: 1s}\n",
    );
    let hub = Daemon::start_hub(hub_dir.path());
    let token = admin_token(hub_dir.path()).expect("the hub has an admin token");
    let a = Edge::start(&hub, &signer, "edge-a", &["a0", "a1"]);
    let mut b = Edge::start(&hub, &signer, "edge-b", &["b0", "b1", "b2"]);
    fleet_edges(&hub, "both edges' devices at the hub", |v| {
        let n = |id: &str| {
            v["items"]
                .as_array()
                .and_then(|i| i.iter().find(|e| e["edge_id"] == id))
                .map(|e| e["devices"].clone())
        };
        n("edge-a") == Some(json!(2)) && n("edge-b") == Some(json!(3))
    });
    // A signed image and a rollout the devices will be offered (they take
    // no offers: their state stays `offered`, per edge).
    let img: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let digest = ring::digest::digest(&ring::digest::SHA256, &img);
    let (sha, sig) = (
        hex(digest.as_ref()),
        hex(signer.0.sign(digest.as_ref()).as_ref()),
    );
    let up = request(
        &hub.addr,
        "PUT",
        &format!("/v1/edge/firmware?device_type=sensor&version=3.0.0&sha256={sha}&signature={sig}"),
        Some(&img),
        &[],
    );
    assert_eq!(up.status, 201, "{}", up.text());

    let profile = tempfile::tempdir().unwrap();
    let mut br = Browser::start(&python, profile.path());
    let url = format!("http://{}/ui/", hub.addr);

    // 1. No token: a prompt, not a broken table.
    br.step(json!({"step": "get", "url": url}));
    let prompt = br.wait("#login", json!({"visible": true}));
    assert!(
        prompt
            .as_str()
            .is_some_and(|t| t.contains("needs an API token")),
        "{prompt}"
    );
    br.wait("#main", json!({"visible": false}));
    br.shot("no-token");

    // 2. The token once; both edges with their device counts.
    br.step(json!({"step": "type", "css": "#token", "keys": token, "submit": true}));
    br.wait("#grid tbody tr[data-id='edge-b']", json!({"visible": true}));
    br.wait("#grid tbody tr[data-id='edge-a']", json!({"visible": true}));
    let rows = br.rows();
    let devices = |id: &str| {
        rows.iter()
            .find(|r| r["id"] == id)
            .map(|r| cell(r, 9))
            .unwrap_or_default()
    };
    assert_eq!(devices("edge-a"), "2", "{rows:?}");
    assert_eq!(devices("edge-b"), "3", "{rows:?}");
    for r in &rows {
        assert!(!r["cls"].as_str().unwrap_or("").contains("stale"), "{r}");
        // Each edge says which version it runs in its sync request.
        assert_eq!(cell(r, 1), env!("CARGO_PKG_VERSION"), "{r}");
    }
    br.shot("edges");
    // The page is not reloaded from here on: a reload would lose this.
    br.step(json!({"step": "js", "script": "window.fleetMarker = 'kept'; return 1;"}));

    // 3. A device alert appears in the open alerts view without a reload.
    br.click("#tabs a[data-view='alerts']");
    br.wait("#grid tbody td.muted", json!({"text": "Nothing to show"}));
    a.publish(
        "devices/a1/events",
        r#"{"type":"alert","name":"overheat","severity":"critical","message":"92C at the inlet"}"#,
    );
    br.wait(
        "#grid tbody tr[data-id='a1']",
        json!({"text": "92C at the inlet"}),
    );
    let rows = br.rows();
    assert_eq!(cell(&rows[0], 2), "edge-a", "{rows:?}");
    assert_eq!(cell(&rows[0], 3), "event:overheat", "{rows:?}");
    br.shot("alerts");

    // 4. A firmware rollout with per-edge progress, paused from the page.
    let r = hub.req(
        "POST",
        "/v1/edge/rollouts",
        Some(r#"{"id":"fw3","device_type":"sensor","version":"3.0.0","wave_size":5}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    br.click("#tabs a[data-view='rollouts']");
    br.click("#grid tbody tr[data-id='fw3']");
    let a_row = br.wait(
        "#rollout-edges tbody tr[data-id='edge-a']",
        json!({"text": "offered 2"}),
    );
    let b_row = br.wait(
        "#rollout-edges tbody tr[data-id='edge-b']",
        json!({"text": "offered 3"}),
    );
    assert!(a_row.as_str().is_some_and(|t| t.contains("0/2")), "{a_row}");
    assert!(b_row.as_str().is_some_and(|t| t.contains("0/3")), "{b_row}");
    br.shot("rollout");
    br.click("#rollout-pause");
    br.wait("#rollout-state", json!({"attrs": {"data-state": "paused"}}));
    let at_hub = hub.get("/v1/edge/rollouts/fw3").json();
    assert_eq!(at_hub["state"], "paused", "{at_hub}");
    br.shot("rollout-paused");

    // 5. An edge whose sync stops turns stale; the other does not.
    br.click("#tabs a[data-view='edges']");
    br.wait("#grid tbody tr[data-id='edge-b']", json!({"visible": true}));
    b.d.stop();
    br.wait("#grid tbody tr[data-id='edge-b']", json!({"cls": "stale"}));
    br.wait(
        "#grid tbody tr[data-id='edge-a']",
        json!({"not_cls": "stale", "text": "in sync"}),
    );
    let kept = br.step(json!({"step": "js", "script": "return window.fleetMarker || null;"}));
    assert_eq!(kept, "kept", "the page reloaded");
    br.shot("stale");

    // 6. A thousand more edges: the page shows its first page of them,
    // pages on, and sorts on the hub.
    for e in 0..1000 {
        post_sync(
            &hub,
            &konsul_edge::sync::testing::fleet_batch(&format!("sim-{e:04}"), 1, 0, false),
        );
    }
    br.wait("#range", json!({"text": "1-50 of 1002"}));
    assert_eq!(br.rows().len(), 50);
    br.click("#next");
    br.wait("#range", json!({"text": "51-100 of 1002"}));
    br.wait(
        "#grid tbody tr[data-id='sim-0048']",
        json!({"visible": true}),
    );
    br.click("#grid th[data-sort='devices']");
    br.wait(
        "#grid th[data-sort='devices']",
        json!({"attrs": {"aria-sort": "ascending"}}),
    );
    br.click("#grid th[data-sort='devices']");
    br.wait(
        "#grid th[data-sort='devices']",
        json!({"attrs": {"aria-sort": "descending"}}),
    );
    br.wait(
        "#grid tbody tr:first-child",
        json!({"attrs": {"data-id": "edge-b"}}),
    );
    br.wait("#range", json!({"text": "1-50 of 1002"}));
    br.shot("thousand-edges");
    drop(a);
}
