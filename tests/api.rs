//! The Konsul-compatible HTTP API against the real daemon.

mod common;

use common::*;
use serde_json::json;

#[test]
fn register_list_get_deregister_services() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());

    let r = d.put(
        "/register",
        r#"{"name":"web","address":"10.0.0.5","port":8080,"tags":["http","v1"],"meta":{"zone":"a"}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["message"], "service registered");
    assert_eq!(j["service"]["name"], "web");
    assert_eq!(j["service"]["id"], "web", "id defaults to the name");
    let idx = j["modify_index"].as_u64().unwrap();
    assert!(idx > 0);

    // a second instance of the same name
    let r = d.put(
        "/register",
        r#"{"id":"web-2","name":"web","address":"10.0.0.6","port":8080}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());

    let list = d.get("/services/").json();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(list.as_array().unwrap().iter().all(|s| s["name"] == "web"));

    let one = d.get("/services/web").json();
    assert_eq!(one["address"], "10.0.0.5");
    assert_eq!(one["tags"], json!(["http", "v1"]));
    let meta = d.get("/services/web?metadata=true").json();
    assert_eq!(meta["modify_index"].as_u64(), Some(idx));
    assert_eq!(meta["create_index"].as_u64(), Some(idx));
    assert!(meta["service"]["meta"]["zone"] == "a");

    let r = d.put("/heartbeat/web", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["message"], "heartbeat updated");
    assert_eq!(d.put("/heartbeat/nope", "").status, 404);

    // CAS on deregister: a stale index is refused
    let r = d.delete(&format!("/deregister/web?cas={}", idx + 100));
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.json()["error"], "CAS conflict");
    let r = d.delete("/deregister/web");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"message": "service deregistered", "name": "web"})
    );
    assert_eq!(d.get("/services/").json().as_array().unwrap().len(), 1);
    assert_eq!(
        d.get("/services/web").json()["id"],
        "web-2",
        "the other instance answers for the name"
    );
    let r = d.delete("/deregister/web");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "Not Found");
}

#[test]
fn kv_with_cas() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let r = d.put("/kv/config/db/url", r#"{"value":"postgres://x","cas":0}"#);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["message"], "key set");
    let i1 = r.json()["modify_index"].as_u64().unwrap();

    // cas=0 means create-only
    let r = d.put("/kv/config/db/url", r#"{"value":"other","cas":0}"#);
    assert_eq!(r.status, 409);
    // non-zero cas on a missing key is 404
    assert_eq!(d.put("/kv/missing", r#"{"value":"v","cas":3}"#).status, 404);
    // stale index
    assert_eq!(
        d.put(
            "/kv/config/db/url",
            &format!(r#"{{"value":"v","cas":{}}}"#, i1 + 1)
        )
        .status,
        409
    );
    // the right index, given as ?cas= like Consul
    let r = d.put(
        &format!("/kv/config/db/url?cas={i1}"),
        r#"{"value":"v2","flags":42}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let i2 = r.json()["modify_index"].as_u64().unwrap();
    assert!(i2 > i1);

    assert_eq!(
        d.get("/kv/config/db/url").json(),
        json!({"key": "config/db/url", "value": "v2"})
    );
    let m = d.get("/kv/config/db/url?metadata=true").json();
    assert_eq!(
        (
            m["modify_index"].as_u64(),
            m["create_index"].as_u64(),
            m["flags"].as_u64()
        ),
        (Some(i2), Some(i1), Some(42))
    );
    assert_eq!(d.get("/kv/").json(), json!(["config/db/url"]));
    // percent-encoded key names reach the same key
    assert_eq!(d.get("/kv/config%2Fdb%2Furl").json()["value"], "v2");

    assert_eq!(d.delete(&format!("/kv/config/db/url?cas={i1}")).status, 409);
    let r = d.delete(&format!("/kv/config/db/url?cas={i2}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["message"], "key deleted");
    assert_eq!(d.get("/kv/config/db/url").status, 404);
    assert_eq!(d.get("/kv/").json(), json!([]));
}

#[test]
fn bad_requests_get_4xx_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    assert_eq!(
        d.put(
            "/register",
            r#"{"name":"seed","address":"10.0.0.1","port":1}"#
        )
        .status,
        200
    );
    assert_eq!(d.put("/kv/seed", r#"{"value":"1"}"#).status, 200);
    let before = d.snapshot();

    let long_tag = format!(
        r#"{{"name":"x","address":"a","port":1,"tags":["{}"]}}"#,
        "t".repeat(256)
    );
    let many_tags = format!(
        r#"{{"name":"x","address":"a","port":1,"tags":[{}]}}"#,
        (0..65)
            .map(|i| format!("\"t{i}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        ("PUT", "/register", "{not json".into(), 400, "Invalid JSON"),
        (
            "PUT",
            "/register",
            r#"{"name":"x","address":"a","port":"80"}"#.into(),
            400,
            "Invalid JSON",
        ),
        (
            "PUT",
            "/register",
            r#"{"name":"","address":"a","port":80}"#.into(),
            400,
            "name",
        ),
        (
            "PUT",
            "/register",
            r#"{"name":"x","port":80}"#.into(),
            400,
            "address",
        ),
        (
            "PUT",
            "/register",
            r#"{"name":"x","address":"a","port":0}"#.into(),
            400,
            "port",
        ),
        (
            "PUT",
            "/register",
            r#"{"name":"x","address":"a","port":70000}"#.into(),
            400,
            "port",
        ),
        (
            "PUT",
            "/register",
            r#"{"name":"x y","address":"a","port":1}"#.into(),
            400,
            "name",
        ),
        (
            "PUT",
            "/register",
            r#"{"name":"x","address":"a","port":1,"tags":["bad tag"]}"#.into(),
            400,
            "tags",
        ),
        ("PUT", "/register", long_tag, 400, "tags"),
        ("PUT", "/register", many_tags, 400, "tags"),
        (
            "PUT",
            "/register",
            r#"{"name":"x","address":"a","port":1,"meta":{"konsul_x":"1"}}"#.into(),
            400,
            "reserved",
        ),
        (
            "PUT",
            "/register",
            r#"{"name":"x","address":"a","port":1,"meta":{"bad key":"1"}}"#.into(),
            400,
            "meta",
        ),
        (
            "PUT",
            "/register",
            r#"{"name":"x","address":"a","port":1,"ttl":"soon"}"#.into(),
            400,
            "ttl",
        ),
        (
            "PUT",
            "/register",
            r#"{"name":"seed","address":"10.0.0.9","port":1,"cas":0}"#.into(),
            409,
            "CAS",
        ),
        (
            "PUT",
            "/kv/seed",
            r#"{"value":5}"#.into(),
            400,
            "Invalid JSON",
        ),
        (
            "PUT",
            "/kv/seed",
            r#"{"value":"x","cas":"1"}"#.into(),
            400,
            "Invalid JSON",
        ),
        (
            "PUT",
            "/kv/seed?cas=abc",
            r#"{"value":"x"}"#.into(),
            400,
            "CAS",
        ),
        ("DELETE", "/kv/seed?cas=-1", String::new(), 400, "CAS"),
        ("POST", "/services/", String::new(), 405, "method"),
        ("DELETE", "/register", String::new(), 405, "method"),
        ("PATCH", "/kv/seed", String::new(), 405, "method"),
        ("GET", "/nowhere", String::new(), 404, "no route"),
    ];
    for (method, path, body, want, text) in &cases {
        let r = d.req(
            method,
            path,
            if body.is_empty() { None } else { Some(body) },
        );
        assert_eq!(r.status, *want, "{method} {path} {body}: {}", r.text());
        let j = r.json();
        assert!(j["error"].is_string(), "{method} {path}: error field");
        assert!(
            j["message"]
                .as_str()
                .unwrap_or("")
                .to_lowercase()
                .contains(&text.to_lowercase()),
            "{method} {path}: message {:?} lacks {text:?}",
            j["message"]
        );
    }

    // An oversized body is refused from its Content-Length, before reading.
    let huge = vec![b'x'; 2 << 20];
    let r = request(&d.addr, "PUT", "/kv/big", Some(&huge), &[]);
    assert_eq!(r.status, 413, "{}", r.text());
    // ... and when streamed without a length (chunked), at the limit.
    let r = chunked_put(&d.addr, "/kv/big", 2 << 20);
    assert_eq!(r.status, 413, "{}", r.text());

    assert_eq!(d.snapshot(), before, "a rejected request changed state");
    let metrics = d.get("/metrics").text();
    assert!(metrics.contains("konsul_edge_http_rejected_bodies_total"));
    assert!(metrics.contains("route=\"/register\",code=\"400\""));
}

fn chunked_put(addr: &str, path: &str, total: usize) -> Resp {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n{}\r\n",
        token_header(addr)
    );
    s.write_all(head.as_bytes()).unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = 0;
    while sent < total {
        if s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .is_err()
            || s.write_all(&chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break; // the server answered and closed
        }
        sent += chunk.len();
    }
    let _ = s.write_all(b"0\r\n\r\n");
    read_response(&mut s)
}

#[test]
fn health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    d.put("/register", r#"{"name":"a","address":"h","port":1}"#);
    let h = d.get("/health").json();
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["node_id"], "test-node");
    assert_eq!(h["services"]["total"], 1);
    assert_eq!(d.get("/health/live").json()["status"], "alive");
    assert_eq!(d.get("/health/ready").json()["status"], "ready");
    let r = d.get("/metrics");
    assert!(r
        .headers
        .to_lowercase()
        .contains("content-type: text/plain"));
    let m = r.text();
    assert!(m.contains("konsul_edge_records{kind=\"service\"} 1"), "{m}");
    assert!(m.contains("konsul_edge_outbox_pending 1"), "{m}");
    // every sample line is `name{labels} value` with a numeric value
    for line in m.lines().filter(|l| !l.starts_with('#')) {
        let v = line.rsplit(' ').next().unwrap();
        assert!(v.parse::<f64>().is_ok(), "bad sample line {line:?}");
    }
}

#[test]
fn ttl_services_go_critical_and_heartbeats_revive_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let r = d.put(
        "/register",
        r#"{"name":"ttl","address":"h","port":1,"ttl":"1s"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let e = d.get("/v1/edge/services").json();
    assert_eq!(e[0]["health"], "passing");
    assert!(e[0]["expires_at"].is_string());
    // Waiting for a real 1s TTL to lapse is the behaviour under test; poll
    // the observable state with a deadline rather than sleeping blind.
    let end = std::time::Instant::now() + DEADLINE;
    while d.get("/services/").json().as_array().unwrap().len() == 1 {
        assert!(std::time::Instant::now() < end, "TTL never lapsed");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(d.get("/v1/edge/services").json()[0]["health"], "critical");
    assert_eq!(d.get("/services/ttl").status, 404);
    assert_eq!(d.put("/heartbeat/ttl", "").status, 200);
    assert_eq!(d.get("/services/ttl").status, 200);
}

#[test]
fn sync_status_tracks_the_outbox_without_a_hub() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let s = d.get("/v1/edge/sync").json();
    assert_eq!(s["enabled"], false);
    assert_eq!(s["online"], false);
    d.put("/kv/a", r#"{"value":"1"}"#);
    d.put("/kv/b", r#"{"value":"1"}"#);
    d.put("/kv/a", r#"{"value":"2"}"#);
    // The count is updated by a task woken by the change; wait for it with
    // a deadline instead of assuming it already ran.
    let end = std::time::Instant::now() + DEADLINE;
    while d.get("/v1/edge/sync").json()["pending_changes"] != 2 {
        assert!(
            std::time::Instant::now() < end,
            "pending_changes never reached 2"
        );
        std::thread::yield_now();
    }
    let r = d.req("POST", "/v1/edge/sync/now", None);
    assert_eq!(r.status, 503, "no hub configured: {}", r.text());
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("cloud.server_address"));
}

#[test]
fn batch_kv_routes_are_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let r = d.req(
        "POST",
        "/batch/kv/set",
        Some(r#"{"items":{"a":"1","b":"2"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["count"], 2);
    let r = d.req("POST", "/batch/kv/get", Some(r#"{"keys":["a","zz"]}"#));
    assert_eq!(r.json(), json!({"found": {"a": "1"}, "not_found": ["zz"]}));
    let before = d.snapshot();
    // one bad key refuses the whole batch
    let r = d.req(
        "POST",
        "/batch/kv/set",
        Some(r#"{"items":{"c":"3","":"4"}}"#),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let big: serde_json::Map<String, serde_json::Value> =
        (0..1001).map(|i| (format!("k{i}"), json!("v"))).collect();
    let r = d.req(
        "POST",
        "/batch/kv/set",
        Some(&json!({ "items": big }).to_string()),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        d.req("POST", "/batch/kv/set", Some(r#"{"items":{}}"#))
            .status,
        400
    );
    assert_eq!(d.get("/batch/kv/set").status, 405);
    assert_eq!(d.snapshot(), before);
    let r = d.req("POST", "/batch/kv/delete", Some(r#"{"keys":["a","nope"]}"#));
    assert_eq!(r.json()["keys"], json!(["a"]));
    assert_eq!(d.get("/kv/").json(), json!(["b"]));
}
