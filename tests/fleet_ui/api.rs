//! The routes the fleet page reads, without a browser: paging, filters and
//! sorting on 120 simulated edges, the access rules, the page's files, and
//! the change feed's long poll (answered on a change, after its wait, and
//! at shutdown).

use std::time::{Duration, Instant};

use super::common::*;
use konsul_edge::sync::testing;
use serde_json::Value;

const ADMIN: &str = "fleet-admin-token-0123456789";
const VIEWER: &str = "fleet-viewer-token-0123456789";
const KV_ONLY: &str = "fleet-kv-token-0123456789";

fn hub() -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let policies = d.join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("viewer.json"),
        r#"{"name": "viewer", "edge": [{"path": "**", "capabilities": ["read", "list"]}]}"#,
    )
    .unwrap();
    std::fs::write(
        policies.join("kv.json"),
        r#"{"name": "kv", "kv": [{"path": "**", "capabilities": ["read", "list"]}]}"#,
    )
    .unwrap();
    let mut tokens = String::new();
    for (name, secret, policy) in [
        ("admin", ADMIN, "builtin:admin"),
        ("viewer", VIEWER, "viewer"),
        ("kv", KV_ONLY, "kv"),
    ] {
        let file = d.join(format!("{name}.token"));
        std::fs::write(&file, secret).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        tokens.push_str(&format!(
            "    - name: {name}\n      file: {}\n      policies: [\"{policy}\"]\n",
            file.display()
        ));
    }
    write_config(
        d,
        &format!(
            "cloud: {{sync_interval: 1m}}\nacl:\n  enabled: true\n  policy_dir: {}\n  tokens:\n{tokens}",
            policies.display()
        ),
    );
    let hub = Daemon::start_hub(d);
    (dir, hub)
}

fn get(hub: &Daemon, token: &str, path: &str) -> Resp {
    let auth = format!("Bearer {token}");
    let headers: &[(&str, &str)] = if token.is_empty() {
        &[]
    } else {
        &[("Authorization", &auth)]
    };
    request_anon(&hub.addr, "GET", path, None, headers)
}

fn ok_json(hub: &Daemon, path: &str) -> Value {
    let r = get(hub, ADMIN, path);
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.json()
}

/// Edge `sim-NNN` syncs once with `n` devices, the first one alerting.
fn sync_edge(hub: &Daemon, edge: &str, n: usize) {
    super::post_sync(hub, &testing::fleet_batch(edge, n, 1, false));
}

/// Requests the hub let through its access check so far (this one too).
fn allowed(hub: &Daemon) -> u64 {
    get(hub, ADMIN, "/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("konsul_edge_acl_decisions_total{result=\"allow\"} "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Starts a poll of the change feed past `index` in a thread, and returns
/// once the hub has let it through (a request other than our own look at
/// the counter): from there it waits for a change.
fn held_poll(hub: &Daemon, index: u64) -> std::thread::JoinHandle<(Resp, Duration)> {
    let before = allowed(hub);
    let addr = hub.addr.clone();
    let poll = std::thread::spawn(move || {
        let t = Instant::now();
        let r = request_anon(
            &addr,
            "GET",
            &format!("/v1/edge/fleet/changes?index={index}&wait_ms=20000"),
            None,
            &[("Authorization", &format!("Bearer {ADMIN}"))],
        );
        (r, t.elapsed())
    });
    wait_for("the poll to reach the hub", DEADLINE, || {
        (allowed(hub) > before + 1).then_some(())
    });
    poll
}

fn ids(v: &Value, key: &str) -> Vec<String> {
    v["items"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| i[key].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn fleet_routes_page_filter_sort_and_check_the_token() {
    let (_dir, hub) = hub();
    for e in 0..120 {
        sync_edge(&hub, &format!("sim-{e:03}"), e % 4);
    }

    // Paging: 120 edges, 50 a page, in edge order.
    let first = ok_json(&hub, "/v1/edge/fleet/edges");
    assert_eq!(first["total"], 120, "{first}");
    assert_eq!(ids(&first, "edge_id").len(), 50);
    assert_eq!(ids(&first, "edge_id")[0], "sim-000");
    let last = ok_json(&hub, "/v1/edge/fleet/edges?offset=100&limit=50");
    assert_eq!(ids(&last, "edge_id").len(), 20, "{last}");
    assert_eq!(ids(&last, "edge_id")[0], "sim-100");
    assert_eq!(first["stale_after_ms"], 125_000, "two 1m intervals and 5 s");

    // Sorting by a numeric column, both ways, and ties by edge id.
    let most = ok_json(&hub, "/v1/edge/fleet/edges?sort=devices&desc=1&limit=500");
    let counts: Vec<u64> = most["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["devices"].as_u64().unwrap())
        .collect();
    assert_eq!(counts.len(), 120);
    assert!(counts.windows(2).all(|w| w[0] >= w[1]), "{counts:?}");
    assert_eq!((counts[0], counts[119]), (3, 0));
    assert_eq!(
        ids(&most, "edge_id")[..2],
        ["sim-003", "sim-007"],
        "ties in id order, whichever way the column sorts"
    );
    let alerts: u64 = most["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["alerts"].as_u64().unwrap())
        .sum();
    assert_eq!(alerts, 90, "one active alert per edge with devices");
    let fewest = ok_json(&hub, "/v1/edge/fleet/edges?sort=devices&limit=3");
    assert_eq!(
        ids(&fewest, "edge_id"),
        ["sim-000", "sim-004", "sim-008"],
        "{fewest}"
    );

    // An edge's latest host OTA report shows with it.
    let report = r#"{"node_id":"sim-ota","deployment":"d1","rollout":"os-2","version":"2.0.0","state":"success","from_slot":"A","target_slot":"B","last_error":"","at_ms":1}"#;
    let body = testing::record_batch(
        "sim-ota",
        &[("rollout", "status/sim-ota".into(), report.into())],
        false,
    );
    let r = request_anon(
        &hub.addr,
        "POST",
        "/v1/edge/sync",
        Some(&body),
        &[("Content-Type", "application/x-protobuf")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let ota = ok_json(&hub, "/v1/edge/fleet/edges?q=sim-ota");
    assert_eq!(ota["items"][0]["ota_state"], "success", "{ota}");
    assert_eq!(ota["items"][0]["ota_version"], "2.0.0", "{ota}");
    assert_eq!(ota["items"][0]["ota_slot"], "A -> B", "{ota}");
    assert_eq!(ok_json(&hub, "/v1/edge/fleet/edges")["total"], 121);

    // Filters: text, staleness, edge, health.
    let found = ok_json(&hub, "/v1/edge/fleet/edges?q=SIM-01");
    assert_eq!(ids(&found, "edge_id")[0], "sim-010");
    assert_eq!(found["total"], 10, "{found}");
    assert_eq!(ok_json(&hub, "/v1/edge/fleet/edges?stale=1")["total"], 0);
    let devs = ok_json(&hub, "/v1/edge/fleet/devices?edge=sim-003");
    assert_eq!(
        ids(&devs, "id"),
        ["sim-003-d0", "sim-003-d1", "sim-003-d2"],
        "{devs}"
    );
    assert_eq!(devs["items"][0]["health"], "low_battery", "{devs}");
    assert_eq!(devs["items"][1]["health"], "ok", "{devs}");
    assert_eq!(devs["items"][0]["firmware_version"], "1.0.0", "{devs}");
    let low = ok_json(&hub, "/v1/edge/fleet/devices?health=low_battery&limit=500");
    assert_eq!(low["total"], 90, "{}", low["total"]);
    assert_eq!(
        ok_json(&hub, "/v1/edge/fleet/devices")["total"],
        (0..120).map(|e| e % 4).sum::<usize>()
    );
    let a = ok_json(&hub, "/v1/edge/fleet/alerts?edge=sim-002");
    assert_eq!(a["total"], 1, "{a}");
    assert_eq!(a["items"][0]["edge"], "sim-002", "{a}");
    assert_eq!(a["items"][0]["device_id"], "sim-002-d0", "{a}");

    for bad in ["limit=0", "limit=501", "offset=-1", "limit=x"] {
        let r = get(&hub, ADMIN, &format!("/v1/edge/fleet/edges?{bad}"));
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }

    // Access: the fleet routes need what the routes they summarise need.
    assert_eq!(get(&hub, VIEWER, "/v1/edge/fleet/edges").status, 200);
    assert_eq!(get(&hub, VIEWER, "/v1/edge/fleet/devices").status, 200);
    assert_eq!(get(&hub, KV_ONLY, "/v1/edge/fleet/edges").status, 403);
    assert_eq!(get(&hub, KV_ONLY, "/v1/edge/fleet/alerts").status, 403);
    let anon = get(&hub, "", "/v1/edge/fleet/edges").status;
    assert!(anon == 401 || anon == 403, "anonymous: {anon}");
    let pause = request_anon(
        &hub.addr,
        "POST",
        "/v1/edge/rollouts/x/pause",
        None,
        &[("Authorization", &format!("Bearer {VIEWER}"))],
    );
    assert_eq!(pause.status, 403, "a viewer cannot pause: {}", pause.text());

    // The page's files: no token needed, no data in them.
    // (Gzipped: the browser test shows every browser-side byte works.)
    let page = get(&hub, "", "/ui/");
    assert_eq!(page.status, 200);
    assert_eq!(page.body[..2], [0x1f, 0x8b], "a gzip member");
    let h = page.headers.to_ascii_lowercase();
    assert!(h.contains("content-type: text/html"), "{h}");
    assert!(h.contains("content-encoding: gzip"), "{h}");
    assert!(
        h.contains("content-security-policy: default-src 'none'"),
        "{h}"
    );
    let js = get(&hub, "", "/ui/app.js");
    assert_eq!(js.status, 200);
    assert!(js.headers.to_ascii_lowercase().contains("text/javascript"));
    let source = include_str!("../../src/http/ui/app.js");
    assert!(!source.contains("http://") && !source.contains("https://"));
    let moved = get(&hub, "", "/ui");
    assert_eq!(moved.status, 308);
    assert!(moved
        .headers
        .to_ascii_lowercase()
        .contains("location: /ui/"));
    assert_eq!(get(&hub, "", "/ui/secret.txt").status, 404);
}

#[test]
fn the_change_feed_poll_answers_on_a_change_after_its_wait_and_at_shutdown() {
    let (_dir, mut hub) = hub();
    sync_edge(&hub, "sim-a", 1);
    let now = ok_json(&hub, "/v1/edge/fleet/changes?index=0")["index"]
        .as_u64()
        .unwrap();
    assert!(now > 0);

    // Nothing changes: the poll answers after its wait, same index.
    let t = Instant::now();
    let same = ok_json(
        &hub,
        &format!("/v1/edge/fleet/changes?index={now}&wait_ms=1000"),
    );
    assert_eq!(same["index"], now);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );

    // A change answers a held poll at once.
    let held = held_poll(&hub, now);
    sync_edge(&hub, "sim-b", 1);
    let (r, took) = held.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let index = r.json()["index"].as_u64().unwrap();
    assert!(index > now, "{index} after {now}");
    assert!(took < Duration::from_secs(10), "answered after {took:?}");

    // A held poll does not hold up a graceful stop.
    let held = held_poll(&hub, index);
    let t = Instant::now();
    hub.signal("TERM");
    let (r, _) = held.join().unwrap();
    let st = hub.wait_exit();
    assert!(st.success(), "{st:?}");
    assert_eq!(r.status, 200, "the held poll is answered: {}", r.text());
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "stopped after {:?} (the 5 s drain would mean the poll held it up)",
        t.elapsed()
    );
}
