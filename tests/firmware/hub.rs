//! Several edges under one hub: one hub rollout run by each edge, halts,
//! pauses and resumes at the hub, and a device that is offline for a wave.

use super::*;

/// A hub holding a signed `sensor 3.0.0`.
fn hub_with_image(signer: &Signer, img: &[u8]) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    config_node(dir.path(), None, signer, "127.0.0.1:0", "fw-hub", "");
    let hub = Daemon::start_hub(dir.path());
    assert_eq!(upload(&hub, signer, img, "3.0.0").status, 201);
    (dir, hub)
}

/// An edge under a hub with its own broker; it syncs when told to.
struct Edge {
    d: Daemon,
    broker: Broker,
    _dir: tempfile::TempDir,
}

impl Edge {
    fn start(hub: &Daemon, signer: &Signer, node: &str) -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::start(dir.path());
        config_node(
            dir.path(),
            Some(&broker),
            signer,
            "127.0.0.1:0",
            node,
            &format!(
                "cloud: {{server_address: 'http://{}', sync_interval: 1h}}\n",
                hub.addr
            ),
        );
        let d = start_connected(dir.path());
        Edge {
            d,
            broker,
            _dir: dir,
        }
    }

    /// Asks for a sync round (they coalesce); callers wait on its effect.
    fn sync(&self) {
        self.d.req("POST", "/v1/edge/sync/now", None);
    }
}

/// The hub's view of rollout `id` once `pred` holds, syncing `edges`
/// before every look.
fn at_hub(
    hub: &Daemon,
    edges: &[&Edge],
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    wait_for(what, ROLLOUT_DEADLINE, || {
        for e in edges {
            e.sync();
        }
        let r = rollout(hub, id);
        pred(&r).then_some(r)
    })
}

/// The hub's summary of `node`'s execution in a rollout view.
fn run_of(r: &Value, node: &str) -> Value {
    r["edges"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["edge"] == node))
        .cloned()
        .unwrap_or(Value::Null)
}

/// The edge's own view of rollout `id` once `pred` holds, syncing first.
fn at_edge(e: &Edge, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, ROLLOUT_DEADLINE, || {
        e.sync();
        let r = e.d.get(&format!("/v1/edge/rollouts/{id}"));
        (r.status == 200).then(|| r.json()).filter(|r| pred(r))
    })
}

fn offers_to(f: &Fleet, device: &str) -> usize {
    f.journal
        .0
        .lock()
        .unwrap()
        .events
        .iter()
        .filter(|e| e.0 == device && e.1 == "offer")
        .count()
}

#[test]
fn two_edges_run_one_hub_rollout_and_the_one_finishing_first_does_not_stop_the_other() {
    let signer = Signer::new();
    let (_hub_dir, hub) = hub_with_image(&signer, &image(64 << 10, 21));
    let a = Edge::start(&hub, &signer, "fw-a");
    let b = Edge::start(&hub, &signer, "fw-b");
    let fleet_a = Fleet::start_named(&a.broker, "a", 4, |_| Behaviour::Good, |_| None);
    // B's devices take their offer and then wait: B is the slow edge.
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    let fleet_b = Fleet::start_named(
        &b.broker,
        "b",
        4,
        |_| Behaviour::Good,
        move |_| Some(g.clone()),
    );
    let r = create_rollout(
        &hub,
        r#"{"id":"multi","device_type":"sensor","version":"3.0.0","wave_size":2}"#,
    );
    assert_eq!(r.json()["created_by"], "fw-hub");

    // B resolves its devices and offers its first wave first.
    b.sync();
    wait_journal(&fleet_b.journal, "B's first wave offered", |j| {
        j.events.iter().filter(|e| e.1 == "offer").count() == 2
    });
    // Then A runs to the end, and the hub sees A complete, B running.
    a.sync();
    wait_journal(&fleet_a.journal, "A's 4 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 4
    });
    let mid = at_hub(&hub, &[&a, &b], "multi", "A complete at the hub", |r| {
        run_of(r, "fw-a")["state"] == "complete" && run_of(r, "fw-b")["state"] == "running"
    });
    assert_eq!(run_of(&mid, "fw-a")["targets"], 4, "{mid}");
    assert_eq!(run_of(&mid, "fw-b")["targets"], 4, "{mid}");
    assert_eq!(mid["state"], "running", "the operator's state: {mid}");
    assert_eq!(mid["edges_complete"], false, "{mid}");
    // B pulls everything the hub has after A finished (a marker written
    // after it proves the round), and carries on.
    assert_eq!(
        hub.put("/kv/global/after-a", r#"{"value":"1"}"#).status,
        200
    );
    wait_for("B pulled the marker", ROLLOUT_DEADLINE, || {
        b.sync();
        (b.d.get("/kv/global/after-a").status == 200).then_some(())
    });
    let mine = rollout(&b.d, "multi");
    assert_eq!(mine["state"], "running", "{mine}");
    assert_eq!(mine["targets"], 4, "{mine}");
    gate.release();
    wait_journal(&fleet_b.journal, "B's 4 updates", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 4
    });
    let done = at_hub(
        &hub,
        &[&a, &b],
        "multi",
        "everything complete at the hub",
        |r| {
            let st = states(r);
            r["edges_complete"] == true
                && st.len() == 8
                && st.values().all(|d| d["state"] == "complete")
        },
    );
    for (id, s) in states(&done) {
        assert_eq!(s["attempts"], 1, "{id}: {s}");
    }
    for node in ["fw-a", "fw-b"] {
        let run = run_of(&done, node);
        assert_eq!(run["state"], "complete", "{done}");
        assert_eq!(run["reason"], "4 of 4 devices updated", "{done}");
    }
    assert_eq!(done["state"], "running", "{done}");
    assert_eq!(
        done["targets"], 0,
        "no edge wrote the shared record: {done}"
    );
    let list = hub.get("/v1/edge/rollouts").json();
    assert_eq!(list[0]["counts"]["complete"], 8, "{list}");
    // An edge holds only its own devices and its own execution.
    let mine = rollout(&a.d, "multi");
    assert_eq!(states(&mine).len(), 4, "{mine}");
    assert_eq!(mine["edges"].as_array().map(Vec::len), Some(1), "{mine}");
}

#[test]
fn a_threshold_halt_on_one_edge_leaves_the_other_running_and_a_hub_resume_clears_it() {
    let signer = Signer::new();
    let (_hub_dir, hub) = hub_with_image(&signer, &image(16 << 10, 22));
    let a = Edge::start(&hub, &signer, "fw-a");
    let b = Edge::start(&hub, &signer, "fw-b");
    // a00 fails every offer; it shares A's first wave with a01.
    let fleet_a = Fleet::start_named(
        &a.broker,
        "a",
        4,
        |i| {
            if i == 0 {
                Behaviour::Fail
            } else {
                Behaviour::Good
            }
        },
        |_| None,
    );
    let fleet_b = Fleet::start_named(&b.broker, "b", 4, |_| Behaviour::Good, |_| None);
    create_rollout(
        &hub,
        r#"{"id":"th","device_type":"sensor","version":"3.0.0","wave_size":2,"failure_threshold":1,"max_retries":0}"#,
    );

    // A halts first, and the hub hears of it before B has even synced.
    let halted = at_hub(&hub, &[&a], "th", "A halted at the hub", |r| {
        run_of(r, "fw-a")["state"] == "halted"
    });
    let run = run_of(&halted, "fw-a");
    assert!(
        run["reason"]
            .as_str()
            .unwrap()
            .contains("failure_threshold"),
        "{halted}"
    );
    assert_eq!(halted["state"], "running", "the operator's state: {halted}");
    assert_eq!(states(&halted)["a00"]["state"], "failed", "{halted}");
    // B then runs all its devices.
    let done_b = at_hub(&hub, &[&a, &b], "th", "B complete at the hub", |r| {
        run_of(r, "fw-b")["state"] == "complete"
    });
    assert_eq!(count(&fleet_b.journal, "updated"), 4);
    assert_eq!(run_of(&done_b, "fw-a")["state"], "halted", "{done_b}");
    assert_eq!(done_b["edges_complete"], false, "{done_b}");
    // A's second wave was never offered while halted.
    let mine = rollout(&a.d, "th");
    assert_eq!(mine["state"], "halted", "{mine}");
    for id in ["a02", "a03"] {
        assert_eq!(states(&mine)[id]["attempts"], 0, "{mine}");
        assert_eq!(offers_to(&fleet_a, id), 0);
    }
    // The edge's operator cannot override the hub's rollout locally.
    let r = a.d.req("POST", "/v1/edge/rollouts/th/resume", None);
    assert_eq!(r.status, 409, "{}", r.text());

    // A resume at the hub reaches A: the rest of A's devices go ahead.
    let r = hub.req("POST", "/v1/edge/rollouts/th/resume", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["resumes"], 1, "{}", r.text());
    wait_for("A's other three devices updated", ROLLOUT_DEADLINE, || {
        a.sync();
        (count(&fleet_a.journal, "updated") == 3).then_some(())
    });
    let done = at_hub(&hub, &[&a, &b], "th", "A complete at the hub", |r| {
        r["edges_complete"] == true
    });
    let run = run_of(&done, "fw-a");
    assert_eq!(run["reason"], "3 of 4 devices updated", "{done}");
    // The threshold counts again from the failure before the resume.
    assert_eq!(run["failure_threshold"], 2, "{done}");
    assert_eq!(run["resumes"], 1, "{done}");
    assert_eq!(
        offers_to(&fleet_a, "a00"),
        1,
        "a failed device is not retried"
    );
}

#[test]
fn a_pause_at_the_hub_pauses_offers_on_every_edge() {
    let signer = Signer::new();
    let (_hub_dir, hub) = hub_with_image(&signer, &image(16 << 10, 23));
    let a = Edge::start(&hub, &signer, "fw-a");
    let b = Edge::start(&hub, &signer, "fw-b");
    // Waves of one; each edge's first device holds its offer until told.
    let gate = Arc::new(Gate::default());
    let (ga, gb) = (gate.clone(), gate.clone());
    let fleet_a = Fleet::start_named(
        &a.broker,
        "a",
        3,
        |_| Behaviour::Good,
        move |_| Some(ga.clone()),
    );
    let fleet_b = Fleet::start_named(
        &b.broker,
        "b",
        3,
        |_| Behaviour::Good,
        move |_| Some(gb.clone()),
    );
    create_rollout(
        &hub,
        r#"{"id":"pz","device_type":"sensor","version":"3.0.0","wave_size":1}"#,
    );
    let edges = [(&a, &fleet_a, "a"), (&b, &fleet_b, "b")];
    for (e, f, _) in edges {
        e.sync();
        wait_journal(&f.journal, "the first device offered", |j| {
            j.events.iter().any(|e| e.1 == "offer")
        });
    }
    let r = hub.req("POST", "/v1/edge/rollouts/pz/pause", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "paused");
    for (e, _, _) in edges {
        at_edge(e, "pz", "the edge paused", |r| r["state"] == "paused");
    }
    // The devices in flight finish; nobody else is offered. The tick that
    // records a completion is the one that would offer the next device,
    // so one snapshot shows both.
    gate.release();
    for (e, f, p) in edges {
        let r = at_edge(e, "pz", "the first device complete", |r| {
            states(r)[&format!("{p}00")]["state"] == "complete"
        });
        assert_eq!(r["state"], "paused", "{r}");
        for i in 1..3 {
            let s = &states(&r)[&format!("{p}{i:02}")];
            assert_eq!(s["state"], "waiting", "{r}");
            assert_eq!(s["attempts"], 0, "{r}");
        }
        assert_eq!(count(&f.journal, "offer"), 1);
    }
    let paused = at_hub(&hub, &[&a, &b], "pz", "both edges paused at the hub", |r| {
        run_of(r, "fw-a")["state"] == "paused" && run_of(r, "fw-b")["state"] == "paused"
    });
    assert_eq!(paused["state"], "paused", "{paused}");
    // Resume at the hub: both edges carry on to the end.
    let r = hub.req("POST", "/v1/edge/rollouts/pz/resume", None);
    assert_eq!(r.status, 200, "{}", r.text());
    for (e, f, _) in edges {
        wait_for("the edge's 3 updates", ROLLOUT_DEADLINE, || {
            e.sync();
            (count(&f.journal, "updated") == 3).then_some(())
        });
    }
    let done = at_hub(
        &hub,
        &[&a, &b],
        "pz",
        "everything complete at the hub",
        |r| {
            r["edges_complete"] == true
                && states(r)
                    .values()
                    .filter(|d| d["state"] == "complete")
                    .count()
                    == 6
        },
    );
    assert_eq!(done["state"], "running", "{done}");
}

#[test]
fn an_offline_device_does_not_hold_its_wave_and_gets_the_offer_when_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path());
    let signer = Signer::new();
    config(dir.path(), Some(&broker), &signer, "127.0.0.1:0");
    let d = start_connected(dir.path());
    assert_eq!(upload(&d, &signer, &image(8192, 4), "2.0.0").status, 201);
    let gate = Arc::new(Gate::default());
    let g = gate.clone();
    // dev01 is in the first wave and away.
    let fleet = Fleet::start(
        &broker,
        4,
        |i| {
            if i == 1 {
                Behaviour::Away
            } else {
                Behaviour::Good
            }
        },
        move |i| (i == 1).then(|| g.clone()),
    );
    wait_for("dev01 offline", DEADLINE, || {
        (d.get("/v1/edge/devices/dev01").json()["health"] == "offline").then_some(())
    });
    create_rollout(
        &d,
        r#"{"id":"r4","device_type":"sensor","version":"2.0.0","wave_size":2}"#,
    );
    wait_journal(&fleet.journal, "the three online devices updated", |j| {
        j.events.iter().filter(|e| e.1 == "updated").count() == 3
    });
    let r = wait_for("three complete", ROLLOUT_DEADLINE, || {
        let r = rollout(&d, "r4");
        (r["counts"].is_null()
            && states(&r)
                .values()
                .filter(|s| s["state"] == "complete")
                .count()
                == 3)
            .then_some(r)
    });
    assert_eq!(r["state"], "running");
    assert_eq!(states(&r)["dev01"]["state"], "waiting");
    assert_eq!(states(&r)["dev01"]["attempts"], 0);
    gate.release();
    let done = wait_for("rollout r4 complete", ROLLOUT_DEADLINE, || {
        let r = rollout(&d, "r4");
        (r["state"] == "complete").then_some(r)
    });
    assert_eq!(states(&done)["dev01"]["state"], "complete");
    assert_eq!(states(&done)["dev01"]["attempts"], 1);
}
