//! MQTT QoS 1 under faults, with devices that never re-send: what the
//! broker acknowledged to a device (its PUBACK) must end up committed once,
//! whether the daemon is killed mid-burst (its persistent session on the
//! broker must hand over whatever it had not committed) or the broker
//! restarts with persistence while devices publish.
//!
//! "Everything before has been handled" is learnt from a sentinel: a
//! registration published after the burst, whose `devices/{id}/ack` the
//! daemon sends after its commit. The broker delivers a session's messages
//! in order and the daemon commits them in order, so once the sentinel's
//! ack arrives, every earlier message is committed or lost for good.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use paho_mqtt as paho;

use crate::common::broker::Broker;
use crate::common::{wait_for, Daemon, DEADLINE};
use crate::{integrity, kill_point, runs};

/// mosquitto drops (yet acknowledges) messages for an offline session
/// beyond 1000 queued by default: a broker that promises to keep them
/// must be told to.
const KEEP_ALL: &str = "max_queued_messages 0\n";

/// Messages a second from the steady publisher: what piles up while the
/// daemon is away (up to the 10 s subscribe timeout plus backoff) must stay
/// inside the bridge's ingest queue of 2048, beyond which the bridge
/// deadlocks today (see
/// `overload_loses_nothing_and_does_not_wedge_the_daemon`).
const RATE: u32 = 100;

/// Devices whose telemetry the bursts carry (registered up front).
const SENSORS: u64 = 4;

fn config(dir: &Path, broker: &Broker) {
    std::fs::write(
        dir.join("edge.yaml"),
        format!(
            "mode: edge\nnode_id: faults-mqtt\nstorage:\n  path: {}\n  max_size: 64Mi\n\
             http:\n  listen: 127.0.0.1:0\nservices:\n  max_local_services: 100000\n\
             devices:\n  max_devices: 100000\n\
             mqtt:\n  enabled: true\n  broker: {}\n  client_id: edge-faults\n  qos: 1\n",
            dir.join("konsul.db").display(),
            broker.url()
        ),
    )
    .unwrap();
}

fn start_connected(dir: &Path) -> Daemon {
    let d = Daemon::start(dir);
    d.wait_log(|l| l.contains("mqtt::bridge: connected to "))
        .expect("daemon did not connect to the broker");
    d
}

fn client(broker: &Broker, id: &str) -> paho::AsyncClient {
    paho::AsyncClient::new(
        paho::CreateOptionsBuilder::new()
            .server_uri(broker.url())
            .client_id(id)
            .persistence(paho::PersistenceType::None)
            // A whole burst is queued in the client at once.
            .max_buffered_messages(10_000)
            .finalize(),
    )
    .expect("paho client")
}

/// A clean session: nothing the device once sent is sent again.
fn connect_opts() -> paho::ConnectOptions {
    paho::ConnectOptionsBuilder::new_v3()
        .clean_session(true)
        .connect_timeout(Duration::from_secs(2))
        .max_inflight(100)
        .finalize()
}

fn register_msg(id: &str) -> paho::Message {
    paho::Message::new(
        format!("devices/{id}/register"),
        format!(r#"{{"type":"sensor","name":"sensor {id}","telemetry_interval":"1h"}}"#),
        1,
    )
}

fn telemetry_msg(n: u64) -> paho::Message {
    paho::Message::new(
        format!("devices/t{}/telemetry", n % SENSORS),
        format!(r#"{{"n":{n},"temperature":21.5}}"#),
        1,
    )
}

/// A device that registers others and waits for the daemon's ack, which
/// the daemon sends after its commit.
struct Registrar {
    cli: paho::AsyncClient,
    rx: paho::SyncReceiver<Option<paho::Message>>,
}

impl Registrar {
    fn connect(broker: &Broker) -> Registrar {
        let cli = client(broker, "registrar");
        let rx = cli.start_consuming();
        cli.connect(connect_opts())
            .wait()
            .expect("registrar connects");
        Registrar { cli, rx }
    }

    fn register(&self, id: &str) {
        let ack = format!("devices/{id}/ack");
        self.cli.subscribe(&ack, 1).wait().expect("subscribe");
        self.cli.publish(register_msg(id)).wait().expect("publish");
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("no {ack} within {DEADLINE:?}"));
            match self.rx.recv_timeout(left) {
                Ok(Some(m)) if m.topic() == ack => return,
                Ok(_) => {}
                Err(_) => panic!("no {ack} within {DEADLINE:?}"),
            }
        }
    }
}

/// What the daemon holds: registered device ids, and how often each
/// telemetry marker `n` is stored.
fn holdings(d: &Daemon) -> (HashSet<String>, HashMap<u64, usize>) {
    let devices = d
        .get("/v1/edge/devices")
        .json()
        .as_array()
        .expect("device listing")
        .iter()
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect();
    let mut seen = HashMap::new();
    for s in 0..SENSORS {
        let mut since = 0;
        loop {
            let r = d.get(&format!(
                "/v1/edge/devices/t{s}/telemetry?since={since}&limit=10000"
            ));
            assert_eq!(r.status, 200, "{}", r.text());
            let history = r.json()["history"].as_array().cloned().unwrap_or_default();
            let Some(last) = history.last() else { break };
            since = last["seq"].as_u64().expect("seq");
            for p in &history {
                if let Some(n) = p["values"]["n"].as_u64() {
                    *seen.entry(n).or_insert(0) += 1;
                }
            }
        }
    }
    (devices, seen)
}

#[derive(Default)]
struct Tally {
    acked: usize,
    lost: Vec<String>,
    duplicated: Vec<String>,
    integrity: Vec<String>,
}

impl Tally {
    /// Checks what the publisher got PUBACKs for against the daemon.
    fn check(&mut self, d: &Daemon, devices: &[String], markers: &[u64]) {
        let (have, seen) = holdings(d);
        self.acked += devices.len() + markers.len();
        for id in devices {
            if !have.contains(id) {
                self.lost.push(format!("registration {id}"));
            }
        }
        for n in markers {
            match seen.get(n).copied().unwrap_or(0) {
                0 => self.lost.push(format!("telemetry n={n}")),
                1 => {}
                k => self
                    .duplicated
                    .push(format!("telemetry n={n} stored {k} times")),
            }
        }
    }

    /// Prints the summary line and asserts the counts that must be zero
    /// (duplicates only with `duplicates_matter`).
    fn report(&self, name: &str, runs: usize, duplicates_matter: bool) {
        crate::summary(format!(
            "faults {name}: runs={runs} acked={} lost={} duplicated={} integrity={}",
            self.acked,
            self.lost.len(),
            self.duplicated.len(),
            if self.integrity.is_empty() {
                "ok"
            } else {
                "FAILED"
            }
        ));
        let sample = |v: &[String]| v.iter().take(20).cloned().collect::<Vec<_>>();
        assert!(
            self.lost.is_empty(),
            "{} acknowledged messages lost, e.g. {:?}",
            self.lost.len(),
            sample(&self.lost)
        );
        assert!(
            !duplicates_matter || self.duplicated.is_empty(),
            "{} duplicated, e.g. {:?}",
            self.duplicated.len(),
            sample(&self.duplicated)
        );
        assert!(
            self.integrity.is_empty(),
            "integrity_check: {:?}",
            self.integrity
        );
    }
}

/// A burst of `size` messages (every fourth a registration, the rest
/// telemetry), published at once; returns what the broker acknowledged.
fn burst(pubr: &paho::AsyncClient, run: u64, size: u64) -> (Vec<String>, Vec<u64>) {
    let mut tokens = Vec::new();
    for i in 0..size {
        let n = run * 100_000 + i;
        if i.is_multiple_of(4) {
            let id = format!("r{n}");
            tokens.push((Some(id.clone()), None, pubr.publish(register_msg(&id))));
        } else {
            tokens.push((None, Some(n), pubr.publish(telemetry_msg(n))));
        }
    }
    let (mut devices, mut markers) = (Vec::new(), Vec::new());
    for (id, n, t) in tokens {
        if t.wait_for(DEADLINE).is_ok() {
            devices.extend(id);
            markers.extend(n);
        }
    }
    (devices, markers)
}

#[test]
fn mqtt_qos1_bursts_survive_kill9() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start_with(dir.path(), KEEP_ALL);
    config(dir.path(), &broker);
    let db = dir.path().join("konsul.db");
    let mut d = start_connected(dir.path());
    let registrar = Registrar::connect(&broker);
    for s in 0..SENSORS {
        registrar.register(&format!("t{s}"));
    }
    let pubr = client(&broker, "burst");
    pubr.connect(connect_opts())
        .wait()
        .expect("publisher connects");

    let n = runs(8, 100);
    let mut tally = Tally::default();
    for run in 0..n as u64 {
        let publisher = {
            let pubr = pubr.clone();
            std::thread::spawn(move || burst(&pubr, run, 600))
        };
        // The daemon has started ingesting the burst when its first
        // registration of this run shows up.
        let first = format!("r{}", run * 100_000);
        wait_for("the burst reaching the daemon", DEADLINE, || {
            (d.get(&format!("/v1/edge/devices/{first}")).status == 200).then_some(())
        });
        std::thread::sleep(kill_point(150));
        d.kill9();
        let (devices, markers) = publisher.join().unwrap();
        let check = integrity(&db);
        if check != "ok" {
            tally.integrity.push(format!("run {run}: {check}"));
        }
        d = start_connected(dir.path());
        registrar.register(&format!("sentinel-{run}"));
        tally.check(&d, &devices, &markers);
    }
    d.stop();
    tally.report("mqtt-kill9", n, true);
}

/// Publishes one message at a time, each waiting for its PUBACK, until
/// `stop`; reconnects with a new clean session when the broker goes away
/// and never re-sends what was not acknowledged. `per_second` paces it
/// (None: as fast as the broker acknowledges); `registrations`: every
/// eighth message registers a device (which the daemon acknowledges with a
/// publish of its own), else all are telemetry.
fn steady_publisher(
    broker_url: String,
    per_second: Option<u32>,
    registrations: bool,
    stop: Arc<AtomicBool>,
    acked_count: Arc<AtomicU64>,
) -> (Vec<String>, Vec<u64>) {
    let (mut devices, mut markers) = (Vec::new(), Vec::new());
    let mut conn: Option<paho::AsyncClient> = None;
    let mut i = 0u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(rate) = per_second {
            // Load shaping, not synchronisation: a device's send rate.
            next += Duration::from_secs(1) / rate;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        let Some(cli) = conn.as_ref() else {
            let cli = paho::AsyncClient::new(
                paho::CreateOptionsBuilder::new()
                    .server_uri(&broker_url)
                    .client_id("steady")
                    .persistence(paho::PersistenceType::None)
                    .finalize(),
            )
            .expect("paho client");
            // The broker may be down: a device retries its connection
            // (not its messages) on its own schedule.
            if cli.connect(connect_opts()).wait().is_ok() {
                conn = Some(cli);
            } else {
                std::thread::sleep(Duration::from_millis(50));
            }
            continue;
        };
        i += 1;
        let (msg, id, n) = if registrations && i.is_multiple_of(8) {
            let id = format!("s{i}");
            (register_msg(&id), Some(id), None)
        } else {
            (telemetry_msg(900_000_000 + i), None, Some(900_000_000 + i))
        };
        if cli.publish(msg).wait_for(Duration::from_secs(2)).is_ok() {
            devices.extend(id);
            markers.extend(n);
            acked_count.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = cli.disconnect(None).wait_for(Duration::from_secs(1));
            conn = None;
        }
    }
    (devices, markers)
}

/// Devices publish steadily while the broker restarts `n` times (a
/// clean stop, so its persistence file is written). `settle`: wait for the
/// daemon to be back before the next restart (one fault at a time); else
/// the broker restarts again whenever the devices have got 50 messages
/// through, which can be while the daemon is still reconnecting.
fn broker_restarts(n: usize, settle: bool, registrations: bool) -> Tally {
    run_with_publisher(Some(RATE), registrations, |broker, d, acked| {
        let devices_publishing = || {
            let before = acked.load(Ordering::Relaxed);
            wait_for("devices publishing", DEADLINE, || {
                (acked.load(Ordering::Relaxed) >= before + 50).then_some(())
            });
        };
        for restart in 0..n as u64 {
            devices_publishing();
            if settle {
                wait_for("the daemon back on the broker", DEADLINE, || {
                    let connects = d.metric("konsul_edge_mqtt_connects_total")?;
                    let up = d.metric("konsul_edge_mqtt_connected")? == 1;
                    (up && connects > restart).then_some(())
                });
            }
            std::thread::sleep(kill_point(200));
            broker.restart();
        }
        devices_publishing();
    })
}

/// A broker, the daemon, the sensors registered and a steady publisher
/// (at `per_second`) running while `during` injects its fault; then the
/// sentinel and the tally of what was acknowledged against what is held.
fn run_with_publisher(
    per_second: Option<u32>,
    registrations: bool,
    during: impl FnOnce(&mut Broker, &Daemon, &AtomicU64),
) -> Tally {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start_with(dir.path(), KEEP_ALL);
    config(dir.path(), &broker);
    let db = dir.path().join("konsul.db");
    let mut d = start_connected(dir.path());
    let registrar = Registrar::connect(&broker);
    for s in 0..SENSORS {
        registrar.register(&format!("t{s}"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (url, stop, acked) = (broker.url(), stop.clone(), acked.clone());
        std::thread::spawn(move || steady_publisher(url, per_second, registrations, stop, acked))
    };
    during(&mut broker, &d, &acked);
    stop.store(true, Ordering::Relaxed);
    let (devices, markers) = publisher.join().unwrap();
    // The registrar's own connection died with the broker.
    Registrar::connect(&broker).register("sentinel");
    let mut tally = Tally::default();
    tally.check(&d, &devices, &markers);
    d.stop();
    let check = integrity(&db);
    if check != "ok" {
        tally.integrity.push(check);
    }
    tally
}

// Duplicates are counted but not asserted for broker restarts: a message
// the broker had sent to the daemon and not yet seen acknowledged when it
// stopped is delivered again after the restart, as QoS 1 allows; the
// daemon recognises a re-sent reading (DUP) only against its last batches
// (src/devices/redelivery.rs).

// The third restart test has devices registering, so the daemon publishes
// device acks of its own around the reconnect. With the Paho bridge that
// ended in a reconnect loop (mosquitto dropped each new connection as
// "malformed packet"); the client of docs/decisions/0021 does not.

#[test]
fn broker_restarts_with_persistence_lose_nothing_acknowledged() {
    let n = runs(4, 50);
    broker_restarts(n, true, false).report("broker-restart", n, false);
}

/// Restarts that can land while the daemon is still reconnecting (one
/// that interrupts its SUBSCRIBE costs it the 10 s subscribe timeout).
#[test]
fn broker_restarts_during_reconnect_lose_nothing_acknowledged() {
    let n = runs(10, 300);
    broker_restarts(n, false, false).report("broker-restart-rapid", n, false);
}

/// As above with devices registering, so the daemon publishes acks while
/// it reconnects. With Paho it failed in about one run in three here (30
/// restarts); `KONSUL_SOAK=1` runs 300.
#[test]
fn broker_restarts_while_devices_register_lose_nothing_acknowledged() {
    let n = runs(30, 300);
    broker_restarts(n, false, true).report("broker-restart-registering", n, false);
}

/// Devices publishing (registrations among telemetry) faster than the
/// daemon ingests, with no other fault: the daemon must keep up or push
/// back, and lose nothing the broker acknowledged.
#[test]
fn overload_loses_nothing_and_does_not_wedge_the_daemon() {
    let n = runs(1, 10);
    let mut tally = Tally::default();
    for _ in 0..n {
        let t = run_with_publisher(None, true, |_, _, acked| {
            wait_for("devices publishing", DEADLINE, || {
                (acked.load(Ordering::Relaxed) >= 10_000).then_some(())
            });
        });
        tally.acked += t.acked;
        tally.lost.extend(t.lost);
        tally.duplicated.extend(t.duplicated);
        tally.integrity.extend(t.integrity);
    }
    tally.report("mqtt-overload", n, true);
}
