//! Disk full on a small filesystem: the daemon's data directory on a 4 MiB
//! tmpfs with `storage.max_size` just below it. State writes must get 507
//! (not a 500, not a crash), deletes must work when full, writes must
//! resume once there is room, and the store's files (database, WAL, SHM)
//! must never take more than the limit.
//!
//! Mounting needs root (or CAP_SYS_ADMIN). Where it is refused the data
//! directory is an ordinary one and `storage.max_size` is the only limit;
//! the summary line says which (`fs=tmpfs` or `fs=plain`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{Daemon, DEADLINE};
use crate::{integrity, try_request};

const FS_SIZE: u64 = 4 << 20;
const LIMIT: u64 = 3 << 20;
const VALUE: usize = 16 << 10;
/// More writes than can ever fit: the fill stops at the first refusal.
const MAX_WRITES: usize = 2 * (LIMIT as usize) / VALUE;

/// A tmpfs mounted for the test and unmounted when dropped (after the
/// daemon that used it, which is declared later and so dropped first).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path) -> Option<Tmpfs> {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={FS_SIZE}")])
            .arg("tmpfs")
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Bytes the store's files take (apparent size of everything in `dir`).
fn disk_use(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[derive(Default)]
struct Tally {
    written: usize,
    refused_507: usize,
    /// Answers that are neither success nor 507, or no answer at all.
    other: Vec<String>,
    deletes_failed: Vec<String>,
    max_use: u64,
}

impl Tally {
    fn observe(&mut self, data: &Path) {
        self.max_use = self.max_use.max(disk_use(data));
    }
}

#[test]
fn disk_full_refuses_state_writes_lets_deletes_through_and_recovers() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let tmpfs = Tmpfs::mount(&data);
    let fs = if tmpfs.is_some() { "tmpfs" } else { "plain" };
    std::fs::write(
        root.path().join("edge.yaml"),
        format!(
            "mode: edge\nnode_id: faults-disk\nstorage:\n  path: {}\n  max_size: {LIMIT}\n\
             http:\n  listen: 127.0.0.1:0\n",
            data.join("konsul.db").display()
        ),
    )
    .unwrap();
    let mut d = Daemon::start(root.path());
    let mut t = Tally::default();
    let value = "x".repeat(VALUE);
    let body = format!(r#"{{"value":"{value}"}}"#);

    // Fill until refused.
    let mut full = false;
    for i in 0..MAX_WRITES {
        match try_request(&d.addr, "PUT", &format!("/kv/fill/{i}"), Some(&body)) {
            Ok((200, _)) => t.written += 1,
            Ok((507, _)) => {
                t.refused_507 += 1;
                full = true;
            }
            Ok((s, b)) => t
                .other
                .push(format!("PUT fill/{i}: {s} {}", String::from_utf8_lossy(&b))),
            Err(e) => t.other.push(format!("PUT fill/{i}: {e}")),
        }
        t.observe(&data);
        if full || !t.other.is_empty() {
            break;
        }
    }
    // Still full: another state write is refused the same way.
    if let Ok((s, _)) = try_request(&d.addr, "PUT", "/kv/one-more", Some(&body)) {
        if s != 507 {
            t.other.push(format!("PUT one-more when full: {s}"));
        }
    }
    t.observe(&data);

    // Deletes work when full: free a quarter of what was written.
    for i in 0..t.written.div_ceil(4) {
        match try_request(&d.addr, "DELETE", &format!("/kv/fill/{i}"), None) {
            Ok((200, _)) => {}
            Ok((s, b)) => t.deletes_failed.push(format!(
                "DELETE fill/{i}: {s} {}",
                String::from_utf8_lossy(&b)
            )),
            Err(e) => t.deletes_failed.push(format!("DELETE fill/{i}: {e}")),
        }
        t.observe(&data);
    }

    // Writes resume once there is room (space may come back a little
    // after the deletes, through a checkpoint or a collection).
    let mut resumed = false;
    let end = Instant::now() + DEADLINE;
    while t.deletes_failed.is_empty() && !resumed && Instant::now() < end {
        resumed = matches!(
            try_request(&d.addr, "PUT", "/kv/after-deletes", Some(&body)),
            Ok((200, _))
        );
        t.observe(&data);
        if !resumed {
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    t.observe(&data);
    d.stop();
    let check = integrity(&data.join("konsul.db"));
    drop(tmpfs);

    crate::summary(format!(
        "faults disk-full: fs={fs} limit={LIMIT} written={} refused_507={} other={} \
         deletes_failed={} resumed={resumed} max_use={} over_limit={} integrity={check}",
        t.written,
        t.refused_507,
        t.other.len(),
        t.deletes_failed.len(),
        t.max_use,
        t.max_use.saturating_sub(LIMIT),
    ));
    assert!(
        t.other.is_empty(),
        "state writes not answered 507: {:?}",
        t.other
    );
    assert!(
        full,
        "{} writes of {VALUE} bytes never filled {LIMIT}",
        t.written
    );
    assert!(
        t.deletes_failed.is_empty(),
        "deletes refused when full: {:?}",
        &t.deletes_failed[..t.deletes_failed.len().min(5)]
    );
    assert!(resumed, "no state write succeeded after the deletes");
    assert!(
        t.max_use <= LIMIT,
        "the store's files took {} bytes, over storage.max_size {LIMIT}",
        t.max_use
    );
    assert_eq!(check, "ok");
}
