//! The hawkBit DDI client against a real DDI server, gooseBit from PyPI
//! (tests/common/goosebit.rs), driving the RAUC backend on Debian's real
//! `rauc service` (tests/common/ota_rauc_rig.rs: private bus, slots as
//! image files, simulated reboots), and the GRUB backend with our signed
//! image packed as a `.swu` (real `grub-editenv`, tests/common/ota_rig.rs;
//! the archive made by GNU `cpio -H newc`, as SWUpdate's docs make one).
//! Software is uploaded to gooseBit and assigned through its REST API;
//! what gooseBit shows is read back there.
//!
//! Skips loudly without KONSUL_TEST_GOOSEBIT (scripts/test.sh sets it) or
//! without what the RAUC rig needs (root, loop devices).

mod common;

use std::time::Duration;

use common::*;
#[path = "common/goosebit.rs"]
mod goosebit;
#[path = "common/ota_rauc_rig.rs"]
mod ota_rauc_rig;
#[path = "common/ota_rig.rs"]
mod ota_rig;

use goosebit::Goosebit;
use ota_rauc_rig::*;

const NODE: &str = "test-node";
/// A reboot, a gate and a server outage fit in this.
const LONG: Duration = Duration::from_secs(60);

/// The RAUC rig with the DDI client pointed at a fresh gooseBit.
fn setup(extra_ota: &str) -> Option<(Rig, Goosebit)> {
    let python = goosebit::python()?;
    if cannot_run() {
        return None;
    }
    let rig = Rig::new();
    let g = Goosebit::start(&python, &rig.path("goosebit"));
    let cfg = std::fs::read_to_string(rig.path("edge.yaml"))
        .unwrap()
        .replace("ota:\n", &format!("ota:\n{extra_ota}"));
    std::fs::write(
        rig.path("edge.yaml"),
        format!(
            "{cfg}hawkbit:\n  server: {}\n  tenant: DEFAULT\n  poll_floor: 1s\n",
            g.url()
        ),
    )
    .unwrap();
    Some((rig, g))
}

fn wait_long(d: &Daemon, what: &str) -> String {
    let end = std::time::Instant::now() + LONG;
    loop {
        if let Some(l) = d.wait_log(|l| l.contains(what)) {
            return l;
        }
        assert!(
            std::time::Instant::now() < end,
            "no log line containing `{what}` in {LONG:?}"
        );
    }
}

fn state_is(g: &Goosebit, want: &str) -> bool {
    g.state(NODE) == want
}

/// (a) + (d): a bundle assigned in gooseBit installs; gooseBit still shows
/// it running (not finished) while the node waits for its reboot; the
/// server then goes down, the node reboots into the new slot, the gate
/// passes and the `closed`+`success` feedback waits in the outbox (with
/// backoff) until the server is back; only then does gooseBit show it
/// finished, with the version from the new slot.
#[test]
fn goosebit_shows_success_only_after_the_gate_and_feedback_survives_an_outage() {
    let Some((mut rig, mut g)) = setup("") else {
        return;
    };
    std::fs::write(rig.path("healthy"), "").unwrap();
    rig.start_rauc("A");
    let mut d = start(&rig);
    wait_long(&d, "hawkbit: configData sent");
    eventually("gooseBit registered the node", || {
        state_is(&g, "registered")
    });

    let payload: Vec<u8> = (0..120_000u32).map(|i| (i % 251) as u8).collect();
    let bundle = rig.bundle("v2", &payload, "2.0.0", "ca");
    let sw = g.upload(&bundle);
    g.assign(NODE, sw, false);
    wait_long(&d, &format!("hawkbit: action {sw}:"));
    wait_long(&d, "-> pending-reboot");
    wait_long(&d, "running the reboot command");
    assert_eq!(
        &std::fs::read(rig.path("B.img")).unwrap()[..payload.len()],
        &payload[..]
    );
    // The install's `proceeding` reached gooseBit; no success before the
    // reboot and the gate.
    wait_for("gooseBit sees the update running", LONG, || {
        state_is(&g, "running").then_some(())
    });
    let st = rig.status();
    assert_eq!(st["hawkbit"]["action"], sw.to_string(), "{st}");
    assert_eq!(st["external"], format!("hawkbit:{sw}"), "{st}");
    d.kill9();

    // Reboot into B with the server down: the gate commits, the feedback
    // is kept and retried.
    g.stop();
    rig.start_rauc("B");
    let mut d = start(&rig);
    wait_long(&d, "-> committed");
    wait_long(&d, "hawkbit: feedback not delivered");
    eventually("the closed feedback waits, alone, in the outbox", || {
        rig.status()["hawkbit"]["feedback_pending"] == 1
    });
    // Also across a restart of the node.
    d.kill9();
    let d = start(&rig);
    g.resume();
    wait_long(
        &d,
        &format!("closed feedback for deploymentBase/{sw} delivered"),
    );
    assert_eq!(g.state(NODE), "finished");
    let dev = g.device(NODE);
    assert_eq!(dev["sw_version"], "2.0.0", "{dev}");
    let log = g.device_log(NODE);
    assert!(
        log.contains("health gate passed: slot B committed; running version 2.0.0 on slot B"),
        "{log}"
    );
    let st = rig.status();
    assert_eq!(st["hawkbit"]["feedback_pending"], 0, "{st}");
    assert!(
        d.metric("konsul_edge_hawkbit_feedback_sent_total")
            .unwrap_or(0)
            >= 1,
        "the delivered feedback is counted"
    );
}

/// (b): the new slot fails its health gate: rolled back, and gooseBit
/// shows the failure with the coordinator's log lines.
#[test]
fn a_failed_gate_rolls_back_and_goosebit_shows_the_failure_with_details() {
    let Some((mut rig, g)) = setup("") else {
        return;
    };
    // No `healthy` file: the gate's check fails.
    let cfg = std::fs::read_to_string(rig.path("edge.yaml"))
        .unwrap()
        .replace("commit_deadline: 20s", "commit_deadline: 1s");
    std::fs::write(rig.path("edge.yaml"), cfg).unwrap();
    rig.start_rauc("A");
    let mut d = start(&rig);
    wait_long(&d, "hawkbit: configData sent");
    let bundle = rig.bundle("v2", &[0x22; 80_000], "2.0.0", "ca");
    let sw = g.upload(&bundle);
    g.assign(NODE, sw, false);
    wait_long(&d, "running the reboot command");
    d.kill9();
    rig.start_rauc("B");
    let mut d = start(&rig);
    wait_long(&d, "-> rolled-back");
    d.kill9();
    rig.start_rauc("A");
    let d = start(&rig);
    wait_long(
        &d,
        &format!("closed feedback for deploymentBase/{sw} delivered"),
    );
    assert_eq!(g.state(NODE), "error");
    let log = g.device_log(NODE);
    assert!(log.contains("rolled-back"), "{log}");
    assert!(log.contains("health gate failed"), "{log}");
}

/// (c): a bundle signed outside RAUC's keyring, then a download whose
/// digest does not match what gooseBit announced: both refused before any
/// slot write, both reported as failures. The operator then fixes the file
/// and forces the same software again (gooseBit's action id is the
/// software's): a new attempt, which installs.
#[test]
fn a_bad_digest_or_signature_is_refused_before_any_slot_write() {
    let Some((mut rig, g)) = setup("") else {
        return;
    };
    rig.start_rauc("A");
    let d = start(&rig);
    wait_long(&d, "hawkbit: configData sent");
    let evil = rig.bundle("evil", &[0xee; 50_000], "6.6.6", "evil");
    let sw_evil = g.upload(&evil);
    g.assign(NODE, sw_evil, false);
    let line = wait_long(&d, &format!("hawkbit: action {sw_evil} failed"));
    assert!(line.contains("RAUC refused the bundle"), "{line}");
    wait_long(
        &d,
        &format!("closed feedback for deploymentBase/{sw_evil} delivered"),
    );
    assert_eq!(g.state(NODE), "error");

    let payload = [0x22; 80_000];
    let bundle = rig.bundle("v2", &payload, "2.0.0", "ca");
    let sw = g.upload(&bundle);
    // The stored file changes after gooseBit took its sha1.
    let stored = g.artifact("v2.raucb");
    let good = std::fs::read(&stored).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    std::fs::write(&stored, &bad).unwrap();
    g.assign(NODE, sw, true);
    let line = wait_long(&d, &format!("hawkbit: action {sw} failed"));
    assert!(line.contains("digest mismatch"), "{line}");
    wait_long(
        &d,
        &format!("closed feedback for deploymentBase/{sw} delivered"),
    );
    assert_eq!(g.state(NODE), "error");
    assert!(g.device_log(NODE).contains("digest mismatch"));
    assert_eq!(
        std::fs::read(rig.path("B.img")).unwrap(),
        vec![b'b'; SLOT_SIZE],
        "no slot was written"
    );
    assert!(
        !rig.bootstate().contains("primary=B"),
        "{}",
        rig.bootstate()
    );

    std::fs::write(&stored, &good).unwrap();
    g.assign(NODE, sw, true);
    wait_long(&d, &format!("hawkbit: action {sw} offered again"));
    wait_long(&d, "-> pending-reboot");
    assert_eq!(
        &std::fs::read(rig.path("B.img")).unwrap()[..payload.len()],
        &payload[..]
    );
}

/// (e): kill -9 in the middle of a rate-capped download; after the
/// restart it resumes from the partial file with a Range request and the
/// install completes.
#[test]
fn a_download_killed_midway_resumes_with_range_after_a_restart() {
    let Some((mut rig, g)) = setup("  download_rate: 40Ki\n") else {
        return;
    };
    std::fs::write(rig.path("healthy"), "").unwrap();
    rig.start_rauc("A");
    let mut d = start(&rig);
    wait_long(&d, "hawkbit: configData sent");
    // Incompressible (squashfs would shrink a pattern to a few KiB), so
    // the capped download takes seconds.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let payload: Vec<u8> = (0..200_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let bundle = rig.bundle("v2", &payload, "2.0.0", "ca");
    let sw = g.upload(&bundle);
    g.assign(NODE, sw, false);
    wait_long(&d, &format!("hawkbit: action {sw}: downloading"));
    let part = rig.path(&format!("ota/hawkbit-{sw}.part"));
    let have = wait_for("part of the bundle downloaded", LONG, || {
        let n = std::fs::metadata(&part).map_or(0, |m| m.len());
        (n >= 40_000).then_some(n)
    });
    d.kill9();
    let d = start(&rig);
    let line = wait_long(&d, &format!("hawkbit: action {sw}: downloading"));
    let from: u64 = line
        .split("from byte ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(from >= have, "resumed from byte {from}, had {have}: {line}");
    wait_long(&d, "-> pending-reboot");
    assert_eq!(
        &std::fs::read(rig.path("B.img")).unwrap()[..payload.len()],
        &payload[..]
    );
    let served = g.log();
    assert!(
        served.contains("/download HTTP/1.1\" 206"),
        "gooseBit served a Range request: {served}"
    );
}

/// (f): the GRUB backend with our signed image. gooseBit takes only RAUC
/// bundles and SWUpdate's `.swu`, so the image and its manifest travel in
/// a `.swu` (`sw-description` first, as gooseBit reads it); the node
/// unpacks it after the digest check and the flow is the RAUC one's:
/// installed, rebooted, the gate commits, and only then does gooseBit
/// show it finished, with the version running on the new slot.
#[test]
fn our_signed_image_in_a_swu_goes_through_the_grub_flow() {
    let Some(python) = goosebit::python() else {
        return;
    };
    if !ota_rig::have("grub-editenv") || !ota_rig::have("cpio") {
        return;
    }
    let mut rig = ota_rig::Rig::new(ota_rig::Flavor::Grub, "");
    let g = Goosebit::start(&python, &rig.path("goosebit"));
    let cfg = std::fs::read_to_string(rig.path("edge.yaml")).unwrap();
    // gooseBit assigns only software whose `sw-description` names the
    // target's board and revision, which it learns from `configData`.
    std::fs::write(rig.path("hwrevision"), "konsul-board 1.0\n").unwrap();
    let cfg = format!(
        "{cfg}hawkbit:\n  server: {}\n  tenant: DEFAULT\n  poll_floor: 1s\n  hwrevision_file: {}\n",
        g.url(),
        rig.path("hwrevision").display()
    );
    std::fs::write(rig.path("edge.yaml"), cfg).unwrap();
    rig.healthy(true);
    let mut d = rig.start();
    wait_long(&d, "hawkbit: configData sent");
    eventually("gooseBit registered the node", || {
        state_is(&g, "registered")
    });

    let img = ota_rig::new_image(0x5a, 150_000);
    let swu_dir = rig.path("swu");
    std::fs::create_dir(&swu_dir).unwrap();
    std::fs::write(
        swu_dir.join("sw-description"),
        "software = {\n  version = \"2.0.0\";\n  konsul-board = { hardware-compatibility = [ \"1.0\" ]; };\n};\n",
    )
    .unwrap();
    rig.image("swu/rootfs.img", &img, "2.0.0", None);
    let swu = rig.path("update.swu");
    let packed = std::process::Command::new("sh")
        .arg("-c")
        .arg("printf 'sw-description\\nrootfs.img\\nrootfs.img.manifest\\n' | cpio -o -H newc --quiet > ../update.swu")
        .current_dir(&swu_dir)
        .status()
        .unwrap();
    assert!(packed.success());
    let sw = g.upload(&swu);
    g.assign(NODE, sw, false);
    wait_long(&d, "unpacked from the .swu");
    wait_long(&d, "running the reboot command");
    assert_eq!(&rig.slot("B")[..img.len()], &img[..]);
    wait_for("gooseBit sees the update running", LONG, || {
        state_is(&g, "running").then_some(())
    });
    d.kill9();

    assert_eq!(rig.boot(), "B");
    let d = rig.start();
    wait_long(&d, "-> committed");
    wait_long(
        &d,
        &format!("closed feedback for deploymentBase/{sw} delivered"),
    );
    assert_eq!(g.state(NODE), "finished");
    let log = g.device_log(NODE);
    assert!(
        log.contains("health gate passed: slot B committed; running version 2.0.0 on slot B"),
        "{log}"
    );
    let left: Vec<_> = std::fs::read_dir(rig.path("ota"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("hawkbit-"))
        .collect();
    assert!(left.is_empty(), "nothing of the download is left: {left:?}");
}
