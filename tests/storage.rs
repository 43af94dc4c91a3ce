//! Storage that can always shrink, and a daemon that fails loudly: the
//! `storage.max_size` budget (database + WAL + SHM), deletes on a full
//! store, bodiless tombstones, the readiness probe on a wedged store, exit
//! codes for internal faults, and how lost, corrupt and foreign databases
//! are told apart. Real binary, real files in a private temp directory.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, write_config, Daemon, BIN, DEADLINE};

const MI: u64 = 1 << 20;

/// Bytes on disk of the database and its WAL and shared-memory files.
fn on_disk(dir: &Path) -> u64 {
    ["konsul.db", "konsul.db-wal", "konsul.db-shm"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum()
}

fn value(kb: usize, seed: usize) -> String {
    // Distinct, incompressible-enough text: SQLite stores it as is.
    let unit = format!("{seed:08x}");
    let body: String = unit.repeat(kb * 1024 / unit.len());
    serde_json::json!({ "value": body }).to_string()
}

/// Writes 16 KiB values until the store answers 507; returns the keys
/// written and the largest on-disk size seen after any write.
fn fill(d: &Daemon, prefix: &str) -> (Vec<String>, u64) {
    let mut keys = Vec::new();
    let mut peak = on_disk(&d.dir);
    for i in 0..400 {
        let key = format!("{prefix}{i}");
        let r = d.put(&format!("/kv/{key}"), &value(16, i));
        peak = peak.max(on_disk(&d.dir));
        match r.status {
            200 => keys.push(key),
            507 => return (keys, peak),
            s => panic!("PUT {key}: {s} {}", r.text()),
        }
    }
    panic!("the store never filled up (peak {peak} bytes)");
}

fn small_store(dir: &Path) {
    write_config(dir, "");
    let cfg = dir.join("edge.yaml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("max_size: 8Mi", "max_size: 1Mi");
    std::fs::write(cfg, text).unwrap();
}

#[test]
fn the_wal_counts_against_max_size_and_deletes_work_when_full() {
    let dir = tempfile::tempdir().unwrap();
    small_store(dir.path());
    let d = Daemon::start(dir.path());
    let (keys, peak) = fill(&d, "a");
    assert!(keys.len() >= 10, "only {} values fit in 1 MiB", keys.len());
    // A few refused writes more: refusing must not grow the files.
    for i in 0..5 {
        assert_eq!(d.put(&format!("/kv/x{i}"), &value(16, 999)).status, 507);
    }
    let peak = peak.max(on_disk(&d.dir));
    eprintln!(
        "burst: {} values of 16 KiB, peak on disk {peak} bytes",
        keys.len()
    );
    // The budget is the whole footprint; the stated slack is zero for
    // transactions smaller than max_size/8.
    assert!(
        peak <= MI,
        "database + WAL + SHM reached {peak} bytes > 1 MiB"
    );

    // Full: deleting still works, and frees room for new writes.
    for k in &keys[..3] {
        let r = d.delete(&format!("/kv/{k}"));
        assert_eq!(r.status, 200, "DELETE on a full store: {}", r.text());
    }
    let r = d.put("/kv/after-delete", &value(16, 1000));
    assert_eq!(r.status, 200, "write after deletes: {}", r.text());
    assert!(on_disk(&d.dir) <= MI, "{} bytes", on_disk(&d.dir));
}

#[test]
fn tombstones_keep_no_body() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    for i in 0..49 {
        assert_eq!(d.put(&format!("/kv/t{i}"), &value(16, i)).status, 200);
    }
    for i in 0..49 {
        assert_eq!(d.delete(&format!("/kv/t{i}")).status, 200);
    }
    assert!(d.stop().success());
    let c = rusqlite::Connection::open(dir.path().join("konsul.db")).unwrap();
    let (n, bytes): (i64, i64) = c
        .query_row(
            "SELECT count(*), coalesce(sum(length(body) + length(fields)), 0)
             FROM records WHERE tombstone = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    eprintln!("{n} tombstones hold {bytes} bytes of body and stamps");
    assert_eq!(n, 49);
    assert!(bytes < 49 * 256, "tombstones hold {bytes} bytes");
}

#[test]
fn ready_answers_503_within_a_second_while_the_store_is_wedged() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(dir.path(), &[("KONSUL_TEST_HOOKS", "1")]);
    assert_eq!(d.get("/health/ready").status, 200);
    let r = d.req("POST", "/v1/edge/debug/wedge-store?ms=4000", None);
    assert_eq!(r.status, 200, "{}", r.text());
    let t = Instant::now();
    let r = d.get("/health/ready");
    let took = t.elapsed();
    eprintln!("ready probe on a wedged store: {} in {took:?}", r.status);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // Liveness is not readiness: the process itself still answers.
    assert_eq!(d.get("/health/live").status, 200);
    wait_for("ready again", DEADLINE, || {
        (d.get("/health/ready").status == 200).then_some(())
    });
}

#[test]
fn a_fault_on_the_signal_stream_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_with(
        dir.path(),
        &[
            ("KONSUL_TEST_HOOKS", "1"),
            ("KONSUL_TEST_FAULT", "signal-stream"),
        ],
    );
    let st = d.wait_exit();
    assert!(!st.success(), "an internal fault exited with {st}");
    // 70 (EX_SOFTWARE): not in RestartPreventExitStatus, so systemd's
    // Restart=on-failure brings the daemon back.
    assert_eq!(st.code(), Some(70), "{st}");
}

/// Runs the daemon expecting it to refuse to start: (exit code, stderr).
fn run_to_exit(dir: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(dir.join("edge.yaml"))
        .env_remove("NOTIFY_SOCKET")
        .env("KONSUL_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + DEADLINE;
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("daemon did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (st.code(), err)
}

#[test]
fn corrupt_and_foreign_databases_get_different_messages() {
    // Ours, truncated: corrupt.
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    for i in 0..20 {
        assert_eq!(d.put(&format!("/kv/c{i}"), &value(16, i)).status, 200);
    }
    assert!(d.stop().success());
    let db = dir.path().join("konsul.db");
    let len = std::fs::metadata(&db).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let (code, err) = run_to_exit(dir.path());
    assert_eq!(code, Some(65), "{err}");
    assert!(err.contains("corrupt"), "{err}");
    assert!(!err.contains("not a konsul-edge database"), "{err}");

    // Someone else's SQLite file: foreign.
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "");
    let c = rusqlite::Connection::open(dir.path().join("konsul.db")).unwrap();
    c.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('x');")
        .unwrap();
    drop(c);
    let (code, err) = run_to_exit(dir.path());
    assert_eq!(code, Some(65), "{err}");
    assert!(err.contains("not a konsul-edge database"), "{err}");
    assert!(!err.contains("corrupt"), "{err}");
}

#[test]
fn a_lost_database_is_data_loss_not_a_new_node() {
    for how in ["emptied", "removed"] {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Daemon::start(dir.path());
        assert_eq!(d.put("/kv/k", r#"{"value":"v"}"#).status, 200);
        assert!(d.stop().success());
        let db = dir.path().join("konsul.db");
        match how {
            "emptied" => std::fs::write(&db, b"").unwrap(),
            _ => std::fs::remove_file(&db).unwrap(),
        }
        // A config that names another node must not re-identify it.
        let cfg = dir.path().join("edge.yaml");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("node_id: test-node", "node_id: someone-else");
        std::fs::write(&cfg, text).unwrap();

        let mut d = Daemon::start(dir.path());
        let loss = d
            .early
            .iter()
            .find(|l| l.contains("ERROR") && l.contains("data loss"))
            .unwrap_or_else(|| panic!("{how}: no data-loss error in {:#?}", d.early));
        assert!(loss.contains("test-node"), "{loss}");
        let status = d.get("/v1/edge/status").json();
        assert_eq!(status["node_id"], "test-node", "{how}: {status}");
        assert!(d.stop().success());
        let c = rusqlite::Connection::open(&db).unwrap();
        let full: String = c
            .query_row("SELECT value FROM meta WHERE key = 'full_sync'", [], |r| {
                r.get(0)
            })
            .unwrap_or_default();
        assert_eq!(full, "1", "{how}: a full sync is requested from the hub");
    }
}
