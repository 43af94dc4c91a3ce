//! MQTT 3.1.1 and 5 packets to and from bytes: only the packets a client
//! sends or receives, only the properties it uses (the others are skipped).
//! Pure functions over byte slices, so the decoder can be fuzzed
//! (`fuzz/fuzz_targets/mqtt_packet.rs`) and never allocates more than the
//! packet it was given: the remaining length is checked against the cap
//! before a body is read.

use super::{CodecError, Version};

pub(crate) const CONNECT: u8 = 1;
pub(crate) const CONNACK: u8 = 2;
pub(crate) const PUBLISH: u8 = 3;
pub(crate) const PUBACK: u8 = 4;
pub(crate) const PUBREC: u8 = 5;
pub(crate) const PUBREL: u8 = 6;
pub(crate) const PUBCOMP: u8 = 7;
pub(crate) const SUBSCRIBE: u8 = 8;
pub(crate) const SUBACK: u8 = 9;
pub(crate) const UNSUBACK: u8 = 11;
pub(crate) const PINGREQ: u8 = 12;
pub(crate) const PINGRESP: u8 = 13;
pub(crate) const DISCONNECT: u8 = 14;

/// The largest remaining length MQTT can express (four length bytes).
pub(crate) const MAX_REMAINING: usize = 268_435_455;

// MQTT 5 property identifiers used here.
const SESSION_EXPIRY: u8 = 0x11;
const RECEIVE_MAXIMUM: u8 = 0x21;
const MAXIMUM_PACKET_SIZE: u8 = 0x27;
const REASON_STRING: u8 = 0x1F;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Will {
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) qos: u8,
    pub(crate) retain: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Connect {
    pub(crate) client_id: String,
    pub(crate) keep_alive: u16,
    pub(crate) clean_session: bool,
    pub(crate) will: Option<Will>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    /// MQTT 5 only: how many unacknowledged QoS 1/2 messages the broker
    /// may send us.
    pub(crate) receive_maximum: u16,
    /// MQTT 5 only: the largest packet we accept.
    pub(crate) maximum_packet_size: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Publish {
    pub(crate) dup: bool,
    pub(crate) qos: u8,
    pub(crate) retain: bool,
    pub(crate) topic: String,
    /// Present for QoS 1 and 2.
    pub(crate) id: Option<u16>,
    pub(crate) payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Packet {
    Connect(Box<Connect>),
    ConnAck {
        session_present: bool,
        /// 3.1.1 return code or MQTT 5 reason code; 0 is success.
        code: u8,
        /// MQTT 5: the broker's receive maximum (65,535 if absent).
        receive_maximum: Option<u16>,
    },
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        id: u16,
        filters: Vec<(String, u8)>,
    },
    SubAck {
        id: u16,
        codes: Vec<u8>,
    },
    UnsubAck(u16),
    PingReq,
    PingResp,
    Disconnect {
        /// MQTT 5 reason code (0 when absent and in 3.1.1).
        reason: u8,
    },
}

/// The fixed header of the packet at the start of `buf`: (first byte,
/// remaining length, header length), or None while incomplete. Errors
/// on a malformed length and on a remaining length above `max`, before
/// anything of the body is read.
pub(crate) fn header(buf: &[u8], max: usize) -> Result<Option<(u8, usize, usize)>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            if len > max {
                return Err(CodecError::TooLarge {
                    kind: first >> 4,
                    len,
                    max,
                });
            }
            return Ok(Some((first, len, 2 + i)));
        }
    }
    Err(CodecError::Malformed(
        "remaining length longer than four bytes",
    ))
}

/// Decodes the first complete packet in `buf`: the packet and how many
/// bytes it took, or None while incomplete.
pub(crate) fn decode_packet(
    buf: &[u8],
    version: Version,
    max: usize,
) -> Result<Option<(Packet, usize)>, CodecError> {
    let Some((first, len, hlen)) = header(buf, max)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(hlen..hlen + len) else {
        return Ok(None);
    };
    Ok(Some((decode(first, body, version)?, hlen + len)))
}

/// Decodes one packet from its first byte and its body (what the
/// remaining length covers).
pub(crate) fn decode(first: u8, body: &[u8], version: Version) -> Result<Packet, CodecError> {
    let flags = first & 0x0f;
    let mut r = Reader { buf: body, pos: 0 };
    let v5 = version == Version::V5;
    let packet = match first >> 4 {
        CONNACK => {
            expect_flags(flags, 0, "CONNACK")?;
            let ack = r.u8()?;
            if ack & 0xfe != 0 {
                return Err(CodecError::Malformed("CONNACK flags"));
            }
            let code = r.u8()?;
            let mut receive_maximum = None;
            // A broker without MQTT 5 answers a 5 CONNECT in 3.1.1 form
            // (two bytes, "unacceptable protocol version"): no properties.
            if v5 && !r.at_end() {
                r.properties(|id, value| {
                    if id == RECEIVE_MAXIMUM {
                        match value {
                            Prop::U16(0) => return Err(CodecError::Malformed("receive maximum 0")),
                            Prop::U16(n) => receive_maximum = Some(n),
                            _ => {}
                        }
                    }
                    Ok(())
                })?;
            }
            Packet::ConnAck {
                session_present: ack & 1 == 1,
                code,
                receive_maximum,
            }
        }
        PUBLISH => {
            let qos = (flags >> 1) & 3;
            if qos == 3 {
                return Err(CodecError::Malformed("PUBLISH with QoS 3"));
            }
            let topic = r.string()?;
            let id = if qos > 0 { Some(r.packet_id()?) } else { None };
            if v5 {
                r.properties(|_, _| Ok(()))?;
            }
            Packet::Publish(Publish {
                dup: flags & 8 != 0,
                qos,
                retain: flags & 1 != 0,
                topic,
                id,
                payload: r.rest().to_vec(),
            })
        }
        kind @ (PUBACK | PUBREC | PUBREL | PUBCOMP | UNSUBACK) => {
            let want = if kind == PUBREL { 2 } else { 0 };
            expect_flags(flags, want, "acknowledgement")?;
            let id = r.packet_id()?;
            // MQTT 5 adds a reason code and properties; both may be absent.
            if v5 && !r.at_end() {
                r.u8()?;
                if !r.at_end() && kind != UNSUBACK {
                    r.properties(|_, _| Ok(()))?;
                }
            }
            match kind {
                PUBACK => Packet::PubAck(id),
                PUBREC => Packet::PubRec(id),
                PUBREL => Packet::PubRel(id),
                PUBCOMP => Packet::PubComp(id),
                _ => Packet::UnsubAck(id),
            }
        }
        SUBACK => {
            expect_flags(flags, 0, "SUBACK")?;
            let id = r.packet_id()?;
            if v5 {
                r.properties(|_, _| Ok(()))?;
            }
            let codes = r.rest().to_vec();
            if codes.is_empty() {
                return Err(CodecError::Malformed("SUBACK without return codes"));
            }
            Packet::SubAck { id, codes }
        }
        SUBSCRIBE => {
            expect_flags(flags, 2, "SUBSCRIBE")?;
            let id = r.packet_id()?;
            if v5 {
                r.properties(|_, _| Ok(()))?;
            }
            let mut filters = Vec::new();
            while !r.at_end() {
                let f = r.string()?;
                filters.push((f, r.u8()? & 3));
            }
            if filters.is_empty() {
                return Err(CodecError::Malformed("SUBSCRIBE without filters"));
            }
            Packet::Subscribe { id, filters }
        }
        CONNECT => Packet::Connect(Box::new(decode_connect(&mut r)?)),
        PINGREQ => Packet::PingReq,
        PINGRESP => Packet::PingResp,
        DISCONNECT => {
            let reason = if v5 && !r.at_end() { r.u8()? } else { 0 };
            if v5 && !r.at_end() {
                r.properties(|_, _| Ok(()))?;
            }
            Packet::Disconnect { reason }
        }
        _ => return Err(CodecError::Malformed("unknown or unexpected packet type")),
    };
    // PUBLISH consumed its payload; every other packet must end here.
    if !r.at_end() {
        return Err(CodecError::Malformed("trailing bytes"));
    }
    Ok(packet)
}

/// CONNECT is only ever decoded by tests (round trips) and the fuzzer; a
/// client never receives one. The version comes from the packet itself.
fn decode_connect(r: &mut Reader<'_>) -> Result<Connect, CodecError> {
    if r.string()? != "MQTT" {
        return Err(CodecError::Malformed("CONNECT protocol name"));
    }
    let v5 = match r.u8()? {
        4 => false,
        5 => true,
        _ => return Err(CodecError::Malformed("CONNECT protocol level")),
    };
    let flags = r.u8()?;
    let keep_alive = r.u16()?;
    let mut c = Connect {
        client_id: String::new(),
        keep_alive,
        clean_session: flags & 2 != 0,
        will: None,
        username: None,
        password: None,
        receive_maximum: 0,
        maximum_packet_size: 0,
    };
    if v5 {
        r.properties(|id, value| {
            match (id, value) {
                (RECEIVE_MAXIMUM, Prop::U16(n)) => c.receive_maximum = n,
                (MAXIMUM_PACKET_SIZE, Prop::U32(n)) => c.maximum_packet_size = n,
                _ => {}
            }
            Ok(())
        })?;
    }
    c.client_id = r.string()?;
    if flags & 4 != 0 {
        if v5 {
            r.properties(|_, _| Ok(()))?;
        }
        let topic = r.string()?;
        let payload = r.binary()?.to_vec();
        c.will = Some(Will {
            topic,
            payload,
            qos: (flags >> 3) & 3,
            retain: flags & 0x20 != 0,
        });
    }
    if flags & 0x80 != 0 {
        c.username = Some(r.string()?);
    }
    if flags & 0x40 != 0 {
        let p = r.binary()?;
        c.password =
            Some(String::from_utf8(p.to_vec()).map_err(|_| CodecError::Malformed("password"))?);
    }
    Ok(c)
}

fn expect_flags(flags: u8, want: u8, what: &'static str) -> Result<(), CodecError> {
    if flags == want {
        Ok(())
    } else {
        Err(CodecError::Flags(what))
    }
}

impl Packet {
    /// Appends the packet's bytes to `out`.
    pub(crate) fn encode(&self, version: Version, out: &mut Vec<u8>) {
        let v5 = version == Version::V5;
        let mut body = Vec::new();
        let first = match self {
            Packet::Connect(c) => {
                put_str(&mut body, "MQTT");
                body.push(if v5 { 5 } else { 4 });
                let mut flags = 0u8;
                if c.clean_session {
                    flags |= 2;
                }
                if let Some(w) = &c.will {
                    flags |= 4 | (w.qos & 3) << 3;
                    if w.retain {
                        flags |= 0x20;
                    }
                }
                if c.password.is_some() {
                    flags |= 0x40;
                }
                if c.username.is_some() {
                    flags |= 0x80;
                }
                body.push(flags);
                body.extend_from_slice(&c.keep_alive.to_be_bytes());
                if v5 {
                    let mut props = Vec::new();
                    if !c.clean_session {
                        // MQTT 5 ends a session with its connection unless
                        // told otherwise; 3.1.1's clean session off keeps
                        // it for good.
                        props.push(SESSION_EXPIRY);
                        props.extend_from_slice(&u32::MAX.to_be_bytes());
                    }
                    props.push(RECEIVE_MAXIMUM);
                    props.extend_from_slice(&c.receive_maximum.max(1).to_be_bytes());
                    if c.maximum_packet_size > 0 {
                        props.push(MAXIMUM_PACKET_SIZE);
                        props.extend_from_slice(&c.maximum_packet_size.to_be_bytes());
                    }
                    put_varint(&mut body, props.len());
                    body.extend_from_slice(&props);
                }
                put_str(&mut body, &c.client_id);
                if let Some(w) = &c.will {
                    if v5 {
                        body.push(0);
                    }
                    put_str(&mut body, &w.topic);
                    put_bin(&mut body, &w.payload);
                }
                if let Some(u) = &c.username {
                    put_str(&mut body, u);
                }
                if let Some(p) = &c.password {
                    put_bin(&mut body, p.as_bytes());
                }
                CONNECT << 4
            }
            Packet::ConnAck {
                session_present,
                code,
                receive_maximum,
            } => {
                body.push(u8::from(*session_present));
                body.push(*code);
                if v5 {
                    match receive_maximum {
                        Some(n) => {
                            body.push(3);
                            body.push(RECEIVE_MAXIMUM);
                            body.extend_from_slice(&n.to_be_bytes());
                        }
                        None => body.push(0),
                    }
                }
                CONNACK << 4
            }
            Packet::Publish(p) => {
                put_str(&mut body, &p.topic);
                if let Some(id) = p.id {
                    body.extend_from_slice(&id.to_be_bytes());
                }
                if v5 {
                    body.push(0);
                }
                body.extend_from_slice(&p.payload);
                PUBLISH << 4 | u8::from(p.dup) << 3 | (p.qos & 3) << 1 | u8::from(p.retain)
            }
            // Two bytes: in MQTT 5 that means "success, no properties".
            Packet::PubAck(id) => ack(&mut body, *id, PUBACK << 4),
            Packet::PubRec(id) => ack(&mut body, *id, PUBREC << 4),
            Packet::PubRel(id) => ack(&mut body, *id, PUBREL << 4 | 2),
            Packet::PubComp(id) => ack(&mut body, *id, PUBCOMP << 4),
            Packet::UnsubAck(id) => ack(&mut body, *id, UNSUBACK << 4),
            Packet::Subscribe { id, filters } => {
                body.extend_from_slice(&id.to_be_bytes());
                if v5 {
                    body.push(0);
                }
                for (f, qos) in filters {
                    put_str(&mut body, f);
                    body.push(qos & 3);
                }
                SUBSCRIBE << 4 | 2
            }
            Packet::SubAck { id, codes } => {
                body.extend_from_slice(&id.to_be_bytes());
                if v5 {
                    body.push(0);
                }
                body.extend_from_slice(codes);
                SUBACK << 4
            }
            Packet::PingReq => PINGREQ << 4,
            Packet::PingResp => PINGRESP << 4,
            Packet::Disconnect { reason } => {
                if v5 && *reason != 0 {
                    body.push(*reason);
                }
                DISCONNECT << 4
            }
        };
        out.push(first);
        put_varint(out, body.len());
        out.extend_from_slice(&body);
    }
}

fn ack(body: &mut Vec<u8>, id: u16, first: u8) -> u8 {
    body.extend_from_slice(&id.to_be_bytes());
    first
}

fn put_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// Strings longer than MQTT's 65,535 bytes are cut there: topics and ids
/// come from configuration and device ids, which are far shorter.
fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bin(out, s.as_bytes());
}

fn put_bin(out: &mut Vec<u8>, b: &[u8]) {
    let b = &b[..b.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// A property value, as far as the decoder needs to know it.
enum Prop {
    U16(u16),
    U32(u32),
    Other,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).ok_or(CodecError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(CodecError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn packet_id(&mut self) -> Result<u16, CodecError> {
        match self.u16()? {
            0 => Err(CodecError::Malformed("packet identifier 0")),
            id => Ok(id),
        }
    }

    fn varint(&mut self) -> Result<usize, CodecError> {
        let mut n = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            n |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(CodecError::Malformed(
            "variable byte integer longer than four bytes",
        ))
    }

    fn binary(&mut self) -> Result<&'a [u8], CodecError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn string(&mut self) -> Result<String, CodecError> {
        let b = self.binary()?;
        String::from_utf8(b.to_vec()).map_err(|_| CodecError::Malformed("string is not UTF-8"))
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos.min(self.buf.len())..];
        self.pos = self.buf.len();
        s
    }

    fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Walks an MQTT 5 property list, handing each to `f`.
    fn properties(
        &mut self,
        mut f: impl FnMut(u8, Prop) -> Result<(), CodecError>,
    ) -> Result<(), CodecError> {
        let len = self.varint()?;
        let mut r = Reader {
            buf: self.take(len)?,
            pos: 0,
        };
        while !r.at_end() {
            let id = r.u8()?;
            let value = match id {
                0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => {
                    r.u8()?;
                    Prop::Other
                }
                0x13 | 0x21 | 0x22 | 0x23 => Prop::U16(r.u16()?),
                0x02 | 0x11 | 0x18 | 0x27 => Prop::U32(r.u32()?),
                0x0B => {
                    r.varint()?;
                    Prop::Other
                }
                0x03 | 0x08 | 0x12 | 0x15 | 0x1A | 0x1C | REASON_STRING | 0x09 | 0x16 => {
                    r.binary()?;
                    Prop::Other
                }
                0x26 => {
                    r.binary()?;
                    r.binary()?;
                    Prop::Other
                }
                _ => return Err(CodecError::Malformed("unknown property")),
            };
            f(id, value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
