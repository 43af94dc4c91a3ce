//! Firmware OTA end to end: a real mosquitto, the real daemon, and devices
//! simulated by paho clients (one thread each) that take the offer from
//! `devices/{id}/update`, download the image over HTTP (resuming with Range
//! when told to drop), check its sha256, report progress on
//! `devices/{id}/update/status` and re-register with the new version.
//! Every wait is on observable state with a deadline.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::*;
use konsul_edge::firmware::{base64_encode, hex};
use paho_mqtt as paho;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{json, Value};

/// A whole rollout may take longer than one wait.
const ROLLOUT_DEADLINE: Duration = Duration::from_secs(90);

struct Signer {
    key: Ed25519KeyPair,
}

impl Signer {
    fn new() -> Signer {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Signer {
            key: Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap(),
        }
    }
    fn public_b64(&self) -> String {
        base64_encode(self.key.public_key().as_ref())
    }
    /// (sha256 hex, signature hex) of an image.
    fn sign(&self, image: &[u8]) -> (String, String) {
        let d = ring::digest::digest(&ring::digest::SHA256, image);
        (hex(d.as_ref()), hex(self.key.sign(d.as_ref()).as_ref()))
    }
}

fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn config(dir: &Path, broker: Option<&Broker>, signer: &Signer, listen: &str) {
    config_with(dir, broker, signer, listen, "");
}

fn config_with(dir: &Path, broker: Option<&Broker>, signer: &Signer, listen: &str, extra: &str) {
    config_node(dir, broker, signer, listen, "fw-node", extra);
}

fn config_node(
    dir: &Path,
    broker: Option<&Broker>,
    signer: &Signer,
    listen: &str,
    node: &str,
    extra: &str,
) {
    let mqtt = match broker {
        Some(b) => format!(
            "mqtt:\n  enabled: true\n  broker: {}\n  client_id: edge-fw-{}\n  qos: 1\n",
            b.url(),
            b.port
        ),
        None => String::new(),
    };
    let path = dir.join("edge.yaml");
    let text = format!(
        "mode: edge\nnode_id: {node}\nstorage:\n  path: {}\n  max_size: 32Mi\nhttp:\n  listen: {listen}\n\
         {mqtt}firmware:\n  max_size: 16Mi\n  public_keys: [\"{}\"]\n  bandwidth_limit: 2Mi\n  rollout:\n    device_deadline: 60s\n{extra}",
        dir.join("konsul.db").display(),
        signer.public_b64()
    );
    std::fs::write(path, text).unwrap();
}

fn start_connected(dir: &Path) -> Daemon {
    let d = Daemon::start(dir);
    let connected = |l: &str| l.contains("mqtt::bridge: connected to ");
    if !d.early.iter().any(|l| connected(l)) {
        d.wait_log(connected)
            .expect("daemon connects to the broker");
    }
    d
}

fn upload(d: &Daemon, signer: &Signer, img: &[u8], version: &str) -> Resp {
    let (sha, sig) = signer.sign(img);
    request(
        &d.addr,
        "PUT",
        &format!("/v1/edge/firmware?device_type=sensor&version={version}&sha256={sha}&signature={sig}&notes=test"),
        Some(img),
        &[],
    )
}

/// Creates a rollout from a JSON spec and insists it was accepted.
fn create_rollout(d: &Daemon, spec: &str) -> Resp {
    let r = d.req("POST", "/v1/edge/rollouts", Some(spec));
    assert_eq!(r.status, 201, "{}", r.text());
    r
}

fn rollout(d: &Daemon, id: &str) -> Value {
    let r = d.get(&format!("/v1/edge/rollouts/{id}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn states(r: &Value) -> HashMap<String, Value> {
    r["device_states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["device"].as_str().unwrap().to_owned(), d.clone()))
        .collect()
}

// --- simulated devices ------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    Good,
    /// Drops the connection halfway through its first download, then
    /// resumes with Range.
    DropOnce,
    /// Reports failure for every offer.
    Fail,
    /// Says it is offline (as its last will would) once registered, and
    /// comes back (a heartbeat) when its gate opens.
    Away,
}

/// A gate the test opens; devices behind it wait before downloading.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut g = self.open.lock().unwrap();
        while !*g {
            g = self.cv.wait(g).unwrap();
        }
    }
    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

#[derive(Default)]
struct Journal {
    /// (device, "offer" | "updated" | "resumed", when)
    events: Vec<(String, &'static str, Instant)>,
    errors: Vec<String>,
    /// Firmware bytes received over HTTP, MQTT payload bytes both ways.
    http_bytes: u64,
    mqtt_bytes: u64,
}

type Shared = Arc<(Mutex<Journal>, Condvar)>;

fn note(j: &Shared, device: &str, what: &'static str) {
    j.0.lock()
        .unwrap()
        .events
        .push((device.into(), what, Instant::now()));
    j.1.notify_all();
}

fn count(j: &Shared, what: &str) -> usize {
    j.0.lock()
        .unwrap()
        .events
        .iter()
        .filter(|e| e.1 == what)
        .count()
}

/// Waits (on the journal's condvar) until `pred` holds.
fn wait_journal(j: &Shared, what: &str, pred: impl Fn(&Journal) -> bool) {
    let end = Instant::now() + ROLLOUT_DEADLINE;
    let mut g = j.0.lock().unwrap();
    while !pred(&g) {
        assert!(g.errors.is_empty(), "device errors: {:?}", g.errors);
        let left = end
            .checked_duration_since(Instant::now())
            .unwrap_or_else(|| panic!("timed out waiting for {what}"));
        g = j.1.wait_timeout(g, left).unwrap().0;
    }
}

struct Fleet {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    journal: Shared,
}

impl Fleet {
    fn start(
        broker: &Broker,
        n: usize,
        behaviour: impl Fn(usize) -> Behaviour,
        gate: impl Fn(usize) -> Option<Arc<Gate>>,
    ) -> Fleet {
        Fleet::start_named(broker, "dev", n, behaviour, gate)
    }

    /// Devices `{prefix}00`...: device ids are unique under a hub, so
    /// fleets of different edges need different prefixes.
    fn start_named(
        broker: &Broker,
        prefix: &str,
        n: usize,
        behaviour: impl Fn(usize) -> Behaviour,
        gate: impl Fn(usize) -> Option<Arc<Gate>>,
    ) -> Fleet {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let journal: Shared = Arc::default();
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for i in 0..n {
            let id = format!("{prefix}{i:02}");
            let url = broker.url();
            let (stop, journal, ready) = (stop.clone(), journal.clone(), ready_tx.clone());
            let (b, g) = (behaviour(i), gate(i));
            threads.push(std::thread::spawn(move || {
                device_main(&url, &id, b, g, &stop, &journal, ready)
            }));
        }
        for _ in 0..n {
            ready_rx
                .recv_timeout(DEADLINE)
                .expect("every device registers");
        }
        Fleet {
            stop,
            threads,
            journal,
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn device_main(
    broker: &str,
    id: &str,
    behaviour: Behaviour,
    gate: Option<Arc<Gate>>,
    stop: &std::sync::atomic::AtomicBool,
    journal: &Shared,
    ready: std::sync::mpsc::Sender<()>,
) {
    let cli = paho::Client::new(
        paho::CreateOptionsBuilder::new()
            .server_uri(broker)
            .client_id(format!("sim-{id}"))
            .persistence(paho::PersistenceType::None)
            .finalize(),
    )
    .unwrap();
    let rx = cli.start_consuming();
    cli.connect(
        paho::ConnectOptionsBuilder::new_v3()
            .clean_session(false)
            .connect_timeout(DEADLINE)
            .finalize(),
    )
    .expect("device connects");
    cli.subscribe_many(
        &[format!("devices/{id}/update"), format!("devices/{id}/ack")],
        &[1, 1],
    )
    .unwrap();
    let mut version = "1.0.0".to_owned();
    let register = |v: &str| {
        let body = json!({"type": "sensor", "firmware_version": v, "telemetry_interval": "1h"});
        cli.publish(paho::Message::new(
            format!("devices/{id}/register"),
            body.to_string(),
            1,
        ))
        .unwrap();
    };
    let status = |s: Value| {
        journal.0.lock().unwrap().mqtt_bytes += s.to_string().len() as u64;
        cli.publish(paho::Message::new(
            format!("devices/{id}/update/status"),
            s.to_string(),
            1,
        ))
        .unwrap();
    };
    register(&version);
    let mut acked = false;
    let mut dropped = false;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let Ok(Some(m)) = rx.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        if m.topic().ends_with("/ack") {
            if !acked {
                acked = true;
                if behaviour == Behaviour::Away {
                    cli.publish(paho::Message::new(
                        format!("devices/{id}/status"),
                        "offline",
                        1,
                    ))
                    .unwrap();
                    let _ = ready.send(());
                    if let Some(g) = &gate {
                        g.wait();
                    }
                    note(journal, id, "back");
                    cli.publish(paho::Message::new(format!("devices/{id}/heartbeat"), "", 1))
                        .unwrap();
                } else {
                    let _ = ready.send(());
                }
            }
            continue;
        }
        journal.0.lock().unwrap().mqtt_bytes += m.payload().len() as u64;
        let offer: Value = serde_json::from_slice(m.payload()).unwrap();
        let target = offer["version"].as_str().unwrap().to_owned();
        if target == version {
            continue; // a repeated offer of what we run
        }
        note(journal, id, "offer");
        let rollout = offer["rollout"].clone();
        if behaviour == Behaviour::Fail {
            status(
                json!({"status": "failed", "rollout": rollout, "error": "simulated flash failure"}),
            );
            continue;
        }
        if let (Some(g), false) = (&gate, behaviour == Behaviour::Away) {
            g.wait();
        }
        status(json!({"status": "downloading", "rollout": rollout, "progress": 0}));
        let url = offer["url"].as_str().unwrap();
        let (addr, path) = url
            .strip_prefix("http://")
            .and_then(|u| u.split_once('/'))
            .unwrap();
        let path = format!("/{path}");
        let size = offer["size"].as_u64().unwrap() as usize;
        let data = if behaviour == Behaviour::DropOnce && !dropped {
            dropped = true;
            let mut data = partial_get(addr, &path, size / 2);
            status(json!({"status": "downloading", "rollout": rollout, "progress": 50}));
            let r = request(
                addr,
                "GET",
                &path,
                None,
                &[("Range", &format!("bytes={}-", data.len()))],
            );
            let expect = format!("content-range: bytes {}-{}/{size}", data.len(), size - 1);
            if r.status != 206 || !r.headers.to_ascii_lowercase().contains(&expect) {
                journal.0.lock().unwrap().errors.push(format!(
                    "{id}: resume answered {} ({})",
                    r.status, r.headers
                ));
                journal.1.notify_all();
                return;
            }
            note(journal, id, "resumed");
            data.extend_from_slice(&r.body);
            data
        } else {
            let r = request(addr, "GET", &path, None, &[]);
            assert_eq!(r.status, 200);
            r.body
        };
        journal.0.lock().unwrap().http_bytes += data.len() as u64;
        let sha = hex(ring::digest::digest(&ring::digest::SHA256, &data).as_ref());
        if data.len() != size || offer["sha256"].as_str() != Some(sha.as_str()) {
            status(json!({"status": "failed", "rollout": rollout, "error": "checksum mismatch"}));
            journal.0.lock().unwrap().errors.push(format!(
                "{id}: downloaded {} bytes hashing to {sha}",
                data.len()
            ));
            journal.1.notify_all();
            continue;
        }
        status(json!({"status": "downloading", "rollout": rollout, "progress": 100}));
        status(json!({"status": "installing", "rollout": rollout}));
        status(json!({"status": "complete", "rollout": rollout}));
        version = target;
        // After "reboot": the new version in the next registration (even
        // devices) or heartbeat (odd ones) completes it.
        note(journal, id, "updated");
        if id.ends_with(['1', '3', '5', '7', '9']) {
            let hb = json!({"firmware_version": version});
            cli.publish(paho::Message::new(
                format!("devices/{id}/heartbeat"),
                hb.to_string(),
                1,
            ))
            .unwrap();
        } else {
            register(&version);
        }
    }
    let _ = cli.disconnect(None);
}

/// Reads the headers and `n` body bytes, then drops the connection.
fn partial_get(addr: &str, path: &str, n: usize) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let k = s.read(&mut buf).unwrap();
        assert!(k > 0, "connection closed early");
        raw.extend_from_slice(&buf[..k]);
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            if raw.len() - (p + 4) >= n {
                return raw[p + 4..p + 4 + n].to_vec();
            }
        }
    }
}

// --- tests --------------------------------------------------------------------

#[test]
fn twenty_devices_in_waves_of_five_with_a_resumed_download() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let signer = Signer::new();
    config(dir.path(), Some(&broker), &signer, "127.0.0.1:0");
    let d = start_connected(dir.path());
    let img = image(256 << 10, 7);
    let up = upload(&d, &signer, &img, "2.0.0");
    assert_eq!(up.status, 201, "{}", up.text());

    let fleet = Fleet::start(
        &broker,
        20,
        |i| {
            if i == 7 {
                Behaviour::DropOnce
            } else {
                Behaviour::Good
            }
        },
        |_| None,
    );
    create_rollout(
        &d,
        r#"{"id":"r1","device_type":"sensor","version":"2.0.0","wave_size":5}"#,
    );
    wait_journal(&fleet.journal, "20 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 20
    });
    let done = wait_for("rollout r1 complete", ROLLOUT_DEADLINE, || {
        let r = rollout(&d, "r1");
        (r["state"] == "complete").then_some(r)
    });
    let st = states(&done);
    assert_eq!(st.len(), 20);
    for (id, s) in &st {
        assert_eq!(s["state"], "complete", "{id}: {s}");
        assert_eq!(s["attempts"], 1, "{id} was offered once: {s}");
    }
    // Waves: nobody in wave k+1 was offered before all of wave k updated.
    let j = fleet.journal.0.lock().unwrap();
    let when = |id: &str, what: &str| {
        j.events
            .iter()
            .find(|e| e.0 == id && e.1 == what)
            .map(|e| e.2)
            .unwrap()
    };
    for wave in 0..3 {
        let last_done = (wave * 5..wave * 5 + 5)
            .map(|i| when(&format!("dev{i:02}"), "updated"))
            .max()
            .unwrap();
        let first_next = (wave * 5 + 5..wave * 5 + 10)
            .map(|i| when(&format!("dev{i:02}"), "offer"))
            .min()
            .unwrap();
        assert!(
            last_done < first_next,
            "wave {} started before wave {wave} finished",
            wave + 1
        );
    }
    assert_eq!(j.events.iter().filter(|e| e.1 == "resumed").count(), 1);
    drop(j);
    // The device records carry the new version.
    let devs = d.get("/v1/edge/devices").json();
    assert!(devs
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["firmware_version"] == "2.0.0"));
    let list = d.get("/v1/edge/rollouts").json();
    assert_eq!(list[0]["counts"]["complete"], 20, "{list}");
}

#[test]
fn failures_past_the_threshold_halt_and_the_rest_are_not_offered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let signer = Signer::new();
    config(dir.path(), Some(&broker), &signer, "127.0.0.1:0");
    let d = start_connected(dir.path());
    assert_eq!(upload(&d, &signer, &image(4096, 1), "2.0.0").status, 201);
    // Waves of 3; the first wave has two failing devices.
    let fleet = Fleet::start(
        &broker,
        9,
        |i| {
            if i < 2 {
                Behaviour::Fail
            } else {
                Behaviour::Good
            }
        },
        |_| None,
    );
    create_rollout(
        &d,
        r#"{"id":"r2","device_type":"sensor","version":"2.0.0","wave_size":3,"failure_threshold":2,"max_retries":1}"#,
    );
    let halted = wait_for("rollout r2 halted", ROLLOUT_DEADLINE, || {
        let r = rollout(&d, "r2");
        (r["state"] == "halted").then_some(r)
    });
    assert!(
        halted["reason"]
            .as_str()
            .unwrap()
            .contains("failure_threshold"),
        "{halted}"
    );
    let st = states(&halted);
    for i in 0..2 {
        let s = &st[&format!("dev{i:02}")];
        assert_eq!(s["state"], "failed", "{s}");
        // One retry, then final.
        assert_eq!(s["attempts"], 2, "{s}");
        assert_eq!(s["error"], "simulated flash failure");
    }
    for i in 3..9 {
        let s = &st[&format!("dev{i:02}")];
        assert_eq!(s["state"], "waiting", "{s}");
        assert_eq!(s["attempts"], 0, "dev{i:02} was offered: {s}");
    }
    // dev02 (same wave) finishes normally; still nobody else is offered.
    wait_for("dev02 complete", ROLLOUT_DEADLINE, || {
        (states(&rollout(&d, "r2"))["dev02"]["state"] == "complete").then_some(())
    });
    let offered: Vec<String> = fleet
        .journal
        .0
        .lock()
        .unwrap()
        .events
        .iter()
        .filter(|e| e.1 == "offer")
        .map(|e| e.0.clone())
        .collect();
    assert!(
        offered
            .iter()
            .all(|id| ["dev00", "dev01", "dev02"].contains(&id.as_str())),
        "{offered:?}"
    );
    // Resume is the operator's override: the rest of the fleet goes ahead.
    let r = d.req("POST", "/v1/edge/rollouts/r2/resume", None);
    assert_eq!(r.status, 200, "{}", r.text());
    wait_journal(&fleet.journal, "7 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 7
    });
}

#[test]
fn wrong_digest_or_bad_signature_is_refused_and_range_serving() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new();
    config(dir.path(), None, &signer, "127.0.0.1:0");
    let d = Daemon::start(dir.path());
    let img = image(100_000, 3);
    let (sha, sig) = signer.sign(&img);

    // Wrong digest: declared one thing, sent another.
    let (other_sha, _) = signer.sign(b"something else");
    let r = request(
        &d.addr,
        "PUT",
        &format!(
            "/v1/edge/firmware?device_type=sensor&version=2.0.0&sha256={other_sha}&signature={sig}"
        ),
        Some(&img),
        &[],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("digest mismatch"), "{}", r.text());
    // Bad signature: signed by a key the edge does not trust.
    let (_, foreign) = Signer::new().sign(&img);
    let r = request(
        &d.addr,
        "PUT",
        &format!(
            "/v1/edge/firmware?device_type=sensor&version=2.0.0&sha256={sha}&signature={foreign}"
        ),
        Some(&img),
        &[],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("does not verify"), "{}", r.text());
    // Neither is stored, served or usable by a rollout.
    assert_eq!(d.get("/v1/edge/firmware").json(), json!([]));
    assert_eq!(d.get(&format!("/v1/edge/firmware/{sha}")).status, 404);
    let files: Vec<_> = std::fs::read_dir(dir.path().join("firmware"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(files.is_empty(), "{files:?}");
    let r = d.req(
        "POST",
        "/v1/edge/rollouts",
        Some(r#"{"device_type":"sensor","version":"2.0.0"}"#),
    );
    assert_eq!(r.status, 404, "{}", r.text());

    // The good one, then Range, ETag, Content-Length.
    let r = upload(&d, &signer, &img, "2.0.0");
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["sha256"], sha.as_str());
    // Versions are immutable.
    let r = upload(&d, &signer, &image(10, 9), "2.0.0");
    assert_eq!(r.status, 409, "{}", r.text());
    let path = format!("/v1/edge/firmware/{sha}");
    let full = d.get(&path);
    assert_eq!(full.status, 200);
    assert_eq!(full.body, img);
    let h = full.headers.to_ascii_lowercase();
    assert!(h.contains("content-length: 100000"), "{h}");
    assert!(h.contains(&format!("etag: \"{sha}\"")), "{h}");
    assert!(h.contains("accept-ranges: bytes"), "{h}");
    let part = request(&d.addr, "GET", &path, None, &[("Range", "bytes=1000-1999")]);
    assert_eq!(part.status, 206);
    assert_eq!(part.body, &img[1000..2000]);
    let h = part.headers.to_ascii_lowercase();
    assert!(h.contains("content-range: bytes 1000-1999/100000"), "{h}");
    assert!(h.contains("content-length: 1000"), "{h}");
    let tail = request(
        &d.addr,
        "GET",
        "/v1/edge/firmware/2.0.0",
        None,
        &[("Range", "bytes=-10")],
    );
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, &img[img.len() - 10..]);
    let bad = request(&d.addr, "GET", &path, None, &[("Range", "bytes=100000-")]);
    assert_eq!(bad.status, 416);
    assert!(bad
        .headers
        .to_ascii_lowercase()
        .contains("content-range: bytes */100000"));
    let cached = request(
        &d.addr,
        "GET",
        &path,
        None,
        &[("If-None-Match", &format!("\"{sha}\""))],
    );
    assert_eq!(cached.status, 304);
}

/// `DELETE /v1/edge/firmware/{ref}` takes what `GET` takes, a sha256 or a
/// version; a version stored for two device types is refused (nothing is
/// deleted) rather than guessed.
#[test]
fn delete_takes_a_version_as_get_does() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new();
    config(dir.path(), None, &signer, "127.0.0.1:0");
    let d = Daemon::start(dir.path());
    let count = |d: &Daemon| d.get("/v1/edge/firmware").json().as_array().unwrap().len();
    let img = image(1000, 5);
    let (sha, _) = signer.sign(&img);
    assert_eq!(upload(&d, &signer, &img, "1.0.0").status, 201);
    assert_eq!(d.get("/v1/edge/firmware/1.0.0").status, 200);
    let r = d.req("DELETE", "/v1/edge/firmware/1.0.0", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.get(&format!("/v1/edge/firmware/{sha}")).status, 404);
    assert!(!dir.path().join(format!("firmware/{sha}.bin")).exists());
    assert_eq!(count(&d), 0);

    let a = image(1000, 6);
    assert_eq!(upload(&d, &signer, &a, "1.1.0").status, 201);
    let b = image(1000, 7);
    let (sha_b, sig_b) = signer.sign(&b);
    let put = format!(
        "/v1/edge/firmware?device_type=gateway&version=1.1.0&sha256={sha_b}&signature={sig_b}"
    );
    let r = request(&d.addr, "PUT", &put, Some(&b), &[]);
    assert_eq!(r.status, 201, "{}", r.text());
    let r = d.req("DELETE", "/v1/edge/firmware/1.1.0", None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(count(&d), 2);
    let r = d.req("DELETE", &format!("/v1/edge/firmware/{sha_b}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(count(&d), 1);
}

#[test]
fn kill_9_mid_rollout_resumes_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let signer = Signer::new();
    config(dir.path(), Some(&broker), &signer, "127.0.0.1:0");
    let mut d = start_connected(dir.path());
    assert_eq!(
        upload(&d, &signer, &image(64 << 10, 5), "2.0.0").status,
        201
    );
    // The second wave is held back after taking its offer.
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let fleet = Fleet::start(
        &broker,
        10,
        |_| Behaviour::Good,
        move |i| (i >= 5).then(|| g.clone()),
    );
    create_rollout(
        &d,
        r#"{"id":"r3","device_type":"sensor","version":"2.0.0","wave_size":5}"#,
    );
    wait_journal(&fleet.journal, "wave 0 updated and wave 1 offered", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 5
            && j.events.iter().filter(|e| e.1 == "offer").count() == 10
    });
    let before = states(&rollout(&d, "r3"));
    for i in 5..10 {
        assert_eq!(before[&format!("dev{i:02}")]["state"], "offered");
    }

    // kill -9 mid-rollout; the same port again (devices hold its URLs).
    let port = d.addr.rsplit(':').next().unwrap().to_owned();
    d.kill9();
    config(
        dir.path(),
        Some(&broker),
        &signer,
        &format!("127.0.0.1:{port}"),
    );
    let d = start_connected(dir.path());
    gate.release();
    wait_journal(&fleet.journal, "10 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 10
    });
    let done = wait_for("rollout r3 complete", ROLLOUT_DEADLINE, || {
        let r = rollout(&d, "r3");
        (r["state"] == "complete").then_some(r)
    });
    for (id, s) in states(&done) {
        assert_eq!(s["state"], "complete", "{id}: {s}");
        // Resumed, not restarted: every device's first offer carried it.
        assert_eq!(s["attempts"], 1, "{id}: {s}");
    }
    assert_eq!(
        count(&fleet.journal, "offer"),
        10,
        "wave 0 was not offered again"
    );
}

#[test]
fn a_rollout_defined_at_the_hub_fetches_its_artifact_with_resume_and_reports_back() {
    let signer = Signer::new();
    let hub_dir = tempfile::tempdir().unwrap();
    config_node(hub_dir.path(), None, &signer, "127.0.0.1:0", "fw-hub", "");
    let hub = Daemon::start_hub(hub_dir.path());
    let img = image(512 << 10, 11);
    let (sha, _) = signer.sign(&img);
    assert_eq!(upload(&hub, &signer, &img, "3.0.0").status, 201);

    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    config_with(
        dir.path(),
        Some(&broker),
        &signer,
        "127.0.0.1:0",
        &format!(
            "cloud: {{server_address: 'http://{}', sync_interval: 1h}}\n",
            hub.addr
        ),
    );
    // A fetch that was cut off earlier: the first 100 KiB are on disk.
    std::fs::create_dir_all(dir.path().join("firmware")).unwrap();
    std::fs::write(
        dir.path().join(format!("firmware/.fetch-{sha}.part")),
        &img[..100 << 10],
    )
    .unwrap();
    let edge = start_connected(dir.path());
    let fleet = Fleet::start(&broker, 4, |_| Behaviour::Good, |_| None);

    create_rollout(
        &hub,
        r#"{"id":"hr","device_type":"sensor","version":"3.0.0","wave_size":2}"#,
    );
    assert_eq!(edge.req("POST", "/v1/edge/sync/now", None).status, 202);
    edge.wait_log(|l| l.contains("resuming at byte 102400"))
        .expect("the edge resumes the partial fetch with Range");
    wait_journal(&fleet.journal, "4 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 4
    });
    // The stored artifact is the hub's, verified.
    let a = edge.get(&format!("/v1/edge/firmware/{sha}"));
    assert_eq!(a.status, 200);
    assert_eq!(a.body, img);
    // Progress per device reaches the hub.
    let seen = wait_for(
        "the hub sees the rollout complete",
        ROLLOUT_DEADLINE,
        || {
            edge.req("POST", "/v1/edge/sync/now", None);
            let r = rollout(&hub, "hr");
            let st = states(&r);
            (r["edges_complete"] == true
                && st.len() == 4
                && st.values().all(|d| d["state"] == "complete"))
            .then_some(r)
        },
    );
    // The shared record is the operator's; the edge's execution is its own.
    assert_eq!(seen["state"], "running", "{seen}");
    assert_eq!(seen["edges"][0]["edge"], "fw-node", "{seen}");
    assert_eq!(seen["edges"][0]["targets"], 4, "{seen}");
    assert_eq!(seen["edges"][0]["state"], "complete", "{seen}");
    assert_eq!(rollout(&edge, "hr")["state"], "complete");
}

// --- several edges under one hub ----------------------------------------------

/// A hub holding a signed `sensor 3.0.0`.
fn hub_with_image(signer: &Signer, img: &[u8]) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    config_node(dir.path(), None, signer, "127.0.0.1:0", "fw-hub", "");
    let hub = Daemon::start_hub(dir.path());
    assert_eq!(upload(&hub, signer, img, "3.0.0").status, 201);
    (dir, hub)
}

/// An edge under a hub with its own broker; it syncs when told to.
struct Edge {
    d: Daemon,
    broker: Broker,
    _dir: tempfile::TempDir,
}

impl Edge {
    fn start(hub: &Daemon, signer: &Signer, node: &str) -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(dir.path());
        config_node(
            dir.path(),
            Some(&broker),
            signer,
            "127.0.0.1:0",
            node,
            &format!(
                "cloud: {{server_address: 'http://{}', sync_interval: 1h}}\n",
                hub.addr
            ),
        );
        let d = start_connected(dir.path());
        Edge {
            d,
            broker,
            _dir: dir,
        }
    }

    /// Asks for a sync round (they coalesce); callers wait on its effect.
    fn sync(&self) {
        self.d.req("POST", "/v1/edge/sync/now", None);
    }
}

/// The hub's view of rollout `id` once `pred` holds, syncing `edges`
/// before every look.
fn at_hub(
    hub: &Daemon,
    edges: &[&Edge],
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(what, ROLLOUT_DEADLINE, || {
        for e in edges {
            e.sync();
        }
        let r = rollout(hub, id);
        pred(&r).then_some(r)
    })
}

/// The hub's summary of `node`'s execution in a rollout view.
fn run_of(r: &Value, node: &str) -> Value {
    r["edges"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["edge"] == node))
        .cloned()
        .unwrap_or(Value::Null)
}

/// The edge's own view of rollout `id` once `pred` holds, syncing first.
fn at_edge(e: &Edge, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, ROLLOUT_DEADLINE, || {
        e.sync();
        let r = e.d.get(&format!("/v1/edge/rollouts/{id}"));
        (r.status == 200).then(|| r.json()).filter(|r| pred(r))
    })
}

fn offers_to(f: &Fleet, device: &str) -> usize {
    f.journal
        .0
        .lock()
        .unwrap()
        .events
        .iter()
        .filter(|e| e.0 == device && e.1 == "offer")
        .count()
}

#[test]
fn two_edges_run_one_hub_rollout_and_the_one_finishing_first_does_not_stop_the_other() {
    let signer = Signer::new();
    let (_hub_dir, hub) = hub_with_image(&signer, &image(64 << 10, 21));
    let a = Edge::start(&hub, &signer, "fw-a");
    let b = Edge::start(&hub, &signer, "fw-b");
    let fleet_a = Fleet::start_named(&a.broker, "a", 4, |_| Behaviour::Good, |_| None);
    // B's devices take their offer and then wait: B is the slow edge.
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let fleet_b = Fleet::start_named(
        &b.broker,
        "b",
        4,
        |_| Behaviour::Good,
        move |_| Some(g.clone()),
    );
    let r = create_rollout(
        &hub,
        r#"{"id":"multi","device_type":"sensor","version":"3.0.0","wave_size":2}"#,
    );
    assert_eq!(r.json()["created_by"], "fw-hub");

    // B resolves its devices and offers its first wave first.
    b.sync();
    wait_journal(&fleet_b.journal, "B's first wave offered", |j| {
        j.events.iter().filter(|e| e.1 == "offer").count() == 2
    });
    // Then A runs to the end, and the hub sees A complete, B running.
    a.sync();
    wait_journal(&fleet_a.journal, "A's 4 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 4
    });
    let mid = at_hub(&hub, &[&a, &b], "multi", "A complete at the hub", |r| {
        run_of(r, "fw-a")["state"] == "complete" && run_of(r, "fw-b")["state"] == "running"
    });
    assert_eq!(run_of(&mid, "fw-a")["targets"], 4, "{mid}");
    assert_eq!(run_of(&mid, "fw-b")["targets"], 4, "{mid}");
    assert_eq!(mid["state"], "running", "the operator's state: {mid}");
    assert_eq!(mid["edges_complete"], false, "{mid}");
    // B pulls everything the hub has after A finished (a marker written
    // after it proves the round), and carries on.
    assert_eq!(
        hub.put("/kv/global/after-a", r#"{"value":"1"}"#).status,
        200
    );
    wait_for("B pulled the marker", ROLLOUT_DEADLINE, || {
        b.sync();
        (b.d.get("/kv/global/after-a").status == 200).then_some(())
    });
    let mine = rollout(&b.d, "multi");
    assert_eq!(mine["state"], "running", "{mine}");
    assert_eq!(mine["targets"], 4, "{mine}");
    gate.release();
    wait_journal(&fleet_b.journal, "B's 4 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 4
    });
    let done = at_hub(
        &hub,
        &[&a, &b],
        "multi",
        "everything complete at the hub",
        |r| {
            let st = states(r);
            r["edges_complete"] == true
                && st.len() == 8
                && st.values().all(|d| d["state"] == "complete")
        },
    );
    for (id, s) in states(&done) {
        assert_eq!(s["attempts"], 1, "{id}: {s}");
    }
    for node in ["fw-a", "fw-b"] {
        let run = run_of(&done, node);
        assert_eq!(run["state"], "complete", "{done}");
        assert_eq!(run["reason"], "4 of 4 devices updated", "{done}");
    }
    assert_eq!(done["state"], "running", "{done}");
    assert_eq!(
        done["targets"], 0,
        "no edge wrote the shared record: {done}"
    );
    let list = hub.get("/v1/edge/rollouts").json();
    assert_eq!(list[0]["counts"]["complete"], 8, "{list}");
    // An edge holds only its own devices and its own execution.
    let mine = rollout(&a.d, "multi");
    assert_eq!(states(&mine).len(), 4, "{mine}");
    assert_eq!(mine["edges"].as_array().map(Vec::len), Some(1), "{mine}");
}

#[test]
fn a_threshold_halt_on_one_edge_leaves_the_other_running_and_a_hub_resume_clears_it() {
    let signer = Signer::new();
    let (_hub_dir, hub) = hub_with_image(&signer, &image(16 << 10, 22));
    let a = Edge::start(&hub, &signer, "fw-a");
    let b = Edge::start(&hub, &signer, "fw-b");
    // a00 fails every offer; it shares A's first wave with a01.
    let fleet_a = Fleet::start_named(
        &a.broker,
        "a",
        4,
        |i| {
            if i == 0 {
                Behaviour::Fail
            } else {
                Behaviour::Good
            }
        },
        |_| None,
    );
    let fleet_b = Fleet::start_named(&b.broker, "b", 4, |_| Behaviour::Good, |_| None);
    create_rollout(
        &hub,
        r#"{"id":"th","device_type":"sensor","version":"3.0.0","wave_size":2,"failure_threshold":1,"max_retries":0}"#,
    );

    // A halts first, and the hub hears of it before B has even synced.
    let halted = at_hub(&hub, &[&a], "th", "A halted at the hub", |r| {
        run_of(r, "fw-a")["state"] == "halted"
    });
    let run = run_of(&halted, "fw-a");
    assert!(
        run["reason"]
            .as_str()
            .unwrap()
            .contains("failure_threshold"),
        "{halted}"
    );
    assert_eq!(halted["state"], "running", "the operator's state: {halted}");
    assert_eq!(states(&halted)["a00"]["state"], "failed", "{halted}");
    // B then runs all its devices.
    let done_b = at_hub(&hub, &[&a, &b], "th", "B complete at the hub", |r| {
        run_of(r, "fw-b")["state"] == "complete"
    });
    assert_eq!(count(&fleet_b.journal, "updated"), 4);
    assert_eq!(run_of(&done_b, "fw-a")["state"], "halted", "{done_b}");
    assert_eq!(done_b["edges_complete"], false, "{done_b}");
    // A's second wave was never offered while halted.
    let mine = rollout(&a.d, "th");
    assert_eq!(mine["state"], "halted", "{mine}");
    for id in ["a02", "a03"] {
        assert_eq!(states(&mine)[id]["attempts"], 0, "{mine}");
        assert_eq!(offers_to(&fleet_a, id), 0);
    }
    // The edge's operator cannot override the hub's rollout locally.
    let r = a.d.req("POST", "/v1/edge/rollouts/th/resume", None);
    assert_eq!(r.status, 409, "{}", r.text());

    // A resume at the hub reaches A: the rest of A's devices go ahead.
    let r = hub.req("POST", "/v1/edge/rollouts/th/resume", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["resumes"], 1, "{}", r.text());
    wait_for("A's other three devices updated", ROLLOUT_DEADLINE, || {
        a.sync();
        (count(&fleet_a.journal, "updated") == 3).then_some(())
    });
    let done = at_hub(&hub, &[&a, &b], "th", "A complete at the hub", |r| {
        r["edges_complete"] == true
    });
    let run = run_of(&done, "fw-a");
    assert_eq!(run["reason"], "3 of 4 devices updated", "{done}");
    // The threshold counts again from the failure before the resume.
    assert_eq!(run["failure_threshold"], 2, "{done}");
    assert_eq!(run["resumes"], 1, "{done}");
    assert_eq!(
        offers_to(&fleet_a, "a00"),
        1,
        "a failed device is not retried"
    );
}

#[test]
fn a_pause_at_the_hub_pauses_offers_on_every_edge() {
    let signer = Signer::new();
    let (_hub_dir, hub) = hub_with_image(&signer, &image(16 << 10, 23));
    let a = Edge::start(&hub, &signer, "fw-a");
    let b = Edge::start(&hub, &signer, "fw-b");
    // Waves of one; each edge's first device holds its offer until told.
    let gate = Arc::new(Gate::default());
    let (ga, gb) = (gate.clone(), gate.clone());
    let fleet_a = Fleet::start_named(
        &a.broker,
        "a",
        3,
        |_| Behaviour::Good,
        move |_| Some(ga.clone()),
    );
    let fleet_b = Fleet::start_named(
        &b.broker,
        "b",
        3,
        |_| Behaviour::Good,
        move |_| Some(gb.clone()),
    );
    create_rollout(
        &hub,
        r#"{"id":"pz","device_type":"sensor","version":"3.0.0","wave_size":1}"#,
    );
    let edges = [(&a, &fleet_a, "a"), (&b, &fleet_b, "b")];
    for (e, f, _) in edges {
        e.sync();
        wait_journal(&f.journal, "the first device offered", |j| {
            j.events.iter().any(|e| e.1 == "offer")
        });
    }
    let r = hub.req("POST", "/v1/edge/rollouts/pz/pause", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "paused");
    for (e, _, _) in edges {
        at_edge(e, "pz", "the edge paused", |r| r["state"] == "paused");
    }
    // The devices in flight finish; nobody else is offered. The tick that
    // records a completion is the one that would offer the next device,
    // so one snapshot shows both.
    gate.release();
    for (e, f, p) in edges {
        let r = at_edge(e, "pz", "the first device complete", |r| {
            states(r)[&format!("{p}00")]["state"] == "complete"
        });
        assert_eq!(r["state"], "paused", "{r}");
        for i in 1..3 {
            let s = &states(&r)[&format!("{p}{i:02}")];
            assert_eq!(s["state"], "waiting", "{r}");
            assert_eq!(s["attempts"], 0, "{r}");
        }
        assert_eq!(count(&f.journal, "offer"), 1);
    }
    let paused = at_hub(&hub, &[&a, &b], "pz", "both edges paused at the hub", |r| {
        run_of(r, "fw-a")["state"] == "paused" && run_of(r, "fw-b")["state"] == "paused"
    });
    assert_eq!(paused["state"], "paused", "{paused}");
    // Resume at the hub: both edges carry on to the end.
    let r = hub.req("POST", "/v1/edge/rollouts/pz/resume", None);
    assert_eq!(r.status, 200, "{}", r.text());
    for (e, f, _) in edges {
        wait_for("the edge's 3 updates", ROLLOUT_DEADLINE, || {
            e.sync();
            (count(&f.journal, "updated") == 3).then_some(())
        });
    }
    let done = at_hub(
        &hub,
        &[&a, &b],
        "pz",
        "everything complete at the hub",
        |r| {
            r["edges_complete"] == true
                && states(r)
                    .values()
                    .filter(|d| d["state"] == "complete")
                    .count()
                    == 6
        },
    );
    assert_eq!(done["state"], "running", "{done}");
}

#[test]
fn an_offline_device_does_not_hold_its_wave_and_gets_the_offer_when_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let signer = Signer::new();
    config(dir.path(), Some(&broker), &signer, "127.0.0.1:0");
    let d = start_connected(dir.path());
    assert_eq!(upload(&d, &signer, &image(8192, 4), "2.0.0").status, 201);
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    // dev01 is in the first wave and away.
    let fleet = Fleet::start(
        &broker,
        4,
        |i| {
            if i == 1 {
                Behaviour::Away
            } else {
                Behaviour::Good
            }
        },
        move |i| (i == 1).then(|| g.clone()),
    );
    wait_for("dev01 offline", DEADLINE, || {
        (d.get("/v1/edge/devices/dev01").json()["health"] == "offline").then_some(())
    });
    create_rollout(
        &d,
        r#"{"id":"r4","device_type":"sensor","version":"2.0.0","wave_size":2}"#,
    );
    wait_journal(&fleet.journal, "the three online devices updated", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 3
    });
    let r = wait_for("three complete", ROLLOUT_DEADLINE, || {
        let r = rollout(&d, "r4");
        (r["counts"].is_null()
            && states(&r)
                .values()
                .filter(|s| s["state"] == "complete")
                .count()
                == 3)
            .then_some(r)
    });
    assert_eq!(r["state"], "running");
    assert_eq!(states(&r)["dev01"]["state"], "waiting");
    assert_eq!(states(&r)["dev01"]["attempts"], 0);
    gate.release();
    let done = wait_for("rollout r4 complete", ROLLOUT_DEADLINE, || {
        let r = rollout(&d, "r4");
        (r["state"] == "complete").then_some(r)
    });
    assert_eq!(states(&done)["dev01"]["state"], "complete");
    assert_eq!(states(&done)["dev01"]["attempts"], 1);
}

/// The benchmark note's measurement (bench/firmware-rollout.md): a 4 MiB
/// image to 100 devices through one edge, waves of 25. By hand:
/// `cargo test --release --test firmware -- --ignored --nocapture bench_`.
#[test]
#[ignore]
fn bench_4mib_to_100_devices() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let signer = Signer::new();
    config(dir.path(), Some(&broker), &signer, "127.0.0.1:0");
    let d = start_connected(dir.path());
    let img = image(4 << 20, 2);
    let t = Instant::now();
    assert_eq!(upload(&d, &signer, &img, "2.0.0").status, 201);
    let upload_time = t.elapsed();
    let fleet = Fleet::start(&broker, 100, |_| Behaviour::Good, |_| None);
    let started = Instant::now();
    create_rollout(
        &d,
        r#"{"id":"bench","device_type":"sensor","version":"2.0.0","wave_size":25}"#,
    );
    wait_journal(&fleet.journal, "100 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 100
    });
    wait_for("complete", ROLLOUT_DEADLINE, || {
        (rollout(&d, "bench")["state"] == "complete").then_some(())
    });
    let took = started.elapsed();
    let j = fleet.journal.0.lock().unwrap();
    let db = std::fs::metadata(dir.path().join("konsul.db"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "BENCH upload {upload_time:?}; rollout of {} bytes to 100 devices in {took:?}; \
         HTTP firmware bytes {}; MQTT payload bytes (offers + status) {}; db {db} bytes",
        img.len(),
        j.http_bytes,
        j.mqtt_bytes
    );
}
