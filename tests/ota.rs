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
//! Host rollouts run against a real hub process (`konsul-edge hub`) and,
//! for rollouts that name a URL, a small test-side HTTP server that serves
//! Range and records what was asked for.
//!
//! Waits are on the daemon's own log lines (`ota: a -> b: ...`) with the
//! harness deadline; the only polling is for a file another process writes
//! (the reboot command's marker, the staged bundle's size).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use ring::signature::{Ed25519KeyPair, KeyPair};

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

// ---- host rollouts from a hub -------------------------------------------

/// A hub (`konsul-edge hub`) whose artifact store accepts images signed by
/// `fw_key` (a key of its own: the OTA manifest signature is separate).
fn start_hub(dir: &Path, fw_key: &Ed25519KeyPair) -> Daemon {
    std::fs::write(
        dir.join("edge.yaml"),
        format!(
            "node_id: hub\nstorage: {{path: {}}}\nhttp: {{listen: '127.0.0.1:0'}}\n\
             firmware: {{public_keys: ['{}'], max_upload_size: 8Mi}}\n",
            dir.join("hub.db").display(),
            konsul_edge::firmware::base64_encode(fw_key.public_key().as_ref()),
        ),
    )
    .unwrap();
    Daemon::start_hub(dir)
}

fn cloud(hub: &Daemon) -> String {
    format!(
        "cloud: {{server_address: 'http://{}', sync_interval: 1h}}\n",
        hub.addr
    )
}

/// Stores `data` in the hub's artifact store (signed for the store).
fn upload(hub: &Daemon, fw_key: &Ed25519KeyPair, data: &[u8]) {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let r = request(
        &hub.addr,
        "PUT",
        &format!(
            "/v1/edge/firmware?device_type=host&version=bundle-{}&sha256={}&signature={}",
            &hex(d.as_ref())[..8],
            hex(d.as_ref()),
            hex(fw_key.sign(d.as_ref()).as_ref())
        ),
        Some(data),
        &[],
    );
    assert_eq!(r.status, 201, "{}", r.text());
}

/// The manifest fields of `data` as `version`, signed with `key`.
fn manifest(key: &Ed25519KeyPair, data: &[u8], version: &str) -> serde_json::Value {
    let sha = sha256(data);
    let text = format!("konsul-ota-v1\n{version}\n{}\n{sha}\n", data.len());
    serde_json::json!({
        "version": version, "size": data.len(), "sha256": sha,
        "signature": hex(key.sign(text.as_bytes()).as_ref()),
    })
}

fn create_rollout(hub: &Daemon, spec: serde_json::Value) {
    let r = hub.req("POST", "/v1/edge/ota/rollouts", Some(&spec.to_string()));
    assert_eq!(r.status, 201, "{}", r.text());
}

/// Syncs the edge until the hub's view of `rollout` shows `node` as `pred`
/// wants it; returns that entry.
fn hub_sees(
    hub: &Daemon,
    edge: &Daemon,
    rollout: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut seen = None;
    eventually(&format!("the hub's view of rollout {rollout}"), || {
        assert_eq!(edge.req("POST", "/v1/edge/sync/now", None).status, 202);
        let r = hub.get(&format!("/v1/edge/ota/rollouts/{rollout}"));
        assert_eq!(r.status, 200, "{}", r.text());
        seen = r.json()["edge_states"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["node_id"] == "test-node" && pred(e))
            .cloned();
        seen.is_some()
    });
    seen.unwrap()
}

fn staged_len(rig: &Rig, id: &str) -> u64 {
    std::fs::metadata(rig.path(&format!("ota/{id}.bundle"))).map_or(0, |m| m.len())
}

/// A download server for rollouts that name a URL: serves `body` with
/// Range support, one thread per connection, and records each request's
/// Range header (None: a whole-entity GET).
struct Server {
    addr: String,
    ranges: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

impl Server {
    fn start(body: Vec<u8>) -> Server {
        use std::io::{BufRead, BufReader, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let ranges = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (body, seen) = (std::sync::Arc::new(body), ranges.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (body, seen) = (body.clone(), seen.clone());
                std::thread::spawn(move || {
                    let mut r = BufReader::new(s.try_clone().unwrap());
                    let mut range = None;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
                            range = Some(v.trim().to_string());
                        }
                    }
                    seen.lock().unwrap().push(range.clone());
                    let start: usize = range
                        .as_deref()
                        .and_then(|v| v.strip_prefix("bytes="))
                        .and_then(|v| v.strip_suffix('-'))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let n = body.len();
                    let head = if range.is_some() {
                        format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{n}\r\n",
                            n - 1
                        )
                    } else {
                        "HTTP/1.1 200 OK\r\n".to_string()
                    };
                    let mut s = s;
                    let _ = s.write_all(
                        format!(
                            "{head}Content-Length: {}\r\nConnection: close\r\n\r\n",
                            n - start
                        )
                        .as_bytes(),
                    );
                    // A killed client breaks the write: fine.
                    let _ = s.write_all(&body[start..]);
                });
            }
        });
        Server { addr, ranges }
    }

    fn url(&self) -> String {
        format!("http://{}/bundle.img", self.addr)
    }

    fn ranges(&self) -> Vec<Option<String>> {
        self.ranges.lock().unwrap().clone()
    }
}

/// A rollout defined on the hub (bundle in the hub's artifact store)
/// reaches the edge, which downloads, installs, reboots into and commits
/// it; the hub sees the committed outcome with log lines. Neither a
/// restart nor a newer rollout of the same version installs it again.
#[test]
fn hub_rollout_installs_commits_and_the_hub_sees_the_outcome() {
    if !have("fw_setenv") || !have("mkenvimage") {
        return;
    }
    let hub_dir = tempfile::tempdir().unwrap();
    let fw_key = keypair();
    let hub = start_hub(hub_dir.path(), &fw_key);
    let mut rig = Rig::with(Flavor::Uboot, "  commit_deadline: 20s\n", &cloud(&hub));
    rig.healthy(true);
    let data = new_image(0x5a, 300_000);
    upload(&hub, &fw_key, &data);
    let mut d = rig.start();
    let mut spec = manifest(&rig.key, &data, "2.0.0");
    spec["id"] = "r1".into();
    spec["edges"] = serde_json::json!(["test-node"]);
    create_rollout(&hub, spec);
    assert_eq!(d.req("POST", "/v1/edge/sync/now", None).status, 202);
    let line = wait(&d, "-> downloading");
    assert!(
        line.contains("rollout r1: version 2.0.0 from http://"),
        "{line}"
    );
    wait(&d, "-> pending-reboot");
    wait(&d, "running the reboot command");
    eventually("the reboot command ran", || rig.reboots() == 1);
    assert_eq!(rig.slot("B"), data);
    assert_eq!(rig.env()["BOOT_ORDER"], "B A");
    let st = ota(&d);
    assert_eq!(st["rollout"], "r1");
    assert_eq!(st["id"], "r1");
    assert_eq!(
        st["source"],
        format!("http://{}/v1/edge/firmware/{}", hub.addr, sha256(&data))
    );
    d.kill9();

    assert_eq!(rig.boot(), "B");
    let mut d = rig.start();
    wait(&d, "-> committed");
    assert!(d
        .get("/metrics")
        .text()
        .contains(",version=\"2.0.0\",rollout=\"r1\"} 1"));
    let seen = hub_sees(&hub, &d, "r1", |e| e["state"] == "committed");
    assert_eq!(seen["version"], "2.0.0");
    let log: Vec<&str> = seen["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap())
        .collect();
    assert!(
        log.iter().any(|m| m.contains("slot B committed")),
        "{log:?}"
    );
    assert!(log.iter().any(|m| m.contains("rollout r1")), "{log:?}");

    // A restart acts on nothing; a newer rollout of the committed version
    // is adopted, not installed.
    d.kill9();
    let d = rig.start();
    let mut spec = manifest(&rig.key, &data, "2.0.0");
    spec["id"] = "r1-again".into();
    create_rollout(&hub, spec);
    assert_eq!(d.req("POST", "/v1/edge/sync/now", None).status, 202);
    wait(&d, "rollout r1-again: version 2.0.0 is already committed");
    let st = ota(&d);
    assert_eq!(
        (st["state"].as_str(), st["rollout"].as_str()),
        (Some("committed"), Some("r1-again"))
    );
    hub_sees(&hub, &d, "r1-again", |e| e["state"] == "committed");
    assert_eq!(rig.reboots(), 1);
    assert_eq!(rig.slot("A"), vec![OLD_A; SLOT_SIZE]);
}

/// kill -9 mid-download (the cap keeps it slow): the restarted edge asks
/// the server only for the rest (`Range: bytes={staged length}-`), and the
/// installed image is whole.
#[test]
fn hub_rollout_download_resumes_with_range_after_kill_9() {
    if !have("fw_setenv") || !have("mkenvimage") {
        return;
    }
    let hub_dir = tempfile::tempdir().unwrap();
    let hub = start_hub(hub_dir.path(), &keypair());
    let rig = Rig::with(Flavor::Uboot, "  download_rate: 64Ki\n", &cloud(&hub));
    let data = new_image(0x3c, 256 << 10);
    let server = Server::start(data.clone());
    let mut d = rig.start();
    let mut spec = manifest(&rig.key, &data, "2.1.0");
    spec["id"] = "slow".into();
    spec["url"] = server.url().into();
    create_rollout(&hub, spec);
    assert_eq!(d.req("POST", "/v1/edge/sync/now", None).status, 202);
    wait(&d, "-> downloading");
    eventually("part of the bundle downloaded", || {
        staged_len(&rig, "slow") >= 48 << 10
    });
    // The operator sees the download advance, not 0 % until it is done.
    let st = ota(&d);
    let pct = st["progress"].as_u64().unwrap();
    assert!((15..100).contains(&pct), "{st}");
    assert!(
        st["phase"].as_str().unwrap().starts_with("downloading"),
        "{st}"
    );
    d.kill9();
    let part = staged_len(&rig, "slow");
    assert!(part < data.len() as u64, "finished before the cut: {part}");
    assert_eq!(rig.slot("B"), vec![OLD_B; SLOT_SIZE], "nothing written yet");

    let d = rig.start();
    let line = wait(&d, "resuming at byte");
    assert!(
        line.ends_with(&format!("resuming at byte {part}")),
        "{line}"
    );
    wait(&d, "-> pending-reboot");
    assert_eq!(&rig.slot("B")[..], &data[..]);
    assert_eq!(
        server.ranges(),
        vec![None, Some(format!("bytes={part}-"))],
        "one whole GET, then only the rest"
    );
    assert_eq!(ota(&d)["source"], server.url());
}

/// A rollout whose signature does not verify is refused before anything
/// is fetched; one whose bundle does not match its digest fails in
/// verifying. Neither touches a slot or the bootloader, and the hub sees
/// both failures with the reason.
#[test]
fn hub_rollouts_with_a_bad_signature_or_digest_are_refused_and_reported() {
    if !have("fw_setenv") || !have("mkenvimage") {
        return;
    }
    let hub_dir = tempfile::tempdir().unwrap();
    let hub = start_hub(hub_dir.path(), &keypair());
    let rig = Rig::with(Flavor::Uboot, "", &cloud(&hub));
    let data = new_image(0x19, 50_000);
    let mut evil = data.clone();
    evil[4242] ^= 0xff;
    let server = Server::start(evil);
    let d = rig.start();

    let mut spec = manifest(&keypair(), &data, "6.6.6");
    spec["id"] = "forged".into();
    spec["url"] = server.url().into();
    spec["edges"] = serde_json::json!(["test-node"]);
    create_rollout(&hub, spec);
    assert_eq!(d.req("POST", "/v1/edge/sync/now", None).status, 202);
    let line = wait(&d, "-> failed");
    assert!(line.contains("rollout forged refused"), "{line}");
    let seen = hub_sees(&hub, &d, "forged", |e| e["state"] == "failed");
    assert!(
        seen["last_error"].as_str().unwrap().contains("signature"),
        "{seen}"
    );
    assert!(server.ranges().is_empty(), "nothing was downloaded");

    let mut spec = manifest(&rig.key, &data, "2.0.0");
    spec["id"] = "tampered".into();
    spec["url"] = server.url().into();
    create_rollout(&hub, spec);
    assert_eq!(d.req("POST", "/v1/edge/sync/now", None).status, 202);
    wait(&d, "-> downloading");
    let line = wait(&d, "-> failed");
    assert!(line.contains("digest mismatch"), "{line}");
    let seen = hub_sees(&hub, &d, "tampered", |e| e["state"] == "failed");
    assert!(
        seen["last_error"]
            .as_str()
            .unwrap()
            .contains("digest mismatch"),
        "{seen}"
    );
    assert_eq!(rig.slot("A"), vec![OLD_A; SLOT_SIZE]);
    assert_eq!(rig.slot("B"), vec![OLD_B; SLOT_SIZE]);
    let env = rig.env();
    assert_eq!(env["BOOT_ORDER"], "A B");
    assert_eq!(env["BOOT_B_LEFT"], "3");
    assert!(!env.contains_key("upgrade_available"), "{env:?}");
    assert_eq!(rig.reboots(), 0);
    assert_eq!(staged_len(&rig, "tampered"), 0, "the bad bundle is removed");
    // The hub's view of the first one: the edge reports only its current
    // deployment, so it shows as moved on, to which.
    let r = hub.get("/v1/edge/ota/rollouts/forged").json();
    let e = &r["edge_states"][0];
    assert_eq!(
        (e["state"].as_str(), e["latest"]["rollout"].as_str()),
        (Some("moved-on"), Some("tampered")),
        "{r}"
    );
}

/// An edge that was down when the rollouts were created gets them by sync
/// when it comes back, and acts on the newest one that targets it (a
/// newer one for another edge is not its business). GRUB this time.
#[test]
fn an_edge_offline_when_a_rollout_is_created_gets_it_after_reconnecting() {
    if !have("grub-editenv") {
        return;
    }
    let hub_dir = tempfile::tempdir().unwrap();
    let fw_key = keypair();
    let hub = start_hub(hub_dir.path(), &fw_key);
    let rig = Rig::with(Flavor::Grub, "", &cloud(&hub));
    let mut d = rig.start();
    // Synced once (the hub knows this edge), then offline.
    assert_eq!(d.req("POST", "/v1/edge/sync/now", None).status, 202);
    assert_eq!(d.stop().code(), Some(0));

    let data = new_image(0x61, 120_000);
    upload(&hub, &fw_key, &data);
    let mut spec = manifest(&rig.key, &data, "3.0.0");
    spec["id"] = "fleet".into();
    create_rollout(&hub, spec);
    let other = new_image(0x62, 1000);
    let mut spec = manifest(&rig.key, &other, "3.0.1");
    spec["id"] = "elsewhere".into();
    spec["url"] = "http://127.0.0.1:9/never.img".into();
    spec["edges"] = serde_json::json!(["other-node"]);
    create_rollout(&hub, spec);

    let d = rig.start();
    let line = wait(&d, "-> downloading");
    assert!(line.contains("rollout fleet"), "{line}");
    wait(&d, "running the reboot command");
    assert_eq!(&rig.slot("B")[..], &data[..]);
    assert_eq!(rig.env()["ORDER"], "B A");
    hub_sees(&hub, &d, "fleet", |e| e["state"] == "pending-reboot");
    let r = hub.get("/v1/edge/ota/rollouts/elsewhere").json();
    assert_eq!(
        r["edge_states"],
        serde_json::json!([{"node_id": "other-node", "state": "pending"}])
    );
    assert_eq!(ota(&d)["rollout"], "fleet");
}
