//! gooseBit (a DDI server from PyPI) for tests/hawkbit.rs: its database,
//! artifacts and settings (`goosebit.yaml`, read from the working
//! directory) in a private temp directory, its schema made with `aerich
//! upgrade`, served by uvicorn on an ephemeral port. Software is uploaded
//! and assigned through its REST API (`/api/v1/...`), as an operator would.
//!
//! `KONSUL_TEST_GOOSEBIT` names the venv's python (scripts/test.sh makes
//! the venv); without it the tests skip loudly.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::wait_for;

pub struct Goosebit {
    pub dir: PathBuf,
    pub port: u16,
    python: PathBuf,
    child: Option<Child>,
    token: String,
}

/// The venv's python, or None (after a loud skip message).
pub fn python() -> Option<PathBuf> {
    match std::env::var_os("KONSUL_TEST_GOOSEBIT") {
        Some(p) if Path::new(&p).exists() => Some(PathBuf::from(p)),
        _ => {
            eprintln!(
                "\n*** SKIPPED (gooseBit test): set KONSUL_TEST_GOOSEBIT to a python with \
                 goosebit==0.2.12 (scripts/test.sh does) ***\n"
            );
            None
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("run curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

impl Goosebit {
    /// A fresh gooseBit in `dir` (created), with an admin user.
    pub fn start(python: &Path, dir: &Path) -> Goosebit {
        std::fs::create_dir_all(dir).unwrap();
        let pkg = Command::new(python)
            .args([
                "-c",
                "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('goosebit').origin))",
            ])
            .output()
            .expect("run the venv's python");
        let pkg = String::from_utf8_lossy(&pkg.stdout).trim().to_owned();
        assert!(
            !pkg.is_empty(),
            "goosebit is not importable from {}",
            python.display()
        );
        std::fs::write(
            dir.join("pyproject.toml"),
            format!(
                "[tool.aerich]\ntortoise_orm = \"goosebit.db.config.TORTOISE_CONF\"\nlocation = \"{pkg}/db/migrations\"\nsrc_folder = \"./.\"\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("goosebit.yaml"),
            format!(
                "db_uri: sqlite:///{d}/db.sqlite3\nartifacts_dir: {d}/artifacts\npoll_time: \"00:00:01\"\n\
                 secret_key: \"c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0wMDAwMDAwMA\"\n\
                 # Its default disables uvicorn's access log, which tests read.\n\
                 logging:\n  version: 1\n  disable_existing_loggers: false\n\
                 \x20 handlers: {{console: {{class: logging.StreamHandler}}}}\n\
                 \x20 root: {{level: INFO, handlers: [console]}}\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let aerich = python.with_file_name("aerich");
        let out = Command::new(&aerich)
            .arg("upgrade")
            .current_dir(dir)
            .output()
            .expect("run aerich");
        assert!(
            out.status.success(),
            "aerich upgrade: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut g = Goosebit {
            dir: dir.to_path_buf(),
            port: free_port(),
            python: python.to_path_buf(),
            child: None,
            token: String::new(),
        };
        g.resume();
        let (ok, out) = curl(&[
            "-X",
            "POST",
            "-F",
            "username=admin@konsul.test",
            "-F",
            "password=konsul-test",
            &format!("{}/setup", g.url()),
        ]);
        assert!(ok, "gooseBit setup: {out}");
        let j: serde_json::Value = serde_json::from_str(&out).expect("setup answer");
        g.token = j["access_token"].as_str().unwrap().to_owned();
        g
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server (the database stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server on its port again; returns once it answers.
    pub fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let child = Command::new(&self.python)
            .args([
                "-m",
                "uvicorn",
                "goosebit:app",
                "--host",
                "127.0.0.1",
                "--port",
            ])
            .arg(self.port.to_string())
            .current_dir(&self.dir)
            // Its access log is read back (the Range request's 206).
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start uvicorn");
        self.child = Some(child);
        let url = format!("{}/DEFAULT/controller/v1/probe-not-a-device", self.url());
        wait_for("gooseBit to answer", Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port))
                .ok()
                .and_then(|_| curl(&["-o", "/dev/null", &url]).0.then_some(()))
        });
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    fn api(&self, method: &str, path: &str, extra: &[&str]) -> serde_json::Value {
        let auth = format!("Authorization: Bearer {}", self.token);
        let url = format!("{}{path}", self.url());
        let mut args = vec!["-X", method, "-H", auth.as_str(), "--fail-with-body"];
        args.extend_from_slice(extra);
        args.push(&url);
        let (ok, out) = curl(&args);
        assert!(ok, "gooseBit {method} {path}: {out}");
        serde_json::from_str(&out).unwrap_or(serde_json::Value::Null)
    }

    /// Uploads a bundle; returns the software id (gooseBit's action id).
    pub fn upload(&self, file: &Path) -> i64 {
        let form = format!("file=@{}", file.display());
        let j = self.api("PUT", "/api/v1/software", &["-F", &form]);
        j["id"].as_i64().expect("software id")
    }

    /// Assigns software `id` to `device`; `force` clears an error state.
    pub fn assign(&self, device: &str, id: i64, force: bool) {
        let body = serde_json::json!({
            "devices": [device],
            "software": id.to_string(),
            "force_update": force,
        })
        .to_string();
        self.api(
            "PATCH",
            "/api/v1/devices",
            &["-H", "content-type: application/json", "-d", &body],
        );
    }

    /// The device from the list (0.2.12's `GET /api/v1/devices/{id}`
    /// answers 500 once software is assigned).
    pub fn device(&self, id: &str) -> serde_json::Value {
        self.api("GET", "/api/v1/devices", &[])["devices"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d["id"] == id).cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    /// The device's update state as gooseBit shows it, lower case.
    pub fn state(&self, id: &str) -> String {
        self.device(id)["last_state"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase()
    }

    pub fn device_log(&self, id: &str) -> String {
        self.api("GET", &format!("/api/v1/devices/{id}/log"), &[])["log"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Where gooseBit keeps an uploaded file.
    pub fn artifact(&self, name: &str) -> PathBuf {
        let mut found = None;
        for e in walk(&self.dir.join("artifacts")) {
            if e.file_name().is_some_and(|n| n == name) {
                found = Some(e);
            }
        }
        found.unwrap_or_else(|| panic!("no artifact {name} under {}", self.dir.display()))
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

impl Drop for Goosebit {
    fn drop(&mut self) {
        self.stop();
    }
}
