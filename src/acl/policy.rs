//! Konsul's ACL policy format, read unchanged: a named policy of rules
//! over the resources `kv`, `service`, `health`, `backup` and `admin`, plus
//! our `edge` resource for the node's own routes (OTA, firmware, rollouts,
//! sync control, debug, devices).
//!
//! Evaluation follows Konsul's documented order: an explicit `deny` in any
//! matching rule of any policy wins; otherwise any matching rule that lists
//! the capability allows; otherwise deny. (Konsul's evaluator returns at the
//! first matching rule, which lets rule order undo a deny; its docs promise
//! "explicit deny wins", and a security rule should not depend on order.)
//!
//! Globs: in `kv` and `edge` paths `*` matches within one segment and `**`
//! across segments; a lone `*` matches every key, as Konsul's docs use it in
//! their admin policy. In service names `*` matches anything.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    Read,
    Write,
    List,
    Delete,
    Deny,
    Register,
    Deregister,
    Create,
    Restore,
    Export,
    Import,
    Admin,
}

impl Capability {
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Read => "read",
            Capability::Write => "write",
            Capability::List => "list",
            Capability::Delete => "delete",
            Capability::Deny => "deny",
            Capability::Register => "register",
            Capability::Deregister => "deregister",
            Capability::Create => "create",
            Capability::Restore => "restore",
            Capability::Export => "export",
            Capability::Import => "import",
            Capability::Admin => "admin",
        }
    }
}

/// What a request touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Kv(String),
    Service(String),
    Health,
    Backup,
    Admin,
    /// The edge's own routes: `ota`, `firmware/<id>`, `rollouts/<id>`,
    /// `sync`, `debug`, `devices/<id>`, `alerts`, `telemetry/<id>`,
    /// `status`, `edges`, `conflicts`.
    Edge(String),
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Kv(_) => "kv",
            Resource::Service(_) => "service",
            Resource::Health => "health",
            Resource::Backup => "backup",
            Resource::Admin => "admin",
            Resource::Edge(_) => "edge",
        }
    }

    pub fn path(&self) -> &str {
        match self {
            Resource::Kv(p) | Resource::Service(p) | Resource::Edge(p) => p,
            _ => "",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRule {
    pub path: String,
    pub capabilities: Vec<Capability>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameRule {
    pub name: String,
    pub capabilities: Vec<Capability>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobalRule {
    pub capabilities: Vec<Capability>,
}

/// One Konsul policy document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    /// Konsul's policy files carry one; read so they load unchanged.
    #[serde(default)]
    #[allow(dead_code)]
    pub description: String,
    #[serde(default)]
    pub kv: Vec<PathRule>,
    #[serde(default)]
    pub service: Vec<NameRule>,
    #[serde(default)]
    pub health: Vec<GlobalRule>,
    #[serde(default)]
    pub backup: Vec<GlobalRule>,
    #[serde(default)]
    pub admin: Vec<GlobalRule>,
    #[serde(default)]
    pub edge: Vec<PathRule>,
}

/// The verdict of one policy on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    NoMatch,
    Allow,
    Deny,
}

impl Policy {
    /// Parses and checks one policy document.
    pub fn from_json(text: &str) -> Result<Policy, String> {
        let p: Policy = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if p.name.is_empty() {
            return Err("a policy needs a non-empty \"name\"".into());
        }
        Ok(p)
    }

    fn verdict(&self, resource: &Resource, cap: Capability) -> Verdict {
        let caps: Vec<&[Capability]> = match resource {
            Resource::Kv(key) => self
                .kv
                .iter()
                .filter(|r| path_glob(&r.path, key))
                .map(|r| r.capabilities.as_slice())
                .collect(),
            Resource::Edge(path) => self
                .edge
                .iter()
                .filter(|r| path_glob(&r.path, path))
                .map(|r| r.capabilities.as_slice())
                .collect(),
            Resource::Service(name) => self
                .service
                .iter()
                .filter(|r| name_glob(&r.name, name))
                .map(|r| r.capabilities.as_slice())
                .collect(),
            Resource::Health => self
                .health
                .iter()
                .map(|r| r.capabilities.as_slice())
                .collect(),
            Resource::Backup => self
                .backup
                .iter()
                .map(|r| r.capabilities.as_slice())
                .collect(),
            Resource::Admin => self
                .admin
                .iter()
                .map(|r| r.capabilities.as_slice())
                .collect(),
        };
        if caps.iter().any(|c| c.contains(&Capability::Deny)) {
            Verdict::Deny
        } else if caps.iter().any(|c| c.contains(&cap)) {
            Verdict::Allow
        } else {
            Verdict::NoMatch
        }
    }
}

/// Deny by default; an explicit deny in any policy wins over any allow.
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    resource: &Resource,
    cap: Capability,
) -> bool {
    let mut allowed = false;
    for p in policies {
        match p.verdict(resource, cap) {
            Verdict::Deny => return false,
            Verdict::Allow => allowed = true,
            Verdict::NoMatch => {}
        }
    }
    allowed
}

/// `*` within one segment, `**` across segments, a lone `*` everything.
fn path_glob(pattern: &str, path: &str) -> bool {
    if pattern == "*" || pattern == "**" {
        return true;
    }
    glob(pattern.as_bytes(), path.as_bytes(), true)
}

/// `*` matches anything, `/` included.
fn name_glob(pattern: &str, name: &str) -> bool {
    glob(pattern.as_bytes(), name.as_bytes(), false)
}

fn glob(p: &[u8], s: &[u8], segments: bool) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') => {
            let double = p.get(1) == Some(&b'*');
            let rest = if double { &p[2..] } else { &p[1..] };
            let crosses = double || !segments;
            // Try every split point; patterns are short and hand-written.
            for i in 0..=s.len() {
                if glob(rest, &s[i..], segments) {
                    return true;
                }
                if i < s.len() && s[i] == b'/' && !crosses {
                    return false;
                }
            }
            false
        }
        Some(&c) => s.first() == Some(&c) && glob(&p[1..], &s[1..], segments),
    }
}

fn rules(caps: &[Capability]) -> Vec<GlobalRule> {
    vec![GlobalRule {
        capabilities: caps.to_vec(),
    }]
}

fn path(path: &str, caps: &[Capability]) -> PathRule {
    PathRule {
        path: path.into(),
        capabilities: caps.to_vec(),
    }
}

/// The built-in policies, named `builtin:*` so that Konsul's own policy
/// files (its docs name one `admin`) load beside them unchanged.
pub fn builtin() -> Vec<Policy> {
    use Capability::*;
    let every = [
        Read, Write, List, Delete, Register, Deregister, Create, Restore, Export, Import, Admin,
    ];
    // What every local user may read. `sync` is in `status` anyway and
    // in D-Bus's Sync properties, which any bus peer reads.
    let edge_reads = vec![
        path("status", &[Read]),
        path("sync", &[Read]),
        path("services", &[Read, List]),
        path("devices/**", &[Read, List]),
        path("devices", &[Read, List]),
        path("alerts", &[Read, List]),
        path("telemetry/**", &[Read]),
        // Devices fetch their (signed) images from the edge.
        path("firmware/*", &[Read]),
    ];
    vec![
        Policy {
            name: "builtin:admin".into(),
            description: "everything, on every resource".into(),
            kv: vec![path("**", &every)],
            service: vec![NameRule {
                name: "*".into(),
                capabilities: every.to_vec(),
            }],
            health: rules(&every),
            backup: rules(&every),
            admin: rules(&every),
            edge: vec![path("**", &every)],
        },
        Policy {
            name: "builtin:anonymous".into(),
            description: "local apps: read the catalogue and KV, register new services, \
                          read devices, alerts and the sync state; nothing else"
                .into(),
            kv: vec![path("**", &[Read, List])],
            service: vec![NameRule {
                name: "*".into(),
                capabilities: vec![Read, List, Register],
            }],
            health: rules(&[Read]),
            backup: vec![],
            admin: rules(&[Read]),
            edge: edge_reads.clone(),
        },
        Policy {
            name: "builtin:open".into(),
            description: "ACLs off: every Konsul route, the edge's routes read-only".into(),
            kv: vec![path("**", &[Read, Write, List, Delete])],
            service: vec![NameRule {
                name: "*".into(),
                capabilities: vec![Read, Write, List, Register, Deregister],
            }],
            health: rules(&[Read, Write]),
            backup: vec![],
            admin: rules(&[Read]),
            edge: edge_reads,
        },
        Policy {
            name: "builtin:probe".into(),
            description: "health probes only".into(),
            kv: vec![],
            service: vec![],
            health: rules(&[Read]),
            backup: vec![],
            admin: vec![],
            edge: vec![],
        },
        Policy {
            name: "builtin:none".into(),
            description: "nothing at all".into(),
            kv: vec![],
            service: vec![],
            health: vec![],
            backup: vec![],
            admin: vec![],
            edge: vec![],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(path_glob("app/*", "app/db"));
        assert!(!path_glob("app/*", "app/db/x"));
        assert!(path_glob("app/**", "app/db/x"));
        assert!(path_glob("*", "a/b/c"));
        assert!(path_glob("app/config", "app/config"));
        assert!(!path_glob("app/config", "app/config2"));
        assert!(name_glob("web-*", "web-app"));
        assert!(name_glob("*-prod", "api-prod"));
        assert!(!name_glob("web-*", "api"));
    }

    /// The developer policy from Konsul's docs/acl.md, unchanged.
    const DEVELOPER: &str = r#"{
      "name": "developer",
      "kv": [
        { "path": "secrets/**", "capabilities": ["deny"] },
        { "path": "app/**", "capabilities": ["read", "write"] }
      ]
    }"#;

    #[test]
    fn explicit_deny_wins_whatever_the_order() {
        let dev = Policy::from_json(DEVELOPER).unwrap();
        let kv = |k: &str| Resource::Kv(k.into());
        assert!(evaluate([&dev], &kv("app/x"), Capability::Write));
        assert!(!evaluate([&dev], &kv("app/x"), Capability::Delete));
        assert!(!evaluate([&dev], &kv("secrets/a"), Capability::Read));
        let admin = builtin()
            .into_iter()
            .find(|p| p.name == "builtin:admin")
            .unwrap();
        // A deny in one policy beats an allow in another.
        assert!(!evaluate(
            [&admin, &dev],
            &kv("secrets/a"),
            Capability::Read
        ));
        assert!(evaluate([&admin], &kv("secrets/a"), Capability::Read));
    }

    #[test]
    fn unknown_capability_and_missing_name_are_refused() {
        assert!(
            Policy::from_json(r#"{"name":"x","kv":[{"path":"a","capabilities":["fly"]}]}"#)
                .is_err()
        );
        assert!(Policy::from_json(r#"{"kv":[]}"#).is_err());
    }
}
