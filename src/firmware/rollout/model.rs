//! The rollout's records (the rollout, an edge's execution, a device's
//! progress) and the types the API takes and returns. Data only: how they
//! are stored is `records`, how they change is `tick`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum State {
    Running,
    Paused,
    Halted,
    Aborted,
    Complete,
}

impl State {
    /// Still tracks devices (and pins its artifact).
    pub(crate) fn is_live(self) -> bool {
        matches!(self, State::Running | State::Paused | State::Halted)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DevState {
    Waiting,
    Offered,
    Downloading,
    Installing,
    /// The device said `complete`; done once it reports the version.
    Installed,
    Complete,
    Failed,
}

impl DevState {
    pub(super) fn in_flight(self) -> bool {
        matches!(
            self,
            DevState::Offered | DevState::Downloading | DevState::Installing | DevState::Installed
        )
    }
    pub(super) fn finished(self) -> bool {
        matches!(self, DevState::Complete | DevState::Failed)
    }
}

/// The rollout record (key `{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Rollout {
    pub(crate) id: String,
    pub(crate) device_type: String,
    pub(crate) version: String,
    pub(crate) sha256: String,
    pub(crate) size: u64,
    pub(crate) signature: String,
    /// Explicit targets; empty = every device of the type.
    #[serde(default)]
    pub(crate) devices: Vec<String>,
    pub(crate) wave_size: u32,
    #[serde(default)]
    pub(crate) wave_percent: Option<u32>,
    pub(crate) failure_threshold: u32,
    pub(crate) device_deadline_ms: u64,
    pub(crate) max_retries: u32,
    pub(crate) state: State,
    #[serde(default)]
    pub(crate) reason: String,
    /// Targets resolved (the device records exist).
    #[serde(default)]
    pub(crate) resolved: bool,
    #[serde(default)]
    pub(crate) targets: u32,
    pub(crate) created_ms: u64,
    /// The node that created the rollout: the only one that writes this
    /// record besides operator commands. Records from before this field
    /// take the record's origin.
    #[serde(default)]
    pub(crate) created_by: String,
    /// Operator resumes so far. An edge running a rollout from the hub
    /// clears its own threshold halt when this passes the count it last
    /// acted on (`EdgeRun::resumes`).
    #[serde(default)]
    pub(crate) resumes: u32,
}

/// One edge's execution of a rollout it did not create (one defined at
/// the hub), key `edge/{rollout}/{edge}`. Written only by that edge, so
/// it flows up to the hub and back to that edge alone; edges never write
/// the shared `{rollout}` record, which several of them would otherwise
/// overwrite by LWW. Its absence means "targets not resolved yet".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct EdgeRun {
    pub(crate) rollout: String,
    pub(crate) edge: String,
    /// This edge's state: running or paused as the operator says, or its
    /// own halted (threshold) or complete; aborted once the operator was.
    pub(crate) state: State,
    #[serde(default)]
    pub(crate) reason: String,
    /// Devices of this edge in the rollout.
    pub(crate) targets: u32,
    /// The threshold in force here: a resume after a halt raises it by
    /// the failures so far, as on a standalone edge.
    pub(crate) failure_threshold: u32,
    /// The rollout's `resumes` this edge has acted on.
    pub(crate) resumes: u32,
}

/// One device's progress in a rollout (key `{rollout}/{device}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeviceRollout {
    pub(crate) rollout: String,
    pub(crate) device: String,
    pub(crate) wave: u32,
    pub(crate) state: DevState,
    pub(crate) attempts: u32,
    pub(crate) progress: u8,
    #[serde(default)]
    pub(crate) error: String,
    #[serde(default)]
    pub(crate) offered_ms: u64,
    #[serde(default)]
    pub(crate) deadline_ms: u64,
}

/// What `POST /v1/edge/rollouts` takes; unset fields come from
/// `firmware.rollout` in the config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Spec {
    #[serde(default)]
    pub(crate) id: Option<String>,
    pub(crate) device_type: String,
    pub(crate) version: String,
    #[serde(default)]
    pub(crate) devices: Vec<String>,
    #[serde(default)]
    pub(crate) wave_size: Option<u32>,
    #[serde(default)]
    pub(crate) wave_percent: Option<u32>,
    #[serde(default)]
    pub(crate) failure_threshold: Option<u32>,
    /// `30s`, `10m`, ...
    #[serde(default)]
    pub(crate) device_deadline: Option<String>,
    #[serde(default)]
    pub(crate) max_retries: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Pause,
    Resume,
    Abort,
}

/// A rollout as this node sees it, with its per-state device counts (in
/// the list). For a rollout from the hub, an edge shows its own execution
/// in `state`, `reason`, `targets`; the hub shows the operator's state
/// (running, paused, aborted) and each edge's execution in `edges`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    #[serde(flatten)]
    pub(crate) rollout: Rollout,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) counts: Option<BTreeMap<String, u32>>,
    /// The per-edge executions this node holds: every edge's at the hub,
    /// its own at an edge.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) edges: Vec<EdgeRun>,
    /// Every edge in `edges` is complete. Only edges that have synced
    /// since they saw the rollout are there: an edge that has not yet is
    /// not waited for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) edges_complete: Option<bool>,
}

/// An offer for the bridge to publish.
#[derive(Debug, Clone)]
pub struct Offer {
    pub topic: String,
    pub payload: Vec<u8>,
}
