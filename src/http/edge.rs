//! The edge's own routes under `/v1/edge/`: status, services with their
//! metadata, devices and telemetry, alerts, conflicts, OTA, sync (and a
//! hub's sync endpoint). Firmware and rollouts are in `firmware`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::errors::{app_error, error, json_resp, method_not_allowed, ok};
use super::konsul::service_entry_json;
use super::query::{decoded, Query};
use super::{Body, Resp};
use crate::acl::Principal;
use crate::app::{App, AppError};
use crate::devices::{DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT};

impl App {
    pub(super) async fn edge(
        &self,
        req: Request<Incoming>,
        method: Method,
        rest: &str,
        query: &Query,
    ) -> (&'static str, Resp) {
        match rest {
            "edge/services" => (
                "/v1/edge/services",
                match method {
                    Method::GET => match self.registry.services(true).await {
                        Ok(list) => ok(Value::Array(list.iter().map(service_entry_json).collect())),
                        Err(e) => app_error(e, &self.metrics),
                    },
                    _ => method_not_allowed("GET"),
                },
            ),
            "edge/status" => (
                "/v1/edge/status",
                match method {
                    Method::GET => match self.status().await {
                        Ok(v) => ok(v),
                        Err(e) => app_error(e, &self.metrics),
                    },
                    _ => method_not_allowed("GET"),
                },
            ),
            "edge/ota" => (
                "/v1/edge/ota",
                match method {
                    Method::GET => ok(self.ota_status().await),
                    _ => method_not_allowed("GET"),
                },
            ),
            "edge/ota/install" => (
                "/v1/edge/ota/install",
                match method {
                    Method::POST | Method::PUT => self.ota_install(req).await,
                    _ => method_not_allowed("POST"),
                },
            ),
            "edge/ota/rollouts" => self.ota_rollouts(req, method, None).await,
            r if r.starts_with("edge/ota/rollouts/") => {
                let id = decoded(&r["edge/ota/rollouts/".len()..]);
                self.ota_rollouts(req, method, Some(id)).await
            }
            "edge/sync" => (
                "/v1/edge/sync",
                match (method, &self.hub) {
                    (Method::GET, _) => ok(json!(self.sync.status())),
                    (Method::POST, Some(hub)) => self.hub_sync(hub, req).await,
                    (Method::POST, None) => error(
                        StatusCode::NOT_FOUND,
                        "this node is not a hub (mode: edge); sync requests go to `konsul-edge hub`",
                    ),
                    _ => method_not_allowed("GET, POST"),
                },
            ),
            "edge/edges" => (
                "/v1/edge/edges",
                match (method, &self.hub) {
                    (Method::GET, Some(_)) => match self.registry.store().call(|db| db.edges()).await {
                        Ok(Ok(edges)) => ok(json!(edges)),
                        Ok(Err(e)) | Err(e) => app_error(e, &self.metrics),
                    },
                    (Method::GET, None) => error(StatusCode::NOT_FOUND, "this node is not a hub"),
                    _ => method_not_allowed("GET"),
                },
            ),
            "edge/telemetry" => (
                "/v1/edge/telemetry",
                match (method, &self.hub, query.get("device")) {
                    (Method::GET, Some(_), Some(device)) => {
                        let device = device.to_owned();
                        let limit = query
                            .get("limit")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(100usize)
                            .min(10_000);
                        match self
                            .registry
                            .store()
                            .call(move |db| db.telemetry_received(&device, limit))
                            .await
                        {
                            Ok(Ok(rows)) => ok(Value::Array(
                                rows.into_iter()
                                    .map(|p| {
                                        json!({
                                            "seq": p.seq,
                                            "ts_ms": p.ts_ms,
                                            "edge": p.edge,
                                            "values": serde_json::from_slice::<Value>(&p.payload)
                                                .unwrap_or(Value::Null),
                                        })
                                    })
                                    .collect(),
                            )),
                            Ok(Err(e)) | Err(e) => app_error(e, &self.metrics),
                        }
                    }
                    (Method::GET, Some(_), None) => {
                        error(StatusCode::BAD_REQUEST, "name the device: ?device=ID")
                    }
                    (Method::GET, None, _) => error(
                        StatusCode::NOT_FOUND,
                        "this node is not a hub; local history is /v1/edge/devices/{id}/telemetry",
                    ),
                    _ => method_not_allowed("GET"),
                },
            ),
            "edge/conflicts" => (
                "/v1/edge/conflicts",
                match method {
                    Method::GET => {
                        let limit = query
                            .get("limit")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(100usize)
                            .min(10_000);
                        match self.registry.store().call(move |db| db.conflicts(limit)).await {
                            Ok(Ok(c)) => ok(json!(c)),
                            Ok(Err(e)) | Err(e) => app_error(e, &self.metrics),
                        }
                    }
                    _ => method_not_allowed("GET"),
                },
            ),
            "edge/sync/now" => (
                "/v1/edge/sync/now",
                match method {
                    Method::POST => match self.no_body(req).await {
                        Err(r) => *r,
                        Ok(()) => match self.sync.sync_now() {
                            Ok(()) => json_resp(
                                StatusCode::ACCEPTED,
                                &json!({"message": "sync requested"}),
                            ),
                            Err(e) => app_error(e, &self.metrics),
                        },
                    },
                    _ => method_not_allowed("POST"),
                },
            ),
            "edge/devices" => (
                "/v1/edge/devices",
                match method {
                    Method::GET => match self.devices.list().await {
                        Ok(list) => ok(json!(list)),
                        Err(e) => app_error(e, &self.metrics),
                    },
                    _ => method_not_allowed("GET"),
                },
            ),
            "edge/alerts" => (
                "/v1/edge/alerts",
                match method {
                    Method::GET => {
                        let device = query.get("device").map(str::to_owned);
                        match self.devices.alerts(query.flag("active"), device).await {
                            Ok(list) => ok(json!(list)),
                            Err(e) => app_error(e, &self.metrics),
                        }
                    }
                    _ => method_not_allowed("GET"),
                },
            ),
            "edge/firmware" | "edge/rollouts" => self.firmware_routes(req, method, rest, query).await,
            r if r.starts_with("edge/firmware/") || r.starts_with("edge/rollouts/") => {
                self.firmware_routes(req, method, rest, query).await
            }
            #[cfg(feature = "fleet-ui")]
            r if r.starts_with("edge/fleet/") => {
                self.fleet(req, method, &r["edge/fleet/".len()..], query)
                    .await
            }
            r if r.starts_with("edge/devices/") => {
                self.device_route(method, &r["edge/devices/".len()..], query)
                    .await
            }
            "edge/debug/wedge-store" if self.test_hooks => (
                "/v1/edge/debug",
                match method {
                    Method::POST => {
                        let ms: u64 = query.get("ms").and_then(|v| v.parse().ok()).unwrap_or(1000);
                        // The job runs on the store thread, which it wedges on purpose.
                        #[allow(clippy::disallowed_methods)]
                        let queued = self.registry.store().spawn_job(move |_| {
                            std::thread::sleep(Duration::from_millis(ms));
                        });
                        match queued {
                            Ok(()) => ok(json!({"message": "store wedged", "ms": ms})),
                            Err(e) => app_error(e, &self.metrics),
                        }
                    }
                    _ => method_not_allowed("POST"),
                },
            ),
            _ => (
                "other",
                error(StatusCode::NOT_FOUND, format!("no route for /v1/{rest}")),
            ),
        }
    }

    /// `{"path": "/abs/bundle"}`: a manual install of a local, signed
    /// bundle (the same checks as D-Bus `Install`).
    pub(super) async fn ota_install(&self, req: Request<Incoming>) -> Resp {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            path: String,
        }
        let who = req.extensions().get::<Principal>().cloned();
        let body: Body = match self.body(req).await {
            Ok(b) => b,
            Err(r) => return *r,
        };
        let Some(who) = who else {
            return app_error(AppError::Unauthenticated, &self.metrics);
        };
        if let Err(e) = self
            .check_file(&who, std::path::Path::new(&body.path))
            .await
        {
            return app_error(e, &self.metrics);
        }
        match self.ota.install(&body.path).await {
            Ok(id) => ok(json!({"message": "install started", "deployment": id})),
            Err(e) => app_error(e, &self.metrics),
        }
    }

    /// `/v1/edge/ota/rollouts[/{id}]`: host rollouts, created on a hub.
    pub(super) async fn ota_rollouts(
        &self,
        req: Request<Incoming>,
        method: Method,
        id: Option<String>,
    ) -> (&'static str, Resp) {
        let m = &self.metrics;
        match id {
            None => (
                "/v1/edge/ota/rollouts",
                match method {
                    Method::GET => match self.ota.rollouts().await {
                        Ok(l) => ok(json!(l)),
                        Err(e) => app_error(e, m),
                    },
                    Method::POST | Method::PUT => {
                        match self.body::<crate::ota::rollout::Spec>(req).await {
                            Err(r) => *r,
                            Ok(spec) => {
                                let artifacts = self.rollouts.as_ref().map(|r| r.artifacts());
                                match self.ota.create_rollout(spec, artifacts).await {
                                    Ok(r) => json_resp(StatusCode::CREATED, &json!(r)),
                                    Err(e) => app_error(e, m),
                                }
                            }
                        }
                    }
                    _ => method_not_allowed("GET, POST"),
                },
            ),
            Some(id) => (
                "/v1/edge/ota/rollouts/:id",
                match method {
                    Method::GET => match self.ota.rollout(id).await {
                        Ok(v) => ok(v),
                        Err(e) => app_error(e, m),
                    },
                    Method::DELETE => match self.ota.delete_rollout(id).await {
                        Ok(()) => ok(json!({"message": "rollout deleted"})),
                        Err(e) => app_error(e, m),
                    },
                    _ => method_not_allowed("GET, DELETE"),
                },
            ),
        }
    }

    pub(super) async fn hub_sync(&self, hub: &crate::sync::Hub, req: Request<Incoming>) -> Resp {
        let header = |name| {
            req.headers()
                .get(name)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        if let Err(e) = hub.authorize(header(hyper::header::AUTHORIZATION)) {
            return error(StatusCode::UNAUTHORIZED, e.to_string());
        }
        if header(CONTENT_TYPE).is_some_and(|t| !t.starts_with("application/x-protobuf")) {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "sync bodies are application/x-protobuf",
            );
        }
        let compressed = match header(hyper::header::CONTENT_ENCODING) {
            None | Some("identity") => false,
            Some("snappy") => true,
            Some(other) => {
                return error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("content-encoding {other} (snappy or identity)"),
                )
            }
        };
        let body = match self.raw_body(req).await {
            Ok(b) => b,
            Err(r) => return *r,
        };
        match hub.handle(&body, compressed).await {
            Ok(bytes) => {
                let mut r = Response::new(Body::full(bytes));
                let h = r.headers_mut();
                h.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-protobuf"),
                );
                h.insert(
                    hyper::header::CONTENT_ENCODING,
                    HeaderValue::from_static(if compressed { "snappy" } else { "identity" }),
                );
                r
            }
            Err(e) => {
                use crate::sync::server::ServeError;
                match e {
                    ServeError::Wire(_) | ServeError::BadEdge(_) => {
                        self.metrics.rejected_bodies.fetch_add(1, Ordering::Relaxed);
                        log::warn!("sync request refused: {e}");
                        error(StatusCode::BAD_REQUEST, e.to_string())
                    }
                    ServeError::Unauthorized => error(StatusCode::UNAUTHORIZED, e.to_string()),
                    ServeError::Store(s) => app_error(s, &self.metrics),
                }
            }
        }
    }

    /// `/v1/edge/devices/{id}` and `/v1/edge/devices/{id}/telemetry`.
    pub(super) async fn device_route(
        &self,
        method: Method,
        rest: &str,
        query: &Query,
    ) -> (&'static str, Resp) {
        let (id, sub) = match rest.split_once('/') {
            Some((id, sub)) => (decoded(id), Some(sub)),
            None => (decoded(rest), None),
        };
        match sub {
            None => (
                "/v1/edge/devices/:id",
                match method {
                    Method::GET => match self.devices.get(id).await {
                        Ok(d) => ok(json!(d)),
                        Err(e) => app_error(e, &self.metrics),
                    },
                    _ => method_not_allowed("GET"),
                },
            ),
            Some("telemetry") => (
                "/v1/edge/devices/:id/telemetry",
                match method {
                    Method::GET => self.telemetry(id, query).await,
                    _ => method_not_allowed("GET"),
                },
            ),
            Some(_) => (
                "other",
                error(
                    StatusCode::NOT_FOUND,
                    format!("no route for /v1/edge/devices/{rest}"),
                ),
            ),
        }
    }

    pub(super) async fn telemetry(&self, id: String, query: &Query) -> Resp {
        let num = |k: &str, default: u64| -> Result<u64, Box<Resp>> {
            match query.get(k) {
                None => Ok(default),
                Some(v) => v.parse().map_err(|_| {
                    Box::new(error(
                        StatusCode::BAD_REQUEST,
                        format!("{k}: `{v}` is not a non-negative integer"),
                    ))
                }),
            }
        };
        let since = match num("since", 0) {
            Ok(v) => v,
            Err(r) => return *r,
        };
        let limit = match num("limit", DEFAULT_HISTORY_LIMIT as u64) {
            Ok(v) if (1..=MAX_HISTORY_LIMIT as u64).contains(&v) => v as usize,
            Ok(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("limit: must be 1-{MAX_HISTORY_LIMIT}"),
                )
            }
            Err(r) => return *r,
        };
        let device = match self.devices.get(id.clone()).await {
            Ok(d) => d,
            Err(e) => return app_error(e, &self.metrics),
        };
        match self.devices.telemetry(id.clone(), since, limit).await {
            Ok(history) => ok(json!({
                "device": id,
                "last": device.last_telemetry,
                "last_at": device.last_telemetry_at,
                "last_seq": device.telemetry_seq,
                "history": history,
            })),
            Err(e) => app_error(e, &self.metrics),
        }
    }
}
