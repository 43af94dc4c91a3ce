//! `konsul-edge repair-clock`: brings back a clock that was carried into
//! the future, offline.
//!
//! Before every incoming stamp was range-checked, one sync request could
//! move a hub's clock to the year 3000, where it stayed (it is persisted).
//! Everything the hub wrote after that carries such a stamp, which edges
//! refuse, so they fail every sync. The repair runs with the daemon
//! stopped (it takes the database exclusively and refuses while a daemon
//! holds it), gives the records stamped in the future fresh stamps from
//! the wall clock on and resets the persisted clock (`store::reset_clock`),
//! and says what it changed. It trusts the wall clock, so it refuses one
//! that is plainly unset.

use std::path::Path;

use crate::clock::{rfc3339, wall_millis};
use crate::store::StoreError;

/// 2025-01-01T00:00:00Z: a wall clock before this is unset (an RTC-less
/// board before NTP), not a clock to reset to.
const SANE_WALL_MS: u64 = 1_735_689_600_000;

#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(
        "{path}: the database is in use, most likely by the running daemon; stop it first \
         (systemctl stop konsul-edge) and run repair-clock again"
    )]
    InUse { path: String },
    #[error(
        "the wall clock reads {0}, which cannot be right; set the system time first \
         (repair-clock resets the node's clock to it)"
    )]
    WallClock(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Repairs the database at `path`; returns the report for the operator.
pub fn repair_clock(path: &Path) -> Result<String, RepairError> {
    let wall = wall_millis();
    if wall < SANE_WALL_MS {
        return Err(RepairError::WallClock(rfc3339(wall)));
    }
    let r = crate::store::reset_clock(path, wall).map_err(|e| match e {
        StoreError::Sqlite { ref source, .. }
            if matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            ) =>
        {
            RepairError::InUse {
                path: path.display().to_string(),
            }
        }
        other => RepairError::Store(other),
    })?;
    let p = path.display();
    if r.now == r.was {
        return Ok(format!(
            "{p}: the clock reads {}, not ahead of the wall clock ({}); nothing to change\n",
            rfc3339(r.was.millis()),
            rfc3339(wall)
        ));
    }
    let ahead_days = r.was.millis().saturating_sub(wall) / 86_400_000;
    Ok(format!(
        "{p}: the clock read {} ({ahead_days} days ahead of the wall clock); reset to {}\n\
         {p}: {} records stamped in the future got fresh stamps (in their old order)\n",
        rfc3339(r.was.millis()),
        rfc3339(r.now.millis()),
        r.restamped
    ))
}
