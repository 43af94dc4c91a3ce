//! Loading: the main file, its `config.d/*.yaml` drop-ins and `KONSUL_*`
//! variables, each checked on its own, then deep-merged in that order.

use std::path::{Path, PathBuf};

use serde_norway::Value;

use super::budget::Named;
use super::{guard, Config, ConfigError, Sources};

/// Environment variables the seed documents, mapped to their keys. Every
/// other `KONSUL_SECTION_KEY` is derived from the section and key names.
const ENV_ALIASES: &[(&str, &str)] = &[
    ("KONSUL_CLOUD_ADDRESS", "cloud.server_address"),
    ("KONSUL_LOG", "log_level"),
];

/// Variables that are not configuration keys (tests, tooling).
const ENV_NOT_CONFIG: &[&str] = &["KONSUL_TEST_HOOKS", "KONSUL_CONFIG"];

const SECTIONS: &[&str] = &[
    "resources",
    "cloud",
    "storage",
    "mqtt",
    "services",
    "sync",
    "http",
    "devices",
    "dbus",
    "acl",
    "ota",
    "firmware",
];

impl Config {
    /// Loads `path`, then `<dir of path>/config.d/*.yaml`, then the
    /// environment, and validates the result.
    pub fn load(path: &Path) -> Result<(Config, Sources), ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, Sources), ConfigError> {
        let mut sources = Sources::default();
        let mut merged = Value::Mapping(Default::default());
        for file in std::iter::once(path.to_path_buf()).chain(drop_ins(path)?) {
            let text = guard::read(&file)?;
            let layer = parse_layer(&text, &file.display().to_string())?;
            merge(&mut merged, layer);
            sources.files.push(file);
        }
        let mut env: Vec<(String, String)> = env.into_iter().collect();
        // Sorted, so two variables naming one key resolve the same way on
        // every boot (the later name wins).
        env.sort();
        for (name, value) in env {
            if !name.starts_with("KONSUL_") || ENV_NOT_CONFIG.contains(&name.as_str()) {
                continue;
            }
            let Some(key) = env_key(&name) else {
                sources.ignored_env.push(name);
                continue;
            };
            let origin = format!("environment {name}");
            let layer = env_layer(&key, &value);
            check_layer(layer.clone(), &origin)?;
            merge(&mut merged, layer);
            sources.env.push(name);
        }
        let named = Named::from_tree(&merged);
        let mut config: Config =
            serde_norway::from_value(merged).map_err(|e| ConfigError::Parse {
                origin: "merged configuration".into(),
                message: e.to_string(),
            })?;
        config.split_storage(named);
        config.validate()?;
        Ok((config, sources))
    }

    /// Parses one document on its own (no drop-ins, no environment).
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let layer = parse_layer(text, origin)?;
        let named = Named::from_tree(&layer);
        let mut config: Config =
            serde_norway::from_value(layer).map_err(|e| ConfigError::Parse {
                origin: origin.into(),
                message: e.to_string(),
            })?;
        config.split_storage(named);
        config.validate()?;
        Ok(config)
    }
}

/// More drop-ins than any image needs; each is capped in size, so this
/// bounds what one load reads.
const MAX_DROP_INS: usize = 64;

fn drop_ins(main: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let dir = main
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("config.d");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ConfigError::Read { path: dir, source }),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| ConfigError::Read {
            path: dir.clone(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    if files.len() > MAX_DROP_INS {
        return Err(ConfigError::Refused {
            path: dir,
            message: format!("{} drop-ins; at most {MAX_DROP_INS} are read", files.len()),
        });
    }
    files.sort();
    Ok(files)
}

/// Parses one layer and checks it against the schema on its own, so that
/// errors carry this file's line numbers (a merged tree has none).
fn parse_layer(text: &str, origin: &str) -> Result<Value, ConfigError> {
    let parse_err = |e: serde_norway::Error| ConfigError::Parse {
        origin: origin.into(),
        message: e.to_string(),
    };
    guard::check_nesting(text).map_err(|message| ConfigError::Parse {
        origin: origin.into(),
        message,
    })?;
    let value: Value = serde_norway::from_str(text).map_err(parse_err)?;
    let value = match value {
        // An empty file is what a power cut during a write leaves;
        // running on defaults then would hide it.
        Value::Null => {
            return Err(ConfigError::Parse {
                origin: origin.into(),
                message: "has no settings (the file is empty or all comments); \
                          `konsul-edge init -o -` prints a complete config"
                    .into(),
            })
        }
        Value::Mapping(_) => value,
        _ => {
            return Err(ConfigError::Parse {
                origin: origin.into(),
                message: "the top level must be a mapping of sections".into(),
            })
        }
    };
    let de = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::Parse {
            origin: origin.into(),
            message: with_path(&path, &e.into_inner().to_string()),
        }
    })?;
    Ok(value)
}

/// `mqtt.qos: <message>`, without the partial path serde_norway itself
/// sometimes puts in front of the message (`mqtt: ...`).
fn with_path(path: &str, message: &str) -> String {
    if path == "." || path.is_empty() {
        return message.to_owned();
    }
    let mut msg = message;
    let parts: Vec<&str> = path.split('.').collect();
    for n in (1..=parts.len()).rev() {
        let prefix = format!("{}: ", parts[..n].join("."));
        if let Some(rest) = msg.strip_prefix(&prefix) {
            msg = rest;
            break;
        }
    }
    format!("{path}: {msg}")
}

fn check_layer(layer: Value, origin: &str) -> Result<(), ConfigError> {
    serde_path_to_error::deserialize::<_, Config>(layer)
        .map(|_| ())
        .map_err(|e| {
            let path = e.path().to_string();
            ConfigError::Parse {
                origin: origin.into(),
                message: with_path(&path, &e.into_inner().to_string()),
            }
        })
}

/// `KONSUL_MQTT_ENABLED` -> `mqtt.enabled`; `KONSUL_MODE` -> `mode`.
fn env_key(name: &str) -> Option<String> {
    if let Some((_, key)) = ENV_ALIASES.iter().find(|(n, _)| *n == name) {
        return Some((*key).into());
    }
    let rest = name.strip_prefix("KONSUL_")?.to_ascii_lowercase();
    if ["mode", "node_id", "log_level"].contains(&rest.as_str()) {
        return Some(rest);
    }
    SECTIONS.iter().find_map(|s| {
        rest.strip_prefix(s)
            .and_then(|k| k.strip_prefix('_'))
            .filter(|k| !k.is_empty())
            .map(|k| format!("{s}.{k}"))
    })
}

fn env_layer(key: &str, raw: &str) -> Value {
    // A YAML scalar, so `true`, `1` and `300s` mean what they mean in a file;
    // anything that does not parse as a scalar is taken as a plain string.
    // Nesting is refused unparsed: a scalar never nests, and parsing deep
    // nesting is slow.
    let parsed = match guard::check_nesting(raw) {
        Ok(()) => serde_norway::from_str::<Value>(raw).ok(),
        Err(_) => None,
    };
    let scalar = match parsed {
        Some(v @ (Value::Bool(_) | Value::Number(_) | Value::String(_))) => v,
        _ => Value::String(raw.into()),
    };
    key.rsplit('.').fold(scalar, |inner, part| {
        let mut m = serde_norway::Mapping::new();
        m.insert(Value::String(part.into()), inner);
        Value::Mapping(m)
    })
}

fn merge(base: &mut Value, layer: Value) {
    match (base, layer) {
        (Value::Mapping(b), Value::Mapping(l)) => {
            for (k, v) in l {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, l) => *b = l,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_map_to_keys() {
        assert_eq!(env_key("KONSUL_MODE").as_deref(), Some("mode"));
        assert_eq!(
            env_key("KONSUL_CLOUD_ADDRESS").as_deref(),
            Some("cloud.server_address")
        );
        assert_eq!(
            env_key("KONSUL_MQTT_ENABLED").as_deref(),
            Some("mqtt.enabled")
        );
        assert_eq!(
            env_key("KONSUL_SERVICES_MAX_LOCAL_SERVICES").as_deref(),
            Some("services.max_local_services")
        );
        assert_eq!(env_key("KONSUL_NONSENSE"), None);
    }

    #[test]
    fn merge_is_deep() {
        let mut a: Value = serde_norway::from_str("mqtt: {enabled: true, qos: 1}").unwrap();
        let b: Value = serde_norway::from_str("mqtt: {qos: 2}").unwrap();
        merge(&mut a, b);
        let c: Config = serde_norway::from_value(a).unwrap();
        assert!(c.mqtt.enabled);
        assert_eq!(c.mqtt.qos, 2);
    }
}
