//! A small `log` backend for a daemon under systemd.
//!
//! When stderr is the journal (`JOURNAL_STREAM` names stderr's device and
//! inode), each line starts with a syslog priority prefix (`<6>`) so
//! `journalctl -p warning` works, and carries no timestamp: the journal adds
//! its own. Anywhere else lines get a UTC timestamp and a level word, for an
//! operator reading a terminal or a log file.

use std::io::Write;
use std::os::unix::fs::MetadataExt;

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger {
    journal: bool,
}

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let target = r
            .target()
            .strip_prefix("konsul_edge::")
            .unwrap_or(r.target());
        let line = if self.journal {
            format!("<{}>{target}: {}\n", priority(r.level()), r.args())
        } else {
            format!(
                "{} {:5} {target}: {}\n",
                crate::clock::rfc3339(crate::clock::wall_millis()),
                r.level(),
                r.args()
            )
        };
        // One write per line, so concurrent lines never interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

fn priority(l: Level) -> u8 {
    match l {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// True when stderr is connected to the journal.
// Start-up only (logging set-up in main); /proc, not a disk.
#[allow(clippy::disallowed_methods)]
pub fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Installs the logger; a second call only changes the level.
pub fn init(level: LevelFilter) {
    let logger = Box::new(Logger {
        journal: stderr_is_journal(),
    });
    // Already installed (tests): keep the first logger, take the new level.
    let _ = log::set_boxed_logger(logger);
    log::set_max_level(level);
}
