//! Sparkplug B payloads: the prost types generated from Eclipse Tahu's
//! `sparkplug_b.proto` stay in here; the node speaks [`Value`] and
//! [`Metric`]. Only the scalar datatypes are produced (a device's JSON
//! gives numbers, booleans and strings); commands may carry any scalar.
//!
//! Numbers: a JSON integer becomes `Int64` (`UInt64` above `i64::MAX`), any
//! other number `Double`, so a reading's type follows what the device
//! sends; the node re-births a device whose field changes type.

use prost::Message as _;

use super::SparkplugError;

#[allow(clippy::all, dead_code)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/org.eclipse.tahu.protobuf.rs"));
}

/// What the node never reads or writes (templates, data sets, property
/// sets, metadata): decoded as nothing, its fields skipped (`build.rs`).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Opaque {}

use pb::payload::metric::Value as PbValue;
use pb::DataType;

/// The longest metric name taken from a telemetry field.
pub(crate) const MAX_NAME_LEN: usize = 128;
/// Commands larger than this are refused unread.
pub(crate) const MAX_COMMAND_BYTES: usize = 64 << 10;
/// Metrics one command may carry.
const MAX_COMMAND_METRICS: usize = 256;

/// A scalar metric value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Int(i64),
    UInt(u64),
    Double(f64),
    Bool(bool),
    Text(String),
}

impl Value {
    /// A telemetry field's value; `None` for null, arrays and objects.
    pub(crate) fn from_json(v: &serde_json::Value) -> Option<Value> {
        match v {
            serde_json::Value::Bool(b) => Some(Value::Bool(*b)),
            serde_json::Value::String(s) => Some(Value::Text(s.clone())),
            serde_json::Value::Number(n) => Some(if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Double(n.as_f64()?)
            }),
            _ => None,
        }
    }

    /// As the device's command JSON carries it.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Int(i) => (*i).into(),
            Value::UInt(u) => (*u).into(),
            Value::Double(d) => {
                serde_json::Number::from_f64(*d).map_or(serde_json::Value::Null, Into::into)
            }
            Value::Bool(b) => (*b).into(),
            Value::Text(s) => s.clone().into(),
        }
    }

    fn datatype(&self) -> DataType {
        match self {
            Value::Int(_) => DataType::Int64,
            Value::UInt(_) => DataType::UInt64,
            Value::Double(_) => DataType::Double,
            Value::Bool(_) => DataType::Boolean,
            Value::Text(_) => DataType::String,
        }
    }

    /// Same Sparkplug datatype (a birth fixes it).
    pub(crate) fn same_type(&self, other: &Value) -> bool {
        self.datatype() == other.datatype()
    }

    fn to_pb(&self) -> PbValue {
        match self {
            // Sparkplug carries signed integers two's-complement in the
            // unsigned field.
            Value::Int(i) => PbValue::LongValue(*i as u64),
            Value::UInt(u) => PbValue::LongValue(*u),
            Value::Double(d) => PbValue::DoubleValue(*d),
            Value::Bool(b) => PbValue::BooleanValue(*b),
            Value::Text(s) => PbValue::StringValue(s.clone()),
        }
    }
}

/// One metric to publish. Births carry the name, the alias and the
/// datatype; data after a birth carries only the alias.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Metric<'a> {
    pub(crate) name: Option<&'a str>,
    pub(crate) alias: Option<u64>,
    pub(crate) value: &'a Value,
    /// Only births need it; data repeats what its birth said.
    pub(crate) with_type: bool,
    pub(crate) historical: bool,
    /// The metric's own time (historical points: when it was received).
    pub(crate) timestamp: Option<u64>,
}

/// Encodes a payload. `seq` is absent only in NDEATH.
pub(crate) fn encode(timestamp: u64, seq: Option<u8>, metrics: &[Metric<'_>]) -> Vec<u8> {
    let p = pb::Payload {
        timestamp: Some(timestamp),
        seq: seq.map(u64::from),
        metrics: metrics
            .iter()
            .map(|m| pb::payload::Metric {
                name: m.name.map(str::to_owned),
                alias: m.alias,
                timestamp: m.timestamp,
                datatype: m.with_type.then(|| m.value.datatype() as u32),
                is_historical: m.historical.then_some(true),
                value: Some(m.value.to_pb()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    p.encode_to_vec()
}

/// A metric of a command: by name, or by the alias its birth gave it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Command {
    pub(crate) name: Option<String>,
    pub(crate) alias: Option<u64>,
    pub(crate) value: Value,
}

/// Decodes an NCMD or DCMD. Anything that is not a bounded list of named
/// or aliased scalar metrics is refused whole: a half-read command changes
/// nothing.
pub(crate) fn decode_command(topic: &str, bytes: &[u8]) -> Result<Vec<Command>, SparkplugError> {
    let bad = |message: String| SparkplugError::Command {
        topic: topic.to_owned(),
        message,
    };
    if bytes.len() > MAX_COMMAND_BYTES {
        return Err(bad(format!(
            "{} bytes (at most {MAX_COMMAND_BYTES})",
            bytes.len()
        )));
    }
    let p =
        pb::Payload::decode(bytes).map_err(|e| bad(format!("not a Sparkplug B payload: {e}")))?;
    if p.metrics.is_empty() || p.metrics.len() > MAX_COMMAND_METRICS {
        return Err(bad(format!(
            "{} metrics (1 to {MAX_COMMAND_METRICS})",
            p.metrics.len()
        )));
    }
    let mut out = Vec::with_capacity(p.metrics.len());
    for m in p.metrics {
        if m.name.is_none() && m.alias.is_none() {
            return Err(bad("a metric with neither name nor alias".into()));
        }
        let datatype = m.datatype.and_then(|d| DataType::try_from(d as i32).ok());
        let value = match (m.value, datatype) {
            (Some(PbValue::BooleanValue(b)), _) => Value::Bool(b),
            (Some(PbValue::StringValue(s)), _) => Value::Text(s),
            (Some(PbValue::DoubleValue(d)), _) => Value::Double(d),
            (Some(PbValue::FloatValue(f)), _) => Value::Double(f64::from(f)),
            (
                Some(PbValue::IntValue(i)),
                Some(DataType::Int8 | DataType::Int16 | DataType::Int32),
            ) => Value::Int(i64::from(i as i32)),
            (Some(PbValue::IntValue(i)), _) => Value::Int(i64::from(i)),
            (Some(PbValue::LongValue(l)), Some(DataType::UInt64)) => Value::UInt(l),
            (Some(PbValue::LongValue(l)), _) => Value::Int(l as i64),
            _ => {
                return Err(bad(format!(
                    "metric {}: no scalar value",
                    m.name.as_deref().unwrap_or("(alias)")
                )))
            }
        };
        if let Some(n) = &m.name {
            if !name_ok(n) {
                return Err(bad(format!(
                    "metric name `{}` is not valid",
                    n.escape_debug()
                )));
            }
        }
        out.push(Command {
            name: m.name,
            alias: m.alias,
            value,
        });
    }
    Ok(out)
}

/// A metric name: 1-128 characters, no control characters, no empty
/// folder (`a//b`, a leading or trailing `/`).
pub(crate) fn name_ok(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len())
        && !name.chars().any(char::is_control)
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.contains("//")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_round_trips_and_garbage_is_refused() {
        let v = Value::Bool(true);
        let bytes = encode(
            1,
            None,
            &[Metric {
                name: Some("Node Control/Rebirth"),
                alias: None,
                value: &v,
                with_type: true,
                historical: false,
                timestamp: None,
            }],
        );
        let c = decode_command("t", &bytes).unwrap();
        assert_eq!(c[0].name.as_deref(), Some("Node Control/Rebirth"));
        assert_eq!(c[0].value, Value::Bool(true));
        assert!(decode_command("t", b"\xff\xff\xff").is_err());
        assert!(decode_command("t", &encode(1, Some(0), &[])).is_err());
        assert!(decode_command("t", &vec![0; MAX_COMMAND_BYTES + 1]).is_err());
    }

    #[test]
    fn metric_names() {
        assert!(name_ok("temperature"));
        assert!(name_ok("Properties/type"));
        assert!(!name_ok(""));
        assert!(!name_ok("a//b"));
        assert!(!name_ok("/a"));
        assert!(!name_ok("a\nb"));
        assert!(!name_ok(&"x".repeat(MAX_NAME_LEN + 1)));
    }

    #[test]
    fn json_numbers_keep_their_kind() {
        assert_eq!(Value::from_json(&serde_json::json!(3)), Some(Value::Int(3)));
        assert_eq!(
            Value::from_json(&serde_json::json!(2.5)),
            Some(Value::Double(2.5))
        );
        assert_eq!(
            Value::from_json(&serde_json::json!(u64::MAX)),
            Some(Value::UInt(u64::MAX))
        );
        assert_eq!(Value::from_json(&serde_json::json!([1])), None);
    }
}
