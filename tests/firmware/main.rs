//! Firmware OTA end to end: a real mosquitto, the real daemon, and devices
//! simulated by paho clients (one thread each) that take the offer from
//! `devices/{id}/update`, download the image over HTTP (resuming with Range
//! when told to drop), check its sha256, report progress on
//! `devices/{id}/update/status` and re-register with the new version.
//! Every wait is on observable state with a deadline.

#[path = "../common/mod.rs"]
mod common;

mod hub;
mod local;

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
