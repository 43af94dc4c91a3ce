//! What a sync exchange cost on the link: TCP payload bytes each way
//! (HTTP headers and TLS records included, IP and TCP headers not) and
//! the time the TCP connect took (one round trip).
//!
//! The adaptive batch size and the data budget (`adapt`, `budget`) need
//! what went over the link, not the body lengths: on a metered cellular
//! link the headers of a small round can cost as much as its body. The
//! counts live with the caller, so a round that fails half-way still
//! counts the bytes it spent.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use smol::io::{AsyncRead, AsyncWrite};

/// Running totals, shared between a stream and whoever reads them.
#[derive(Debug, Default)]
pub struct WireCount {
    sent: AtomicU64,
    received: AtomicU64,
    connect_us: AtomicU64,
}

/// One reading of a [`WireCount`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Wire {
    pub sent: u64,
    pub received: u64,
    /// The last TCP connect's duration: a round-trip time sample.
    pub connect: Duration,
}

impl Wire {
    pub fn total(&self) -> u64 {
        self.sent + self.received
    }

    /// Bytes since `earlier` (the connect time is this reading's).
    pub fn since(&self, earlier: Wire) -> Wire {
        Wire {
            sent: self.sent.saturating_sub(earlier.sent),
            received: self.received.saturating_sub(earlier.received),
            connect: self.connect,
        }
    }
}

impl WireCount {
    pub fn read(&self) -> Wire {
        Wire {
            sent: self.sent.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            connect: Duration::from_micros(self.connect_us.load(Ordering::Relaxed)),
        }
    }

    pub(crate) fn connected_in(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.connect_us.store(us, Ordering::Relaxed);
    }
}

/// A stream that adds what passes through it to a [`WireCount`].
pub(crate) struct Metered<S> {
    inner: S,
    count: Arc<WireCount>,
}

impl<S> Metered<S> {
    pub(crate) fn new(inner: S, count: Arc<WireCount>) -> Metered<S> {
        Metered { inner, count }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.count.received.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.count.sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smol::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn counts_both_directions() {
        smol::block_on(async {
            let count = Arc::new(WireCount::default());
            let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
            let mut a = Metered::new(async_io::Async::new(a).unwrap(), count.clone());
            let mut b = async_io::Async::new(b).unwrap();
            a.write_all(b"hello").await.unwrap();
            let mut buf = [0u8; 5];
            b.read_exact(&mut buf).await.unwrap();
            b.write_all(b"hi").await.unwrap();
            let mut buf = [0u8; 2];
            a.read_exact(&mut buf).await.unwrap();
            let w = count.read();
            assert_eq!((w.sent, w.received, w.total()), (5, 2, 7));
        });
    }
}
