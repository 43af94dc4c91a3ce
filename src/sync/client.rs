//! The edge's sync client: an actor that drains the outbox to the hub and
//! applies what the hub sends back.
//!
//! A round: read a batch from the outbox (bounded in encoded bytes for thin
//! links), POST it with the edge's last applied hub index, then in ONE store
//! transaction apply the hub's updates, acknowledge exactly the outbox rows
//! that were sent (a key rewritten meanwhile has a new seq and stays
//! queued) and advance the index. Repeat while the outbox has more or the
//! hub says `more`. A crash anywhere before that commit leaves the outbox
//! and index as they were; the retry carries the same batch id (a content
//! hash), which the hub recognises, so nothing is lost or applied twice.
//!
//! A request stays within what a hub accepts (`wire`'s limits): at most
//! [`wire::MAX_UPDATES`] updates and [`wire::UPDATE_BYTES`] of them (or
//! `sync.max_batch_bytes` if smaller), at most [`wire::MAX_TELEMETRY`]
//! points and [`wire::TELEMETRY_BYTES`] of them. The hub's answer is
//! trusted no more than an edge's request: its clock and every stamp in it
//! must be within `clock::MAX_AHEAD_MS` of our wall clock, or the round
//! fails with nothing applied and the clock untouched.
//!
//! Scheduling (`adapt`): each round's batch is sized from the measured
//! link, state changes go before telemetry (`batch`), a data budget keeps
//! a metered link inside its plan (`budget`). Between syncs: the interval,
//! or its floor when changes pile up or are left over; while the hub is
//! unreachable exponential backoff with jitter (1 s doubling up to the
//! interval), so the first round after the link returns drains the queue.
//! Every wait is a timer or an event; nothing polls.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use smol::future::FutureExt;

use crate::clock::{check_remote, wall_millis, Hlc};
use crate::config::{Config, RetryBackoff, SyncMode};
use crate::crdt::MergeStrategy;
use crate::registry::{ChangeOp, Registry};
use crate::store::{Kind, StoreError};

use super::adapt::{Link, Round};
use super::batch::{read_batch, read_telemetry, TELEMETRY_BATCH};
use super::budget::{self, DataBudget};
use super::engine::{self, Direction};
use super::metered::WireCount;
use super::transport::{Client, Endpoint, TransportError};
use super::wire::{self, EdgeSyncRequest, EdgeSyncResponse, WireError, CONTENT_TYPE};
use super::{LinkStatus, SyncHandle};

/// Rounds in one sync before yielding to the schedule (bounds one sync's
/// duration when changes keep arriving).
const MAX_ROUNDS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("hub response: {0}")]
    Wire(#[from] WireError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
}

pub struct SyncClient {
    registry: Registry,
    handle: SyncHandle,
    http: Client,
    interval: Duration,
    backoff: RetryBackoff,
    compress: bool,
    always_full: bool,
    strategy: MergeStrategy,
    /// Caps the adaptive batch, the response page and telemetry per round
    /// from `resources.memory_limit`, lower while shedding.
    limits: crate::limits::Limits,
    queue_limit: u64,
    tombstone_retention_ms: u64,
    floor: Duration,
    /// Pending changes that start a sync before the interval is up.
    pile_up: u64,
    wire: Arc<WireCount>,
    adaptive: Mutex<Adaptive>,
}

/// What the client has learnt of its link, updated after every round (the
/// lock is never held across an await).
struct Adaptive {
    link: Link,
    budget: Option<DataBudget>,
    /// The last round's bytes on the link beyond its request body
    /// (headers, TLS, the answer): the data budget's estimate of the next.
    overhead: u64,
    /// The latest failed round, reported to the hub with the next request
    /// that gets through (an operator there sees a flaky link that has
    /// since recovered).
    last_failure: Option<(String, Instant)>,
}

pub fn strategy(config: &Config) -> MergeStrategy {
    match config.sync.conflict_resolution {
        crate::config::ConflictResolution::LastWriteWins => MergeStrategy::LastWriteWins,
        crate::config::ConflictResolution::Crdt => MergeStrategy::FieldWise,
    }
}

/// The HTTP(S) client for `cloud.server_address` (TLS, client
/// certificate and token from the config): sync, and firmware fetches.
// Set-up, before the executor runs.
#[allow(clippy::disallowed_methods)]
pub fn hub_client(config: &Config) -> Result<Client, ClientError> {
    let c = &config.cloud;
    let endpoint = Endpoint::parse(&c.server_address)?;
    let tls = if endpoint.https {
        let client = c.client_cert.as_deref().zip(c.client_key.as_deref());
        Some(super::transport::client_tls(c.ca_file.as_deref(), client)?)
    } else {
        None
    };
    let token = match &c.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|source| ClientError::Token {
                    path: p.display().to_string(),
                    source,
                })?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    Ok(Client {
        endpoint,
        tls,
        token,
        timeout: Duration::from_secs(60),
    })
}

impl SyncClient {
    pub fn new(
        config: &Config,
        registry: Registry,
        handle: SyncHandle,
        limits: crate::limits::Limits,
    ) -> Result<SyncClient, ClientError> {
        let c = &config.cloud;
        let http = hub_client(config)?;
        Ok(SyncClient {
            registry,
            handle,
            http,
            interval: c.sync_interval.0,
            backoff: c.retry_backoff,
            compress: config.sync.compression,
            always_full: config.sync.mode == SyncMode::Full,
            strategy: strategy(config),
            limits,
            queue_limit: c.offline_queue_size,
            tombstone_retention_ms: config.sync.tombstone_retention.0.as_millis() as u64,
            floor: c.interval_floor(),
            pile_up: (c.offline_queue_size / 10).clamp(1, 1000),
            wire: Arc::default(),
            adaptive: Mutex::new(Adaptive {
                link: Link::new(
                    c.sync_round_budget.0,
                    (config.sync.max_batch_bytes.0 as usize).min(wire::UPDATE_BYTES),
                ),
                budget: c
                    .data_budget
                    .as_ref()
                    .map(|b| DataBudget::new(b.limit.0, b.period, wall_millis())),
                overhead: 1024,
                last_failure: None,
            }),
        })
    }

    fn adaptive<R>(&self, f: impl FnOnce(&mut Adaptive) -> R) -> R {
        // A poisoned lock only means a panic elsewhere mid-update; the
        // figures are still usable.
        let mut a = self.adaptive.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut a)
    }

    /// The figures for status, D-Bus and `/metrics`.
    fn publish_link(&self, next: Option<Duration>) {
        let (link, budget) = self.adaptive(|a| {
            (
                LinkStatus {
                    rate_bytes_per_sec: a.link.rate(),
                    rtt_ms: a.link.rtt().as_millis() as u64,
                    batch_bytes: a.link.batch_bytes() as u64,
                    round_budget_ms: a.link.budget().as_millis() as u64,
                    next_sync_ms: 0,
                },
                a.budget.as_ref().map(|b| b.status()),
            )
        });
        self.handle.update(|s| {
            let next_sync_ms = match next {
                Some(d) => wall_millis() + d.as_millis() as u64,
                None => s.link.map_or(0, |l| l.next_sync_ms),
            };
            s.link = Some(LinkStatus {
                next_sync_ms,
                ..link
            });
            s.data_budget = budget;
        });
    }

    async fn restore_budget(&self) {
        if self.adaptive(|a| a.budget.is_none()) {
            return;
        }
        let saved = self
            .registry
            .store()
            .call(|db| db.meta_get(budget::META_KEY))
            .await
            .and_then(|r| r);
        match saved {
            Ok(saved) => self.adaptive(|a| {
                if let Some(b) = &mut a.budget {
                    b.restore(saved.as_deref());
                }
            }),
            Err(e) => log::warn!("cloud.data_budget: usage so far not read: {e}"),
        }
        self.publish_link(None);
    }

    /// Runs until dropped.
    pub async fn run(self) {
        self.restore_budget().await;
        let mut failures: u32 = 0;
        loop {
            let started = Instant::now();
            let mut drained = true;
            match self.sync().await {
                Ok(all) => {
                    failures = 0;
                    drained = all;
                }
                Err(e) => {
                    self.handle
                        .counters()
                        .failures
                        .fetch_add(1, Ordering::Relaxed);
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        log::warn!(
                            "sync with {} failed: {e}; retrying with backoff",
                            self.http.endpoint.url
                        );
                    } else {
                        log::debug!("sync attempt {failures} failed: {e}");
                    }
                    let msg = e.to_string();
                    self.adaptive(|a| a.last_failure = Some((msg.clone(), Instant::now())));
                    self.handle.update(|s| {
                        s.online = false;
                        s.last_error = Some(msg);
                    });
                }
            }
            self.refresh_pending().await;
            let slow = self.adaptive(|a| a.link.is_slow());
            let wait = if failures > 0 {
                self.retry_delay(failures)
            } else if drained || slow {
                self.interval
            } else {
                self.floor
            };
            self.publish_link(Some(wait));
            let timer = async {
                async_io::Timer::after(wait).await;
            };
            // Changes piling up bring the next sync forward, down to the
            // floor, while the link is up and not slow.
            let pile_up = async {
                if failures > 0 || slow {
                    return std::future::pending().await;
                }
                async_io::Timer::at(started + self.floor).await;
                loop {
                    let changed = self.handle.changed();
                    let pending = self.handle.status().pending_changes;
                    if pending >= self.pile_up {
                        log::debug!("{pending} changes piled up: syncing before the interval");
                        return;
                    }
                    changed.await;
                }
            };
            timer.or(self.handle.requested()).or(pile_up).await;
        }
    }

    fn retry_delay(&self, failures: u32) -> Duration {
        let base = match self.backoff {
            RetryBackoff::Fixed => self.interval.min(Duration::from_secs(30)),
            RetryBackoff::Exponential => {
                Duration::from_secs(1u64 << failures.saturating_sub(1).min(16)).min(self.interval)
            }
        };
        // +-20 % so a fleet that lost its uplink together does not return
        // in lockstep.
        let jitter = 0.8 + fastrand::f64() * 0.4;
        base.mul_f64(jitter).max(Duration::from_millis(200))
    }

    async fn refresh_pending(&self) {
        // Read and publish on the store thread: `track_outbox` publishes the
        // same figure, and doing both there orders the updates the way the
        // reads happened, so a stale count cannot land after a fresh one.
        let handle = self.handle.clone();
        let limit = self.queue_limit;
        let _ = self
            .registry
            .store()
            .call(move |db| {
                let stats = db.stats()?;
                let over = stats.outbox > limit;
                if over && !handle.status().queue_over_limit {
                    log::warn!(
                        "{} changes wait for the hub, over cloud.offline_queue_size ({limit}); \
                         they are kept (one entry per key), but the link needs attention",
                        stats.outbox
                    );
                }
                handle.update(|s| {
                    s.pending_changes = stats.outbox;
                    s.queue_over_limit = over;
                });
                Ok::<_, crate::store::StoreError>(())
            })
            .await;
    }

    /// One sync: rounds until the outbox is drained and the hub has no
    /// more. Ok(false) when it stopped at [`MAX_ROUNDS`] with work left.
    pub async fn sync(&self) -> Result<bool, ClientError> {
        // `sync.mode: full` pulls everything again once per sync.
        let mut restart = self.always_full;
        let started = Instant::now();
        let (wire_before, rounds_before) = (self.wire.read(), self.counters_requests());
        let counters = self.handle.counters();
        let (updates_before, points_before) = (
            counters.updates_sent.load(Ordering::Relaxed),
            counters.telemetry_sent.load(Ordering::Relaxed),
        );
        for _ in 0..MAX_ROUNDS {
            if self.round(std::mem::take(&mut restart)).await? {
                let rounds = self.counters_requests() - rounds_before;
                if rounds > 2 {
                    let spent = self.wire.read().since(wire_before);
                    let (rate, rtt, batch) =
                        self.adaptive(|a| (a.link.rate(), a.link.rtt(), a.link.batch_bytes()));
                    log::info!(
                        "sync: {} changes and {} telemetry points in {rounds} rounds, {} bytes \
                         on the link in {:.1} s; link {rate} B/s, rtt {} ms, batch {batch} bytes",
                        counters.updates_sent.load(Ordering::Relaxed) - updates_before,
                        counters.telemetry_sent.load(Ordering::Relaxed) - points_before,
                        spent.total(),
                        started.elapsed().as_secs_f64(),
                        rtt.as_millis(),
                    );
                }
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// How this edge is doing, for the hub's fleet view: the outbox beyond
    /// the `sending` changes of this request, and the failures so far.
    fn self_report(&self, sending: u64) -> wire::pb::EdgeStatus {
        let (last_error, ago) = self.adaptive(|a| match &a.last_failure {
            Some((msg, at)) => (msg.clone(), at.elapsed()),
            None => (String::new(), Duration::ZERO),
        });
        wire::pb::EdgeStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            pending_changes: self.handle.status().pending_changes.saturating_sub(sending),
            failed_rounds: self.handle.counters().failures.load(Ordering::Relaxed),
            last_error,
            last_error_ago_ms: u64::try_from(ago.as_millis()).unwrap_or(u64::MAX),
        }
    }

    fn counters_requests(&self) -> u64 {
        self.handle.counters().requests.load(Ordering::Relaxed)
    }

    /// One request and its answer; true when nothing is left to send or
    /// receive.
    async fn round(&self, restart: bool) -> Result<bool, ClientError> {
        let max_bytes = self
            .limits
            .batch_bytes(self.adaptive(|a| a.link.batch_bytes()));
        let state = self
            .registry
            .store()
            .call(move |db| read_batch(db, max_bytes))
            .await??;
        let since = if restart { 0 } else { state.since };
        // From index 0 (new or wiped database, or a restart) the hub
        // sends everything, our own versions included.
        let full = state.full || since == 0;
        let telemetry_room = state.telemetry_room(max_bytes);
        let edge_id = self.registry.store().node_id().to_owned();
        let sent_now = state.updates.len() as u64;
        let page = self.limits.response_bytes(super::server::DEFAULT_PAGE);
        let mut req = EdgeSyncRequest {
            batch_id: if state.updates.is_empty() {
                String::new()
            } else {
                wire::batch_id(&edge_id, &state.updates)
            },
            edge_id,
            last_sync_index: since as i64,
            pending_updates: state.updates,
            full_sync: full,
            max_response_bytes: u32::try_from(page).unwrap_or(u32::MAX),
            hlc: Hlc::new(wall_millis(), 0).0,
            status: Some(self.self_report(sent_now)),
            ..Default::default()
        };
        let seqs = state.seqs;
        let (mut telemetry, mut telemetry_last) = (Vec::new(), None);
        if telemetry_room > 0 {
            let points_cap = self.limits.telemetry_points(TELEMETRY_BATCH);
            (telemetry, telemetry_last) = self
                .registry
                .store()
                .call(move |db| read_telemetry(db, points_cap, telemetry_room))
                .await??;
        }
        let mut points = telemetry.len();
        if points > 0 {
            req.telemetry = Some(wire::pb::TelemetryBatch { points: telemetry });
        }
        let mut body = wire::encode(&req, self.compress);
        if points > 0 && !self.telemetry_fits(body.len()) {
            req.telemetry = None;
            (points, telemetry_last) = (0, None);
            body = wire::encode(&req, self.compress);
        }
        let sent = req.pending_updates.len();
        let (body_plain, body_wire) = (req.encoded_len(), body.len());
        let counters = self.handle.counters();
        counters.requests.fetch_add(1, Ordering::Relaxed);
        counters
            .bytes_sent
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        let encoding = if self.compress { "snappy" } else { "identity" };
        let wire_before = self.wire.read();
        let t0 = Instant::now();
        let answer = self
            .http
            .post(
                "/v1/edge/sync",
                body,
                &[
                    ("content-type", CONTENT_TYPE),
                    ("content-encoding", encoding),
                    ("accept-encoding", encoding),
                ],
                wire::MAX_COMPRESSED,
                &self.wire,
            )
            .await;
        let round = Round {
            elapsed: t0.elapsed(),
            wire: self.wire.read().since(wire_before),
            body_plain,
            body_wire,
        };
        // Bytes spent count against the budget whether or not the round
        // got its answer.
        self.spend(round.wire.total(), body_wire).await;
        let resp_bytes = answer?;
        self.learn(round, sent);
        counters
            .bytes_received
            .fetch_add(resp_bytes.len() as u64, Ordering::Relaxed);
        let resp = wire::decode_response(&resp_bytes, self.compress, page)?;
        if resp.full_sync_required {
            log::warn!("hub collected deletes this edge has not seen; starting a full sync");
            self.registry
                .store()
                .call(|db| {
                    db.tx(|tx| {
                        tx.meta_set("full_sync", "1")?;
                        tx.meta_set("sync_index", "0")
                    })
                })
                .await??;
            return Ok(false);
        }
        let more = resp.more;
        let got = resp.cloud_updates.len();
        let changed = self.apply(resp, seqs, full, telemetry_last).await?;
        counters
            .updates_sent
            .fetch_add(sent as u64, Ordering::Relaxed);
        counters
            .updates_received
            .fetch_add(got as u64, Ordering::Relaxed);
        counters
            .telemetry_sent
            .fetch_add(points as u64, Ordering::Relaxed);
        for (kind, key, op) in changed {
            self.registry.notify(kind, &key, op);
        }
        log::debug!("sync round: sent {sent}, received {got}, more: {more}");
        self.handle.update(|s| {
            s.online = true;
            s.last_error = None;
        });
        if more || sent > 0 || points > 0 {
            return Ok(false);
        }
        // Without this an edge keeps every delete it ever made.
        let retention = self.tombstone_retention_ms;
        self.registry
            .store()
            .call(move |db| {
                db.tx(|tx| super::server::collect_garbage(tx, wall_millis(), retention))
            })
            .await??;
        self.handle.update(|s| s.last_sync_ms = Some(wall_millis()));
        Ok(true)
    }

    /// Whether a round with a request body of `body` bytes may carry
    /// telemetry under the data budget (always, without one).
    fn telemetry_fits(&self, body: usize) -> bool {
        self.adaptive(|a| {
            let estimate = body as u64 + a.overhead;
            match &mut a.budget {
                Some(b) => {
                    b.roll(wall_millis());
                    b.allows_telemetry(estimate)
                }
                None => true,
            }
        })
    }

    /// Counts a round's bytes against the data budget and saves the count.
    async fn spend(&self, total: u64, body: usize) {
        let saved = self.adaptive(|a| {
            a.overhead = total.saturating_sub(body as u64).max(a.overhead / 2);
            a.budget.as_mut().map(|b| {
                b.roll(wall_millis());
                b.spend(total);
                b.persisted()
            })
        });
        if let Some(saved) = saved {
            let r = self
                .registry
                .store()
                .call(move |db| db.tx(|tx| tx.meta_set(budget::META_KEY, &saved)))
                .await
                .and_then(|r| r);
            if let Err(e) = r {
                log::warn!("cloud.data_budget: usage not saved: {e}");
            }
        }
    }

    /// Adapts the batch to the round just measured.
    fn learn(&self, round: Round, sent: usize) {
        let (over, before, after, rate, rtt) = self.adaptive(|a| {
            let before = a.link.batch_bytes();
            let over = a.link.observe(round);
            (
                over,
                before,
                a.link.batch_bytes(),
                a.link.rate(),
                a.link.rtt(),
            )
        });
        if over {
            self.handle
                .counters()
                .rounds_over_budget
                .fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "sync round of {sent} changes ({} bytes on the link) took {:.1} s, over \
                 cloud.sync_round_budget; the next batch is {after} bytes",
                round.wire.total(),
                round.elapsed.as_secs_f64()
            );
        } else if after >= before * 2 || after * 2 <= before {
            log::info!(
                "sync link: {rate} B/s, rtt {} ms; batch {before} -> {after} bytes",
                rtt.as_millis()
            );
        }
        self.publish_link(None);
    }

    async fn apply(
        &self,
        resp: EdgeSyncResponse,
        seqs: Vec<u64>,
        full: bool,
        telemetry_last: Option<u64>,
    ) -> Result<Vec<(Kind, String, ChangeOp)>, ClientError> {
        // Before anything observes a stamp: a refused answer leaves the
        // clock where it was.
        check_remote(|| "hub response clock".into(), Hlc(resp.hlc), wall_millis())
            .map_err(WireError::from)?;
        let mut incoming = Vec::with_capacity(resp.cloud_updates.len());
        for (i, u) in resp.cloud_updates.into_iter().enumerate() {
            incoming.push(wire::from_update(i, u)?);
        }
        let strategy = self.strategy;
        let index = resp.current_index.max(0) as u64;
        let more = resp.more;
        let out = self
            .registry
            .store()
            .call(move |db| {
                db.tx(|tx| {
                    let now = wall_millis();
                    tx.observe(Hlc(resp.hlc));
                    if full && tx.meta_get("full_sync_from")?.is_none() {
                        // Everything at or below this index that the full
                        // sync does not touch is gone from the hub.
                        let from = tx.current_index()?;
                        tx.meta_set("full_sync_from", &from.to_string())?;
                    }
                    let mut changed = Vec::new();
                    for inc in incoming {
                        let (kind, key, tomb) = (inc.kind, inc.key.clone(), inc.version.tombstone);
                        let a =
                            engine::apply(tx, inc, strategy, &Direction::FromHub { full }, now)?;
                        if a.changed {
                            changed.push((
                                kind,
                                key,
                                if tomb {
                                    ChangeOp::Delete
                                } else {
                                    ChangeOp::Upsert
                                },
                            ));
                        }
                    }
                    tx.ack_outbox(&seqs)?;
                    if let Some(last) = telemetry_last {
                        tx.meta_set("telemetry_sent", &last.to_string())?;
                    }
                    tx.meta_set("sync_index", &index.to_string())?;
                    if full && !more {
                        if let Some(from) = tx
                            .meta_get("full_sync_from")?
                            .and_then(|v| v.parse::<u64>().ok())
                        {
                            let dropped = tx.drop_stale(from)?;
                            if dropped > 0 {
                                log::info!(
                                    "full sync: removed {dropped} records the hub no longer has"
                                );
                            }
                        }
                        tx.meta_set("full_sync", "0")?;
                        tx.meta_set("full_sync_from", "")?;
                    }
                    Ok::<_, StoreError>(changed)
                })
            })
            .await??;
        Ok(out)
    }
}
