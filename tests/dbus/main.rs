//! The D-Bus API and the CLI against the real binary on a private
//! dbus-daemon. Clients are external tools (busctl, dbus-send,
//! dbus-monitor) and our own CLI; "another user" is uid/gid 65534 via
//! setpriv with no supplementary groups. Every wait has a deadline; the
//! signal tests wait for dbus-monitor's own NameLost (it is monitoring from
//! then on) instead of sleeping.

#[path = "../common/mod.rs"]
mod common;

mod bus;
mod mutations;
mod queries;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use common::*;

const NAME: &str = "io.konsul.Edge1";
const PATH: &str = "/io/konsul/Edge1";

/// Which policy the private bus enforces.
enum Policy {
    /// Everything allowed: access control is the daemon's alone.
    Open,
    /// system.conf's defaults plus our systemd/io.konsul.Edge1.conf.
    System,
}

struct Bus {
    child: Child,
    address: String,
}

impl Bus {
    fn start(dir: &Path, policy: Policy) -> Bus {
        // The client runs as nobody: it must reach the socket.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let rules = match policy {
            Policy::Open => OPEN_BUS_POLICY.to_string(),
            Policy::System => shipped_bus_policy(),
        };
        let (child, address) = private_bus_with(dir, &rules);
        Bus { child, address }
    }

    /// A daemon config with D-Bus on this bus.
    fn config(&self, dir: &Path, extra: &str) {
        write_config(
            dir,
            &format!(
                "dbus:\n  enabled: true\n  bus: \"{}\"\n{extra}",
                self.address
            ),
        );
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Lines of a pipe, on a channel (echoed for the test log).
fn lines_of(
    pipe: impl std::io::Read + Send + 'static,
    tag: &'static str,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            eprintln!("[{tag}] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `[setpriv ...] busctl --address=A <args>`.
fn busctl(bus: &Bus, as_nobody: bool, args: &[&str]) -> Output {
    let mut cmd = as_user(as_nobody, "busctl");
    cmd.arg(format!("--address={}", bus.address))
        .arg("--timeout=15")
        .args(args);
    run_bounded(&mut cmd)
}

/// `busctl --json=short call NAME PATH IFACE METHOD [SIG ARGS...]`: the
/// reply's `data` array.
fn call_json(
    bus: &Bus,
    as_nobody: bool,
    iface: &str,
    method: &str,
    args: &[&str],
) -> serde_json::Value {
    let mut all = vec!["--json=short", "call", NAME, PATH, iface, method];
    all.extend_from_slice(args);
    let out = busctl(bus, as_nobody, &all);
    assert!(
        out.status.success(),
        "{iface}.{method} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    j["data"].clone()
}

/// dbus-send, which names the D-Bus error on failure: (success, output).
fn dbus_send(bus: &Bus, as_nobody: bool, iface_method: &str, args: &[&str]) -> (bool, String) {
    let mut cmd = as_user(as_nobody, "dbus-send");
    cmd.arg(format!("--bus={}", bus.address))
        .args(["--print-reply", "--reply-timeout=15000"])
        .arg(format!("--dest={NAME}"))
        .arg(PATH)
        .arg(iface_method)
        .args(args);
    run_to_text(&mut cmd)
}

/// gdbus, for calls with `a{sv}` arguments (GVariant text syntax), which
/// dbus-send cannot build; it names the D-Bus error on failure.
fn gdbus(bus: &Bus, as_nobody: bool, iface_method: &str, args: &[&str]) -> (bool, String) {
    gdbus_call(&bus.address, as_nobody, iface_method, args)
}

/// Unpacks busctl's JSON for a{sv}: {"key": {"type":..,"data":..}} -> data.
fn plain(dict: &serde_json::Value) -> serde_json::Value {
    match dict {
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), v["data"].clone()))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        other => other.clone(),
    }
}

/// dbus-monitor watching our name; returns once it is monitoring.
struct Monitor {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Monitor {
    fn start(bus: &Bus) -> Monitor {
        let mut child = Command::new("dbus-monitor")
            .args(["--address", &bus.address, &format!("sender='{NAME}'")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn dbus-monitor");
        let lines = lines_of(child.stdout.take().unwrap(), "monitor");
        let m = Monitor { child, lines };
        // BecomeMonitor makes the bus take the monitor's name away: once
        // NameLost arrives, every later matching message reaches us.
        m.wait_block(|b| b.contains("member=NameLost"))
            .expect("dbus-monitor did not start monitoring");
        m
    }

    /// Waits for one message (header line plus argument lines) matching
    /// `pred`; messages are separated by their header lines.
    fn wait_block(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        let end = Instant::now() + DEADLINE;
        let mut block = String::new();
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            let header = ["signal ", "method ", "error ", "method return "]
                .iter()
                .any(|h| line.starts_with(h));
            if header && !block.is_empty() {
                if pred(&block) {
                    return Some(block);
                }
                block.clear();
            }
            block.push_str(&line);
            block.push('\n');
            // A message whose arguments are complete when the next header
            // arrives; check eagerly too, for the last message we wait for.
            if pred(&block) {
                return Some(block);
            }
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(bus: &Bus, args: &[&str]) -> Output {
    run_bounded(
        Command::new(BIN)
            .args(args)
            .env("KONSUL_DBUS_BUS", &bus.address)
            .env("KONSUL_LOG", "warn"),
    )
}
