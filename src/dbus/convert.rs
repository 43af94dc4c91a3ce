//! JSON <-> D-Bus values.
//!
//! Records travel over D-Bus as `a{sv}` dictionaries built from the same
//! JSON the HTTP API returns, so both APIs show the same fields and a field
//! added to a record (say by the MQTT device schema) appears on D-Bus
//! without an interface change. D-Bus has no null: null fields are left
//! out. Arrays of strings become `as` (tags), any other array `av`.

use std::collections::HashMap;

use serde_json::{Map, Number, Value as Json};
use zbus::zvariant::{OwnedValue, Value};

/// An `a{sv}` dictionary as zbus (de)serializes it.
pub type Dict = HashMap<String, OwnedValue>;

/// Converts one JSON value; `None` for null.
pub fn to_value(j: &Json) -> Option<Value<'static>> {
    Some(match j {
        Json::Null => return None,
        Json::Bool(b) => Value::from(*b),
        Json::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Value::from(u),
            (None, Some(i)) => Value::from(i),
            // as_f64 is always Some without serde_json's arbitrary_precision.
            (None, None) => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::from(s.clone()),
        Json::Array(items) => {
            if items.iter().all(Json::is_string) {
                let strings: Vec<String> = items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect();
                Value::from(strings)
            } else {
                let values: Vec<Value<'static>> = items.iter().filter_map(to_value).collect();
                Value::from(values)
            }
        }
        Json::Object(map) => {
            let dict: HashMap<String, Value<'static>> = map
                .iter()
                .filter_map(|(k, v)| to_value(v).map(|v| (k.clone(), v)))
                .collect();
            Value::from(dict)
        }
    })
}

/// A JSON object as `a{sv}`; a non-object lands under the key `value`.
pub fn to_dict(j: &Json) -> Dict {
    let mut out = Dict::new();
    match j {
        Json::Object(map) => {
            for (k, v) in map {
                if let Some(v) = to_value(v).and_then(|v| OwnedValue::try_from(v).ok()) {
                    out.insert(k.clone(), v);
                }
            }
        }
        other => {
            if let Some(v) = to_value(other).and_then(|v| OwnedValue::try_from(v).ok()) {
                out.insert("value".into(), v);
            }
        }
    }
    out
}

/// Converts a D-Bus value to JSON. Variants unwrap; dictionary keys become
/// strings; structures become arrays; file descriptors become null (none of
/// our interfaces take or return one).
pub fn to_json(v: &Value<'_>) -> Json {
    match v {
        Value::U8(n) => Json::from(*n),
        Value::Bool(b) => Json::Bool(*b),
        Value::I16(n) => Json::from(*n),
        Value::U16(n) => Json::from(*n),
        Value::I32(n) => Json::from(*n),
        Value::U32(n) => Json::from(*n),
        Value::I64(n) => Json::from(*n),
        Value::U64(n) => Json::from(*n),
        Value::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Str(s) => Json::String(s.as_str().to_owned()),
        Value::Signature(s) => Json::String(s.to_string()),
        Value::ObjectPath(p) => Json::String(p.as_str().to_owned()),
        Value::Value(inner) => to_json(inner),
        Value::Array(a) => Json::Array(a.inner().iter().map(to_json).collect()),
        Value::Dict(d) => {
            let mut map = Map::new();
            for (k, v) in d.iter() {
                let key = match to_json(k) {
                    Json::String(s) => s,
                    other => other.to_string(),
                };
                map.insert(key, to_json(v));
            }
            Json::Object(map)
        }
        Value::Structure(s) => Json::Array(s.fields().iter().map(to_json).collect()),
        #[cfg(unix)]
        Value::Fd(_) => Json::Null,
    }
}

/// An `a{sv}` dictionary as a JSON object.
pub fn dict_to_json(d: &Dict) -> Json {
    let mut map = Map::new();
    for (k, v) in d {
        map.insert(k.clone(), to_json(v));
    }
    Json::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_what_records_hold() {
        let j = json!({
            "name": "web", "port": 8080, "tags": ["a", "b"], "meta": {"zone": "x"},
            "neg": -3, "ratio": 0.5, "ok": true, "mixed": [1, "a"], "gone": null,
            "empty": []
        });
        let d = to_dict(&j);
        assert!(!d.contains_key("gone"), "null fields are left out");
        let back = dict_to_json(&d);
        let mut want = j.clone();
        want.as_object_mut().unwrap().remove("gone");
        assert_eq!(back, want);
        assert_eq!(to_value(&json!(["a"])).unwrap().value_signature(), "as");
        assert_eq!(to_value(&json!([1, "a"])).unwrap().value_signature(), "av");
        assert_eq!(
            to_value(&json!({"a": 1})).unwrap().value_signature(),
            "a{sv}"
        );
    }
}
