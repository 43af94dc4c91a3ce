//! How many rejection lines reach the journal. Devices are untrusted and
//! ids are free to invent, so a limit per id alone lets a flood of made-up
//! ids write one line per message (flash wear, journal rotation pushing out
//! what matters). Two limits together:
//! - a global budget of [`LINES_PER_WINDOW`] lines per [`WINDOW`];
//! - per id, one line per [`WINDOW`] (the sample: the first rejection of a
//!   device in the window is the one shown).
//!
//! Whatever is not logged is counted (`konsul_edge_mqtt_log_lines_suppressed_total`,
//! and `konsul_edge_mqtt_rejected_total` by reason counts every rejection)
//! and summed up in one line when the window ends. Pure: the clock is
//! passed in, so it is unit-tested without waiting.

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub(crate) const WINDOW: Duration = Duration::from_secs(60);
pub(crate) const LINES_PER_WINDOW: u32 = 20;
/// Ids remembered for the per-id limit. Past this, the global budget alone
/// limits (the map must not grow with a flood of made-up ids).
const MAX_IDS: usize = 4096;

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Log,
    Suppress,
}

pub(crate) struct LogBudget {
    window_start: Option<Instant>,
    lines: u32,
    suppressed: u64,
    /// id -> when its last rejection was logged.
    logged: HashMap<String, Instant>,
}

impl LogBudget {
    pub(crate) fn new() -> LogBudget {
        LogBudget {
            window_start: None,
            lines: 0,
            suppressed: 0,
            logged: HashMap::new(),
        }
    }

    /// Whether the rejection of `id` (`""` when the topic names none) at
    /// `now` may be logged. Call [`summary`](Self::summary) first so a
    /// window that ended is closed.
    pub(crate) fn admit(&mut self, id: &str, now: Instant) -> Verdict {
        let start = *self.window_start.get_or_insert(now);
        if now.duration_since(start) >= WINDOW {
            self.window_start = Some(now);
            self.lines = 0;
        }
        let id_due = self
            .logged
            .get(id)
            .is_none_or(|t| now.duration_since(*t) >= WINDOW);
        if !id_due || self.lines >= LINES_PER_WINDOW {
            self.suppressed += 1;
            return Verdict::Suppress;
        }
        self.lines += 1;
        if self.logged.len() >= MAX_IDS {
            self.logged.retain(|_, t| now.duration_since(*t) < WINDOW);
        }
        if self.logged.len() < MAX_IDS {
            self.logged.insert(id.to_owned(), now);
        }
        Verdict::Log
    }

    /// When the summary of what was suppressed is due, if anything was.
    pub(crate) fn summary_due(&self) -> Option<Instant> {
        match (self.suppressed, self.window_start) {
            (0, _) | (_, None) => None,
            (_, Some(start)) => Some(start + WINDOW),
        }
    }

    /// The number suppressed in a window that has ended (and resets it);
    /// None while the window runs or nothing was suppressed.
    pub(crate) fn summary(&mut self, now: Instant) -> Option<u64> {
        let due = self.summary_due()?;
        if now < due {
            return None;
        }
        let n = std::mem::take(&mut self.suppressed);
        self.window_start = None;
        self.lines = 0;
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_made_up_ids_is_capped_by_the_global_budget() {
        let mut b = LogBudget::new();
        let t0 = Instant::now();
        let logged = (0..10_000)
            .filter(|i| b.admit(&format!("made-up-{i}"), t0) == Verdict::Log)
            .count();
        assert_eq!(logged, LINES_PER_WINDOW as usize);
        assert_eq!(b.summary(t0 + WINDOW / 2), None, "window still running");
        assert_eq!(b.summary(t0 + WINDOW), Some(10_000 - 20));
        assert_eq!(b.summary(t0 + WINDOW * 3), None, "said once");
        // A new window has a new budget.
        assert_eq!(b.admit("fresh", t0 + WINDOW * 3), Verdict::Log);
    }

    #[test]
    fn one_device_is_logged_once_a_window() {
        let mut b = LogBudget::new();
        let t0 = Instant::now();
        assert_eq!(b.admit("d", t0), Verdict::Log);
        assert_eq!(b.admit("d", t0 + Duration::from_secs(1)), Verdict::Suppress);
        assert_eq!(b.admit("e", t0 + Duration::from_secs(1)), Verdict::Log);
        assert_eq!(b.summary_due(), Some(t0 + WINDOW));
        assert_eq!(b.summary(t0 + WINDOW), Some(1));
        assert_eq!(b.admit("d", t0 + WINDOW), Verdict::Log);
    }

    #[test]
    fn the_id_map_stays_bounded() {
        let mut b = LogBudget::new();
        let t0 = Instant::now();
        for w in 0..400u32 {
            let now = t0 + WINDOW * w;
            for i in 0..LINES_PER_WINDOW {
                b.admit(&format!("{w}-{i}"), now);
            }
        }
        assert!(b.logged.len() <= MAX_IDS);
    }
}
