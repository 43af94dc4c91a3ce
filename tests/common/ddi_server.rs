//! A DDI server replaying hawkBit's documented JSON, for what gooseBit
//! does not exercise (cancelAction, maintenanceWindow, several chunks, a
//! chunk carrying our signed image and its manifest).
//!
//! THIS IS A RECORDING, NOT hawkBit: the bodies follow the examples of
//! hawkBit's published DDI API reference (the base poll with `config.polling`
//! and `_links`, `deploymentBase` with `download`/`update`/
//! `maintenanceWindow`/`chunks[part, version, name, artifacts[filename,
//! hashes, size, _links.download]]`, `cancelAction` with `stopId`), with the
//! links, digests and sizes pointed at this server's files. What the
//! client sends back (feedback, configData) is recorded for the tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

pub const BASE: &str = "/DEFAULT/controller/v1/test-node";

#[derive(Default)]
pub struct State {
    /// The `deploymentBase` body offered (None: nothing to do).
    pub deployment: Option<Value>,
    /// The `cancelAction` body offered instead (None: none).
    pub cancel: Option<Value>,
    /// Artifact bytes by file name (`.../artifacts/{name}`).
    pub files: HashMap<String, Vec<u8>>,
    /// (path, body) of every POST (feedback), in order.
    pub feedback: Vec<(String, Value)>,
    pub config_data: Vec<Value>,
    /// GETs of `deploymentBase` so far.
    pub deployment_gets: usize,
    /// `Range` headers seen on artifact downloads.
    pub ranges: Vec<String>,
    /// Artifact GETs so far.
    pub downloads: usize,
    /// Answer every feedback 503 (a server that is up but not taking it).
    pub refuse_feedback: bool,
}

pub struct DdiServer {
    pub port: u16,
    pub state: Arc<Mutex<State>>,
}

impl DdiServer {
    pub fn start() -> DdiServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || serve(c, port, &st));
            }
        });
        DdiServer { port, state }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// Feedback POSTed to `path` (e.g. `deploymentBase/7`), in order.
    pub fn feedback_to(&self, path: &str) -> Vec<Value> {
        let want = format!("{BASE}/{path}/feedback");
        self.with(|s| {
            s.feedback
                .iter()
                .filter(|(p, _)| *p == want)
                .map(|(_, b)| b.clone())
                .collect()
        })
    }

    /// An OS chunk in the reference's shape for the files named (each
    /// must be in `files`), with their sha1 and sha256.
    pub fn chunk(&self, part: &str, name: &str, version: &str, files: &[&str]) -> Value {
        let artifacts: Vec<Value> = self.with(|s| {
            files
                .iter()
                .map(|f| {
                    let data = &s.files[*f];
                    json!({
                        "filename": f,
                        "hashes": {
                            "sha1": digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, data),
                            "sha256": digest(&ring::digest::SHA256, data),
                        },
                        "size": data.len(),
                        "_links": {
                            "download-http": {"href": format!("{}{BASE}/softwaremodules/1/artifacts/{f}", self.url())},
                        }
                    })
                })
                .collect()
        });
        json!({"part": part, "version": version, "name": name, "artifacts": artifacts})
    }

    /// A `deploymentBase` body as the reference shows it.
    pub fn deployment(id: &str, update: &str, window: Option<&str>, chunks: Vec<Value>) -> Value {
        let mut d = json!({"download": "forced", "update": update, "chunks": chunks});
        if let Some(w) = window {
            d["maintenanceWindow"] = json!(w);
        }
        json!({"id": id, "deployment": d, "actionHistory": {"status": "RUNNING", "messages": []}})
    }
}

fn digest(algo: &'static ring::digest::Algorithm, data: &[u8]) -> String {
    ring::digest::digest(algo, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn serve(c: TcpStream, port: u16, st: &Mutex<State>) {
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    );
    let mut len = 0usize;
    let mut range = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or(("", ""));
        match k.trim().to_ascii_lowercase().as_str() {
            "content-length" => len = v.trim().parse().unwrap_or(0),
            "range" => range = Some(v.trim().to_owned()),
            _ => {}
        }
    }
    let mut body = vec![0; len];
    let _ = r.read_exact(&mut body);
    let path = path.split('?').next().unwrap_or("").to_owned();
    let url = format!("http://127.0.0.1:{port}{BASE}");
    let mut w = c;
    let send = |w: &mut TcpStream, status: &str, extra: &str, body: &[u8]| {
        let _ = write!(
            w,
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
            body.len()
        );
        let _ = w.write_all(body);
    };
    let json_ok = |w: &mut TcpStream, v: Value| {
        send(
            w,
            "200 OK",
            "content-type: application/hal+json\r\n",
            v.to_string().as_bytes(),
        )
    };
    let mut s = st.lock().unwrap();
    if method == "GET" && path == BASE {
        let mut links = json!({});
        if let Some(c) = &s.cancel {
            links["cancelAction"] =
                json!({"href": format!("{url}/cancelAction/{}", c["id"].as_str().unwrap_or(""))});
        } else if let Some(d) = &s.deployment {
            links["deploymentBase"] = json!({"href": format!("{url}/deploymentBase/{}?c=-2129030598", d["id"].as_str().unwrap_or(""))});
        }
        json_ok(
            &mut w,
            json!({"config": {"polling": {"sleep": "00:00:01"}}, "_links": links}),
        );
    } else if method == "GET" && path.starts_with(&format!("{BASE}/deploymentBase/")) {
        s.deployment_gets += 1;
        match s.deployment.clone() {
            Some(d) => json_ok(&mut w, d),
            None => send(&mut w, "404 Not Found", "", b""),
        }
    } else if method == "GET" && path.starts_with(&format!("{BASE}/cancelAction/")) {
        match s.cancel.clone() {
            Some(c) => json_ok(&mut w, c),
            None => send(&mut w, "404 Not Found", "", b""),
        }
    } else if method == "GET" && path.contains("/artifacts/") {
        let name = path.rsplit('/').next().unwrap_or("");
        let Some(data) = s.files.get(name).cloned() else {
            return send(&mut w, "404 Not Found", "", b"");
        };
        let from = range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
        s.downloads += 1;
        if let Some(r) = &range {
            s.ranges.push(r.clone());
        }
        drop(s);
        match from {
            Some(f) if f < data.len() => send(
                &mut w,
                "206 Partial Content",
                &format!(
                    "content-range: bytes {f}-{}/{}\r\n",
                    data.len() - 1,
                    data.len()
                ),
                &data[f..],
            ),
            _ => send(&mut w, "200 OK", "", &data),
        }
    } else if method == "PUT" && path == format!("{BASE}/configData") {
        s.config_data
            .push(serde_json::from_slice(&body).unwrap_or(Value::Null));
        json_ok(&mut w, json!({}));
    } else if method == "POST" && path.ends_with("/feedback") && s.refuse_feedback {
        send(&mut w, "503 Service Unavailable", "", b"");
    } else if method == "POST" && path.ends_with("/feedback") {
        s.feedback.push((
            path.clone(),
            serde_json::from_slice(&body).unwrap_or(Value::Null),
        ));
        send(&mut w, "200 OK", "", b"");
    } else {
        send(&mut w, "404 Not Found", "", b"");
    }
}
