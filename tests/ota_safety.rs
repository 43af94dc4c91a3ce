//! OTA defects that left an update half-done or stalled the executor
//! (issue 12): a step timeout that let the slot writer go on writing, a
//! read-back that read the page cache, and a health check whose forked
//! children outlived its timeout. Real tools and the real binary, as in
//! tests/ota.rs (whose rig this shares).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use konsul_edge::ota::bundle::{self, BundleError, Manifest};

#[path = "common/ota_rig.rs"]
mod ota_rig;

use ota_rig::*;

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A step timeout while the slot writer is blocked (a slow device: here a
/// FIFO whose reader stops reading) must not move on: the state stays
/// `installing` and installs are refused until the writer's thread has
/// stopped, and it stops at its next chunk instead of writing the whole
/// image after the deployment failed.
#[test]
fn a_timed_out_install_stops_its_writer_before_anything_else_starts() {
    if !have("fw_setenv") || !have("mkenvimage") || !have("mkfifo") {
        return;
    }
    let rig = Rig::new(Flavor::Uboot, "  step_timeout: 2s\n");
    let slot_b = rig.path("B.img");
    std::fs::remove_file(&slot_b).unwrap();
    run(Command::new("mkfifo").arg(&slot_b));
    let data = new_image(0x6b, 4 << 20);
    let img = rig.image("v2.img", &data, "2.0.0", None);
    let other = rig.image("v3.img", &new_image(0x11, 1000), "3.0.0", None);

    // The "device": reads 512 KiB, then stops until released, then drains
    // to EOF (the writer closed it) and reports what it read after that.
    let (paused_tx, paused_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel::<(u64, u64)>();
    let fifo = slot_b.clone();
    std::thread::spawn(move || {
        let mut f = std::fs::File::open(&fifo).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut before = 0u64;
        while before < 512 << 10 {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => before += n as u64,
            }
        }
        let _ = paused_tx.send(());
        let _ = release_rx.recv();
        let mut after = 0u64;
        loop {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => after += n as u64,
            }
        }
        let _ = done_tx.send((before, after));
    });

    let d = rig.start();
    let r = install(&d, &img);
    assert_eq!(r.status, 200, "{}", r.text());
    paused_rx
        .recv_timeout(DEADLINE)
        .expect("the writer reached the slot");
    // The step timeout fires while the writer is blocked in write().
    let line = d
        .wait_log(|l| l.contains("waiting for its writer") || l.contains("-> failed"))
        .expect("the step timed out");
    assert!(
        !line.contains("-> failed"),
        "the state moved on while the writer still writes: {line}"
    );
    assert_eq!(ota(&d)["state"], "installing");
    let r = install(&d, &other);
    assert_ne!(
        r.status,
        200,
        "a second install was accepted while the first writer lives: {}",
        r.text()
    );

    release_tx.send(()).unwrap();
    let (before, after) = done_rx
        .recv_timeout(DEADLINE)
        .expect("the writer closed the slot");
    let line = wait(&d, "-> failed");
    assert!(line.contains("did not finish within"), "{line}");
    // It stopped at the next chunk: what was in the pipe plus one chunk,
    // never the rest of the 4 MiB image.
    assert!(
        after <= 256 << 10,
        "the writer went on after the timeout: {after} bytes after release ({before} before)"
    );
    // The booted slot stays the one booted next.
    let env = rig.env();
    assert_eq!(env["BOOT_ORDER"], "A B");
    assert_eq!(env["BOOT_B_LEFT"], "0");
    // Once it has stopped, installs are accepted again.
    std::fs::remove_file(&slot_b).unwrap();
    std::fs::write(&slot_b, vec![b'b'; 1 << 20]).unwrap();
    let r = install(&d, &other);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A device that drops writes: the data reaches the page cache and
/// `sync_all` returns, but the medium keeps its old content. The
/// read-back must read the medium. A loop device over a file plays the
/// device; the file reverting behind it plays the dropped write.
#[test]
fn slot_read_back_reads_the_medium_not_the_page_cache() {
    if !is_root() || !Path::new("/dev/loop-control").exists() || !have("losetup") {
        eprintln!("\n*** SKIPPED: needs root and loop devices (losetup) ***\n");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("slot.img");
    let old = vec![b'o'; 1 << 20];
    std::fs::write(&backing, &old).unwrap();
    let dev = run(Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing))
    .trim()
    .to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let dev = PathBuf::from(dev);

    let data = new_image(0x3c, 300_000);
    let image = dir.path().join("v2.img");
    std::fs::write(&image, &data).unwrap();
    let m = Manifest {
        version: "2".into(),
        size: data.len() as u64,
        sha256: sha256(&data),
        signature: String::new(),
    };
    // Someone else has the device open (udev, a monitor): the kernel then
    // keeps its page cache across our close.
    let _other_opener = std::fs::File::open(&dev).unwrap();
    bundle::write_slot(&image, &dev, &m, &AtomicBool::new(false), |_, _| {})
        .expect("a good device reads back");

    // The medium loses the write.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap();
    f.write_all(&old).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let r = bundle::read_back(&dev, &m);
    assert!(
        matches!(r, Err(BundleError::Digest { .. })),
        "the read-back trusted the page cache: {r:?}"
    );
}

/// Processes whose environment carries `mark`.
fn marked(mark: &str) -> Vec<u32> {
    let needle = format!("KONSUL_HC_MARK={mark}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        })
        .collect()
}

struct KillMarked(String);

impl Drop for KillMarked {
    fn drop(&mut self) {
        for pid in marked(&self.0) {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// A health check that forks and hangs times out; its whole process group
/// dies with it, not only the `sh` the daemon started.
#[test]
fn a_timed_out_health_check_leaves_no_process_of_its_group() {
    if !have("fw_setenv") || !have("mkenvimage") {
        return;
    }
    let mut rig = Rig::new(Flavor::Uboot, "  commit_deadline: 2s\n");
    let mark = format!(
        "{}-{}",
        std::process::id(),
        rig.dir.path().file_name().unwrap().to_string_lossy()
    );
    let _cleanup = KillMarked(mark.clone());
    let cfg = std::fs::read_to_string(rig.path("edge.yaml")).unwrap();
    let cfg: String = cfg
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("health_commands:") {
                format!(
                    "  health_commands: [\"KONSUL_HC_MARK={mark} sh -c 'sleep 300 & sleep 300'\"]"
                )
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(rig.path("edge.yaml"), cfg + "\n").unwrap();
    let img = rig.image("v2.img", &new_image(0x21, 100_000), "2.0.0", None);
    let mut d = rig.start();
    let r = install(&d, &img);
    assert_eq!(r.status, 200, "{}", r.text());
    wait(&d, "running the reboot command");
    d.kill9();
    assert_eq!(rig.boot(), "B");
    let mut d = rig.start();
    wait(&d, "health gate started");
    eventually("the check's processes run", || marked(&mark).len() >= 2);
    let line = wait(&d, "-> rolled-back");
    assert!(line.contains("no exit within"), "{line}");
    wait_for(
        "the check's process group to die",
        Duration::from_secs(5),
        || marked(&mark).is_empty().then_some(()),
    );
    d.kill9();
}
