//! A throttling TCP proxy on loopback: every byte that passes is delayed by
//! a fixed latency and paced to a rate (each direction on its own), both
//! changeable while connections are open, and counted. It stands between
//! an edge and its hub to play a cellular or LoRa-backhauled link.
//!
//! The sleeps here are the link being simulated, not synchronisation.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Shape {
    /// Bytes per second per direction; 0 = unlimited.
    rate: AtomicU64,
    latency_ms: AtomicU64,
    bytes: AtomicU64,
    /// The longest connection, accept to the answer's last byte: with one
    /// connection per sync round, the longest round.
    longest_ms: AtomicU64,
    stop: AtomicBool,
    /// The link is cut: connections are accepted and closed at once.
    down: AtomicBool,
}

pub struct Throttle {
    pub addr: String,
    shape: Arc<Shape>,
}

impl Throttle {
    /// Forwards connections on a fresh loopback port to `upstream`.
    pub fn start(upstream: &str, rate: u64, latency: Duration) -> Throttle {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shape = Arc::new(Shape::default());
        shape.rate.store(rate, Ordering::Relaxed);
        shape
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::Relaxed);
        let s = shape.clone();
        let upstream = upstream.to_owned();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(down) = conn else { continue };
                if s.down.load(Ordering::Relaxed) {
                    continue;
                }
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                let accepted = Instant::now();
                for (from, to, answer) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap(), false),
                    (up, down, true),
                ] {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        pump(from, to, s.clone());
                        if answer {
                            let ms = accepted.elapsed().as_millis() as u64;
                            s.longest_ms.fetch_max(ms, Ordering::Relaxed);
                        }
                    });
                }
            }
        });
        Throttle { addr, shape }
    }

    /// Cuts the link (`true`) or restores it.
    pub fn set_down(&self, down: bool) {
        self.shape.down.store(down, Ordering::Relaxed);
    }

    pub fn set(&self, rate: u64, latency: Duration) {
        self.shape.rate.store(rate, Ordering::Relaxed);
        self.shape
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::Relaxed);
    }

    /// The longest connection so far (accept to the answer's end).
    pub fn longest(&self) -> Duration {
        Duration::from_millis(self.shape.longest_ms.load(Ordering::Relaxed))
    }

    /// Bytes forwarded so far, both directions.
    pub fn bytes(&self) -> u64 {
        self.shape.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.shape.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.addr);
    }
}

/// Reads `from` as data arrives and hands each chunk, stamped, to a writer
/// that releases it `latency` later at no more than `rate`.
fn pump(mut from: TcpStream, mut to: TcpStream, shape: Arc<Shape>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer_shape = shape.clone();
    let writer = std::thread::spawn(move || {
        let mut next_free = Instant::now();
        for (at, chunk) in rx {
            let latency = Duration::from_millis(writer_shape.latency_ms.load(Ordering::Relaxed));
            let due = (at + latency).max(next_free);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                return;
            }
            writer_shape
                .bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let rate = writer_shape.rate.load(Ordering::Relaxed);
            next_free = Instant::now()
                + if rate == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_secs_f64(chunk.len() as f64 / rate as f64)
                };
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    // Small reads keep the pacing smooth at 10 KB/s.
    let mut buf = vec![0u8; 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
        if shape.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}
