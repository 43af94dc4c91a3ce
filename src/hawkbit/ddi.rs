//! The DDI wire format (the parts this client reads and writes) and the
//! HTTP exchanges, on the shared `sync::transport::Client`.
//!
//! Parsing is lenient (unknown fields ignored, missing ones defaulted):
//! servers differ (gooseBit sends no `part`, only a `sha1` digest) and a
//! newer server's additions must not stop updates. What the client cannot
//! act on safely (a chunk without artifacts, an artifact without a digest)
//! is refused with feedback instead.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::HawkbitError;
use crate::sync::metered::WireCount;
use crate::sync::transport::{client_tls, Client, Endpoint};

/// Largest JSON answer accepted from the server.
const JSON_LIMIT: usize = 1 << 20;
/// A request (not a download) must be answered within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Base {
    pub config: BaseConfig,
    #[serde(rename = "_links")]
    pub links: Links,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct BaseConfig {
    pub polling: Polling,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Polling {
    /// `HH:MM:SS`.
    pub sleep: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Links {
    #[serde(rename = "deploymentBase")]
    pub deployment_base: Option<Link>,
    #[serde(rename = "configData")]
    pub config_data: Option<Link>,
    #[serde(rename = "cancelAction")]
    pub cancel_action: Option<Link>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct Link {
    pub href: String,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Handling {
    Skip,
    #[default]
    Attempt,
    Forced,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct DeploymentBase {
    pub id: String,
    pub deployment: Deployment,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct Deployment {
    pub download: Handling,
    pub update: Handling,
    /// `available` / `unavailable`; absent: no window.
    #[serde(rename = "maintenanceWindow")]
    pub maintenance_window: Option<String>,
    pub chunks: Vec<Chunk>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct Chunk {
    /// `os`, `bApp`, ... (gooseBit sends none: its one chunk is the OS).
    pub part: String,
    pub version: String,
    pub name: String,
    pub artifacts: Vec<Artifact>,
    pub metadata: Vec<Metadata>,
}

impl Chunk {
    /// The chunk the A/B coordinator installs.
    pub fn is_os(&self) -> bool {
        self.part.is_empty() || self.part.eq_ignore_ascii_case("os")
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct Metadata {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct Artifact {
    pub filename: String,
    pub hashes: Hashes,
    pub size: u64,
    #[serde(rename = "_links")]
    pub links: ArtifactLinks,
}

impl Artifact {
    /// `download` (https) before `download-http`.
    pub fn href(&self) -> Option<&str> {
        self.links
            .download
            .as_ref()
            .or(self.links.download_http.as_ref())
            .map(|l| l.href.as_str())
            .filter(|h| !h.is_empty())
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct Hashes {
    pub sha256: Option<String>,
    pub sha1: Option<String>,
    pub md5: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(crate) struct ArtifactLinks {
    pub download: Option<Link>,
    #[serde(rename = "download-http")]
    pub download_http: Option<Link>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct CancelAction {
    pub id: String,
    #[serde(rename = "cancelAction")]
    pub cancel_action: CancelStop,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct CancelStop {
    #[serde(rename = "stopId")]
    pub stop_id: String,
}

/// `execution` of a feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Execution {
    Proceeding,
    Closed,
    /// Confirms a `cancelAction`.
    Canceled,
    /// Refuses a `cancelAction` (the action carries on).
    Rejected,
}

impl Execution {
    pub fn as_str(self) -> &'static str {
        match self {
            Execution::Proceeding => "proceeding",
            Execution::Closed => "closed",
            Execution::Canceled => "canceled",
            Execution::Rejected => "rejected",
        }
    }
}

/// `result.finished`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Finished {
    Success,
    Failure,
    None,
}

/// A feedback body (`.../deploymentBase/{id}/feedback` or
/// `.../cancelAction/{id}/feedback`).
pub(crate) fn feedback(
    execution: Execution,
    finished: Finished,
    progress: Option<(u32, u32)>,
    details: &[String],
) -> serde_json::Value {
    let mut result = json!({ "finished": finished });
    if let Some((cnt, of)) = progress {
        result["progress"] = json!({ "cnt": cnt, "of": of });
    }
    let ms = crate::clock::wall_millis();
    // Older servers read `time` (the DDI reference's `yyyyMMddTHHmmss`),
    // newer ones `timestamp` (ms); both ignore the one they do not know.
    json!({
        "time": crate::clock::rfc3339(ms)
            .chars()
            .filter(|c| c.is_ascii_digit() || *c == 'T')
            .take(15)
            .collect::<String>(),
        "timestamp": ms,
        "status": {
            "execution": execution,
            "result": result,
            "details": details,
        }
    })
}

/// `HH:MM:SS` (hawkBit's `polling.sleep`).
pub(crate) fn parse_sleep(s: &str) -> Option<Duration> {
    let mut secs = 0u64;
    let mut parts = 0;
    for p in s.split(':') {
        let n: u64 = p.trim().parse().ok()?;
        secs = secs.checked_mul(60)?.checked_add(n)?;
        parts += 1;
    }
    (parts == 3).then(|| Duration::from_secs(secs))
}

/// The server's side of the conversation: the controller base URL and
/// the credentials, which go only to the server's own origin.
pub(crate) struct Server {
    base: Client,
    /// `TargetToken ...` / `GatewayToken ...`, or none.
    auth: Option<String>,
    wire: Arc<WireCount>,
}

impl Server {
    pub fn new(
        cfg: &crate::config::Hawkbit,
        controller_id: &str,
        token: Option<String>,
    ) -> Result<Server, HawkbitError> {
        let url = format!(
            "{}/{}/controller/v1/{controller_id}",
            cfg.server.trim_end_matches('/'),
            cfg.tenant
        );
        let endpoint = Endpoint::parse(&url).map_err(|e| HawkbitError::Config(e.to_string()))?;
        let tls = if endpoint.https {
            Some(
                client_tls(cfg.ca_file.as_deref(), None)
                    .map_err(|e| HawkbitError::Config(e.to_string()))?,
            )
        } else {
            None
        };
        let auth = token.map(|t| {
            if cfg.gateway_token_file.is_some() {
                format!("GatewayToken {t}")
            } else {
                format!("TargetToken {t}")
            }
        });
        Ok(Server {
            base: Client {
                endpoint,
                tls,
                token: None,
                timeout: REQUEST_TIMEOUT,
            },
            auth,
            wire: Arc::new(WireCount::default()),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base.endpoint.url
    }

    /// A client for `href` and the path to ask it for: the server's TLS
    /// and credentials on its own origin, the system's CAs and none
    /// elsewhere (a download mirror must not learn the target token).
    async fn client_for(&self, href: &str) -> Result<(Client, bool), HawkbitError> {
        let ep = Endpoint::parse(href).map_err(|e| HawkbitError::Server {
            url: href.into(),
            detail: e.to_string(),
        })?;
        let own = &self.base.endpoint;
        let same =
            (ep.https, ep.host.as_str(), ep.port) == (own.https, own.host.as_str(), own.port);
        let tls = if same {
            self.base.tls.clone()
        } else if ep.https {
            Some(
                smol::unblock(|| client_tls(None, None))
                    .await
                    .map_err(|e| HawkbitError::Server {
                        url: href.into(),
                        detail: e.to_string(),
                    })?,
            )
        } else {
            None
        };
        Ok((
            Client {
                endpoint: ep,
                tls,
                token: None,
                timeout: REQUEST_TIMEOUT,
            },
            same,
        ))
    }

    fn headers(&self, same_origin: bool, json: bool) -> Vec<(&str, &str)> {
        let mut h = vec![("accept", "application/hal+json, application/json")];
        if json {
            h.push(("content-type", "application/json"));
        }
        if let (true, Some(a)) = (same_origin, &self.auth) {
            h.push(("authorization", a.as_str()));
        }
        h
    }

    async fn exchange(
        &self,
        method: hyper::Method,
        href: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Vec<u8>, HawkbitError> {
        let (client, same) = self.client_for(href).await?;
        let path = if client.endpoint.base.is_empty() {
            "/"
        } else {
            ""
        };
        let headers = self.headers(same, body.is_some());
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        client
            .request(method, path, body, &headers, JSON_LIMIT, &self.wire)
            .await
            .map_err(|e| HawkbitError::Transport {
                url: href.into(),
                source: e,
            })
    }

    /// GETs `href` (the controller base when empty) as JSON.
    pub async fn get<T: serde::de::DeserializeOwned>(&self, href: &str) -> Result<T, HawkbitError> {
        let href = if href.is_empty() {
            self.base_url()
        } else {
            href
        };
        let body = self.exchange(hyper::Method::GET, href, None).await?;
        serde_json::from_slice(&body).map_err(|e| HawkbitError::Server {
            url: href.into(),
            detail: format!("unreadable answer: {e}"),
        })
    }

    pub async fn put(&self, href: &str, body: &serde_json::Value) -> Result<(), HawkbitError> {
        self.exchange(hyper::Method::PUT, href, Some(body))
            .await
            .map(drop)
    }

    pub async fn post(&self, href: &str, body: &serde_json::Value) -> Result<(), HawkbitError> {
        self.exchange(hyper::Method::POST, href, Some(body))
            .await
            .map(drop)
    }

    /// Downloads `href` into `dest`, resuming from its length with Range.
    pub async fn download(
        &self,
        href: &str,
        dest: &Path,
        bytes_per_sec: u64,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, HawkbitError> {
        let (mut client, same) = self.client_for(href).await?;
        // A download may be slow; each read must still make progress.
        client.timeout = Duration::from_secs(60);
        let path = if client.endpoint.base.is_empty() {
            "/"
        } else {
            ""
        };
        let headers: Vec<(&str, &str)> = self
            .headers(same, false)
            .into_iter()
            .filter(|(k, _)| *k != "accept")
            .collect();
        client
            .get_to_file_with(path, dest, bytes_per_sec, progress, &headers)
            .await
            .map_err(|e| HawkbitError::Transport {
                url: href.into(),
                source: e,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_is_hours_minutes_seconds() {
        assert_eq!(parse_sleep("00:01:00"), Some(Duration::from_secs(60)));
        assert_eq!(parse_sleep("12:00:05"), Some(Duration::from_secs(43_205)));
        for bad in ["", "60", "00:01", "aa:00:00", "00:00:00:01"] {
            assert_eq!(parse_sleep(bad), None, "{bad}");
        }
    }

    #[test]
    fn goosebit_deployments_parse() {
        // gooseBit 0.2.12: no `part`, a sha1 only, one link.
        let g: DeploymentBase = serde_json::from_str(
            r#"{"id":"3","deployment":{"download":"forced","update":"forced","chunks":[
               {"name":"b.raucb","version":"2.0","artifacts":[{"filename":"b.raucb",
               "hashes":{"sha1":"ab"},"size":5,"_links":{"download":{"href":"http://h/x"}}}]}]}}"#,
        )
        .unwrap();
        assert_eq!(g.deployment.update, Handling::Forced);
        assert!(g.deployment.chunks[0].is_os());
        assert_eq!(
            g.deployment.chunks[0].artifacts[0].href(),
            Some("http://h/x")
        );
    }
}
