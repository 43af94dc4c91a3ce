//! Hostile HTTP clients against the real binary (issue 13): stalled bodies,
//! slowloris clients that reconnect, invalid percent-encoding, JSON of the
//! wrong shape, and HEAD. Every wait has a deadline; the attack threads stop
//! when the test ends, so a regression fails the test rather than hanging it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// What a health probe may take under attack (the issue's bound).
const PROBE_BUDGET: Duration = Duration::from_secs(1);

/// One anonymous `GET` on a fresh connection that gives up after a few
/// seconds: the status and how long the answer took, or None when no
/// answer came (the old daemon kept probes waiting for minutes).
fn timed_get(addr: &str, path: &str) -> (Option<u16>, Duration) {
    let start = Instant::now();
    let give_up = Duration::from_secs(4);
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (None, start.elapsed());
    };
    s.set_read_timeout(Some(give_up)).unwrap();
    s.set_write_timeout(Some(give_up)).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return (None, start.elapsed());
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let status = String::from_utf8_lossy(&raw)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok());
    (status, start.elapsed())
}

/// Connections that declare a 1 MB body for an unauthenticated route and
/// then send nothing.
fn stall_bodies(addr: &str, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(addr).expect("connect");
            let head = format!(
                "PUT /register HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: 1000000\r\nX-Stall: {i}\r\n\r\n{{\"name\":"
            );
            s.write_all(head.as_bytes()).expect("write head");
            s
        })
        .collect()
}

/// How the server left a stalled connection: Some(status) for an answer,
/// Some(0) for a close without one, None while it is still held open.
fn stalled_outcome(s: &mut TcpStream) -> Option<u16> {
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(0) => Some(0),
        Ok(n) => String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .or(Some(0)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(_) => Some(0),
    }
}

#[test]
fn stalled_bodies_hold_no_probe_and_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    write_config(dir.path(), &format!("  unix_socket: {}\n", sock.display()));
    let d = Daemon::start(dir.path());

    let mut stalled = stall_bodies(&d.addr, 150);
    let flood_start = Instant::now();

    let (status, probe) = timed_get(&d.addr, "/health/live");
    eprintln!("probe under 150 stalled bodies: {status:?} in {probe:?}");
    assert_eq!(status, Some(200), "probe not answered under the flood");
    assert!(probe < PROBE_BUDGET, "probe took {probe:?}");

    // Local admin over the Unix socket has its own connection budget.
    let start = Instant::now();
    let mut u = UnixStream::connect(&sock).expect("connect unix socket");
    u.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    u.write_all(b"GET /kv/ HTTP/1.1\r\nHost: local\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let _ = u.read_to_end(&mut raw);
    let local = start.elapsed();
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "unix socket: {:?}",
        String::from_utf8_lossy(&raw)
    );
    assert!(local < PROBE_BUDGET, "unix socket took {local:?}");

    // A client that is not a probe gets through once the stalled bodies
    // time out (the daemon closes them; the attacker still holds its end).
    let served = wait_for("a normal request during the flood", DEADLINE * 2, || {
        let r = request(
            &d.addr,
            "PUT",
            "/kv/after-flood",
            Some(br#"{"value":"ok"}"#),
            &[],
        );
        (r.status == 200).then(|| flood_start.elapsed())
    });
    eprintln!("normal request served {served:?} after the flood began");

    let outcomes = wait_for("the stalled connections to be closed", DEADLINE, || {
        let o: Vec<Option<u16>> = stalled.iter_mut().map(stalled_outcome).collect();
        o.iter().all(Option::is_some).then_some(o)
    });
    let count = |code| outcomes.iter().filter(|o| **o == Some(code)).count();
    eprintln!(
        "stalled connections: {} timed out (408), {} refused (503), {} closed",
        count(408),
        count(503),
        count(0)
    );
    assert_eq!(count(408) + count(503) + count(0), 150);
    assert!(count(408) > 0, "no stalled body timed out: {outcomes:?}");
    assert_eq!(d.get("/kv/after-flood").json()["value"], "ok");
}

#[test]
fn slowloris_reconnecting_clients_do_not_delay_probes() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let stop = Arc::new(AtomicBool::new(false));
    // Stops the attack however the test ends, a failed assertion included.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop_guard = StopOnDrop(stop.clone());
    let connects = Arc::new(AtomicUsize::new(0));
    let attackers: Vec<_> = (0..200)
        .map(|_| {
            let (addr, stop, connects) = (d.addr.clone(), stop.clone(), connects.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(&addr) else {
                        continue;
                    };
                    connects.fetch_add(1, Ordering::Relaxed);
                    // The read timeout paces the drip: one header line per
                    // 300 ms for as long as the server keeps the socket.
                    s.set_read_timeout(Some(Duration::from_millis(300)))
                        .unwrap();
                    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").is_err() {
                        continue;
                    }
                    let mut buf = [0u8; 256];
                    while !stop.load(Ordering::Relaxed) {
                        match s.read(&mut buf) {
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) =>
                            {
                                if s.write_all(b"X-Slow: 1\r\n").is_err() {
                                    break;
                                }
                            }
                            // Closed or answered: reconnect.
                            _ => break,
                        }
                    }
                }
            })
        })
        .collect();
    wait_for("every attacker to connect", DEADLINE, || {
        (connects.load(Ordering::Relaxed) >= 200).then_some(())
    });

    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let (status, took) = timed_get(&d.addr, "/health/live");
        eprintln!("probe under slowloris: {status:?} in {took:?}");
        worst = worst.max(took);
        assert_eq!(status, Some(200), "probe not answered under slowloris");
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    eprintln!(
        "slowloris: {} connections made; worst probe {worst:?}",
        connects.load(Ordering::Relaxed)
    );
    assert!(worst < PROBE_BUDGET, "a probe took {worst:?}");
}

#[test]
fn invalid_percent_encoding_is_refused_not_aliased() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let r = d.put("/kv/%FF", r#"{"value":"a"}"#);
    assert_eq!(r.status, 400, "PUT /kv/%FF: {}", r.text());
    assert_eq!(d.get("/kv/%FE").status, 400);
    assert_eq!(
        d.get("/kv/").json(),
        serde_json::json!([]),
        "a key was created"
    );
    // U+FFFD itself, encoded properly, is an ordinary key that is not there.
    assert_eq!(d.get("/kv/%EF%BF%BD").status, 404);
    for bad in [
        "/kv/%G1",
        "/kv/a%F",
        "/kv/a%",
        "/services/%C3%28",
        "/kv/a?cas=%FF",
    ] {
        assert_eq!(d.get(bad).status, 400, "{bad}");
    }
    // Valid escapes keep working, including an encoded slash in a key.
    assert_eq!(d.put("/kv/a%2Fb%20c", r#"{"value":"v"}"#).status, 200);
    assert_eq!(d.get("/kv/").json(), serde_json::json!(["a/b c"]));
}

#[test]
fn head_is_answered_where_get_is() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    for path in [
        "/health",
        "/health/live",
        "/health/ready",
        "/kv/",
        "/v1/edge/status",
    ] {
        let r = d.req("HEAD", path, None);
        assert_eq!(r.status, 200, "HEAD {path}: {}", r.headers);
        assert!(r.body.is_empty(), "HEAD {path} sent a body: {}", r.text());
    }
    assert_eq!(d.req("HEAD", "/kv/missing", None).status, 404);
    let r = d.req("DELETE", "/health", None);
    assert_eq!(r.status, 405);
    assert!(
        r.headers.to_ascii_lowercase().contains("allow: get, head"),
        "{}",
        r.headers
    );
}

#[test]
fn json_of_the_wrong_shape_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    // Edge routes name every field they take; a body on a route that takes
    // none is all unknown fields.
    let r = d.req("POST", "/v1/edge/sync/now", Some(r#"{"force":true}"#));
    assert_eq!(r.status, 400, "{}", r.text());
    let r = d.req(
        "POST",
        "/v1/edge/ota/install",
        Some(r#"{"path":"/tmp/x.raucb","force":true}"#),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = d.req("POST", "/v1/edge/rollouts", Some(r#"["t", "dev", "1.0"]"#));
    assert_eq!(r.status, 400, "{}", r.text());
    // Konsul's routes decode as Konsul does (Go's encoding/json): unknown
    // fields are ignored, but an array is not an object.
    let r = d.put("/kv/k", r#"{"value":"v","ttl":"10s"}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = d.put("/kv/k", r#"["w"]"#);
    assert_eq!(r.status, 400, "{}", r.text());
    let r = d.req("POST", "/batch/kv/get", Some(r#"[["k"]]"#));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(d.get("/kv/k").json()["value"], "v");
}
