//! A small MQTT client of our own on async-io (why not Paho:
//! `docs/decisions/0021-mqtt-acks-after-commit.md`): MQTT 3.1.1, and MQTT 5
//! where the broker has it, for the receive maximum.
//!
//! - [`codec`]: packets to and from bytes, pure and fuzzed.
//! - [`link`]: the session state that outlives a connection: outgoing QoS 1
//!   publishes awaiting PUBACK (re-sent with DUP after a reconnect), QoS 2
//!   packet ids received and not yet released, and the current
//!   connection's writer. Ingest hands it the acknowledgements of a batch
//!   once that batch is committed.
//! - [`session`]: one connection: TCP (and TLS), CONNECT/CONNACK, then a
//!   reader, a writer and the keep-alive running as one future on the
//!   executor. No threads, no locks held across an await: nothing here can
//!   wait for the executor while the executor waits for it.
//!
//! Acknowledgements: a QoS 1 PUBLISH is PUBACKed, a QoS 2 PUBLISH PUBRECed,
//! only when ingest says its batch committed ([`link::Link::ack`]). The
//! broker bounds how many we hold unacknowledged: with MQTT 5 our receive
//! maximum (the ingest batch size), with 3.1.1 its own window (mosquitto's
//! `max_inflight_messages`, 20 by default). A connection that drops before
//! the acks went out makes the broker re-send those messages on the next
//! connection (persistent session): delivery into the store is at least
//! once, and the store takes a repeated message as a repeat.

pub(crate) mod codec;
pub(crate) mod link;
pub(crate) mod session;

use std::path::PathBuf;

pub(crate) use codec::{Connect, Will};
pub(crate) use link::{Ack, Link, Message};
pub(crate) use session::{Incoming, Options};

/// The protocol level a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    V311,
    V5,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("packet ends early")]
    Truncated,
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("{0}: reserved flags set")]
    Flags(&'static str),
    #[error("packet of type {kind} with {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { kind: u8, len: usize, max: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("mqtt.broker `{url}`: {message}")]
    Url { url: String, message: String },
    #[error("mqtt.ca_file {path}: {message}")]
    Tls { path: PathBuf, message: String },
    #[error("{url}: {what}: {source}")]
    Io {
        url: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{url}: {source}")]
    Codec { url: String, source: CodecError },
    #[error("{url}: no {what} within {secs}s")]
    Timeout {
        url: String,
        what: &'static str,
        secs: u64,
    },
    #[error("{url}: the broker refused the connection (code {code:#04x})")]
    Refused { url: String, code: u8 },
    #[error("{url}: the broker does not speak MQTT 5")]
    NoV5 { url: String },
    #[error("{url}: protocol error: {what}")]
    Protocol { url: String, what: String },
    #[error("{url}: the broker closed the connection")]
    Closed { url: String },
}

/// Decodes one packet from the front of `data` (MQTT 5 if the first byte
/// of `data` is odd, else 3.1.1) under a 1 MiB cap. For the fuzzer: it
/// must return, never panic, whatever the bytes.
pub fn fuzz_decode(data: &[u8]) -> Result<usize, CodecError> {
    let (version, rest) = match data.split_first() {
        Some((v, rest)) if v & 1 == 1 => (Version::V5, rest),
        Some((_, rest)) => (Version::V311, rest),
        None => return Ok(0),
    };
    let mut used = 0;
    while let Some((packet, n)) = codec::decode_packet(&rest[used..], version, 1 << 20)? {
        let mut out = Vec::new();
        packet.encode(version, &mut out);
        used += n;
    }
    Ok(used)
}
