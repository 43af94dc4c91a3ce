//! A hawkBit DDI client: the update servers embedded-Linux fleets already
//! run (Eclipse hawkBit, gooseBit, servers built on hawkBit) drive this
//! node's A/B updates, and learn the outcome only once the health gate on
//! the new slot has committed it. docs/decisions/0032-hawkbit-ddi.md.
//!
//! **One actor, a timer only.** It polls the controller base, sleeping
//! what the server's `config.polling.sleep` says (never less than
//! `hawkbit.poll_floor`), or after an error a backoff that doubles up to
//! five minutes with jitter (a fleet coming back after an outage must not
//! poll in step). Between polls it wakes only for the coordinator's
//! changes (`Ota::changed`) and for a download's end.
//!
//! **Where the A/B coordinator takes over.** An action's OS chunk is
//! downloaded here, into the OTA work directory (`*.part`, resumed with
//! Range after an error or a restart), and its digest checked (`sha256`,
//! else `sha1`, what the server gives); a bad digest is refused before
//! anything is staged. The file is then handed over (`Ota::start_external`)
//! as a deployment `hawkbit-<action>` starting at `verifying`: the
//! coordinator's signature checks, install, reboot, health gate and
//! rollback are the same as for every other input. The action's feedback
//! follows that deployment:
//!
//! | coordinator | feedback |
//! |---|---|
//! | (downloading here), verifying, installing, pending-reboot, booted-pending-commit | `proceeding`, progress `cnt` of 6 |
//! | committed, on the booted new slot | `closed` + `success`, with the slot and the running version |
//! | failed, rolled-back (or a refusal here) | `closed` + `failure`, with the coordinator's last log lines |
//!
//! So `success` is never sent from the old slot, nor before the gate.
//!
//! **Feedback is durable** (`outbox`): queued in the store first, deleted
//! only when the server acknowledged it, retried with the same backoff.
//!
//! **Credentials** (`TargetToken` / `GatewayToken`) go only to the
//! server's own origin; a download link elsewhere gets none (`ddi`).
//!
//! For `uboot`/`grub` the image's signed manifest comes as a second
//! artifact, or with the image in one SWUpdate `.swu` (`swu`), the format
//! servers such as gooseBit take besides RAUC bundles.
//!
//! **Device chunks** (`devices`): a chunk that names MQTT devices becomes
//! a firmware rollout to them, started once the host part committed; the
//! action closes when the host and every rollout have finished. Any other
//! chunk refuses the action with feedback rather than being ignored.

mod action;
mod actor;
mod ddi;
mod devices;
mod outbox;
mod swu;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::firmware::rollout::Rollouts;
use crate::ota::Ota;
use crate::store::{Store, StoreError};
use crate::sync::transport::TransportError;

#[derive(Debug, thiserror::Error)]
pub enum HawkbitError {
    #[error("hawkbit: {0}")]
    Config(String),
    #[error("hawkbit: token file {path}: {source}")]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{source}")]
    Transport { url: String, source: TransportError },
    #[error("{url}: {detail}")]
    Server { url: String, detail: String },
    #[error("{url}: digest mismatch: the server gave {want}, the file has {got}; refused before any slot write")]
    Digest {
        url: String,
        want: String,
        got: String,
    },
    #[error("{url}: {detail}; refused before any slot write")]
    Package { url: String, detail: String },
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("chunk `{chunk}`: {source}; refused before any slot write")]
    Firmware {
        chunk: String,
        // Boxed: the firmware error is large, and every result here
        // would carry its size.
        source: Box<crate::firmware::FirmwareError>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What operators see (`ota status`, D-Bus, HTTP, metrics).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub server: String,
    pub controller_id: String,
    /// The action in hand (empty: none) and where it is.
    pub action: String,
    pub action_phase: String,
    pub last_poll_ms: u64,
    pub next_poll_ms: u64,
    pub last_error: String,
    pub polls: u64,
    pub poll_errors: u64,
    pub feedback_sent: u64,
    pub feedback_pending: u64,
}

struct Inner {
    cfg: crate::config::Hawkbit,
    controller_id: String,
    node_id: String,
    server: ddi::Server,
    ota: Ota,
    /// The firmware rollouts device chunks become (None: not an edge).
    rollouts: Option<Rollouts>,
    store: Store,
    /// `ota.download_rate`: the same cap as every host bundle download.
    bytes_per_sec: u64,
    /// `ota.staging_max_size`: a larger artifact is refused unfetched.
    staging_max: u64,
    status: Mutex<Status>,
}

/// Handle to the DDI client. Cheap to clone.
#[derive(Clone)]
pub struct Hawkbit {
    inner: Arc<Inner>,
}

impl Hawkbit {
    /// Reads the token file and prepares the client; `run` starts it.
    pub async fn open(
        cfg: &crate::config::Hawkbit,
        ota_cfg: &crate::config::Ota,
        ota: Ota,
        rollouts: Option<Rollouts>,
        store: Store,
    ) -> Result<Hawkbit, HawkbitError> {
        let node_id = store.node_id().to_owned();
        let controller_id = if cfg.controller_id.is_empty() {
            node_id.clone()
        } else {
            cfg.controller_id.clone()
        };
        let token_file = cfg
            .target_token_file
            .as_ref()
            .or(cfg.gateway_token_file.as_ref());
        let token = match token_file {
            Some(p) => Some(
                smol::fs::read_to_string(p)
                    .await
                    .map_err(|source| HawkbitError::Token {
                        path: p.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let server = {
            let (cfg, id) = (cfg.clone(), controller_id.clone());
            // Reads the CA file: off the executor.
            smol::unblock(move || ddi::Server::new(&cfg, &id, token)).await?
        };
        let status = Status {
            server: server.base_url().to_owned(),
            controller_id: controller_id.clone(),
            ..Default::default()
        };
        Ok(Hawkbit {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                controller_id,
                node_id,
                server,
                ota,
                rollouts,
                store,
                bytes_per_sec: ota_cfg.download_rate.0,
                staging_max: ota_cfg.staging_max_size.0,
                status: Mutex::new(status),
            }),
        })
    }

    pub fn status(&self) -> Status {
        self.inner
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    fn update_status(&self, f: impl FnOnce(&mut Status)) {
        if let Ok(mut s) = self.inner.status.lock() {
            f(&mut s);
        }
    }

    /// Prometheus lines for `/metrics`.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let s = self.status();
        let _ = writeln!(
            out,
            "# HELP konsul_edge_hawkbit_polls_total Polls of the hawkBit controller base.\n\
             # TYPE konsul_edge_hawkbit_polls_total counter\n\
             konsul_edge_hawkbit_polls_total {}\n\
             # HELP konsul_edge_hawkbit_poll_errors_total Polls that failed.\n\
             # TYPE konsul_edge_hawkbit_poll_errors_total counter\n\
             konsul_edge_hawkbit_poll_errors_total {}\n\
             # HELP konsul_edge_hawkbit_feedback_sent_total Feedback the server acknowledged.\n\
             # TYPE konsul_edge_hawkbit_feedback_sent_total counter\n\
             konsul_edge_hawkbit_feedback_sent_total {}\n\
             # HELP konsul_edge_hawkbit_feedback_pending Feedback queued, not yet acknowledged.\n\
             # TYPE konsul_edge_hawkbit_feedback_pending gauge\n\
             konsul_edge_hawkbit_feedback_pending {}\n\
             # HELP konsul_edge_hawkbit_last_poll_timestamp_seconds When the last poll succeeded.\n\
             # TYPE konsul_edge_hawkbit_last_poll_timestamp_seconds gauge\n\
             konsul_edge_hawkbit_last_poll_timestamp_seconds {}",
            s.polls,
            s.poll_errors,
            s.feedback_sent,
            s.feedback_pending,
            s.last_poll_ms / 1000
        );
    }
}
