//! Firmware OTA for MQTT devices: the artifact store and staged rollouts
//! ([`rollout`]). This file holds what the parts share: the error, the
//! artifact's metadata and the settings.
//!
//! Artifacts are content-addressed: `{dir}/{sha256}.bin`, with their
//! metadata (device type, version, size, digest, ed25519 signature over the
//! 32-byte digest, release notes) in the local `firmware` table. An upload
//! streams to a temp file in the same directory while it is hashed, so an
//! image is never held in memory; only when the digest matches the one
//! declared and the signature verifies against a key in
//! `firmware.public_keys` is the file fsynced, renamed into place (and the
//! directory fsynced) and its row inserted. The row is written after the
//! rename, so a row always has its file; a crash in between leaves an
//! orphan file, removed at start-up with any stale temp file.
//!
//! Quota: `firmware.max_size` bounds the total. To make room the oldest
//! artifacts go first, except those a rollout still needs (one that is not
//! complete or aborted) and the bundles that host rollouts (`ota::rollout`)
//! without a URL are served from: if the room cannot be made without them,
//! the upload is refused instead. A hub is where such bundles are
//! uploaded; they are stored like firmware (signed for
//! `firmware.public_keys`), and edges check their own OTA signature.
//!
//! "Verified before use": the signature is checked at upload, and again,
//! with the file re-hashed, when a rollout starts, so a key removed from
//! the config or a file changed on disk is never offered to a device.
//!
//! The parts, one job each:
//! - `artifacts`: the store's reads and deletes (list, resolve a sha256 or
//!   a version, delete, re-verify) and start-up clean-up;
//! - `upload`: writing an artifact (an upload, or a fetch from the hub),
//!   and the quota's eviction it may need;
//! - `verify`: the checks of what an uploader declares, the signature, and
//!   the hex and base64 of digests and signatures (the key format and
//!   base64 decoding live in `config`, which checks the keys it loads);
//! - [`rollout`]: the rollout engine.

mod artifacts;
pub mod rollout;
mod upload;
mod verify;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::StoreError;

pub use artifacts::Artifacts;
/// For the hawkBit client's device chunks, checked before they are fetched.
#[cfg(feature = "hawkbit")]
pub(crate) use verify::check_meta;
/// For the tests and tools that sign images.
pub use verify::{base64_encode, hex};

/// Release notes longer than this are refused.
pub(crate) const MAX_NOTES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("digest mismatch: the upload declared sha256 {declared} but its content hashes to {computed}; not stored")]
    DigestMismatch { declared: String, computed: String },
    #[error(
        "signature of {sha256} does not verify against any key in firmware.public_keys; not stored"
    )]
    BadSignature { sha256: String },
    #[error("no firmware.public_keys configured: unsigned firmware is never accepted")]
    NoKeys,
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("firmware image exceeds firmware.max_upload_size ({limit} bytes)")]
    TooLarge { limit: u64 },
    #[error("firmware.max_size ({limit} bytes) reached: {needed} more bytes needed and only artifacts that running rollouts still need are left")]
    Quota { needed: u64, limit: u64 },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what}")]
    Conflict { what: String },
    #[error("fetching from the hub: {0}")]
    Fetch(#[from] crate::sync::TransportError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err(path: &Path, op: &'static str, source: std::io::Error) -> FirmwareError {
    FirmwareError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// An artifact's metadata (the `firmware` row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Artifact {
    pub(crate) sha256: String,
    pub(crate) device_type: String,
    pub(crate) version: String,
    pub(crate) size: u64,
    /// base64 of the 64-byte ed25519 signature over the raw digest.
    pub(crate) signature: String,
    pub(crate) notes: String,
    pub(crate) created_ms: u64,
}

/// What an uploader declares about the image it sends.
#[derive(Debug, Clone, Default)]
pub(crate) struct NewArtifact {
    pub(crate) device_type: String,
    pub(crate) version: String,
    pub(crate) sha256: String,
    pub(crate) signature: String,
    pub(crate) notes: String,
}

/// Settings from `firmware` in the config.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) dir: PathBuf,
    pub(crate) max_size: u64,
    pub(crate) max_upload: u64,
    pub(crate) keys: Vec<[u8; 32]>,
    pub(crate) base_url: String,
    pub(crate) defaults: crate::config::RolloutDefaults,
}

impl Settings {
    /// `base_url` is the API's address when the config names none.
    pub(crate) fn from_config(
        c: &crate::config::Config,
        api_url: &str,
    ) -> Result<Settings, FirmwareError> {
        let f = &c.firmware;
        let dir = match &f.dir {
            Some(d) => d.clone(),
            None => c
                .storage
                .path
                .parent()
                .unwrap_or(Path::new("."))
                .join("firmware"),
        };
        let keys = f
            .public_keys
            .iter()
            .map(|k| crate::config::parse_public_key(k))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| FirmwareError::Invalid {
                field: "firmware.public_keys",
                message,
            })?;
        Ok(Settings {
            dir,
            max_size: f.max_size.0,
            max_upload: f.max_upload_size.0,
            keys,
            base_url: f
                .base_url
                .clone()
                .unwrap_or_else(|| api_url.to_owned())
                .trim_end_matches('/')
                .to_owned(),
            defaults: f.rollout.clone(),
        })
    }
}
