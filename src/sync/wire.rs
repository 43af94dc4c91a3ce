//! Wire format: the prost types generated from `proto/`, snappy framing,
//! size limits, and conversion to and from the store's [`Record`]. The
//! protobuf types never leave the sync module.
//!
//! A hub decodes a request in bounded memory whatever it carries: snappy's
//! length header is checked against [`MAX_REQUEST_DECODED`] before anything
//! is decompressed; the decoded bytes are walked once, without allocating,
//! to count updates and telemetry points against [`MAX_UPDATES`] and
//! [`MAX_TELEMETRY`]; then only the request's head is decoded, and the
//! updates one at a time as they are validated and applied
//! ([`Request::updates`]). So one request costs the hub its body, its
//! decoded bytes (at most 4 MiB) and one update, not the 100-odd bytes of
//! heap per update that decoding a whole `EdgeSyncRequest` takes (a 1 MB
//! snappy body of 381,300 tiny updates cost 433 MB that way). The sync
//! client pages its outbox within the same limits, so a legitimate edge
//! never meets them. Every clock and stamp from the wire goes through
//! `clock::check_remote`.

use prost::Message;

use crate::clock::{check_remote, ClockError, Hlc, VersionVector};
use crate::crdt::{self, FieldStamps, Stamp};
use crate::store::{Kind, Record};

#[allow(clippy::all, missing_docs)]
pub(crate) mod pb {
    include!(concat!(env!("OUT_DIR"), "/konsul.edge.v1.rs"));
}

pub(crate) use pb::{EdgeSyncRequest, EdgeSyncResponse, FieldStamp, RecordKind, ServiceUpdate};

/// Largest compressed body either side accepts.
pub const MAX_COMPRESSED: usize = 8 << 20;
/// Largest decompressed response (snappy states it up front, so this is
/// checked before allocating). Responses are paged by the hub to at most
/// 4 MiB plus one record; an edge allows the page it asked for plus
/// [`RESPONSE_SLACK`] ([`decode_response`]), less than this with a small
/// `memory_limit`.
pub const MAX_DECODED: usize = 32 << 20;
/// Largest decoded request a hub accepts: what one request may cost it.
/// The client's batches ([`UPDATE_BYTES`] + [`TELEMETRY_BYTES`] + the head)
/// always fit.
pub const MAX_REQUEST_DECODED: usize = 4 << 20;
/// Updates per request. The client sends at most this many per round and
/// pages the rest (it did so before there was a limit).
pub const MAX_UPDATES: usize = 1000;
/// Telemetry points per request (the client's batch).
pub const MAX_TELEMETRY: usize = 500;
/// Encoded bytes of updates the client puts in one request, whatever
/// `sync.max_batch_bytes` says; one update larger than that (a record
/// body may be 512 KiB) still goes alone.
pub const UPDATE_BYTES: usize = 2 << 20;
/// Encoded bytes of telemetry the client puts in one request.
pub const TELEMETRY_BYTES: usize = 512 << 10;
pub const CONTENT_TYPE: &str = "application/x-protobuf";

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("sync body of {0} bytes exceeds the {MAX_COMPRESSED}-byte limit")]
    TooLarge(usize),
    #[error("sync body is not snappy-compressed data: {0}")]
    Snappy(String),
    #[error("sync body decodes to {len} bytes, over the {max}-byte limit")]
    Bomb { len: usize, max: usize },
    #[error("sync body is not a valid {what}: {source}")]
    Decode {
        what: &'static str,
        source: prost::DecodeError,
    },
    #[error("sync body is not a valid EdgeSyncRequest: malformed field at byte {at}")]
    Malformed { at: usize },
    #[error(
        "sync request carries {count} {what}, over the limit of {max} per request \
         (edges send their outbox in batches within it)"
    )]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error(transparent)]
    Clock(#[from] ClockError),
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
    let bytes = decompress(body, compressed, MAX_DECODED)?;
    M::decode(&bytes[..]).map_err(|source| WireError::Decode { what, source })
}

/// Beyond the page an edge asks for, what a hub's answer may hold: the
/// one record that crosses the page boundary (as large as any request
/// could have carried it) and the conflict and telemetry lists.
const RESPONSE_SLACK: usize = MAX_REQUEST_DECODED + (1 << 20);

/// Decodes a hub's answer to a request that asked for `page` bytes: an
/// answer that says it decodes to more is refused before anything is
/// decompressed, so a hub (or something posing as one) cannot make an
/// edge with a small `memory_limit` allocate 32 MiB twice.
pub(crate) fn decode_response(
    body: &[u8],
    compressed: bool,
    page: usize,
) -> Result<EdgeSyncResponse, WireError> {
    let max = page.saturating_add(RESPONSE_SLACK).min(MAX_DECODED);
    let bytes = decompress(body, compressed, max)?;
    EdgeSyncResponse::decode(&bytes[..]).map_err(|source| WireError::Decode {
        what: "EdgeSyncResponse",
        source,
    })
}

/// The message bytes of `body`, at most `max` of them: a compressed body's
/// length header is checked before anything is allocated.
fn decompress(
    body: &[u8],
    compressed: bool,
    max: usize,
) -> Result<std::borrow::Cow<'_, [u8]>, WireError> {
    if body.len() > MAX_COMPRESSED {
        return Err(WireError::TooLarge(body.len()));
    }
    if !compressed {
        if body.len() > max {
            return Err(WireError::Bomb {
                len: body.len(),
                max,
            });
        }
        return Ok(body.into());
    }
    let len = snap::raw::decompress_len(body).map_err(|e| WireError::Snappy(e.to_string()))?;
    if len > max {
        return Err(WireError::Bomb { len, max });
    }
    snap::raw::Decoder::new()
        .decompress_vec(body)
        .map(Into::into)
        .map_err(|e| WireError::Snappy(e.to_string()))
}

/// `EdgeSyncRequest` without its updates (field 3) and vector clock (4,
/// unused): prost skips those without allocating.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct RequestHead {
    #[prost(string, tag = "1")]
    pub edge_id: String,
    #[prost(int64, tag = "2")]
    pub last_sync_index: i64,
    #[prost(string, tag = "5")]
    pub batch_id: String,
    #[prost(bool, tag = "6")]
    pub full_sync: bool,
    #[prost(uint32, tag = "7")]
    pub max_response_bytes: u32,
    #[prost(message, optional, tag = "8")]
    pub telemetry: Option<pb::TelemetryBatch>,
    #[prost(uint64, tag = "9")]
    pub hlc: u64,
    #[prost(message, optional, tag = "10")]
    pub status: Option<pb::EdgeStatus>,
}

const UPDATES_FIELD: u32 = 3;
const TELEMETRY_FIELD: u32 = 8;
const POINTS_FIELD: u32 = 1;

/// A decoded request whose updates are decoded on demand, one at a time.
pub(crate) struct Request {
    pub head: RequestHead,
    raw: Vec<u8>,
    /// How many updates it carries (at most [`MAX_UPDATES`]).
    pub update_count: usize,
}

/// Decodes a request within the limits above (see the module note).
pub(crate) fn decode_request(body: &[u8], compressed: bool) -> Result<Request, WireError> {
    let raw = decompress(body, compressed, MAX_REQUEST_DECODED)?.into_owned();
    let (mut updates, mut points) = (0, 0);
    for field in Fields::new(&raw) {
        let (number, payload) = field?;
        match number {
            UPDATES_FIELD => updates += 1,
            TELEMETRY_FIELD => {
                for f in Fields::new(payload) {
                    points += usize::from(f?.0 == POINTS_FIELD);
                }
            }
            _ => {}
        }
    }
    for (what, count, max) in [
        ("updates", updates, MAX_UPDATES),
        ("telemetry points", points, MAX_TELEMETRY),
    ] {
        if count > max {
            return Err(WireError::TooMany { what, count, max });
        }
    }
    let head = RequestHead::decode(&raw[..]).map_err(|source| WireError::Decode {
        what: "EdgeSyncRequest",
        source,
    })?;
    Ok(Request {
        head,
        raw,
        update_count: updates,
    })
}

impl Request {
    /// The updates in order, each decoded and validated ([`from_update`])
    /// as it is reached.
    pub fn updates(&self) -> impl Iterator<Item = Result<Incoming, WireError>> + '_ {
        Fields::new(&self.raw)
            .filter(|f| !matches!(f, Ok((n, _)) if *n != UPDATES_FIELD))
            .enumerate()
            .map(|(i, f)| {
                let (_, payload) = f?;
                let u = ServiceUpdate::decode(payload).map_err(|source| WireError::Decode {
                    what: "ServiceUpdate",
                    source,
                })?;
                from_update(i, u)
            })
    }
}

/// The top-level fields of an encoded message: (field number, payload of
/// a length-delimited field, else empty). Allocates nothing; stops after
/// the first malformed field, which it reports.
struct Fields<'a> {
    buf: &'a [u8],
    at: usize,
    failed: bool,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fields {
            buf,
            at: 0,
            failed: false,
        }
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.at)?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn skip(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.buf.len())?;
        let out = &self.buf[self.at..end];
        self.at = end;
        Some(out)
    }

    fn field(&mut self) -> Option<(u32, &'a [u8])> {
        let key = self.varint()?;
        let number = u32::try_from(key >> 3).ok()?;
        let payload = match key & 7 {
            0 => self.varint().map(|_| &[][..])?,
            1 => self.skip(8).map(|_| &[][..])?,
            2 => {
                let n = usize::try_from(self.varint()?).ok()?;
                self.skip(n)?
            }
            5 => self.skip(4).map(|_| &[][..])?,
            // Groups (3, 4) are deprecated; nothing of ours uses them.
            _ => return None,
        };
        Some((number, payload))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, &'a [u8]), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.at >= self.buf.len() {
            return None;
        }
        let start = self.at;
        let field = self.field();
        self.failed = field.is_none();
        Some(field.ok_or(WireError::Malformed { at: start }))
    }
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
    // A stamp from the far future would pin every later write behind it,
    // and carry the receiving clock there.
    let wall = crate::clock::wall_millis();
    check_remote(|| format!("{}: stamp", u.key), Hlc(u.hlc), wall)
        .map_err(|e| bad(e.to_string()))?;
    for (name, s) in &u.fields {
        check_remote(
            || format!("{}: stamp of field {name:?}", u.key),
            Hlc(s.hlc),
            wall,
        )
        .map_err(|e| bad(e.to_string()))?;
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
            Err(WireError::Bomb { .. })
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
        let mut u = update(r#"{"value":"v"}"#);
        let far = Hlc::new(crate::clock::wall_millis() + 400 * 86_400_000, 0).0;
        u.fields.insert(
            "value".into(),
            FieldStamp {
                hlc: far,
                origin: "edge-a".into(),
            },
        );
        let e = from_update(0, u).unwrap_err().to_string();
        assert!(e.contains("field \"value\"") && e.contains("ahead"), "{e}");
    }

    fn request(updates: usize, points: usize) -> EdgeSyncRequest {
        EdgeSyncRequest {
            edge_id: "e".into(),
            pending_updates: (0..updates)
                .map(|i| {
                    let mut u = update(r#"{"value":"v"}"#);
                    u.key = format!("k{i}");
                    u
                })
                .collect(),
            telemetry: (points > 0).then(|| pb::TelemetryBatch {
                points: vec![
                    pb::TelemetryPoint {
                        device_id: "d".into(),
                        ..Default::default()
                    };
                    points
                ],
            }),
            vector_clock: [("e".to_string(), 3)].into_iter().collect(),
            hlc: 7,
            ..Default::default()
        }
    }

    #[test]
    fn a_request_decoded_update_by_update_is_the_whole_message() {
        let req = request(MAX_UPDATES, MAX_TELEMETRY);
        for compress in [true, false] {
            let r = decode_request(&encode(&req, compress), compress).unwrap();
            assert_eq!(
                (r.update_count, r.head.hlc, r.head.edge_id.as_str()),
                (MAX_UPDATES, 7, "e")
            );
            assert_eq!(
                r.head.telemetry.as_ref().unwrap().points.len(),
                MAX_TELEMETRY
            );
            let keys: Vec<String> = r.updates().map(|u| u.unwrap().key).collect();
            let want: Vec<String> = req.pending_updates.iter().map(|u| u.key.clone()).collect();
            assert_eq!(keys, want);
        }
    }

    #[test]
    fn requests_over_a_limit_are_refused_before_they_are_decoded() {
        let too_many = |r: Result<Request, WireError>, want: &str| match r {
            Err(WireError::TooMany { what, .. }) => assert_eq!(what, want),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted"),
        };
        too_many(
            decode_request(&encode(&request(MAX_UPDATES + 1, 0), true), true),
            "updates",
        );
        too_many(
            decode_request(&encode(&request(0, MAX_TELEMETRY + 1), false), false),
            "telemetry points",
        );
        // Snappy's header is read first: a body claiming 5 MiB decoded is
        // refused without decompressing it.
        let claims_5mib = [0x80, 0x80, 0xc0, 0x02, 0x00];
        assert!(matches!(
            decode_request(&claims_5mib, true),
            Err(WireError::Bomb { len, max: MAX_REQUEST_DECODED }) if len == 5 << 20
        ));
        assert!(matches!(
            decode_request(&vec![0; MAX_REQUEST_DECODED + 1], false),
            Err(WireError::Bomb { .. })
        ));
    }

    #[test]
    fn malformed_requests_are_refused() {
        for bad in [
            &[0x1a, 0x05, 0x00][..], // update field longer than the body
            &[0x1b][..],             // a group
            &[0x08][..],             // a varint cut short
            &[0x42, 0x02, 0x0a][..], // telemetry holding a cut-short point
        ] {
            assert!(decode_request(bad, false).is_err(), "{bad:?}");
        }
        // An update that is not a valid ServiceUpdate is refused by
        // walking the updates, as the hub does before applying any.
        let r = decode_request(&[0x0a, 0x01, b'e', 0x1a, 0x01, 0xff], false).unwrap();
        assert!(r.updates().any(|u| u.is_err()));
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
