//! The hub's fleet view: the page at `/ui/` (HTML, CSS and JavaScript
//! compiled in, about 20 KB, nothing fetched from elsewhere) and the
//! read-only routes under `/v1/edge/fleet/` it reads.
//!
//! The routes page, filter and sort on the server, so a hub with 1,000
//! edges and 10,000 devices sends a browser one screenful: the hub reads
//! every row (two grouped scans, see `store::fleet_sql`) and sorts them in
//! memory, which costs milliseconds at that size and keeps the SQL simple.
//! Device health at a hub comes from the replicated alerts (heartbeats are
//! not replicated) and "last seen" from the newest telemetry point the
//! edge forwarded.
//!
//! Live updates are a long poll on the change feed (`changes`): it answers
//! as soon as the store index passes the one the page last saw, or after
//! `CHANGES_WAIT`, or at shutdown, so an open page never holds up a
//! graceful stop. The page waits 2 s between polls.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use smol::future::FutureExt;

use super::errors::{app_error, error, method_not_allowed, ok};
use super::query::{decoded, Query};
use super::{Body, Resp};
use crate::app::App;
use crate::clock::wall_millis;
use crate::store::{FleetEdge, StoreError};
use crate::support::Shutdown;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");

/// Rows per page when the page does not say, and the most it may ask.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;
/// The longest a `changes` poll is held open, and the shortest (with the
/// page's 2 s between polls, no busier than one request a second).
const CHANGES_WAIT: Duration = Duration::from_secs(20);
const MIN_WAIT: Duration = Duration::from_secs(1);

/// `/ui` and `/ui/...`: the page's three files. No data in them, so no
/// access check; every route they read checks the token they send.
pub(super) fn ui(method: &Method, rest: &str) -> Resp {
    if *method != Method::GET {
        return method_not_allowed("GET");
    }
    let (body, kind) = match rest {
        "" | "index.html" => (INDEX_HTML, "text/html; charset=utf-8"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        _ => return error(StatusCode::NOT_FOUND, format!("no file /ui/{rest}")),
    };
    let mut r = Response::new(Body::full(body.as_bytes()));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}

/// `/ui` without the slash: the page's links are absolute, but a
/// bookmark should land on the canonical address.
pub(super) fn ui_redirect() -> Resp {
    let mut r = Response::new(Body::full(&b""[..]));
    *r.status_mut() = StatusCode::PERMANENT_REDIRECT;
    r.headers_mut()
        .insert(LOCATION, HeaderValue::from_static("/ui/"));
    r
}

/// Offset, limit, text filter and sort order from the query string.
struct Page {
    offset: usize,
    limit: usize,
    text: String,
    sort: String,
    desc: bool,
}

impl Page {
    fn from(query: &Query, default_sort: &str) -> Result<Page, Box<Resp>> {
        let num = |k: &str, default: usize| match query.get(k) {
            None | Some("") => Ok(default),
            Some(v) => v.parse::<usize>().map_err(|_| {
                Box::new(error(
                    StatusCode::BAD_REQUEST,
                    format!("{k}: `{v}` is not a non-negative integer"),
                ))
            }),
        };
        let limit = num("limit", DEFAULT_LIMIT)?;
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                format!("limit: must be 1-{MAX_LIMIT}"),
            )));
        }
        Ok(Page {
            offset: num("offset", 0)?,
            limit,
            text: query.get("q").unwrap_or("").trim().to_lowercase(),
            sort: query
                .get("sort")
                .filter(|s| !s.is_empty())
                .unwrap_or(default_sort)
                .to_owned(),
            desc: query.flag("desc"),
        })
    }

    /// Sorts `rows` by the value under the sort key (numbers as numbers,
    /// then by `tie` ascending), and answers one page of them.
    fn answer(&self, mut rows: Vec<Value>, tie: &str, extra: Map<String, Value>) -> Value {
        let key = |v: &Value, k: &str| v.get(k).cloned().unwrap_or(Value::Null);
        // Ties stay in id order whichever way the column sorts.
        rows.sort_by(|a, b| {
            let o = cmp_json(&key(a, &self.sort), &key(b, &self.sort));
            if self.desc { o.reverse() } else { o }
                .then_with(|| cmp_json(&key(a, tie), &key(b, tie)))
        });
        let total = rows.len();
        let items: Vec<Value> = rows
            .into_iter()
            .skip(self.offset)
            .take(self.limit)
            .collect();
        let mut out = extra;
        out.insert("total".into(), json!(total));
        out.insert("offset".into(), json!(self.offset));
        out.insert("limit".into(), json!(self.limit));
        out.insert("sort".into(), json!(self.sort));
        out.insert("desc".into(), json!(self.desc));
        out.insert("items".into(), Value::Array(items));
        Value::Object(out)
    }

    fn matches(&self, fields: &[&str]) -> bool {
        self.text.is_empty() || fields.iter().any(|f| f.to_lowercase().contains(&self.text))
    }
}

fn cmp_json(a: &Value, b: &Value) -> Ordering {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .unwrap_or(0.0)
            .total_cmp(&y.as_f64().unwrap_or(0.0)),
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::Null, _) => Ordering::Less,
        (_, Value::Null) => Ordering::Greater,
        _ => a.to_string().cmp(&b.to_string()),
    }
}

/// A device's health at the hub, from its active alerts.
fn health_from_alerts(names: Option<&Vec<String>>) -> &'static str {
    match names {
        None => "ok",
        Some(n) if n.iter().any(|a| a == "offline") => "offline",
        Some(n) if n.iter().any(|a| a == "low_battery") => "low_battery",
        Some(_) => "alerting",
    }
}

/// The fields of a device record the devices list shows.
#[derive(Default, serde::Deserialize)]
struct DeviceBody {
    #[serde(default)]
    name: String,
    #[serde(default, rename = "type")]
    device_type: String,
    #[serde(default)]
    firmware_version: String,
    #[serde(default)]
    target_version: String,
    #[serde(default)]
    update_status: String,
}

fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

impl App {
    /// `/v1/edge/fleet/{what}`, on a hub.
    pub(super) async fn fleet(
        &self,
        req: Request<Incoming>,
        method: Method,
        what: &str,
        query: &Query,
    ) -> (&'static str, Resp) {
        let Some(hub) = &self.hub else {
            return (
                "/v1/edge/fleet",
                error(StatusCode::NOT_FOUND, "this node is not a hub"),
            );
        };
        if method != Method::GET {
            return ("/v1/edge/fleet", method_not_allowed("GET"));
        }
        match what {
            "edges" => ("/v1/edge/fleet/edges", self.fleet_edges(hub, query).await),
            "devices" => ("/v1/edge/fleet/devices", self.fleet_devices(query).await),
            "alerts" => ("/v1/edge/fleet/alerts", self.fleet_alerts(query).await),
            "changes" => (
                "/v1/edge/fleet/changes",
                self.fleet_changes(&req, query).await,
            ),
            r if r.starts_with("rollouts/") => (
                "/v1/edge/fleet/rollouts/:id",
                self.fleet_rollout(decoded(&r["rollouts/".len()..])).await,
            ),
            _ => (
                "other",
                error(
                    StatusCode::NOT_FOUND,
                    format!("no route for /v1/edge/fleet/{what}"),
                ),
            ),
        }
    }

    async fn fleet_edges(&self, hub: &crate::sync::Hub, query: &Query) -> Resp {
        let page = match Page::from(query, "edge_id") {
            Ok(p) => p,
            Err(r) => return *r,
        };
        let edges: Vec<FleetEdge> = match self.registry.store().call(|db| db.fleet_edges()).await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) | Err(e) => return app_error(e, &self.metrics),
        };
        let now = wall_millis();
        let stale_after = hub.stale_after_ms();
        let only_stale = query.flag("stale");
        let rows = edges
            .into_iter()
            .filter(|e| page.matches(&[&e.edge_id]))
            .map(|e| {
                let age = now.saturating_sub(e.last_seen_ms);
                let mut v = json!(e);
                v["age_ms"] = json!(age);
                v["stale"] = json!(age > stale_after);
                v
            })
            .filter(|v| !only_stale || v["stale"] == true)
            .collect();
        let mut extra = Map::new();
        extra.insert("now_ms".into(), json!(now));
        extra.insert("stale_after_ms".into(), json!(stale_after));
        ok(page.answer(rows, "edge_id", extra))
    }

    async fn fleet_devices(&self, query: &Query) -> Resp {
        let page = match Page::from(query, "id") {
            Ok(p) => p,
            Err(r) => return *r,
        };
        let edge = query.get("edge").map(str::to_owned);
        let health = query
            .get("health")
            .filter(|h| !h.is_empty())
            .map(str::to_owned);
        let text = page.text.clone();
        let found = self
            .registry
            .store()
            .call(move |db| {
                let mut active: HashMap<String, Vec<String>> = HashMap::new();
                for (_, body) in db.fleet_alerts()? {
                    let a: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                    if a["active"] == true {
                        active
                            .entry(field(&a, "device_id").to_owned())
                            .or_default()
                            .push(field(&a, "name").to_owned());
                    }
                }
                let mut rows = Vec::new();
                for d in db.fleet_devices()? {
                    if edge.as_deref().is_some_and(|e| e != d.edge) {
                        continue;
                    }
                    let h = health_from_alerts(active.get(&d.id));
                    if health.as_deref().is_some_and(|want| want != h) {
                        continue;
                    }
                    // A typed parse skips the fields the list does not show.
                    let b: DeviceBody = serde_json::from_str(&d.body).unwrap_or_default();
                    let hay = [&d.id, &b.name, &b.device_type, &b.firmware_version, &d.edge];
                    if !text.is_empty() && !hay.iter().any(|f| f.to_lowercase().contains(&text)) {
                        continue;
                    }
                    rows.push(json!({
                        "id": d.id,
                        "edge": d.edge,
                        "name": b.name,
                        "type": b.device_type,
                        "firmware_version": b.firmware_version,
                        "target_version": b.target_version,
                        "update_status": b.update_status,
                        "health": h,
                        "alerts": active.get(&d.id).map_or(0, Vec::len),
                    }));
                }
                Ok::<_, StoreError>(rows)
            })
            .await;
        let rows = match found {
            Ok(Ok(r)) => r,
            Ok(Err(e)) | Err(e) => return app_error(e, &self.metrics),
        };
        let v = page.answer(rows, "id", Map::new());
        self.with_last_seen(v).await
    }

    /// Adds last seen and battery (from the newest forwarded telemetry
    /// point) to the devices of one page: at most `MAX_LIMIT` lookups by
    /// primary key.
    async fn with_last_seen(&self, mut v: Value) -> Resp {
        let ids: Vec<String> = v["items"]
            .as_array()
            .map(|a| a.iter().map(|d| field(d, "id").to_owned()).collect())
            .unwrap_or_default();
        let seen = self
            .registry
            .store()
            .call(move |db| {
                ids.iter()
                    .map(|id| db.last_received(id))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await;
        let seen = match seen {
            Ok(Ok(s)) => s,
            Ok(Err(e)) | Err(e) => return app_error(e, &self.metrics),
        };
        if let Some(items) = v["items"].as_array_mut() {
            for (d, s) in items.iter_mut().zip(seen) {
                let (ts, payload) = s.unwrap_or((0, Vec::new()));
                d["last_seen_ms"] = json!(ts.max(0));
                let t: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
                d["battery"] = t.get("battery").cloned().unwrap_or(Value::Null);
            }
        }
        ok(v)
    }

    async fn fleet_alerts(&self, query: &Query) -> Resp {
        let page = match Page::from(query, "raised_at_ms") {
            Ok(p) => p,
            Err(r) => return *r,
        };
        let mut page = page;
        // Newest first unless the page asks otherwise.
        if query.get("desc").is_none() {
            page.desc = true;
        }
        let alerts = match self.registry.store().call(|db| db.fleet_alerts()).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) | Err(e) => return app_error(e, &self.metrics),
        };
        let edge = query.get("edge").filter(|e| !e.is_empty());
        let active_only = query.flag("active");
        let rows = alerts
            .into_iter()
            .filter_map(|(owner, body)| {
                let mut a: Value = serde_json::from_str(&body).ok()?;
                if edge.is_some_and(|e| e != owner) || (active_only && a["active"] != true) {
                    return None;
                }
                if !page.matches(&[
                    field(&a, "device_id"),
                    field(&a, "name"),
                    field(&a, "message"),
                ]) {
                    return None;
                }
                a["edge"] = json!(owner);
                Some(a)
            })
            .collect();
        ok(page.answer(rows, "device_id", Map::new()))
    }

    /// A firmware rollout with its devices' states counted per edge and
    /// per wave: the rollout's own view has devices, not their edges.
    async fn fleet_rollout(&self, id: String) -> Resp {
        let Some(rollouts) = &self.rollouts else {
            return error(
                StatusCode::NOT_FOUND,
                "firmware is not enabled on this node",
            );
        };
        let (summary, devices) = match rollouts.get(id).await {
            Ok(r) => r,
            Err(e) => return app_error(e, &self.metrics),
        };
        let owners = match self.registry.store().call(|db| db.fleet_devices()).await {
            Ok(Ok(d)) => d
                .into_iter()
                .map(|d| (d.id, d.edge))
                .collect::<HashMap<_, _>>(),
            Ok(Err(e)) | Err(e) => return app_error(e, &self.metrics),
        };
        let mut by_edge: HashMap<String, Map<String, Value>> = HashMap::new();
        let mut by_wave: HashMap<String, Map<String, Value>> = HashMap::new();
        let states: Vec<Value> = devices
            .iter()
            .map(|d| {
                let mut v = json!(d);
                let edge = owners.get(&d.device).cloned().unwrap_or_default();
                let state = field(&v, "state").to_owned();
                for (map, k) in [
                    (&mut by_edge, edge.clone()),
                    (&mut by_wave, d.wave.to_string()),
                ] {
                    let e = map.entry(k).or_default();
                    let n = e.get(&state).and_then(Value::as_u64).unwrap_or(0);
                    e.insert(state.clone(), json!(n + 1));
                }
                v["edge"] = json!(edge);
                v
            })
            .collect();
        let mut v = json!(summary);
        v["device_states"] = json!(states);
        v["by_edge"] = json!(by_edge);
        v["by_wave"] = json!(by_wave);
        ok(v)
    }

    /// Answers `{"index": N}` once the store index is past `?index=`, or
    /// after `?wait_ms=` (at most `CHANGES_WAIT`; the same index), or at
    /// shutdown.
    async fn fleet_changes(&self, req: &Request<Incoming>, query: &Query) -> Resp {
        let since: u64 = query.get("index").and_then(|v| v.parse().ok()).unwrap_or(0);
        let wait = query
            .get("wait_ms")
            .and_then(|v| v.parse().ok())
            .map_or(CHANGES_WAIT, Duration::from_millis)
            .clamp(MIN_WAIT, CHANGES_WAIT);
        // Subscribe before reading the index: a change in between is seen.
        let mut feed = self.registry.subscribe();
        let current = || async {
            match self.registry.store().call(|db| db.current_index()).await {
                Ok(Ok(i)) => Ok(i),
                Ok(Err(e)) | Err(e) => Err(e),
            }
        };
        let index = match current().await {
            Ok(i) => i,
            Err(e) => return app_error(e, &self.metrics),
        };
        if index > since || since == 0 {
            return ok(json!({ "index": index }));
        }
        let changed = async {
            let _ = feed.recv().await;
            true
        };
        let timeout = async {
            async_io::Timer::after(wait).await;
            false
        };
        let stop = async {
            match req.extensions().get::<Shutdown>() {
                Some(s) => s.wait().await,
                None => std::future::pending::<()>().await,
            }
            false
        };
        changed.or(timeout).or(stop).await;
        match current().await {
            Ok(i) => ok(json!({ "index": i })),
            Err(e) => app_error(e, &self.metrics),
        }
    }
}
