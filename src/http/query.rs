//! Query strings and percent-decoding of path segments.

use hyper::StatusCode;

use super::errors::error;
use super::Resp;

/// The query string as pairs, percent-decoded (after [`check_target`]).
pub(super) fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            // `+` is a space only in query strings, never in paths.
            (decoded(&k.replace('+', " ")), decoded(&v.replace('+', " ")))
        })
        .collect()
}

/// Strict percent-decoding (RFC 3986): `%` takes two hex digits and the
/// bytes must be UTF-8. Decoding leniently (to U+FFFD) made `/kv/%FF` and
/// `/kv/%FE` the same key.
pub(super) fn percent_decode(s: &str) -> Result<String, PercentError> {
    let bytes = s.as_bytes();
    if !bytes.contains(&b'%') {
        return Ok(s.to_owned());
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        let hex = |j: usize| bytes.get(j).and_then(|b| (*b as char).to_digit(16));
        match (hex(i + 1), hex(i + 2)) {
            (Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            _ => {
                let end = (i + 3).min(bytes.len());
                return Err(PercentError::BadEscape {
                    escape: String::from_utf8_lossy(&bytes[i..end])
                        .escape_debug()
                        .to_string(),
                });
            }
        }
    }
    String::from_utf8(out).map_err(|_| PercentError::NotUtf8)
}

#[derive(Debug, thiserror::Error)]
pub(super) enum PercentError {
    #[error("invalid percent-encoding `{escape}` in the request target: `%` takes two hex digits")]
    BadEscape { escape: String },
    #[error("percent-encoded bytes in the request target are not UTF-8")]
    NotUtf8,
}

/// Refuses a request target with any invalid escape, in the path or the
/// query, before anything routes on it.
pub(super) fn check_target(uri: &hyper::Uri) -> Result<(), PercentError> {
    percent_decode(uri.path())?;
    for p in uri.query().unwrap_or("").split('&') {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        percent_decode(k)?;
        percent_decode(v)?;
    }
    Ok(())
}

/// A piece of a target [`check_target`] passed, decoded. An invalid escape
/// cannot get here; were one to, it stays as sent rather than be guessed.
pub(super) fn decoded(s: &str) -> String {
    percent_decode(s).unwrap_or_else(|_| s.to_owned())
}

pub(super) struct Query(pub(super) Vec<(String, String)>);

impl Query {
    pub(super) fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1" | ""))
    }

    pub(super) fn cas(&self) -> Result<Option<u64>, Box<Resp>> {
        match self.get("cas") {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| Box::new(error(StatusCode::BAD_REQUEST, "Invalid CAS parameter"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        let ok = |s| percent_decode(s).ok();
        assert_eq!(ok("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(ok("a+b").as_deref(), Some("a+b"));
        assert_eq!(ok("%C3%A9").as_deref(), Some("\u{e9}"));
        assert_eq!(
            query_pairs(Some("k=a+b&cas=1")),
            vec![("k".into(), "a b".into()), ("cas".into(), "1".into())]
        );
        // Each of these used to decode to something, and two to the same
        // U+FFFD.
        for bad in [
            "100%", "%zz", "x%4", "%G1", "%F", "%+1", "%FF", "%FE", "%C3%28",
        ] {
            assert!(percent_decode(bad).is_err(), "{bad}");
        }
        let uri = |s: &str| s.parse::<hyper::Uri>().ok();
        assert!(uri("/kv/a?cas=%FF").is_some_and(|u| check_target(&u).is_err()));
        assert!(uri("/kv/%E2%82%AC?x=%20").is_some_and(|u| check_target(&u).is_ok()));
    }
}
