//! Topic routing and payload schemas: bytes from the broker in, a typed
//! [`Inbound`] or a [`PayloadError`] out. Pure (no I/O, no clock), so it is
//! unit-tested and fuzzed (`fuzz/fuzz_targets/mqtt_payload.rs`) on its own.
//!
//! Devices are untrusted: every limit is checked here, before anything
//! touches the store. The size cap comes first so an oversized payload is
//! never parsed; JSON syntax errors and type errors are told apart (they
//! are different bugs on the device side); an `id` in the payload must
//! match the topic's, so one device cannot write another's state by
//! accident.
//!
//! Topics (`{id}` is one level, 1-128 of `A-Z a-z 0-9 - _ . :`):
//! `devices/{id}/register|telemetry|heartbeat|events|status` are input;
//! `devices/{id}/ack|error|update|command` are the edge's own output (seen again
//! when someone subscribes to `devices/#`): ignored without complaint, so
//! the edge never answers its own messages. `devices/{id}/update/status`
//! is a device's firmware update progress ([`UpdateReport`]), for the
//! rollout engine (`crate::firmware::rollout`). Anything else under `devices/` is an
//! unknown topic; topics outside `devices/` are not ours to judge.
//!
//! Split by job: [`error`] (why a message is refused), [`schema`] (what the
//! payloads look like), `checks` (the limits applied to them) and the
//! routing here.

mod checks;
pub mod error;
pub mod schema;

use serde_json::{Map, Value};

use checks::Ctx;
pub use error::{PayloadError, Reason};
pub use schema::{Event, EventAlert, Heartbeat, Registration, Telemetry, UpdateReport, SEVERITIES};

/// `mqtt.max_payload_size` when unset.
pub const DEFAULT_MAX_PAYLOAD: usize = 64 * 1024;
pub const MAX_ID_LEN: usize = 128;
pub const MAX_TEXT_LEN: usize = 255;
pub const MAX_MESSAGE_LEN: usize = 1024;
/// Bounds on a device's telemetry interval.
pub const MIN_INTERVAL_MS: u64 = 1_000;
pub const MAX_INTERVAL_MS: u64 = 7 * 86_400_000;
pub const DEFAULT_INTERVAL_MS: u64 = 60_000;
pub const UPDATE_STATUSES: [&str; 6] = [
    "none",
    "pending",
    "downloading",
    "installing",
    "complete",
    "failed",
];

#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Register {
        device: String,
        reg: Registration,
    },
    Telemetry {
        device: String,
        telemetry: Telemetry,
    },
    Heartbeat {
        device: String,
        heartbeat: Heartbeat,
    },
    Event {
        device: String,
        event: Event,
    },
    /// The device's connection status (its last will says `offline`).
    Status {
        device: String,
        online: bool,
    },
    /// Firmware update progress (`devices/{id}/update/status`).
    UpdateStatus {
        device: String,
        report: UpdateReport,
    },
    /// One of the edge's own topics, or another subsystem's: not input.
    Ignored,
}

impl Inbound {
    pub fn device(&self) -> Option<&str> {
        match self {
            Inbound::Register { device, .. }
            | Inbound::Telemetry { device, .. }
            | Inbound::Heartbeat { device, .. }
            | Inbound::Event { device, .. }
            | Inbound::Status { device, .. }
            | Inbound::UpdateStatus { device, .. } => Some(device),
            Inbound::Ignored => None,
        }
    }
}

pub fn valid_id(id: &str) -> bool {
    // `.` and `..` are path segments, not names: `/v1/edge/devices/..`
    // could never reach such a device.
    !id.is_empty()
        && id != "."
        && id != ".."
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Routes and parses one message. `max` is `mqtt.max_payload_size`.
pub fn parse(topic: &str, payload: &[u8], max: usize) -> Result<Inbound, PayloadError> {
    let levels: Vec<&str> = topic.split('/').collect();
    if levels.first() != Some(&"devices") {
        return Ok(Inbound::Ignored);
    }
    let raw_id = levels.get(1).copied().unwrap_or("");
    let unknown = || PayloadError::UnknownTopic {
        topic: topic.into(),
        device: (!raw_id.is_empty()).then(|| raw_id.to_owned()),
    };
    let kind = match levels.as_slice() {
        [_, _, kind] => *kind,
        [_, _, "update", "status"] => "update/status",
        _ => return Err(unknown()),
    };
    if matches!(kind, "ack" | "error" | "update" | "command") {
        return Ok(Inbound::Ignored);
    }
    if !matches!(
        kind,
        "register" | "telemetry" | "heartbeat" | "events" | "status" | "update/status"
    ) {
        return Err(unknown());
    }
    let device = raw_id.to_owned();
    if !valid_id(&device) {
        return Err(PayloadError::InvalidId {
            topic: topic.into(),
            device,
        });
    }
    if payload.len() > max {
        return Err(PayloadError::TooLarge {
            topic: topic.into(),
            device,
            size: payload.len(),
            max,
        });
    }
    let ctx = Ctx { topic, device };
    match kind {
        "register" => {
            let reg: Registration = ctx.json(payload)?;
            ctx.check_id(reg.id.as_deref())?;
            ctx.check_registration(&reg)?;
            Ok(Inbound::Register {
                device: ctx.device,
                reg,
            })
        }
        "telemetry" => {
            let values: Map<String, Value> = ctx.json(payload)?;
            let id = ctx.field::<Option<String>>(&values, "id")?;
            ctx.check_id(id.as_deref())?;
            let battery = ctx.field::<Option<u8>>(&values, "battery")?;
            let signal = ctx.field::<Option<i16>>(&values, "signal")?;
            ctx.check_health_values(battery, signal)?;
            Ok(Inbound::Telemetry {
                device: ctx.device,
                telemetry: Telemetry {
                    values,
                    raw: String::from_utf8_lossy(payload).trim().to_owned(),
                    battery,
                    signal,
                },
            })
        }
        "heartbeat" => {
            // An empty heartbeat is a heartbeat.
            let heartbeat: Heartbeat = if payload.iter().all(u8::is_ascii_whitespace) {
                Heartbeat::default()
            } else {
                ctx.json(payload)?
            };
            ctx.check_id(heartbeat.id.as_deref())?;
            ctx.check_health_values(heartbeat.battery, heartbeat.signal)?;
            if let Some(v) = &heartbeat.firmware_version {
                ctx.check_text("firmware_version", v, MAX_TEXT_LEN, false)?;
            }
            Ok(Inbound::Heartbeat {
                device: ctx.device,
                heartbeat,
            })
        }
        "events" => {
            let body: Map<String, Value> = ctx.json(payload)?;
            let id = ctx.field::<Option<String>>(&body, "id")?;
            ctx.check_id(id.as_deref())?;
            let event_type = ctx
                .field::<Option<String>>(&body, "type")?
                .ok_or_else(|| ctx.invalid("type", "is required".into()))?;
            ctx.check_text("type", &event_type, 64, false)?;
            let alert = if event_type == "alert" {
                let a: EventAlert = serde_json::from_value(Value::Object(body.clone()))
                    .map_err(|e| ctx.wrong_type(e.to_string()))?;
                if !valid_id(&a.name) || a.name.len() > 64 {
                    return Err(ctx.invalid(
                        "name",
                        "1-64 of A-Z a-z 0-9 - _ . : (names the alert)".into(),
                    ));
                }
                if !SEVERITIES.contains(&a.severity.as_str()) {
                    return Err(ctx.invalid(
                        "severity",
                        format!(
                            "`{}`: use info, warning or critical",
                            a.severity.escape_debug()
                        ),
                    ));
                }
                ctx.check_text("message", &a.message, MAX_MESSAGE_LEN, true)?;
                Some(a)
            } else {
                None
            };
            Ok(Inbound::Event {
                device: ctx.device,
                event: Event {
                    event_type,
                    body,
                    alert,
                },
            })
        }
        "status" => {
            // A last will is often a bare word; JSON forms are accepted too.
            let text = std::str::from_utf8(payload)
                .map_err(|_| ctx.invalid("status", "not UTF-8".into()))?
                .trim();
            let word = match serde_json::from_str::<Value>(text) {
                Ok(Value::String(s)) => s,
                Ok(Value::Object(m)) => match m.get("status") {
                    Some(Value::String(s)) => s.clone(),
                    _ => {
                        return Err(
                            ctx.wrong_type("expected {\"status\": \"online\"|\"offline\"}".into())
                        )
                    }
                },
                Ok(_) => return Err(ctx.wrong_type("expected online or offline".into())),
                Err(_) => text.to_owned(),
            };
            let online = match word.as_str() {
                "online" => true,
                "offline" => false,
                other => {
                    return Err(ctx.invalid(
                        "status",
                        format!("`{}`: expected online or offline", other.escape_debug()),
                    ))
                }
            };
            Ok(Inbound::Status {
                device: ctx.device,
                online,
            })
        }
        "update/status" => {
            let report: UpdateReport = ctx.json(payload)?;
            ctx.check_id(report.id.as_deref())?;
            if !UPDATE_STATUSES[1..].contains(&report.status.as_str()) {
                return Err(ctx.invalid(
                    "status",
                    format!(
                        "`{}`: expected pending, downloading, installing, complete or failed",
                        report.status.escape_debug()
                    ),
                ));
            }
            if report.progress.is_some_and(|p| p > 100) {
                return Err(ctx.invalid("progress", "must be 0-100".into()));
            }
            if let Some(e) = &report.error {
                ctx.check_text("error", e, MAX_MESSAGE_LEN, true)?;
            }
            Ok(Inbound::UpdateStatus {
                device: ctx.device,
                report,
            })
        }
        _ => Err(unknown()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024;

    fn p(topic: &str, payload: &str) -> Result<Inbound, PayloadError> {
        parse(topic, payload.as_bytes(), MAX)
    }

    fn reason(topic: &str, payload: &str) -> Reason {
        p(topic, payload).unwrap_err().reason()
    }

    #[test]
    fn dot_segments_are_not_device_ids() {
        for id in [".", ".."] {
            assert!(!valid_id(id), "{id}");
            assert!(p(&format!("devices/{id}/register"), r#"{"type":"x"}"#).is_err());
        }
        assert!(valid_id("a.b") && valid_id("..a"));
    }

    #[test]
    fn registrations_parse_with_defaults_and_aliases() {
        let r = p(
            "devices/s-1/register",
            r#"{"id":"s-1","type":"sensor","name":"Dock door","location":"dock 3",
                "metadata":{"zone":"a"},"firmware_version":"1.2.0","telemetry_interval":"30s",
                "ip":"10.0.0.9","port":8080,"battery":80,"signal":-60}"#,
        )
        .unwrap();
        let Inbound::Register { device, reg } = r else {
            panic!("{r:?}")
        };
        assert_eq!(device, "s-1");
        assert_eq!(reg.telemetry_interval, Some(30_000));
        assert_eq!(reg.address.as_deref(), Some("10.0.0.9"));
        assert_eq!(reg.metadata["zone"], "a");
        let Inbound::Register { reg, .. } = p(
            "devices/x/register",
            r#"{"type":"cam","telemetry_interval":5}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(reg.telemetry_interval, Some(5_000));
        assert_eq!(reg.id, None);
    }

    #[test]
    fn bad_input_is_classified() {
        assert_eq!(
            reason("devices/a/register", "{not json"),
            Reason::MalformedJson
        );
        assert_eq!(reason("devices/a/register", ""), Reason::MalformedJson);
        assert_eq!(
            reason("devices/a/register", r#"{"type":5}"#),
            Reason::WrongType
        );
        assert_eq!(reason("devices/a/register", r#"[1,2]"#), Reason::WrongType);
        assert_eq!(
            reason("devices/a/register", r#"{"type":"s","colour":"red"}"#),
            Reason::WrongType
        );
        assert_eq!(
            reason("devices/a/register", r#"{"type":"s","battery":300}"#),
            Reason::WrongType
        );
        assert_eq!(
            reason("devices/a/register", r#"{"type":"s","battery":101}"#),
            Reason::Invalid
        );
        assert_eq!(
            reason(
                "devices/a/register",
                r#"{"type":"s","telemetry_interval":"1ms"}"#
            ),
            Reason::Invalid
        );
        assert_eq!(
            reason(
                "devices/a/register",
                r#"{"type":"s","telemetry_interval":"soon"}"#
            ),
            Reason::WrongType
        );
        assert_eq!(
            reason("devices/a/register", r#"{"type":"a b"}"#),
            Reason::Invalid
        );
        assert_eq!(
            reason(
                "devices/a/register",
                r#"{"type":"s","update_status":"done"}"#
            ),
            Reason::Invalid
        );
        assert_eq!(
            reason("devices/a/register", r#"{"id":"b","type":"s"}"#),
            Reason::IdMismatch
        );
        assert_eq!(
            reason("devices/a/telemetry", r#"{"id":"b","t":1}"#),
            Reason::IdMismatch
        );
        assert_eq!(
            reason("devices/a/telemetry", r#"{"battery":"full"}"#),
            Reason::WrongType
        );
        assert_eq!(reason("devices/a/telemetry", r#""hot""#), Reason::WrongType);
        assert_eq!(
            reason("devices/a/heartbeat", r#"{"signal":"weak"}"#),
            Reason::WrongType
        );
        assert_eq!(
            reason("devices/a/events", r#"{"severity":"x"}"#),
            Reason::Invalid
        );
        assert_eq!(
            reason("devices/a/events", r#"{"type":"alert","severity":"doom"}"#),
            Reason::Invalid
        );
        assert_eq!(reason("devices/a/status", "maybe"), Reason::Invalid);
        assert_eq!(reason("devices/a/frobnicate", "{}"), Reason::UnknownTopic);
        assert_eq!(
            reason("devices/a/telemetry/extra", "{}"),
            Reason::UnknownTopic
        );
        assert_eq!(reason("devices/a", "{}"), Reason::UnknownTopic);
        assert_eq!(reason("devices/a b/telemetry", "{}"), Reason::InvalidId);
        assert_eq!(reason("devices//telemetry", "{}"), Reason::InvalidId);
        let big = format!("{{\"x\":\"{}\"}}", "y".repeat(MAX));
        assert_eq!(reason("devices/a/telemetry", &big), Reason::TooLarge);
        assert_eq!(
            parse("devices/a/telemetry", &[0xff, 0xfe], MAX)
                .unwrap_err()
                .reason(),
            Reason::MalformedJson
        );
    }

    #[test]
    fn the_error_goes_to_the_topic_device() {
        let e = p("devices/a/register", "{").unwrap_err();
        assert_eq!(e.device(), Some("a"));
        let e = p("devices//register", "{").unwrap_err();
        assert_eq!(e.device(), None);
        let e = p("devices/zz/nope", "{").unwrap_err();
        assert_eq!(e.device(), Some("zz"));
    }

    #[test]
    fn own_and_foreign_topics_are_ignored() {
        for t in [
            "devices/a/ack",
            "devices/a/error",
            "devices/a/update",
            "devices/a/command",
            "alerts/a",
            "edges/n/status",
            "$SYS/broker/uptime",
        ] {
            assert_eq!(p(t, "garbage").unwrap(), Inbound::Ignored, "{t}");
        }
    }

    #[test]
    fn telemetry_heartbeat_events_status() {
        let Inbound::Telemetry { telemetry, .. } =
            p("devices/a/telemetry", r#"{"temp":21.5,"battery":40}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!(telemetry.battery, Some(40));
        assert_eq!(telemetry.values["temp"], 21.5);
        assert!(matches!(
            p("devices/a/heartbeat", "").unwrap(),
            Inbound::Heartbeat { .. }
        ));
        let Inbound::Heartbeat { heartbeat, .. } =
            p("devices/a/heartbeat", r#"{"battery":9,"signal":-70}"#).unwrap()
        else {
            panic!()
        };
        assert_eq!((heartbeat.battery, heartbeat.signal), (Some(9), Some(-70)));
        let Inbound::Event { event, .. } = p(
            "devices/a/events",
            r#"{"type":"alert","name":"overheat","severity":"critical","message":"92C"}"#,
        )
        .unwrap() else {
            panic!()
        };
        let a = event.alert.unwrap();
        assert_eq!((a.name.as_str(), a.active), ("overheat", true));
        let Inbound::Event { event, .. } =
            p("devices/a/events", r#"{"type":"door_open"}"#).unwrap()
        else {
            panic!()
        };
        assert!(event.alert.is_none());
        for (payload, online) in [
            ("offline", false),
            ("\"online\"", true),
            (r#"{"status":"offline"}"#, false),
        ] {
            assert_eq!(
                p("devices/a/status", payload).unwrap(),
                Inbound::Status {
                    device: "a".into(),
                    online
                }
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        let topics = [
            "devices/a/register",
            "devices/a/telemetry",
            "devices/a/heartbeat",
            "devices/a/events",
            "devices/a/status",
        ];
        for i in 0..20_000 {
            let len = rng.usize(0..64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if i % 2 == 0 {
                // Mostly-JSON inputs reach deeper.
                bytes = format!(
                    "{{\"type\":\"alert\",\"id\":\"a\",\"battery\":{},\"x\":{:?}}}",
                    rng.i32(-5..300),
                    String::from_utf8_lossy(&bytes)
                )
                .into_bytes();
            }
            let _ = parse(topics[i % topics.len()], &bytes, MAX);
        }
    }

    #[test]
    fn update_status_reports() {
        let Inbound::UpdateStatus { device, report } = p(
            "devices/a/update/status",
            r#"{"status":"downloading","progress":40,"rollout":"r1"}"#,
        )
        .unwrap() else {
            panic!("not an update status")
        };
        assert_eq!(device, "a");
        assert_eq!(report.status, "downloading");
        assert_eq!(report.progress, Some(40));
        assert_eq!(report.rollout.as_deref(), Some("r1"));
        let e = p("devices/a/update/status", r#"{"status":"done"}"#).unwrap_err();
        assert_eq!(e.reason(), Reason::Invalid);
        let e = p(
            "devices/a/update/status",
            r#"{"status":"failed","progress":101}"#,
        )
        .unwrap_err();
        assert_eq!(e.reason(), Reason::Invalid);
        let e = p("devices/a/update/status", r#"{"status":"failed","id":"b"}"#).unwrap_err();
        assert_eq!(e.reason(), Reason::IdMismatch);
        let e = p(
            "devices/a/update/status",
            r#"{"status":"failed","bogus":1}"#,
        )
        .unwrap_err();
        assert_eq!(e.reason(), Reason::WrongType);
    }
}
