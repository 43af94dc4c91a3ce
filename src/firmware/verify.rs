//! What an uploader declares (names, digest, notes, signature encoding)
//! and the ed25519 check of a digest against `firmware.public_keys`, with
//! the hex and base64 that digests and signatures travel in. Pure
//! functions, no I/O: used at upload, at fetch and when a rollout starts.

use ring::signature::{UnparsedPublicKey, ED25519};

use super::{FirmwareError, NewArtifact, MAX_NOTES};
use crate::config::base64_decode;

pub(crate) fn check_meta(meta: &NewArtifact) -> Result<(), FirmwareError> {
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
pub(super) fn verify(
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

/// 64 lowercase hex digits: a SHA-256 digest as artifacts are named.
pub(crate) fn is_sha256(s: &str) -> bool {
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
    use crate::config::{parse_public_key, ED25519_SPKI_PREFIX};
    use ring::digest;
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
        let mut spki = ED25519_SPKI_PREFIX.to_vec();
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
}
