//! kill -9 at random points during HTTP writes. Three writers go as fast
//! as they can: new KV keys, overwrites of a few hot keys, and service
//! registrations that overwrite a few ids. Every 200 is a promise; after
//! the restart each promised write must be there with its value, and the
//! only write allowed beyond them is the one each writer had in flight.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::Value;

use crate::common::{wait_for, Daemon, DEADLINE};
use crate::{integrity, kill_point, kv_values, runs, try_request};

const HOT_KEYS: u64 = 16;
const SERVICE_IDS: u64 = 40;

/// One write: where it goes and what identifies it afterwards.
struct Write {
    path: String,
    body: String,
    key: String,
    value: String,
}

#[derive(Default)]
struct WriterLog {
    /// Acknowledged writes, in order.
    acked: Vec<(String, String)>,
    /// The write the kill cut off, if any: it may or may not be there.
    in_flight: Option<(String, String)>,
    /// Answers other than 200 (nothing here should refuse a write).
    refused: Vec<String>,
}

impl WriterLog {
    /// The last acknowledged value per key.
    fn last_acked(&self) -> HashMap<&str, &str> {
        self.acked
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// Whether `value` is an acceptable final state for `key`: its last
    /// acknowledged value, or the one in flight at the kill.
    fn accepts(&self, key: &str, last: &str, value: Option<&str>) -> bool {
        let in_flight = self
            .in_flight
            .as_ref()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str());
        value == Some(last) || (value.is_some() && value == in_flight)
    }
}

/// Writes until the daemon stops answering.
fn writer(
    addr: String,
    acked: Arc<AtomicU64>,
    mut next: impl FnMut(u64) -> Write + Send + 'static,
) -> JoinHandle<WriterLog> {
    std::thread::spawn(move || {
        let mut log = WriterLog::default();
        for i in 0.. {
            let w = next(i);
            match try_request(&addr, "PUT", &w.path, Some(&w.body)) {
                Ok((200, _)) => {
                    log.acked.push((w.key, w.value));
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok((status, body)) => {
                    log.refused.push(format!(
                        "{} -> {status} {}",
                        w.path,
                        String::from_utf8_lossy(&body)
                    ));
                    break;
                }
                Err(_) => {
                    log.in_flight = Some((w.key, w.value));
                    break;
                }
            }
        }
        log
    })
}

fn config(dir: &Path) {
    std::fs::write(
        dir.join("edge.yaml"),
        format!(
            "mode: edge\nnode_id: faults-http\nstorage:\n  path: {}\n  max_size: 64Mi\n\
             http:\n  listen: 127.0.0.1:0\n",
            dir.join("konsul.db").display()
        ),
    )
    .unwrap();
}

#[derive(Default)]
struct Counts {
    acked: usize,
    lost: Vec<String>,
    duplicated: Vec<String>,
    unexpected: Vec<String>,
    refused: Vec<String>,
    integrity: Vec<String>,
}

#[test]
fn http_writes_survive_kill9() {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    let db = dir.path().join("konsul.db");
    let n = runs(16, 300);
    let mut c = Counts::default();
    let mut d = Daemon::start(dir.path());
    for run in 0..n as u64 {
        let acked = Arc::new(AtomicU64::new(0));
        let fresh = writer(d.addr.clone(), acked.clone(), move |i| {
            let key = format!("faults/r{run}/{i}");
            let value = format!("v{run}-{i}");
            Write {
                path: format!("/kv/{key}"),
                body: format!(r#"{{"value":"{value}"}}"#),
                key,
                value,
            }
        });
        let hot = writer(d.addr.clone(), acked.clone(), move |i| {
            let key = format!("faults/hot/{}", i % HOT_KEYS);
            let value = format!("r{run}-{i}");
            Write {
                path: format!("/kv/{key}"),
                body: format!(r#"{{"value":"{value}"}}"#),
                key,
                value,
            }
        });
        let services = writer(d.addr.clone(), acked.clone(), move |i| {
            let id = format!("svc-{}", i % SERVICE_IDS);
            let port = (run * 100_000 + i) % 65_000 + 1;
            Write {
                path: "/register".into(),
                body: format!(
                    r#"{{"id":"{id}","name":"fault","address":"10.0.0.1","port":{port}}}"#
                ),
                key: id,
                value: port.to_string(),
            }
        });
        wait_for("the writers' first acknowledgements", DEADLINE, || {
            (acked.load(Ordering::Relaxed) >= 3).then_some(())
        });
        std::thread::sleep(kill_point(400));
        d.kill9();
        let (fresh, hot, services) = (
            fresh.join().unwrap(),
            hot.join().unwrap(),
            services.join().unwrap(),
        );
        for l in [&fresh, &hot, &services] {
            c.acked += l.acked.len();
            c.refused.extend(l.refused.iter().cloned());
        }
        let check = integrity(&db);
        if check != "ok" {
            c.integrity.push(format!("run {run}: {check}"));
        }

        d = Daemon::start(dir.path());
        verify_fresh(&d, run, &fresh, &mut c);
        verify_hot(&d, &hot, &mut c);
        verify_services(&d, &services, &mut c);
    }
    d.stop();
    let check = integrity(&db);
    if check != "ok" {
        c.integrity.push(format!("after a clean stop: {check}"));
    }

    crate::summary(format!(
        "faults http-kill9: runs={n} acked={} lost={} duplicated={} unexpected={} refused={} integrity={}",
        c.acked,
        c.lost.len(),
        c.duplicated.len(),
        c.unexpected.len(),
        c.refused.len(),
        if c.integrity.is_empty() { "ok" } else { "FAILED" }
    ));
    assert!(c.lost.is_empty(), "acknowledged writes lost: {:?}", c.lost);
    assert!(c.duplicated.is_empty(), "listed twice: {:?}", c.duplicated);
    assert!(
        c.unexpected.is_empty(),
        "writes that were never acknowledged nor in flight: {:?}",
        c.unexpected
    );
    assert!(c.refused.is_empty(), "refused writes: {:?}", c.refused);
    assert!(c.integrity.is_empty(), "integrity_check: {:?}", c.integrity);
}

/// New keys: each acknowledged one is there with its value; beyond them
/// only the one in flight may be.
fn verify_fresh(d: &Daemon, run: u64, log: &WriterLog, c: &mut Counts) {
    let prefix = format!("faults/r{run}/");
    let listed: Vec<String> = d
        .get("/kv/")
        .json()
        .as_array()
        .expect("key listing")
        .iter()
        .filter_map(Value::as_str)
        .filter(|k| k.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    let mut seen = HashSet::new();
    for k in &listed {
        if !seen.insert(k) {
            c.duplicated.push(k.clone());
        }
    }
    let keys: Vec<String> = log.acked.iter().map(|(k, _)| k.clone()).collect();
    let values = kv_values(d, &keys);
    for (k, v) in &log.acked {
        if values.get(k) != Some(v) {
            c.lost.push(format!("{k}={v} (found {:?})", values.get(k)));
        }
    }
    let acked: HashSet<&String> = log.acked.iter().map(|(k, _)| k).collect();
    for k in seen {
        let in_flight = log.in_flight.as_ref().is_some_and(|(f, _)| f == k);
        if !acked.contains(k) && !in_flight {
            c.unexpected.push(k.clone());
        }
    }
}

/// Overwritten keys: each holds its last acknowledged value (or the one
/// in flight).
fn verify_hot(d: &Daemon, log: &WriterLog, c: &mut Counts) {
    let last = log.last_acked();
    let keys: Vec<String> = last.keys().map(|k| k.to_string()).collect();
    let values = kv_values(d, &keys);
    for (k, v) in last {
        let found = values.get(k).map(String::as_str);
        if !log.accepts(k, v, found) {
            c.lost.push(format!("{k}={v} (found {found:?})"));
        }
    }
}

/// Overwritten services: each has its last acknowledged port (or the one
/// in flight), and no id is listed twice.
fn verify_services(d: &Daemon, log: &WriterLog, c: &mut Counts) {
    let list = d.get("/services/").json();
    let mut ports: HashMap<String, String> = HashMap::new();
    for s in list.as_array().expect("service listing") {
        let id = s["id"].as_str().unwrap_or_default().to_owned();
        if ports.insert(id.clone(), s["port"].to_string()).is_some() {
            c.duplicated.push(format!("service {id}"));
        }
    }
    for (id, port) in log.last_acked() {
        let found = ports.get(id).map(String::as_str);
        if !log.accepts(id, port, found) {
            c.lost
                .push(format!("service {id} port {port} (found {found:?})"));
        }
    }
}
