//! Konsul's error JSON (`{"error","message"}`) and the one mapping from
//! [`AppError`] to an HTTP status: exhaustive, so a new error class does
//! not compile until it has a status.

use std::sync::atomic::Ordering;

use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};

use super::{Body, Resp};
use crate::app::AppError;
use crate::metrics::Metrics;

/// Konsul's error body.
pub(super) fn error(status: StatusCode, message: impl Into<String>) -> Resp {
    let title = match status {
        StatusCode::CONFLICT => "CAS conflict",
        s => s.canonical_reason().unwrap_or("Error"),
    };
    json_resp(status, &json!({"error": title, "message": message.into()}))
}

pub(super) fn json_resp(status: StatusCode, v: &Value) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub(super) fn ok(v: Value) -> Resp {
    json_resp(StatusCode::OK, &v)
}

pub(super) fn method_not_allowed(allow: &'static str) -> Resp {
    // HEAD is served wherever GET is (the router answers it as a GET and
    // hyper leaves the body out).
    let allow = if allow.contains("GET") && !allow.contains("HEAD") {
        allow.replacen("GET", "GET, HEAD", 1)
    } else {
        allow.to_owned()
    };
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}"),
    );
    if let Ok(v) = HeaderValue::from_str(&allow) {
        r.headers_mut().insert(ALLOW, v);
    }
    r
}

/// The answer on a connection past the peer's or the listener's budget
/// (see `admission`): only health probes are served there.
pub(super) fn overloaded() -> Resp {
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many connections: this one may only ask for /health; retry later",
    );
    let h = r.headers_mut();
    h.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    h.insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Maps every application error to a status and Konsul's JSON,
/// exhaustively: a new class does not compile until it has a status.
pub(crate) fn app_error(e: impl Into<AppError>, metrics: &Metrics) -> Resp {
    match e.into() {
        AppError::Invalid(m) => error(StatusCode::BAD_REQUEST, m),
        AppError::NotFound(m) => error(StatusCode::NOT_FOUND, m),
        AppError::CasConflict(m) => error(StatusCode::CONFLICT, m),
        AppError::Conflict(m) => json_resp(
            StatusCode::CONFLICT,
            &json!({"error": "Conflict", "message": m}),
        ),
        AppError::Limit(m) => error(StatusCode::INSUFFICIENT_STORAGE, m),
        AppError::StorageFull(m) => {
            metrics.store_errors.fetch_add(1, Ordering::Relaxed);
            error(StatusCode::INSUFFICIENT_STORAGE, m)
        }
        AppError::TooLarge(m) => {
            metrics.rejected_bodies.fetch_add(1, Ordering::Relaxed);
            error(StatusCode::PAYLOAD_TOO_LARGE, m)
        }
        AppError::Unavailable(m) => error(StatusCode::SERVICE_UNAVAILABLE, m),
        AppError::Upstream(m) => error(StatusCode::BAD_GATEWAY, m),
        // Konsul's middleware (internal/middleware/acl.go) answers these.
        AppError::Unauthenticated => {
            json_resp(StatusCode::UNAUTHORIZED, &json!({"error": "unauthorized"}))
        }
        AppError::Forbidden {
            resource,
            capability,
            ..
        } => json_resp(
            StatusCode::FORBIDDEN,
            &json!({"error": "forbidden", "message": "insufficient permissions",
                    "resource": resource, "capability": capability}),
        ),
        AppError::Internal(m) => {
            metrics.store_errors.fetch_add(1, Ordering::Relaxed);
            error(StatusCode::INTERNAL_SERVER_ERROR, m)
        }
    }
}
