//! Records flow both ways and converge: offline edges, conflicts resolved
//! the same everywhere, 10,000 changes after a reconnect, kill -9 mid
//! sync, an edge that lost its disk.

use super::*;

#[test]
fn services_flow_up_and_global_kv_flows_down() {
    let net = net(2, "");
    let (a, b) = (&net.edges[0], &net.edges[1]);
    assert_eq!(
        a.put(
            "/register",
            r#"{"name":"pos","address":"10.0.0.7","port":9000,"tags":["till"]}"#
        )
        .status,
        200
    );
    assert_eq!(
        net.hub()
            .put("/kv/global/price-list", r#"{"value":"v42"}"#)
            .status,
        200
    );
    sync(a);
    sync(b);
    let hub_services = net.hub().get("/services/").json();
    assert_eq!(hub_services.as_array().unwrap().len(), 1);
    assert_eq!(hub_services[0]["address"], "10.0.0.7");
    assert_eq!(kv(a, "global/price-list").as_deref(), Some("v42"));
    assert_eq!(kv(b, "global/price-list").as_deref(), Some("v42"));
    // what edge A owns does not flow to edge B
    assert_eq!(b.get("/services/").json().as_array().unwrap().len(), 0);
    let edges = net.hub().get("/v1/edge/edges").json();
    let ids: Vec<&str> = edges
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["edge_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["edge-a", "edge-b"]);

    // deletes replicate as tombstones
    assert_eq!(net.hub().delete("/kv/global/price-list").status, 200);
    sync(a);
    assert_eq!(kv(a, "global/price-list"), None);
}

#[test]
fn two_edges_with_the_same_service_and_key_each_keep_their_own() {
    let net = net(2, "");
    let (mut a, b) = {
        let mut it = net.edges.into_iter();
        (it.next().unwrap(), it.next().unwrap())
    };
    let pos = |ip: &str| format!(r#"{{"name":"pos","address":"{ip}","port":9000}}"#);
    // B first: at the hub, `pos` and `app/mode` are B's; A's come second.
    assert_eq!(b.put("/register", &pos("10.0.0.2")).status, 200);
    assert_eq!(b.put("/kv/app/mode", r#"{"value":"b"}"#).status, 200);
    sync(&b);
    assert_eq!(a.put("/register", &pos("10.0.0.1")).status, 200);
    assert_eq!(a.put("/kv/app/mode", r#"{"value":"a"}"#).status, 200);
    sync(&a);
    sync(&b);
    sync(&a);

    // Neither edge's registry was touched by the other's.
    assert_eq!(a.get("/services/pos").json()["address"], "10.0.0.1");
    assert_eq!(b.get("/services/pos").json()["address"], "10.0.0.2");
    assert_eq!(kv(&a, "app/mode").as_deref(), Some("a"));
    assert_eq!(kv(&b, "app/mode").as_deref(), Some("b"));
    // The hub keeps both, and there was nothing to fight over.
    let hub = net.hub.as_ref().unwrap();
    assert_eq!(service_addresses(hub), ["10.0.0.1", "10.0.0.2"]);
    assert_eq!(hub.get("/v1/edge/conflicts").json(), serde_json::json!([]));

    // A loses its disk: it gets its own `pos` and `app/mode` back, not B's.
    a.stop();
    for f in ["edge.db", "edge.db-wal", "edge.db-shm"] {
        let _ = std::fs::remove_file(a.dir.join(f));
    }
    let a = Daemon::start(&a.dir);
    sync(&a);
    assert_eq!(a.get("/services/pos").json()["address"], "10.0.0.1");
    assert_eq!(kv(&a, "app/mode").as_deref(), Some("a"));

    // And A's delete removes A's record at the hub, not B's.
    assert_eq!(a.req("PUT", "/deregister/pos", None).status, 200);
    sync(&a);
    let left = hub.get("/services/").json();
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["address"], "10.0.0.2");
    sync(&b);
    assert_eq!(b.get("/services/pos").json()["address"], "10.0.0.2");
}

#[test]
fn offline_edges_keep_working_then_converge_and_conflicts_resolve_the_same_everywhere() {
    let mut net = net(2, "");
    // The same key exists everywhere first.
    assert_eq!(
        net.hub()
            .put("/kv/global/mode", r#"{"value":"normal"}"#)
            .status,
        200
    );
    sync(&net.edges[0]);
    sync(&net.edges[1]);

    // The uplink goes down.
    net.hub.take().unwrap().stop();
    let (a, b) = (&net.edges[0], &net.edges[1]);
    assert_eq!(
        a.put("/kv/global/mode", r#"{"value":"from-a"}"#).status,
        200
    );
    assert_eq!(
        b.put("/kv/global/mode", r#"{"value":"from-b"}"#).status,
        200
    );
    assert_eq!(
        a.put(
            "/register",
            r#"{"name":"scale","address":"10.0.1.1","port":1}"#
        )
        .status,
        200
    );
    assert_eq!(a.req("POST", "/v1/edge/sync/now", None).status, 202);
    eventually("edge A to notice the hub is gone", || {
        let s = a.get("/v1/edge/sync").json();
        s["online"] == false && s["last_error"].is_string()
    });
    assert_eq!(a.get("/v1/edge/sync").json()["pending_changes"], 2);
    assert_eq!(
        kv(a, "global/mode").as_deref(),
        Some("from-a"),
        "local writes keep working"
    );

    // The uplink returns on the same address.
    net.hub = Some(Daemon::start_hub(&net.hub_dir));
    let (a, b) = (&net.edges[0], &net.edges[1]);
    sync(a);
    sync(b);
    sync(a);
    let hub_value = kv(net.hub(), "global/mode").unwrap();
    assert_eq!(kv(a, "global/mode").unwrap(), hub_value);
    assert_eq!(kv(b, "global/mode").unwrap(), hub_value);
    assert!(hub_value == "from-a" || hub_value == "from-b");
    assert_eq!(net.hub().get("/services/scale").status, 200);

    let conflicts = net.hub().get("/v1/edge/conflicts").json();
    let c = conflicts
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == "global/mode")
        .unwrap_or_else(|| panic!("conflict not listed: {conflicts}"));
    assert_eq!(c["kind"], "kv");
    assert!(c["local"]["body"]["value"].is_string() && c["remote"]["body"]["value"].is_string());
    assert!(c["winner"] == "local" || c["winner"] == "remote");
    let winner = if c["winner"] == "local" {
        &c["local"]
    } else {
        &c["remote"]
    };
    assert_eq!(
        winner["body"]["value"],
        Value::String(hub_value.clone()),
        "listed winner is what everyone has"
    );
    let edges = net.hub().get("/v1/edge/edges").json();
    assert!(edges
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["pending_conflicts"].as_u64() > Some(0)));
}

#[test]
fn ten_thousand_offline_changes_drain_after_reconnect() {
    let mut net = net(1, "sync: {max_batch_bytes: 64Ki}\n");
    net.hub.take().unwrap().stop();
    let a = &net.edges[0];
    // Konsul's batch route: 1,000 keys per request, one transaction each.
    for chunk in 0..10 {
        let items: serde_json::Map<String, Value> = (chunk * 1000..(chunk + 1) * 1000)
            .map(|i| (format!("sensor/{i}"), Value::String(format!("reading {i}"))))
            .collect();
        let r = a.req(
            "POST",
            "/batch/kv/set",
            Some(&serde_json::json!({ "items": items }).to_string()),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["count"], 1000);
    }
    assert_eq!(a.get("/v1/edge/status").json()["outbox_pending"], 10_000);
    net.hub = Some(Daemon::start_hub(&net.hub_dir));
    sync(&net.edges[0]);
    let keys = net.hub().get("/kv/").json();
    assert_eq!(keys.as_array().unwrap().len(), 10_000);
    assert_eq!(
        kv(net.hub(), "sensor/9999").as_deref(),
        Some("reading 9999")
    );
    let edge = &net.hub().get("/v1/edge/edges").json()[0];
    assert_eq!(edge["applied"], 10_000, "each change applied once");
}

#[test]
fn kill_9_mid_sync_loses_and_duplicates_nothing() {
    let hub_dir = tempfile::tempdir().unwrap();
    hub_config(hub_dir.path(), "127.0.0.1:0", "");
    let hub = Daemon::start_as(
        hub_dir.path(),
        "hub",
        &[("KONSUL_TEST_HOOKS", "1"), ("KONSUL_LOG", "debug")],
    );
    let edge_dir = tempfile::tempdir().unwrap();
    edge_config(edge_dir.path(), "edge-a", &hub.addr, "");
    let mut a = Daemon::start(edge_dir.path());
    for i in 0..50 {
        assert_eq!(
            a.put(
                "/register",
                &format!(r#"{{"name":"svc-{i}","address":"10.0.0.{i}","port":80}}"#)
            )
            .status,
            200
        );
    }
    // Hold the hub's store so the edge's request is in flight, then kill
    // the edge before it can see the answer.
    assert_eq!(
        hub.req("POST", "/v1/edge/debug/wedge-store?ms=1500", None)
            .status,
        200
    );
    assert_eq!(a.req("POST", "/v1/edge/sync/now", None).status, 202);
    // The hub has read the whole request (it logs before applying).
    hub.wait_log(|l| l.contains("sync from edge-a: 50 updates"))
        .expect("the edge's batch reached the hub");
    a.kill9();
    // The hub applies the batch once its store is free.
    eventually("the hub to apply the batch", || {
        hub.get("/services/").json().as_array().map(|s| s.len()) == Some(50)
    });
    let a = Daemon::start(edge_dir.path());
    assert_eq!(
        a.get("/v1/edge/status").json()["outbox_pending"],
        50,
        "nothing was acknowledged before the kill"
    );
    sync(&a);
    let edges = hub.get("/v1/edge/edges").json();
    assert_eq!(
        edges[0]["applied"], 50,
        "the retried batch was not applied twice: {edges}"
    );
    assert_eq!(hub.get("/services/").json().as_array().unwrap().len(), 50);
    assert_eq!(a.get("/services/").json().as_array().unwrap().len(), 50);
}

#[test]
fn an_edge_that_lost_its_disk_gets_its_records_back() {
    let net = net(1, "");
    let mut a = net.edges.into_iter().next().unwrap();
    for name in ["till-1", "till-2", "printer"] {
        assert_eq!(
            a.put(
                "/register",
                &format!(r#"{{"name":"{name}","address":"10.9.0.1","port":631}}"#)
            )
            .status,
            200
        );
    }
    assert_eq!(
        a.put("/kv/local/setting", r#"{"value":"kept"}"#).status,
        200
    );
    sync(&a);
    a.stop();
    for f in ["edge.db", "edge.db-wal", "edge.db-shm"] {
        let _ = std::fs::remove_file(a.dir.join(f));
    }
    let a = Daemon::start(&a.dir);
    assert_eq!(a.get("/services/").json().as_array().unwrap().len(), 0);
    sync(&a);
    let names: Vec<String> = a
        .get("/services/")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(kv(&a, "local/setting").as_deref(), Some("kept"));
    // and it can keep writing: the recovered versions are its own history
    assert_eq!(
        a.put("/kv/local/setting", r#"{"value":"changed"}"#).status,
        200
    );
    sync(&a);
    assert_eq!(
        kv(net.hub.as_ref().unwrap(), "local/setting").as_deref(),
        Some("changed")
    );
    assert!(net
        .hub
        .as_ref()
        .unwrap()
        .get("/v1/edge/conflicts")
        .json()
        .as_array()
        .unwrap()
        .is_empty());
}
