//! The value types of the config language: durations (`300s`, `5m`),
//! sizes (`50Mi`), the mode and the log level. Each parses from the text a
//! person writes and prints back the same way, so `init` and error messages
//! use the units the file does.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_norway::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Edge,
    Hub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn to_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Ok(LogLevel::Error),
            "warn" | "warning" => Ok(LogLevel::Warn),
            "info" => Ok(LogLevel::Info),
            "debug" => Ok(LogLevel::Debug),
            "trace" => Ok(LogLevel::Trace),
            other => Err(format!(
                "unknown log level `{other}` (error, warn, info, debug, trace)"
            )),
        }
    }
}

/// A duration written as in the seed: `300s`, `5m`, `1h`, `7d`, `250ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Value", into = "String")]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration (like 300s, 5m, 1h, 7d, 250ms)"))?;
        let ms = match unit {
            "ms" => Some(n),
            "s" | "" => n.checked_mul(1_000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            "d" => n.checked_mul(86_400_000),
            _ => {
                return Err(format!(
                    "`{s}`: unknown duration unit `{unit}` (ms, s, m, h, d)"
                ))
            }
        }
        .ok_or_else(|| format!("`{s}` is too large"))?;
        Ok(Duration(std::time::Duration::from_millis(ms)))
    }
}

impl TryFrom<Value> for Duration {
    type Error = String;
    fn try_from(v: Value) -> Result<Self, String> {
        match v {
            Value::String(s) => s.parse(),
            Value::Number(n) => n
                .as_u64()
                .map(Duration::secs)
                .ok_or_else(|| format!("`{n}` is not a duration")),
            other => Err(format!("expected a duration like 300s, got {other:?}")),
        }
    }
}

impl From<Duration> for String {
    fn from(d: Duration) -> String {
        d.to_string()
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

/// A size written as in the seed: `50Mi`, `1Gi`, `512Ki`, `100M`, or bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "Value", into = "String")]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size (like 50Mi, 1Gi, 512Ki)"))?;
        let mult: u64 = match unit {
            "" | "B" => 1,
            "Ki" | "KiB" => 1 << 10,
            "Mi" | "MiB" => 1 << 20,
            "Gi" | "GiB" => 1 << 30,
            "K" | "k" | "KB" => 1_000,
            "M" | "MB" => 1_000_000,
            "G" | "GB" => 1_000_000_000,
            _ => {
                return Err(format!(
                    "`{s}`: unknown size unit `{unit}` (Ki, Mi, Gi, K, M, G)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

impl TryFrom<Value> for ByteSize {
    type Error = String;
    fn try_from(v: Value) -> Result<Self, String> {
        match v {
            Value::String(s) => s.parse(),
            Value::Number(n) => n
                .as_u64()
                .map(ByteSize)
                .ok_or_else(|| format!("`{n}` is not a size")),
            other => Err(format!("expected a size like 50Mi, got {other:?}")),
        }
    }
}

impl From<ByteSize> for String {
    fn from(b: ByteSize) -> String {
        b.to_string()
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, m) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if b >= m && b.is_multiple_of(m) {
                return write!(f, "{}{unit}", b / m);
            }
        }
        write!(f, "{b}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_parse_as_in_the_seed() {
        assert_eq!("300s".parse::<Duration>().unwrap(), Duration::secs(300));
        assert_eq!("5m".parse::<Duration>().unwrap(), Duration::secs(300));
        assert_eq!("7d".parse::<Duration>().unwrap(), Duration::secs(604_800));
        assert_eq!(
            "250ms".parse::<Duration>().unwrap().0,
            std::time::Duration::from_millis(250)
        );
        assert!("5 parsecs".parse::<Duration>().is_err());
        assert!("s".parse::<Duration>().is_err());
        assert_eq!("50Mi".parse::<ByteSize>().unwrap().0, 50 << 20);
        assert_eq!("1Gi".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert_eq!("100M".parse::<ByteSize>().unwrap().0, 100_000_000);
        assert!("12Qi".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(50 << 20).to_string(), "50Mi");
    }
}
