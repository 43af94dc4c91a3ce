//! Adaptive sync: the batch size of each round and the wait between syncs
//! follow the link instead of fixed settings.
//!
//! Every round is measured (`metered`): its duration, the bytes that went
//! over the link and the TCP connect time. A round costs the connect, one
//! turn (request out, answer back) and its bytes at the link's rate, so the
//! rate is the bytes over what is left of the duration after the connect
//! and the turn. The turn is measured on rounds that carry almost nothing
//! (every sync ends with one); until then it is taken to equal the
//! connect. Keeping them apart matters behind a proxy or a cellular
//! gateway that answers the SYN itself: the connect is then instant while
//! the turn still crosses the slow link.
//!
//! The next batch is sized so that a round takes half of
//! `cloud.sync_round_budget`: the other half absorbs a link that got
//! worse meanwhile. It starts small (a probe) and at most doubles per
//! round, like TCP's slow start: a round on a link nobody has measured
//! yet must not be the one that overruns its budget. A round that is
//! mostly round trips (under a quarter of it moving bytes) measures the
//! link poorly; its rate is taken as a lower bound, which the doubling
//! then corrects. A round with little to send (under a quarter of its
//! batch: the last of a sync, or one that only asks for news) teaches
//! nothing about the rate and leaves the batch alone.
//!
//! Between syncs: `cloud.sync_interval` when everything went; the floor
//! `cloud.sync_interval_min` when a sync stopped with changes still
//! queued, or when changes pile up (a batch's worth, see `client`) on a
//! link that is not slow. A slow link (even the smallest batch needs more
//! than half the budget) waits the full interval: more frequent syncs
//! would only spend more round trips on it. A failing link backs off
//! (`client::retry_delay`). All of it sets timers; nothing polls.

use std::time::Duration;

use super::metered::Wire;

/// The smallest batch of updates (encoded bytes, before compression): a
/// round must make progress however slow the link.
pub(crate) const MIN_BATCH: usize = 2 << 10;
/// The first round's batch, before anything is known of the link: at
/// 10 KB/s and 3:1 compression about half a second of transfer.
const PROBE_BATCH: usize = 16 << 10;

/// A round as the client saw it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Round {
    pub elapsed: Duration,
    pub wire: Wire,
    /// Encoded request body before and after compression: the ratio turns
    /// a byte target on the link into a batch bound.
    pub body_plain: usize,
    pub body_wire: usize,
}

/// The link as measured so far, and the batch it allows.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    budget: Duration,
    ceiling: usize,
    /// Wire bytes per second; 0 until the first round.
    rate: f64,
    /// The TCP connect: one round trip to whatever answers the SYN.
    connect: Duration,
    /// A request and its answer when they carry almost nothing: one round
    /// trip to the hub. Differs from `connect` when a proxy or a cellular
    /// gateway terminates TCP near the edge. None until such a round ran.
    turn: Option<Duration>,
    /// Encoded bytes per wire byte of request bodies (>= 1).
    ratio: f64,
    batch: usize,
}

impl Link {
    /// `budget`: what one round may take; `ceiling`: the configured batch
    /// bound (`sync.max_batch_bytes`).
    pub(crate) fn new(budget: Duration, ceiling: usize) -> Link {
        let ceiling = ceiling.max(MIN_BATCH);
        Link {
            budget,
            ceiling,
            rate: 0.0,
            connect: Duration::ZERO,
            turn: None,
            ratio: 1.0,
            batch: PROBE_BATCH.min(ceiling),
        }
    }

    /// Bytes of updates for the next round.
    pub(crate) fn batch_bytes(&self) -> usize {
        self.batch
    }

    pub(crate) fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// The round trip to the hub as measured so far.
    pub(crate) fn rtt(&self) -> Duration {
        self.turn.unwrap_or(self.connect).max(self.connect)
    }

    /// What a round costs before its bytes: the connect and one turn.
    fn fixed_secs(&self) -> f64 {
        (self.connect + self.turn.unwrap_or(self.connect)).as_secs_f64()
    }

    pub(crate) fn budget(&self) -> Duration {
        self.budget
    }

    /// Learns from a completed round; returns true when the round took
    /// longer than its budget.
    pub(crate) fn observe(&mut self, r: Round) -> bool {
        let secs = r.elapsed.as_secs_f64().max(1e-3);
        // Smoothed, so one slow SYN or one slow answer does not halve the
        // batch.
        let smooth = |old: Duration, new: Duration| {
            if old.is_zero() {
                new
            } else {
                (old * 3 + new) / 4
            }
        };
        self.connect = smooth(self.connect, r.wire.connect);
        if r.body_plain < self.batch / 4 {
            // A round that had little to send (the last of a sync, or one
            // that only asks for news) says how long a round trip takes,
            // not how fast the link is.
            let turn = r.elapsed.saturating_sub(r.wire.connect);
            self.turn = Some(smooth(self.turn.unwrap_or_default(), turn));
            return r.elapsed > self.budget;
        }
        let moving = (secs - self.fixed_secs()).max(secs / 4.0);
        let sample = r.wire.total() as f64 / moving;
        // Down at once, up by halves: a link that got worse must shrink
        // the next batch before it overruns; one that got better is
        // trusted gradually (and the batch at most doubles anyway).
        self.rate = if self.rate == 0.0 || sample < self.rate {
            sample
        } else {
            0.5 * self.rate + 0.5 * sample
        };
        if r.body_wire > 0 && r.body_plain >= r.body_wire {
            self.ratio = r.body_plain as f64 / r.body_wire as f64;
        }
        let target_secs = self.budget.as_secs_f64() / 2.0 - self.fixed_secs();
        let target = if target_secs <= 0.0 {
            MIN_BATCH
        } else {
            (self.rate * target_secs * self.ratio) as usize
        };
        self.batch = target
            .min(self.batch.saturating_mul(2))
            .clamp(MIN_BATCH, self.ceiling);
        r.elapsed > self.budget
    }

    /// Even the smallest batch would take more than half a round's budget.
    pub(crate) fn is_slow(&self) -> bool {
        if self.rate == 0.0 {
            return false;
        }
        let min_round = self.fixed_secs() + MIN_BATCH as f64 / self.ratio / self.rate;
        min_round > self.budget.as_secs_f64() / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link of `rate` bytes/s and `rtt`: what a round of `plain` encoded
    /// bytes (compressing 2:1) looks like on it.
    fn round_on(rate: f64, rtt: Duration, plain: usize) -> Round {
        let body_wire = plain / 2;
        let total = body_wire as u64 + 400;
        Round {
            elapsed: rtt * 2 + Duration::from_secs_f64(total as f64 / rate),
            wire: Wire {
                sent: body_wire as u64 + 250,
                received: 150,
                connect: rtt,
            },
            body_plain: plain,
            body_wire,
        }
    }

    fn settle(link: &mut Link, rate: f64, rtt: Duration) -> Vec<Duration> {
        (0..12)
            .map(|_| {
                let r = round_on(rate, rtt, link.batch_bytes());
                assert!(!link.observe(r), "a round overran its budget: {r:?}");
                r.elapsed
            })
            .collect()
    }

    #[test]
    fn a_slow_link_gets_batches_that_fit_half_the_budget_and_a_fast_one_the_ceiling() {
        let budget = Duration::from_secs(5);
        let rtt = Duration::from_millis(600);
        let mut link = Link::new(budget, 256 << 10);
        assert_eq!(link.batch_bytes(), PROBE_BATCH);
        let times = settle(&mut link, 10_000.0, rtt);
        let slow_batch = link.batch_bytes();
        // 10 KB/s, 2 x 0.6 s of round trips, 2.5 s target: ~13 KB on the
        // wire, ~26 KB encoded.
        assert!((15 << 10..40 << 10).contains(&slow_batch), "{slow_batch}");
        let last = *times.last().unwrap();
        assert!(last <= budget / 2 + Duration::from_millis(300), "{last:?}");
        assert!(!link.is_slow());
        settle(&mut link, 1_000_000.0, rtt);
        assert_eq!(link.batch_bytes(), 256 << 10, "the ceiling on a fast link");
        // And back: the batch shrinks within a round or two.
        let r = round_on(10_000.0, rtt, link.batch_bytes());
        link.observe(r);
        settle(&mut link, 10_000.0, rtt);
        assert!(link.batch_bytes() < 40 << 10);
    }

    #[test]
    fn a_link_that_cannot_move_the_smallest_batch_in_half_a_budget_is_slow() {
        let mut link = Link::new(Duration::from_secs(2), 64 << 10);
        settle_allowing_overrun(&mut link, 500.0, Duration::from_millis(400));
        assert_eq!(link.batch_bytes(), MIN_BATCH);
        assert!(link.is_slow());
    }

    #[test]
    fn behind_a_proxy_that_answers_the_syn_the_turn_is_learnt_from_an_empty_round() {
        let budget = Duration::from_secs(10);
        let turn = Duration::from_millis(600);
        let connect = Duration::from_millis(1);
        let rate = 10_000.0;
        // What such a link does to a round of `plain` encoded bytes.
        let round = |plain: usize| {
            let body_wire = plain / 2;
            let total = body_wire as u64 + 400;
            Round {
                elapsed: connect + turn + Duration::from_secs_f64(total as f64 / rate),
                wire: Wire {
                    sent: body_wire as u64 + 250,
                    received: 150,
                    connect,
                },
                body_plain: plain,
                body_wire,
            }
        };
        let mut link = Link::new(budget, 256 << 10);
        link.observe(round(40)); // the start-up sync: nothing to send
        assert!(link.rtt() >= Duration::from_millis(550), "{:?}", link.rtt());
        for _ in 0..12 {
            let r = round(link.batch_bytes());
            assert!(!link.observe(r), "overran: {r:?}");
        }
        // 5 s target less the 0.6 s turn: ~44 KB on the wire, ~88 KB
        // encoded; without the turn the estimate would stay near half.
        let b = link.batch_bytes();
        assert!((75 << 10..100 << 10).contains(&b), "{b}");
        let last = round(b).elapsed;
        assert!(last <= budget / 2 + Duration::from_millis(300), "{last:?}");
    }

    fn settle_allowing_overrun(link: &mut Link, rate: f64, rtt: Duration) {
        for _ in 0..8 {
            let r = round_on(rate, rtt, link.batch_bytes());
            link.observe(r);
        }
    }
}
