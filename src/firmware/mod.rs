//! Firmware OTA for MQTT devices: the artifact store (this file) and staged
//! rollouts ([`rollout`]).
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

pub mod rollout;

use std::path::{Path, PathBuf};

use ring::digest;
use ring::signature::{UnparsedPublicKey, ED25519};
use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};
use smol::io::AsyncWriteExt;

use crate::clock::wall_millis;
// The key format lives with the config that names the keys (config is the
// lower layer); re-exported so callers keep one path.
pub use crate::config::{base64_decode, parse_public_key};
use crate::store::{Store, StoreError};

/// Release notes longer than this are refused.
pub const MAX_NOTES: usize = 4096;

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

/// An artifact's metadata (the `firmware` row).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    pub sha256: String,
    pub device_type: String,
    pub version: String,
    pub size: u64,
    /// base64 of the 64-byte ed25519 signature over the raw digest.
    pub signature: String,
    pub notes: String,
    pub created_ms: u64,
}

/// What an uploader declares about the image it sends.
#[derive(Debug, Clone, Default)]
pub struct NewArtifact {
    pub device_type: String,
    pub version: String,
    pub sha256: String,
    pub signature: String,
    pub notes: String,
}

/// Settings from `firmware` in the config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub dir: PathBuf,
    pub max_size: u64,
    pub max_upload: u64,
    pub keys: Vec<[u8; 32]>,
    pub base_url: String,
    pub defaults: crate::config::RolloutDefaults,
}

impl Settings {
    /// `base_url` is the API's address when the config names none.
    pub fn from_config(
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
            .map(|k| parse_public_key(k))
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

/// The artifact store. Cheap to clone.
#[derive(Clone)]
pub struct Artifacts {
    store: Store,
    settings: std::sync::Arc<Settings>,
}

/// An upload in progress: a temp file being written and hashed. Dropped
/// unfinished (a refused or broken upload), it removes its temp file.
pub struct Upload {
    file: Option<smol::fs::File>,
    tmp: PathBuf,
    ctx: digest::Context,
    size: u64,
    limit: u64,
}

impl Upload {
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), FirmwareError> {
        self.size += chunk.len() as u64;
        if self.size > self.limit {
            return Err(FirmwareError::TooLarge { limit: self.limit });
        }
        self.ctx.update(chunk);
        let Some(f) = self.file.as_mut() else {
            return Err(io_err(
                &self.tmp,
                "write",
                std::io::ErrorKind::NotConnected.into(),
            ));
        };
        f.write_all(chunk)
            .await
            .map_err(|e| io_err(&self.tmp, "write", e))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn io_err(path: &Path, op: &'static str, source: std::io::Error) -> FirmwareError {
    FirmwareError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

impl Artifacts {
    /// Creates the directory, removes stale temp files and files without a
    /// row (a crash between rename and insert).
    pub async fn open(store: Store, settings: Settings) -> Result<Artifacts, FirmwareError> {
        let dir = settings.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, "create directory", e))?;
        let known: Vec<String> = store
            .call(|db| {
                let mut s = db
                    .conn()
                    .prepare("SELECT sha256 FROM firmware")
                    .map_err(|e| db.sql_error("list firmware", e))?;
                let rows = s
                    .query_map([], |r| r.get::<_, String>(0))
                    .and_then(|r| r.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| db.sql_error("list firmware", e));
                rows
            })
            .await??;
        let entries = std::fs::read_dir(&dir).map_err(|e| io_err(&dir, "read directory", e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let orphan = match name.strip_suffix(".bin") {
                Some(sha) => !known.iter().any(|k| k == sha),
                None => name.starts_with(".upload-"),
            };
            if orphan {
                log::info!("firmware: removing leftover {name}");
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Artifacts {
            store,
            settings: std::sync::Arc::new(settings),
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn path_of(&self, sha256: &str) -> PathBuf {
        self.settings.dir.join(format!("{sha256}.bin"))
    }

    /// Checks what can be checked before the body is read (so a typo
    /// does not cost a 64 MB transfer) and opens the temp file.
    pub async fn begin_upload(
        &self,
        meta: &NewArtifact,
        declared_size: Option<u64>,
    ) -> Result<Upload, FirmwareError> {
        check_meta(meta)?;
        let limit = self.settings.max_upload;
        if declared_size.is_some_and(|n| n > limit) {
            return Err(FirmwareError::TooLarge { limit });
        }
        if self.settings.keys.is_empty() {
            return Err(FirmwareError::NoKeys);
        }
        let tmp = self
            .settings
            .dir
            .join(format!(".upload-{:016x}.part", fastrand::u64(..)));
        let file = smol::fs::File::create(&tmp)
            .await
            .map_err(|e| io_err(&tmp, "create", e))?;
        Ok(Upload {
            file: Some(file),
            tmp,
            ctx: digest::Context::new(&digest::SHA256),
            size: 0,
            limit,
        })
    }

    /// Verifies, makes durable, makes room, renames into place, records.
    pub async fn finish_upload(
        &self,
        mut up: Upload,
        meta: NewArtifact,
    ) -> Result<Artifact, FirmwareError> {
        check_meta(&meta)?;
        let declared = meta.sha256.to_ascii_lowercase();
        let digest = up.ctx.clone().finish();
        let computed = hex(digest.as_ref());
        if computed != declared {
            return Err(FirmwareError::DigestMismatch { declared, computed });
        }
        verify(
            &self.settings.keys,
            digest.as_ref(),
            &meta.signature,
            &computed,
        )?;
        let size = up.size;
        if size == 0 {
            return Err(FirmwareError::Invalid {
                field: "body",
                message: "the image is empty".into(),
            });
        }
        if let Some(mut f) = up.file.take() {
            f.flush().await.map_err(|e| io_err(&up.tmp, "flush", e))?;
            f.sync_all()
                .await
                .map_err(|e| io_err(&up.tmp, "fsync", e))?;
        }
        let artifact = Artifact {
            sha256: computed.clone(),
            device_type: meta.device_type,
            version: meta.version,
            size,
            signature: meta.signature,
            notes: meta.notes,
            created_ms: wall_millis(),
        };
        // Same image again: nothing to do (idempotent retries).
        let a = artifact.clone();
        let existing = self
            .store
            .call(move |db| {
                let same = get_by_sha(db.conn(), &a.sha256)
                    .map_err(|e| db.sql_error("read firmware", e))?;
                let clash = db
                    .conn()
                    .query_row(
                        "SELECT sha256 FROM firmware WHERE device_type = ?1 AND version = ?2",
                        params![a.device_type, a.version],
                        |r| r.get::<_, String>(0),
                    )
                    .optional()
                    .map_err(|e| db.sql_error("read firmware", e))?;
                Ok::<_, StoreError>((same, clash))
            })
            .await??;
        match existing {
            (Some(same), _) => return Ok(same),
            (None, Some(other)) => {
                let what = format!(
                    "{} {} is already stored with another image ({other}); versions are immutable",
                    artifact.device_type, artifact.version
                );
                return Err(FirmwareError::Conflict { what });
            }
            (None, None) => {}
        }
        self.make_room(size).await?;
        let dest = self.path_of(&computed);
        let tmp = std::mem::take(&mut up.tmp);
        let dir = self.settings.dir.clone();
        let dest2 = dest.clone();
        smol::unblock(move || {
            std::fs::rename(&tmp, &dest2).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io_err(&dest2, "rename", e)
            })?;
            // The rename itself must survive a power cut.
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_err(&dir, "fsync directory", e))
        })
        .await?;
        let a = artifact.clone();
        self.store
            .call(move |db| {
                db.conn()
                    .execute(
                        "INSERT INTO firmware (sha256, device_type, version, size, signature, notes, created_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        params![
                            a.sha256,
                            a.device_type,
                            a.version,
                            a.size as i64,
                            a.signature,
                            a.notes,
                            a.created_ms as i64
                        ],
                    )
                    .map_err(|e| db.sql_error("insert firmware", e))
            })
            .await??;
        log::info!(
            "firmware {} {} stored ({} bytes, sha256 {})",
            artifact.device_type,
            artifact.version,
            artifact.size,
            artifact.sha256
        );
        Ok(artifact)
    }

    /// Evicts the oldest artifacts no rollout needs until `needed` more
    /// bytes fit under the quota.
    async fn make_room(&self, needed: u64) -> Result<(), FirmwareError> {
        let limit = self.settings.max_size;
        if needed > limit {
            return Err(FirmwareError::Quota { needed, limit });
        }
        let evicted = self
            .store
            .call(move |db| {
                db.tx(|tx| {
                    let conn = tx.conn();
                    let total: i64 = conn
                        .query_row("SELECT coalesce(sum(size), 0) FROM firmware", [], |r| {
                            r.get(0)
                        })
                        .map_err(|e| tx.sql_error("firmware size", e))?;
                    let mut over = (total as u64 + needed).saturating_sub(limit);
                    if over == 0 {
                        return Ok(Vec::new());
                    }
                    let pinned = rollout::pinned_artifacts(tx)?;
                    let candidates: Vec<(String, u64)> = conn
                        .prepare("SELECT sha256, size FROM firmware ORDER BY created_ms, sha256")
                        .and_then(|mut s| {
                            s.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
                                .collect()
                        })
                        .map_err(|e| tx.sql_error("list firmware", e))?;
                    let mut evict = Vec::new();
                    for (sha, size) in candidates {
                        if over == 0 {
                            break;
                        }
                        if pinned.contains(&sha) {
                            continue;
                        }
                        over = over.saturating_sub(size);
                        evict.push(sha);
                    }
                    if over > 0 {
                        return Err(FirmwareError::Quota { needed, limit });
                    }
                    for sha in &evict {
                        conn.execute("DELETE FROM firmware WHERE sha256 = ?1", [sha])
                            .map_err(|e| tx.sql_error("evict firmware", e))?;
                    }
                    Ok(evict)
                })
            })
            .await??;
        for sha in evicted {
            log::info!("firmware {sha} evicted to stay under firmware.max_size");
            let _ = std::fs::remove_file(self.path_of(&sha));
        }
        Ok(())
    }

    pub async fn list(&self) -> Result<Vec<Artifact>, FirmwareError> {
        Ok(self
            .store
            .call(|db| {
                db.conn()
                    .prepare(&format!(
                        "SELECT {COLS} FROM firmware ORDER BY device_type, created_ms"
                    ))
                    .and_then(|mut s| s.query_map([], row)?.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| db.sql_error("list firmware", e))
            })
            .await??)
    }

    /// By digest, or by version (the newest of that version; `device_type`
    /// narrows it).
    pub async fn resolve(
        &self,
        reference: String,
        device_type: Option<String>,
    ) -> Result<Artifact, FirmwareError> {
        let r = reference.clone();
        let found = self
            .store
            .call(move |db| {
                let c = db.conn();
                let res = if is_sha256(&r.to_ascii_lowercase()) {
                    get_by_sha(c, &r.to_ascii_lowercase())
                } else {
                    c.query_row(
                        &format!(
                            "SELECT {COLS} FROM firmware WHERE version = ?1
                             AND (?2 IS NULL OR device_type = ?2)
                             ORDER BY created_ms DESC LIMIT 1"
                        ),
                        params![r, device_type],
                        row,
                    )
                    .optional()
                };
                res.map_err(|e| db.sql_error("read firmware", e))
            })
            .await??;
        found.ok_or(FirmwareError::NotFound {
            what: format!("firmware {reference}"),
        })
    }

    /// Deletes an artifact no rollout needs.
    pub async fn delete(&self, sha256: String) -> Result<(), FirmwareError> {
        let sha = sha256.clone();
        let deleted = self
            .store
            .call(move |db| {
                db.tx(|tx| {
                    if rollout::pinned_artifacts(tx)?.contains(&sha) {
                        return Err(FirmwareError::Conflict {
                            what: format!(
                                "firmware {sha} is needed by a rollout that is not finished"
                            ),
                        });
                    }
                    tx.conn()
                        .execute("DELETE FROM firmware WHERE sha256 = ?1", [&sha])
                        .map_err(|e| FirmwareError::Store(tx.sql_error("delete firmware", e)))
                })
            })
            .await??;
        if deleted == 0 {
            return Err(FirmwareError::NotFound {
                what: format!("firmware {sha256}"),
            });
        }
        let _ = std::fs::remove_file(self.path_of(&sha256));
        Ok(())
    }

    /// Fetches an artifact a rollout from the hub names, into
    /// `.fetch-{sha256}.part` (kept across failures and restarts, so the
    /// next attempt resumes with Range), then verifies and stores it like
    /// an upload. Content that fails verification is deleted.
    pub async fn fetch(
        &self,
        fetcher: &crate::sync::transport::Fetcher,
        meta: NewArtifact,
        size: u64,
    ) -> Result<Artifact, FirmwareError> {
        check_meta(&meta)?;
        if size > self.settings.max_upload {
            return Err(FirmwareError::TooLarge {
                limit: self.settings.max_upload,
            });
        }
        let sha = meta.sha256.to_ascii_lowercase();
        let part = self.settings.dir.join(format!(".fetch-{sha}.part"));
        fetcher
            .fetch(&format!("/v1/edge/firmware/{sha}"), &part, size, &|_| {})
            .await?;
        // Hash what is on disk (the file may have been resumed).
        let path = part.clone();
        let (ctx, file_len) = smol::unblock(move || {
            use std::io::Read;
            let mut f = std::fs::File::open(&path).map_err(|e| io_err(&path, "open", e))?;
            let mut ctx = digest::Context::new(&digest::SHA256);
            let mut buf = vec![0u8; 64 << 10];
            let mut n_total = 0u64;
            loop {
                let n = f.read(&mut buf).map_err(|e| io_err(&path, "read", e))?;
                if n == 0 {
                    break;
                }
                n_total += n as u64;
                ctx.update(&buf[..n]);
            }
            Ok::<_, FirmwareError>((ctx, n_total))
        })
        .await?;
        let file = smol::fs::OpenOptions::new()
            .write(true)
            .open(&part)
            .await
            .map_err(|e| io_err(&part, "open", e))?;
        let up = Upload {
            file: Some(file),
            tmp: part,
            ctx,
            size: file_len,
            limit: self.settings.max_upload,
        };
        // On a verification failure `up` is dropped: the bad bytes go.
        self.finish_upload(up, meta).await
    }

    /// Re-hashes the stored file and re-checks its signature: what a
    /// rollout does before it offers the artifact to anyone.
    pub async fn verify_stored(&self, a: &Artifact) -> Result<(), FirmwareError> {
        let path = self.path_of(&a.sha256);
        let computed = smol::unblock(move || {
            use std::io::Read;
            let mut f = std::fs::File::open(&path).map_err(|e| io_err(&path, "open", e))?;
            let mut ctx = digest::Context::new(&digest::SHA256);
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = f.read(&mut buf).map_err(|e| io_err(&path, "read", e))?;
                if n == 0 {
                    break;
                }
                ctx.update(&buf[..n]);
            }
            Ok::<_, FirmwareError>(ctx.finish())
        })
        .await?;
        let hexed = hex(computed.as_ref());
        if hexed != a.sha256 {
            return Err(FirmwareError::DigestMismatch {
                declared: a.sha256.clone(),
                computed: hexed,
            });
        }
        verify(
            &self.settings.keys,
            computed.as_ref(),
            &a.signature,
            &a.sha256,
        )
    }
}

const COLS: &str = "sha256, device_type, version, size, signature, notes, created_ms";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Artifact> {
    Ok(Artifact {
        sha256: r.get(0)?,
        device_type: r.get(1)?,
        version: r.get(2)?,
        size: r.get::<_, i64>(3)? as u64,
        signature: r.get(4)?,
        notes: r.get(5)?,
        created_ms: r.get::<_, i64>(6)? as u64,
    })
}

fn get_by_sha(c: &rusqlite::Connection, sha: &str) -> rusqlite::Result<Option<Artifact>> {
    c.query_row(
        &format!("SELECT {COLS} FROM firmware WHERE sha256 = ?1"),
        [sha],
        row,
    )
    .optional()
}

fn check_meta(meta: &NewArtifact) -> Result<(), FirmwareError> {
    check_name("device_type", &meta.device_type)?;
    check_name("version", &meta.version)?;
    if meta.notes.len() > MAX_NOTES {
        return Err(FirmwareError::Invalid {
            field: "notes",
            message: format!("at most {MAX_NOTES} bytes"),
        });
    }
    if !is_sha256(&meta.sha256.to_ascii_lowercase()) {
        return Err(FirmwareError::Invalid {
            field: "sha256",
            message: "64 hex digits (the image's SHA-256) are required".into(),
        });
    }
    if decode_signature(&meta.signature).is_none() {
        return Err(FirmwareError::Invalid {
            field: "signature",
            message: "an ed25519 signature (64 bytes, base64 or hex) over the image's SHA-256 digest is required".into(),
        });
    }
    Ok(())
}

fn check_name(field: &'static str, v: &str) -> Result<(), FirmwareError> {
    if v.is_empty()
        || v.len() > 128
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+:".contains(&b))
    {
        return Err(FirmwareError::Invalid {
            field,
            message: format!(
                "`{}`: 1-128 of A-Z a-z 0-9 - _ . + : required",
                v.escape_debug()
            ),
        });
    }
    Ok(())
}

/// The signature (base64 or hex) over `digest` by any of `keys`.
fn verify(
    keys: &[[u8; 32]],
    digest: &[u8],
    signature: &str,
    sha: &str,
) -> Result<(), FirmwareError> {
    if keys.is_empty() {
        return Err(FirmwareError::NoKeys);
    }
    let sig = decode_signature(signature).ok_or_else(|| FirmwareError::Invalid {
        field: "signature",
        message: "an ed25519 signature (64 bytes, base64 or hex) over the image's SHA-256 digest is required".into(),
    })?;
    if keys.iter().any(|k| {
        UnparsedPublicKey::new(&ED25519, k)
            .verify(digest, &sig)
            .is_ok()
    }) {
        Ok(())
    } else {
        Err(FirmwareError::BadSignature { sha256: sha.into() })
    }
}

fn decode_signature(s: &str) -> Option<Vec<u8>> {
    // An unencoded `+` in a query string arrives as a space.
    let s = s.trim().replace(' ', "+");
    let s = s.as_str();
    let bytes = if s.len() == 128 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..64)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?
    } else {
        base64_decode(s)?
    };
    (bytes.len() == 64).then_some(bytes)
}

pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn base64_encode(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = chunk.len();
        let v = (chunk[0] as u32) << 16
            | (chunk.get(1).copied().unwrap_or(0) as u32) << 8
            | chunk.get(2).copied().unwrap_or(0) as u32;
        for i in 0..4 {
            if i <= n {
                out.push(T[(v >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    #[test]
    fn base64_round_trip() {
        for n in 0..70 {
            let data: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(base64_decode(&base64_encode(&data)).unwrap(), data, "{n}");
        }
        assert_eq!(base64_decode("Zm9v"), Some(b"foo".to_vec()));
        assert_eq!(base64_decode("Zm9v!"), None);
    }

    #[test]
    fn keys_and_signatures() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let pub_raw = kp.public_key().as_ref().to_vec();
        let key = parse_public_key(&base64_encode(&pub_raw)).unwrap();
        let mut spki = crate::config::ED25519_SPKI_PREFIX.to_vec();
        spki.extend_from_slice(&pub_raw);
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64_encode(&spki)
        );
        assert_eq!(parse_public_key(&pem).unwrap(), key);
        assert!(parse_public_key("AAAA").is_err());

        let d = digest::digest(&digest::SHA256, b"image");
        let sig = base64_encode(kp.sign(d.as_ref()).as_ref());
        let sha = hex(d.as_ref());
        verify(&[key], d.as_ref(), &sig, &sha).unwrap();
        let other = digest::digest(&digest::SHA256, b"other");
        assert!(matches!(
            verify(&[key], other.as_ref(), &sig, &sha),
            Err(FirmwareError::BadSignature { .. })
        ));
        assert!(matches!(
            verify(&[], d.as_ref(), &sig, &sha),
            Err(FirmwareError::NoKeys)
        ));
        assert!(matches!(
            verify(&[key], d.as_ref(), "short", &sha),
            Err(FirmwareError::Invalid { .. })
        ));
    }

    #[test]
    fn names() {
        assert!(check_name("version", "1.2.3-rc1+b7").is_ok());
        assert!(check_name("version", "").is_err());
        assert!(check_name("version", "a/b").is_err());
    }

    #[test]
    fn quota_evicts_oldest_but_never_what_a_live_rollout_needs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(crate::store::StoreOptions {
            path: dir.path().join("k.db"),
            max_size: 8 << 20,
            node_id: "t".into(),
        })
        .unwrap();
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let mut key = [0u8; 32];
        key.copy_from_slice(kp.public_key().as_ref());
        let settings = Settings {
            dir: dir.path().join("fw"),
            max_size: 250_000,
            max_upload: 1 << 20,
            keys: vec![key],
            base_url: String::new(),
            defaults: crate::config::RolloutDefaults::default(),
        };
        smol::block_on(async {
            let a = Artifacts::open(store.clone(), settings).await.unwrap();
            let put = |version: &str, len: usize| {
                let img = vec![version.len() as u8 ^ version.as_bytes()[0]; len];
                let d = digest::digest(&digest::SHA256, &img);
                let meta = NewArtifact {
                    device_type: "sensor".into(),
                    version: version.into(),
                    sha256: hex(d.as_ref()),
                    signature: base64_encode(kp.sign(d.as_ref()).as_ref()),
                    notes: String::new(),
                };
                let a = a.clone();
                async move {
                    let mut up = a.begin_upload(&meta, None).await?;
                    up.write(&img).await?;
                    a.finish_upload(up, meta).await
                }
            };
            let v1 = put("1", 100_000).await.unwrap();
            let v2 = put("2", 100_000).await.unwrap();
            // A running rollout pins v1.
            let body = serde_json::json!({
                "id": "r", "device_type": "sensor", "version": "1", "sha256": v1.sha256,
                "size": v1.size, "signature": v1.signature, "wave_size": 1,
                "failure_threshold": 1, "device_deadline_ms": 1000, "max_retries": 0,
                "state": "running", "created_ms": 1
            })
            .to_string();
            store
                .call(move |db| {
                    db.tx(|tx| {
                        crate::registry::commit(
                            tx,
                            crate::store::Kind::Rollout,
                            "r",
                            None,
                            Some(body),
                        )
                    })
                })
                .await
                .unwrap()
                .unwrap();
            // v3 needs room: v2 goes, v1 stays.
            let v3 = put("3", 100_000).await.unwrap();
            let left: Vec<String> = a
                .list()
                .await
                .unwrap()
                .into_iter()
                .map(|x| x.version)
                .collect();
            assert_eq!(left, ["1", "3"]);
            assert!(!a.path_of(&v2.sha256).exists());
            assert!(a.path_of(&v1.sha256).exists() && a.path_of(&v3.sha256).exists());
            // Room only by evicting v1: refused, and nothing was evicted.
            let e = put("4", 200_000).await.unwrap_err();
            assert!(matches!(e, FirmwareError::Quota { .. }), "{e}");
            assert_eq!(a.list().await.unwrap().len(), 2);
            assert!(a.delete(v1.sha256.clone()).await.is_err(), "pinned");
        });
        store.close();
    }
}
