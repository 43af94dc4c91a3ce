//! The data budget of a metered link (`cloud.data_budget`): bytes per UTC
//! day or calendar month, counted as TCP payload both ways (`metered`),
//! kept in the store so a restart does not hand out the month again.
//!
//! The rule, in the order a round applies it:
//! - State changes (services, KV, devices, tombstones) always sync. They
//!   are what other nodes act on, and they coalesce per key, so a link
//!   that is down for a month still owes at most one version per key.
//! - Telemetry may use the budget up to its last tenth (the reserve for
//!   state changes), and a round carries telemetry only if the round,
//!   estimated from its encoded request plus the last round's overhead and
//!   answer, still fits below that line. Past it telemetry waits in the
//!   local store, oldest first, until the next period; the local telemetry
//!   retention still applies to it, so on a link whose plan never covers
//!   its telemetry the oldest points age out locally and that is the
//!   thinning.
//! - If state changes alone go past the budget the plan is exceeded: the
//!   daemon says so once per period in the journal, and status and
//!   `/metrics` show it.

use serde::Serialize;

use crate::config::BudgetPeriod;

const DAY_MS: u64 = 86_400_000;
/// Meta key: "{period_start_ms} {used_bytes}".
pub(crate) const META_KEY: &str = "data_budget";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BudgetStatus {
    pub limit: u64,
    pub used: u64,
    pub remaining: u64,
    /// Epoch ms when the period (and the count) starts again.
    pub resets_ms: u64,
    /// Telemetry is waiting for the next period.
    pub telemetry_held: bool,
    /// State changes alone went past the limit this period.
    pub exceeded: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct DataBudget {
    limit: u64,
    period: BudgetPeriod,
    start_ms: u64,
    used: u64,
    telemetry_held: bool,
    warned: bool,
}

impl DataBudget {
    pub(crate) fn new(limit: u64, period: BudgetPeriod, now_ms: u64) -> DataBudget {
        DataBudget {
            limit,
            period,
            start_ms: period_start(period, now_ms),
            used: 0,
            telemetry_held: false,
            warned: false,
        }
    }

    /// Takes the count saved by [`persisted`](Self::persisted), if it is
    /// of the current period.
    pub(crate) fn restore(&mut self, saved: Option<&str>) {
        let parsed = saved.and_then(|s| {
            let (start, used) = s.split_once(' ')?;
            Some((start.parse::<u64>().ok()?, used.parse::<u64>().ok()?))
        });
        if let Some((start, used)) = parsed {
            if start == self.start_ms {
                self.used = used;
            }
        }
    }

    pub(crate) fn persisted(&self) -> String {
        format!("{} {}", self.start_ms, self.used)
    }

    /// Starts a new period when `now_ms` is past this one.
    pub(crate) fn roll(&mut self, now_ms: u64) {
        let start = period_start(self.period, now_ms);
        if start != self.start_ms {
            self.start_ms = start;
            self.used = 0;
            self.telemetry_held = false;
            self.warned = false;
        }
    }

    pub(crate) fn spend(&mut self, bytes: u64) {
        self.used = self.used.saturating_add(bytes);
        if self.used > self.limit && !self.warned {
            self.warned = true;
            log::warn!(
                "cloud.data_budget: {} bytes used this {}, over the {} allowed; only state \
                 changes sync and they alone went past it",
                self.used,
                self.period.name(),
                self.limit
            );
        }
    }

    /// Whether a round costing about `estimate` bytes may carry telemetry.
    /// Records the answer for status.
    pub(crate) fn allows_telemetry(&mut self, estimate: u64) -> bool {
        let line = self.limit - self.limit / 10;
        let ok = self.used.saturating_add(estimate) <= line;
        if !ok && !self.telemetry_held {
            log::info!(
                "cloud.data_budget: telemetry waits for the next {} ({} of {} bytes used; \
                 the last tenth is kept for state changes)",
                self.period.name(),
                self.used,
                self.limit
            );
        }
        self.telemetry_held = !ok;
        ok
    }

    pub(crate) fn status(&self) -> BudgetStatus {
        BudgetStatus {
            limit: self.limit,
            used: self.used,
            remaining: self.limit.saturating_sub(self.used),
            resets_ms: period_end(self.period, self.start_ms),
            telemetry_held: self.telemetry_held,
            exceeded: self.used > self.limit,
        }
    }
}

fn period_start(period: BudgetPeriod, now_ms: u64) -> u64 {
    let day = now_ms / DAY_MS;
    match period {
        BudgetPeriod::Day => day * DAY_MS,
        BudgetPeriod::Month => {
            let (y, m, _) = civil_from_days(day as i64);
            days_from_civil(y, m, 1) as u64 * DAY_MS
        }
    }
}

fn period_end(period: BudgetPeriod, start_ms: u64) -> u64 {
    match period {
        BudgetPeriod::Day => start_ms + DAY_MS,
        BudgetPeriod::Month => {
            let (y, m, _) = civil_from_days((start_ms / DAY_MS) as i64);
            let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            days_from_civil(y, m, 1) as u64 * DAY_MS
        }
    }
}

// Howard Hinnant's civil-date algorithms (proleptic Gregorian, UTC).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-29T19:51:37Z
    const NOW: u64 = 1_795_981_897_000;

    #[test]
    fn periods_are_utc_days_and_calendar_months() {
        assert_eq!(period_start(BudgetPeriod::Day, NOW), 1_795_910_400_000);
        // 2026-11-01 and 2026-12-01
        assert_eq!(period_start(BudgetPeriod::Month, NOW), 1_793_491_200_000);
        assert_eq!(
            period_end(BudgetPeriod::Month, 1_793_491_200_000),
            1_796_083_200_000
        );
        // December rolls into the next year.
        let dec = days_from_civil(2026, 12, 1) as u64 * DAY_MS;
        assert_eq!(
            period_end(BudgetPeriod::Month, dec),
            days_from_civil(2027, 1, 1) as u64 * DAY_MS
        );
        assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    }

    #[test]
    fn telemetry_stops_at_nine_tenths_and_a_new_period_frees_it() {
        let mut b = DataBudget::new(100_000, BudgetPeriod::Day, NOW);
        b.restore(Some(&format!(
            "{} 85000",
            period_start(BudgetPeriod::Day, NOW)
        )));
        assert!(b.allows_telemetry(4_000));
        assert!(!b.allows_telemetry(6_000), "would cross 90 000");
        assert!(b.status().telemetry_held);
        b.spend(20_000);
        assert!(b.status().exceeded);
        assert_eq!(b.status().remaining, 0);
        let saved = b.persisted();
        b.roll(NOW + DAY_MS);
        assert_eq!(b.status().used, 0);
        assert!(b.allows_telemetry(4_000));
        // A count saved in another period is not restored.
        b.restore(Some(&saved));
        assert_eq!(b.status().used, 0);
    }
}
