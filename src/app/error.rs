//! One error model for every door. Each subsystem error is classified here,
//! once; the doors only translate the class: HTTP to a status with Konsul's
//! JSON, D-Bus to an `io.konsul.Edge1.Error.*` name, the CLI to a sysexits
//! code. Messages that leave the process never carry paths or SQL: those
//! go to the journal, and the caller is told to look there.

use crate::acl::Denial;
use crate::devices::DeviceError;
use crate::firmware::FirmwareError;
use crate::ota::OtaError;
use crate::registry::RegistryError;
use crate::store::StoreError;
use crate::sync::SyncError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Malformed or invalid input.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// A CAS index did not match.
    #[error("{0}")]
    CasConflict(String),
    /// The current state does not allow it (an install in progress, a
    /// rollout in a state that refuses the command, an id taken).
    #[error("{0}")]
    Conflict(String),
    /// A configured count limit (`services.max_local_services`, ...).
    #[error("{0}")]
    Limit(String),
    /// `storage.max_size` or the disk: nothing was written.
    #[error("{0}")]
    StorageFull(String),
    /// A body or artifact over its size limit.
    #[error("{0}")]
    TooLarge(String),
    /// Not configured here, disabled, or shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// An upstream (hub, download server) failed.
    #[error("{0}")]
    Upstream(String),
    /// No valid credentials.
    #[error("unauthorized")]
    Unauthenticated,
    /// Valid credentials without the right.
    #[error("insufficient permissions: {capability} on {resource} {path}")]
    Forbidden {
        resource: &'static str,
        capability: &'static str,
        path: String,
    },
    /// A fault inside the node; the details are in the journal.
    #[error("{0}")]
    Internal(&'static str),
}

impl From<Denial> for AppError {
    fn from(d: Denial) -> Self {
        match d {
            Denial::Unauthenticated => AppError::Unauthenticated,
            Denial::Forbidden {
                resource,
                capability,
                path,
            } => AppError::Forbidden {
                resource,
                capability,
                path,
            },
        }
    }
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            // The journal gets the path; callers get the rule.
            StoreError::LimitReached { limit, .. } => {
                log::warn!("{e}");
                AppError::StorageFull(format!(
                    "storage.max_size ({limit} bytes) reached; the write was not applied"
                ))
            }
            StoreError::DiskFull { .. } => {
                log::warn!("{e}");
                AppError::StorageFull("the disk is full; the write was not applied".into())
            }
            StoreError::Closed => AppError::Unavailable("shutting down".into()),
            StoreError::Open { .. }
            | StoreError::CreateDir { .. }
            | StoreError::NotKonsul { .. }
            | StoreError::Corrupt { .. }
            | StoreError::NewerSchema { .. }
            | StoreError::Sqlite { .. }
            | StoreError::BadRecord { .. } => {
                log::error!("{e}");
                AppError::Internal("storage error; see the daemon log")
            }
        }
    }
}

impl From<RegistryError> for AppError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid { .. } => AppError::Invalid(e.to_string()),
            RegistryError::NotFound { what, .. } => {
                let what = match what {
                    "service" => "Service",
                    "key" => "Key",
                    other => other,
                };
                AppError::NotFound(format!("{what} not found"))
            }
            RegistryError::CasConflict { .. } => AppError::CasConflict(e.to_string()),
            RegistryError::ServiceLimit { .. } => AppError::Limit(e.to_string()),
            RegistryError::Store(s) => s.into(),
        }
    }
}

impl From<DeviceError> for AppError {
    fn from(e: DeviceError) -> Self {
        match e {
            DeviceError::NotFound { .. } | DeviceError::Unregistered { .. } => {
                AppError::NotFound(e.to_string())
            }
            DeviceError::DeviceLimit { .. } | DeviceError::ServiceLimit { .. } => {
                AppError::Limit(e.to_string())
            }
            DeviceError::ServiceTaken { .. } => AppError::Conflict(e.to_string()),
            DeviceError::Invalid { .. } => AppError::Invalid(e.to_string()),
            DeviceError::Store(s) => s.into(),
        }
    }
}

impl From<OtaError> for AppError {
    fn from(e: OtaError) -> Self {
        use OtaError as O;
        match e {
            O::Disabled => AppError::Unavailable(e.to_string()),
            O::Busy(_) | O::NotApplicable(_) => AppError::Conflict(e.to_string()),
            O::Invalid(_) | O::Bundle(_) | O::Rejected(_) => AppError::Invalid(e.to_string()),
            O::NotFound(_) => AppError::NotFound(e.to_string()),
            O::Store(s) => s.into(),
            O::Fetch(_) => {
                log::warn!("ota: {e}");
                AppError::Upstream("downloading the bundle failed; see the daemon log".into())
            }
            O::Io { .. } | O::Backend(_) | O::Unconfirmed(_) | O::Rauc(_) | O::Timeout { .. } => {
                log::error!("ota: {e}");
                AppError::Internal("the update failed; see the daemon log")
            }
        }
    }
}

impl From<FirmwareError> for AppError {
    fn from(e: FirmwareError) -> Self {
        use FirmwareError as F;
        match e {
            F::DigestMismatch { .. } | F::BadSignature { .. } | F::Invalid { .. } => {
                log::warn!("firmware refused: {e}");
                AppError::Invalid(e.to_string())
            }
            F::NoKeys => AppError::Unavailable(e.to_string()),
            F::TooLarge { .. } => AppError::TooLarge(e.to_string()),
            F::Quota { .. } => AppError::StorageFull(e.to_string()),
            F::NotFound { .. } => AppError::NotFound(e.to_string()),
            F::Conflict { .. } => AppError::Conflict(e.to_string()),
            F::Io { .. } => {
                log::error!("{e}");
                AppError::Internal("firmware storage error; see the daemon log")
            }
            F::Fetch(_) => AppError::Upstream(e.to_string()),
            F::Store(s) => s.into(),
        }
    }
}

impl From<SyncError> for AppError {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Disabled => AppError::Unavailable(e.to_string()),
        }
    }
}
