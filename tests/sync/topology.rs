//! Beyond one edge and one hub: paged downloads, records held for edges
//! outside the hub's own limit, a hub syncing upstream with the same
//! client, and the offline queue's limit.

use super::*;

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
    assert_eq!(service_addresses(&cloud), ["10.1.1.1", "10.1.1.2"]);
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
