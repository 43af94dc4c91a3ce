//! One edge and its devices: waves, thresholds, refusals, Range serving,
//! kill -9 mid-rollout, and a rollout fetched from a hub.

use super::*;

#[test]
fn twenty_devices_in_waves_of_five_with_a_resumed_download() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let signer = Signer::new();
    config(dir.path(), Some(&broker), &signer, "127.0.0.1:0");
    let d = start_connected(dir.path());
    let img = image(256 << 10, 7);
    let up = upload(&d, &signer, &img, "2.0.0");
    assert_eq!(up.status, 201, "{}", up.text());

    let fleet = Fleet::start(
        &broker,
        20,
        |i| {
            if i == 7 {
                Behaviour::DropOnce
            } else {
                Behaviour::Good
            }
        },
        |_| None,
    );
    create_rollout(
        &d,
        r#"{"id":"r1","device_type":"sensor","version":"2.0.0","wave_size":5}"#,
    );
    wait_journal(&fleet.journal, "20 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 20
    });
    let done = wait_for("rollout r1 complete", ROLLOUT_DEADLINE, || {
        let r = rollout(&d, "r1");
        (r["state"] == "complete").then_some(r)
    });
    let st = states(&done);
    assert_eq!(st.len(), 20);
    for (id, s) in &st {
        assert_eq!(s["state"], "complete", "{id}: {s}");
        assert_eq!(s["attempts"], 1, "{id} was offered once: {s}");
    }
    // Waves: nobody in wave k+1 was offered before all of wave k updated.
    let j = fleet.journal.0.lock().unwrap();
    let when = |id: &str, what: &str| {
        j.events
            .iter()
            .find(|e| e.0 == id && e.1 == what)
            .map(|e| e.2)
            .unwrap()
    };
    for wave in 0..3 {
        let last_done = (wave * 5..wave * 5 + 5)
            .map(|i| when(&format!("dev{i:02}"), "updated"))
            .max()
            .unwrap();
        let first_next = (wave * 5 + 5..wave * 5 + 10)
            .map(|i| when(&format!("dev{i:02}"), "offer"))
            .min()
            .unwrap();
        assert!(
            last_done < first_next,
            "wave {} started before wave {wave} finished",
            wave + 1
        );
    }
    assert_eq!(j.events.iter().filter(|e| e.1 == "resumed").count(), 1);
    drop(j);
    // The device records carry the new version.
    let devs = d.get("/v1/edge/devices").json();
    assert!(devs
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["firmware_version"] == "2.0.0"));
    let list = d.get("/v1/edge/rollouts").json();
    assert_eq!(list[0]["counts"]["complete"], 20, "{list}");
}

#[test]
fn failures_past_the_threshold_halt_and_the_rest_are_not_offered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let signer = Signer::new();
    config(dir.path(), Some(&broker), &signer, "127.0.0.1:0");
    let d = start_connected(dir.path());
    assert_eq!(upload(&d, &signer, &image(4096, 1), "2.0.0").status, 201);
    // Waves of 3; the first wave has two failing devices.
    let fleet = Fleet::start(
        &broker,
        9,
        |i| {
            if i < 2 {
                Behaviour::Fail
            } else {
                Behaviour::Good
            }
        },
        |_| None,
    );
    create_rollout(
        &d,
        r#"{"id":"r2","device_type":"sensor","version":"2.0.0","wave_size":3,"failure_threshold":2,"max_retries":1}"#,
    );
    let halted = wait_for("rollout r2 halted", ROLLOUT_DEADLINE, || {
        let r = rollout(&d, "r2");
        (r["state"] == "halted").then_some(r)
    });
    assert!(
        halted["reason"]
            .as_str()
            .unwrap()
            .contains("failure_threshold"),
        "{halted}"
    );
    let st = states(&halted);
    for i in 0..2 {
        let s = &st[&format!("dev{i:02}")];
        assert_eq!(s["state"], "failed", "{s}");
        // One retry, then final.
        assert_eq!(s["attempts"], 2, "{s}");
        assert_eq!(s["error"], "simulated flash failure");
    }
    for i in 3..9 {
        let s = &st[&format!("dev{i:02}")];
        assert_eq!(s["state"], "waiting", "{s}");
        assert_eq!(s["attempts"], 0, "dev{i:02} was offered: {s}");
    }
    // dev02 (same wave) finishes normally; still nobody else is offered.
    wait_for("dev02 complete", ROLLOUT_DEADLINE, || {
        (states(&rollout(&d, "r2"))["dev02"]["state"] == "complete").then_some(())
    });
    let offered: Vec<String> = fleet
        .journal
        .0
        .lock()
        .unwrap()
        .events
        .iter()
        .filter(|e| e.1 == "offer")
        .map(|e| e.0.clone())
        .collect();
    assert!(
        offered
            .iter()
            .all(|id| ["dev00", "dev01", "dev02"].contains(&id.as_str())),
        "{offered:?}"
    );
    // Resume is the operator's override: the rest of the fleet goes ahead.
    let r = d.req("POST", "/v1/edge/rollouts/r2/resume", None);
    assert_eq!(r.status, 200, "{}", r.text());
    wait_journal(&fleet.journal, "7 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 7
    });
}

#[test]
fn wrong_digest_or_bad_signature_is_refused_and_range_serving() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new();
    config(dir.path(), None, &signer, "127.0.0.1:0");
    let d = Daemon::start(dir.path());
    let img = image(100_000, 3);
    let (sha, sig) = signer.sign(&img);

    // Wrong digest: declared one thing, sent another.
    let (other_sha, _) = signer.sign(b"something else");
    let r = request(
        &d.addr,
        "PUT",
        &format!(
            "/v1/edge/firmware?device_type=sensor&version=2.0.0&sha256={other_sha}&signature={sig}"
        ),
        Some(&img),
        &[],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("digest mismatch"), "{}", r.text());
    // Bad signature: signed by a key the edge does not trust.
    let (_, foreign) = Signer::new().sign(&img);
    let r = request(
        &d.addr,
        "PUT",
        &format!(
            "/v1/edge/firmware?device_type=sensor&version=2.0.0&sha256={sha}&signature={foreign}"
        ),
        Some(&img),
        &[],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("does not verify"), "{}", r.text());
    // Neither is stored, served or usable by a rollout.
    assert_eq!(d.get("/v1/edge/firmware").json(), json!([]));
    assert_eq!(d.get(&format!("/v1/edge/firmware/{sha}")).status, 404);
    let files: Vec<_> = std::fs::read_dir(dir.path().join("firmware"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(files.is_empty(), "{files:?}");
    let r = d.req(
        "POST",
        "/v1/edge/rollouts",
        Some(r#"{"device_type":"sensor","version":"2.0.0"}"#),
    );
    assert_eq!(r.status, 404, "{}", r.text());

    // The good one, then Range, ETag, Content-Length.
    let r = upload(&d, &signer, &img, "2.0.0");
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["sha256"], sha.as_str());
    // Versions are immutable.
    let r = upload(&d, &signer, &image(10, 9), "2.0.0");
    assert_eq!(r.status, 409, "{}", r.text());
    let path = format!("/v1/edge/firmware/{sha}");
    let full = d.get(&path);
    assert_eq!(full.status, 200);
    assert_eq!(full.body, img);
    let h = full.headers.to_ascii_lowercase();
    assert!(h.contains("content-length: 100000"), "{h}");
    assert!(h.contains(&format!("etag: \"{sha}\"")), "{h}");
    assert!(h.contains("accept-ranges: bytes"), "{h}");
    let part = request(&d.addr, "GET", &path, None, &[("Range", "bytes=1000-1999")]);
    assert_eq!(part.status, 206);
    assert_eq!(part.body, &img[1000..2000]);
    let h = part.headers.to_ascii_lowercase();
    assert!(h.contains("content-range: bytes 1000-1999/100000"), "{h}");
    assert!(h.contains("content-length: 1000"), "{h}");
    let tail = request(
        &d.addr,
        "GET",
        "/v1/edge/firmware/2.0.0",
        None,
        &[("Range", "bytes=-10")],
    );
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, &img[img.len() - 10..]);
    let bad = request(&d.addr, "GET", &path, None, &[("Range", "bytes=100000-")]);
    assert_eq!(bad.status, 416);
    assert!(bad
        .headers
        .to_ascii_lowercase()
        .contains("content-range: bytes */100000"));
    let cached = request(
        &d.addr,
        "GET",
        &path,
        None,
        &[("If-None-Match", &format!("\"{sha}\""))],
    );
    assert_eq!(cached.status, 304);
}

/// `DELETE /v1/edge/firmware/{ref}` takes what `GET` takes, a sha256 or a
/// version; a version stored for two device types is refused (nothing is
/// deleted) rather than guessed.
#[test]
fn delete_takes_a_version_as_get_does() {
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new();
    config(dir.path(), None, &signer, "127.0.0.1:0");
    let d = Daemon::start(dir.path());
    let count = |d: &Daemon| d.get("/v1/edge/firmware").json().as_array().unwrap().len();
    let img = image(1000, 5);
    let (sha, _) = signer.sign(&img);
    assert_eq!(upload(&d, &signer, &img, "1.0.0").status, 201);
    assert_eq!(d.get("/v1/edge/firmware/1.0.0").status, 200);
    let r = d.req("DELETE", "/v1/edge/firmware/1.0.0", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.get(&format!("/v1/edge/firmware/{sha}")).status, 404);
    assert!(!dir.path().join(format!("firmware/{sha}.bin")).exists());
    assert_eq!(count(&d), 0);

    let a = image(1000, 6);
    assert_eq!(upload(&d, &signer, &a, "1.1.0").status, 201);
    let b = image(1000, 7);
    let (sha_b, sig_b) = signer.sign(&b);
    let put = format!(
        "/v1/edge/firmware?device_type=gateway&version=1.1.0&sha256={sha_b}&signature={sig_b}"
    );
    let r = request(&d.addr, "PUT", &put, Some(&b), &[]);
    assert_eq!(r.status, 201, "{}", r.text());
    let r = d.req("DELETE", "/v1/edge/firmware/1.1.0", None);
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(count(&d), 2);
    let r = d.req("DELETE", &format!("/v1/edge/firmware/{sha_b}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(count(&d), 1);
}

#[test]
fn kill_9_mid_rollout_resumes_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let signer = Signer::new();
    config(dir.path(), Some(&broker), &signer, "127.0.0.1:0");
    let mut d = start_connected(dir.path());
    assert_eq!(
        upload(&d, &signer, &image(64 << 10, 5), "2.0.0").status,
        201
    );
    // The second wave is held back after taking its offer.
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let fleet = Fleet::start(
        &broker,
        10,
        |_| Behaviour::Good,
        move |i| (i >= 5).then(|| g.clone()),
    );
    create_rollout(
        &d,
        r#"{"id":"r3","device_type":"sensor","version":"2.0.0","wave_size":5}"#,
    );
    wait_journal(&fleet.journal, "wave 0 updated and wave 1 offered", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 5
            && j.events.iter().filter(|e| e.1 == "offer").count() == 10
    });
    let before = states(&rollout(&d, "r3"));
    for i in 5..10 {
        assert_eq!(before[&format!("dev{i:02}")]["state"], "offered");
    }

    // kill -9 mid-rollout; the same port again (devices hold its URLs).
    let port = d.addr.rsplit(':').next().unwrap().to_owned();
    d.kill9();
    config(
        dir.path(),
        Some(&broker),
        &signer,
        &format!("127.0.0.1:{port}"),
    );
    let d = start_connected(dir.path());
    gate.release();
    wait_journal(&fleet.journal, "10 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 10
    });
    let done = wait_for("rollout r3 complete", ROLLOUT_DEADLINE, || {
        let r = rollout(&d, "r3");
        (r["state"] == "complete").then_some(r)
    });
    for (id, s) in states(&done) {
        assert_eq!(s["state"], "complete", "{id}: {s}");
        // Resumed, not restarted: every device's first offer carried it.
        assert_eq!(s["attempts"], 1, "{id}: {s}");
    }
    assert_eq!(
        count(&fleet.journal, "offer"),
        10,
        "wave 0 was not offered again"
    );
}

#[test]
fn a_rollout_defined_at_the_hub_fetches_its_artifact_with_resume_and_reports_back() {
    let signer = Signer::new();
    let hub_dir = tempfile::tempdir().unwrap();
    config_node(hub_dir.path(), None, &signer, "127.0.0.1:0", "fw-hub", "");
    let hub = Daemon::start_hub(hub_dir.path());
    let img = image(512 << 10, 11);
    let (sha, _) = signer.sign(&img);
    assert_eq!(upload(&hub, &signer, &img, "3.0.0").status, 201);

    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    config_with(
        dir.path(),
        Some(&broker),
        &signer,
        "127.0.0.1:0",
        &format!(
            "cloud: {{server_address: 'http://{}', sync_interval: 1h}}\n",
            hub.addr
        ),
    );
    // A fetch that was cut off earlier: the first 100 KiB are on disk.
    std::fs::create_dir_all(dir.path().join("firmware")).unwrap();
    std::fs::write(
        dir.path().join(format!("firmware/.fetch-{sha}.part")),
        &img[..100 << 10],
    )
    .unwrap();
    let edge = start_connected(dir.path());
    let fleet = Fleet::start(&broker, 4, |_| Behaviour::Good, |_| None);

    create_rollout(
        &hub,
        r#"{"id":"hr","device_type":"sensor","version":"3.0.0","wave_size":2}"#,
    );
    assert_eq!(edge.req("POST", "/v1/edge/sync/now", None).status, 202);
    edge.wait_log(|l| l.contains("resuming at byte 102400"))
        .expect("the edge resumes the partial fetch with Range");
    wait_journal(&fleet.journal, "4 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 4
    });
    // The stored artifact is the hub's, verified.
    let a = edge.get(&format!("/v1/edge/firmware/{sha}"));
    assert_eq!(a.status, 200);
    assert_eq!(a.body, img);
    // Progress per device reaches the hub.
    let seen = wait_for(
        "the hub sees the rollout complete",
        ROLLOUT_DEADLINE,
        || {
            edge.req("POST", "/v1/edge/sync/now", None);
            let r = rollout(&hub, "hr");
            let st = states(&r);
            (r["edges_complete"] == true
                && st.len() == 4
                && st.values().all(|d| d["state"] == "complete"))
            .then_some(r)
        },
    );
    // The shared record is the operator's; the edge's execution is its own.
    assert_eq!(seen["state"], "running", "{seen}");
    assert_eq!(seen["edges"][0]["edge"], "fw-node", "{seen}");
    assert_eq!(seen["edges"][0]["targets"], 4, "{seen}");
    assert_eq!(seen["edges"][0]["state"], "complete", "{seen}");
    assert_eq!(rollout(&edge, "hr")["state"], "complete");
}

/// The benchmark note's measurement (bench/firmware-rollout.md): a 4 MiB
/// image to 100 devices through one edge, waves of 25. By hand:
/// `cargo test --release --test firmware -- --ignored --nocapture bench_`.
#[test]
#[ignore]
fn bench_4mib_to_100_devices() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let signer = Signer::new();
    config(dir.path(), Some(&broker), &signer, "127.0.0.1:0");
    let d = start_connected(dir.path());
    let img = image(4 << 20, 2);
    let t = Instant::now();
    assert_eq!(upload(&d, &signer, &img, "2.0.0").status, 201);
    let upload_time = t.elapsed();
    let fleet = Fleet::start(&broker, 100, |_| Behaviour::Good, |_| None);
    let started = Instant::now();
    create_rollout(
        &d,
        r#"{"id":"bench","device_type":"sensor","version":"2.0.0","wave_size":25}"#,
    );
    wait_journal(&fleet.journal, "100 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 100
    });
    wait_for("complete", ROLLOUT_DEADLINE, || {
        (rollout(&d, "bench")["state"] == "complete").then_some(())
    });
    let took = started.elapsed();
    let j = fleet.journal.0.lock().unwrap();
    let db = std::fs::metadata(dir.path().join("konsul.db"))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!(
        "BENCH upload {upload_time:?}; rollout of {} bytes to 100 devices in {took:?}; \
         HTTP firmware bytes {}; MQTT payload bytes (offers + status) {}; db {db} bytes",
        img.len(),
        j.http_bytes,
        j.mqtt_bytes
    );
}
