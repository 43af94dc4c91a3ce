//! One access decision for every door.
//!
//! Each door says who is asking ([`Caller`]): a TCP peer with or without a
//! token, a local user known by uid (D-Bus, the Unix socket: the kernel
//! vouches for the uid, never the message), or the daemon itself (MQTT
//! bridge, sync). [`Acl::identify`] turns that into a [`Principal`] with a
//! set of Konsul policies, and [`Acl::decide`] is the one function every
//! door's request passes through.
//!
//! Who gets what:
//! - root, the daemon's own user and members of `acl.admin_group`:
//!   `builtin:admin`;
//! - other local users: what `acl.users`/`acl.groups` grant, else
//!   `acl.local_policy`;
//! - a token: its policies; a wrong token is refused (401), never demoted
//!   to anonymous, so a typo does not silently lose rights;
//! - anonymous TCP: `acl.anonymous_policy`, and never a write on the edge's
//!   own routes, whatever the policy says or whether ACLs are on. Loopback
//!   is not special: on a device every local user shares it.
//!
//! Policies and tokens are read at start and again on [`Acl::reload`]
//! (SIGHUP); a reload that fails keeps the old set. Token files must not be
//! readable or writable by others (like ssh keys), and tokens are compared
//! in constant time and never logged.

// Policy and token files are read at start-up and through `smol::unblock`
// (`Acl::reload`, `may_read`), never on the executor.
#![allow(clippy::disallowed_methods)]

mod policy;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use policy::{evaluate, Capability, Policy, Resource};

use crate::config;

#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("acl policy {path}: {message}")]
    Policy { path: PathBuf, message: String },
    #[error("acl.policy_dir {path}: {source}")]
    PolicyDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("acl token {name} ({path}): {message}")]
    Token {
        name: String,
        path: PathBuf,
        message: String,
    },
    #[error("acl: {what} names policy {policy}, which does not exist")]
    UnknownPolicy { what: String, policy: String },
}

/// Who is asking, as the door knows it.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A TCP peer; `token` from `X-API-Key` or `Authorization: Bearer`.
    Tcp { token: Option<String> },
    /// A local process whose uid the kernel or the bus daemon vouched for.
    Local { uid: u32 },
    /// The daemon's own actors (MQTT bridge, sync apply).
    Internal,
}

/// The outcome of identification: the name for logs and the policies.
#[derive(Debug, Clone)]
pub struct Principal {
    pub name: String,
    pub kind: PrincipalKind,
    policies: Vec<String>,
    /// For local callers: the uid and groups, so file access can be
    /// checked on their behalf.
    pub creds: Option<Creds>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    Anonymous,
    Token,
    Local,
    Internal,
}

#[derive(Debug, Clone)]
pub struct Creds {
    pub uid: u32,
    pub gids: Vec<u32>,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.policies.iter().any(|p| p == "builtin:admin")
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No valid credentials: a wrong or unknown token (HTTP 401).
    Unauthenticated,
    /// Valid credentials, not enough rights (HTTP 403).
    Forbidden {
        resource: &'static str,
        capability: &'static str,
        path: String,
    },
}

struct Token {
    name: String,
    secret: Vec<u8>,
    policies: Vec<String>,
}

struct State {
    enabled: bool,
    /// A hub with a sync token serves anonymous TCP its probes only, as it
    /// refused every other host without the token before ACLs existed.
    hub_locked: bool,
    policies: BTreeMap<String, Policy>,
    tokens: Vec<Token>,
    anonymous: String,
    local: String,
    admin_group: String,
    users: BTreeMap<String, Vec<String>>,
    groups: BTreeMap<String, Vec<String>>,
}

/// The loaded access rules; cheap to clone and share between doors.
#[derive(Clone)]
pub struct Acl {
    config: Arc<config::Acl>,
    /// Extra tokens granted `admin`: a hub's `sync.auth_token_file`.
    extra_admin_tokens: Arc<Vec<PathBuf>>,
    state: Arc<RwLock<Arc<State>>>,
    daemon_uid: u32,
}

impl Acl {
    pub fn load(config: &config::Acl, admin_token_files: Vec<PathBuf>) -> Result<Acl, AclError> {
        let state = build(config, &admin_token_files)?;
        Ok(Acl {
            config: Arc::new(config.clone()),
            extra_admin_tokens: Arc::new(admin_token_files),
            state: Arc::new(RwLock::new(Arc::new(state))),
            daemon_uid: nix::unistd::geteuid().as_raw(),
        })
    }

    /// Re-reads policies and tokens; on error the old set stays in force.
    pub fn reload(&self) -> Result<(), AclError> {
        let fresh = build(&self.config, &self.extra_admin_tokens)?;
        let count = fresh.policies.len();
        let tokens = fresh.tokens.len();
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        log::info!("acl reloaded: {count} policies, {tokens} tokens");
        Ok(())
    }

    fn state(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Who `caller` is. Local callers need user database lookups (NSS may
    /// block on LDAP/sssd): call this from a blocking thread, or through
    /// [`Acl::identify_async`].
    pub fn identify(&self, caller: &Caller) -> Result<Principal, Denial> {
        let st = self.state();
        match caller {
            Caller::Internal => Ok(Principal {
                name: "daemon".into(),
                kind: PrincipalKind::Internal,
                policies: vec!["builtin:admin".into()],
                creds: None,
            }),
            Caller::Tcp { token: Some(t) } => {
                let found = st
                    .tokens
                    .iter()
                    .find(|k| constant_time_eq(&k.secret, t.trim().as_bytes()));
                match found {
                    Some(k) => Ok(Principal {
                        name: format!("token:{}", k.name),
                        kind: PrincipalKind::Token,
                        policies: k.policies.clone(),
                        creds: None,
                    }),
                    None => Err(Denial::Unauthenticated),
                }
            }
            Caller::Tcp { token: None } => Ok(Principal {
                name: "anonymous".into(),
                kind: PrincipalKind::Anonymous,
                policies: vec![if st.hub_locked {
                    "builtin:probe".into()
                } else if st.enabled {
                    st.anonymous.clone()
                } else {
                    "builtin:open".into()
                }],
                creds: None,
            }),
            Caller::Local { uid } => Ok(self.local(&st, *uid)),
        }
    }

    pub async fn identify_async(&self, caller: Caller) -> Result<Principal, Denial> {
        match caller {
            Caller::Local { .. } => {
                let acl = self.clone();
                smol::unblock(move || acl.identify(&caller)).await
            }
            other => self.identify(&other),
        }
    }

    fn local(&self, st: &State, uid: u32) -> Principal {
        use nix::unistd::{getgrouplist, Gid, Group, Uid, User};
        let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
        let name = user
            .as_ref()
            .map(|u| u.name.clone())
            .unwrap_or_else(|| format!("uid {uid}"));
        let gids: Vec<u32> = user
            .as_ref()
            .and_then(|u| {
                let cname = std::ffi::CString::new(u.name.clone()).ok()?;
                getgrouplist(&cname, u.gid).ok()
            })
            .map(|g| g.into_iter().map(Gid::as_raw).collect())
            .unwrap_or_default();
        let creds = Some(Creds {
            uid,
            gids: gids.clone(),
        });
        let admin_gid = Group::from_name(&st.admin_group)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw());
        let admin =
            uid == 0 || uid == self.daemon_uid || admin_gid.is_some_and(|g| gids.contains(&g));
        let mut policies = Vec::new();
        if admin {
            policies.push("builtin:admin".to_string());
        } else {
            if let Some(p) = st.users.get(&name) {
                policies.extend(p.iter().cloned());
            }
            for (group, p) in &st.groups {
                let gid = Group::from_name(group)
                    .ok()
                    .flatten()
                    .map(|g| g.gid.as_raw());
                if gid.is_some_and(|g| gids.contains(&g)) {
                    policies.extend(p.iter().cloned());
                }
            }
            if policies.is_empty() {
                policies.push(if st.enabled {
                    st.local.clone()
                } else {
                    "builtin:open".into()
                });
            }
        }
        Principal {
            name: format!("user:{name}"),
            kind: PrincipalKind::Local,
            policies,
            creds,
        }
    }

    /// The same rule as [`Acl::decide`], without logging: for a second,
    /// stronger right that changes how a request is served.
    pub fn allows(&self, who: &Principal, resource: &Resource, cap: Capability) -> bool {
        let st = self.state();
        !hard_no(who, resource, cap)
            && evaluate(
                who.policies.iter().filter_map(|n| st.policies.get(n)),
                resource,
                cap,
            )
    }

    /// The one decision. Logs a refusal once, without any token.
    pub fn decide(
        &self,
        who: &Principal,
        resource: &Resource,
        cap: Capability,
    ) -> Result<(), Denial> {
        if self.allows(who, resource, cap) {
            return Ok(());
        }
        if who.kind == PrincipalKind::Anonymous {
            // As Konsul's middleware: no credentials is 401, not 403.
            log::info!(
                "access denied: anonymous may not {} {} {}",
                cap.as_str(),
                resource.kind(),
                resource.path()
            );
            return Err(Denial::Unauthenticated);
        }
        log::info!(
            "access denied: {} may not {} {} {}",
            who.name,
            cap.as_str(),
            resource.kind(),
            resource.path()
        );
        Err(Denial::Forbidden {
            resource: resource.kind(),
            capability: cap.as_str(),
            path: resource.path().to_string(),
        })
    }
}

/// The edge's own routes are never written by anonymous TCP, whatever a
/// policy grants and whether ACLs are on.
fn hard_no(who: &Principal, resource: &Resource, cap: Capability) -> bool {
    who.kind == PrincipalKind::Anonymous
        && matches!(resource, Resource::Edge(_))
        && !matches!(cap, Capability::Read | Capability::List)
}

fn build(config: &config::Acl, admin_token_files: &[PathBuf]) -> Result<State, AclError> {
    let mut policies: BTreeMap<String, Policy> = policy::builtin()
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect();
    if let Some(dir) = &config.policy_dir {
        let dir_err = |source| AclError::PolicyDir {
            path: dir.clone(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(dir_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        for path in files {
            let text = read_capped(&path).map_err(|message| AclError::Policy {
                path: path.clone(),
                message,
            })?;
            let p = Policy::from_json(&text).map_err(|message| AclError::Policy {
                path: path.clone(),
                message,
            })?;
            if p.name.starts_with("builtin:") {
                return Err(AclError::Policy {
                    path,
                    message: format!("\"{}\": names starting builtin: are reserved", p.name),
                });
            }
            policies.insert(p.name.clone(), p);
        }
    }
    let known = |what: &str, name: &str| {
        if policies.contains_key(name) {
            Ok(())
        } else {
            Err(AclError::UnknownPolicy {
                what: what.into(),
                policy: name.into(),
            })
        }
    };
    known("acl.anonymous_policy", &config.anonymous_policy)?;
    known("acl.local_policy", &config.local_policy)?;
    for (u, ps) in &config.users {
        for p in ps {
            known(&format!("acl.users.{u}"), p)?;
        }
    }
    for (g, ps) in &config.groups {
        for p in ps {
            known(&format!("acl.groups.{g}"), p)?;
        }
    }
    let mut tokens = Vec::new();
    for t in &config.tokens {
        for p in &t.policies {
            known(&format!("acl.tokens.{}", t.name), p)?;
        }
        tokens.push(Token {
            name: t.name.clone(),
            secret: read_token(&t.name, &t.file)?,
            policies: t.policies.clone(),
        });
    }
    for file in admin_token_files {
        for secret in read_sync_tokens(file)? {
            tokens.push(Token {
                name: "sync".into(),
                secret,
                policies: vec!["builtin:admin".into()],
            });
        }
    }
    Ok(State {
        enabled: config.enabled,
        hub_locked: !admin_token_files.is_empty(),
        policies,
        tokens,
        anonymous: config.anonymous_policy.clone(),
        local: config.local_policy.clone(),
        admin_group: config.admin_group.clone(),
        users: config.users.clone(),
        groups: config.groups.clone(),
    })
}

/// Policy files are small; a cap keeps a wrong path (a device node, a log)
/// from being read whole.
fn read_capped(path: &Path) -> Result<String, String> {
    use std::io::Read;
    const MAX: u64 = 256 << 10;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    f.take(MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX {
        return Err(format!("larger than {MAX} bytes"));
    }
    Ok(text)
}

fn read_token(name: &str, path: &Path) -> Result<Vec<u8>, AclError> {
    let err = |message: String| AclError::Token {
        name: name.into(),
        path: path.into(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.mode() & 0o007 != 0 {
        return Err(err(format!(
            "mode {:o} lets other users read or write it; chmod o-rwx",
            meta.mode() & 0o777
        )));
    }
    let text = read_capped(path).map_err(err)?;
    let secret = text.trim();
    if secret.len() < 16 {
        return Err(err("a token needs at least 16 characters".into()));
    }
    Ok(secret.as_bytes().to_vec())
}

/// A hub's `sync.auth_token_file`: one token per line, `#` comments. It
/// predates the access policy, so a lax mode is a warning, not a refusal.
fn read_sync_tokens(path: &Path) -> Result<Vec<Vec<u8>>, AclError> {
    let err = |message: String| AclError::Token {
        name: "sync".into(),
        path: path.into(),
        message,
    };
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.mode() & 0o007 != 0 {
            log::warn!(
                "{}: other users can read the hub's sync tokens (mode {:o}); chmod o-rwx",
                path.display(),
                meta.mode() & 0o777
            );
        }
    }
    let text = read_capped(path).map_err(err)?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// May a local caller read `path`? Every directory on the way must be
/// searchable and the file readable by `creds`, judged from the mode bits
/// as the kernel would (ACL xattrs are not consulted, so they can only
/// make this stricter, never looser).
pub fn may_read(creds: &Creds, path: &Path) -> bool {
    if creds.uid == 0 {
        return true;
    }
    let Ok(full) = std::fs::canonicalize(path) else {
        return false;
    };
    let allows = |meta: &std::fs::Metadata, bit: u32| {
        let mode = meta.mode();
        if meta.uid() == creds.uid {
            mode & (bit << 6) != 0
        } else if creds.gids.contains(&meta.gid()) {
            mode & (bit << 3) != 0
        } else {
            mode & bit != 0
        }
    };
    for dir in full.ancestors().skip(1) {
        match std::fs::metadata(dir) {
            Ok(m) if allows(&m, 0o1) => {}
            _ => return false,
        }
    }
    matches!(std::fs::metadata(&full), Ok(m) if allows(&m, 0o4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl_with(config: config::Acl) -> Acl {
        Acl::load(&config, vec![]).unwrap()
    }

    #[test]
    fn anonymous_never_writes_edge_routes() {
        let acl = acl_with(config::Acl {
            enabled: false,
            ..Default::default()
        });
        let anon = acl.identify(&Caller::Tcp { token: None }).unwrap();
        assert!(acl
            .decide(&anon, &Resource::Kv("a".into()), Capability::Write)
            .is_ok());
        assert!(acl
            .decide(&anon, &Resource::Edge("ota".into()), Capability::Write)
            .is_err());
        assert!(acl
            .decide(&anon, &Resource::Edge("status".into()), Capability::Read)
            .is_ok());
    }

    #[test]
    fn tokens_need_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t");
        std::fs::write(&file, "0123456789abcdef0123\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = config::Acl {
            tokens: vec![config::AclToken {
                name: "app".into(),
                file: file.clone(),
                policies: vec!["builtin:admin".into()],
            }],
            ..Default::default()
        };
        assert!(matches!(
            Acl::load(&config, vec![]),
            Err(AclError::Token { .. })
        ));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let acl = acl_with(config);
        let who = acl
            .identify(&Caller::Tcp {
                token: Some("0123456789abcdef0123".into()),
            })
            .unwrap();
        assert!(who.is_admin());
        assert_eq!(
            acl.identify(&Caller::Tcp {
                token: Some("wrong-token-wrong-token".into())
            })
            .unwrap_err(),
            Denial::Unauthenticated
        );
    }

    #[test]
    fn local_users_are_checked_like_the_kernel_would() {
        let nobody = Creds {
            uid: 65534,
            gids: vec![65534],
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bundle");
        std::fs::write(&file, "x").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(!may_read(&nobody, &file), "0700 parent");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        // tempdir's own ancestors (/tmp) are searchable by everyone.
        assert!(may_read(&nobody, &file));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(!may_read(&nobody, &file));
    }
}
