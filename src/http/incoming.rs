//! Request bodies, read against a size limit and a clock.
//!
//! hyper times out a request's head but not its body: a client that
//! declares a body and sends nothing used to hold its connection slot for
//! as long as it liked (issue 13: 128 such connections locked everyone out
//! for 150 s). A body must now arrive at a minimum average rate after a
//! grace period: at any moment it may have taken
//! `BODY_GRACE + received / MIN_BODY_RATE`. A stalled body is cut after
//! the grace period, a dripping one soon after, while a firmware upload of
//! any size over a slow link keeps going as long as it moves.

use std::time::{Duration, Instant};

use hyper::body::{Body as _, Bytes, Incoming};
use smol::future::FutureExt;

/// How long a body may take before its rate counts.
pub(super) const BODY_GRACE: Duration = Duration::from_secs(10);
/// The slowest average a body may arrive at after the grace period, in
/// bytes per second (64 kbit/s: a poor cellular link still makes it).
pub(super) const MIN_BODY_RATE: u64 = 8 << 10;

#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: u64 },
    #[error(
        "request body too slow: {received} bytes in {secs} s (at least {rate} bytes/s after {grace} s)",
        secs = .elapsed.as_secs(),
        rate = MIN_BODY_RATE,
        grace = BODY_GRACE.as_secs()
    )]
    TimedOut { received: u64, elapsed: Duration },
    #[error("cannot read body: {0}")]
    Read(#[from] hyper::Error),
}

/// A request body read chunk by chunk under the rate rule.
pub(super) struct TimedBody {
    body: Incoming,
    start: Instant,
    received: u64,
}

impl TimedBody {
    pub(super) fn new(body: Incoming) -> TimedBody {
        TimedBody {
            body,
            start: Instant::now(),
            received: 0,
        }
    }

    fn deadline(&self) -> Instant {
        let earned = Duration::from_millis(self.received.saturating_mul(1000) / MIN_BODY_RATE);
        self.start + BODY_GRACE + earned
    }

    /// The next piece of data; None at the end of the body.
    pub(super) async fn chunk(&mut self) -> Result<Option<Bytes>, ReadError> {
        loop {
            let deadline = self.deadline();
            let next = async { Some(http_body_util::BodyExt::frame(&mut self.body).await) };
            let late = async {
                async_io::Timer::at(deadline).await;
                None
            };
            match next.or(late).await {
                None => {
                    return Err(ReadError::TimedOut {
                        received: self.received,
                        elapsed: self.start.elapsed(),
                    })
                }
                Some(None) => return Ok(None),
                Some(Some(Err(e))) => return Err(e.into()),
                Some(Some(Ok(frame))) => {
                    // Trailers carry no data: read on.
                    if let Ok(data) = frame.into_data() {
                        self.received += data.len() as u64;
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    /// The whole body, refused past `limit` bytes: from the declared length
    /// before reading anything, else as soon as it grows past the limit.
    pub(super) async fn collect(mut self, limit: u64) -> Result<Bytes, ReadError> {
        if self.body.size_hint().lower() > limit {
            return Err(ReadError::TooLarge { limit });
        }
        let mut out = Vec::new();
        while let Some(data) = self.chunk().await? {
            if out.len() as u64 + data.len() as u64 > limit {
                return Err(ReadError::TooLarge { limit });
            }
            out.extend_from_slice(&data);
        }
        Ok(Bytes::from(out))
    }
}
