//! The local API over HTTP/1.1: Konsul's service and KV routes with
//! Konsul's JSON shapes, health probes, `/metrics`, and the edge's own
//! `/v1/edge/...`, on TCP (optionally TLS) and on a Unix socket.
//!
//! hyper 1 over smol through smol-hyper: HTTP/1.1 only (clients on a device
//! talk to 127.0.0.1). Against slow and hostile clients (issue 13): a
//! header timeout that is also the keep-alive idle timeout, a body rate
//! rule (`incoming`), and connection budgets per listener and per peer with
//! a reserve that keeps health probes answered through a flood
//! (`admission`). This file owns the listeners and connections; a request's
//! way through the access check and the routes is in `router`.
//!
//! Shutdown is graceful: the accept loop stops, each connection finishes
//! the request it is serving (so an acknowledged write is a committed
//! write) and closes.

mod access;
mod admission;
mod body;
mod edge;
mod errors;
mod firmware;
#[cfg(feature = "fleet-ui")]
mod fleet;
mod incoming;
mod konsul;
mod query;
mod router;

use std::convert::Infallible;
use std::net::{IpAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_io::Async;
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use smol::future::FutureExt;

use crate::app::App;
use crate::support::Shutdown;
pub use access::Peer;
use admission::{Admission, Slot, LIMITS};
pub use body::{Body, FileBody};

/// The time a client has to send a request's head, and to start the next
/// one on a keep-alive connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The same on a reserve connection: a probe sends its request at once.
const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("http.listen {addr}: cannot listen: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

type Resp = Response<Body>;

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
    // Set-up, before the executor runs.
    #[allow(clippy::disallowed_methods)]
    pub fn bind_unix(path: &std::path::Path) -> Result<Server, HttpError> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let bind_err = |source| HttpError::Bind {
            addr: path.display().to_string(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            // A socket someone still answers on is a running daemon: take
            // nothing from it. One nobody answers is left over from a crash.
            Ok(m) if m.file_type().is_socket() => {
                if UnixStream::connect(path).is_ok() {
                    return Err(bind_err(std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another process is serving this socket",
                    )));
                }
                std::fs::remove_file(path).map_err(bind_err)?
            }
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
        let admission = Admission::new(LIMITS);
        loop {
            let accept = async { Some(self.accept().await) };
            let stop = async {
                shutdown.wait().await;
                None
            };
            let Some(accepted) = accept.or(stop).await else {
                break;
            };
            let (stream, peer) = match accepted {
                Ok(Accepted::Tcp(stream, ip)) => (stream, Peer::Tcp(ip)),
                Ok(Accepted::Unix(stream, uid)) => {
                    let peer = Peer::Unix { uid };
                    let slot = admission.admit(peer);
                    self.inflight.open.fetch_add(1, Ordering::SeqCst);
                    let guard = ConnGuard(self.inflight.clone());
                    let (api, shutdown) = (api.clone(), shutdown.clone());
                    ex.spawn(async move {
                        serve_connection(stream, peer, slot, api, shutdown).await;
                        drop(guard);
                    })
                    .detach();
                    // Accepting never waits for a slot, so a stream of
                    // connections would keep this loop busy for good: let
                    // the connections it accepted run.
                    smol::future::yield_now().await;
                    continue;
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("http accept failed: {e}");
                    async_io::Timer::after(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let slot = admission.admit(peer);
            self.inflight.open.fetch_add(1, Ordering::SeqCst);
            let guard = ConnGuard(self.inflight.clone());
            let api = api.clone();
            let shutdown = shutdown.clone();
            let tls = self.tls.clone();
            ex.spawn(async move {
                match tls {
                    None => serve_connection(stream, peer, slot, api, shutdown).await,
                    Some(acceptor) => {
                        let limit = header_timeout(&slot);
                        let handshake = async { Some(acceptor.accept(stream).await) };
                        let timeout = async {
                            async_io::Timer::after(limit).await;
                            None
                        };
                        match handshake.or(timeout).await {
                            Some(Ok(s)) => serve_connection(s, peer, slot, api, shutdown).await,
                            Some(Err(e)) => log::debug!("TLS handshake failed: {e}"),
                            None => log::debug!("TLS handshake timed out"),
                        }
                    }
                }
                drop(guard);
            })
            .detach();
            smol::future::yield_now().await;
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
            let _ = smol::fs::remove_file(path).await;
        }
    }
}

fn header_timeout(slot: &Slot) -> Duration {
    match slot {
        Slot::Full(_) => HEADER_READ_TIMEOUT,
        Slot::Reserve(_) => RESERVE_HEADER_TIMEOUT,
    }
}

/// A health probe, the one request a reserve connection serves.
fn is_probe(req: &Request<Incoming>) -> bool {
    let path = req.uri().path();
    matches!(*req.method(), Method::GET | Method::HEAD)
        && (path == "/health" || path.starts_with("/health/"))
}

async fn serve_connection<S>(stream: S, peer: Peer, slot: Slot, api: Arc<App>, shutdown: Shutdown)
where
    S: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = smol_hyper::rt::FuturesIo::new(stream);
    let (reserve, evicted) = match &slot {
        Slot::Full(_) => (false, None),
        Slot::Reserve(r) => (true, Some(r.evicted.clone())),
    };
    let stopping = shutdown.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let api = api.clone();
        // A held request (the fleet page's long poll) ends at shutdown.
        req.extensions_mut().insert(stopping.clone());
        async move {
            if reserve && !is_probe(&req) {
                api.metrics.request("overloaded", 503);
                return Ok::<_, Infallible>(errors::overloaded());
            }
            Ok(api.handle(req, peer).await)
        }
    });
    // hyper restarts the header timer as soon as a keep-alive connection
    // goes idle, so the header timeout is also the idle timeout.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(smol_hyper::rt::SmolTimer::new())
        .header_read_timeout(header_timeout(&slot))
        .keep_alive(!reserve)
        .serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    let finished = async { Ended::Finished(conn.as_mut().await) };
    let stop = async {
        shutdown.wait().await;
        Ended::Stop
    };
    let evict = async {
        match &evicted {
            // Closed when a newer reserve connection took the place.
            Some(rx) => {
                let _ = rx.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
        Ended::Evicted
    };
    let result = match finished.or(stop).or(evict).await {
        Ended::Finished(r) => r,
        Ended::Stop => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        Ended::Evicted => {
            log::debug!("http: reserve connection from {peer:?} closed for a newer one");
            Ok(())
        }
    };
    if let Err(e) = result {
        log::debug!("http connection ended: {e}");
    }
    drop(slot);
}

enum Ended {
    Finished(hyper::Result<()>),
    Stop,
    Evicted,
}

/// Entry points for the fuzz targets (`fuzz/`): the request-target handling
/// every request goes through before a handler runs, without a socket.
#[doc(hidden)]
pub mod testing {
    use super::access::route_access;
    use super::query::{check_target, percent_decode, query_pairs};

    /// Checks `target` (path and query) as the router does, then
    /// classifies it for the access check. None: refused as malformed (400).
    pub fn classify(method: &str, target: &str) -> Option<(String, String)> {
        let method = hyper::Method::from_bytes(method.as_bytes()).ok()?;
        let uri: hyper::Uri = target.parse().ok()?;
        check_target(&uri).ok()?;
        let _ = query_pairs(uri.query());
        let path = uri.path();
        // A path that passed the check decodes, segment by segment.
        for seg in path.split('/') {
            assert!(
                percent_decode(seg).is_ok(),
                "checked, yet {seg:?} does not decode"
            );
        }
        Some(match route_access(&method, path) {
            Some((resource, cap)) => (
                format!("{} {}", resource.kind(), resource.path()),
                cap.as_str().to_owned(),
            ),
            None => (String::new(), String::new()),
        })
    }
}
