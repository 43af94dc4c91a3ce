use super::health::{Health, Rules, Signal, Transition};
use super::*;
use crate::devices::payload::{parse, Inbound};
use crate::registry::{Limits, ServiceInput};
use crate::store::{Store, StoreOptions};

fn setup(dir: &std::path::Path, max_devices: u64, max_history_bytes: u64) -> (Devices, Channels) {
    let store = Store::open(StoreOptions {
        path: dir.join("d.db"),
        max_size: 16 << 20,
        node_id: "edge-a".into(),
    })
    .unwrap();
    let registry = Registry::new(
        store,
        Limits {
            max_services: 5,
            default_ttl_ms: 0,
        },
    );
    Devices::new(
        registry,
        Settings {
            rules: Rules {
                stale_after_missed: 2,
                offline_after_missed: 4,
                low_battery_percent: 15,
            },
            max_devices,
            retention_ms: 86_400_000,
            max_history_bytes,
        },
    )
}

fn msg(topic: &str, payload: &str) -> Inbound {
    parse(topic, payload.as_bytes(), 4096).unwrap()
}

fn register(id: &str) -> Inbound {
    msg(
        &format!("devices/{id}/register"),
        r#"{"type":"sensor","name":"n","metadata":{"zone":"a"},"telemetry_interval":"1s","battery":80}"#,
    )
}

#[test]
fn registration_writes_device_and_service_together_and_is_idempotent() {
    let d = tempfile::tempdir().unwrap();
    let (devices, ch) = setup(d.path(), 10, 1 << 20);
    smol::block_on(async {
        let out = devices.apply(vec![register("s1")]).await.unwrap();
        let Outcome::Registered {
            modify_index,
            created: true,
            ..
        } = out[0]
        else {
            panic!("{out:?}")
        };
        let svc = devices.registry.service("s1".into()).await.unwrap().service;
        assert_eq!(svc.name, "sensor");
        assert_eq!(svc.tags, vec!["iot", "mqtt"]);
        assert_eq!(svc.meta["zone"], "a");
        let view = devices.get("s1".into()).await.unwrap();
        assert_eq!(view.modify_index, modify_index);
        assert_eq!(view.battery, Some(80));
        assert_eq!(view.health, Health::Online);
        assert_eq!(view.telemetry_interval, "1s");
        // the monitor heard of it
        let seen = ch.signals.try_recv().unwrap();
        assert!(matches!(
            &seen[0],
            Signal::Seen {
                interval_ms: 1000,
                ..
            }
        ));

        let out = devices.apply(vec![register("s1")]).await.unwrap();
        assert_eq!(
            out[0],
            Outcome::Registered {
                device: "s1".into(),
                modify_index,
                created: false
            },
            "same registration, same version"
        );
        let outbox = devices
            .registry
            .store()
            .call(|db| db.outbox(10).unwrap())
            .await
            .unwrap();
        assert_eq!(outbox.len(), 2, "one device, one service: {outbox:?}");
    });
}

#[test]
fn telemetry_needs_a_registration_and_gets_sequence_numbers() {
    let d = tempfile::tempdir().unwrap();
    let (devices, _ch) = setup(d.path(), 10, 1 << 20);
    smol::block_on(async {
        let t = |v: u32| msg("devices/s1/telemetry", &format!(r#"{{"temp":{v}}}"#));
        let out = devices.apply(vec![t(1)]).await.unwrap();
        assert!(
            matches!(
                &out[0],
                Outcome::Rejected {
                    reason: Reason::Unregistered,
                    ..
                }
            ),
            "{out:?}"
        );
        let out = devices
            .apply(vec![register("s1"), t(1), t(2), t(3)])
            .await
            .unwrap();
        assert_eq!(
            out[1..],
            [Outcome::Stored, Outcome::Stored, Outcome::Stored]
        );
        let h = devices.telemetry("s1".into(), 0, 10).await.unwrap();
        assert_eq!(h.iter().map(|p| p.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(h[2].values["temp"], 3);
        let h = devices.telemetry("s1".into(), 2, 10).await.unwrap();
        assert_eq!(h.len(), 1);
        let v = devices.get("s1".into()).await.unwrap();
        assert_eq!(v.last_telemetry.unwrap()["temp"], 3);
        assert_eq!(v.telemetry_seq, 3);
        assert!(matches!(
            devices.telemetry("nope".into(), 0, 10).await,
            Err(DeviceError::NotFound { .. })
        ));
    });
}

#[test]
fn history_is_kept_under_its_size_limit() {
    let d = tempfile::tempdir().unwrap();
    let (devices, _ch) = setup(d.path(), 10, 20_000);
    smol::block_on(async {
        devices.apply(vec![register("s1")]).await.unwrap();
        let body = format!(r#"{{"blob":"{}"}}"#, "x".repeat(900));
        for _ in 0..10 {
            let batch = (0..10)
                .map(|_| msg("devices/s1/telemetry", &body))
                .collect();
            devices.apply(batch).await.unwrap();
        }
        let (bytes, rows): (i64, i64) = devices
            .registry
            .store()
            .call(|db| {
                let b = db
                    .conn()
                    .query_row(
                        "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'telemetry_bytes'",
                        [],
                        |r| r.get(0),
                    )
                    .unwrap();
                let n = db
                    .conn()
                    .query_row("SELECT count(*) FROM telemetry", [], |r| r.get(0))
                    .unwrap();
                (b, n)
            })
            .await
            .unwrap();
        assert!(bytes <= 20_000, "{bytes}");
        assert!(rows > 5 && rows < 25, "{rows}");
        // the newest survive
        let h = devices.telemetry("s1".into(), 0, 1000).await.unwrap();
        assert_eq!(h.last().unwrap().seq, 100);
    });
}

#[test]
fn old_history_is_pruned_by_age() {
    let d = tempfile::tempdir().unwrap();
    let (devices, _ch) = setup(d.path(), 10, 1 << 20);
    smol::block_on(async {
        devices.apply(vec![register("s1")]).await.unwrap();
        devices
            .apply(vec![
                msg("devices/s1/telemetry", r#"{"a":1}"#),
                msg("devices/s1/events", r#"{"type":"boot"}"#),
            ])
            .await
            .unwrap();
        assert!(devices.next_expiry().await.unwrap().is_some());
        // Age the rows instead of waiting a day.
        devices
            .registry
            .store()
            .call(|db| {
                db.conn()
                    .execute_batch(
                        "UPDATE telemetry SET ts_ms = ts_ms - 90000000;
                         UPDATE device_events SET ts_ms = ts_ms - 90000000;",
                    )
                    .unwrap()
            })
            .await
            .unwrap();
        devices
            .apply(vec![msg("devices/s1/telemetry", r#"{"a":2}"#)])
            .await
            .unwrap();
        let h = devices.telemetry("s1".into(), 0, 10).await.unwrap();
        assert_eq!(h.iter().map(|p| p.seq).collect::<Vec<_>>(), [2]);
        devices
            .registry
            .store()
            .call(|db| {
                db.conn()
                    .execute_batch("UPDATE telemetry SET ts_ms = ts_ms - 90000000")
                    .unwrap()
            })
            .await
            .unwrap();
        devices.prune_now().await.unwrap();
        assert!(devices
            .telemetry("s1".into(), 0, 10)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(devices.next_expiry().await.unwrap(), None);
    });
}

#[test]
fn limits_and_foreign_services_refuse_and_change_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (devices, _ch) = setup(d.path(), 1, 1 << 20);
    smol::block_on(async {
        devices.apply(vec![register("s1")]).await.unwrap();
        let out = devices.apply(vec![register("s2")]).await.unwrap();
        assert!(
            matches!(
                &out[0],
                Outcome::Rejected {
                    reason: Reason::Limit,
                    ..
                }
            ),
            "{out:?}"
        );
        devices
            .registry
            .register(
                ServiceInput {
                    name: "web".into(),
                    address: "10.0.0.1".into(),
                    port: 80,
                    ..Default::default()
                },
                None,
            )
            .await
            .unwrap();
        let (devices2, _ch2) = (devices.clone(), ());
        let mut s = devices2.settings;
        s.max_devices = 10;
        let devices2 = Devices {
            settings: s,
            ..devices2
        };
        let out = devices2.apply(vec![register("web")]).await.unwrap();
        assert!(
            matches!(
                &out[0],
                Outcome::Rejected {
                    reason: Reason::Invalid,
                    ..
                }
            ),
            "{out:?}"
        );
        assert_eq!(devices.list().await.unwrap().len(), 1);
        assert!(devices
            .registry
            .service("web".into())
            .await
            .unwrap()
            .service
            .tags
            .is_empty());
    });
}

#[test]
fn transitions_raise_and_clear_alerts() {
    let d = tempfile::tempdir().unwrap();
    let (devices, ch) = setup(d.path(), 10, 1 << 20);
    smol::block_on(async {
        devices.apply(vec![register("s1")]).await.unwrap();
        let t = |from, to| Transition::Health {
            device: "s1".into(),
            from,
            to,
        };
        devices
            .record(vec![t(Health::Online, Health::Stale)])
            .await
            .unwrap();
        assert_eq!(
            devices.get("s1".into()).await.unwrap().health,
            Health::Stale
        );
        assert!(devices.alerts(true, None).await.unwrap().is_empty());
        devices
            .record(vec![
                t(Health::Stale, Health::Offline),
                Transition::LowBattery {
                    device: "s1".into(),
                    battery: 3,
                    active: true,
                },
            ])
            .await
            .unwrap();
        let active = devices.alerts(true, None).await.unwrap();
        let mut names: Vec<_> = active.iter().map(|a| a.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["low_battery", "offline"]);
        assert_eq!(ch.alerts.try_recv().unwrap().name, "offline");
        devices
            .record(vec![t(Health::Offline, Health::Online)])
            .await
            .unwrap();
        let active = devices.alerts(true, None).await.unwrap();
        assert_eq!(active.len(), 1);
        let all = devices.alerts(false, Some("s1".into())).await.unwrap();
        let offline = all.iter().find(|a| a.name == "offline").unwrap();
        assert!(!offline.active && offline.cleared_at_ms.is_some());
        // the monitor reloads the low-battery alert as active
        let m = devices.machine(0).await.unwrap();
        assert!(m.get("s1").unwrap().low_battery);
        let counts = devices.counts().await.unwrap();
        assert!(counts.contains(&(Health::Online, 1)));
    });
}

#[test]
fn device_raised_alerts_come_and_go_with_events() {
    let d = tempfile::tempdir().unwrap();
    let (devices, _ch) = setup(d.path(), 10, 1 << 20);
    smol::block_on(async {
        devices.apply(vec![register("s1")]).await.unwrap();
        devices
            .apply(vec![msg(
                "devices/s1/events",
                r#"{"type":"alert","name":"overheat","severity":"critical","message":"92C"}"#,
            )])
            .await
            .unwrap();
        let a = devices.alerts(true, None).await.unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(
            (a[0].name.as_str(), a[0].message.as_str()),
            ("event:overheat", "92C")
        );
        devices
            .apply(vec![msg(
                "devices/s1/events",
                r#"{"type":"alert","name":"overheat","active":false}"#,
            )])
            .await
            .unwrap();
        assert!(devices.alerts(true, None).await.unwrap().is_empty());
    });
}

#[test]
fn signals_coalesce_per_device_but_keep_offline_in_order() {
    let seen = |d: &str, at_ms, battery| Signal::Seen {
        device: d.into(),
        at_ms,
        interval_ms: 1000,
        battery,
    };
    let mut fx = Effects {
        signals: vec![
            seen("a", 1, Some(50)),
            seen("b", 2, None),
            seen("a", 3, None),
            Signal::Offline { device: "a".into() },
            seen("a", 5, Some(40)),
        ],
        ..Default::default()
    };
    fx.coalesce_signals();
    assert_eq!(
        fx.signals,
        vec![
            seen("a", 3, Some(50)),
            seen("b", 2, None),
            Signal::Offline { device: "a".into() },
            seen("a", 5, Some(40)),
        ]
    );
}

#[test]
fn a_redelivered_reading_is_stored_once_and_a_repeated_one_twice() {
    use super::redelivery::Seen;
    let d = tempfile::tempdir().unwrap();
    let (devices, _ch) = setup(d.path(), 10, 1 << 20);
    smol::block_on(async {
        devices.apply(vec![register("s1")]).await.unwrap();
        let (topic, body) = ("devices/s1/telemetry", r#"{"temp":21}"#);
        let once = |dup| {
            (
                msg(topic, body),
                Some(Seen::of(topic, body.as_bytes(), dup)),
            )
        };
        let count = || async { devices.telemetry("s1".into(), 0, 10).await.unwrap().len() };
        devices.apply_seen(vec![once(false)]).await.unwrap();
        assert_eq!(count().await, 1);
        // The broker re-sends it (DUP) after a stop between commit and PUBACK.
        let out = devices.apply_seen(vec![once(true)]).await.unwrap();
        assert_eq!(out, [Outcome::Stored]);
        assert_eq!(count().await, 1, "a redelivery is not stored again");
        // The device sends the same reading again: a new message.
        devices.apply_seen(vec![once(false)]).await.unwrap();
        assert_eq!(count().await, 2);
        // A DUP the store never saw (lost before its commit) is stored.
        let other = r#"{"temp":22}"#;
        let dup = (
            msg(topic, other),
            Some(Seen::of(topic, other.as_bytes(), true)),
        );
        devices.apply_seen(vec![dup]).await.unwrap();
        assert_eq!(count().await, 3);
    });
}
