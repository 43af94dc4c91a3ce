//! The fault harness (issue 12): the real binary, a real mosquitto and real
//! SQLite files, hit where it hurts. kill -9 at random points during HTTP
//! writes, MQTT QoS 1 bursts and sync drains; a broker restarting with
//! persistence; a disk that fills up. Each scenario prints one line of
//! counts (`faults NAME: runs=.. acked=.. lost=.. duplicated=.. ...`) and
//! asserts that every count that must be zero is zero.
//!
//! "Acknowledged" is what the writer was told: a 200 for HTTP, a PUBACK
//! from the broker for a device, a completed sync for an edge. That is the
//! promise under test, so the harness records it on the writer's side and
//! checks it against what the restarted daemon holds.
//!
//! The kill point is a random delay on purpose (that is the fault being
//! injected); everything else waits on a condition with a deadline.
//! `KONSUL_SOAK=1` multiplies the iterations for long runs outside CI.

#[path = "../common/mod.rs"]
mod common;

mod disk;
mod http;
#[cfg(feature = "mqtt")]
mod mqtt;
mod sync;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::DEADLINE;

/// Prints a scenario's line of counts and appends it to
/// `target/tmp/faults-summary.txt`, which `scripts/test.sh` shows after the
/// test run (cargo hides a passing test's output).
pub fn summary(line: String) {
    println!("{line}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("faults-summary.txt");
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!("{}: {e}", path.display());
    }
}

/// Iterations: `ci` normally, `soak` with `KONSUL_SOAK=1`.
pub fn runs(ci: usize, soak: usize) -> usize {
    if std::env::var("KONSUL_SOAK").is_ok_and(|v| v == "1") {
        soak
    } else {
        ci
    }
}

/// A random delay in `[0, max_ms]`: where the fault lands.
pub fn kill_point(max_ms: u64) -> Duration {
    Duration::from_millis(fastrand::u64(0..=max_ms))
}

/// `PRAGMA integrity_check` on a copy of the database files, taken while
/// no daemon has them open: the state a crash left, checked without
/// touching what the restarted daemon will recover from.
pub fn integrity(db: &Path) -> String {
    let scratch = tempfile::tempdir().expect("scratch dir");
    let copy = scratch.path().join("copy.db");
    std::fs::copy(db, &copy).expect("copy database");
    let wal = db.with_extension("db-wal");
    if wal.exists() {
        std::fs::copy(&wal, copy.with_extension("db-wal")).expect("copy WAL");
    }
    let conn = rusqlite::Connection::open(&copy).expect("open copy");
    let rows: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<_, _>>()
        })
        .unwrap_or_else(|e| vec![e.to_string()]);
    rows.join("; ")
}

/// One request that never panics: the daemon may die under it. Ok is the
/// status and the body; Err means the outcome is unknown (connection
/// refused or cut), which a writer must treat as "maybe applied".
pub fn try_request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    s.set_write_timeout(Some(DEADLINE))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{}",
        common::token_header(addr)
    );
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body.unwrap_or(""));
    s.write_all(head.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no response head"))?;
    let status = String::from_utf8_lossy(&raw[..end])
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    Ok((status, raw[end + 4..].to_vec()))
}

/// Values of `keys` as the daemon at `d` has them (absent keys are left
/// out), through `/batch/kv/get` in chunks of its limit.
pub fn kv_values(d: &common::Daemon, keys: &[String]) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    for chunk in keys.chunks(1000) {
        let body = serde_json::json!({ "keys": chunk }).to_string();
        let r = d.req("POST", "/batch/kv/get", Some(&body));
        assert_eq!(r.status, 200, "{}", r.text());
        if let Some(found) = r.json()["found"].as_object() {
            for (k, v) in found {
                out.insert(k.clone(), v.as_str().unwrap_or_default().to_owned());
            }
        }
    }
    out
}
