//! Who is calling and what a route touches: the peer as the socket knows
//! it, the token as Konsul reads it, and the (resource, capability) pair
//! checked before any handler runs.

use std::net::IpAddr;

use hyper::body::Incoming;
use hyper::{Method, Request};

use super::query::decoded;
use crate::acl::{Capability, Resource};

/// Who is on the other end of a connection, as the socket knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    Tcp(IpAddr),
    /// A Unix-socket peer; the kernel vouches for the uid (SO_PEERCRED).
    Unix {
        uid: u32,
    },
}

/// A token from `X-API-Key` or `Authorization: Bearer`, as Konsul reads it.
pub(super) fn bearer_token(req: &Request<Incoming>) -> Option<String> {
    let h = req.headers();
    if let Some(k) = h.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(k.trim().to_owned());
    }
    let auth = h.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

/// What a route touches and with which capability, for the access check
/// made before any handler runs. None: the handler decides (the resource
/// is in the body: `/register`, `/batch`), the route checks its own
/// credentials (a hub's `POST /v1/edge/sync`), or there is no such route.
/// Konsul's mapping (internal/middleware/acl.go) for its routes; heartbeat
/// needs `register` rather than `write`, since refreshing one's own
/// registration is part of registering.
pub(crate) fn route_access(method: &Method, path: &str) -> Option<(Resource, Capability)> {
    use Capability::*;
    let read = matches!(*method, Method::GET | Method::HEAD);
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(2, '/').collect();
    let head = segs.first().copied().unwrap_or("");
    let rest = segs.get(1).copied().unwrap_or("");
    let edge = |p: &str| Resource::Edge(p.to_owned());
    let write_or = |cap_read| if read { cap_read } else { Write };
    Some(match (head, rest) {
        // The fleet page's files hold no data; what they read is checked.
        ("register", "") | ("batch", _) | ("ui", _) => return None,
        ("deregister", id) => (Resource::Service(decoded(id)), Deregister),
        ("heartbeat", id) => (Resource::Service(decoded(id)), Register),
        ("services", "") => (Resource::Service("*".into()), List),
        ("services", name) => (Resource::Service(decoded(name)), Read),
        ("kv", "") => (Resource::Kv("*".into()), List),
        ("kv", key) => (
            Resource::Kv(decoded(key)),
            match *method {
                Method::GET | Method::HEAD => Read,
                Method::DELETE => Delete,
                _ => Write,
            },
        ),
        ("health", _) => (Resource::Health, Read),
        ("metrics", "") => (Resource::Admin, Read),
        ("v1", rest) => {
            let rest = rest.strip_prefix("edge/")?;
            // The fleet view reads what the routes it summarises read.
            if let Some(view) = rest.strip_prefix("fleet/") {
                return Some(match view.split_once('/') {
                    Some(("rollouts", id)) => (edge(&format!("rollouts/{}", decoded(id))), Read),
                    _ if view == "devices" || view == "alerts" => (edge(view), List),
                    _ => (edge("edges"), List),
                });
            }
            let mut parts = rest.splitn(3, '/');
            let what = parts.next().unwrap_or("");
            let id = parts.next().map(decoded);
            match (what, id) {
                ("sync", None) if *method == Method::POST => return None,
                ("sync", Some(_)) => (edge("sync"), Write),
                ("debug", _) => (edge("debug"), Admin),
                ("devices", None)
                | ("alerts", None)
                | ("firmware", None)
                | ("rollouts", None)
                | ("edges", None) => (edge(what), write_or(List)),
                ("devices" | "telemetry" | "firmware" | "rollouts", Some(id)) => (
                    edge(&format!("{what}/{id}")),
                    match *method {
                        Method::GET | Method::HEAD => Read,
                        Method::DELETE => Delete,
                        _ => Write,
                    },
                ),
                (what, _) => (edge(what), write_or(Read)),
            }
        }
        _ => return None,
    })
}
