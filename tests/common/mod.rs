//! Shared harness for the integration tests: starts the real binary on an
//! ephemeral port in a private temp directory and talks plain HTTP/1.1 to it.
//! Readiness comes from the daemon's own "ready" log line, never a sleep;
//! every wait has a deadline so a hung daemon fails the test, not CI.
#![allow(dead_code)]

pub mod broker;
pub mod device;
pub mod throttle;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_konsul-edge");
pub const DEADLINE: Duration = Duration::from_secs(20);

pub struct Daemon {
    pub child: Option<Child>,
    pub addr: String,
    pub dir: PathBuf,
    pub log: mpsc::Receiver<String>,
    /// Lines passed over while waiting for something else: a later
    /// `wait_log` looks here first, so a line that arrived early (the MQTT
    /// bridge connecting before the ready line) is not lost.
    skipped: std::sync::Mutex<Vec<String>>,
    /// Log lines before the ready line (tasks started before READY may
    /// log first, e.g. the MQTT bridge's "connected").
    pub early: Vec<String>,
    exited: Option<mpsc::Receiver<ExitStatus>>,
}

/// Gives the harness an admin token through a config drop-in, so tests
/// written before the access policy keep driving every route over TCP.
/// A config that has its own `acl:` section is left alone.
pub fn grant_test_admin(dir: &Path, config: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(config).unwrap_or_default();
    if text.lines().any(|l| l.starts_with("acl:")) {
        return;
    }
    let token_file = dir.join("test-admin.token");
    if !token_file.exists() {
        let token = format!("test-admin-{:016x}", fastrand_u64());
        std::fs::write(&token_file, token).unwrap();
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let dropins = config.parent().unwrap().join("config.d");
    std::fs::create_dir_all(&dropins).unwrap();
    std::fs::write(
        dropins.join("99-test-admin.yaml"),
        format!(
            "acl:\n  tokens:\n    - name: test-admin\n      file: {}\n      policies: [\"builtin:admin\"]\n",
            token_file.display()
        ),
    )
    .unwrap();
}

/// The test admin token of the daemon in `dir`, if it has one.
pub fn admin_token(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("test-admin.token")).ok()
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// A config for tests: state in `dir`, API on an ephemeral port.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("edge.yaml");
    let text = format!(
        "mode: edge\nnode_id: test-node\nstorage:\n  path: {}\n  max_size: 8Mi\nhttp:\n  listen: 127.0.0.1:0\n{extra}",
        dir.join("konsul.db").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

impl Daemon {
    pub fn start(dir: &Path) -> Daemon {
        Self::start_with(dir, &[])
    }

    pub fn start_with(dir: &Path, env: &[(&str, &str)]) -> Daemon {
        Self::start_as(dir, "run", env)
    }

    /// `konsul-edge hub` with `dir/edge.yaml`.
    pub fn start_hub(dir: &Path) -> Daemon {
        Self::start_as(dir, "hub", &[])
    }

    /// A hub named `hub` with nothing configured beyond its store and an
    /// ephemeral port, in a temp dir that lives as long as the first
    /// element.
    pub fn plain_hub() -> (tempfile::TempDir, Daemon) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("edge.yaml"),
            format!(
                "node_id: hub\nstorage: {{path: {}}}\nhttp: {{listen: '127.0.0.1:0'}}\n",
                dir.path().join("hub.db").display()
            ),
        )
        .unwrap();
        let hub = Daemon::start_hub(dir.path());
        (dir, hub)
    }

    pub fn start_as(dir: &Path, command: &str, env: &[(&str, &str)]) -> Daemon {
        let config = dir.join("edge.yaml");
        if !config.exists() {
            write_config(dir, "");
        }
        grant_test_admin(dir, &config);
        let mut cmd = Command::new(BIN);
        cmd.args([command, "--config"])
            .arg(&config)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("JOURNAL_STREAM")
            .env("KONSUL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn konsul-edge");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[daemon] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child: Some(child),
            addr: String::new(),
            dir: dir.to_path_buf(),
            log: rx,
            skipped: std::sync::Mutex::new(Vec::new()),
            early: Vec::new(),
            exited: None,
        };
        let mut early = Vec::new();
        let line = d
            .wait_log(|l| {
                if l.contains(" ready in ") {
                    return true;
                }
                early.push(l.to_owned());
                false
            })
            .expect("daemon did not become ready");
        d.early = early;
        let addr = line
            .split("API on ")
            .nth(1)
            .and_then(|s| s.split("://").nth(1))
            .and_then(|s| s.split(',').next())
            .expect("address in ready line");
        d.addr = addr.to_string();
        if let Some(t) = admin_token(dir) {
            TOKENS.lock().unwrap().insert(d.addr.clone(), t);
        }
        d
    }

    /// Waits for a log line matching `pred`; None when the deadline passes
    /// or the daemon's stderr closes.
    pub fn wait_log(&self, mut pred: impl FnMut(&str) -> bool) -> Option<String> {
        {
            let mut skipped = self.skipped.lock().unwrap();
            if let Some(i) = skipped.iter().position(|l| pred(l)) {
                return Some(skipped.remove(i));
            }
        }
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            match self.log.recv_timeout(left) {
                Ok(l) if pred(&l) => return Some(l),
                Ok(l) => self.skipped.lock().unwrap().push(l),
                Err(_) => return None,
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits for the process to exit (with a deadline) and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let (tx, rx) = mpsc::channel();
        let pid = child.id();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait().unwrap());
        });
        match rx.recv_timeout(DEADLINE) {
            Ok(st) => st,
            Err(_) => {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                panic!("daemon did not exit within {DEADLINE:?}");
            }
        }
    }

    pub fn kill9(&mut self) {
        self.signal("KILL");
        self.wait_exit();
    }

    pub fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit()
    }

    /// A request with the test admin token (see [`grant_test_admin`]).
    pub fn req(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        request(&self.addr, method, path, body.map(str::as_bytes), &[])
    }

    /// A request without credentials: an anonymous TCP caller.
    pub fn anon(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        request_anon(&self.addr, method, path, body.map(str::as_bytes), &[])
    }

    pub fn get(&self, path: &str) -> Resp {
        self.req("GET", path, None)
    }

    pub fn put(&self, path: &str, body: &str) -> Resp {
        self.req("PUT", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Resp {
        self.req("DELETE", path, None)
    }

    /// The value of the first /metrics sample line starting with
    /// `line_start` (a name, or a name with its labels).
    pub fn metric(&self, line_start: &str) -> Option<u64> {
        self.get("/metrics")
            .text()
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// The modify index and the full listing: "nothing changed" means both
    /// are as they were.
    pub fn snapshot(&self) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
        let status = self.get("/v1/edge/status").json();
        (
            status["modify_index"].clone(),
            self.get("/v1/edge/services").json(),
            self.get("/kv/").json(),
        )
    }
}

/// Polls `cond` until it holds or the deadline passes: for state that
/// another process reaches on its own schedule (a sync round, a TTL).
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(what, DEADLINE, || cond().then_some(()))
}

/// [`eventually`] for a state that carries a value: polls `f` until it
/// returns Some (or `limit` passes) and returns the value.
pub fn eventually_some<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_for(what, DEADLINE, f)
}

/// Polls `f` until it returns Some, failing the test after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: String,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Test admin tokens by daemon address: [`request`] sends the one of the
/// daemon it talks to unless the test passes its own credentials.
static TOKENS: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, String>>> =
    std::sync::LazyLock::new(Default::default);

/// One request on a fresh connection (`Connection: close`), as the test
/// admin of the daemon at `addr` when the harness started it.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> Resp {
    let own = headers.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("authorization") || k.eq_ignore_ascii_case("x-api-key")
    });
    let token = TOKENS.lock().unwrap().get(addr).cloned();
    match token {
        Some(t) if !own => {
            let mut all = headers.to_vec();
            all.push(("X-API-Key", t.as_str()));
            request_anon(addr, method, path, body, &all)
        }
        _ => request_anon(addr, method, path, body, headers),
    }
}

/// The harness's credentials for the daemon at `addr` as a header line
/// ("" when it has none), for tests that write requests by hand.
pub fn token_header(addr: &str) -> String {
    TOKENS
        .lock()
        .unwrap()
        .get(addr)
        .map(|t| format!("X-API-Key: {t}\r\n"))
        .unwrap_or_default()
}

/// One request with exactly the given headers (no harness token).
pub fn request_anon(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        // The server may answer (413) and close before reading it all.
        let _ = s.write_all(b);
    }
    read_response(&mut s)
}

pub fn read_response(s: &mut TcpStream) -> Resp {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&raw)));
    let headers = String::from_utf8_lossy(&raw[..text_end]).into_owned();
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    Resp {
        status,
        headers,
        body: raw[text_end + 4..].to_vec(),
    }
}

/// The policy of a bus where everything is allowed: access control is then
/// the daemon's own.
pub const OPEN_BUS_POLICY: &str = r#"
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>"#;

/// Runs the openssl CLI in `dir` (a test PKI), failing the test with
/// openssl's own message.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = run_bounded(Command::new("openssl").args(args).current_dir(dir));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for localhost and a client certificate,
/// made with the openssl CLI in `dir`: ca.pem, server.{pem,key}
/// (CN localhost, SAN 127.0.0.1) and client.{pem,key} (CN edge-a).
pub fn make_pki(dir: &Path) {
    let run = |args: &[&str]| openssl(dir, args);
    let key = |name: &str| {
        run(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            name,
        ])
    };
    key("ca.key");
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=konsul test CA",
        "-days",
        "2",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        "ca.pem",
    ]);
    for (name, cn, ext) in [
        ("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"),
        ("client", "edge-a", "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"),
    ] {
        key(&format!("{name}.key"));
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        run(&["req", "-new", "-key", &format!("{name}.key"), "-subj", &format!("/CN={cn}"), "-out", &format!("{name}.csr")]);
        run(&[
            "x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", &format!("{name}.ext"), "-out", &format!("{name}.pem"),
        ]);
    }
}

/// Runs a command to completion within [`DEADLINE`]; past it the command
/// is killed and the test fails, so a hung tool cannot hang CI.
pub fn run_bounded(cmd: &mut Command) -> std::process::Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("{cmd:?} did not finish within {DEADLINE:?}");
        }
    }
}

/// system.conf's defaults plus the shipped `systemd/io.konsul.Edge1.conf`:
/// a private bus whose policy mirrors a device's system bus.
pub fn shipped_bus_policy() -> String {
    format!(
        r#"
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include>{}</include>"#,
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("systemd/io.konsul.Edge1.conf")
            .display()
    )
}

/// A private dbus-daemon that allows everything; returns it with its
/// address. Kill it when done.
pub fn private_bus(dir: &Path) -> (Child, String) {
    private_bus_with(dir, OPEN_BUS_POLICY)
}

/// A private dbus-daemon listening in `dir/bus` with the given `<policy>`
/// (and `<include>`) elements.
pub fn private_bus_with(dir: &Path, rules: &str) -> (Child, String) {
    let sock = dir.join("bus");
    std::fs::create_dir_all(&sock).unwrap();
    let conf = dir.join("bus.conf");
    std::fs::write(
        &conf,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:dir={}</listen>
  <auth>EXTERNAL</auth>{rules}
</busconfig>
"#,
            sock.display()
        ),
    )
    .unwrap();
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .args(["--print-address", "--nofork"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn dbus-daemon (apt-get install dbus)");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let address = rx
        .recv_timeout(DEADLINE)
        .expect("dbus-daemon printed no address");
    (child, address)
}

/// setpriv's arguments that drop a root test to the unprivileged `nobody`.
pub const NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];

/// `program`, run as `nobody` when asked (through setpriv).
pub fn as_user(nobody: bool, program: &str) -> Command {
    if nobody {
        let mut c = Command::new("setpriv");
        c.args(NOBODY).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Runs `cmd` bounded: (success, stdout followed by stderr), where D-Bus
/// tools name the error on failure.
pub fn run_to_text(cmd: &mut Command) -> (bool, String) {
    let out = run_bounded(cmd);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `gdbus call` of `iface_method` on the daemon's object on the bus at
/// `address`: for calls with `a{sv}` arguments (GVariant text syntax),
/// which dbus-send cannot build.
pub fn gdbus_call(
    address: &str,
    nobody: bool,
    iface_method: &str,
    args: &[&str],
) -> (bool, String) {
    let mut cmd = as_user(nobody, "gdbus");
    cmd.args(["call", "--address", address])
        .args([
            "--dest",
            "io.konsul.Edge1",
            "--object-path",
            "/io/konsul/Edge1",
        ])
        .args(["--timeout", "15", "--method", iface_method])
        .args(args);
    run_to_text(&mut cmd)
}
