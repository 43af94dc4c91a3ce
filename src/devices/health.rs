//! Device health: the pure rules, and the monitor task that applies them.
//!
//! A device reports every `telemetry_interval`. Having missed
//! `devices.stale_after_missed` intervals it is `stale`; having missed
//! `devices.offline_after_missed` it is `offline` (and its last will makes
//! it offline at once). Offline and low battery raise alerts, which clear
//! when the device is heard again / its battery recovers (with 5 points of
//! hysteresis, so a battery hovering at the threshold does not flap).
//!
//! No polling: the monitor keeps every device's next deadline in an ordered
//! map and sleeps on one timer set to the earliest; a message from a device
//! moves that device's deadline and resets the timer. With nothing due the
//! task is parked and the CPU idle.
//!
//! The monitor is the only writer of health state, so transitions are
//! never raced; it learns of traffic from the ingest path through a
//! bounded channel (back-pressure rather than unbounded memory).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::Serialize;
use smol::future::FutureExt;

use crate::clock::wall_millis;

/// Battery must rise this many points above the threshold to clear.
pub(crate) const BATTERY_HYSTERESIS: u8 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Health {
    Online,
    Stale,
    Offline,
}

impl Health {
    pub(crate) const ALL: [Health; 3] = [Health::Online, Health::Stale, Health::Offline];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Health::Online => "online",
            Health::Stale => "stale",
            Health::Offline => "offline",
        }
    }

    pub(crate) fn parse(s: &str) -> Health {
        match s {
            "stale" => Health::Stale,
            "offline" => Health::Offline,
            _ => Health::Online,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rules {
    pub(crate) stale_after_missed: u32,
    pub(crate) offline_after_missed: u32,
    pub(crate) low_battery_percent: u8,
}

impl Rules {
    /// Health by silence alone.
    pub(crate) fn health_at(&self, last_seen_ms: u64, interval_ms: u64, now_ms: u64) -> Health {
        let silent = now_ms.saturating_sub(last_seen_ms);
        if silent >= interval_ms.saturating_mul(self.offline_after_missed as u64) {
            Health::Offline
        } else if silent >= interval_ms.saturating_mul(self.stale_after_missed as u64) {
            Health::Stale
        } else {
            Health::Online
        }
    }

    /// When `health` next changes if the device stays silent.
    pub(crate) fn next_deadline(
        &self,
        last_seen_ms: u64,
        interval_ms: u64,
        health: Health,
    ) -> Option<u64> {
        match health {
            Health::Online => Some(
                last_seen_ms
                    .saturating_add(interval_ms.saturating_mul(self.stale_after_missed as u64)),
            ),
            Health::Stale => Some(
                last_seen_ms
                    .saturating_add(interval_ms.saturating_mul(self.offline_after_missed as u64)),
            ),
            Health::Offline => None,
        }
    }

    /// Whether the low-battery alert should be active, given whether it is.
    pub(crate) fn battery_low(&self, battery: u8, active: bool) -> bool {
        if active {
            battery < self.low_battery_percent.saturating_add(BATTERY_HYSTERESIS)
        } else {
            battery < self.low_battery_percent
        }
    }
}

/// What the ingest path tells the monitor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Signal {
    /// The device was heard at `at_ms` (any accepted message).
    Seen {
        device: String,
        at_ms: u64,
        interval_ms: u64,
        battery: Option<u8>,
    },
    /// Its last will (or an explicit `offline` status) arrived.
    Offline { device: String },
}

/// A change the monitor decided; the devices module persists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Transition {
    Health {
        device: String,
        from: Health,
        to: Health,
    },
    LowBattery {
        device: String,
        battery: u8,
        active: bool,
    },
}

/// A device as the monitor tracks it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tracked {
    pub(crate) last_seen_ms: u64,
    pub(crate) interval_ms: u64,
    pub(crate) health: Health,
    pub(crate) low_battery: bool,
}

/// The monitor's state machine, separate from its timer so the rules can be
/// tested without time passing.
#[derive(Debug)]
pub(crate) struct Machine {
    rules: Rules,
    devices: HashMap<String, Tracked>,
    deadlines: BTreeSet<(u64, String)>,
}

impl Machine {
    pub(crate) fn new(rules: Rules) -> Machine {
        Machine {
            rules,
            devices: HashMap::new(),
            deadlines: BTreeSet::new(),
        }
    }

    #[cfg(test)]
    pub(crate) fn get(&self, device: &str) -> Option<&Tracked> {
        self.devices.get(device)
    }

    fn deadline_of(&self, t: &Tracked) -> Option<u64> {
        self.rules
            .next_deadline(t.last_seen_ms, t.interval_ms, t.health)
    }

    fn set(&mut self, device: &str, t: Tracked) {
        if let Some(old) = self.devices.get(device) {
            if let Some(d) = self.deadline_of(old) {
                self.deadlines.remove(&(d, device.to_owned()));
            }
        }
        if let Some(d) = self.deadline_of(&t) {
            self.deadlines.insert((d, device.to_owned()));
        }
        self.devices.insert(device.to_owned(), t);
    }

    /// Loads a device as stored (at start-up).
    pub(crate) fn load(&mut self, device: &str, t: Tracked) {
        self.set(device, t);
    }

    pub(crate) fn earliest(&self) -> Option<u64> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    pub(crate) fn signal(&mut self, s: Signal, out: &mut Vec<Transition>) {
        match s {
            Signal::Seen {
                device,
                at_ms,
                interval_ms,
                battery,
            } => {
                let mut t = self.devices.get(&device).cloned().unwrap_or(Tracked {
                    last_seen_ms: at_ms,
                    interval_ms,
                    health: Health::Online,
                    low_battery: false,
                });
                t.last_seen_ms = t.last_seen_ms.max(at_ms);
                t.interval_ms = interval_ms;
                if t.health != Health::Online {
                    out.push(Transition::Health {
                        device: device.clone(),
                        from: t.health,
                        to: Health::Online,
                    });
                    t.health = Health::Online;
                }
                if let Some(b) = battery {
                    let low = self.rules.battery_low(b, t.low_battery);
                    if low != t.low_battery {
                        out.push(Transition::LowBattery {
                            device: device.clone(),
                            battery: b,
                            active: low,
                        });
                        t.low_battery = low;
                    }
                }
                self.set(&device, t);
            }
            Signal::Offline { device } => {
                if let Some(mut t) = self.devices.get(&device).cloned() {
                    if t.health != Health::Offline {
                        out.push(Transition::Health {
                            device: device.clone(),
                            from: t.health,
                            to: Health::Offline,
                        });
                        t.health = Health::Offline;
                        self.set(&device, t);
                    }
                }
            }
        }
    }

    /// Applies every deadline at or before `now_ms`.
    pub(crate) fn expire(&mut self, now_ms: u64, out: &mut Vec<Transition>) {
        while let Some((d, device)) = self.deadlines.first().cloned() {
            if d > now_ms {
                break;
            }
            let Some(mut t) = self.devices.get(&device).cloned() else {
                self.deadlines.remove(&(d, device));
                continue;
            };
            let to = self.rules.health_at(t.last_seen_ms, t.interval_ms, now_ms);
            // Silence only ever makes health worse; a stale device read
            // as "online" here would mean a clock step backwards.
            let to = to.max(t.health);
            if to == t.health {
                // Deadline already passed for this state (clock step):
                // move on to the next state's deadline.
                let next = match t.health {
                    Health::Online => Health::Stale,
                    _ => Health::Offline,
                };
                out.push(Transition::Health {
                    device: device.clone(),
                    from: t.health,
                    to: next,
                });
                t.health = next;
            } else {
                out.push(Transition::Health {
                    device: device.clone(),
                    from: t.health,
                    to,
                });
                t.health = to;
            }
            self.set(&device, t);
        }
    }
}

/// Runs the monitor: waits for signals or the next deadline, and hands each
/// batch of transitions to `apply` (which persists and publishes them).
pub(crate) async fn run<F, Fut>(
    mut machine: Machine,
    signals: async_channel::Receiver<Vec<Signal>>,
    mut apply: F,
) where
    F: FnMut(Vec<Transition>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut timer = async_io::Timer::never();
    loop {
        arm(&mut timer, machine.earliest());
        let woke = async { Some(signals.recv().await) }
            .or(async {
                (&mut timer).await;
                None
            })
            .await;
        let mut out = Vec::new();
        match woke {
            Some(Ok(batch)) => {
                for s in batch {
                    machine.signal(s, &mut out);
                }
                // Coalesce whatever else is already queued.
                while let Ok(batch) = signals.try_recv() {
                    for s in batch {
                        machine.signal(s, &mut out);
                    }
                }
            }
            Some(Err(_)) => return,
            None => {}
        }
        machine.expire(wall_millis(), &mut out);
        if !out.is_empty() {
            apply(out).await;
        }
    }
}

fn arm(timer: &mut async_io::Timer, deadline_ms: Option<u64>) {
    match deadline_ms {
        Some(d) => {
            let wait = d.saturating_sub(wall_millis());
            timer.set_at(Instant::now() + Duration::from_millis(wait));
        }
        None => *timer = async_io::Timer::never(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        stale_after_missed: 2,
        offline_after_missed: 4,
        low_battery_percent: 15,
    };

    fn seen(device: &str, at_ms: u64, battery: Option<u8>) -> Signal {
        Signal::Seen {
            device: device.into(),
            at_ms,
            interval_ms: 1000,
            battery,
        }
    }

    fn health(from: Health, to: Health) -> Transition {
        Transition::Health {
            device: "d".into(),
            from,
            to,
        }
    }

    #[test]
    fn silence_makes_a_device_stale_then_offline() {
        assert_eq!(RULES.health_at(0, 1000, 1999), Health::Online);
        assert_eq!(RULES.health_at(0, 1000, 2000), Health::Stale);
        assert_eq!(RULES.health_at(0, 1000, 4000), Health::Offline);
        let mut m = Machine::new(RULES);
        let mut out = Vec::new();
        m.signal(seen("d", 10_000, None), &mut out);
        assert!(out.is_empty());
        assert_eq!(m.earliest(), Some(12_000));
        m.expire(11_999, &mut out);
        assert!(out.is_empty());
        m.expire(12_000, &mut out);
        assert_eq!(out, vec![health(Health::Online, Health::Stale)]);
        assert_eq!(m.earliest(), Some(14_000));
        out.clear();
        m.expire(14_500, &mut out);
        assert_eq!(out, vec![health(Health::Stale, Health::Offline)]);
        assert_eq!(m.earliest(), None, "offline devices need no timer");
        out.clear();
        // heard again: back online, a fresh deadline
        m.signal(seen("d", 20_000, None), &mut out);
        assert_eq!(out, vec![health(Health::Offline, Health::Online)]);
        assert_eq!(m.earliest(), Some(22_000));
    }

    #[test]
    fn a_long_silence_goes_straight_to_offline() {
        let mut m = Machine::new(RULES);
        let mut out = Vec::new();
        m.signal(seen("d", 0, None), &mut out);
        m.expire(60_000, &mut out);
        assert_eq!(out, vec![health(Health::Online, Health::Offline)]);
    }

    #[test]
    fn traffic_moves_the_deadline() {
        let mut m = Machine::new(RULES);
        let mut out = Vec::new();
        m.signal(seen("d", 0, None), &mut out);
        m.signal(seen("d", 1_500, None), &mut out);
        // an out-of-order older message does not move it back
        m.signal(seen("d", 1_000, None), &mut out);
        assert_eq!(m.earliest(), Some(3_500));
        m.expire(3_000, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn last_will_is_immediate_and_unknown_devices_are_ignored() {
        let mut m = Machine::new(RULES);
        let mut out = Vec::new();
        m.signal(Signal::Offline { device: "x".into() }, &mut out);
        assert!(out.is_empty());
        m.signal(seen("d", 0, None), &mut out);
        m.signal(Signal::Offline { device: "d".into() }, &mut out);
        assert_eq!(out, vec![health(Health::Online, Health::Offline)]);
        assert_eq!(m.earliest(), None);
        out.clear();
        m.signal(Signal::Offline { device: "d".into() }, &mut out);
        assert!(out.is_empty(), "already offline");
    }

    #[test]
    fn low_battery_alerts_with_hysteresis() {
        let mut m = Machine::new(RULES);
        let mut out = Vec::new();
        m.signal(seen("d", 0, Some(50)), &mut out);
        assert!(out.is_empty());
        m.signal(seen("d", 1, Some(14)), &mut out);
        assert_eq!(
            out,
            vec![Transition::LowBattery {
                device: "d".into(),
                battery: 14,
                active: true
            }]
        );
        out.clear();
        m.signal(seen("d", 2, Some(16)), &mut out);
        m.signal(seen("d", 3, Some(19)), &mut out);
        assert!(out.is_empty(), "within the hysteresis band");
        m.signal(seen("d", 4, Some(20)), &mut out);
        assert_eq!(
            out,
            vec![Transition::LowBattery {
                device: "d".into(),
                battery: 20,
                active: false
            }]
        );
    }

    #[test]
    fn the_task_fires_at_the_deadline_without_polling() {
        let (tx, rx) = async_channel::bounded(4);
        let (done_tx, done_rx) = async_channel::bounded(4);
        let rules = Rules {
            stale_after_missed: 1,
            offline_after_missed: 2,
            low_battery_percent: 10,
        };
        let task = smol::spawn(run(Machine::new(rules), rx, move |t| {
            let done_tx = done_tx.clone();
            async move {
                let _ = done_tx.send(t).await;
            }
        }));
        smol::block_on(async {
            let started = Instant::now();
            tx.send(vec![Signal::Seen {
                device: "d".into(),
                at_ms: wall_millis(),
                interval_ms: 1000,
                battery: None,
            }])
            .await
            .unwrap();
            let t = done_rx.recv().await.unwrap();
            assert!(
                matches!(
                    &t[0],
                    Transition::Health {
                        to: Health::Stale,
                        ..
                    }
                ),
                "{t:?}"
            );
            let t = done_rx.recv().await.unwrap();
            assert!(
                matches!(
                    &t[0],
                    Transition::Health {
                        to: Health::Offline,
                        ..
                    }
                ),
                "{t:?}"
            );
            let took = started.elapsed();
            assert!(
                took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
                "{took:?}"
            );
            drop(tx);
            task.await;
        });
    }
}
