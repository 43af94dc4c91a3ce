//! The ed25519 public-key format `firmware.public_keys` is written in:
//! base64 of the 32 raw bytes or a PEM `PUBLIC KEY` block. It lives here,
//! at the bottom, because the config check needs it and must not reach up
//! into `firmware`; firmware uses it from here.

/// SubjectPublicKeyInfo prefix of an ed25519 key (RFC 8410): what a PEM
/// `PUBLIC KEY` block holds before the 32 key bytes.
pub(crate) const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// An ed25519 public key: base64 of the 32 raw bytes, or a PEM `PUBLIC
/// KEY` block (as `openssl pkey -pubout` writes).
pub fn parse_public_key(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    let b64: String = if s.starts_with("-----BEGIN") {
        s.lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::trim)
            .collect()
    } else {
        s.to_owned()
    };
    let raw = base64_decode(&b64).ok_or("not base64 (or a PEM PUBLIC KEY block)")?;
    let key = match raw.len() {
        32 => raw.as_slice(),
        44 if raw[..12] == ED25519_SPKI_PREFIX => &raw[12..],
        n => return Err(format!("{n} bytes is not an ed25519 public key (32 raw bytes or a 44-byte SubjectPublicKeyInfo)")),
    };
    let mut out = [0u8; 32];
    out.copy_from_slice(key);
    Ok(out)
}

/// Standard or URL-safe base64, padding optional. Small enough not to be
/// worth a crate.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_pem_keys_parse() {
        let raw = [7u8; 32];
        let b64 = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
        assert_eq!(parse_public_key(b64).unwrap(), raw);
        assert!(parse_public_key("AAAA").is_err());
        assert_eq!(base64_decode("Zm9v"), Some(b"foo".to_vec()));
        assert_eq!(base64_decode("Zm9v!"), None);
    }
}
