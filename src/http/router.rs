//! One request: who the caller is, the access check, then the route.
//! Routing is a match on method and path segments: a few dozen routes do
//! not need a router crate. A target with an invalid percent-escape is
//! refused before anything routes on it. Bodies are read here, through a
//! hard size limit and a minimum rate, before any parsing; every JSON body
//! is an object.

use std::sync::atomic::Ordering;

use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::access::{bearer_token, route_access, Peer};
use super::errors::{app_error, error, method_not_allowed, ok};
use super::incoming::{ReadError, TimedBody};
use super::konsul::service_entry_json;
use super::query::{check_target, decoded, query_pairs, Query};
use super::{Body, Resp};
use crate::acl::Caller;
use crate::app::App;
use crate::clock::{rfc3339, wall_millis};

impl App {
    pub async fn handle(&self, mut req: Request<Incoming>, peer: Peer) -> Resp {
        if let Err(e) = check_target(req.uri()) {
            self.metrics.request("other", 400);
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
        let caller = match peer {
            Peer::Unix { uid } => Caller::Local { uid },
            Peer::Tcp(_) => Caller::Tcp {
                token: bearer_token(&req),
            },
        };
        let who = match self.identify(caller).await {
            Ok(who) => who,
            Err(e) => {
                let resp = app_error(e, &self.metrics);
                self.metrics.request("unauthorized", resp.status().as_u16());
                return resp;
            }
        };
        if let Some((resource, cap)) = route_access(req.method(), req.uri().path()) {
            if let Err(e) = self.check(&who, resource, cap) {
                let resp = app_error(e, &self.metrics);
                let label = if resp.status() == StatusCode::UNAUTHORIZED {
                    "unauthorized"
                } else {
                    "forbidden"
                };
                self.metrics.request(label, resp.status().as_u16());
                return resp;
            }
        }
        req.extensions_mut().insert(who);
        let (route, resp) = self.route(req).await;
        self.metrics.request(route, resp.status().as_u16());
        resp
    }

    pub(super) async fn body<T: for<'de> Deserialize<'de>>(
        &self,
        req: Request<Incoming>,
    ) -> Result<T, Box<Resp>> {
        let bytes = self.raw_body(req).await?;
        // Every body here is an object: serde would fill a struct from an
        // array by position, where Konsul (Go's encoding/json) refuses it.
        if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            self.metrics.rejected_bodies.fetch_add(1, Ordering::Relaxed);
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "Invalid JSON body: expected a JSON object",
            )));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            self.metrics.rejected_bodies.fetch_add(1, Ordering::Relaxed);
            Box::new(error(
                StatusCode::BAD_REQUEST,
                format!("Invalid JSON body: {e}"),
            ))
        })
    }

    /// The body, refused with 413 past `http.max_body_size` (from the
    /// declared length when there is one, before reading anything) and
    /// with 408 when it does not arrive in time (see `incoming`).
    pub(super) async fn raw_body(&self, req: Request<Incoming>) -> Result<Bytes, Box<Resp>> {
        TimedBody::new(req.into_body())
            .collect(self.max_body)
            .await
            .map_err(|e| Box::new(self.body_error(e)))
    }

    pub(super) fn body_error(&self, e: ReadError) -> Resp {
        match e {
            ReadError::TooLarge { .. } => {
                self.metrics.rejected_bodies.fetch_add(1, Ordering::Relaxed);
                error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "request body exceeds http.max_body_size ({} bytes)",
                        self.max_body
                    ),
                )
            }
            ReadError::TimedOut { .. } => {
                self.metrics.rejected_bodies.fetch_add(1, Ordering::Relaxed);
                let mut r = error(StatusCode::REQUEST_TIMEOUT, e.to_string());
                // The rest of the body may still come: the connection
                // cannot carry another request.
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                r
            }
            ReadError::Read(_) => error(StatusCode::BAD_REQUEST, e.to_string()),
        }
    }

    /// For routes that take no body: one would be all unknown fields, so
    /// only an empty body or `{}` passes.
    pub(super) async fn no_body(&self, req: Request<Incoming>) -> Result<(), Box<Resp>> {
        let bytes = self.raw_body(req).await?;
        let empty = bytes.iter().all(u8::is_ascii_whitespace)
            || serde_json::from_slice::<serde_json::Map<String, Value>>(&bytes)
                .is_ok_and(|m| m.is_empty());
        if empty {
            return Ok(());
        }
        self.metrics.rejected_bodies.fetch_add(1, Ordering::Relaxed);
        Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "this route takes no body (unknown fields are refused on /v1/edge routes)",
        )))
    }

    pub(super) async fn route(&self, req: Request<Incoming>) -> (&'static str, Resp) {
        let path = req.uri().path().to_owned();
        let query = Query(query_pairs(req.uri().query()));
        // HEAD is answered as GET; hyper sends the head without the body.
        let method = match req.method() {
            &Method::HEAD => Method::GET,
            m => m.clone(),
        };
        let segs: Vec<&str> = path.trim_start_matches('/').splitn(2, '/').collect();
        let head = segs.first().copied().unwrap_or("");
        let rest = segs.get(1).copied().unwrap_or("");
        match (head, rest) {
            ("register", "") => (
                "/register",
                match method {
                    Method::PUT | Method::POST => self.register(req, &query).await,
                    _ => method_not_allowed("PUT"),
                },
            ),
            ("deregister", id) if !id.is_empty() => (
                "/deregister/:id",
                match method {
                    Method::DELETE | Method::PUT => self.deregister(decoded(id), &query).await,
                    _ => method_not_allowed("DELETE"),
                },
            ),
            ("heartbeat", id) if !id.is_empty() => (
                "/heartbeat/:id",
                match method {
                    Method::PUT | Method::POST => {
                        match self.registry.heartbeat(decoded(id)).await {
                            Ok(s) => ok(json!({"message": "heartbeat updated", "service": s.name})),
                            Err(e) => app_error(e, &self.metrics),
                        }
                    }
                    _ => method_not_allowed("PUT"),
                },
            ),
            ("services", "") => (
                "/services/",
                match method {
                    Method::GET => match self.registry.services(false).await {
                        Ok(list) => ok(Value::Array(
                            list.iter().map(|e| json!(e.service)).collect(),
                        )),
                        Err(e) => app_error(e, &self.metrics),
                    },
                    _ => method_not_allowed("GET"),
                },
            ),
            ("services", name) => (
                "/services/:name",
                match method {
                    Method::GET => match self.registry.service(decoded(name)).await {
                        Ok(e) if query.flag("metadata") => ok(service_entry_json(&e)),
                        Ok(e) => ok(json!(e.service)),
                        Err(e) => app_error(e, &self.metrics),
                    },
                    _ => method_not_allowed("GET"),
                },
            ),
            ("kv", "") => (
                "/kv/",
                match method {
                    Method::GET => match self.registry.kv_keys().await {
                        Ok(keys) => ok(json!(keys)),
                        Err(e) => app_error(e, &self.metrics),
                    },
                    _ => method_not_allowed("GET"),
                },
            ),
            ("kv", key) => ("/kv/:key", self.kv(req, method, decoded(key), &query).await),
            ("health", "") => (
                "/health",
                match method {
                    Method::GET => self.health().await,
                    _ => method_not_allowed("GET"),
                },
            ),
            ("health", "live") => (
                "/health/live",
                match method {
                    Method::GET => {
                        ok(json!({"status": "alive", "timestamp": rfc3339(wall_millis())}))
                    }
                    _ => method_not_allowed("GET"),
                },
            ),
            ("health", "ready") => (
                "/health/ready",
                match method {
                    Method::GET if self.registry.store().is_ready().await => {
                        ok(json!({"status": "ready", "timestamp": rfc3339(wall_millis())}))
                    }
                    Method::GET => error(StatusCode::SERVICE_UNAVAILABLE, "store not answering"),
                    _ => method_not_allowed("GET"),
                },
            ),
            ("metrics", "") => (
                "/metrics",
                match method {
                    Method::GET => self.metrics_text().await,
                    _ => method_not_allowed("GET"),
                },
            ),
            ("batch", rest) => self.batch(req, method, rest).await,
            ("v1", rest) => self.edge(req, method, rest, &query).await,
            #[cfg(feature = "fleet-ui")]
            ("ui", _) if path == "/ui" => ("/ui", super::fleet::ui_redirect()),
            #[cfg(feature = "fleet-ui")]
            ("ui", rest) => ("/ui", super::fleet::ui(&method, rest)),
            _ => (
                "other",
                error(StatusCode::NOT_FOUND, format!("no route for {path}")),
            ),
        }
    }

    pub(super) async fn metrics_text(&self) -> Resp {
        let counts = match self.devices.counts().await {
            Ok(c) => c,
            Err(e) => return app_error(e, &self.metrics),
        };
        match self.registry.store().call(|db| db.stats()).await {
            Ok(Ok(stats)) => {
                let mut text = self.metrics.render(&stats, self.registry.store().node_id());
                self.metrics.render_devices(&counts, &mut text);
                self.sync.render_metrics(&mut text);
                self.limits.render_metrics(&mut text);
                self.render_ota_metrics(&mut text);
                let mut r = Response::new(Body::full(text));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            Ok(Err(e)) | Err(e) => app_error(e, &self.metrics),
        }
    }
}
