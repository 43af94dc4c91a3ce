//! The artifact store's reads and deletes: start-up clean-up, listing,
//! resolving a reference (a sha256, or a version as the HTTP routes take
//! it), deleting what no rollout needs, and re-verifying a stored file
//! before a rollout offers it. Writing artifacts is `upload`'s job; this
//! part never creates a file.

use std::path::PathBuf;

use ring::digest;
use rusqlite::{params, OptionalExtension};

use super::verify::{hex, is_sha256, verify};
use super::{io_err, rollout, Artifact, FirmwareError, Settings};
use crate::store::Store;

/// The artifact store. Cheap to clone.
#[derive(Clone)]
pub struct Artifacts {
    pub(super) store: Store,
    pub(super) settings: std::sync::Arc<Settings>,
}

impl Artifacts {
    /// Creates the directory, removes stale temp files and files without a
    /// row (a crash between rename and insert).
    // Start-up only (`smol::block_on` in daemon set-up, before the executor
    // and the watchdog run).
    #[allow(clippy::disallowed_methods)]
    pub(crate) async fn open(store: Store, settings: Settings) -> Result<Artifacts, FirmwareError> {
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

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    pub(crate) fn path_of(&self, sha256: &str) -> PathBuf {
        self.settings.dir.join(format!("{sha256}.bin"))
    }

    pub(crate) async fn list(&self) -> Result<Vec<Artifact>, FirmwareError> {
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
    pub(crate) async fn resolve(
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

    /// Deletes an artifact no rollout needs, named as `GET` names it: by
    /// digest, or by version.
    pub(crate) async fn delete(&self, reference: String) -> Result<(), FirmwareError> {
        self.delete_ref(reference, None).await
    }

    /// Deletes an artifact no rollout needs: by digest, or by version
    /// (`device_type` narrows it). Unlike [`Artifacts::resolve`], a version
    /// stored for several device types is refused rather than taken as the
    /// newest: a delete cannot be undone, so the caller names the digest.
    /// Lookup, pin check and delete are one transaction.
    pub(crate) async fn delete_ref(
        &self,
        reference: String,
        device_type: Option<String>,
    ) -> Result<(), FirmwareError> {
        let r = reference.clone();
        let sha = self
            .store
            .call(move |db| {
                db.tx(|tx| {
                    let c = tx.conn();
                    let found = if is_sha256(&r.to_ascii_lowercase()) {
                        get_by_sha(c, &r.to_ascii_lowercase()).map(|a| a.into_iter().collect())
                    } else {
                        c.prepare(&format!(
                            "SELECT {COLS} FROM firmware WHERE version = ?1
                             AND (?2 IS NULL OR device_type = ?2) ORDER BY device_type"
                        ))
                        .and_then(|mut s| {
                            s.query_map(params![r, device_type], row)?
                                .collect::<Result<Vec<_>, _>>()
                        })
                    }
                    .map_err(|e| tx.sql_error("read firmware", e))?;
                    let sha = match found.as_slice() {
                        [] => {
                            return Err(FirmwareError::NotFound {
                                what: format!("firmware {r}"),
                            })
                        }
                        [a] => a.sha256.clone(),
                        several => {
                            let types: Vec<&str> =
                                several.iter().map(|a| a.device_type.as_str()).collect();
                            return Err(FirmwareError::Conflict {
                                what: format!(
                                    "firmware {r} is stored for several device types ({}); delete it by sha256",
                                    types.join(", ")
                                ),
                            });
                        }
                    };
                    if rollout::pinned_artifacts(tx)?.contains(&sha) {
                        return Err(FirmwareError::Conflict {
                            what: format!(
                                "firmware {sha} is needed by a rollout that is not finished"
                            ),
                        });
                    }
                    tx.conn()
                        .execute("DELETE FROM firmware WHERE sha256 = ?1", [&sha])
                        .map_err(|e| FirmwareError::Store(tx.sql_error("delete firmware", e)))?;
                    Ok(sha)
                })
            })
            .await??;
        let _ = smol::fs::remove_file(self.path_of(&sha)).await;
        Ok(())
    }

    /// Re-hashes the stored file and re-checks its signature: what a
    /// rollout does before it offers the artifact to anyone.
    pub(crate) async fn verify_stored(&self, a: &Artifact) -> Result<(), FirmwareError> {
        let path = self.path_of(&a.sha256);
        // The closure runs on the blocking pool.
        #[allow(clippy::disallowed_methods)]
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

pub(super) fn get_by_sha(
    c: &rusqlite::Connection,
    sha: &str,
) -> rusqlite::Result<Option<Artifact>> {
    c.query_row(
        &format!("SELECT {COLS} FROM firmware WHERE sha256 = ?1"),
        [sha],
        row,
    )
    .optional()
}
