//! The hub's fleet view: the page at `/ui/` (HTML, CSS and JavaScript,
//! 21 KB gzipped to 9 KB by build.rs and compiled in, nothing fetched from
//! elsewhere) and the read-only routes under `/v1/edge/fleet/` it reads.
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

use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_TYPE, LOCATION};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use smol::future::FutureExt;

use super::errors::{app_error, error, method_not_allowed, ok};
use super::query::{decoded, Query};
use super::{Body, Resp};
use crate::app::App;
use crate::clock::wall_millis;
use crate::store::{Db, StoreError};
use crate::support::Shutdown;

// Gzipped by build.rs: a third of the bytes in the binary, and every
// browser inflates it.
const INDEX_HTML: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/index.html.gz"));
const APP_JS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/app.js.gz"));
const APP_CSS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/app.css.gz"));

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
        _ => return error(StatusCode::NOT_FOUND, "no such file under /ui/"),
    };
    let mut r = Response::new(Body::full(body));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
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
            None | Some("") => Some(default),
            Some(v) => v.parse::<usize>().ok(),
        };
        let (Some(offset), Some(limit @ 1..=MAX_LIMIT)) =
            (num("offset", 0), num("limit", DEFAULT_LIMIT))
        else {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "offset: a whole number; limit: a whole number 1-500",
            )));
        };
        Ok(Page {
            offset,
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

    /// Sorts `rows` by the value under the sort key (then by `tie`,
    /// ascending whichever way the column sorts), and answers one page.
    ///
    /// Rows are ordered through text keys (numbers zero-padded) sorted as
    /// `(String, String)` pairs, a sort the binary already carries: a sort
    /// of JSON values with its own comparator cost kilobytes of code.
    fn answer(&self, mut rows: Vec<Value>, tie: &str, extra: Map<String, Value>) -> Value {
        let text = |v: &Value| match v {
            Value::Number(n) => format!("{:020}", n.as_u64().unwrap_or(0)),
            Value::String(s) => s.clone(),
            Value::Bool(b) => u8::from(*b).to_string(),
            _ => String::new(),
        };
        let mut keys: Vec<(String, String)> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (text(&r[&self.sort]), format!("{}\0{i:010}", text(&r[tie]))))
            .collect();
        keys.sort();
        // Descending: the runs of equal keys in reverse, each still in
        // tie order.
        let mut order = Vec::with_capacity(keys.len());
        if self.desc {
            let mut end = keys.len();
            while end > 0 {
                let mut start = end - 1;
                while start > 0 && keys[start - 1].0 == keys[end - 1].0 {
                    start -= 1;
                }
                order.extend(start..end);
                end = start;
            }
        } else {
            order.extend(0..keys.len());
        }
        let items = order
            .into_iter()
            .skip(self.offset)
            .take(self.limit)
            .filter_map(|k| keys[k].1.rsplit('\0').next()?.parse::<usize>().ok())
            .map(|i| std::mem::take(&mut rows[i]))
            .collect();
        let mut out = extra;
        out.insert("total".into(), json!(keys.len()));
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

/// A device's health at the hub, from its active alerts (a mask of
/// `ALERTING`, `LOW_BATTERY`, `OFFLINE`).
fn health(mask: u64) -> &'static str {
    match mask {
        0 => "ok",
        m if m & OFFLINE != 0 => "offline",
        m if m & LOW_BATTERY != 0 => "low_battery",
        _ => "alerting",
    }
}
const ALERTING: u64 = 1;
const LOW_BATTERY: u64 = 2;
const OFFLINE: u64 = 4;

fn field<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Work for the store thread. Every fleet route's store work answers one
/// JSON value through this one type, so the binary carries one copy of
/// the round trip rather than one per route.
type Job = Box<dyn FnOnce(&mut Db) -> Result<Value, StoreError> + Send>;

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
        let (route, answer) = match what {
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
                Err(error(
                    StatusCode::NOT_FOUND,
                    format!("no route for /v1/edge/fleet/{what}"),
                )),
            ),
        };
        (route, answer.map_or_else(|r| r, ok))
    }

    async fn fetch(&self, job: Job) -> Result<Value, Resp> {
        match self.registry.store().call(job).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) | Err(e) => Err(app_error(e, &self.metrics)),
        }
    }

    async fn fleet_edges(&self, hub: &crate::sync::Hub, query: &Query) -> Result<Value, Resp> {
        let page = Page::from(query, "edge_id").map_err(|r| *r)?;
        let now = wall_millis();
        let stale_after = hub.stale_after_ms();
        let only_stale = query.flag("stale");
        self.fetch(Box::new(move |db| {
            let rows = db
                .fleet_edges()?
                .into_iter()
                .filter_map(|mut e| {
                    let age = now.saturating_sub(e["last_seen_ms"].as_u64().unwrap_or(0));
                    let stale = age > stale_after;
                    if (only_stale && !stale)
                        || !page.matches(&[field(&e, "edge_id"), field(&e, "version")])
                    {
                        return None;
                    }
                    e["age_ms"] = json!(age);
                    e["stale"] = json!(stale);
                    Some(e)
                })
                .collect();
            let mut extra = Map::new();
            extra.insert("now_ms".into(), json!(now));
            extra.insert("stale_after_ms".into(), json!(stale_after));
            Ok(page.answer(rows, "edge_id", extra))
        }))
        .await
    }

    /// Devices with health from their active alerts, then, for the page
    /// answered only (at most `MAX_LIMIT` lookups by primary key), last
    /// seen and battery from the newest telemetry point forwarded.
    async fn fleet_devices(&self, query: &Query) -> Result<Value, Resp> {
        let page = Page::from(query, "id").map_err(|r| *r)?;
        let edge = query.get("edge").map(str::to_owned);
        let want = query.get("health").unwrap_or("").to_owned();
        self.fetch(Box::new(move |db| {
            // Per device: [active alerts, mask]; serde_json's map, which
            // the binary carries anyway.
            let mut seen = Map::new();
            for r in db.fleet_alerts()? {
                let a: Value = serde_json::from_str(&r[1]).unwrap_or(Value::Null);
                if a["active"] == true {
                    let d = field(&a, "device_id").to_owned();
                    let bit = match field(&a, "name") {
                        "offline" => OFFLINE,
                        "low_battery" => LOW_BATTERY,
                        _ => ALERTING,
                    };
                    let was = seen.get(&d).cloned().unwrap_or(json!([0, 0]));
                    let n = was[0].as_u64().unwrap_or(0) + 1;
                    seen.insert(d, json!([n, was[1].as_u64().unwrap_or(0) | bit]));
                }
            }
            let at = |id: &str, i: usize| seen.get(id).and_then(|v| v[i].as_u64()).unwrap_or(0);
            let mut rows = Vec::new();
            for r in db.fleet_devices()? {
                let (id, owner) = (&r[0], &r[1]);
                let h = health(at(id, 1));
                if edge.as_ref().is_some_and(|e| e != owner) || (!want.is_empty() && want != h) {
                    continue;
                }
                let b: Value = serde_json::from_str(&r[2]).unwrap_or(Value::Null);
                let f = |k| field(&b, k);
                if !page.matches(&[id, owner, f("name"), f("type"), f("firmware_version")]) {
                    continue;
                }
                rows.push(json!({
                    "id": id,
                    "edge": owner,
                    "name": f("name"),
                    "type": f("type"),
                    "firmware_version": f("firmware_version"),
                    "target_version": f("target_version"),
                    "update_status": f("update_status"),
                    "health": h,
                    "alerts": at(id, 0),
                }));
            }
            let mut v = page.answer(rows, "id", Map::new());
            if let Some(items) = v["items"].as_array_mut() {
                for d in items {
                    let (ts, t) = db
                        .last_received(field(d, "id"))?
                        .unwrap_or((0, Value::Null));
                    d["last_seen_ms"] = json!(ts);
                    d["battery"] = t.get("battery").cloned().unwrap_or(Value::Null);
                }
            }
            Ok(v)
        }))
        .await
    }

    async fn fleet_alerts(&self, query: &Query) -> Result<Value, Resp> {
        let mut page = Page::from(query, "raised_at_ms").map_err(|r| *r)?;
        // Newest first unless the page asks otherwise.
        if query.get("desc").is_none() {
            page.desc = true;
        }
        let edge = query.get("edge").unwrap_or("").to_owned();
        let active_only = query.flag("active");
        self.fetch(Box::new(move |db| {
            let rows = db
                .fleet_alerts()?
                .into_iter()
                .filter_map(|r| {
                    let mut a: Value = serde_json::from_str(&r[1]).ok()?;
                    let wanted = (edge.is_empty() || edge == r[0])
                        && (!active_only || a["active"] == true)
                        && page.matches(&[
                            field(&a, "device_id"),
                            field(&a, "name"),
                            field(&a, "message"),
                        ]);
                    a["edge"] = json!(r[0]);
                    wanted.then_some(a)
                })
                .collect();
            Ok(page.answer(rows, "device_id", Map::new()))
        }))
        .await
    }

    /// A firmware rollout with its devices' states counted per edge and
    /// per wave: the rollout's own view has devices, not their edges.
    async fn fleet_rollout(&self, id: String) -> Result<Value, Resp> {
        let Some(rollouts) = &self.rollouts else {
            return Err(error(
                StatusCode::NOT_FOUND,
                "firmware is not enabled on this node",
            ));
        };
        let (summary, devices) = rollouts
            .get(id)
            .await
            .map_err(|e| app_error(e, &self.metrics))?;
        let owners = self
            .fetch(Box::new(|db| {
                let mut m = Map::new();
                for r in db.fleet_devices()? {
                    m.insert(r[0].clone(), json!(r[1]));
                }
                Ok(Value::Object(m))
            }))
            .await?;
        let (mut by_edge, mut by_wave) = (Map::new(), Map::new());
        let mut states = Vec::new();
        for d in &devices {
            let mut v = json!(d);
            let edge = field(&owners, &d.device).to_owned();
            let state = field(&v, "state").to_owned();
            for (map, k) in [
                (&mut by_edge, edge.clone()),
                (&mut by_wave, d.wave.to_string()),
            ] {
                let e = map.entry(k).or_insert_with(|| json!({}));
                e[&state] = json!(e[&state].as_u64().unwrap_or(0) + 1);
            }
            v["edge"] = json!(edge);
            states.push(v);
        }
        let mut v = json!(summary);
        v["device_states"] = Value::Array(states);
        v["by_edge"] = Value::Object(by_edge);
        v["by_wave"] = Value::Object(by_wave);
        Ok(v)
    }

    /// Answers `{"index": N}` once the store index is past `?index=`, or
    /// after `?wait_ms=` (at most `CHANGES_WAIT`; the same index), or at
    /// shutdown.
    async fn fleet_changes(&self, req: &Request<Incoming>, query: &Query) -> Result<Value, Resp> {
        let since: u64 = query.get("index").and_then(|v| v.parse().ok()).unwrap_or(0);
        let wait = query
            .get("wait_ms")
            .and_then(|v| v.parse().ok())
            .map_or(CHANGES_WAIT, Duration::from_millis)
            .clamp(MIN_WAIT, CHANGES_WAIT);
        // Subscribe before reading the index: a change in between is seen.
        let mut feed = self.registry.subscribe();
        let index = || self.fetch(Box::new(|db| Ok(json!({ "index": db.current_index()? }))));
        let now = index().await?;
        if now["index"].as_u64().unwrap_or(0) > since || since == 0 {
            return Ok(now);
        }
        let changed = async {
            let _ = feed.recv().await;
        };
        let timeout = async {
            async_io::Timer::after(wait).await;
        };
        let stop = async {
            match req.extensions().get::<Shutdown>() {
                Some(s) => s.wait().await,
                None => std::future::pending::<()>().await,
            }
        };
        changed.or(timeout).or(stop).await;
        index().await
    }
}
