//! What a hub refuses and what it requires: malformed, truncated and
//! oversized bodies, tokens from every host, mutual TLS; and tombstone
//! collection after the retention.

use super::*;

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
