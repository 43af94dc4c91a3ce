//! Writing artifacts: a streamed upload, a fetch from the hub that
//! resumes a partial file, or a file downloaded elsewhere, all ending in
//! the same verify, fsync, rename, record sequence; and the quota's
//! eviction that makes room first.
//! Separate from `artifacts` because this is the only part that creates
//! files and the only one that evicts.

use std::path::PathBuf;

use ring::digest;
use rusqlite::{params, OptionalExtension};
use smol::io::AsyncWriteExt;

use super::artifacts::get_by_sha;
use super::verify::{check_meta, hex, verify};
use super::{io_err, rollout, Artifact, Artifacts, FirmwareError, NewArtifact};
use crate::clock::wall_millis;
use crate::store::StoreError;

/// An upload in progress: a temp file being written and hashed. Dropped
/// unfinished (a refused or broken upload), it removes its temp file.
pub(crate) struct Upload {
    file: Option<smol::fs::File>,
    tmp: PathBuf,
    ctx: digest::Context,
    size: u64,
    limit: u64,
}

impl Upload {
    pub(crate) async fn write(&mut self, chunk: &[u8]) -> Result<(), FirmwareError> {
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
            let tmp = std::mem::take(&mut self.tmp);
            // Drop runs on the executor: the unlink goes to the blocking pool.
            #[allow(clippy::disallowed_methods)]
            smol::unblock(move || std::fs::remove_file(tmp)).detach();
        }
    }
}

impl Artifacts {
    /// Checks what can be checked before the body is read (so a typo
    /// does not cost a 64 MB transfer) and opens the temp file.
    pub(crate) async fn begin_upload(
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
    pub(crate) async fn finish_upload(
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
        // The closure runs on the blocking pool.
        #[allow(clippy::disallowed_methods)]
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
            let _ = smol::fs::remove_file(self.path_of(&sha)).await;
        }
        Ok(())
    }

    /// Fetches an artifact a rollout from the hub names, into
    /// `.fetch-{sha256}.part` (kept across failures and restarts, so the
    /// next attempt resumes with Range), then verifies and stores it like
    /// an upload. Content that fails verification is deleted.
    pub(crate) async fn fetch(
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
        self.import_file(part, meta).await
    }

    /// Stores a file already in the artifact directory (a fetch's partial
    /// file, a hawkBit device chunk) like an upload: hashed as it is now
    /// (it may have been resumed), verified, renamed into place. Content
    /// that fails verification is deleted: bad bytes are never kept.
    pub(crate) async fn import_file(
        &self,
        part: PathBuf,
        meta: NewArtifact,
    ) -> Result<Artifact, FirmwareError> {
        // The metadata is checked by the callers before they fetch, and
        // again by `finish_upload`.
        // Hash what is on disk (the file may have been resumed).
        let path = part.clone();
        // The closure runs on the blocking pool.
        #[allow(clippy::disallowed_methods)]
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firmware::base64_encode;
    use crate::firmware::Settings;
    use crate::store::Store;
    use ring::signature::KeyPair;

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
