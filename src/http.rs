//! The local HTTP API: Konsul's service and KV routes with Konsul's JSON
//! shapes, health probes, `/metrics`, and the edge's own `/v1/edge/...`.
//!
//! hyper 1 over smol through smol-hyper: HTTP/1.1 only (clients on a device
//! talk to 127.0.0.1), a header read timeout against idle sockets, a cap on
//! open connections, and bodies read through a hard size limit before any
//! parsing. Routing is a match on method and path segments: a dozen routes
//! do not need a router crate. Every route's errors map exhaustively from
//! [`RegistryError`] to a status and Konsul's `{"error","message"}` body.
//!
//! Shutdown is graceful: the accept loop stops, each connection finishes
//! the request it is serving (so an acknowledged write is a committed
//! write) and closes.

use std::convert::Infallible;
use std::net::{IpAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_io::Async;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use smol::future::FutureExt;

use crate::acl::{Caller, Capability, Principal, Resource};
use crate::app::{App, AppError};
use crate::clock::{rfc3339, wall_millis};
use crate::devices::{DeviceError, DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT};
use crate::firmware::FirmwareError;
use crate::metrics::Metrics;
use crate::registry::{RegistryError, ServiceEntry, ServiceInput};
use crate::store::StoreError;
use crate::support::Shutdown;

/// Open connections beyond this wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 128;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("http.listen {addr}: cannot listen: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

type Resp = Response<Body>;

/// A response body: a buffer (every JSON answer) or a byte range of a file
/// streamed in chunks (firmware images: never read whole into memory).
pub enum Body {
    Full(Full<Bytes>),
    File(FileBody),
}

impl Body {
    fn full(b: impl Into<Bytes>) -> Body {
        Body::Full(Full::new(b.into()))
    }
}

pub struct FileBody {
    file: smol::fs::File,
    remaining: u64,
    buf: Box<[u8]>,
}

/// Read size per frame when streaming a file.
const FILE_CHUNK: usize = 64 << 10;

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        use std::task::Poll;
        match self.get_mut() {
            Body::Full(f) => std::pin::Pin::new(f)
                .poll_frame(cx)
                .map_err(|never: Infallible| match never {}),
            Body::File(f) => {
                if f.remaining == 0 {
                    return Poll::Ready(None);
                }
                let n = (f.remaining as usize).min(f.buf.len());
                let FileBody { file, buf, .. } = f;
                match smol::io::AsyncRead::poll_read(std::pin::Pin::new(file), cx, &mut buf[..n]) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(Ok(0)) => {
                        Poll::Ready(Some(Err(std::io::ErrorKind::UnexpectedEof.into())))
                    }
                    Poll::Ready(Ok(k)) => {
                        f.remaining -= k as u64;
                        Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::copy_from_slice(
                            &f.buf[..k],
                        )))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(f) => f.is_end_stream(),
            Body::File(f) => f.remaining == 0,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Body::Full(f) => f.size_hint(),
            Body::File(f) => hyper::body::SizeHint::with_exact(f.remaining),
        }
    }
}

/// Counts open connections so shutdown can wait for them to drain.
#[derive(Default)]
struct Inflight {
    open: AtomicUsize,
    drained: event_listener::Event,
}

struct ConnGuard(Arc<Inflight>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.drained.notify(usize::MAX);
        }
    }
}

enum Listener {
    Tcp(Async<TcpListener>),
    /// The socket file is removed again when the server stops.
    Unix(Async<UnixListener>, std::path::PathBuf),
}

enum Accepted {
    Tcp(Async<std::net::TcpStream>, IpAddr),
    Unix(Async<UnixStream>, u32),
}

/// A bound listener; bind before READY=1 so "ready" means "accepting".
pub struct Server {
    listener: Listener,
    inflight: Arc<Inflight>,
    tls: Option<futures_rustls::TlsAcceptor>,
}

impl Server {
    pub fn bind(addr: &str) -> Result<Server, HttpError> {
        let bind_err = |source| HttpError::Bind {
            addr: addr.into(),
            source,
        };
        let std_listener = TcpListener::bind(addr).map_err(bind_err)?;
        let listener = Listener::Tcp(Async::new(std_listener).map_err(bind_err)?);
        Ok(Server {
            listener,
            inflight: Arc::default(),
            tls: None,
        })
    }

    /// The local API on a Unix socket (`http.unix_socket`). Any local user
    /// may connect (mode 0666): who they are comes from the kernel
    /// (SO_PEERCRED), and the access policy decides what they may do. A
    /// stale socket from a crash is replaced; any other file is not.
    pub fn bind_unix(path: &std::path::Path) -> Result<Server, HttpError> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let bind_err = |source| HttpError::Bind {
            addr: path.display().to_string(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(bind_err)?,
            Ok(_) => {
                return Err(bind_err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a socket",
                )))
            }
            Err(_) => {}
        }
        let std_listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
        Ok(Server {
            listener: Listener::Unix(
                Async::new(std_listener).map_err(bind_err)?,
                path.to_path_buf(),
            ),
            inflight: Arc::default(),
            tls: None,
        })
    }

    async fn accept(&self) -> std::io::Result<Accepted> {
        match &self.listener {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                Ok(Accepted::Tcp(s, peer.ip()))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                let cred = nix::sys::socket::getsockopt(
                    s.get_ref(),
                    nix::sys::socket::sockopt::PeerCredentials,
                )
                .map_err(std::io::Error::from)?;
                Ok(Accepted::Unix(s, cred.uid()))
            }
        }
    }

    /// Serves HTTPS instead of HTTP.
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(futures_rustls::TlsAcceptor::from(config));
        self
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match &self.listener {
            Listener::Tcp(l) => l.get_ref().local_addr(),
            Listener::Unix(..) => Err(std::io::ErrorKind::Unsupported.into()),
        }
    }

    /// Serves until `shutdown`, then waits up to `drain` for open
    /// connections to finish their current request.
    pub async fn serve(
        self,
        api: Arc<App>,
        ex: Arc<smol::Executor<'static>>,
        shutdown: Shutdown,
        drain: Duration,
    ) {
        let slots = Arc::new(smol::lock::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let accept = async {
                let permit = slots.acquire_arc().await;
                Some((self.accept().await, permit))
            };
            let stop = async {
                shutdown.wait().await;
                None
            };
            let Some((accepted, permit)) = accept.or(stop).await else {
                break;
            };
            let (stream, peer) = match accepted {
                Ok(Accepted::Tcp(stream, ip)) => (stream, Peer::Tcp(ip)),
                Ok(Accepted::Unix(stream, uid)) => {
                    self.inflight.open.fetch_add(1, Ordering::SeqCst);
                    let guard = ConnGuard(self.inflight.clone());
                    let (api, shutdown) = (api.clone(), shutdown.clone());
                    ex.spawn(async move {
                        serve_connection(stream, Peer::Unix { uid }, api, shutdown).await;
                        drop(permit);
                        drop(guard);
                    })
                    .detach();
                    continue;
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("http accept failed: {e}");
                    async_io::Timer::after(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.inflight.open.fetch_add(1, Ordering::SeqCst);
            let guard = ConnGuard(self.inflight.clone());
            let api = api.clone();
            let shutdown = shutdown.clone();
            let tls = self.tls.clone();
            ex.spawn(async move {
                match tls {
                    None => serve_connection(stream, peer, api, shutdown).await,
                    Some(acceptor) => {
                        let handshake = async { Some(acceptor.accept(stream).await) };
                        let timeout = async {
                            async_io::Timer::after(HEADER_READ_TIMEOUT).await;
                            None
                        };
                        match handshake.or(timeout).await {
                            Some(Ok(s)) => serve_connection(s, peer, api, shutdown).await,
                            Some(Err(e)) => log::debug!("TLS handshake failed: {e}"),
                            None => log::debug!("TLS handshake timed out"),
                        }
                    }
                }
                drop(permit);
                drop(guard);
            })
            .detach();
        }
        let wait_drained = async {
            loop {
                if self.inflight.open.load(Ordering::SeqCst) == 0 {
                    return true;
                }
                let l = self.inflight.drained.listen();
                if self.inflight.open.load(Ordering::SeqCst) == 0 {
                    return true;
                }
                l.await;
            }
        };
        let deadline = async {
            async_io::Timer::after(drain).await;
            false
        };
        if !wait_drained.or(deadline).await {
            log::warn!(
                "{} HTTP connections still open after {drain:?}; closing them",
                self.inflight.open.load(Ordering::SeqCst)
            );
        }
        if let Listener::Unix(_, path) = &self.listener {
            // Blocking, but once, at shutdown, on a tmpfs path.
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn serve_connection<S>(stream: S, peer: Peer, api: Arc<App>, shutdown: Shutdown)
where
    S: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = smol_hyper::rt::FuturesIo::new(stream);
    let service = hyper::service::service_fn(move |req| {
        let api = api.clone();
        async move { Ok::<_, Infallible>(api.handle(req, peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(smol_hyper::rt::SmolTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let finished = async { Some(conn.as_mut().await) };
    let stop = async {
        shutdown.wait().await;
        None
    };
    let result = match finished.or(stop).await {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        log::debug!("http connection ended: {e}");
    }
}

/// Who is on the other end of a connection, as the socket knows it.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    Tcp(IpAddr),
    /// A Unix-socket peer; the kernel vouches for the uid (SO_PEERCRED).
    Unix {
        uid: u32,
    },
}

/// A token from `X-API-Key` or `Authorization: Bearer`, as Konsul reads it.
fn bearer_token(req: &Request<Incoming>) -> Option<String> {
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
        ("register", "") | ("batch", _) => return None,
        ("deregister", id) => (Resource::Service(percent_decode(id)), Deregister),
        ("heartbeat", id) => (Resource::Service(percent_decode(id)), Register),
        ("services", "") => (Resource::Service("*".into()), List),
        ("services", name) => (Resource::Service(percent_decode(name)), Read),
        ("kv", "") => (Resource::Kv("*".into()), List),
        ("kv", key) => (
            Resource::Kv(percent_decode(key)),
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
            let mut parts = rest.splitn(3, '/');
            let what = parts.next().unwrap_or("");
            let id = parts.next().map(percent_decode);
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

/// Konsul's error body.
fn error(status: StatusCode, message: impl Into<String>) -> Resp {
    let title = match status {
        StatusCode::CONFLICT => "CAS conflict",
        s => s.canonical_reason().unwrap_or("Error"),
    };
    json_resp(status, &json!({"error": title, "message": message.into()}))
}

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn ok(v: Value) -> Resp {
    json_resp(StatusCode::OK, &v)
}

fn method_not_allowed(allow: &'static str) -> Resp {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}"),
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// Maps every application error to a status and Konsul's JSON,
/// exhaustively: a new class does not compile until it has a status.
pub(crate) fn app_error(e: AppError, metrics: &Metrics) -> Resp {
    match e {
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

fn registry_error(e: RegistryError, metrics: &Metrics) -> Resp {
    app_error(e.into(), metrics)
}

fn device_error(e: DeviceError, metrics: &Metrics) -> Resp {
    app_error(e.into(), metrics)
}

fn store_error(e: StoreError, metrics: &Metrics) -> Resp {
    app_error(e.into(), metrics)
}

/// The query string as pairs, percent-decoded.
fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            // `+` is a space only in query strings, never in paths.
            (
                percent_decode(&k.replace('+', " ")),
                percent_decode(&v.replace('+', " ")),
            )
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query(Vec<(String, String)>);

impl Query {
    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1" | ""))
    }

    fn cas(&self) -> Result<Option<u64>, Box<Resp>> {
        match self.get("cas") {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| Box::new(error(StatusCode::BAD_REQUEST, "Invalid CAS parameter"))),
        }
    }
}

#[derive(Deserialize)]
struct KvPut {
    value: String,
    #[serde(default)]
    cas: Option<u64>,
    #[serde(default)]
    flags: u64,
}

#[derive(Deserialize)]
struct RegisterBody {
    #[serde(flatten)]
    service: ServiceInput,
    #[serde(default)]
    cas: Option<u64>,
}

fn service_entry_json(e: &ServiceEntry) -> Value {
    json!({
        "service": e.service,
        "expires_at": e.expires_at_ms.map(rfc3339),
        "modify_index": e.modify_index,
        "create_index": e.create_index,
        "health": e.health,
    })
}

impl App {
    pub async fn handle(&self, mut req: Request<Incoming>, peer: Peer) -> Resp {
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

    async fn body<T: for<'de> Deserialize<'de>>(
        &self,
        req: Request<Incoming>,
    ) -> Result<T, Box<Resp>> {
        let bytes = self.raw_body(req).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            self.metrics.rejected_bodies.fetch_add(1, Ordering::Relaxed);
            Box::new(error(
                StatusCode::BAD_REQUEST,
                format!("Invalid JSON body: {e}"),
            ))
        })
    }

    /// The body, refused with 413 past `http.max_body_size` (from the
    /// declared length when there is one, before reading anything).
    async fn raw_body(&self, req: Request<Incoming>) -> Result<Bytes, Box<Resp>> {
        let too_large = || {
            self.metrics.rejected_bodies.fetch_add(1, Ordering::Relaxed);
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "request body exceeds http.max_body_size ({} bytes)",
                    self.max_body
                ),
            )
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body) {
            return Err(Box::new(too_large()));
        }
        let bytes = match Limited::new(req.into_body(), self.max_body as usize)
            .collect()
            .await
        {
            Ok(c) => c.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(Box::new(too_large()))
            }
            Err(e) => {
                return Err(Box::new(error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read body: {e}"),
                )))
            }
        };
        Ok(bytes)
    }

    async fn route(&self, req: Request<Incoming>) -> (&'static str, Resp) {
        let path = req.uri().path().to_owned();
        let query = Query(query_pairs(req.uri().query()));
        let method = req.method().clone();
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
                    Method::DELETE | Method::PUT => {
                        self.deregister(percent_decode(id), &query).await
                    }
                    _ => method_not_allowed("DELETE"),
                },
            ),
            ("heartbeat", id) if !id.is_empty() => (
                "/heartbeat/:id",
                match method {
                    Method::PUT | Method::POST => {
                        match self.registry.heartbeat(percent_decode(id)).await {
                            Ok(s) => ok(json!({"message": "heartbeat updated", "service": s.name})),
                            Err(e) => registry_error(e, &self.metrics),
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
                        Err(e) => registry_error(e, &self.metrics),
                    },
                    _ => method_not_allowed("GET"),
                },
            ),
            ("services", name) => (
                "/services/:name",
                match method {
                    Method::GET => match self.registry.service(percent_decode(name)).await {
                        Ok(e) if query.flag("metadata") => ok(service_entry_json(&e)),
                        Ok(e) => ok(json!(e.service)),
                        Err(e) => registry_error(e, &self.metrics),
                    },
                    _ => method_not_allowed("GET"),
                },
            ),
            ("kv", "") => (
                "/kv/",
                match method {
                    Method::GET => match self.registry.kv_keys().await {
                        Ok(keys) => ok(json!(keys)),
                        Err(e) => registry_error(e, &self.metrics),
                    },
                    _ => method_not_allowed("GET"),
                },
            ),
            ("kv", key) => (
                "/kv/:key",
                self.kv(req, method, percent_decode(key), &query).await,
            ),
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
            _ => (
                "other",
                error(StatusCode::NOT_FOUND, format!("no route for {path}")),
            ),
        }
    }

    async fn register(&self, req: Request<Incoming>, query: &Query) -> Resp {
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
            Err(e) => registry_error(e, &self.metrics),
        }
    }

    async fn deregister(&self, id: String, query: &Query) -> Resp {
        let cas = match query.cas() {
            Ok(c) => c,
            Err(r) => return *r,
        };
        match self.registry.deregister(id.clone(), cas).await {
            Ok(()) => ok(json!({"message": "service deregistered", "name": id})),
            Err(e) => registry_error(e, &self.metrics),
        }
    }

    async fn kv(&self, req: Request<Incoming>, method: Method, key: String, query: &Query) -> Resp {
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
                Err(e) => registry_error(e, &self.metrics),
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
                    Err(e) => registry_error(e, &self.metrics),
                }
            }
            Method::DELETE => {
                let cas = match query.cas() {
                    Ok(c) => c,
                    Err(r) => return *r,
                };
                match self.registry.kv_delete(key.clone(), cas).await {
                    Ok(()) => ok(json!({"message": "key deleted", "key": key})),
                    Err(e) => registry_error(e, &self.metrics),
                }
            }
            _ => method_not_allowed("GET, PUT, DELETE"),
        }
    }

    async fn health(&self) -> Resp {
        let services = match self.registry.services(true).await {
            Ok(s) => s,
            Err(e) => return registry_error(e, &self.metrics),
        };
        let keys = match self.registry.kv_keys().await {
            Ok(k) => k.len(),
            Err(e) => return registry_error(e, &self.metrics),
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

    /// `{"path": "/abs/bundle"}`: a manual install of a local, signed
    /// bundle (the same checks as D-Bus `Install`).
    async fn ota_install(&self, req: Request<Incoming>) -> Resp {
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
            Err(e) => ota_error(e, &self.metrics),
        }
    }

    /// `/v1/edge/ota/rollouts[/{id}]`: host rollouts, created on a hub.
    async fn ota_rollouts(
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
                        Err(e) => ota_error(e, m),
                    },
                    Method::POST | Method::PUT => {
                        match self.body::<crate::ota::rollout::Spec>(req).await {
                            Err(r) => *r,
                            Ok(spec) => {
                                let artifacts = self.rollouts.as_ref().map(|r| r.artifacts());
                                match self.ota.create_rollout(spec, artifacts).await {
                                    Ok(r) => json_resp(StatusCode::CREATED, &json!(r)),
                                    Err(e) => ota_error(e, m),
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
                        Err(e) => ota_error(e, m),
                    },
                    Method::DELETE => match self.ota.delete_rollout(id).await {
                        Ok(()) => ok(json!({"message": "rollout deleted"})),
                        Err(e) => ota_error(e, m),
                    },
                    _ => method_not_allowed("GET, DELETE"),
                },
            ),
        }
    }

    async fn metrics_text(&self) -> Resp {
        let counts = match self.devices.counts().await {
            Ok(c) => c,
            Err(e) => return store_error(e, &self.metrics),
        };
        match self.registry.store().call(|db| db.stats()).await {
            Ok(Ok(stats)) => {
                let mut text = self.metrics.render(&stats, self.registry.store().node_id());
                self.metrics.render_devices(&counts, &mut text);
                self.sync.render_metrics(&mut text);
                crate::metrics::render_ota(&self.ota.status(), self.ota.enabled(), &mut text);
                let mut r = Response::new(Body::full(text));
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            Ok(Err(e)) | Err(e) => store_error(e, &self.metrics),
        }
    }

    /// Konsul's batch KV routes; each request is one transaction.
    async fn batch(
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
                        Err(e) => return (route, registry_error(e, &self.metrics)),
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
                        Err(e) => registry_error(e, &self.metrics),
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
                        Err(e) => registry_error(e, &self.metrics),
                    }
                }
            },
        };
        (route, resp)
    }

    async fn hub_sync(&self, hub: &crate::sync::Hub, req: Request<Incoming>) -> Resp {
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
                    ServeError::Store(s) => store_error(s, &self.metrics),
                }
            }
        }
    }

    async fn edge(
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
                        Err(e) => registry_error(e, &self.metrics),
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
                    Method::GET => ok(self.ota.status_json().await),
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
                let id = percent_decode(&r["edge/ota/rollouts/".len()..]);
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
                        Ok(Err(e)) | Err(e) => store_error(e, &self.metrics),
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
                            Ok(Err(e)) | Err(e) => store_error(e, &self.metrics),
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
                            Ok(Err(e)) | Err(e) => store_error(e, &self.metrics),
                        }
                    }
                    _ => method_not_allowed("GET"),
                },
            ),
            "edge/sync/now" => (
                "/v1/edge/sync/now",
                match method {
                    Method::POST => match self.sync.sync_now() {
                        Ok(()) => {
                            json_resp(StatusCode::ACCEPTED, &json!({"message": "sync requested"}))
                        }
                        Err(e) => app_error(e.into(), &self.metrics),
                    },
                    _ => method_not_allowed("POST"),
                },
            ),
            "edge/devices" => (
                "/v1/edge/devices",
                match method {
                    Method::GET => match self.devices.list().await {
                        Ok(list) => ok(json!(list)),
                        Err(e) => device_error(e, &self.metrics),
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
                            Err(e) => device_error(e, &self.metrics),
                        }
                    }
                    _ => method_not_allowed("GET"),
                },
            ),
            "edge/firmware" | "edge/rollouts" => self.firmware_routes(req, method, rest, query).await,
            r if r.starts_with("edge/firmware/") || r.starts_with("edge/rollouts/") => {
                self.firmware_routes(req, method, rest, query).await
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
                        let queued = self.registry.store().spawn_job(move |_| {
                            std::thread::sleep(Duration::from_millis(ms));
                        });
                        match queued {
                            Ok(()) => ok(json!({"message": "store wedged", "ms": ms})),
                            Err(e) => store_error(e, &self.metrics),
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
}

impl App {
    /// `/v1/edge/devices/{id}` and `/v1/edge/devices/{id}/telemetry`.
    async fn device_route(
        &self,
        method: Method,
        rest: &str,
        query: &Query,
    ) -> (&'static str, Resp) {
        let (id, sub) = match rest.split_once('/') {
            Some((id, sub)) => (percent_decode(id), Some(sub)),
            None => (percent_decode(rest), None),
        };
        match sub {
            None => (
                "/v1/edge/devices/:id",
                match method {
                    Method::GET => match self.devices.get(id).await {
                        Ok(d) => ok(json!(d)),
                        Err(e) => device_error(e, &self.metrics),
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

    async fn telemetry(&self, id: String, query: &Query) -> Resp {
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
            Err(e) => return device_error(e, &self.metrics),
        };
        match self.devices.telemetry(id.clone(), since, limit).await {
            Ok(history) => ok(json!({
                "device": id,
                "last": device.last_telemetry,
                "last_at": device.last_telemetry_at,
                "last_seq": device.telemetry_seq,
                "history": history,
            })),
            Err(e) => device_error(e, &self.metrics),
        }
    }
}

fn ota_error(e: crate::ota::OtaError, metrics: &Metrics) -> Resp {
    app_error(e.into(), metrics)
}

fn firmware_error(e: FirmwareError, metrics: &Metrics) -> Resp {
    app_error(e.into(), metrics)
}

/// A single `bytes=` range of a `size`-byte entity: None = serve it all
/// (no header, or a form we do not split, such as several ranges);
/// Some(Err) = unsatisfiable (416); else the inclusive start and end.
fn parse_range(header: &str, size: u64) -> Option<Result<(u64, u64), ()>> {
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
    async fn firmware_routes(
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
                        Err(e) => firmware_error(e, m),
                    },
                    Method::PUT | Method::POST => self.firmware_upload(artifacts, req, query).await,
                    _ => method_not_allowed("GET, PUT"),
                },
            ),
            ["edge", "firmware", reference] => {
                let reference = percent_decode(reference);
                (
                    "/v1/edge/firmware/:ref",
                    match method {
                        Method::GET | Method::HEAD => {
                            self.firmware_serve(artifacts, &req, reference, query).await
                        }
                        Method::DELETE => match artifacts.delete(reference).await {
                            Ok(()) => ok(json!({"message": "firmware deleted"})),
                            Err(e) => firmware_error(e, m),
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
                        Err(e) => firmware_error(e, m),
                    },
                    Method::POST | Method::PUT => match self.body::<Spec>(req).await {
                        Err(r) => *r,
                        Ok(spec) => match rollouts.create(spec).await {
                            Ok(r) => json_resp(StatusCode::CREATED, &json!(r)),
                            Err(e) => firmware_error(e, m),
                        },
                    },
                    _ => method_not_allowed("GET, POST"),
                },
            ),
            ["edge", "rollouts", id] => (
                "/v1/edge/rollouts/:id",
                match method {
                    Method::GET => match rollouts.get(percent_decode(id)).await {
                        Ok((r, devices)) => {
                            let mut v = json!(r);
                            v["device_states"] = json!(devices);
                            ok(v)
                        }
                        Err(e) => firmware_error(e, m),
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
                        Method::POST => match rollouts.command(percent_decode(id), cmd).await {
                            Ok(r) => ok(json!(r)),
                            Err(e) => firmware_error(e, m),
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
    async fn firmware_upload(
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
            Err(e) => return firmware_error(e, &self.metrics),
        };
        let mut body = req.into_body();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Ok(data) = f.into_data() {
                        if let Err(e) = up.write(&data).await {
                            return firmware_error(e, &self.metrics);
                        }
                    }
                }
                Err(e) => {
                    return error(StatusCode::BAD_REQUEST, format!("cannot read body: {e}"));
                }
            }
        }
        match artifacts.finish_upload(up, meta).await {
            Ok(a) => json_resp(StatusCode::CREATED, &json!(a)),
            Err(e) => firmware_error(e, &self.metrics),
        }
    }

    /// The image, whole or one byte range, with its digest as ETag.
    async fn firmware_serve(
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
            Err(e) => return firmware_error(e, &self.metrics),
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
                return firmware_error(
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
                return firmware_error(
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
        let mut r = Response::new(Body::File(FileBody {
            file,
            remaining: len,
            buf: vec![0u8; FILE_CHUNK.min(len.max(1) as usize)].into_boxed_slice(),
        }));
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

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("a+b"), "a+b");
        assert_eq!(
            query_pairs(Some("k=a+b&cas=1")),
            vec![("k".into(), "a b".into()), ("cas".into(), "1".into())]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("x%4"), "x%4");
    }
}
