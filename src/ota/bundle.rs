//! Bundles for the `uboot` and `grub` backends: an image file plus a signed
//! manifest next to it (`<image>.manifest`), and the staging copy.
//!
//! The manifest is small JSON: `{"version", "size", "sha256", "signature"}`.
//! The signature (ed25519, hex) covers the canonical text
//! `konsul-ota-v1\n{version}\n{size}\n{sha256}\n`, not the image: the image
//! may be hundreds of MB and is checked by streaming its SHA-256 against
//! the signed digest. A hub rollout (`rollout`) carries the same four
//! fields (plus a URL), so both inputs are shape-checked and verified by
//! the same functions.
//!
//! The bundle is copied into the work directory before it is verified, and
//! the verified copy is what gets written: a USB stick pulled out (or a file
//! replaced) after verification cannot change what is installed. The copy
//! resumes where a power cut left it (the partial file's length is the
//! offset) and honours the bandwidth cap. A hub rollout's bundle is
//! downloaded into the same staged file the same way (HTTP Range from its
//! length, `sync::transport::Fetcher`), then verified by the same code.
//!
//! Everything here blocks and runs on the blocking pool (through
//! `writer::run` or `smol::unblock`); the copy and the slot writer check
//! their cancel flag per chunk, so a timed-out step stops them within one
//! chunk.
// Blocking-pool code only (module note): the executor's lint against
// blocking calls does not apply here.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ring::digest::{Context, SHA256};
use ring::signature::{UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("public key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("manifest signature does not verify with any of the {keys} configured public keys")]
    BadSignature { keys: usize },
    #[error("image digest mismatch: manifest says {expected}, image is {actual}")]
    Digest { expected: String, actual: String },
    #[error("image size mismatch: manifest says {expected} bytes, image has {actual}")]
    Size { expected: u64, actual: u64 },
    #[error("{path}: writing stopped (cancelled after {done} bytes)")]
    Cancelled { path: PathBuf, done: u64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a signer vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: String,
    pub size: u64,
    /// Lower-case hex SHA-256 of the image.
    pub sha256: String,
    /// Hex ed25519 signature over [`Manifest::signed_text`].
    pub signature: String,
}

impl Manifest {
    pub fn signed_text(version: &str, size: u64, sha256: &str) -> String {
        format!("konsul-ota-v1\n{version}\n{size}\n{sha256}\n")
    }

    /// `<image>.manifest`, parsed and shape-checked (not yet verified).
    pub fn load(image: &Path) -> Result<Manifest, BundleError> {
        let path = manifest_path(image);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        let bad = |message: String| BundleError::Manifest {
            path: path.clone(),
            message,
        };
        let m: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        m.checked().map_err(bad)
    }

    /// Shape checks (not the signature), with the digest in lower case:
    /// the same rules for a manifest file and a hub rollout.
    pub fn checked(self) -> Result<Manifest, String> {
        if self.version.is_empty() || self.version.len() > 128 || self.version.contains('\n') {
            return Err("version: 1-128 characters, one line".into());
        }
        if self.sha256.len() != 64 || from_hex(&self.sha256).is_none() {
            return Err("sha256: 64 hex digits".into());
        }
        if from_hex(&self.signature).is_none_or(|s| s.len() != 64) {
            return Err("signature: 128 hex digits (ed25519)".into());
        }
        Ok(Manifest {
            sha256: self.sha256.to_ascii_lowercase(),
            ..self
        })
    }

    /// The signature against every configured key.
    pub fn verify(&self, keys: &[Vec<u8>]) -> Result<(), BundleError> {
        let sig = from_hex(&self.signature).unwrap_or_default();
        let text = Manifest::signed_text(&self.version, self.size, &self.sha256);
        if keys.iter().any(|k| {
            UnparsedPublicKey::new(&ED25519, k)
                .verify(text.as_bytes(), &sig)
                .is_ok()
        }) {
            Ok(())
        } else {
            Err(BundleError::BadSignature { keys: keys.len() })
        }
    }
}

pub fn manifest_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".manifest");
    PathBuf::from(s)
}

/// ed25519 public keys: 32 raw bytes, or 64 hex digits (whitespace ignored).
pub fn load_keys(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, BundleError> {
    paths
        .iter()
        .map(|p| {
            let raw = std::fs::read(p).map_err(io(p))?;
            if raw.len() == 32 {
                return Ok(raw);
            }
            let text: String = String::from_utf8_lossy(&raw)
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            match from_hex(&text) {
                Some(k) if k.len() == 32 => Ok(k),
                _ => Err(BundleError::Key {
                    path: p.clone(),
                    message: "expected 32 raw bytes or 64 hex digits".into(),
                }),
            }
        })
        .collect()
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sleeps as needed so that `done` bytes since `start` stay under `rate`
/// bytes per second (0 = no cap). Runs on the blocking pool.
fn throttle(rate: u64, start: Instant, done: u64) {
    if rate == 0 {
        return;
    }
    let due = Duration::from_secs_f64(done as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(start.elapsed()) {
        std::thread::sleep(wait);
    }
}

/// Copies `src` to `dst`, resuming after what `dst` already holds (a power
/// cut mid-copy). `progress(done, total)` is called per chunk. Blocking.
pub fn stage(
    src: &Path,
    dst: &Path,
    rate: u64,
    cancel: &AtomicBool,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64, BundleError> {
    let mut from = std::fs::File::open(src).map_err(io(src))?;
    let total = from.metadata().map_err(io(src))?.len();
    let mut to = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dst)
        .map_err(io(dst))?;
    let mut have = to.metadata().map_err(io(dst))?.len();
    if have > total {
        // Not a prefix of this source: start over.
        to.set_len(0).map_err(io(dst))?;
        have = 0;
    }
    if have > 0 {
        log::info!("ota: resuming the copy of {} at byte {have}", src.display());
    }
    from.seek(SeekFrom::Start(have)).map_err(io(src))?;
    to.seek(SeekFrom::Start(have)).map_err(io(dst))?;
    let start = Instant::now();
    let mut done = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err(BundleError::Cancelled {
                path: dst.to_path_buf(),
                done: have + done,
            });
        }
        let n = from.read(&mut buf).map_err(io(src))?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).map_err(io(dst))?;
        done += n as u64;
        progress(have + done, total);
        throttle(rate, start, done);
    }
    to.sync_all().map_err(io(dst))?;
    Ok(have + done)
}

/// SHA-256 of the first `len` bytes of `path` (all of it when None), and
/// the number of bytes read. Blocking.
pub fn sha256_file(path: &Path, len: Option<u64>) -> Result<(String, u64), BundleError> {
    let f = std::fs::File::open(path).map_err(io(path))?;
    let mut r: Box<dyn Read> = match len {
        Some(n) => Box::new(f.take(n)),
        None => Box::new(f),
    };
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut n_total = 0u64;
    loop {
        let n = r.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        n_total += n as u64;
    }
    Ok((to_hex(ctx.finish().as_ref()), n_total))
}

/// The staged image against its (already signature-checked) manifest.
pub fn check_image(path: &Path, m: &Manifest) -> Result<(), BundleError> {
    let (digest, size) = sha256_file(path, None)?;
    if size != m.size {
        return Err(BundleError::Size {
            expected: m.size,
            actual: size,
        });
    }
    if digest != m.sha256 {
        return Err(BundleError::Digest {
            expected: m.sha256.clone(),
            actual: digest,
        });
    }
    Ok(())
}

/// Writes `image` to the slot device `dev`, syncs, and reads the written
/// bytes back from the medium against the manifest digest ([`read_back`]):
/// a device that drops writes is caught here, not at the next boot. Stops
/// at the next chunk once `cancel` is set. Blocking.
pub fn write_slot(
    image: &Path,
    dev: &Path,
    m: &Manifest,
    cancel: &AtomicBool,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), BundleError> {
    let mut from = std::fs::File::open(image).map_err(io(image))?;
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .map_err(io(dev))?;
    let is_file = to.metadata().map_err(io(dev))?.is_file();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err(BundleError::Cancelled {
                path: dev.to_path_buf(),
                done,
            });
        }
        let n = from.read(&mut buf).map_err(io(image))?;
        if n == 0 {
            break;
        }
        to.write_all(&buf[..n]).map_err(io(dev))?;
        done += n as u64;
        progress(done, m.size);
    }
    if is_file {
        // Image-file slots (tests, loop setups): drop a longer old image's
        // tail so the slot is exactly the new image.
        to.set_len(done).map_err(io(dev))?;
    }
    to.sync_all().map_err(io(dev))?;
    drop(to);
    read_back(dev, m)
}

/// The first `m.size` bytes of the slot `dev` against the manifest, read
/// from the medium: after `sync_all` the page cache still holds what was
/// written, and a device that dropped the writes would read back fine from
/// there. So the cache is dropped (`BLKFLSBUF` for a block device, whose
/// cache the kernel keeps while anyone else has it open, and
/// `posix_fadvise(DONTNEED)`; its pages are clean after the sync), and the
/// bytes are read with `O_DIRECT` where the filesystem has it. Blocking.
pub fn read_back(dev: &Path, m: &Manifest) -> Result<(), BundleError> {
    drop_cache(dev)?;
    let (digest, n) = match sha256_direct(dev, m.size) {
        Ok(r) => r,
        // No O_DIRECT here (some filesystems refuse it): a buffered read,
        // of a cache dropped just now.
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => sha256_file(dev, Some(m.size))?,
        Err(e) => return Err(io(dev)(e)),
    };
    if n != m.size || digest != m.sha256 {
        return Err(BundleError::Digest {
            expected: m.sha256.clone(),
            actual: format!("{digest} (read back from {})", dev.display()),
        });
    }
    Ok(())
}

// BLKFLSBUF (linux/fs.h: _IO(0x12, 97)): flush and drop a block device's
// buffer cache.
nix::ioctl_none!(blkflsbuf, 0x12, 97);

/// Drops what the kernel caches of `dev` (see [`read_back`]).
fn drop_cache(dev: &Path) -> Result<(), BundleError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    let f = std::fs::File::open(dev).map_err(io(dev))?;
    if f.metadata().map_err(io(dev))?.file_type().is_block_device() {
        // SAFETY: BLKFLSBUF takes no argument, and `f` stays open for the call.
        if let Err(e) = unsafe { blkflsbuf(f.as_raw_fd()) } {
            // Needs CAP_SYS_ADMIN; without it O_DIRECT still reads the medium.
            log::debug!("ota: BLKFLSBUF on {}: {e}", dev.display());
        }
    }
    // Advice only: O_DIRECT below does not depend on it.
    if let Err(e) = nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    ) {
        log::debug!("ota: posix_fadvise on {}: {e}", dev.display());
    }
    Ok(())
}

/// SHA-256 of the first `len` bytes of `path` read with `O_DIRECT`
/// (aligned buffer, aligned offsets), and the number of bytes read.
fn sha256_direct(path: &Path, len: u64) -> std::io::Result<(String, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    // Covers the logical block size of every device we write slots to.
    const ALIGN: usize = 4096;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(path)?;
    let mut raw = vec![0u8; CHUNK + ALIGN];
    let off = raw.as_ptr().align_offset(ALIGN);
    let buf = &mut raw[off..off + CHUNK];
    let mut ctx = Context::new(&SHA256);
    let mut total = 0u64;
    while total < len {
        let n = f.read(buf)?;
        let take = n.min(usize::try_from(len - total).unwrap_or(usize::MAX));
        ctx.update(&buf[..take]);
        total += take as u64;
        if n < CHUNK {
            // The end (a file's last, short read): the next offset would
            // not be aligned anyway.
            break;
        }
    }
    Ok((to_hex(ctx.finish().as_ref()), total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    #[test]
    fn hex_round_trip_and_rejects() {
        assert_eq!(from_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(to_hex(&[0, 255, 16]), "00ff10");
        assert_eq!(from_hex("0"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn signature_verifies_only_with_the_right_key_and_text() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let sha = "ab".repeat(32);
        let sig = kp.sign(Manifest::signed_text("1.0", 10, &sha).as_bytes());
        let m = Manifest {
            version: "1.0".into(),
            size: 10,
            sha256: sha.clone(),
            signature: to_hex(sig.as_ref()),
        };
        let key = kp.public_key().as_ref().to_vec();
        assert!(m.verify(std::slice::from_ref(&key)).is_ok());
        let other =
            Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref())
                .unwrap();
        assert!(m.verify(&[other.public_key().as_ref().to_vec()]).is_err());
        let tampered = Manifest {
            size: 11,
            ..m.clone()
        };
        assert!(tampered.verify(&[key]).is_err());
    }

    #[test]
    fn staging_resumes_and_check_catches_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("img");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let dst = dir.path().join("staged");
        std::fs::write(&dst, &data[..70_000]).unwrap();
        let n = stage(&src, &dst, 0, &AtomicBool::new(false), |_, _| {}).unwrap();
        assert_eq!(n, data.len() as u64);
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        let (sha, _) = sha256_file(&src, None).unwrap();
        let m = Manifest {
            version: "1".into(),
            size: data.len() as u64,
            sha256: sha,
            signature: String::new(),
        };
        check_image(&dst, &m).unwrap();
        let mut bad = data.clone();
        bad[5] ^= 1;
        std::fs::write(&dst, &bad).unwrap();
        assert!(matches!(
            check_image(&dst, &m),
            Err(BundleError::Digest { .. })
        ));
    }
}
