//! The `hawkbit:` section: an Eclipse hawkBit DDI server (hawkBit itself,
//! gooseBit, servers built on hawkBit) that drives this node's A/B updates
//! (`crate::hawkbit`). Off while `server` is empty.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::types::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hawkbit {
    /// `http(s)://host[:port][/base]`; empty: no DDI client.
    pub server: String,
    pub tenant: String,
    /// The target's name on the server; empty: the node id.
    pub controller_id: String,
    /// A file holding this target's security token (`TargetToken`).
    pub target_token_file: Option<PathBuf>,
    /// A file holding the tenant's gateway token (`GatewayToken`).
    pub gateway_token_file: Option<PathBuf>,
    /// CA certificates for an https server; default: the system's.
    pub ca_file: Option<PathBuf>,
    /// The shortest poll interval accepted from the server's
    /// `config.polling.sleep`: a misconfigured server cannot make every
    /// node in a fleet poll in a tight loop.
    pub poll_floor: Duration,
    /// SWUpdate's `/etc/hwrevision` (`<board> <revision>`): sent as
    /// `hw_boardname` and `hw_revision`, which SWUpdate-minded servers
    /// (gooseBit) match software against. With the RAUC backend, RAUC's
    /// `compatible` names the board instead. A missing file: the device
    /// tree's model (or DMI's product name) and no revision.
    pub hwrevision_file: PathBuf,
}

impl Default for Hawkbit {
    fn default() -> Self {
        Hawkbit {
            server: String::new(),
            tenant: "DEFAULT".into(),
            controller_id: String::new(),
            target_token_file: None,
            gateway_token_file: None,
            ca_file: None,
            poll_floor: Duration::secs(10),
            hwrevision_file: PathBuf::from("/etc/hwrevision"),
        }
    }
}

impl Hawkbit {
    pub fn enabled(&self) -> bool {
        !self.server.is_empty()
    }

    /// Rules one key cannot express; `(key, message)` of the first broken.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled() {
            return Ok(());
        }
        let scheme_ok = self.server.starts_with("http://") || self.server.starts_with("https://");
        let host_ok = self
            .server
            .split_once("://")
            .is_some_and(|(_, rest)| !rest.is_empty() && !rest.starts_with('/'));
        if !scheme_ok || !host_ok {
            return Err((
                "hawkbit.server",
                format!("`{}`: use http(s)://host[:port][/base]", self.server),
            ));
        }
        // Both are URL path segments (`/{tenant}/controller/v1/{id}`).
        let segment = |s: &str| {
            (1..=128).contains(&s.len())
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
                && s != "."
                && s != ".."
        };
        if !segment(&self.tenant) {
            return Err((
                "hawkbit.tenant",
                format!("`{}`: 1-128 of A-Z a-z 0-9 - _ . :", self.tenant),
            ));
        }
        if !self.controller_id.is_empty() && !segment(&self.controller_id) {
            return Err((
                "hawkbit.controller_id",
                format!(
                    "`{}`: 1-128 of A-Z a-z 0-9 - _ . : (empty: the node id)",
                    self.controller_id
                ),
            ));
        }
        if self.target_token_file.is_some() && self.gateway_token_file.is_some() {
            return Err((
                "hawkbit.gateway_token_file",
                "give target_token_file or gateway_token_file, not both".into(),
            ));
        }
        if self.poll_floor.0 < std::time::Duration::from_secs(1) {
            return Err((
                "hawkbit.poll_floor",
                format!("{}: use 1s or more", self.poll_floor),
            ));
        }
        Ok(())
    }
}
