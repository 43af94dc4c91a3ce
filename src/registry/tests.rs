//! Unit tests of the registry: validation, the write path, CAS, limits, TTL.

use super::*;
use crate::clock::Causality;
use crate::store::StoreOptions;

fn registry(dir: &std::path::Path) -> Registry {
    let store = Store::open(StoreOptions {
        path: dir.join("r.db"),
        max_size: 8 << 20,
        node_id: "edge-a".into(),
    })
    .unwrap();
    Registry::new(
        store,
        Limits {
            max_services: 3,
            default_ttl_ms: 0,
        },
    )
}

fn svc(name: &str) -> ServiceInput {
    ServiceInput {
        name: name.into(),
        address: "10.0.0.1".into(),
        port: 80,
        ..Default::default()
    }
}

#[test]
fn validation_follows_konsul() {
    let ok = |i: ServiceInput| validate_service(i, 0).map(|_| ());
    assert!(ok(svc("web")).is_ok());
    assert!(ok(ServiceInput {
        port: 0,
        ..svc("web")
    })
    .is_err());
    assert!(ok(ServiceInput {
        port: 65536,
        ..svc("web")
    })
    .is_err());
    assert!(ok(ServiceInput {
        address: String::new(),
        ..svc("web")
    })
    .is_err());
    assert!(ok(svc("")).is_err());
    assert!(ok(ServiceInput {
        tags: vec!["a b".into()],
        ..svc("web")
    })
    .is_err());
    assert!(ok(ServiceInput {
        tags: vec!["x".into(), "x".into()],
        ..svc("web")
    })
    .is_err());
    assert!(ok(ServiceInput {
        tags: (0..65).map(|i| format!("t{i}")).collect(),
        ..svc("web")
    })
    .is_err());
    let meta = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    assert!(ok(ServiceInput {
        meta: meta("konsul_x", "1"),
        ..svc("web")
    })
    .is_err());
    assert!(ok(ServiceInput {
        meta: meta("_x", "1"),
        ..svc("web")
    })
    .is_err());
    assert!(ok(ServiceInput {
        meta: meta("ok", &"v".repeat(513)),
        ..svc("web")
    })
    .is_err());
    assert!(ok(ServiceInput {
        meta: meta("ok-key_1", &"v".repeat(512)),
        ..svc("web")
    })
    .is_ok());
    assert!(ok(ServiceInput {
        ttl: Some("10x".into()),
        ..svc("web")
    })
    .is_err());
}

#[test]
fn every_write_stamps_and_queues() {
    let d = tempfile::tempdir().unwrap();
    let r = registry(d.path());
    smol::block_on(async {
        let (_, i1) = r.register(svc("web"), None).await.unwrap();
        let (_, i2) = r
            .register(
                ServiceInput {
                    port: 81,
                    ..svc("web")
                },
                None,
            )
            .await
            .unwrap();
        assert!(i2 > i1);
        // identical re-registration is not a new version
        let (_, i3) = r
            .register(
                ServiceInput {
                    port: 81,
                    ..svc("web")
                },
                None,
            )
            .await
            .unwrap();
        assert_eq!(i3, i2);
        let (rec, outbox) = r
            .store()
            .call(|db| {
                (
                    db.get(Kind::Service, "web").unwrap().unwrap(),
                    db.outbox(10).unwrap(),
                )
            })
            .await
            .unwrap();
        assert_eq!(rec.vv.get("edge-a"), 2);
        assert_eq!(outbox.len(), 1, "outbox coalesces per key");
        r.deregister("web".into(), None).await.unwrap();
        let rec2 = r
            .store()
            .call(|db| db.get(Kind::Service, "web").unwrap().unwrap())
            .await
            .unwrap();
        assert!(rec2.tombstone);
        assert!(rec2.hlc > rec.hlc);
        // No body; every field the delete knew is stamped absent by it.
        assert_eq!(rec2.body, "{}");
        assert!(!rec2.fields.is_empty());
        assert!(rec2.fields.values().all(|s| s.hlc == rec2.hlc.0));
        assert_eq!(rec2.vv.compare(&rec.vv), Causality::Dominates);
    });
}

#[test]
fn committed_changes_are_announced_and_refused_ones_are_not() {
    let d = tempfile::tempdir().unwrap();
    let r = registry(d.path());
    let mut rx = r.subscribe();
    smol::block_on(async {
        r.register(svc("web"), None).await.unwrap();
        r.kv_put("k".into(), "v".into(), 0, None).await.unwrap();
        assert!(r.kv_put("k".into(), "v".into(), 0, Some(0)).await.is_err());
        r.kv_delete("k".into(), None).await.unwrap();
        r.kv_delete("k".into(), None).await.unwrap(); // no-op: nothing to announce
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        let want = [
            (Kind::Service, "web", ChangeOp::Upsert),
            (Kind::Kv, "k", ChangeOp::Upsert),
            (Kind::Kv, "k", ChangeOp::Delete),
        ];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (c, (k, key, op)) in got.iter().zip(want) {
            assert_eq!((c.kind, c.key.as_str(), c.op), (k, key, op));
        }
        let views = r.records(Kind::Service).await.unwrap();
        assert_eq!(views[0].body["name"], "web");
    });
}

#[test]
fn cas_semantics() {
    let d = tempfile::tempdir().unwrap();
    let r = registry(d.path());
    smol::block_on(async {
        let i1 = r.kv_put("a".into(), "1".into(), 0, Some(0)).await.unwrap();
        assert!(matches!(
            r.kv_put("a".into(), "2".into(), 0, Some(0)).await,
            Err(RegistryError::CasConflict { .. })
        ));
        assert!(matches!(
            r.kv_put("a".into(), "2".into(), 0, Some(i1 + 100)).await,
            Err(RegistryError::CasConflict { .. })
        ));
        assert!(matches!(
            r.kv_put("missing".into(), "2".into(), 0, Some(5)).await,
            Err(RegistryError::NotFound { .. })
        ));
        let i2 = r.kv_put("a".into(), "2".into(), 7, Some(i1)).await.unwrap();
        let e = r.kv_get("a".into()).await.unwrap();
        assert_eq!(
            (e.value.as_str(), e.flags, e.modify_index, e.create_index),
            ("2", 7, i2, i1)
        );
        assert!(matches!(
            r.kv_delete("a".into(), Some(i1)).await,
            Err(RegistryError::CasConflict { .. })
        ));
        r.kv_delete("a".into(), Some(i2)).await.unwrap();
        assert!(matches!(
            r.kv_get("a".into()).await,
            Err(RegistryError::NotFound { .. })
        ));
        // re-created after a delete: a fresh create index
        let i3 = r.kv_put("a".into(), "3".into(), 0, Some(0)).await.unwrap();
        assert_eq!(r.kv_get("a".into()).await.unwrap().create_index, i3);
    });
}

#[test]
fn service_limit_is_enforced_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let r = registry(d.path());
    smol::block_on(async {
        for n in ["a", "b", "c"] {
            r.register(svc(n), None).await.unwrap();
        }
        let e = r.register(svc("d"), None).await.unwrap_err();
        assert!(matches!(e, RegistryError::ServiceLimit { limit: 3 }), "{e}");
        // updating an existing one is still allowed
        r.register(
            ServiceInput {
                port: 99,
                ..svc("a")
            },
            None,
        )
        .await
        .unwrap();
        assert_eq!(r.services(true).await.unwrap().len(), 3);
        let outbox = r.store().call(|db| db.outbox(100).unwrap()).await.unwrap();
        assert!(outbox.iter().all(|(_, _, k)| k != "d"));
    });
}

#[test]
fn several_instances_share_a_name() {
    let d = tempfile::tempdir().unwrap();
    let r = registry(d.path());
    smol::block_on(async {
        r.register(
            ServiceInput {
                id: Some("web-1".into()),
                ..svc("web")
            },
            None,
        )
        .await
        .unwrap();
        r.register(
            ServiceInput {
                id: Some("web-2".into()),
                port: 81,
                ..svc("web")
            },
            None,
        )
        .await
        .unwrap();
        assert_eq!(r.services(false).await.unwrap().len(), 2);
        let e = r.service("web".into()).await.unwrap();
        assert_eq!(e.service.name, "web");
        assert_eq!(r.service("web-2".into()).await.unwrap().service.port, 81);
    });
}

#[test]
fn ttl_services_turn_critical_and_heartbeats_revive_them() {
    let d = tempfile::tempdir().unwrap();
    let r = registry(d.path());
    smol::block_on(async {
        r.register(
            ServiceInput {
                ttl: Some("1s".into()),
                ..svc("ttl")
            },
            None,
        )
        .await
        .unwrap();
        assert_eq!(r.services(false).await.unwrap().len(), 1);
        // Move the deadline into the past instead of sleeping.
        r.store()
            .call(|db| db.touch_service("ttl", wall_millis() - 5_000).unwrap())
            .await
            .unwrap();
        assert!(r.services(false).await.unwrap().is_empty());
        assert_eq!(r.services(true).await.unwrap()[0].health, Health::Critical);
        assert!(matches!(
            r.service("ttl".into()).await,
            Err(RegistryError::NotFound { .. })
        ));
        r.heartbeat("ttl".into()).await.unwrap();
        assert_eq!(r.services(false).await.unwrap().len(), 1);
        let outbox = r.store().call(|db| db.outbox(10).unwrap()).await.unwrap();
        assert_eq!(outbox.len(), 1, "heartbeats are not replicated writes");
    });
}
