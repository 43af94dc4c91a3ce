//! Why a message is refused: the [`Reason`] (a metric label) and the
//! [`PayloadError`] that explains it to the device on `devices/{id}/error`.

use super::MAX_ID_LEN;

/// Why a message was refused; the label of the rejection metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    TooLarge,
    MalformedJson,
    WrongType,
    IdMismatch,
    UnknownTopic,
    InvalidId,
    Invalid,
    Unregistered,
    Limit,
    Store,
}

impl Reason {
    pub const ALL: [Reason; 10] = [
        Reason::TooLarge,
        Reason::MalformedJson,
        Reason::WrongType,
        Reason::IdMismatch,
        Reason::UnknownTopic,
        Reason::InvalidId,
        Reason::Invalid,
        Reason::Unregistered,
        Reason::Limit,
        Reason::Store,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TooLarge => "too_large",
            Reason::MalformedJson => "malformed_json",
            Reason::WrongType => "wrong_type",
            Reason::IdMismatch => "id_mismatch",
            Reason::UnknownTopic => "unknown_topic",
            Reason::InvalidId => "invalid_id",
            Reason::Invalid => "invalid",
            Reason::Unregistered => "unregistered",
            Reason::Limit => "limit",
            Reason::Store => "store",
        }
    }
}

/// A refused message. `device` is the topic's id level, when there is one
/// to send the explanation to (`devices/{device}/error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("{topic}: payload of {size} bytes exceeds mqtt.max_payload_size ({max})")]
    TooLarge {
        topic: String,
        device: String,
        size: usize,
        max: usize,
    },
    #[error("{topic}: malformed JSON: {detail}")]
    MalformedJson {
        topic: String,
        device: String,
        detail: String,
    },
    #[error("{topic}: wrong type: {detail}")]
    WrongType {
        topic: String,
        device: String,
        detail: String,
    },
    #[error("{topic}: payload id `{payload_id}` differs from the topic's `{device}`")]
    IdMismatch {
        topic: String,
        device: String,
        payload_id: String,
    },
    #[error("{topic}: unknown topic (expected devices/{{id}}/register|telemetry|heartbeat|events|status)")]
    UnknownTopic {
        topic: String,
        device: Option<String>,
    },
    #[error("{topic}: `{}` is not a device id (1-{MAX_ID_LEN} of A-Z a-z 0-9 - _ . :)", device.escape_debug())]
    InvalidId { topic: String, device: String },
    #[error("{topic}: {field}: {message}")]
    Invalid {
        topic: String,
        device: String,
        field: &'static str,
        message: String,
    },
}

impl PayloadError {
    pub fn reason(&self) -> Reason {
        match self {
            PayloadError::TooLarge { .. } => Reason::TooLarge,
            PayloadError::MalformedJson { .. } => Reason::MalformedJson,
            PayloadError::WrongType { .. } => Reason::WrongType,
            PayloadError::IdMismatch { .. } => Reason::IdMismatch,
            PayloadError::UnknownTopic { .. } => Reason::UnknownTopic,
            PayloadError::InvalidId { .. } => Reason::InvalidId,
            PayloadError::Invalid { .. } => Reason::Invalid,
        }
    }

    /// The device to explain the rejection to, if the topic names one that
    /// can be put back in a topic.
    pub fn device(&self) -> Option<&str> {
        let d = match self {
            PayloadError::TooLarge { device, .. }
            | PayloadError::MalformedJson { device, .. }
            | PayloadError::WrongType { device, .. }
            | PayloadError::IdMismatch { device, .. }
            | PayloadError::InvalidId { device, .. }
            | PayloadError::Invalid { device, .. } => Some(device.as_str()),
            PayloadError::UnknownTopic { device, .. } => device.as_deref(),
        };
        d.filter(|d| !d.is_empty() && d.len() <= 4 * MAX_ID_LEN)
    }
}
