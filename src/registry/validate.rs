//! Konsul's validation rules for services and keys.

use super::*;

fn validate_ident(field: &'static str, s: &str) -> Result<(), RegistryError> {
    if s.is_empty() {
        return Err(invalid(field, "is required"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(invalid(
            field,
            format!("{} chars (max {MAX_NAME_LEN})", s.len()),
        ));
    }
    if s.chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '/' || c == '?' || c == '#')
    {
        return Err(invalid(
            field,
            format!(
                "`{}` contains whitespace, a control character, / ? or #",
                s.escape_debug()
            ),
        ));
    }
    Ok(())
}

pub(super) fn validate_key(key: &str) -> Result<(), RegistryError> {
    if key.is_empty() {
        return Err(invalid("key", "is required"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(invalid(
            "key",
            format!("{} bytes (max {MAX_KEY_LEN})", key.len()),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(invalid("key", "contains a control character"));
    }
    Ok(())
}

/// Konsul's rules, plus the edge's id and ttl. Returns the service and its
/// TTL in milliseconds.
pub fn validate_service(
    input: ServiceInput,
    default_ttl_ms: u64,
) -> Result<(Service, Option<u64>), RegistryError> {
    validate_ident("name", &input.name)?;
    let id = input.id.unwrap_or_else(|| input.name.clone());
    validate_ident("id", &id)?;
    if input.address.is_empty() {
        return Err(invalid("address", "is required"));
    }
    if input.address.len() > MAX_NAME_LEN
        || input
            .address
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(invalid(
            "address",
            format!(
                "`{}` is not a host name or address",
                input.address.escape_debug()
            ),
        ));
    }
    if input.port == 0 {
        return Err(invalid("port", "is required"));
    }
    let port = u16::try_from(input.port)
        .ok()
        .filter(|p| *p >= 1)
        .ok_or_else(|| invalid("port", format!("{} is not between 1 and 65535", input.port)))?;
    if input.tags.len() > MAX_TAGS {
        return Err(invalid(
            "tags",
            format!("{} tags (max {MAX_TAGS})", input.tags.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for tag in &input.tags {
        if tag.is_empty() {
            return Err(invalid("tags", "empty tag not allowed"));
        }
        if tag.len() > MAX_TAG_LEN {
            return Err(invalid(
                "tags",
                format!("tag of {} chars (max {MAX_TAG_LEN})", tag.len()),
            ));
        }
        if !tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_:./".contains(c))
        {
            return Err(invalid(
                "tags",
                format!(
                    "`{}`: allowed are A-Z a-z 0-9 - _ : . /",
                    tag.escape_debug()
                ),
            ));
        }
        if !seen.insert(tag) {
            return Err(invalid("tags", format!("duplicate tag `{tag}`")));
        }
    }
    if input.meta.len() > MAX_META_KEYS {
        return Err(invalid(
            "meta",
            format!("{} keys (max {MAX_META_KEYS})", input.meta.len()),
        ));
    }
    for (k, v) in &input.meta {
        if k.is_empty() {
            return Err(invalid("meta", "empty key not allowed"));
        }
        if k.len() > MAX_META_KEY_LEN {
            return Err(invalid(
                "meta",
                format!("key of {} chars (max {MAX_META_KEY_LEN})", k.len()),
            ));
        }
        if !k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "meta",
                format!("key `{}`: allowed are A-Z a-z 0-9 - _", k.escape_debug()),
            ));
        }
        if RESERVED_META_PREFIXES.iter().any(|p| k.starts_with(p)) {
            return Err(invalid(
                "meta",
                format!("key `{k}` uses a reserved prefix (konsul_, _)"),
            ));
        }
        if v.len() > MAX_META_VALUE_LEN {
            return Err(invalid(
                "meta",
                format!(
                    "value of `{k}`: {} chars (max {MAX_META_VALUE_LEN})",
                    v.len()
                ),
            ));
        }
    }
    if input.checks.len() > MAX_CHECKS {
        return Err(invalid(
            "checks",
            format!("{} checks (max {MAX_CHECKS})", input.checks.len()),
        ));
    }
    if input.checks.iter().any(|c| !c.is_object()) {
        return Err(invalid("checks", "each check must be an object"));
    }
    let ttl_ms = match &input.ttl {
        Some(t) => {
            let d: crate::config::Duration = t.parse().map_err(|e: String| invalid("ttl", e))?;
            let ms = d.0.as_millis() as u64;
            if !(1_000..=86_400_000).contains(&ms) {
                return Err(invalid("ttl", format!("`{t}` is outside 1s-24h")));
            }
            Some(ms)
        }
        None => (default_ttl_ms > 0).then_some(default_ttl_ms),
    };
    let service = Service {
        id,
        name: input.name,
        address: input.address,
        port,
        tags: input.tags,
        meta: input.meta,
        checks: input.checks,
        ttl: input.ttl,
    };
    Ok((service, ttl_ms))
}
