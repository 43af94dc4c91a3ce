//! Firmware artifacts and device rollouts: uploads streamed to the
//! artifact store, images served whole or by one byte range (Range,
//! If-Range, If-None-Match against the digest as ETag).

use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::errors::{app_error, error, json_resp, method_not_allowed, ok};
use super::incoming::TimedBody;
use super::query::{decoded, Query};
use super::{Body, Resp};
use crate::app::App;
use crate::firmware::FirmwareError;

/// A single `bytes=` range of a `size`-byte entity: None = serve it all
/// (no header, or a form we do not split, such as several ranges);
/// Some(Err) = unsatisfiable (416); else the inclusive start and end.
pub(super) fn parse_range(header: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let range = match (a.is_empty(), b.is_empty()) {
        // The last `b` bytes.
        (true, false) => {
            let n: u64 = b.parse().ok()?;
            if n == 0 || size == 0 {
                return Some(Err(()));
            }
            (size.saturating_sub(n), size - 1)
        }
        (false, _) => {
            let start: u64 = a.parse().ok()?;
            let end: u64 = if b.is_empty() {
                u64::MAX
            } else {
                b.parse().ok()?
            };
            if start >= size || end < start {
                return Some(Err(()));
            }
            (start, end.min(size - 1))
        }
        (true, true) => return None,
    };
    Some(Ok(range))
}

impl App {
    /// `/v1/edge/firmware[/{ref}]` and `/v1/edge/rollouts[/{id}[/{cmd}]]`.
    pub(super) async fn firmware_routes(
        &self,
        req: Request<Incoming>,
        method: Method,
        rest: &str,
        query: &Query,
    ) -> (&'static str, Resp) {
        use crate::firmware::rollout::{Command, Spec};
        let Some(rollouts) = &self.rollouts else {
            return (
                "other",
                error(
                    StatusCode::NOT_FOUND,
                    "firmware is not enabled on this node",
                ),
            );
        };
        let artifacts = rollouts.artifacts();
        let m = &self.metrics;
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        match parts.as_slice() {
            ["edge", "firmware"] => (
                "/v1/edge/firmware",
                match method {
                    Method::GET => match artifacts.list().await {
                        Ok(l) => ok(json!(l)),
                        Err(e) => app_error(e, m),
                    },
                    Method::PUT | Method::POST => self.firmware_upload(artifacts, req, query).await,
                    _ => method_not_allowed("GET, PUT"),
                },
            ),
            ["edge", "firmware", reference] => {
                let reference = decoded(reference);
                (
                    "/v1/edge/firmware/:ref",
                    match method {
                        Method::GET | Method::HEAD => {
                            self.firmware_serve(artifacts, &req, reference, query).await
                        }
                        Method::DELETE => match artifacts.delete(reference).await {
                            Ok(()) => ok(json!({"message": "firmware deleted"})),
                            Err(e) => app_error(e, m),
                        },
                        _ => method_not_allowed("GET, HEAD, DELETE"),
                    },
                )
            }
            ["edge", "rollouts"] => (
                "/v1/edge/rollouts",
                match method {
                    Method::GET => match rollouts.list().await {
                        Ok(l) => ok(json!(l)),
                        Err(e) => app_error(e, m),
                    },
                    Method::POST | Method::PUT => match self.body::<Spec>(req).await {
                        Err(r) => *r,
                        Ok(spec) => match rollouts.create(spec).await {
                            Ok(r) => json_resp(StatusCode::CREATED, &json!(r)),
                            Err(e) => app_error(e, m),
                        },
                    },
                    _ => method_not_allowed("GET, POST"),
                },
            ),
            ["edge", "rollouts", id] => (
                "/v1/edge/rollouts/:id",
                match method {
                    Method::GET => match rollouts.get(decoded(id)).await {
                        Ok((r, devices)) => {
                            let mut v = json!(r);
                            v["device_states"] = json!(devices);
                            ok(v)
                        }
                        Err(e) => app_error(e, m),
                    },
                    _ => method_not_allowed("GET"),
                },
            ),
            ["edge", "rollouts", id, cmd] => {
                let cmd = match *cmd {
                    "pause" => Command::Pause,
                    "resume" => Command::Resume,
                    "abort" => Command::Abort,
                    other => {
                        return (
                            "other",
                            error(
                                StatusCode::NOT_FOUND,
                                format!("no rollout command `{other}` (pause, resume, abort)"),
                            ),
                        )
                    }
                };
                (
                    "/v1/edge/rollouts/:id/:cmd",
                    match method {
                        Method::POST => match self.no_body(req).await {
                            Err(r) => *r,
                            Ok(()) => match rollouts.command(decoded(id), cmd).await {
                                Ok(r) => ok(json!(r)),
                                Err(e) => app_error(e, m),
                            },
                        },
                        _ => method_not_allowed("POST"),
                    },
                )
            }
            _ => (
                "other",
                error(StatusCode::NOT_FOUND, format!("no route for /v1/{rest}")),
            ),
        }
    }

    /// Streams the body to the artifact store: never buffered whole.
    pub(super) async fn firmware_upload(
        &self,
        artifacts: &crate::firmware::Artifacts,
        req: Request<Incoming>,
        query: &Query,
    ) -> Resp {
        let q = |k: &str| query.get(k).unwrap_or_default().to_owned();
        let meta = crate::firmware::NewArtifact {
            device_type: query
                .get("device_type")
                .or(query.get("type"))
                .unwrap_or_default()
                .to_owned(),
            version: q("version"),
            sha256: q("sha256"),
            signature: q("signature"),
            notes: q("notes"),
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let mut up = match artifacts.begin_upload(&meta, declared).await {
            Ok(u) => u,
            Err(e) => return app_error(e, &self.metrics),
        };
        let mut body = TimedBody::new(req.into_body());
        loop {
            match body.chunk().await {
                Ok(Some(data)) => {
                    if let Err(e) = up.write(&data).await {
                        return app_error(e, &self.metrics);
                    }
                }
                Ok(None) => break,
                Err(e) => return self.body_error(e),
            }
        }
        match artifacts.finish_upload(up, meta).await {
            Ok(a) => json_resp(StatusCode::CREATED, &json!(a)),
            Err(e) => app_error(e, &self.metrics),
        }
    }

    /// The image, whole or one byte range, with its digest as ETag.
    pub(super) async fn firmware_serve(
        &self,
        artifacts: &crate::firmware::Artifacts,
        req: &Request<Incoming>,
        reference: String,
        query: &Query,
    ) -> Resp {
        use hyper::header::{ACCEPT_RANGES, CONTENT_RANGE, ETAG, IF_NONE_MATCH, IF_RANGE, RANGE};
        let a = match artifacts
            .resolve(reference, query.get("type").map(str::to_owned))
            .await
        {
            Ok(a) => a,
            Err(e) => return app_error(e, &self.metrics),
        };
        let etag = format!("\"{}\"", a.sha256);
        let header = |n| {
            req.headers()
                .get(n)
                .and_then(|v: &HeaderValue| v.to_str().ok())
        };
        let with_common = |mut r: Resp| {
            let h = r.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&etag) {
                h.insert(ETAG, v);
            }
            h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            r
        };
        if header(IF_NONE_MATCH)
            .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
        {
            let mut r = Response::new(Body::full(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            return with_common(r);
        }
        let size = a.size;
        // A range against another version of the entity serves it whole.
        let range_ok = header(IF_RANGE).is_none_or(|v| v.trim() == etag);
        let range = header(RANGE)
            .filter(|_| range_ok)
            .and_then(|h| parse_range(h, size));
        let (start, end) = match range {
            None => (0, size),
            Some(Ok((s, e))) => (s, e + 1),
            Some(Err(())) => {
                let mut r = error(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    format!("range outside the {size}-byte image"),
                );
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    r.headers_mut().insert(CONTENT_RANGE, v);
                }
                return with_common(r);
            }
        };
        let path = artifacts.path_of(&a.sha256);
        let mut file = match smol::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) => {
                return app_error(
                    FirmwareError::Io {
                        path,
                        op: "open",
                        source: e,
                    },
                    &self.metrics,
                )
            }
        };
        if start > 0 {
            if let Err(e) =
                smol::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(start)).await
            {
                return app_error(
                    FirmwareError::Io {
                        path,
                        op: "seek",
                        source: e,
                    },
                    &self.metrics,
                );
            }
        }
        let len = end - start;
        let mut r = Response::new(Body::file(file, len));
        let h = r.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(CONTENT_LENGTH, HeaderValue::from(len));
        if range.is_some() {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1)) {
                h.insert(CONTENT_RANGE, v);
            }
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
        }
        with_common(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=90-200", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Some(Ok((90, 99))));
        assert_eq!(parse_range("bytes=-200", 100), Some(Ok((0, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=5-2", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=x-1", 100), None);
    }
}
