//! Host rollouts defined on a hub, against the real bootloader tools (the
//! rig of tests/ota.rs): a real hub process (`konsul-edge hub`) and, for
//! rollouts that name a URL, a small test-side HTTP server that serves
//! Range and records what was asked for.
//!
//! Waits are on the daemon's own log lines with the harness deadline; the
//! only polling is for a file another process writes (the staged bundle's
//! size) and for the hub's view after a sync.

mod common;

use std::path::Path;

use common::*;
use ring::signature::{Ed25519KeyPair, KeyPair};

#[path = "common/ota_rig.rs"]
mod ota_rig;

use ota_rig::*;

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
