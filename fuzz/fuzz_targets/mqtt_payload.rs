//! Fuzzes MQTT topic routing and payload parsing: whatever a device sends,
//! `payload::parse` returns a value or an error, never panics, and an
//! accepted message satisfies the invariants the store relies on.
#![no_main]

use konsul_edge::devices::payload::{self, Inbound};
use libfuzzer_sys::fuzz_target;

const TOPICS: [&str; 9] = [
    "devices/d1/register",
    "devices/d1/telemetry",
    "devices/d1/heartbeat",
    "devices/d1/events",
    "devices/d1/status",
    "devices/d1/update/status",
    "devices/d1/ack",
    "devices/d1/x/y",
    "other/topic",
];

fuzz_target!(|data: &[u8]| {
    // First byte picks a topic; with the high bit set the topic itself
    // comes from the input (up to the first 0 byte).
    let (topic, body) = match data.split_first() {
        None => return,
        Some((b, rest)) if b & 0x80 != 0 => {
            let end = rest.iter().position(|c| *c == 0).unwrap_or(rest.len());
            match std::str::from_utf8(&rest[..end]) {
                Ok(t) => (t.to_owned(), rest.get(end + 1..).unwrap_or(&[])),
                Err(_) => return,
            }
        }
        Some((b, rest)) => (TOPICS[(*b as usize) % TOPICS.len()].to_owned(), rest),
    };
    match payload::parse(&topic, body, 4096) {
        Ok(m) => {
            if let Some(id) = m.device() {
                assert!(payload::valid_id(id), "accepted id {id:?}");
                assert_eq!(topic.split('/').nth(1), Some(id));
            }
            match m {
                Inbound::Heartbeat { heartbeat, .. } => {
                    assert!(heartbeat.battery.is_none_or(|b| b <= 100))
                }
                Inbound::UpdateStatus { report, .. } => {
                    assert!(report.progress.is_none_or(|p| p <= 100));
                }
                Inbound::Register { reg, .. } => {
                    assert!(reg.battery.is_none_or(|b| b <= 100));
                    assert!(!reg.device_type.is_empty());
                }
                _ => {}
            }
        }
        Err(e) => {
            let _ = (e.reason(), e.device(), e.to_string());
        }
    }
});
