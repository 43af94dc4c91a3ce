//! Who may change things over D-Bus.
//!
//! Reads are open to every local user. Mutations (register, deregister,
//! KV put/delete, SyncNow) need uid 0 or membership of the `konsul` group.
//! The bus policy (`systemd/io.konsul.Edge1.conf`) says the same, but the
//! daemon does not rely on it: a permissive or missing policy file, a
//! session bus or a test bus must not turn into write access for everyone.
//!
//! The caller's uid comes from the bus (`GetConnectionUnixUser`, which the
//! bus daemon took from the socket's peer credentials), never from the
//! message. Group membership is read from the user database
//! (`getgrouplist`), as dbus-daemon does for `<policy group=...>`, so the
//! in-process rule and the policy file agree. The lookups go through NSS,
//! which may block (LDAP, sssd), so they run on the blocking pool.

use nix::unistd::{getgrouplist, Gid, Group, Uid, User};
use zbus::fdo::DBusProxy;
use zbus::message::Header;

use super::Error;

/// The group whose members may mutate, besides root.
pub const ADMIN_GROUP: &str = "konsul";

#[derive(Clone)]
pub struct Access {
    bus: DBusProxy<'static>,
}

impl Access {
    pub async fn new(conn: &zbus::Connection) -> zbus::Result<Access> {
        Ok(Access {
            bus: DBusProxy::new(conn).await?,
        })
    }

    /// Ok when the sender of `hdr` may mutate; `what` names the operation
    /// for the refusal message and the log.
    pub async fn require_admin(&self, hdr: &Header<'_>, what: &str) -> Result<(), Error> {
        let sender = hdr
            .sender()
            .ok_or_else(|| Error::AccessDenied(format!("{what}: the caller has no bus name")))?;
        let uid = self
            .bus
            .get_connection_unix_user(sender.clone().into())
            .await
            .map_err(|e| Error::Failed(format!("cannot identify the caller {sender}: {e}")))?;
        let allowed = smol::unblock(move || may_mutate(uid, ADMIN_GROUP)).await;
        match allowed {
            Ok(true) => {
                log::debug!("D-Bus {what} by uid {uid} ({sender})");
                Ok(())
            }
            Ok(false) => {
                log::info!("D-Bus {what} refused: uid {uid} ({sender}) is not root and not in group {ADMIN_GROUP}");
                Err(Error::AccessDenied(format!(
                    "{what} needs root or membership of group {ADMIN_GROUP} (caller uid {uid})"
                )))
            }
            Err(e) => {
                log::warn!("D-Bus {what}: user database lookup for uid {uid} failed: {e}");
                Err(Error::AccessDenied(format!(
                    "{what}: cannot check the groups of uid {uid}: {e}"
                )))
            }
        }
    }
}

/// True for uid 0 and for users in `group` (primary or supplementary). A
/// uid without a passwd entry, or a group that does not exist, is not
/// allowed: unknown means no.
pub fn may_mutate(uid: u32, group: &str) -> Result<bool, nix::Error> {
    if uid == 0 {
        return Ok(true);
    }
    let Some(group) = Group::from_name(group)? else {
        return Ok(false);
    };
    let Some(user) = User::from_uid(Uid::from_raw(uid))? else {
        return Ok(false);
    };
    if user.gid == group.gid {
        return Ok(true);
    }
    let name = std::ffi::CString::new(user.name).map_err(|_| nix::Error::EINVAL)?;
    let groups: Vec<Gid> = getgrouplist(&name, user.gid)?;
    Ok(groups.contains(&group.gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_group_members_only() {
        assert!(may_mutate(0, "no-such-group-konsul-test").unwrap());
        // Debian's nobody:nogroup (65534:65534) exists on every test machine.
        assert!(
            may_mutate(65534, "nogroup").unwrap(),
            "primary group counts"
        );
        assert!(!may_mutate(65534, "root").unwrap());
        assert!(!may_mutate(65534, "no-such-group-konsul-test").unwrap());
        assert!(
            !may_mutate(4_000_000_000, "nogroup").unwrap(),
            "no passwd entry"
        );
    }
}
