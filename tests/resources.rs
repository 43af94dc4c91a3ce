//! `resources.memory_limit` and `cpu_limit` bind: the systemd drop-in the
//! CLI writes, the start-up check of the daemon's own cgroup, and shedding
//! on a cgroup `memory.events` "high" event.
//!
//! The cgroup files come from a directory this test controls
//! (`resources.cgroup_root`), laid out as the kernel would under the
//! daemon's own cgroup path (`0::` line of /proc/self/cgroup, inherited
//! from the test). A real cgroup with `memory.max` needs the memory
//! controller in the unified (v2) hierarchy, which the hosts this was
//! written on did not have (hybrid v1/v2); the daemon reads the same file
//! names either way, and inotify reports a write to a regular file as the
//! kernel reports a counter change in `memory.events`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The test's own cgroup directory under `root` (the daemon inherits it).
fn cgroup_dir(root: &Path) -> PathBuf {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 line in /proc/self/cgroup");
    let dir = root.join(rel.trim().trim_start_matches('/'));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const EVENTS: &str = "low 0\nhigh {}\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n";

fn events(high: u64) -> String {
    EVENTS.replace("{}", &high.to_string())
}

fn config(dir: &Path, root: &Path) {
    write_config(
        dir,
        &format!(
            "resources:\n  memory_limit: 50Mi\n  cpu_limit: 0.1\n  cgroup_root: {}\n",
            root.display()
        ),
    );
}

#[test]
fn the_dropin_carries_the_configured_limits() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "resources:\n  memory_limit: 30Mi\n  cpu_limit: 0.25\n",
    );
    let out = dir.path().join("konsul-edge.service.d/50-resources.conf");
    let run = run_bounded(
        Command::new(BIN)
            .arg("systemd-dropin")
            .arg("--config")
            .arg(&cfg)
            .arg("--output")
            .arg(&out),
    );
    assert!(run.status.success(), "{run:?}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("[Service]\n"), "{text}");
    assert!(text.contains("MemoryMax=31457280\n"), "{text}");
    assert!(text.contains("MemoryHigh=28311552\n"), "{text}");
    assert!(text.contains("CPUQuota=25%\n"), "{text}");
    // A config that would not run gets no drop-in.
    std::fs::write(&cfg, "resources: {cpu_limit: 0}\n").unwrap();
    let run = run_bounded(
        Command::new(BIN)
            .args(["systemd-dropin", "-o", "-", "--config"])
            .arg(&cfg),
    );
    assert_eq!(run.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&run.stderr).contains("resources.cpu_limit"));
}

#[test]
fn a_cgroup_that_disagrees_is_warned_about_and_high_events_shed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cgroup");
    let cg = cgroup_dir(&root);
    // What the shipped unit alone gives: 64M, no CPU quota.
    std::fs::write(cg.join("memory.max"), "67108864\n").unwrap();
    std::fs::write(cg.join("cpu.max"), "max 100000\n").unwrap();
    std::fs::write(cg.join("memory.events"), events(2)).unwrap();
    config(dir.path(), &root);
    let d = Daemon::start(dir.path());
    let early = d.early.join("\n");
    assert!(
        early.contains("memory.max is 67108864 bytes but resources.memory_limit is 50Mi"),
        "{early}"
    );
    assert!(early.contains("cpu.max is `max`"), "{early}");
    let watching = |l: &str| l.contains("memory pressure: watching");
    if !d.early.iter().any(|l| watching(l)) {
        d.wait_log(watching).expect("the watch is set up");
    }
    assert_eq!(d.metric("konsul_edge_memory_shedding "), Some(0));
    assert_eq!(d.metric("konsul_edge_memory_high_events_total "), Some(2));
    assert_eq!(
        d.metric("konsul_edge_cgroup_memory_max_bytes "),
        Some(64 << 20)
    );

    std::fs::write(cg.join("memory.events"), events(5)).unwrap();
    let line = d
        .wait_log(|l| l.contains("memory pressure: memory.events high"))
        .expect("a shedding warning");
    assert!(line.contains("high +3 (total 5)"), "{line}");
    assert!(line.contains("SQLite page cache released"), "{line}");
    assert_eq!(d.metric("konsul_edge_memory_shedding "), Some(1));
    assert_eq!(d.metric("konsul_edge_memory_sheds_total "), Some(1));
    assert_eq!(d.metric("konsul_edge_memory_high_events_total "), Some(5));
    let status = d.get("/v1/edge/status").json();
    assert_eq!(status["memory"]["shedding"], true, "{status}");
    assert_eq!(status["memory"]["limit_bytes"], 50 << 20);
}

#[test]
fn a_cgroup_that_matches_the_config_passes_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cgroup");
    let cg = cgroup_dir(&root);
    // What systemd makes of the drop-in for 50Mi / 0.1.
    std::fs::write(cg.join("memory.max"), "52428800\n").unwrap();
    std::fs::write(cg.join("cpu.max"), "10000 100000\n").unwrap();
    config(dir.path(), &root);
    let d = Daemon::start(dir.path());
    let early = d.early.join("\n");
    assert!(!early.contains("resources: "), "{early}");
    assert!(
        early.contains("memory.events") && early.contains("is absent"),
        "{early}"
    );
    assert_eq!(
        d.metric("konsul_edge_cgroup_memory_max_bytes "),
        Some(50 << 20)
    );
}
