//! Offline-first sync with real processes: a hub and edges on ephemeral
//! ports, each with its own SQLite file.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn hub_config(dir: &Path, listen: &str, extra: &str) {
    std::fs::write(
        dir.join("edge.yaml"),
        format!(
            "node_id: hub\nstorage: {{path: {}}}\nhttp: {{listen: '{listen}'}}\n{extra}",
            dir.join("hub.db").display()
        ),
    )
    .unwrap();
}

fn edge_config(dir: &Path, id: &str, hub: &str, extra: &str) {
    std::fs::write(
        dir.join("edge.yaml"),
        format!(
            "node_id: {id}\nstorage: {{path: {}, max_size: 64Mi}}\nhttp: {{listen: '127.0.0.1:0'}}\n\
             services: {{max_local_services: 1000}}\n\
             cloud: {{server_address: 'http://{hub}', sync_interval: 1h}}\n{extra}",
            dir.join("edge.db").display()
        ),
    )
    .unwrap();
}

struct Net {
    _dirs: Vec<tempfile::TempDir>,
    hub_dir: std::path::PathBuf,
    hub: Option<Daemon>,
    edges: Vec<Daemon>,
}

/// A hub and `n` edges (edge-a, edge-b, ...).
fn net(n: usize, edge_extra: &str) -> Net {
    let hub_dir = tempfile::tempdir().unwrap();
    hub_config(hub_dir.path(), "127.0.0.1:0", "");
    let hub = Daemon::start_hub(hub_dir.path());
    let hub_addr = hub.addr.clone();
    // Pin the port so the hub can come back on the same address.
    hub_config(hub_dir.path(), &hub_addr, "");
    let mut dirs = vec![];
    let mut edges = vec![];
    for i in 0..n {
        let d = tempfile::tempdir().unwrap();
        let id = format!("edge-{}", (b'a' + i as u8) as char);
        edge_config(d.path(), &id, &hub_addr, edge_extra);
        edges.push(Daemon::start(d.path()));
        dirs.push(d);
    }
    let hub_path = hub_dir.path().to_path_buf();
    dirs.push(hub_dir);
    Net {
        _dirs: dirs,
        hub_dir: hub_path,
        hub: Some(hub),
        edges,
    }
}

impl Net {
    fn hub(&self) -> &Daemon {
        self.hub.as_ref().expect("hub running")
    }
}

/// Asks `d` to sync and waits until a sync finished after the request with
/// nothing pending.
fn sync(d: &Daemon) {
    let before = d.get("/v1/edge/sync").json()["last_sync_ms"]
        .as_u64()
        .unwrap_or(0);
    let r = d.req("POST", "/v1/edge/sync/now", None);
    assert_eq!(r.status, 202, "{}", r.text());
    eventually("a completed sync", || {
        let s = d.get("/v1/edge/sync").json();
        s["last_sync_ms"].as_u64().unwrap_or(0) > before && s["pending_changes"] == 0
    });
}

fn kv(d: &Daemon, key: &str) -> Option<String> {
    let r = d.get(&format!("/kv/{key}"));
    (r.status == 200).then(|| r.json()["value"].as_str().unwrap().to_owned())
}

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
    let mut addrs: Vec<String> = hub
        .get("/services/")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["address"].as_str().unwrap().to_owned())
        .collect();
    addrs.sort();
    assert_eq!(addrs, ["10.0.0.1", "10.0.0.2"]);
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

#[test]
fn malformed_truncated_and_oversized_sync_bodies_get_4xx_and_change_nothing() {
    let hub_dir = tempfile::tempdir().unwrap();
    hub_config(hub_dir.path(), "127.0.0.1:0", "");
    let hub = Daemon::start_hub(hub_dir.path());
    assert_eq!(hub.put("/kv/k", r#"{"value":"v"}"#).status, 200);
    let before = hub.snapshot();
    let proto = [("Content-Type", "application/x-protobuf")];
    let snappy = [
        ("Content-Type", "application/x-protobuf"),
        ("Content-Encoding", "snappy"),
    ];
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let cases: Vec<(Headers, Vec<u8>, u16)> = vec![
        (&snappy, b"this is not snappy".to_vec(), 400),
        (&proto, vec![0x0a, 0x20, b'e'], 400), // truncated field
        (&proto, vec![0xff; 64], 400),         // invalid wire type
        (&proto, vec![0x0a, 0x00], 400),       // empty edge_id
        (&[("Content-Type", "application/json")], b"{}".to_vec(), 415),
        (
            &[
                ("Content-Type", "application/x-protobuf"),
                ("Content-Encoding", "gzip"),
            ],
            vec![],
            415,
        ),
        (&proto, vec![0u8; 2 << 20], 413), // over http.max_body_size
        // a syntactically valid request whose update has an invalid body
        (&proto, invalid_update_request(), 400),
    ];
    for (headers, body, want) in cases {
        let r = request(&hub.addr, "POST", "/v1/edge/sync", Some(&body), headers);
        assert_eq!(r.status, want, "{headers:?}: {}", r.text());
    }
    assert_eq!(hub.snapshot(), before, "a refused sync body changed state");
    assert!(hub
        .get("/v1/edge/edges")
        .json()
        .as_array()
        .unwrap()
        .is_empty());
    // an edge node is not a hub
    let dir = tempfile::tempdir().unwrap();
    let e = Daemon::start(dir.path());
    assert_eq!(
        request(&e.addr, "POST", "/v1/edge/sync", Some(b""), &proto).status,
        404
    );
}

/// EdgeSyncRequest{edge_id:"e", pending_updates:[{kind:KV, key:"k", body:"[1]", ...}]}
/// encoded by hand, so the test does not share the code under test.
fn invalid_update_request() -> Vec<u8> {
    fn field(tag: u8, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![tag, bytes.len() as u8];
        v.extend_from_slice(bytes);
        v
    }
    let mut update = vec![0x08, 0x02]; // kind = KV
    update.extend(field(0x12, b"k")); // key
    update.extend(field(0x22, b"[1]")); // body: not an object
    update.extend([0x28, 0x01]); // hlc = 1
    update.extend(field(0x32, b"e")); // origin
    let mut entry = field(0x0a, b"e");
    entry.extend([0x10, 0x01]);
    update.extend(field(0x3a, &entry)); // vector_clock {e: 1}
    let mut req = field(0x0a, b"e");
    req.extend(field(0x1a, &update));
    req
}

fn metric(d: &Daemon, name: &str) -> u64 {
    d.metric(&format!("{name} "))
        .unwrap_or_else(|| panic!("no metric {name}"))
}

#[test]
fn an_edge_collects_its_synced_tombstones_after_the_retention() {
    let hub_dir = tempfile::tempdir().unwrap();
    hub_config(hub_dir.path(), "127.0.0.1:0", "");
    let hub = Daemon::start_hub(hub_dir.path());
    let dir = tempfile::tempdir().unwrap();
    edge_config(
        dir.path(),
        "edge-gc",
        &hub.addr,
        "sync: {tombstone_retention: 1s}\n",
    );
    let edge = Daemon::start(dir.path());
    assert_eq!(
        edge.put("/register", r#"{"name":"gone","address":"h","port":1}"#)
            .status,
        200
    );
    assert_eq!(edge.req("PUT", "/deregister/gone", None).status, 200);
    sync(&edge);
    assert_eq!(hub.get("/services/gone").status, 404);
    assert_eq!(metric(&edge, "konsul_edge_tombstones"), 1, "kept for now");

    // Once the retention has passed, the next sync collects it.
    eventually("the tombstone collected", || {
        sync(&edge);
        metric(&edge, "konsul_edge_tombstones") == 0
    });
    sync(&edge);
    assert_eq!(edge.get("/services/gone").status, 404, "not resurrected");
    assert_eq!(hub.get("/services/gone").status, 404);
}

/// This host's address on a non-loopback interface, if it has one (a UDP
/// "connect" only picks the route; nothing is sent).
fn non_loopback_ip() -> Option<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn a_hub_with_a_token_requires_it_from_every_host_loopback_included() {
    let Some(ip) = non_loopback_ip() else {
        eprintln!("\n*** SKIPPED: no non-loopback IPv4 address on this host ***\n");
        return;
    };
    let hub_dir = tempfile::tempdir().unwrap();
    std::fs::write(hub_dir.path().join("tokens"), "s3cret-a\n").unwrap();
    hub_config(
        hub_dir.path(),
        "0.0.0.0:0",
        &format!(
            "sync: {{auth_token_file: {}}}\n",
            hub_dir.path().join("tokens").display()
        ),
    );
    let hub = Daemon::start_hub(hub_dir.path());
    let port = hub.addr.rsplit_once(':').unwrap().1;
    let remote = format!("{ip}:{port}");
    let local = format!("127.0.0.1:{port}");
    let put = |addr: &str, headers: &[(&str, &str)]| {
        request(
            addr,
            "PUT",
            "/kv/global/mode",
            Some(br#"{"value":"x"}"#),
            headers,
        )
        .status
    };

    assert_eq!(put(&remote, &[]), 401, "no token from another host");
    assert_eq!(
        put(&remote, &[("Authorization", "Bearer wrong")]),
        401,
        "a wrong token"
    );
    assert_eq!(
        request(&remote, "GET", "/v1/edge/edges", None, &[]).status,
        401,
        "reads too"
    );
    assert_eq!(
        kv(&hub, "global/mode"),
        None,
        "a refused write changes nothing"
    );
    assert_eq!(put(&remote, &[("Authorization", "Bearer s3cret-a")]), 200);
    assert_eq!(kv(&hub, "global/mode").as_deref(), Some("x"));
    // Loopback is not special: on a device every local user shares it.
    let anon_local = request_anon(
        &local,
        "PUT",
        "/kv/global/mode",
        Some(br#"{"value":"y"}"#),
        &[],
    );
    assert_eq!(anon_local.status, 401, "loopback without a token");
    assert_eq!(put(&local, &[("Authorization", "Bearer s3cret-a")]), 200);
    let metrics = hub.get("/metrics").text();
    assert!(
        metrics.contains(r#"route="unauthorized""#),
        "refusals are counted: {metrics}"
    );
}

#[test]
fn the_hub_refuses_edges_without_its_token() {
    let hub_dir = tempfile::tempdir().unwrap();
    std::fs::write(hub_dir.path().join("tokens"), "# edge tokens\ns3cret-a\n").unwrap();
    hub_config(
        hub_dir.path(),
        "127.0.0.1:0",
        &format!(
            "sync: {{auth_token_file: {}}}\n",
            hub_dir.path().join("tokens").display()
        ),
    );
    let hub = Daemon::start_hub(hub_dir.path());
    let good = tempfile::tempdir().unwrap();
    std::fs::write(good.path().join("token"), "s3cret-a\n").unwrap();
    std::fs::write(
        good.path().join("edge.yaml"),
        format!(
            "node_id: edge-a\nstorage: {{path: {}}}\nhttp: {{listen: '127.0.0.1:0'}}\ncloud: {{server_address: 'http://{}', sync_interval: 1h, token_file: {}}}\n",
            good.path().join("edge.db").display(),
            hub.addr,
            good.path().join("token").display()
        ),
    )
    .unwrap();
    let a = Daemon::start(good.path());
    a.put("/kv/x", r#"{"value":"1"}"#);
    sync(&a);
    assert_eq!(kv(&hub, "x").as_deref(), Some("1"));

    let bad = tempfile::tempdir().unwrap();
    edge_config(bad.path(), "edge-b", &hub.addr, "");
    let b = Daemon::start(bad.path());
    b.put("/kv/y", r#"{"value":"1"}"#);
    assert_eq!(b.req("POST", "/v1/edge/sync/now", None).status, 202);
    eventually("edge B to be refused", || {
        b.get("/v1/edge/sync").json()["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("401"))
    });
    assert_eq!(kv(&hub, "y"), None);
}

#[test]
fn https_with_client_certificates() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let p = |f: &str| pki.path().join(f).display().to_string();
    let hub_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        hub_dir.path().join("edge.yaml"),
        format!(
            "node_id: hub\nstorage: {{path: {}}}\nhttp: {{listen: '127.0.0.1:0', tls_cert: {}, tls_key: {}, client_ca: {}}}\n",
            hub_dir.path().join("hub.db").display(),
            p("server.pem"),
            p("server.key"),
            p("ca.pem")
        ),
    )
    .unwrap();
    let hub = Daemon::start_hub(hub_dir.path());
    let port = hub.addr.rsplit(':').next().unwrap().to_owned();
    let edge = |id: &str, client: bool| {
        let d = tempfile::tempdir().unwrap();
        let client_keys = if client {
            format!(
                ", client_cert: {}, client_key: {}",
                p("client.pem"),
                p("client.key")
            )
        } else {
            String::new()
        };
        std::fs::write(
            d.path().join("edge.yaml"),
            format!(
                "node_id: {id}\nstorage: {{path: {}}}\nhttp: {{listen: '127.0.0.1:0'}}\n\
                 cloud: {{server_address: 'https://localhost:{port}', sync_interval: 1h, ca_file: {}{client_keys}}}\n",
                d.path().join("edge.db").display(),
                p("ca.pem")
            ),
        )
        .unwrap();
        d
    };
    // The hub only speaks TLS with client certificates: ask it with curl.
    let hub_kv = |key: &str| -> Option<String> {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "--cacert",
                &p("ca.pem"),
                "--cert",
                &p("client.pem"),
                "--key",
                &p("client.key"),
            ])
            .arg(format!("https://localhost:{port}/kv/{key}"))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["value"].as_str().map(str::to_owned)
    };
    let with_cert = edge("edge-a", true);
    let a = Daemon::start(with_cert.path());
    assert_eq!(a.put("/kv/over-tls", r#"{"value":"yes"}"#).status, 200);
    sync(&a);
    assert_eq!(hub_kv("over-tls").as_deref(), Some("yes"));

    let without = edge("edge-b", false);
    let b = Daemon::start(without.path());
    assert_eq!(b.put("/kv/no-cert", r#"{"value":"x"}"#).status, 200);
    assert_eq!(b.req("POST", "/v1/edge/sync/now", None).status, 202);
    eventually("edge B to be refused by the TLS handshake", || {
        b.get("/v1/edge/sync").json()["last_error"].is_string()
    });
    assert_eq!(hub_kv("no-cert"), None);
    assert!(b.get("/v1/edge/sync").json()["last_error"]
        .as_str()
        .unwrap()
        .contains("client certificate"));
    // plain HTTP to the TLS port gets nowhere either
    let plain = std::net::TcpStream::connect(&hub.addr).map(|mut s| {
        use std::io::{Read, Write};
        let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf
    });
    assert!(!String::from_utf8_lossy(&plain.unwrap()).contains("healthy"));
    drop(hub);
}

#[test]
fn a_large_download_is_paged_until_more_is_false() {
    let net = net(1, "");
    let hub = net.hub();
    // ~5,000 global keys of ~150 bytes: more than one 256 KiB page.
    for chunk in 0..5 {
        let items: serde_json::Map<String, Value> = (chunk * 1000..(chunk + 1) * 1000)
            .map(|i| {
                (
                    format!("catalog/item-{i:05}"),
                    Value::String(format!("{i}-{}", "x".repeat(100))),
                )
            })
            .collect();
        let r = hub.req(
            "POST",
            "/batch/kv/set",
            Some(&serde_json::json!({ "items": items }).to_string()),
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let a = &net.edges[0];
    sync(a);
    assert_eq!(a.get("/kv/").json().as_array().unwrap().len(), 5000);
    let metrics = a.get("/metrics").text();
    let requests: u64 = metrics
        .lines()
        .find(|l| l.starts_with("konsul_edge_sync_requests_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(
        requests >= 3,
        "5,000 keys came in one response: {requests} requests"
    );
    assert_eq!(kv(a, "catalog/item-04999").unwrap().len(), 105);
}

#[test]
fn records_held_for_edges_do_not_count_against_the_hubs_own_limit() {
    let hub_dir = tempfile::tempdir().unwrap();
    hub_config(
        hub_dir.path(),
        "127.0.0.1:0",
        "services: {max_local_services: 2}\n",
    );
    let hub = Daemon::start_hub(hub_dir.path());
    let d = tempfile::tempdir().unwrap();
    edge_config(d.path(), "edge-a", &hub.addr, "");
    let a = Daemon::start(d.path());
    for i in 0..3 {
        assert_eq!(
            a.put(
                "/register",
                &format!(r#"{{"name":"s{i}","address":"h","port":1}}"#)
            )
            .status,
            200
        );
    }
    sync(&a);
    assert_eq!(hub.get("/services/").json().as_array().unwrap().len(), 3);
    assert_eq!(
        hub.put("/register", r#"{"name":"hub-own","address":"h","port":1}"#)
            .status,
        200
    );
    assert_eq!(
        hub.put(
            "/register",
            r#"{"name":"hub-own-2","address":"h","port":1}"#
        )
        .status,
        200
    );
    assert_eq!(
        hub.put(
            "/register",
            r#"{"name":"hub-own-3","address":"h","port":1}"#
        )
        .status,
        507
    );
}

/// A cloud hub and a site gateway (`site-1`, a hub with the cloud as its
/// own upstream); the temp dirs live as long as the first element.
fn cloud_and_site() -> ([tempfile::TempDir; 2], Daemon, Daemon) {
    let cloud_dir = tempfile::tempdir().unwrap();
    hub_config(cloud_dir.path(), "127.0.0.1:0", "");
    let cloud = Daemon::start_hub(cloud_dir.path());
    let site_dir = tempfile::tempdir().unwrap();
    std::fs::write(
        site_dir.path().join("edge.yaml"),
        format!(
            "node_id: site-1\nstorage: {{path: {}}}\nhttp: {{listen: '127.0.0.1:0'}}\n\
             cloud: {{server_address: 'http://{}', sync_interval: 1h}}\n",
            site_dir.path().join("site.db").display(),
            cloud.addr
        ),
    )
    .unwrap();
    let site = Daemon::start_hub(site_dir.path());
    ([cloud_dir, site_dir], cloud, site)
}

#[test]
fn a_hub_syncs_upstream_with_the_same_client() {
    // device -> site gateway (a hub with its own upstream) -> cloud hub
    let (_dirs, cloud, site) = cloud_and_site();
    let edge_dir = tempfile::tempdir().unwrap();
    edge_config(edge_dir.path(), "till-7", &site.addr, "");
    let edge = Daemon::start(edge_dir.path());

    assert_eq!(
        edge.put(
            "/register",
            r#"{"name":"till","address":"10.1.1.7","port":9100}"#
        )
        .status,
        200
    );
    sync(&edge);
    sync(&site);
    assert_eq!(cloud.get("/services/till").json()["address"], "10.1.1.7");
    let edges: Vec<Value> = cloud
        .get("/v1/edge/edges")
        .json()
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(edges.len(), 1);
    assert_eq!(
        edges[0]["edge_id"], "site-1",
        "the cloud sees the site, not each till"
    );

    assert_eq!(
        cloud.put("/kv/global/tax-rate", r#"{"value":"19"}"#).status,
        200
    );
    sync(&site);
    sync(&edge);
    assert_eq!(kv(&edge, "global/tax-rate").as_deref(), Some("19"));
}

#[test]
fn two_tills_with_the_same_service_behind_a_site_hub_both_reach_the_cloud() {
    let (_dirs, cloud, site) = cloud_and_site();
    let mut tills = vec![];
    let mut dirs = vec![];
    for (i, ip) in ["10.1.1.1", "10.1.1.2"].into_iter().enumerate() {
        let d = tempfile::tempdir().unwrap();
        edge_config(d.path(), &format!("till-{i}"), &site.addr, "");
        let t = Daemon::start(d.path());
        let body = format!(r#"{{"name":"till","address":"{ip}","port":9100}}"#);
        assert_eq!(t.put("/register", &body).status, 200);
        sync(&t);
        tills.push(t);
        dirs.push(d);
    }
    sync(&site);
    // The second till's record travels up qualified; both arrive.
    let mut addrs: Vec<String> = cloud
        .get("/services/")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["address"].as_str().unwrap().to_owned())
        .collect();
    addrs.sort();
    assert_eq!(addrs, ["10.1.1.1", "10.1.1.2"]);
    // Coming back down changes neither till.
    sync(&site);
    for (t, ip) in tills.iter().zip(["10.1.1.1", "10.1.1.2"]) {
        sync(t);
        assert_eq!(t.get("/services/till").json()["address"], ip);
    }
}

#[test]
fn reaching_the_offline_queue_size_is_visible_and_drops_nothing() {
    let d = tempfile::tempdir().unwrap();
    // A hub address nothing listens on: the uplink is down.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    edge_config(d.path(), "edge-q", &dead, "");
    let cfg = std::fs::read_to_string(d.path().join("edge.yaml")).unwrap();
    std::fs::write(
        d.path().join("edge.yaml"),
        cfg.replace(
            "sync_interval: 1h}",
            "sync_interval: 1h, offline_queue_size: 2}",
        ),
    )
    .unwrap();
    let a = Daemon::start(d.path());
    for k in ["a", "b", "c"] {
        assert_eq!(a.put(&format!("/kv/{k}"), r#"{"value":"1"}"#).status, 200);
    }
    assert_eq!(a.req("POST", "/v1/edge/sync/now", None).status, 202);
    eventually("queue_over_limit", || {
        a.get("/v1/edge/sync").json()["queue_over_limit"] == true
    });
    assert!(a
        .get("/metrics")
        .text()
        .contains("konsul_edge_sync_queue_over_limit 1"));
    assert_eq!(
        a.get("/v1/edge/status").json()["outbox_pending"],
        3,
        "nothing dropped"
    );
}
