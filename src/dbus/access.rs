//! Who is calling over D-Bus.
//!
//! The caller's uid comes from the bus (`GetConnectionUnixUser`, which the
//! bus daemon took from the socket's peer credentials), never from the
//! message. What that uid may do is decided by the one access policy every
//! door shares ([`crate::app::App::check`]): root, the daemon's own user and
//! group `konsul` are admins, other users get `acl.local_policy` or what
//! `acl.users`/`acl.groups` grant. The bus policy
//! (`systemd/io.konsul.Edge1.conf`) may say less, but the daemon does not
//! rely on it: a permissive or missing policy file, a session bus or a test
//! bus must not turn into write access for everyone.

use zbus::fdo::DBusProxy;
use zbus::message::Header;

use super::Error;
use crate::acl::{Caller, Capability, Principal, Resource};
use crate::app::App;

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

    /// The sender of `hdr`, as the bus daemon knows it.
    async fn caller(&self, hdr: &Header<'_>) -> Result<Caller, Error> {
        let sender = hdr
            .sender()
            .ok_or_else(|| Error::AccessDenied("the caller has no bus name".into()))?;
        let uid = self
            .bus
            .get_connection_unix_user(sender.clone().into())
            .await
            .map_err(|e| Error::Failed(format!("cannot identify the caller {sender}: {e}")))?;
        Ok(Caller::Local { uid })
    }

    /// Identifies the caller and applies the shared access decision.
    pub async fn allow(
        &self,
        app: &App,
        hdr: &Header<'_>,
        resource: Resource,
        cap: Capability,
    ) -> Result<Principal, Error> {
        let who = app.identify(self.caller(hdr).await?).await?;
        app.check(&who, resource, cap)?;
        Ok(who)
    }

    /// Identification only, for checks that need the request's content.
    pub async fn principal(&self, app: &App, hdr: &Header<'_>) -> Result<Principal, Error> {
        Ok(app.identify(self.caller(hdr).await?).await?)
    }
}
