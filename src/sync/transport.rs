//! HTTP(S) for sync: a hyper 1 client over smol's `Async<TcpStream>`, TLS
//! from rustls (ring provider, no aws-lc: it needs cmake and clang when
//! cross-compiling) through futures-rustls. The same rustls stack serves the
//! hub's HTTPS listener. One connection per request: syncs are minutes
//! apart, and a fresh connection never carries state across a link drop.
//!
//! Also the edge's downloads ([`Fetcher`]): firmware artifacts and host
//! bundles that rollouts from the hub name, resumed with Range from the
//! partial file's length and held under a bytes-per-second cap.

use std::net::ToSocketAddrs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_io::Async;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use smol::future::FutureExt;

use super::metered::{Metered, WireCount};

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{url}: not an http:// or https:// URL")]
    BadUrl { url: String },
    #[error("{path}: {detail}")]
    Tls { path: String, detail: String },
    #[error("no system CA certificates found (/etc/ssl/certs/ca-certificates.crt); install ca-certificates or set cloud.ca_file")]
    NoRoots,
    #[error("{host}: cannot resolve: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{host}: TLS handshake failed: {source}")]
    Handshake {
        host: String,
        source: std::io::Error,
    },
    #[error("{url}: HTTP: {detail}")]
    Http { url: String, detail: String },
    #[error("{url}: the server answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: no answer within {0:?}", .timeout)]
    Timeout { url: String, timeout: Duration },
    #[error("{path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("{url}: {have} of {want} bytes received; the next attempt resumes")]
    Incomplete { url: String, have: u64, want: u64 },
}

/// A parsed `http(s)://host[:port][/base]`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub https: bool,
    pub host: String,
    pub port: u16,
    pub base: String,
    pub url: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, TransportError> {
        let bad = || TransportError::BadUrl { url: url.into() };
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        let https = match scheme {
            "https" => true,
            "http" => false,
            _ => return Err(bad()),
        };
        let (authority, base) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse().map_err(|_| bad())?)
            }
            _ => (authority, if https { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Endpoint {
            https,
            host: host.into(),
            port,
            base: base.into(),
            url: url.trim_end_matches('/').into(),
        })
    }
}

fn tls_err(path: &Path, detail: impl ToString) -> TransportError {
    TransportError::Tls {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls_err(path, e))?;
    if certs.is_empty() {
        return Err(tls_err(path, "no certificate in file"));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| tls_err(path, e))
}

const SYSTEM_CA_BUNDLES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client TLS: the CA file if given, else the system's CAs; a client
/// certificate for mTLS if given.
pub fn client_tls(
    ca_file: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(p) => {
            for c in load_certs(p)? {
                roots.add(c).map_err(|e| tls_err(p, e))?;
            }
        }
        None => {
            // The system bundle: Debian, Yocto and Buildroot's
            // ca-certificates all install the first; RPM systems the second.
            for bundle in SYSTEM_CA_BUNDLES {
                if let Ok(iter) = CertificateDer::pem_file_iter(bundle) {
                    for c in iter.flatten() {
                        let _ = roots.add(c);
                    }
                }
                if !roots.is_empty() {
                    break;
                }
            }
            if roots.is_empty() {
                return Err(TransportError::NoRoots);
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(Path::new("rustls"), e))?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| tls_err(cert, e))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Server TLS for the hub; with `client_ca`, clients must present a
/// certificate signed by it (mTLS).
pub fn server_tls(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TransportError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(cert, e))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(ca)? {
                roots.add(c).map_err(|e| tls_err(ca, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| tls_err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| tls_err(cert, e))?;
    Ok(Arc::new(config))
}

#[derive(Clone)]
pub struct Client {
    pub endpoint: Endpoint,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub token: Option<String>,
    pub timeout: Duration,
}

impl Client {
    /// POSTs `body` to `path` under the endpoint's base; returns the
    /// response body of a 2xx, at most `limit` bytes.
    ///
    /// What went over the link, and how long the TCP connect took, are
    /// added to `wire` as they happen (a failed exchange counts too).
    pub async fn post(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
        limit: usize,
        wire: &Arc<WireCount>,
    ) -> Result<Vec<u8>, TransportError> {
        self.request(hyper::Method::POST, path, body, headers, limit, wire)
            .await
    }

    /// Like [`Client::post`] with any method (a DDI client also GETs and
    /// PUTs). An `Authorization` among `headers` replaces the bearer token.
    pub async fn request(
        &self,
        method: hyper::Method,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
        limit: usize,
        wire: &Arc<WireCount>,
    ) -> Result<Vec<u8>, TransportError> {
        let url = format!("{}{path}", self.endpoint.url);
        let work = self.post_inner(method, &url, path, body, headers, limit, wire);
        let timeout = async {
            async_io::Timer::after(self.timeout).await;
            Err(TransportError::Timeout {
                url: url.clone(),
                timeout: self.timeout,
            })
        };
        work.or(timeout).await
    }

    /// A TCP connection to the endpoint (the first address that answers).
    /// TLS over `stream` to the endpoint's host, with our roots (and
    /// client certificate, if configured).
    async fn tls_handshake<S>(
        &self,
        stream: S,
        url: &str,
    ) -> Result<futures_rustls::client::TlsStream<S>, TransportError>
    where
        S: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin,
    {
        let ep = &self.endpoint;
        let tls = self.tls.clone().ok_or(TransportError::NoRoots)?;
        let name = ServerName::try_from(ep.host.clone())
            .map_err(|_| TransportError::BadUrl { url: url.into() })?;
        futures_rustls::TlsConnector::from(tls)
            .connect(name, stream)
            .await
            .map_err(|source| TransportError::Handshake {
                host: ep.host.clone(),
                source,
            })
    }

    async fn connect(&self) -> Result<Async<std::net::TcpStream>, TransportError> {
        let ep = &self.endpoint;
        let lookup = format!("{}:{}", ep.host, ep.port);
        // getaddrinfo blocks: keep it off the executor.
        let addrs: Vec<_> =
            smol::unblock(move || lookup.to_socket_addrs().map(|a| a.collect::<Vec<_>>()))
                .await
                .map_err(|source| TransportError::Resolve {
                    host: ep.host.clone(),
                    source,
                })?;
        let mut last = None;
        let mut stream = None;
        for a in addrs {
            match Async::<std::net::TcpStream>::connect(a).await {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some((a, e)),
            }
        }
        let stream = match (stream, last) {
            (Some(s), _) => s,
            (None, Some((a, source))) => {
                return Err(TransportError::Connect {
                    addr: a.to_string(),
                    source,
                })
            }
            (None, None) => {
                return Err(TransportError::Resolve {
                    host: ep.host.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
                })
            }
        };
        Ok(stream)
    }

    /// GETs `path` into `dest`, resuming from `dest`'s length with a
    /// Range request (a server that answers 200 instead restarts the
    /// file), at most `bytes_per_sec` (0: no cap). Every read must make
    /// progress within the client's timeout. Returns the file's length.
    pub async fn get_to_file(
        &self,
        path: &str,
        dest: &Path,
        bytes_per_sec: u64,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, TransportError> {
        self.get_to_file_with(path, dest, bytes_per_sec, progress, &[])
            .await
    }

    /// [`Client::get_to_file`] with extra request headers (an
    /// `Authorization` among them replaces the bearer token).
    pub async fn get_to_file_with(
        &self,
        path: &str,
        dest: &Path,
        bytes_per_sec: u64,
        progress: &(dyn Fn(u64) + Sync),
        headers: &[(&str, &str)],
    ) -> Result<u64, TransportError> {
        let url = format!("{}{path}", self.endpoint.url);
        let ep = &self.endpoint;
        let file_err = |source| TransportError::File {
            path: dest.display().to_string(),
            source,
        };
        let offset = smol::fs::metadata(dest).await.map(|m| m.len()).unwrap_or(0);
        let stream = self.connect().await?;
        let _ = stream.get_ref().set_nodelay(true);
        let mut b = hyper::Request::get(format!("{}{path}", ep.base))
            .header(hyper::header::HOST, format!("{}:{}", ep.host, ep.port));
        if offset > 0 {
            b = b.header(hyper::header::RANGE, format!("bytes={offset}-"));
        }
        let req = self
            .with_headers(b, headers)
            .body(Full::new(Bytes::new()))
            .map_err(|e| TransportError::Http {
                url: url.clone(),
                detail: e.to_string(),
            })?;
        let file = smol::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dest)
            .await
            .map_err(file_err)?;
        let dl = Download {
            url: &url,
            file,
            offset,
            bytes_per_sec,
            idle: self.timeout,
            dest,
            progress,
        };
        if ep.https {
            let tls_stream = self.tls_handshake(stream, &url).await?;
            dl.run(tls_stream, req).await
        } else {
            dl.run(stream, req).await
        }
    }

    /// The caller's headers, and this client's bearer token unless the
    /// caller sent its own `Authorization` (a DDI `TargetToken`).
    fn with_headers(
        &self,
        mut b: hyper::http::request::Builder,
        headers: &[(&str, &str)],
    ) -> hyper::http::request::Builder {
        let own_auth = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("authorization"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        if let (Some(t), false) = (&self.token, own_auth) {
            b = b.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        b
    }

    #[allow(clippy::too_many_arguments)]
    async fn post_inner(
        &self,
        method: hyper::Method,
        url: &str,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
        limit: usize,
        wire: &Arc<WireCount>,
    ) -> Result<Vec<u8>, TransportError> {
        let ep = &self.endpoint;
        let host_port = format!("{}:{}", ep.host, ep.port);
        let started = std::time::Instant::now();
        let stream = self.connect().await?;
        wire.connected_in(started.elapsed());
        let _ = stream.get_ref().set_nodelay(true);
        let stream = Metered::new(stream, wire.clone());
        let request = |host: &str| {
            let b = hyper::Request::builder()
                .method(method.clone())
                .uri(format!("{}{path}", ep.base))
                .header(hyper::header::HOST, host)
                .header(hyper::header::CONTENT_LENGTH, body.len());
            self.with_headers(b, headers)
                .body(Full::new(Bytes::from(body.clone())))
                .map_err(|e| TransportError::Http {
                    url: url.into(),
                    detail: e.to_string(),
                })
        };
        let req = request(&host_port)?;
        if ep.https {
            let tls_stream = self.tls_handshake(stream, url).await?;
            // In TLS 1.3 the hub refuses a client certificate after the
            // handshake: the client only sees the connection end or reset.
            // Name the likely cause; it is what the operator has to fix.
            exchange(tls_stream, req, url, limit)
                .await
                .map_err(|e| match e {
                    TransportError::Http { url, detail } => TransportError::Http {
                        url,
                        detail: format!(
                            "{detail} (over TLS this is usually the hub refusing our client \
                             certificate: check cloud.client_cert and the hub's http.client_ca)"
                        ),
                    },
                    other => other,
                })
        } else {
            exchange(stream, req, url, limit).await
        }
    }
}

/// How long a failed fetch waits before the next attempt (which resumes).
pub const FETCH_RETRY: Duration = Duration::from_secs(30);

/// Resumable, rate-capped downloads on an edge: the firmware artifacts and
/// the host bundles that rollouts from the hub name. One implementation for
/// both, so Range resume, the cap and the length check behave the same.
#[derive(Clone)]
pub struct Fetcher {
    /// The hub's client (`cloud.*`: TLS, client certificate, token).
    pub hub: Client,
    /// Bytes per second (0: no cap).
    pub bytes_per_sec: u64,
}

impl Fetcher {
    /// The same client under another cap (each download kind has its own
    /// config key).
    pub fn with_cap(&self, bytes_per_sec: u64) -> Fetcher {
        Fetcher {
            hub: self.hub.clone(),
            bytes_per_sec,
        }
    }

    /// Fetches `source` into `dest` until it holds `size` bytes, resuming
    /// from `dest`'s length (see [`Client::get_to_file`]). `source` is a
    /// path on the hub (`/v1/...`) or an `http(s)://` URL: on the hub's
    /// origin it gets the hub's credentials, anywhere else none (the
    /// system's CAs, no client certificate, no token: a download server
    /// must not learn what authenticates us to the hub). Err when fewer
    /// than `size` bytes arrived; more is for the caller's digest check.
    pub async fn fetch(
        &self,
        source: &str,
        dest: &Path,
        size: u64,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, TransportError> {
        let (client, path) = if source.starts_with('/') {
            (self.hub.clone(), source)
        } else {
            let ep = Endpoint::parse(source)?;
            let path = if ep.base.is_empty() { "/" } else { "" };
            let hub = &self.hub.endpoint;
            let client = if (ep.https, ep.host.as_str(), ep.port)
                == (hub.https, hub.host.as_str(), hub.port)
            {
                Client {
                    endpoint: ep,
                    ..self.hub.clone()
                }
            } else {
                let tls = if ep.https {
                    // Read only when a rollout names such a URL: most
                    // edges never need the system bundle in memory.
                    Some(smol::unblock(|| client_tls(None, None)).await?)
                } else {
                    None
                };
                Client {
                    endpoint: ep,
                    tls,
                    token: None,
                    timeout: self.hub.timeout,
                }
            };
            (client, path)
        };
        let have = client
            .get_to_file(path, dest, self.bytes_per_sec, progress)
            .await?;
        if have < size {
            return Err(TransportError::Incomplete {
                url: format!("{}{path}", client.endpoint.url),
                have,
                want: size,
            });
        }
        Ok(have)
    }
}

async fn exchange<S>(
    stream: S,
    req: hyper::Request<Full<Bytes>>,
    url: &str,
    limit: usize,
) -> Result<Vec<u8>, TransportError>
where
    S: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin + Send + 'static,
{
    let http = |e: hyper::Error| TransportError::Http {
        url: url.into(),
        detail: e.to_string(),
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(smol_hyper::rt::FuturesIo::new(stream))
            .await
            .map_err(http)?;
    let driver = async {
        let detail = match conn.await {
            // A server that closes after a complete response (Connection:
            // close, a proxy) ends the connection cleanly: the exchange
            // still finishes, or reports the early close itself.
            Ok(()) => std::future::pending::<String>().await,
            Err(e) => {
                let mut text = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    text.push_str(": ");
                    text.push_str(&s.to_string());
                    src = s.source();
                }
                text
            }
        };
        Err(TransportError::Http {
            url: url.into(),
            detail,
        })
    };
    let exchange = async {
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| TransportError::Http {
                url: url.into(),
                detail: format!("reading the response: {e}"),
            })?
            .to_bytes()
            .to_vec();
        if !status.is_success() {
            return Err(TransportError::Status {
                url: url.into(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).chars().take(300).collect(),
            });
        }
        Ok(body)
    };
    // The connection future drives the socket; the exchange finishes first
    // unless the connection dies.
    exchange.or(driver).await
}

struct Download<'a> {
    url: &'a str,
    file: smol::fs::File,
    offset: u64,
    bytes_per_sec: u64,
    idle: Duration,
    dest: &'a Path,
    /// Told the file's length after each write (for status displays).
    progress: &'a (dyn Fn(u64) + Sync),
}

impl Download<'_> {
    async fn run<S>(
        mut self,
        stream: S,
        req: hyper::Request<Full<Bytes>>,
    ) -> Result<u64, TransportError>
    where
        S: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin + Send + 'static,
    {
        use smol::io::AsyncWriteExt;
        let url = self.url;
        let http = |e: hyper::Error| TransportError::Http {
            url: url.into(),
            detail: e.to_string(),
        };
        let file_err = |source| TransportError::File {
            path: self.dest.display().to_string(),
            source,
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(smol_hyper::rt::FuturesIo::new(stream))
                .await
                .map_err(http)?;
        // The connection ending cleanly is no error of its own: a server
        // that closes after the body (`Connection: close`) may do so while
        // the exchange sleeps off the cap with the rest of the body still
        // buffered. A connection that dies early fails the request or the
        // body stream, which the exchange sees.
        let driver = async {
            match conn.await {
                Ok(()) => std::future::pending().await,
                Err(e) => Err(http(e)),
            }
        };
        let idle = self.idle;
        let timeout = || TransportError::Timeout {
            url: url.into(),
            timeout: idle,
        };
        let exchange = async {
            let resp = async { Ok(sender.send_request(req).await) }
                .or(async {
                    async_io::Timer::after(idle).await;
                    Err(timeout())
                })
                .await?
                .map_err(http)?;
            let status = resp.status();
            let mut len = match status.as_u16() {
                206 => {
                    log::info!("{url}: resuming at byte {}", self.offset);
                    self.offset
                }
                200 => {
                    // Whole entity: start the file over.
                    self.file.set_len(0).await.map_err(file_err)?;
                    0
                }
                416 if self.offset > 0 => {
                    // Already complete (or the file is longer than the image:
                    // verification decides).
                    return Ok(self.offset);
                }
                code => {
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map(|c| c.to_bytes().to_vec())
                        .unwrap_or_default();
                    return Err(TransportError::Status {
                        url: url.into(),
                        status: code,
                        body: String::from_utf8_lossy(&body).chars().take(300).collect(),
                    });
                }
            };
            let started = std::time::Instant::now();
            let mut received: u64 = 0;
            let mut body = resp.into_body();
            loop {
                let frame = async { Ok(body.frame().await) }
                    .or(async {
                        async_io::Timer::after(idle).await;
                        Err(timeout())
                    })
                    .await?;
                let Some(frame) = frame else { break };
                let frame = frame.map_err(http)?;
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                self.file.write_all(&data).await.map_err(file_err)?;
                len += data.len() as u64;
                received += data.len() as u64;
                (self.progress)(len);
                if self.bytes_per_sec > 0 {
                    // Sleep off whatever ran ahead of the cap.
                    let due = Duration::from_secs_f64(received as f64 / self.bytes_per_sec as f64);
                    if let Some(ahead) = due.checked_sub(started.elapsed()) {
                        async_io::Timer::after(ahead).await;
                    }
                }
            }
            self.file.flush().await.map_err(file_err)?;
            Ok(len)
        };
        exchange.or(driver).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("https://konsul-cloud.example.com:8500").unwrap();
        assert!(e.https);
        assert_eq!(
            (e.host.as_str(), e.port, e.base.as_str()),
            ("konsul-cloud.example.com", 8500, "")
        );
        let e = Endpoint::parse("http://10.0.0.1/hub/").unwrap();
        assert_eq!((e.port, e.base.as_str()), (80, "/hub"));
        let e = Endpoint::parse("http://[::1]:9000").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 9000));
        assert!(Endpoint::parse("ftp://x").is_err());
        assert!(Endpoint::parse("http://:80").is_err());
        assert!(Endpoint::parse("http://h:notaport").is_err());
    }
}
