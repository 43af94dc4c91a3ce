//! Konsul's own routes, with Konsul's JSON shapes: register, deregister,
//! heartbeat (in the router), KV, the health summary and batch KV.

use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::errors::{app_error, error, method_not_allowed, ok};
use super::query::Query;
use super::Resp;
use crate::acl::{Capability, Principal, Resource};
use crate::app::{App, AppError};
use crate::clock::{rfc3339, wall_millis};
use crate::registry::{ServiceEntry, ServiceInput};

#[derive(Deserialize)]
pub(super) struct KvPut {
    value: String,
    #[serde(default)]
    cas: Option<u64>,
    #[serde(default)]
    flags: u64,
}

#[derive(Deserialize)]
pub(super) struct RegisterBody {
    #[serde(flatten)]
    service: ServiceInput,
    #[serde(default)]
    cas: Option<u64>,
}

pub(super) fn service_entry_json(e: &ServiceEntry) -> Value {
    json!({
        "service": e.service,
        "expires_at": e.expires_at_ms.map(rfc3339),
        "modify_index": e.modify_index,
        "create_index": e.create_index,
        "health": e.health,
    })
}

impl App {
    pub(super) async fn register(&self, req: Request<Incoming>, query: &Query) -> Resp {
        let query_cas = match query.cas() {
            Ok(c) => c,
            Err(r) => return *r,
        };
        let who = req.extensions().get::<Principal>().cloned();
        let body: RegisterBody = match self.body(req).await {
            Ok(b) => b,
            Err(r) => return *r,
        };
        let Some(who) = who else {
            return app_error(AppError::Unauthenticated, &self.metrics);
        };
        if let Err(e) = self.may_register(&who, &body.service).await {
            return app_error(e, &self.metrics);
        }
        match self
            .registry
            .register(body.service, body.cas.or(query_cas))
            .await
        {
            Ok((service, index)) => ok(json!({
                "message": "service registered",
                "service": service,
                "modify_index": index,
            })),
            Err(e) => app_error(e, &self.metrics),
        }
    }

    pub(super) async fn deregister(&self, id: String, query: &Query) -> Resp {
        let cas = match query.cas() {
            Ok(c) => c,
            Err(r) => return *r,
        };
        match self.registry.deregister(id.clone(), cas).await {
            Ok(()) => ok(json!({"message": "service deregistered", "name": id})),
            Err(e) => app_error(e, &self.metrics),
        }
    }

    pub(super) async fn kv(
        &self,
        req: Request<Incoming>,
        method: Method,
        key: String,
        query: &Query,
    ) -> Resp {
        match method {
            Method::GET => match self.registry.kv_get(key).await {
                Ok(e) if query.flag("metadata") => ok(json!({
                    "key": e.key,
                    "value": e.value,
                    "modify_index": e.modify_index,
                    "create_index": e.create_index,
                    "flags": e.flags,
                })),
                Ok(e) => ok(json!({"key": e.key, "value": e.value})),
                Err(e) => app_error(e, &self.metrics),
            },
            Method::PUT | Method::POST => {
                let query_cas = match query.cas() {
                    Ok(c) => c,
                    Err(r) => return *r,
                };
                let body: KvPut = match self.body(req).await {
                    Ok(b) => b,
                    Err(r) => return *r,
                };
                match self
                    .registry
                    .kv_put(key.clone(), body.value, body.flags, body.cas.or(query_cas))
                    .await
                {
                    Ok(index) => {
                        ok(json!({"message": "key set", "key": key, "modify_index": index}))
                    }
                    Err(e) => app_error(e, &self.metrics),
                }
            }
            Method::DELETE => {
                let cas = match query.cas() {
                    Ok(c) => c,
                    Err(r) => return *r,
                };
                match self.registry.kv_delete(key.clone(), cas).await {
                    Ok(()) => ok(json!({"message": "key deleted", "key": key})),
                    Err(e) => app_error(e, &self.metrics),
                }
            }
            _ => method_not_allowed("GET, PUT, DELETE"),
        }
    }

    pub(super) async fn health(&self) -> Resp {
        let services = match self.registry.services(true).await {
            Ok(s) => s,
            Err(e) => return app_error(e, &self.metrics),
        };
        let keys = match self.registry.kv_keys().await {
            Ok(k) => k.len(),
            Err(e) => return app_error(e, &self.metrics),
        };
        let active = services
            .iter()
            .filter(|s| s.health == crate::registry::Health::Passing)
            .count();
        ok(json!({
            "status": "healthy",
            "version": env!("CARGO_PKG_VERSION"),
            "node_id": self.registry.store().node_id(),
            "uptime": format!("{}s", self.metrics.uptime_secs()),
            "timestamp": rfc3339(wall_millis()),
            "services": {"total": services.len(), "active": active, "expired": services.len() - active},
            "kv_store": {"total_keys": keys},
            "system": {"resident_memory_bytes": crate::metrics::rss_bytes()},
        }))
    }

    /// Konsul's batch KV routes; each request is one transaction.
    pub(super) async fn batch(
        &self,
        req: Request<Incoming>,
        method: Method,
        rest: &str,
    ) -> (&'static str, Resp) {
        #[derive(Deserialize)]
        struct Keys {
            keys: Vec<String>,
        }
        #[derive(Deserialize)]
        struct Items {
            items: std::collections::BTreeMap<String, String>,
        }
        let route: &'static str = match rest {
            "kv/get" => "/batch/kv/get",
            "kv/set" => "/batch/kv/set",
            "kv/delete" => "/batch/kv/delete",
            _ => {
                return (
                    "other",
                    error(StatusCode::NOT_FOUND, format!("no route for /batch/{rest}")),
                )
            }
        };
        if method != Method::POST {
            return (route, method_not_allowed("POST"));
        }
        let who = req.extensions().get::<Principal>().cloned();
        let may = |keys: &mut dyn Iterator<Item = &String>, cap| -> Result<(), Box<Resp>> {
            let Some(who) = &who else {
                return Err(Box::new(app_error(
                    AppError::Unauthenticated,
                    &self.metrics,
                )));
            };
            for key in keys {
                self.check(who, Resource::Kv(key.clone()), cap)
                    .map_err(|e| Box::new(app_error(e, &self.metrics)))?;
            }
            Ok(())
        };
        let resp = match route {
            "/batch/kv/get" => match self.body::<Keys>(req).await {
                Err(r) => *r,
                Ok(k) if k.keys.is_empty() => {
                    error(StatusCode::BAD_REQUEST, "Keys array cannot be empty")
                }
                Ok(k) if k.keys.len() > crate::registry::MAX_BATCH => error(
                    StatusCode::BAD_REQUEST,
                    "Maximum 1000 keys per batch request",
                ),
                Ok(k) => {
                    if let Err(r) = may(&mut k.keys.iter(), Capability::Read) {
                        return (route, *r);
                    }
                    let (entries, not_found) = match self.registry.kv_get_many(k.keys).await {
                        Ok(r) => r,
                        Err(e) => return (route, app_error(e, &self.metrics)),
                    };
                    let found: serde_json::Map<String, Value> = entries
                        .into_iter()
                        .map(|e| (e.key, Value::String(e.value)))
                        .collect();
                    ok(json!({"found": found, "not_found": not_found}))
                }
            },
            "/batch/kv/set" => match self.body::<Items>(req).await {
                Err(r) => *r,
                Ok(i) if i.items.is_empty() => {
                    error(StatusCode::BAD_REQUEST, "Items map cannot be empty")
                }
                Ok(i) => {
                    if let Err(r) = may(&mut i.items.keys(), Capability::Write) {
                        return (route, *r);
                    }
                    let keys: Vec<String> = i.items.keys().cloned().collect();
                    match self
                        .registry
                        .kv_put_many(i.items.into_iter().collect())
                        .await
                    {
                        Ok(index) => ok(json!({
                            "message": format!("Successfully set {} keys", keys.len()),
                            "count": keys.len(),
                            "keys": keys,
                            "modify_index": index,
                        })),
                        Err(e) => app_error(e, &self.metrics),
                    }
                }
            },
            _ => match self.body::<Keys>(req).await {
                Err(r) => *r,
                Ok(k) if k.keys.is_empty() => {
                    error(StatusCode::BAD_REQUEST, "Keys array cannot be empty")
                }
                Ok(k) => {
                    if let Err(r) = may(&mut k.keys.iter(), Capability::Delete) {
                        return (route, *r);
                    }
                    match self.registry.kv_delete_many(k.keys).await {
                        Ok(deleted) => ok(json!({
                            "message": format!("Successfully deleted {} keys", deleted.len()),
                            "count": deleted.len(),
                            "keys": deleted,
                        })),
                        Err(e) => app_error(e, &self.metrics),
                    }
                }
            },
        };
        (route, resp)
    }
}
