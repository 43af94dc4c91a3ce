//! What the load generators share (each bench is a crate of its own and
//! includes this file with `#[path]`).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub const BIN: &str = env!("CARGO_BIN_EXE_konsul-edge");

/// A `BENCH_*` knob from the environment.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A counter from the daemon at `addr` (`host:port`): the sum over its
/// label sets, 0 when it is not there.
pub fn metric(addr: &str, name: &str) -> u64 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0;
    };
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A daemon a bench started; killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `konsul-edge CMD --config CONFIG` once it is ready (BENCH_BIN runs
/// another build of the daemon, for before/after figures).
pub fn start(cmd: &str, config: &Path) -> Proc {
    let bin = std::env::var("BENCH_BIN").unwrap_or_else(|_| BIN.to_owned());
    let mut child = Command::new(bin)
        .args([cmd, "--config"])
        .arg(config)
        .env("KONSUL_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains(" ready in "))
        .expect("ready line");
    std::thread::spawn(move || for _ in lines {});
    let addr = ready
        .split("://")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    Proc { child, addr }
}

/// One request on a keep-alive connection; returns (status, body).
pub fn call(
    conn: &mut (BufReader<TcpStream>, TcpStream),
    method: &str,
    path: &str,
    body: &[u8],
    headers: &str,
) -> (u16, Vec<u8>) {
    write!(
        conn.1,
        "{method} {path} HTTP/1.1\r\nHost: b\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    conn.1.write_all(body).unwrap();
    let mut line = String::new();
    conn.0.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut len = 0;
    loop {
        line.clear();
        conn.0.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut b = vec![0; len];
    conn.0.read_exact(&mut b).unwrap();
    (status, b)
}

pub fn connect(addr: &str) -> (BufReader<TcpStream>, TcpStream) {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    (BufReader::new(s.try_clone().unwrap()), s)
}
