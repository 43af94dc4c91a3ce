//! Hybrid logical clock and version vectors: the causality stamps every
//! replicated write carries.
//!
//! An HLC timestamp is one `u64`: the upper 48 bits are wall-clock
//! milliseconds, the lower 16 a logical counter. It never goes backwards,
//! even when the wall clock does (NTP steps, an RTC-less board booting in
//! 1970), and it absorbs timestamps received from other replicas, so a write
//! made after seeing a remote write always orders after it. Timestamps order
//! concurrent writes for last-write-wins; version vectors decide whether two
//! writes are concurrent at all.
//!
//! Absorbing remote timestamps is also the clock's weak spot: one stamp from
//! the year 3000 would carry this node's clock there for good, and every
//! peer would then refuse what it writes. So every timestamp that arrives
//! from another node (a sync request's or response's clock, each update's
//! stamp and field stamps) goes through [`check_remote`] first: at most
//! [`MAX_AHEAD_MS`] ahead of the local wall clock. The bound is measured from
//! the wall clock, not from this clock, so accepted stamps cannot ratchet it
//! forward. A clock that got ahead anyway (an older release, a wall clock
//! that was wrong when a stamp was made) is reported at start-up (see
//! [`HlcClock::new`]) and reset offline with `konsul-edge repair-clock`.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How far ahead of the local wall clock a timestamp from another node may
/// be. Generous (a year and a day) so that nodes whose wall clocks disagree
/// by hours or days still sync; what it stops is a clock carried decades
/// ahead.
pub const MAX_AHEAD_MS: u64 = 366 * 86_400_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    #[error(
        "{what} {} is more than {} days ahead of this node's clock ({}); refused",
        rfc3339(*.remote_ms), MAX_AHEAD_MS / 86_400_000, rfc3339(*.wall_ms)
    )]
    Ahead {
        what: String,
        remote_ms: u64,
        wall_ms: u64,
    },
}

/// Refuses `remote` (named by `what` in the error) when it is more than
/// [`MAX_AHEAD_MS`] ahead of `wall_ms`, the local wall clock.
pub fn check_remote(
    what: impl FnOnce() -> String,
    remote: Hlc,
    wall_ms: u64,
) -> Result<(), ClockError> {
    if remote.millis() > wall_ms.saturating_add(MAX_AHEAD_MS) {
        return Err(ClockError::Ahead {
            what: what(),
            remote_ms: remote.millis(),
            wall_ms,
        });
    }
    Ok(())
}

const LOGICAL_BITS: u32 = 16;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

/// An HLC timestamp: 48 bits of milliseconds, 16 bits of logical counter.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Hlc(pub u64);

impl Hlc {
    pub fn new(millis: u64, logical: u16) -> Self {
        Hlc((millis << LOGICAL_BITS) | u64::from(logical))
    }
    pub fn millis(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }
    pub fn logical(self) -> u16 {
        (self.0 & LOGICAL_MASK) as u16
    }
}

/// The clock: last issued timestamp plus a wall-clock source (injectable so
/// the rules can be tested with a clock that jumps backwards).
pub struct HlcClock {
    last: Hlc,
    wall: Box<dyn FnMut() -> u64 + Send>,
}

pub fn wall_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2026-11-28T02:15:58.123Z` for a millisecond timestamp (UTC).
pub fn rfc3339(millis: u64) -> String {
    let secs = millis / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), valid for any u64 day.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        millis % 1000
    )
}

impl HlcClock {
    /// Starts after `persisted`, the last timestamp this node ever issued.
    /// Logs an error when that is further ahead of the wall clock than peers
    /// accept: they would refuse every write this node makes.
    pub fn new(persisted: Hlc) -> Self {
        let wall = wall_millis();
        if check_remote(String::new, persisted, wall).is_err() {
            log::error!(
                "the persisted clock reads {}, {} days ahead of the wall clock ({}): peers refuse \
                 what this node writes. If the wall clock is right, stop the daemon and run \
                 `konsul-edge repair-clock --config FILE`; if it is wrong, set the system time",
                rfc3339(persisted.millis()),
                (persisted.millis() - wall) / 86_400_000,
                rfc3339(wall)
            );
        }
        Self::with_wall(persisted, Box::new(wall_millis))
    }

    pub fn with_wall(persisted: Hlc, wall: Box<dyn FnMut() -> u64 + Send>) -> Self {
        HlcClock {
            last: persisted,
            wall,
        }
    }

    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A timestamp for a local event: strictly greater than every timestamp
    /// issued or received before.
    pub fn now(&mut self) -> Hlc {
        let wall = (self.wall)();
        self.last = if wall > self.last.millis() {
            Hlc::new(wall, 0)
        } else {
            bump(self.last)
        };
        self.last
    }

    /// Absorbs a timestamp received from another replica; returns the stamp
    /// for the receive event, greater than both.
    pub fn observe(&mut self, remote: Hlc) -> Hlc {
        let wall = (self.wall)();
        let top = self.last.max(remote);
        self.last = if wall > top.millis() {
            Hlc::new(wall, 0)
        } else {
            bump(top)
        };
        self.last
    }
}

/// Next timestamp after `t` in the same millisecond; when the logical
/// counter is exhausted, borrow the next millisecond rather than wrap.
fn bump(t: Hlc) -> Hlc {
    if t.logical() == u16::MAX {
        Hlc::new(t.millis() + 1, 0)
    } else {
        Hlc(t.0 + 1)
    }
}

/// How two versions of one record relate causally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    Equal,
    /// The left side has seen everything the right side has, and more.
    Dominates,
    DominatedBy,
    Concurrent,
}

/// A version vector: for each node, how many writes of this record it made.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VersionVector(pub BTreeMap<String, u64>);

impl VersionVector {
    pub fn get(&self, node: &str) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// Records one more write by `node`; the result dominates `self`.
    pub fn increment(&mut self, node: &str) {
        *self.0.entry(node.to_owned()).or_insert(0) += 1;
    }

    /// Pointwise maximum: the vector of a replica that has seen both.
    pub fn merge(&mut self, other: &VersionVector) {
        for (node, &n) in &other.0 {
            let e = self.0.entry(node.clone()).or_insert(0);
            *e = (*e).max(n);
        }
    }

    pub fn compare(&self, other: &VersionVector) -> Causality {
        let mut greater = false;
        let mut less = false;
        for node in self.0.keys().chain(other.0.keys()) {
            match self.get(node).cmp(&other.get(node)) {
                Ordering::Greater => greater = true,
                Ordering::Less => less = true,
                Ordering::Equal => {}
            }
        }
        match (greater, less) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Dominates,
            (false, true) => Causality::DominatedBy,
            (true, true) => Causality::Concurrent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering as AO};
    use std::sync::Arc;

    fn clock_at(start: u64) -> (HlcClock, Arc<AtomicU64>) {
        let wall = Arc::new(AtomicU64::new(start));
        let w = wall.clone();
        (
            HlcClock::with_wall(Hlc::default(), Box::new(move || w.load(AO::SeqCst))),
            wall,
        )
    }

    #[test]
    fn remote_stamps_may_be_ahead_by_at_most_the_bound() {
        let wall = 1_795_832_158_123;
        let ok = Hlc::new(wall + MAX_AHEAD_MS, u16::MAX);
        assert_eq!(check_remote(|| "x".into(), ok, wall), Ok(()));
        let far = Hlc::new(32_503_680_000_000, 0);
        let e = check_remote(|| "sync request clock".into(), far, wall).unwrap_err();
        assert_eq!(
            e.to_string(),
            "sync request clock 3000-01-01T00:00:00.000Z is more than 366 days ahead of \
             this node's clock (2026-11-28T02:15:58.123Z); refused"
        );
        // Behind is always fine: the receiving clock simply stays ahead.
        assert!(check_remote(String::new, Hlc(0), wall).is_ok());
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_832_158_123), "2026-11-28T02:15:58.123Z");
    }

    #[test]
    fn follows_the_wall_clock_when_it_advances() {
        let (mut c, wall) = clock_at(1_000);
        assert_eq!(c.now(), Hlc::new(1_000, 0));
        wall.store(2_000, AO::SeqCst);
        assert_eq!(c.now(), Hlc::new(2_000, 0));
    }

    #[test]
    fn strictly_increases_within_a_millisecond_and_when_the_wall_goes_back() {
        let (mut c, wall) = clock_at(5_000);
        let a = c.now();
        let b = c.now();
        assert!(b > a);
        assert_eq!(b, Hlc::new(5_000, 1));
        wall.store(10, AO::SeqCst); // NTP step backwards
        let d = c.now();
        assert!(d > b, "a clock step back must not reorder writes");
        assert_eq!(d.millis(), 5_000);
    }

    #[test]
    fn logical_overflow_borrows_a_millisecond() {
        let mut c = HlcClock::with_wall(Hlc::new(7, u16::MAX), Box::new(|| 0));
        assert_eq!(c.now(), Hlc::new(8, 0));
    }

    #[test]
    fn observe_moves_past_remote_timestamps() {
        let (mut c, _wall) = clock_at(1_000);
        let remote = Hlc::new(9_000, 4); // a replica whose clock runs ahead
        let r = c.observe(remote);
        assert!(r > remote);
        assert!(c.now() > r);
        let (mut c2, _) = clock_at(20_000);
        assert_eq!(c2.observe(remote), Hlc::new(20_000, 0));
    }

    #[test]
    fn restarts_after_the_persisted_timestamp() {
        let persisted = Hlc::new(u64::from(u32::MAX), 3);
        let mut c = HlcClock::with_wall(persisted, Box::new(|| 1));
        assert!(c.now() > persisted);
    }

    fn vv(pairs: &[(&str, u64)]) -> VersionVector {
        VersionVector(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    #[test]
    fn version_vector_comparison() {
        assert_eq!(vv(&[]).compare(&vv(&[])), Causality::Equal);
        assert_eq!(
            vv(&[("a", 1)]).compare(&vv(&[("a", 1), ("b", 0)])),
            Causality::Equal
        );
        assert_eq!(
            vv(&[("a", 2)]).compare(&vv(&[("a", 1)])),
            Causality::Dominates
        );
        assert_eq!(
            vv(&[("a", 1)]).compare(&vv(&[("a", 1), ("b", 1)])),
            Causality::DominatedBy
        );
        assert_eq!(
            vv(&[("a", 2)]).compare(&vv(&[("a", 1), ("b", 1)])),
            Causality::Concurrent
        );
    }

    #[test]
    fn increment_dominates_and_merge_is_an_upper_bound() {
        let base = vv(&[("a", 1), ("b", 3)]);
        let mut next = base.clone();
        next.increment("a");
        assert_eq!(next.compare(&base), Causality::Dominates);

        let mut left = base.clone();
        left.increment("a");
        let mut right = base.clone();
        right.increment("b");
        assert_eq!(left.compare(&right), Causality::Concurrent);
        let mut m = left.clone();
        m.merge(&right);
        assert_eq!(m.compare(&left), Causality::Dominates);
        assert_eq!(m.compare(&right), Causality::Dominates);
        // merge is commutative and idempotent
        let mut m2 = right.clone();
        m2.merge(&left);
        assert_eq!(m, m2);
        let mut m3 = m.clone();
        m3.merge(&m);
        assert_eq!(m3, m);
    }
}
