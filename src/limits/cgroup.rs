//! The daemon's own cgroup (v2): where it is, what `memory.max` and
//! `cpu.max` say, whether that matches `resources`, and the systemd
//! drop-in that makes it match.
//!
//! Only the unified hierarchy is read: the `0::<path>` line of
//! `/proc/self/cgroup` under `resources.cgroup_root`. On a v1 or hybrid
//! host whose memory controller is not in the unified tree the files are
//! absent, and the start-up check says so instead of guessing.

use std::path::{Path, PathBuf};

use super::LimitsError;
use crate::config::Resources;

/// `memory.max` or `cpu.max` may differ from the config by this much before
/// the check complains: systemd rounds MemoryMax to pages and CPUQuota to
/// 1% steps.
const MEMORY_SLACK: u64 = 64 << 10;
const CPU_SLACK: f64 = 0.005;

/// The unified-hierarchy path of a process, from `/proc/<pid>/cgroup`.
pub(crate) fn own_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
}

/// A limit file's value: None for `max` (no limit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Found<T> {
    Absent,
    Unlimited,
    Limit(T),
}

/// What the cgroup files say.
#[derive(Debug, Clone)]
pub(crate) struct Cgroup {
    pub dir: PathBuf,
    pub memory_max: Found<u64>,
    /// CPUs' worth: quota / period.
    pub cpu_max: Found<f64>,
}

impl Cgroup {
    /// Reads the daemon's own cgroup under `root`. Runs before the
    /// executor starts (procfs and cgroupfs: no disk behind them).
    #[allow(clippy::disallowed_methods)]
    pub(crate) fn read_own(root: &Path) -> Result<Cgroup, LimitsError> {
        let proc = Path::new("/proc/self/cgroup");
        let text = std::fs::read_to_string(proc).map_err(|source| LimitsError::Io {
            path: proc.into(),
            source,
        })?;
        let rel = own_path(&text).ok_or_else(|| LimitsError::Parse {
            path: proc.into(),
            message: "no cgroup v2 (0::) line".into(),
        })?;
        let dir = root.join(rel.trim_start_matches('/'));
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
        Ok(Cgroup {
            memory_max: parse_memory_max(read("memory.max").as_deref()),
            cpu_max: parse_cpu_max(read("cpu.max").as_deref()),
            dir,
        })
    }

    /// One warning per limit that is absent or disagrees with `r`.
    pub(crate) fn disagreements(&self, r: &Resources) -> Vec<String> {
        let mut out = Vec::new();
        let want = r.memory_limit.0;
        match self.memory_max {
            Found::Limit(have) if have.abs_diff(want) > MEMORY_SLACK => out.push(format!(
                "{} is {have} bytes but resources.memory_limit is {} ({want} bytes); \
                 re-run `konsul-edge systemd-dropin`",
                self.dir.join("memory.max").display(),
                r.memory_limit
            )),
            Found::Limit(_) => {}
            ref unenforced => {
                out.push(self.unenforced(unenforced, "memory", "memory_limit", &r.memory_limit))
            }
        }
        match self.cpu_max {
            Found::Limit(have) if (have - r.cpu_limit).abs() > CPU_SLACK => out.push(format!(
                "{} allows {have:.3} CPUs but resources.cpu_limit is {}; \
                 re-run `konsul-edge systemd-dropin`",
                self.dir.join("cpu.max").display(),
                r.cpu_limit
            )),
            Found::Limit(_) => {}
            ref unenforced => {
                out.push(self.unenforced(unenforced, "cpu", "cpu_limit", &r.cpu_limit))
            }
        }
        out
    }

    /// The warning for `{controller}.max` absent or `max`: the kernel does
    /// not enforce `resources.{key}`.
    fn unenforced<T>(
        &self,
        found: &Found<T>,
        controller: &str,
        key: &str,
        value: &dyn std::fmt::Display,
    ) -> String {
        // join, not "{dir}/": the root cgroup's dir ends in a slash.
        let file = self.dir.join(format!("{controller}.max"));
        let file = file.display();
        match found {
            Found::Unlimited => format!(
                "{file} is `max`: resources.{key} {value} is not enforced; \
                 install the drop-in `konsul-edge systemd-dropin` writes"
            ),
            _ => format!(
                "{file} is absent (no cgroup v2 {controller} controller here): \
                 resources.{key} {value} is not enforced by the kernel"
            ),
        }
    }
}

fn parse_memory_max(text: Option<&str>) -> Found<u64> {
    match text.map(str::trim) {
        None => Found::Absent,
        Some("max") => Found::Unlimited,
        Some(n) => n.parse().map_or(Found::Absent, Found::Limit),
    }
}

/// `cpu.max` is `<quota|max> <period>` in microseconds.
fn parse_cpu_max(text: Option<&str>) -> Found<f64> {
    let Some(text) = text else {
        return Found::Absent;
    };
    let mut parts = text.split_whitespace();
    match (parts.next(), parts.next().map(str::parse::<u64>)) {
        (Some("max"), _) => Found::Unlimited,
        (Some(q), Some(Ok(period))) if period > 0 => q
            .parse::<u64>()
            .map_or(Found::Absent, |q| Found::Limit(q as f64 / period as f64)),
        _ => Found::Absent,
    }
}

/// The `[Service]` drop-in that binds the unit to `resources`: MemoryMax is
/// the limit itself, MemoryHigh 90% of it (the kernel reclaims and raises
/// "high" events there, which is when the daemon sheds, before the OOM
/// killer at MemoryMax), CPUQuota the CPU share in percent.
pub fn render_dropin(r: &Resources, source: &Path) -> String {
    let max = r.memory_limit.0;
    let high = max / 10 * 9;
    let quota = (r.cpu_limit * 100.0).round().max(1.0) as u64;
    format!(
        "# Written by `konsul-edge systemd-dropin` from the resources section of\n\
         # {}; re-run it (and `systemctl daemon-reload`) after changing them.\n\
         # It overrides the shipped unit's MemoryHigh/MemoryMax.\n\
         [Service]\n\
         MemoryMax={max}\n\
         MemoryHigh={high}\n\
         CPUQuota={quota}%\n",
        source.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;

    #[test]
    fn files_parse() {
        assert_eq!(
            own_path("12:memory:/x\n0::/system.slice/k.service\n"),
            Some("/system.slice/k.service")
        );
        assert_eq!(own_path("4:memory:/x\n"), None);
        assert_eq!(parse_memory_max(Some("max\n")), Found::Unlimited);
        assert_eq!(parse_memory_max(Some("52428800\n")), Found::Limit(52428800));
        assert_eq!(parse_memory_max(None), Found::Absent);
        assert_eq!(parse_cpu_max(Some("10000 100000\n")), Found::Limit(0.1));
        assert_eq!(parse_cpu_max(Some("max 100000\n")), Found::Unlimited);
        assert_eq!(parse_cpu_max(Some("junk")), Found::Absent);
    }

    #[test]
    fn the_dropin_matches_what_the_check_accepts() {
        let r = Resources {
            memory_limit: ByteSize(50 << 20),
            cpu_limit: 0.1,
            ..Resources::default()
        };
        let d = render_dropin(&r, Path::new("/etc/konsul-edge/edge.yaml"));
        assert!(d.contains("MemoryMax=52428800\n"), "{d}");
        assert!(d.contains("MemoryHigh=47185920\n"), "{d}");
        assert!(d.contains("CPUQuota=10%\n"), "{d}");
        // What systemd makes of that drop-in passes the check.
        let cg = Cgroup {
            dir: "/sys/fs/cgroup/k".into(),
            memory_max: Found::Limit(52428800),
            cpu_max: Found::Limit(0.1),
        };
        assert!(cg.disagreements(&r).is_empty());
        let off = Cgroup {
            memory_max: Found::Limit(64 << 20),
            cpu_max: Found::Unlimited,
            ..cg
        };
        assert_eq!(off.disagreements(&r).len(), 2);
    }
}
