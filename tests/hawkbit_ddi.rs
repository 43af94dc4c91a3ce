//! The hawkBit DDI client against a recording of hawkBit's documented DDI
//! JSON (tests/common/ddi_server.rs, NOT a real hawkBit) for what gooseBit
//! does not exercise: our signed image with its manifest as a second
//! artifact on the GRUB backend, `cancelAction` before and after the slot
//! write, `maintenanceWindow`, a chunk naming no devices, and one action
//! covering the host and MQTT devices (device chunks become firmware
//! rollouts; a real mosquitto, devices simulated by paho clients).
//! GRUB's environment is real (`grub-editenv`, tests/common/ota_rig.rs).

mod common;

use std::time::Duration;

use common::*;
#[path = "common/ddi_server.rs"]
mod ddi_server;
#[path = "common/ota_rig.rs"]
mod ota_rig;

use common::broker::Broker;
use common::device::Device;
use ddi_server::DdiServer;
use konsul_edge::firmware::base64_encode;
use ota_rig::*;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(60);

fn rig(srv: &DdiServer, ota_extra: &str) -> Option<Rig> {
    if !have("grub-editenv") {
        return None;
    }
    let top = format!("hawkbit:\n  server: {}\n  poll_floor: 1s\n", srv.url());
    Some(Rig::with(Flavor::Grub, ota_extra, &top))
}

/// Puts `name` (an image signed by the rig, and its manifest) on the server.
fn serve_image(srv: &DdiServer, rig: &Rig, name: &str, data: &[u8], version: &str) {
    let p = rig.image(name, data, version, None);
    let manifest = std::fs::read(format!("{}.manifest", p.display())).unwrap();
    srv.with(|s| {
        s.files.insert(name.into(), data.to_vec());
        s.files.insert(format!("{name}.manifest"), manifest);
    });
}

/// Offers action `id`: a 400 KB image (version 3.0) that a rig capped at
/// `download_rate: 20Ki` takes seconds to fetch. Starts the daemon and
/// returns once that download has begun.
fn start_slow_download(srv: &DdiServer, rig: &Rig, id: &str, fill: u8) -> Daemon {
    serve_image(srv, rig, "big.img", &new_image(fill, 400_000), "3.0");
    let chunk = srv.chunk("os", "rootfs", "3.0", &["big.img", "big.img.manifest"]);
    srv.with(|s| s.deployment = Some(DdiServer::deployment(id, "forced", None, vec![chunk])));
    let d = rig.start();
    wait(&d, &format!("hawkbit: action {id}: downloading"));
    d
}

fn last_feedback(srv: &DdiServer, path: &str) -> Option<Value> {
    srv.feedback_to(path).last().cloned()
}

fn wait_feedback(srv: &DdiServer, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(&format!("feedback on {path}"), LONG, || {
        srv.feedback_to(path).into_iter().find(|f| pred(f))
    })
}

fn execution(f: &Value) -> &str {
    f["status"]["execution"].as_str().unwrap_or("")
}

/// (f) Our signed image and its manifest, two artifacts of the OS chunk,
/// through the GRUB backend: installed, rebooted, the gate commits, and
/// only then `closed` + `success` from the new slot with its version.
#[test]
fn a_signed_image_on_grub_reports_success_only_from_the_committed_new_slot() {
    let srv = DdiServer::start();
    let Some(mut rig) = rig(&srv, "") else { return };
    rig.healthy(true);
    let img = new_image(0x42, 300_000);
    serve_image(&srv, &rig, "rootfs-2.0.img", &img, "2.0");
    let chunk = srv.chunk(
        "os",
        "rootfs",
        "2.0",
        &["rootfs-2.0.img", "rootfs-2.0.img.manifest"],
    );
    srv.with(|s| s.deployment = Some(DdiServer::deployment("7", "forced", None, vec![chunk])));
    let mut d = rig.start();
    wait(&d, "running the reboot command");
    assert_eq!(&rig.slot("B")[..img.len()], &img[..]);
    wait_feedback(&srv, "deploymentBase/7", |f| {
        f["status"]["result"]["progress"]["cnt"] == 5
    });
    let fb = srv.feedback_to("deploymentBase/7");
    assert!(
        fb.iter().all(|f| execution(f) == "proceeding"),
        "nothing closed before the reboot: {fb:?}"
    );
    let cnts: Vec<u64> = fb
        .iter()
        .filter_map(|f| f["status"]["result"]["progress"]["cnt"].as_u64())
        .collect();
    assert!(
        cnts.windows(2).all(|w| w[0] <= w[1]) && cnts.contains(&5),
        "{cnts:?}"
    );
    d.kill9();

    assert_eq!(rig.boot(), "B");
    let d = rig.start();
    wait(&d, "-> committed");
    let closed = wait_feedback(&srv, "deploymentBase/7", |f| execution(f) == "closed");
    assert_eq!(
        closed["status"]["result"]["finished"], "success",
        "{closed}"
    );
    let details = closed["status"]["details"].to_string();
    assert!(
        details.contains("running version 2.0 on slot B"),
        "{details}"
    );
    let cfg = srv.with(|s| s.config_data.last().cloned()).unwrap();
    assert_eq!(cfg["data"]["booted_slot"], "B", "{cfg}");
}

/// cancelAction: honoured while downloading (no slot written, the partial
/// file removed), refused with `rejected` once the slot was written, and
/// that update carries on.
#[test]
fn cancel_is_honoured_before_the_slot_write_and_refused_after_it() {
    let srv = DdiServer::start();
    let Some(rig) = rig(&srv, "  download_rate: 20Ki\n") else {
        return;
    };
    rig.healthy(true);
    let d = start_slow_download(&srv, &rig, "10", 0x10);
    srv.with(|s| s.cancel = Some(json!({"id": "11", "cancelAction": {"stopId": "10"}})));
    let f = wait_feedback(&srv, "cancelAction/11", |_| true);
    assert_eq!(execution(&f), "canceled", "{f}");
    assert_eq!(f["status"]["result"]["finished"], "success");
    assert!(!rig.path("ota/hawkbit-10.part").exists());
    assert_eq!(rig.slot("B"), vec![OLD_B; SLOT_SIZE], "no slot written");
    assert_eq!(ota(&d)["state"], "idle");

    let small = new_image(0x20, 30_000);
    serve_image(&srv, &rig, "small.img", &small, "4.0");
    let chunk = srv.chunk("os", "rootfs", "4.0", &["small.img", "small.img.manifest"]);
    srv.with(|s| {
        s.cancel = None;
        s.deployment = Some(DdiServer::deployment("20", "forced", None, vec![chunk]));
    });
    wait(&d, "-> pending-reboot");
    srv.with(|s| s.cancel = Some(json!({"id": "21", "cancelAction": {"stopId": "20"}})));
    let f = wait_feedback(&srv, "cancelAction/21", |_| true);
    assert_eq!(execution(&f), "rejected", "{f}");
    assert!(
        f["status"]["details"]
            .to_string()
            .contains("pending-reboot"),
        "{f}"
    );
    assert_eq!(ota(&d)["state"], "pending-reboot", "the update carries on");
    assert!(
        last_feedback(&srv, "deploymentBase/20").is_some_and(|f| execution(&f) == "proceeding"),
        "the action is not closed"
    );
}

/// An artifact larger than `ota.staging_max_size` is refused before it is
/// fetched; a second chunk (not the OS) that names no devices is refused
/// with feedback rather than ignored; `maintenanceWindow: unavailable` downloads and waits, and
/// the install starts once the window is `available`.
#[test]
fn the_maintenance_window_holds_the_install_and_a_second_chunk_is_refused() {
    let srv = DdiServer::start();
    let Some(rig) = rig(&srv, "  staging_max_size: 100Ki\n") else {
        return;
    };
    let huge = new_image(0x50, 150_000);
    serve_image(&srv, &rig, "huge.img", &huge, "9.0");
    let chunk = srv.chunk("os", "rootfs", "9.0", &["huge.img", "huge.img.manifest"]);
    srv.with(|s| s.deployment = Some(DdiServer::deployment("50", "forced", None, vec![chunk])));
    let d = rig.start();
    let f = wait_feedback(&srv, "deploymentBase/50", |f| execution(f) == "closed");
    assert_eq!(f["status"]["result"]["finished"], "failure");
    assert!(
        f["status"]["details"]
            .to_string()
            .contains("staging_max_size"),
        "{f}"
    );
    assert_eq!(srv.with(|s| s.downloads), 0, "nothing fetched");

    let img = new_image(0x30, 40_000);
    serve_image(&srv, &rig, "w.img", &img, "5.0");
    let os = srv.chunk("os", "rootfs", "5.0", &["w.img", "w.img.manifest"]);
    let app = srv.chunk("bApp", "sensor-fw", "1.2", &["w.img"]);
    srv.with(|s| {
        s.deployment = Some(DdiServer::deployment(
            "40",
            "forced",
            None,
            vec![os.clone(), app],
        ))
    });
    let f = wait_feedback(&srv, "deploymentBase/40", |f| execution(f) == "closed");
    assert_eq!(f["status"]["result"]["finished"], "failure");
    assert!(
        f["status"]["details"]
            .to_string()
            .contains("only the OS chunk"),
        "{f}"
    );

    srv.with(|s| {
        s.deployment = Some(DdiServer::deployment(
            "30",
            "attempt",
            Some("unavailable"),
            vec![os.clone()],
        ))
    });
    wait_feedback(&srv, "deploymentBase/30", |f| {
        f["status"]["details"].to_string().contains("downloaded")
    });
    let seen = srv.with(|s| s.deployment_gets);
    wait_for("three more polls of the action", LONG, || {
        (srv.with(|s| s.deployment_gets) >= seen + 3).then_some(())
    });
    assert_eq!(ota(&d)["state"], "idle", "held outside the window");
    srv.with(|s| {
        s.deployment = Some(DdiServer::deployment(
            "30",
            "attempt",
            Some("available"),
            vec![os],
        ))
    });
    wait(&d, "-> pending-reboot");
    assert_eq!(&rig.slot("B")[..img.len()], &img[..]);
}

/// A new action offered while the last one is still downloading (hawkBit
/// with multi-assignments, or a server that does not cancel first): the
/// old one is closed as a failure naming its successor and its partial
/// file goes, so the server does not wait on it forever and staging does
/// not keep its bytes; the new one installs.
#[test]
fn an_action_superseded_while_downloading_is_closed_and_its_partial_file_removed() {
    let srv = DdiServer::start();
    let Some(rig) = rig(&srv, "  download_rate: 20Ki\n") else {
        return;
    };
    let d = start_slow_download(&srv, &rig, "60", 0x11);
    let small = new_image(0x21, 30_000);
    serve_image(&srv, &rig, "small.img", &small, "4.0");
    let chunk = srv.chunk("os", "rootfs", "4.0", &["small.img", "small.img.manifest"]);
    srv.with(|s| s.deployment = Some(DdiServer::deployment("61", "forced", None, vec![chunk])));
    let f = wait_feedback(&srv, "deploymentBase/60", |f| execution(f) == "closed");
    assert_eq!(f["status"]["result"]["finished"], "failure", "{f}");
    assert!(
        f["status"]["details"]
            .to_string()
            .contains("superseded by action 61"),
        "{f}"
    );
    wait(&d, "-> pending-reboot");
    assert!(
        !rig.path("ota/hawkbit-60.part").exists(),
        "the old partial file"
    );
    assert_eq!(&rig.slot("B")[..small.len()], &small[..]);
}

/// A server that keeps offering a cancel while it refuses feedback: one
/// answer to it waits in the durable outbox, not one more per poll (the
/// outbox would grow for as long as the server misbehaves); once the
/// server takes feedback again, the answer arrives.
#[test]
fn a_cancel_offered_again_and_again_queues_one_answer() {
    let srv = DdiServer::start();
    let Some(rig) = rig(&srv, "  download_rate: 20Ki\n") else {
        return;
    };
    let d = start_slow_download(&srv, &rig, "70", 0x12);
    srv.with(|s| {
        s.refuse_feedback = true;
        s.deployment = None;
        s.cancel = Some(json!({"id": "71", "cancelAction": {"stopId": "70"}}));
    });
    let polls = |d: &Daemon| d.metric("konsul_edge_hawkbit_polls_total ").unwrap_or(0);
    let from = polls(&d);
    wait_for("six more polls", LONG, || {
        (polls(&d) >= from + 6).then_some(())
    });
    let pending = d
        .metric("konsul_edge_hawkbit_feedback_pending ")
        .unwrap_or(0);
    assert!(
        pending <= 2,
        "{pending} feedbacks queued after six polls of the same cancel"
    );
    srv.with(|s| s.refuse_feedback = false);
    let f = wait_feedback(&srv, "cancelAction/71", |_| true);
    assert_eq!(execution(&f), "canceled", "{f}");
}

// --- one action for the host and its MQTT devices ---------------------------

/// A rig whose edge also bridges MQTT devices and takes firmware signed by
/// `fw_key`.
fn device_rig(srv: &DdiServer, broker: &Broker, fw_key: &Ed25519KeyPair) -> Option<Rig> {
    if !have("grub-editenv") {
        return None;
    }
    let top = format!(
        "hawkbit:\n  server: {}\n  poll_floor: 1s\n\
         mqtt:\n  enabled: true\n  broker: {}\n  client_id: edge-hb-{}\n  qos: 1\n\
         firmware:\n  max_size: 8Mi\n  public_keys: [\"{}\"]\n  rollout:\n    max_retries: 0\n    failure_threshold: 1\n",
        srv.url(),
        broker.url(),
        broker.port,
        base64_encode(fw_key.public_key().as_ref()),
    );
    Some(Rig::with(Flavor::Grub, "", &top))
}

/// A sensor on the broker, registered at version 1.0 (acknowledged).
fn sensor(broker: &Broker, d: &Daemon, id: &str) -> Device {
    let dev = Device::connect(
        broker,
        &format!("sim-{id}"),
        &[
            &format!("devices/{id}/update"),
            &format!("devices/{id}/ack"),
        ],
    );
    if !d
        .early
        .iter()
        .any(|l| l.contains("mqtt::bridge: connected to "))
    {
        d.wait_log(|l| l.contains("mqtt::bridge: connected to "))
            .expect("the edge connects to the broker");
    }
    let reg = json!({"type": "sensor", "firmware_version": "1.0", "telemetry_interval": "1h"});
    dev.publish(&format!("devices/{id}/register"), reg.to_string(), 1);
    dev.expect(&format!("devices/{id}/ack"));
    dev
}

/// Puts a host image `rootfs-{v}.img` (signed, with its manifest) and a
/// device image `sensor-{v}.bin` on the server; returns the OS chunk.
fn serve_host_and_device(srv: &DdiServer, rig: &Rig, v: &str, fill: u8) -> Value {
    let name = format!("rootfs-{v}.img");
    serve_image(srv, rig, &name, &new_image(fill, 120_000), v);
    let device_image = new_image(fill ^ 0x22, 40_000);
    srv.with(|s| s.files.insert(format!("sensor-{v}.bin"), device_image));
    srv.chunk("os", "rootfs", v, &[&name, &format!("{name}.manifest")])
}

/// A device chunk for `file` (on the server), signed with `key`.
fn device_chunk(srv: &DdiServer, file: &str, version: &str, key: &Ed25519KeyPair) -> Value {
    let data = srv.with(|s| s.files[file].clone());
    let digest = ring::digest::digest(&ring::digest::SHA256, &data);
    let sig = base64_encode(key.sign(digest.as_ref()).as_ref());
    let mut c = srv.chunk("bApp", "sensor-fw", version, &[file]);
    c["metadata"] = json!([
        {"key": "device_type", "value": "sensor"},
        {"key": "devices", "value": "s1"},
        {"key": "signature", "value": sig},
    ]);
    c
}

/// What a device does with an offer it accepts: fetch, check, report,
/// come back with the new version.
fn take_offer(dev: &Device, id: &str, offer: &Value) {
    let url = offer["url"].as_str().unwrap();
    let (addr, path) = url
        .strip_prefix("http://")
        .and_then(|u| u.split_once('/'))
        .unwrap();
    let r = request(addr, "GET", &format!("/{path}"), None, &[]);
    assert_eq!(r.status, 200);
    let sha = hex(ring::digest::digest(&ring::digest::SHA256, &r.body).as_ref());
    assert_eq!(offer["sha256"].as_str(), Some(sha.as_str()));
    let status = |s: Value| dev.publish(&format!("devices/{id}/update/status"), s.to_string(), 1);
    let rollout = offer["rollout"].clone();
    status(json!({"status": "installing", "rollout": rollout}));
    status(json!({"status": "complete", "rollout": rollout}));
    let v = offer["version"].as_str().unwrap();
    let reg = json!({"type": "sensor", "firmware_version": v, "telemetry_interval": "1h"});
    dev.publish(&format!("devices/{id}/register"), reg.to_string(), 1);
}

/// What a device-chunk test needs: the recording server, a broker (in
/// its own temp dir), the firmware signing key and the rig (None: no
/// mosquitto or no grub-editenv here).
struct DeviceSetup {
    srv: DdiServer,
    broker: Broker,
    fw_key: Ed25519KeyPair,
    rig: Rig,
    _tmp: tempfile::TempDir,
}

fn device_setup() -> Option<DeviceSetup> {
    let srv = DdiServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let fw_key = keypair();
    let broker = have("mosquitto").then(|| Broker::start(tmp.path()))?;
    let rig = device_rig(&srv, &broker, &fw_key)?;
    Some(DeviceSetup {
        srv,
        broker,
        fw_key,
        rig,
        _tmp: tmp,
    })
}

/// One action with the host image and a device chunk: both downloaded and
/// checked first; the device rollout starts only once the host committed
/// on its new slot, and the action closes (`success`) only once the
/// device runs the new firmware, with both outcomes in the details.
#[test]
fn one_action_updates_the_host_then_its_devices_and_closes_when_both_finished() {
    let Some(DeviceSetup {
        srv,
        broker,
        fw_key,
        mut rig,
        _tmp,
    }) = device_setup()
    else {
        return;
    };
    rig.healthy(true);
    let mut d = rig.start();
    let dev = sensor(&broker, &d, "s1");
    let os = serve_host_and_device(&srv, &rig, "2.0", 0x44);
    let fw = device_chunk(&srv, "sensor-2.0.bin", "2.0", &fw_key);
    srv.with(|s| s.deployment = Some(DdiServer::deployment("90", "forced", None, vec![os, fw])));
    wait(&d, "-> pending-reboot");
    assert_eq!(
        d.get("/v1/edge/rollouts/hawkbit-90-1").status,
        404,
        "no device rollout before the host has committed"
    );
    d.kill9();

    assert_eq!(rig.boot(), "B");
    let mut d = rig.start();
    wait(&d, "-> committed");
    let offer = dev.expect("devices/s1/update");
    assert_eq!(offer["rollout"], "hawkbit-90-1", "{offer}");
    assert_eq!(offer["version"], "2.0", "{offer}");
    let fb = srv.feedback_to("deploymentBase/90");
    assert!(
        fb.iter().all(|f| execution(f) == "proceeding"),
        "closed before the device finished: {fb:?}"
    );
    // Once devices may be flashing, a cancel is refused.
    srv.with(|s| s.cancel = Some(json!({"id": "93", "cancelAction": {"stopId": "90"}})));
    let f = wait_feedback(&srv, "cancelAction/93", |_| true);
    assert_eq!(execution(&f), "rejected", "{f}");
    srv.with(|s| s.cancel = None);
    // A kill -9 while the device rollout runs: the restarted edge offers
    // again (at its new address) and still closes the action.
    d.kill9();
    let d = rig.start();
    let offer = dev.expect("devices/s1/update");
    assert_eq!(offer["rollout"], "hawkbit-90-1", "{offer}");
    take_offer(&dev, "s1", &offer);
    let closed = wait_feedback(&srv, "deploymentBase/90", |f| execution(f) == "closed");
    assert_eq!(
        closed["status"]["result"]["finished"], "success",
        "{closed}"
    );
    let details = closed["status"]["details"].to_string();
    assert!(
        details.contains("rollout hawkbit-90-1 of sensor 2.0: complete"),
        "{details}"
    );
    assert!(details.contains("1 of 1 devices updated"), "{details}");
    assert!(
        details.contains("running version 2.0 on slot B"),
        "{details}"
    );
    let r = d.get("/v1/edge/rollouts/hawkbit-90-1").json();
    assert_eq!(r["state"], "complete", "{r}");
}

/// A device chunk naming a device id no rollout takes, or whose image's
/// signature does not verify, refuses the whole action before the host's
/// slot is written; a deployment of device
/// chunks only runs their rollout, and a device that fails closes the
/// action with `failure` and the device's own error.
#[test]
fn a_bad_device_signature_refuses_the_action_and_a_failed_device_fails_it() {
    let Some(DeviceSetup {
        srv,
        broker,
        fw_key,
        rig,
        _tmp,
    }) = device_setup()
    else {
        return;
    };
    let d = rig.start();
    let dev = sensor(&broker, &d, "s1");
    let os = serve_host_and_device(&srv, &rig, "3.0", 0x45);
    // A device id no rollout would take: refused before a byte is fetched
    // (not after the host's slot was written).
    let mut odd = device_chunk(&srv, "sensor-3.0.bin", "3.0", &fw_key);
    odd["metadata"][1]["value"] = json!("s1, ../s2");
    let deployment = DdiServer::deployment("89", "forced", None, vec![os.clone(), odd]);
    srv.with(|s| s.deployment = Some(deployment));
    let f = wait_feedback(&srv, "deploymentBase/89", |f| execution(f) == "closed");
    assert_eq!(f["status"]["result"]["finished"], "failure", "{f}");
    assert!(
        f["status"]["details"]
            .to_string()
            .contains("devices: device ids"),
        "{f}"
    );
    assert_eq!(srv.with(|s| s.downloads), 0, "nothing fetched");

    let forged = device_chunk(&srv, "sensor-3.0.bin", "3.0", &keypair());
    srv.with(|s| {
        s.deployment = Some(DdiServer::deployment(
            "91",
            "forced",
            None,
            vec![os, forged],
        ))
    });
    let f = wait_feedback(&srv, "deploymentBase/91", |f| execution(f) == "closed");
    assert_eq!(f["status"]["result"]["finished"], "failure", "{f}");
    let details = f["status"]["details"].to_string();
    assert!(
        details.contains("chunk `sensor-fw`: signature")
            && details.contains("before any slot write"),
        "{details}"
    );
    assert_eq!(rig.slot("B"), vec![OLD_B; SLOT_SIZE], "no slot written");
    assert_eq!(ota(&d)["state"], "idle");
    assert_eq!(d.get("/v1/edge/rollouts/hawkbit-91-1").status, 404);

    let fw = device_chunk(&srv, "sensor-3.0.bin", "3.0", &fw_key);
    srv.with(|s| s.deployment = Some(DdiServer::deployment("92", "forced", None, vec![fw])));
    let offer = dev.expect("devices/s1/update");
    assert_eq!(offer["rollout"], "hawkbit-92-0", "{offer}");
    let fail = json!({"status": "failed", "rollout": offer["rollout"], "error": "simulated flash failure"});
    dev.publish("devices/s1/update/status", fail.to_string(), 1);
    let f = wait_feedback(&srv, "deploymentBase/92", |f| execution(f) == "closed");
    assert_eq!(f["status"]["result"]["finished"], "failure", "{f}");
    assert!(
        f["status"]["details"]
            .to_string()
            .contains("s1: simulated flash failure"),
        "{f}"
    );
    assert_eq!(rig.slot("B"), vec![OLD_B; SLOT_SIZE], "no slot written");
}
