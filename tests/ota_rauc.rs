//! The RAUC backend against Debian's real `rauc service` on a private
//! dbus-daemon: a system.conf whose slots are image files and whose
//! bootloader is a custom backend script keeping its state in a file; the
//! booted slot is given with `rauc service --override-boot-slot` (RAUC 1.8;
//! the same answer RAUC would derive from `rauc.slot=` on /proc/cmdline).
//! Bundles are built with `rauc bundle` (plain format: verity needs
//! device-mapper, which containers rarely have) and signed with CAs made
//! here with openssl. The operator path is the real CLI over D-Bus.
//!
//! A simulated reboot restarts both `rauc service` (with the other boot
//! slot) and the daemon. Installing mounts the bundle (a loop device), so
//! the test needs root; it skips loudly otherwise.

mod common;

use common::*;
#[path = "common/ota_rauc_rig.rs"]
mod ota_rauc_rig;

use ota_rauc_rig::*;

#[test]
fn rauc_refuses_a_foreign_bundle_then_installs_commits_and_rolls_back() {
    if cannot_run() {
        return;
    }
    let mut rig = Rig::new();
    std::fs::write(rig.path("healthy"), "").unwrap();
    rig.start_rauc("A");
    let mut d = start(&rig);
    let st = rig.status();
    assert_eq!(st["backend"], "rauc");
    assert_eq!(st["booted_slot"], "A");
    assert_eq!(st["state"], "idle");

    // Signed by a CA outside RAUC's keyring: refused in verifying, before
    // RAUC writes anything.
    let evil = rig.bundle("evil", &[0xee; 50_000], "6.6.6", "evil");
    let out = rig.cli(&["ota", "install", evil.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = wait(&d, "-> failed");
    assert!(line.contains("RAUC refused the bundle"), "{line}");
    assert_eq!(
        std::fs::read(rig.path("B.img")).unwrap(),
        vec![b'b'; SLOT_SIZE]
    );
    assert!(
        !rig.bootstate().contains("primary=B"),
        "{}",
        rig.bootstate()
    );

    // A good bundle: RAUC writes B and makes it primary; we wait for the
    // reboot (no window configured: at once).
    let payload: Vec<u8> = (0..120_000u32).map(|i| (i % 253) as u8).collect();
    let good = rig.bundle("v2", &payload, "2.0.0", "ca");
    let out = rig.cli(&["ota", "install", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait(&d, "-> pending-reboot");
    wait(&d, "running the reboot command");
    eventually("the reboot command ran", || rig.reboots() == 1);
    assert_eq!(
        &std::fs::read(rig.path("B.img")).unwrap()[..payload.len()],
        &payload[..]
    );
    assert!(has(&rig.bootstate(), "primary=B"), "{}", rig.bootstate());
    let st = rig.status();
    assert_eq!(st["state"], "pending-reboot");
    assert_eq!(st["target_slot"], "B");
    assert_eq!(st["bootloader"]["primary"], "B");
    d.kill9();

    // Reboot into B: the gate passes, Mark good, verified via RAUC.
    rig.start_rauc("B");
    let mut d = start(&rig);
    wait(&d, "-> committed");
    let st = rig.status();
    assert_eq!(st["state"], "committed");
    assert_eq!(st["booted_slot"], "B");
    let slots = st["bootloader"]["slots"].as_array().unwrap();
    let b = slots.iter().find(|s| s["bootname"] == "B").unwrap();
    assert_eq!(b["state"], "booted");
    assert_eq!(b["boot_status"], "good");
    assert!(has(&rig.bootstate(), "B=good") && has(&rig.bootstate(), "primary=B"));

    // The next update fails its gate: marked bad via RAUC, A primary,
    // reboot at once.
    std::fs::remove_file(rig.path("healthy")).unwrap();
    std::fs::write(
        rig.path("edge.yaml"),
        std::fs::read_to_string(rig.path("edge.yaml"))
            .unwrap()
            .replace("commit_deadline: 20s", "commit_deadline: 1s"),
    )
    .unwrap();
    let v3: Vec<u8> = vec![0x33; 90_000];
    let b3 = rig.bundle("v3", &v3, "3.0.0", "ca");
    d.kill9();
    let mut d = start(&rig);
    let out = rig.cli(&["ota", "install", b3.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait(&d, "running the reboot command");
    assert_eq!(
        &std::fs::read(rig.path("A.img")).unwrap()[..v3.len()],
        &v3[..]
    );
    assert!(has(&rig.bootstate(), "primary=A"), "{}", rig.bootstate());
    d.kill9();
    rig.start_rauc("A");
    let mut d = start(&rig);
    let line = wait(&d, "-> rolled-back");
    assert!(line.contains("health gate failed"), "{line}");
    assert!(has(&rig.bootstate(), "primary=B"), "{}", rig.bootstate());
    assert!(has(&rig.bootstate(), "A=bad"), "{}", rig.bootstate());
    d.kill9();
}
