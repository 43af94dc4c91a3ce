//! Process lifecycle: durability across kill -9, graceful shutdown, refusing
//! foreign databases, storage limits, and the sd_notify protocol.

mod common;

use std::os::unix::net::UnixDatagram;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    for i in 0..20 {
        let r = d.put(
            "/register",
            &format!(r#"{{"name":"svc-{i}","address":"10.0.0.{i}","port":80}}"#),
        );
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        d.put("/kv/last", r#"{"value":"written-before-kill"}"#)
            .status,
        200
    );
    d.kill9();
    assert!(
        dir.path().join("konsul.db-wal").exists(),
        "kill -9 left the WAL un-checkpointed, as intended"
    );

    let d = Daemon::start(dir.path());
    assert_eq!(d.get("/services/").json().as_array().unwrap().len(), 20);
    assert_eq!(d.get("/kv/last").json()["value"], "written-before-kill");
    assert_eq!(
        d.get("/v1/edge/status").json()["outbox_pending"],
        21,
        "the outbox survived too"
    );
}

#[test]
fn sigterm_shuts_down_cleanly_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    assert_eq!(d.put("/kv/a", r#"{"value":"1"}"#).status, 200);
    let st = d.stop();
    assert_eq!(st.code(), Some(0), "{st:?}");
    let wal = dir.path().join("konsul.db-wal");
    assert!(
        !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
        "WAL was not checkpointed at shutdown"
    );
    let mut d = Daemon::start(dir.path());
    assert_eq!(d.get("/kv/a").json()["value"], "1");
    d.signal("INT");
    assert_eq!(d.wait_exit().code(), Some(0));
}

#[test]
fn refuses_a_file_that_is_not_a_konsul_database() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "");
    std::fs::write(
        dir.path().join("konsul.db"),
        b"#!/bin/sh\necho this is not a database\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(dir.path().join("edge.yaml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65), "EX_DATAERR");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a konsul-edge database"), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("konsul.db")).unwrap(),
        b"#!/bin/sh\necho this is not a database\n",
        "the foreign file was modified"
    );
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "");
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(dir.path().join("edge.yaml"))
        .env(
            "KONSUL_HTTP_LISTEN",
            taken.local_addr().unwrap().to_string(),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69), "EX_UNAVAILABLE");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen"));
}

#[test]
fn storage_limit_refuses_whole_writes_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("edge.yaml"),
        format!(
            "node_id: t\nstorage: {{path: {}, max_size: 1Mi}}\nhttp: {{listen: '127.0.0.1:0', max_body_size: 1Mi}}\n",
            dir.path().join("konsul.db").display()
        ),
    )
    .unwrap();
    let d = Daemon::start(dir.path());
    let value = "v".repeat(100 * 1024);
    let mut stored = 0;
    let refused = loop {
        let r = d.put(
            &format!("/kv/k{stored}"),
            &format!(r#"{{"value":"{value}"}}"#),
        );
        if r.status != 200 {
            break r;
        }
        stored += 1;
        assert!(stored < 50, "1Mi limit never reached");
    };
    assert_eq!(refused.status, 507, "{}", refused.text());
    assert!(refused.json()["message"]
        .as_str()
        .unwrap()
        .contains("storage.max_size"));
    let keys = d.get("/kv/").json();
    assert_eq!(
        keys.as_array().unwrap().len(),
        stored,
        "the refused key must not exist"
    );
    assert_eq!(d.get(&format!("/kv/k{stored}")).status, 404);
    let status = d.get("/v1/edge/status").json();
    assert_eq!(status["outbox_pending"].as_u64(), Some(stored as u64));
    assert_eq!(
        status["modify_index"].as_u64(),
        Some(stored as u64),
        "no index was burnt"
    );
    // small writes that fit still work, reads keep working
    assert_eq!(
        d.get("/kv/k0").json()["value"].as_str().unwrap().len(),
        value.len()
    );
}

struct Notify {
    sock: UnixDatagram,
}

impl Notify {
    fn new(dir: &std::path::Path) -> (Notify, String) {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        (Notify { sock }, path.display().to_string())
    }

    /// Next datagram, or None after `within`.
    fn next(&self, within: Duration) -> Option<String> {
        self.sock
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    fn wait_for(&self, what: &str) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let msg = self
                .next(left)
                .unwrap_or_else(|| panic!("no {what} from the daemon"));
            if msg.lines().any(|l| l == what) {
                return msg;
            }
        }
    }

    /// Every datagram that arrives within `window`.
    fn collect(&self, window: Duration) -> Vec<(Duration, String)> {
        let start = Instant::now();
        let mut out = Vec::new();
        while let Some(left) = window.checked_sub(start.elapsed()) {
            match self.next(left) {
                Some(m) => out.push((start.elapsed(), m)),
                None => break,
            }
        }
        out
    }
}

#[test]
fn sd_notify_ready_watchdog_gated_on_the_store_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let (notify, sock) = Notify::new(dir.path());
    // 200 ms watchdog: pings every 100 ms.
    let mut d = Daemon::start_with(
        dir.path(),
        &[
            ("NOTIFY_SOCKET", sock.as_str()),
            ("WATCHDOG_USEC", "200000"),
            ("KONSUL_TEST_HOOKS", "1"),
        ],
    );
    let ready = notify.wait_for("READY=1");
    assert!(
        ready.contains("STATUS="),
        "READY carries a status line: {ready}"
    );
    for _ in 0..3 {
        notify.wait_for("WATCHDOG=1");
    }

    // Wedge the store thread for 2 s: pings must stop.
    let r = d.req("POST", "/v1/edge/debug/wedge-store?ms=2000", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let wedged_at = Instant::now();
    let during = notify.collect(Duration::from_millis(1500));
    let pings: Vec<_> = during
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .collect();
    // A probe answered just before the wedge may still be sent; nothing after.
    assert!(
        pings.iter().all(|(at, _)| *at < Duration::from_millis(250)),
        "watchdog pinged while the store was wedged: {during:?}"
    );
    assert!(pings.len() <= 1, "{during:?}");
    assert!(
        wedged_at.elapsed() < Duration::from_millis(2000),
        "test too slow to observe the wedge"
    );

    // ... and resume once it answers again.
    notify.wait_for("WATCHDOG=1");

    d.signal("TERM");
    notify.wait_for("STOPPING=1");
    let st = d.wait_exit();
    assert_eq!(st.code(), Some(0), "{st:?} (signal {:?})", st.signal());
}

#[test]
fn log_lines_carry_syslog_priorities_when_stderr_is_the_journal() {
    use std::io::BufRead;
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "");
    let (reader, writer) = std::io::pipe().unwrap();
    // What systemd puts in JOURNAL_STREAM: device and inode of the stream.
    let meta = std::fs::metadata(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&writer)
    ))
    .unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(dir.path().join("edge.yaml"))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("KONSUL_LOG", "info")
        .stderr(writer)
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(reader).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains(" ready in "))
        .expect("ready line");
    assert!(ready.starts_with("<6>daemon: "), "{ready}");
    assert!(
        !ready.contains("Z INFO"),
        "no timestamp: the journal adds its own"
    );
    let _ = child.kill();
    let _ = child.wait();
}
