//! Wire format: the prost types generated from `proto/`, snappy framing,
//! size limits, and conversion to and from the store's [`Record`]. The
//! protobuf types never leave the sync module.

use prost::Message;

use crate::clock::{Hlc, VersionVector};
use crate::crdt::{self, FieldStamps, Stamp};
use crate::store::{Kind, Record};

#[allow(clippy::all, missing_docs)]
pub(crate) mod pb {
    include!(concat!(env!("OUT_DIR"), "/konsul.edge.v1.rs"));
}

pub(crate) use pb::{EdgeSyncRequest, EdgeSyncResponse, FieldStamp, RecordKind, ServiceUpdate};

/// Largest compressed body either side accepts.
pub const MAX_COMPRESSED: usize = 8 << 20;
/// Largest decompressed message (snappy states it up front, so this is
/// checked before allocating).
pub const MAX_DECODED: usize = 32 << 20;
pub const CONTENT_TYPE: &str = "application/x-protobuf";

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("sync body of {0} bytes exceeds the {MAX_COMPRESSED}-byte limit")]
    TooLarge(usize),
    #[error("sync body is not snappy-compressed data: {0}")]
    Snappy(String),
    #[error("sync body decompresses to {0} bytes, over the {MAX_DECODED}-byte limit")]
    Bomb(usize),
    #[error("sync body is not a valid {what}: {source}")]
    Decode {
        what: &'static str,
        source: prost::DecodeError,
    },
    #[error("update {index}: {detail}")]
    BadUpdate { index: usize, detail: String },
}

pub fn encode<M: Message>(msg: &M, compress: bool) -> Vec<u8> {
    let raw = msg.encode_to_vec();
    if !compress {
        return raw;
    }
    snap::raw::Encoder::new().compress_vec(&raw).unwrap_or(raw)
}

pub fn decode<M: Message + Default>(
    body: &[u8],
    compressed: bool,
    what: &'static str,
) -> Result<M, WireError> {
    if body.len() > MAX_COMPRESSED {
        return Err(WireError::TooLarge(body.len()));
    }
    let raw;
    let bytes = if compressed {
        let len = snap::raw::decompress_len(body).map_err(|e| WireError::Snappy(e.to_string()))?;
        if len > MAX_DECODED {
            return Err(WireError::Bomb(len));
        }
        raw = snap::raw::Decoder::new()
            .decompress_vec(body)
            .map_err(|e| WireError::Snappy(e.to_string()))?;
        &raw[..]
    } else {
        body
    };
    M::decode(bytes).map_err(|source| WireError::Decode { what, source })
}

pub fn kind_to_wire(k: Kind) -> RecordKind {
    match k {
        Kind::Service => RecordKind::Service,
        Kind::Kv => RecordKind::Kv,
        Kind::Device => RecordKind::Device,
        Kind::Alert => RecordKind::Alert,
        Kind::Rollout => RecordKind::Rollout,
    }
}

pub fn kind_from_wire(k: i32) -> Option<Kind> {
    match RecordKind::try_from(k).ok()? {
        RecordKind::Service => Some(Kind::Service),
        RecordKind::Kv => Some(Kind::Kv),
        RecordKind::Device => Some(Kind::Device),
        RecordKind::Alert => Some(Kind::Alert),
        RecordKind::Rollout => Some(Kind::Rollout),
        RecordKind::Unspecified => None,
    }
}

pub fn to_update(r: &Record) -> ServiceUpdate {
    ServiceUpdate {
        kind: kind_to_wire(r.kind) as i32,
        key: r.key.clone(),
        name: r.name.clone().unwrap_or_default(),
        body: r.body.clone().into_bytes(),
        hlc: r.hlc.0,
        origin: r.origin.clone(),
        vector_clock: r.vv.0.clone(),
        tombstone: r.tombstone,
        fields: r
            .fields
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    FieldStamp {
                        hlc: s.hlc,
                        origin: s.origin.clone(),
                    },
                )
            })
            .collect(),
        index: r.modify_index as i64,
    }
}

/// A validated incoming version: what the merge needs, nothing trusted.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub kind: Kind,
    pub key: String,
    pub version: crdt::Version,
}

/// A local key (`registry::MAX_KEY_LEN`) plus room for two levels of hub
/// qualification (`{edge}\u{1f}`, edge ids up to 128 bytes).
pub const MAX_KEY: usize = crate::registry::MAX_KEY_LEN + 2 * 129;
pub const MAX_BODY: usize = 512 * 1024;
const MAX_ORIGIN: usize = 128;

/// Checks one update from the wire; `index` names it in errors.
pub fn from_update(index: usize, u: ServiceUpdate) -> Result<Incoming, WireError> {
    let bad = |detail: String| WireError::BadUpdate { index, detail };
    let kind =
        kind_from_wire(u.kind).ok_or_else(|| bad(format!("unknown record kind {}", u.kind)))?;
    // A hub forwards the records it keeps per edge (`engine::QUALIFIER`)
    // to its own hub; no other control character belongs in a key.
    let bad_char = |c: char| c.is_control() && c != super::engine::QUALIFIER;
    if u.key.is_empty() || u.key.len() > MAX_KEY || u.key.chars().any(bad_char) {
        return Err(bad(format!("invalid key {:?}", u.key)));
    }
    let ident_ok =
        |s: &str| !s.is_empty() && s.len() <= MAX_ORIGIN && !s.chars().any(char::is_control);
    if !ident_ok(&u.origin) {
        return Err(bad(format!("{}: invalid origin {:?}", u.key, u.origin)));
    }
    if u.vector_clock.is_empty()
        || u.vector_clock.len() > 1024
        || !u.vector_clock.keys().all(|k| ident_ok(k))
    {
        return Err(bad(format!("{}: invalid vector clock", u.key)));
    }
    if u.body.len() > MAX_BODY {
        return Err(bad(format!(
            "{}: body of {} bytes (max {MAX_BODY})",
            u.key,
            u.body.len()
        )));
    }
    if Hlc(u.hlc).millis() > crate::clock::wall_millis() + 366 * 86_400_000 {
        // A stamp a year ahead would pin every later write behind it.
        return Err(bad(format!("{}: HLC timestamp far in the future", u.key)));
    }
    let text =
        String::from_utf8(u.body).map_err(|_| bad(format!("{}: body is not UTF-8", u.key)))?;
    let body = if text.is_empty() {
        "{}".to_owned()
    } else {
        crdt::canonical(&text).map_err(|e| bad(format!("{}: {e}", u.key)))?
    };
    if !u.tombstone {
        validate_body(kind, &body).map_err(|e| bad(format!("{}: {e}", u.key)))?;
    }
    let fields: FieldStamps = u
        .fields
        .into_iter()
        .map(|(k, s)| {
            (
                k,
                Stamp {
                    hlc: s.hlc,
                    origin: s.origin,
                },
            )
        })
        .collect();
    Ok(Incoming {
        kind,
        key: u.key,
        version: crdt::Version {
            body,
            hlc: Hlc(u.hlc),
            origin: u.origin,
            vv: VersionVector(u.vector_clock),
            tombstone: u.tombstone,
            fields,
        },
    })
}

/// The same rules a local write meets, so the hub cannot be used to plant
/// a service the API would have refused.
fn validate_body(kind: Kind, body: &str) -> Result<(), String> {
    match kind {
        Kind::Service => {
            let s: crate::registry::ServiceInput =
                serde_json::from_str(body).map_err(|e| e.to_string())?;
            crate::registry::validate_service(s, 0)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Kind::Kv => {
            #[derive(serde::Deserialize)]
            struct Kv {
                #[allow(dead_code)]
                value: String,
            }
            serde_json::from_str::<Kv>(body)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Kind::Device | Kind::Alert | Kind::Rollout => Ok(()),
    }
}

/// Content id of a batch: a retry of the same batch has the same id.
pub fn batch_id(edge: &str, updates: &[ServiceUpdate]) -> String {
    // FNV-1a over the encoded updates: stable across builds, no dependency.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    feed(edge.as_bytes());
    for u in updates {
        feed(&u.encode_to_vec());
    }
    format!("{h:016x}-{}", updates.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(body: &str) -> ServiceUpdate {
        ServiceUpdate {
            kind: RecordKind::Kv as i32,
            key: "k".into(),
            body: body.as_bytes().to_vec(),
            hlc: Hlc::new(crate::clock::wall_millis(), 0).0,
            origin: "edge-a".into(),
            vector_clock: [("edge-a".to_string(), 1)].into_iter().collect(),
            ..Default::default()
        }
    }

    #[test]
    fn roundtrip_with_and_without_snappy() {
        let req = EdgeSyncRequest {
            edge_id: "e".into(),
            pending_updates: vec![update(r#"{"value":"v"}"#)],
            ..Default::default()
        };
        for compress in [true, false] {
            let bytes = encode(&req, compress);
            let back: EdgeSyncRequest = decode(&bytes, compress, "request").unwrap();
            assert_eq!(back, req);
        }
    }

    #[test]
    fn rejects_garbage_truncation_and_bombs() {
        assert!(matches!(
            decode::<EdgeSyncRequest>(b"\xff\xff\xff", true, "r"),
            Err(WireError::Snappy(_))
        ));
        let good = encode(
            &EdgeSyncRequest {
                edge_id: "edge".into(),
                ..Default::default()
            },
            false,
        );
        assert!(matches!(
            decode::<EdgeSyncRequest>(&good[..good.len() - 1], false, "r"),
            Err(WireError::Decode { .. })
        ));
        // A snappy header claiming 1 GiB.
        let bomb = [0x80, 0x80, 0x80, 0x80, 0x04, 0x00];
        assert!(matches!(
            decode::<EdgeSyncRequest>(&bomb, true, "r"),
            Err(WireError::Bomb(_))
        ));
        assert!(matches!(
            decode::<EdgeSyncRequest>(&vec![0; MAX_COMPRESSED + 1], true, "r"),
            Err(WireError::TooLarge(_))
        ));
    }

    #[test]
    fn updates_are_validated_like_local_writes() {
        assert!(from_update(0, update(r#"{"value":"v"}"#)).is_ok());
        assert!(
            from_update(0, update(r#"{"value":5}"#)).is_err(),
            "KV value must be a string"
        );
        assert!(from_update(0, update("not json")).is_err());
        let mut svc = update(r#"{"name":"web","address":"","port":80}"#);
        svc.kind = RecordKind::Service as i32;
        assert!(from_update(0, svc).is_err(), "service without address");
        let mut u = update(r#"{"value":"v"}"#);
        u.kind = 99;
        assert!(from_update(0, u).is_err());
        let mut u = update(r#"{"value":"v"}"#);
        u.vector_clock.clear();
        assert!(from_update(0, u).is_err());
        let mut u = update(r#"{"value":"v"}"#);
        u.hlc = Hlc::new(crate::clock::wall_millis() + 400 * 86_400_000, 0).0;
        assert!(from_update(0, u).is_err());
    }

    #[test]
    fn random_and_mutated_bodies_never_panic() {
        // What the fuzz target does, in a bounded stable-toolchain run:
        // random bytes, and valid messages with bytes flipped and cut.
        let valid = encode(
            &EdgeSyncRequest {
                edge_id: "e".into(),
                pending_updates: vec![update(r#"{"value":"v"}"#); 3],
                ..Default::default()
            },
            false,
        );
        let mut rng = fastrand::Rng::with_seed(7);
        for i in 0..20_000 {
            let data: Vec<u8> = if i % 2 == 0 {
                (0..rng.usize(0..256)).map(|_| rng.u8(..)).collect()
            } else {
                let mut v = valid.clone();
                for _ in 0..rng.usize(1..4) {
                    let at = rng.usize(..v.len());
                    v[at] = rng.u8(..);
                }
                v.truncate(rng.usize(1..=v.len()));
                if i % 3 == 0 {
                    v = snap::raw::Encoder::new().compress_vec(&v).unwrap();
                }
                v
            };
            crate::sync::testing::decode_untrusted(&data);
        }
    }

    #[test]
    fn batch_ids_depend_on_content_only() {
        let a = vec![update(r#"{"value":"1"}"#)];
        let b = vec![update(r#"{"value":"2"}"#)];
        assert_eq!(batch_id("e", &a), batch_id("e", &a.clone()));
        assert_ne!(batch_id("e", &a), batch_id("e", &b));
        assert_ne!(batch_id("e", &a), batch_id("f", &a));
    }
}
