//! A/B OTA against the real bootloader tools: `fw_setenv`/`fw_printenv`
//! (libubootenv or u-boot-tools) on a file-backed U-Boot environment made
//! with `mkenvimage`, and `grub-editenv` on a grubenv file. Slots are image
//! files.
//!
//! Reboots are simulated: the test kills the daemon (SIGKILL = power cut),
//! runs the bootloader's selection logic on the real environment (the
//! RAUC-convention boot scripts, see `Rig::boot`), writes the kernel
//! command line (`rauc.slot=X`) and a fresh boot id to the files the daemon
//! reads, and starts the daemon again. A daemon restart *without* a new
//! boot id is a crash (systemd restarting it).
//!
//! Host rollouts from a hub are in tests/ota_hub.rs.
//!
//! Waits are on the daemon's own log lines (`ota: a -> b: ...`) with the
//! harness deadline; the only polling is for a file another process writes
//! (the reboot command's marker, the staged bundle's size).

mod common;

use std::process::Command;

use common::*;

#[path = "common/ota_rig.rs"]
mod ota_rig;

use ota_rig::*;

/// Install -> reboot -> gate passes -> committed, verified in the real
/// U-Boot environment; hub report and metrics follow.
#[test]
fn uboot_install_reboot_and_commit() {
    if !have("fw_setenv") || !have("mkenvimage") {
        return;
    }
    let mut rig = Rig::new(Flavor::Uboot, "  commit_deadline: 20s\n");
    rig.healthy(true);
    let data = new_image(0x5a, 300_000);
    let img = rig.image("v2.img", &data, "2.0.0", None);
    let mut d = rig.start();
    assert_eq!(ota(&d)["state"], "idle");
    assert_eq!(ota(&d)["booted_slot"], "A");
    let r = install(&d, &img);
    assert_eq!(r.status, 200, "{}", r.text());
    wait(&d, "-> pending-reboot");
    wait(&d, "running the reboot command");
    eventually("the reboot command ran", || rig.reboots() == 1);
    // The image is in B, B boots next (once per try), A is untouched.
    assert_eq!(&rig.slot("B")[..data.len()], &data[..]);
    assert_eq!(rig.slot("B").len(), data.len());
    assert_eq!(rig.slot("A"), vec![OLD_A; SLOT_SIZE]);
    let env = rig.env();
    assert_eq!(env["BOOT_ORDER"], "B A");
    assert_eq!(env["BOOT_B_LEFT"], "3");
    assert_eq!(env["upgrade_available"], "1");
    let st = ota(&d);
    assert_eq!(st["state"], "pending-reboot");
    assert_eq!(st["target_slot"], "B");
    assert_eq!(st["version"], "2.0.0");
    d.kill9();

    assert_eq!(rig.boot(), "B");
    assert_eq!(rig.env()["BOOT_B_LEFT"], "2");
    let d = rig.start();
    wait(&d, "-> committed");
    let env = rig.env();
    assert_eq!(env["BOOT_ORDER"], "B A");
    assert_eq!(env["BOOT_B_LEFT"], "3", "counter refilled on commit");
    assert_eq!(env["upgrade_available"], "0");
    let st = ota(&d);
    assert_eq!(st["state"], "committed");
    assert_eq!(st["booted_slot"], "B");
    assert_eq!(st["bootloader"]["upgrade_available"], "0");
    let log: Vec<String> = st["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["state"].as_str().unwrap().to_string())
        .collect();
    for s in [
        "downloading",
        "verifying",
        "installing",
        "pending-reboot",
        "booted-pending-commit",
        "committed",
    ] {
        assert!(log.iter().any(|l| l == s), "{s} missing from {log:?}");
    }
    let metrics = d.get("/metrics").text();
    assert!(
        metrics.contains("konsul_edge_ota_state{state=\"committed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("konsul_edge_ota_state{state=\"idle\"} 0"));
    // The outcome is a replicated record for the hub.
    let outbox = d.get("/v1/edge/status").json();
    assert!(outbox["outbox_pending"].as_u64().unwrap() >= 1);
    assert_eq!(rig.reboots(), 1, "no reboot after a commit");
}

/// A failing gate marks the new slot bad and reboots into the old one at
/// once; the rolled-back deployment does not block the next update.
#[test]
fn uboot_failing_gate_rolls_back_and_later_updates_still_install() {
    if !have("fw_setenv") || !have("mkenvimage") {
        return;
    }
    let mut rig = Rig::new(Flavor::Uboot, "  commit_deadline: 1s\n");
    rig.healthy(false);
    let data = new_image(0x33, 100_000);
    let img = rig.image("v2.img", &data, "2.0.0", None);
    let mut d = rig.start();
    assert_eq!(install(&d, &img).status, 200);
    wait(&d, "running the reboot command");
    // The command runs in its own process after the log line: the reboot
    // has happened once it has written, not when the daemon says so.
    eventually("the reboot command ran", || rig.reboots() == 1);
    d.kill9();
    assert_eq!(rig.boot(), "B");
    let mut d = rig.start();
    let line = wait(&d, "-> rolled-back");
    assert!(line.contains("health gate failed"), "{line}");
    eventually("the rollback reboot", || rig.reboots() == 2);
    let env = rig.env();
    assert_eq!(env["BOOT_ORDER"], "A B");
    assert_eq!(env["BOOT_B_LEFT"], "0");
    assert_eq!(env["upgrade_available"], "0");
    assert!(ota(&d)["last_error"].as_str().unwrap().contains("test -e"));
    d.kill9();

    assert_eq!(rig.boot(), "A");
    let d = rig.start();
    let st = ota(&d);
    assert_eq!(st["state"], "rolled-back");
    assert_eq!(st["booted_slot"], "A");
    // Not stuck: a new update is accepted and goes through.
    rig.healthy(true);
    let data3 = new_image(0x44, 50_000);
    let img3 = rig.image("v3.img", &data3, "3.0.0", None);
    assert_eq!(install(&d, &img3).status, 200);
    wait(&d, "-> pending-reboot");
    assert_eq!(&rig.slot("B")[..], &data3[..]);
    assert_eq!(rig.env()["BOOT_ORDER"], "B A");
}

/// Power cuts during the gate are not failures (the bootloader counter is
/// refilled once the daemon runs, and reboots count only against the
/// larger limit); daemon crashes within one boot are, and
/// `boot_attempts` of them roll back.
#[test]
fn uboot_power_cycles_do_not_roll_back_but_a_crash_loop_does() {
    if !have("fw_setenv") || !have("mkenvimage") {
        return;
    }
    let mut rig = Rig::new(
        Flavor::Uboot,
        "  commit_deadline: 60s\n  boot_attempts: 2\n",
    );
    rig.healthy(false);
    let data = new_image(0x21, 64_000);
    let img = rig.image("v2.img", &data, "2.0.0", None);
    let mut d = rig.start();
    assert_eq!(install(&d, &img).status, 200);
    wait(&d, "running the reboot command");
    eventually("the reboot command ran", || rig.reboots() == 1);
    d.kill9();
    assert_eq!(rig.env()["BOOT_B_LEFT"], "2");

    // First boot of B: the gate starts; power cut.
    assert_eq!(rig.boot(), "B");
    let mut d = rig.start();
    wait(&d, "health gate started");
    d.kill9();
    // The daemon crashed (same boot): crash 1 of 2.
    let mut d = rig.start();
    wait(&d, "crash 1 of 2");
    wait(&d, "health gate started");
    d.kill9();
    // Three quick power cycles: more than the bootloader's 2 tries, yet
    // B keeps booting and nothing rolls back.
    for n in 1..=3 {
        assert_eq!(rig.boot(), "B", "power cycle {n}");
        let mut d = rig.start();
        wait(&d, "not counted as a failure");
        wait(&d, "health gate started");
        assert_eq!(ota(&d)["state"], "booted-pending-commit");
        assert_eq!(
            rig.env()["BOOT_B_LEFT"],
            "2",
            "refilled by the running daemon"
        );
        d.kill9();
    }
    assert_eq!(rig.reboots(), 1);
    // A second crash in one boot: the crash loop rolls back.
    let mut d = rig.start();
    let line = wait(&d, "-> rolled-back");
    assert!(line.contains("crashed 2 times"), "{line}");
    eventually("the rollback reboot", || rig.reboots() == 2);
    assert_eq!(rig.env()["BOOT_ORDER"], "A B");
    let metrics = d.get("/metrics").text();
    assert!(
        metrics.contains("konsul_edge_ota_gate_interrupted_boots 3"),
        "{metrics}"
    );
    d.kill9();
    assert_eq!(rig.boot(), "A");
}

/// kill -9 while the bundle is being copied (bandwidth-capped) and again
/// right as the install starts: the copy resumes, the install restarts,
/// and at no moment does the bootloader point at a partly written slot.
#[test]
fn uboot_power_loss_during_download_and_install() {
    if !have("fw_setenv") || !have("mkenvimage") {
        return;
    }
    let mut rig = Rig::new(Flavor::Uboot, "  download_rate: 256Ki\n");
    rig.healthy(true);
    let data = new_image(0x77, 1 << 20);
    let img = rig.image("v2.img", &data, "2.0.0", None);
    let mut d = rig.start();
    assert_eq!(install(&d, &img).status, 200);
    wait(&d, "-> downloading");
    let staged = || -> u64 {
        std::fs::read_dir(rig.path("ota"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "bundle"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum()
    };
    eventually("part of the bundle staged", || staged() > 64 * 1024);
    d.kill9();
    let part = staged();
    assert!(
        part < data.len() as u64,
        "copy finished before the cut: {part}"
    );
    assert_eq!(rig.slot("B"), vec![OLD_B; SLOT_SIZE], "nothing written yet");
    assert_eq!(rig.env()["BOOT_ORDER"], "A B");

    let mut d = rig.start();
    let line = wait(&d, "resuming the copy");
    let at: u64 = line
        .rsplit("at byte ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(at > 0, "{line}");
    wait(&d, "install attempt 1");
    d.kill9();
    // Whatever the cut interrupted, B is only bootable when complete.
    let env = rig.env();
    if env["BOOT_ORDER"].starts_with('B') && env["BOOT_B_LEFT"] != "0" {
        assert_eq!(&rig.slot("B")[..], &data[..]);
    }

    let mut d = rig.start();
    wait(&d, "running the reboot command");
    assert_eq!(&rig.slot("B")[..], &data[..]);
    assert_eq!(rig.env()["BOOT_ORDER"], "B A");
    assert_eq!(rig.env()["upgrade_available"], "1");
    d.kill9();
    assert_eq!(rig.boot(), "B");
    let d = rig.start();
    wait(&d, "-> committed");
}

/// A manifest signed by another key is refused by the request itself; an
/// image that does not match its (validly signed) digest fails in
/// verifying. Neither touches a slot or the environment.
#[test]
fn bad_signature_and_bad_digest_are_refused_before_anything_is_written() {
    if !have("fw_setenv") || !have("mkenvimage") {
        return;
    }
    let rig = Rig::new(Flavor::Uboot, "");
    let d = rig.start();

    let other = keypair();
    let data = new_image(0x11, 10_000);
    let img = rig.image("evil.img", &data, "6.6.6", Some(&other));
    let r = install(&d, &img);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("signature"), "{}", r.text());
    assert_eq!(
        ota(&d)["state"],
        "idle",
        "a refused request changes nothing"
    );

    let img = rig.image("tampered.img", &data, "2.0.0", None);
    let mut evil = data.clone();
    evil[100] ^= 0xff;
    std::fs::write(&img, &evil).unwrap();
    assert_eq!(install(&d, &img).status, 200);
    let line = wait(&d, "-> failed");
    assert!(line.contains("digest mismatch"), "{line}");
    assert_eq!(rig.slot("B"), vec![OLD_B; SLOT_SIZE]);
    assert_eq!(rig.slot("A"), vec![OLD_A; SLOT_SIZE]);
    // (BOOT_A_LEFT is refilled for the booted, committed slot at start.)
    let env = rig.env();
    assert_eq!(env["BOOT_ORDER"], "A B");
    assert_eq!(env["BOOT_B_LEFT"], "3");
    assert!(!env.contains_key("upgrade_available"), "{env:?}");
    assert_eq!(rig.reboots(), 0);
    // Relative paths and missing files are refused too.
    assert_eq!(
        d.req("POST", "/v1/edge/ota/install", Some(r#"{"path":"x.img"}"#))
            .status,
        400
    );
}

/// GRUB: the same flow on a grubenv file: commit, then a second update
/// whose gate fails rolls back to the committed slot.
#[test]
fn grub_commit_then_rollback() {
    if !have("grub-editenv") {
        return;
    }
    let mut rig = Rig::new(Flavor::Grub, "  commit_deadline: 1s\n");
    rig.healthy(true);
    let data = new_image(0x42, 80_000);
    let img = rig.image("v2.img", &data, "2.0.0", None);
    let mut d = rig.start();
    assert_eq!(install(&d, &img).status, 200);
    wait(&d, "running the reboot command");
    let env = rig.env();
    assert_eq!(env["ORDER"], "B A");
    assert_eq!((env["B_OK"].as_str(), env["B_TRY"].as_str()), ("1", "0"));
    d.kill9();
    assert_eq!(rig.boot(), "B");
    assert_eq!(rig.env()["B_TRY"], "1");
    let mut d = rig.start();
    wait(&d, "-> committed");
    let env = rig.env();
    assert_eq!(
        (
            env["ORDER"].as_str(),
            env["B_OK"].as_str(),
            env["B_TRY"].as_str()
        ),
        ("B A", "1", "0")
    );
    d.kill9();
    // An ordinary reboot of the committed slot: GRUB sets B_TRY=1, the
    // daemon clears it again (otherwise the next boot would fall back).
    assert_eq!(rig.boot(), "B");
    let mut d = rig.start();
    eventually("B_TRY cleared", || rig.env()["B_TRY"] == "0");

    rig.healthy(false);
    let data3 = new_image(0x43, 70_000);
    let img3 = rig.image("v3.img", &data3, "3.0.0", None);
    assert_eq!(install(&d, &img3).status, 200);
    wait(&d, "running the reboot command");
    assert_eq!(&rig.slot("A")[..], &data3[..]);
    assert_eq!(rig.env()["ORDER"], "A B");
    d.kill9();
    assert_eq!(rig.boot(), "A");
    let mut d = rig.start();
    wait(&d, "-> rolled-back");
    let env = rig.env();
    assert_eq!((env["ORDER"].as_str(), env["A_OK"].as_str()), ("B A", "0"));
    d.kill9();
    assert_eq!(rig.boot(), "B");
    let d = rig.start();
    assert_eq!(ota(&d)["state"], "rolled-back");
    assert_eq!(ota(&d)["booted_slot"], "B");
}

/// Outside the maintenance window the installed update waits (no reboot);
/// the operator's `konsul-edge ota reboot` over D-Bus reboots anyway.
/// `mark-good` with nothing to commit is refused.
#[test]
fn reboot_waits_for_the_window_unless_the_operator_asks() {
    if !have("fw_setenv") || !have("mkenvimage") || !have("dbus-daemon") {
        return;
    }
    let bus_dir = tempfile::tempdir().unwrap();
    let (mut bus, address) = private_bus(bus_dir.path());
    let window = window_two_hours_ahead();
    let rig = Rig::with(
        Flavor::Uboot,
        &format!("  maintenance_window: \"{window}\"\n"),
        &format!("dbus:\n  enabled: true\n  bus: \"{address}\"\n"),
    );
    let data = new_image(0x66, 40_000);
    let img = rig.image("v2.img", &data, "2.0.0", None);
    let d = rig.start();
    let cli = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .args(["--bus", &address])
            .output()
            .unwrap()
    };
    let out = cli(&["ota", "mark-good"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing to commit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["ota", "install", img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait(&d, "-> pending-reboot");
    wait(&d, "reboot deferred: outside the maintenance window");
    assert_eq!(rig.reboots(), 0);
    let st = ota(&d);
    assert_eq!(st["state"], "pending-reboot");
    assert!(st["phase"].as_str().unwrap().contains(&window), "{st}");
    let text = String::from_utf8_lossy(&cli(&["ota", "status"]).stdout).into_owned();
    assert!(text.contains("pending-reboot"), "{text}");
    let out = cli(&["ota", "reboot"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait(&d, "reboot requested by the operator");
    wait(&d, "running the reboot command");
    eventually("the reboot command ran", || rig.reboots() == 1);
    drop(d);
    let _ = bus.kill();
    let _ = bus.wait();
}

/// A local install that supersedes an update awaiting its reboot cancels
/// that update first: when the new one then fails, the bootloader is back
/// on the booted slot instead of set to boot an update nothing tracks.
#[test]
fn a_superseding_install_that_fails_leaves_the_booted_slot_primary() {
    if !have("fw_setenv") || !have("mkenvimage") {
        return;
    }
    // The first update waits for its reboot.
    let window = window_two_hours_ahead();
    let rig = Rig::new(
        Flavor::Uboot,
        &format!("  maintenance_window: \"{window}\"\n"),
    );
    let d = rig.start();
    let v2 = new_image(0x21, 30_000);
    let img = rig.image("v2.img", &v2, "2.0.0", None);
    assert_eq!(install(&d, &img).status, 200);
    wait(&d, "reboot deferred: outside the maintenance window");
    assert_eq!(rig.env()["BOOT_ORDER"], "B A", "v2 is set to boot next");

    let v3 = new_image(0x31, 30_000);
    let img = rig.image("v3.img", &v3, "3.0.0", None);
    let mut tampered = v3.clone();
    tampered[7] ^= 0xff;
    std::fs::write(&img, &tampered).unwrap();
    let r = install(&d, &img);
    assert_eq!(r.status, 200, "{}", r.text());
    let line = wait(&d, "(cancels ");
    assert!(line.contains("2.0.0"), "names the cancelled update: {line}");
    let line = wait(&d, "-> failed");
    assert!(line.contains("digest mismatch"), "{line}");
    let env = rig.env();
    assert_eq!(env["BOOT_ORDER"], "A B", "{env:?}");
    assert_eq!(env["BOOT_B_LEFT"], "0", "{env:?}");
    assert_eq!(rig.reboots(), 0);
    assert_eq!(ota(&d)["state"], "failed");
}

/// A command line that names no slot: the coordinator keeps retrying and
/// refuses installs meanwhile (nothing would drive them), instead of
/// accepting a deployment that could never end.
#[test]
fn unknown_booted_slot_refuses_installs() {
    if !have("fw_setenv") || !have("mkenvimage") {
        return;
    }
    let rig = Rig::new(Flavor::Uboot, "");
    std::fs::write(rig.path("cmdline"), "console=ttyS0 root=/dev/sda2\n").unwrap();
    let d = Daemon::start(rig.dir.path());
    wait(&d, "cannot tell the booted slot");
    let img = rig.image("v2.img", &new_image(1, 1000), "2.0.0", None);
    let r = install(&d, &img);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("booted slot is not known"),
        "{}",
        r.text()
    );
    let st = ota(&d);
    assert_eq!(st["state"], "idle");
    assert!(
        st["phase"]
            .as_str()
            .unwrap()
            .contains("booted slot unknown"),
        "{st}"
    );
    assert_eq!(rig.slot("B"), vec![OLD_B; SLOT_SIZE]);
}
