//! Merge rules for replicated records: pure functions, no I/O.
//!
//! A version is (body, HLC stamp, origin, version vector, tombstone,
//! per-field stamps). Merging two versions of one record is a *join*: it is
//! idempotent, commutative and associative, so any order, duplication or
//! replay of sync batches ends in the same state on every replica. That
//! holds because each part of the result is a maximum over a total order or
//! a pointwise maximum:
//!
//! - the version vector is the pointwise max of both (it only records what
//!   has been seen, and decides whether the two were *concurrent*, which is
//!   reported as a conflict but does not change the result);
//! - `last-write-wins`: the content (body, tombstone, stamps) is that of the
//!   version with the larger `(hlc, origin)`. HLC respects causality (a
//!   replica's clock moves past every timestamp it merges), so a version
//!   that dominates another by version vector also has the larger stamp:
//!   LWW never undoes a causally later write;
//! - `crdt` (an LWW map per field): each top-level body field takes the
//!   value with the larger field stamp, so concurrent edits to different
//!   fields both survive; whether the record is deleted is decided by the
//!   record-level stamp as in LWW. Tombstones keep no body: a delete
//!   writes "absent" into every field it knew, stamped with the delete, so
//!   field data stays a join across delete and re-create (each field is
//!   still a maximum over (stamp, value)) and an older value cannot revive
//!   a deleted field.
//!
//! Ties on equal stamps (which one replica never issues twice) are broken by
//! comparing content, so even malformed input merges deterministically.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::{Causality, Hlc, VersionVector};

/// When and by whom a field was last written. Ordered by (hlc, origin).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    pub hlc: u64,
    pub origin: String,
}

pub type FieldStamps = BTreeMap<String, Stamp>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeStrategy {
    LastWriteWins,
    FieldWise,
}

/// One version of a record, as far as merging is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Canonical JSON (sorted keys) of the record; `{}` for a tombstone
    /// written locally (a merged tombstone may carry fields written after
    /// the delete's stamp).
    pub body: String,
    pub hlc: Hlc,
    pub origin: String,
    pub vv: VersionVector,
    pub tombstone: bool,
    pub fields: FieldStamps,
}

/// The result of a merge, with what the caller needs to decide what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub merged: Version,
    /// The two inputs were concurrent (neither had seen the other): a
    /// conflict to record, whatever the result.
    pub concurrent: bool,
    /// The version whose record-level stamp won.
    pub winner: Side,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Local,
    Remote,
}

impl Version {
    fn stamp_order(&self, other: &Version) -> Ordering {
        (self.hlc, &self.origin, self.tombstone, &self.body).cmp(&(
            other.hlc,
            &other.origin,
            other.tombstone,
            &other.body,
        ))
    }
}

/// Parses and re-serialises a JSON object with sorted keys, so equal bodies
/// are equal strings on every replica.
pub fn canonical(body: &str) -> Result<String, String> {
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(m)) => serde_json::to_string(&m).map_err(|e| e.to_string()),
        Ok(_) => Err("a record body must be a JSON object".into()),
        Err(e) => Err(format!("invalid JSON body: {e}")),
    }
}

/// Field stamps for a local write: fields whose value changed (or appeared,
/// or disappeared) get `stamp`; unchanged fields keep their old stamp.
pub fn restamp(prev: Option<(&str, &FieldStamps)>, new_body: &str, stamp: &Stamp) -> FieldStamps {
    let new: Map<String, Value> = object(new_body);
    let (old, old_stamps) = match prev {
        Some((b, s)) => (object(b), s.clone()),
        None => (Map::new(), FieldStamps::new()),
    };
    let mut out = FieldStamps::new();
    for key in new.keys().chain(old.keys()) {
        if out.contains_key(key) {
            continue;
        }
        let unchanged = new.get(key) == old.get(key);
        let s = match old_stamps.get(key) {
            Some(s) if unchanged => s.clone(),
            _ => stamp.clone(),
        };
        out.insert(key.clone(), s);
    }
    out
}

fn object(body: &str) -> Map<String, Value> {
    match serde_json::from_str(body) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

/// Merges `remote` into `local`.
pub fn merge(local: &Version, remote: &Version, strategy: MergeStrategy) -> Outcome {
    let concurrent = local.vv.compare(&remote.vv) == Causality::Concurrent;
    let (winner, side) = if remote.stamp_order(local) == Ordering::Greater {
        (remote, Side::Remote)
    } else {
        (local, Side::Local)
    };
    let mut vv = local.vv.clone();
    vv.merge(&remote.vv);
    let (body, fields) = match strategy {
        MergeStrategy::LastWriteWins => (winner.body.clone(), winner.fields.clone()),
        MergeStrategy::FieldWise => merge_fields(local, remote),
    };
    Outcome {
        merged: Version {
            body,
            hlc: winner.hlc,
            origin: winner.origin.clone(),
            vv,
            tombstone: winner.tombstone,
            fields,
        },
        concurrent,
        winner: side,
    }
}

fn merge_fields(a: &Version, b: &Version) -> (String, FieldStamps) {
    let (ma, mb) = (object(&a.body), object(&b.body));
    let mut body = Map::new();
    let mut stamps = FieldStamps::new();
    let keys: std::collections::BTreeSet<&String> =
        a.fields.keys().chain(b.fields.keys()).collect();
    for key in keys {
        let pick = |m: &Map<String, Value>, s: Option<&Stamp>| (s.cloned(), m.get(key).cloned());
        let ca = pick(&ma, a.fields.get(key));
        let cb = pick(&mb, b.fields.get(key));
        // Order by stamp, then by the value's text for equal stamps.
        let text = |v: &Option<Value>| v.as_ref().map(|v| v.to_string());
        let (stamp, value) = if (&cb.0, text(&cb.1)) > (&ca.0, text(&ca.1)) {
            cb
        } else {
            ca
        };
        if let Some(s) = stamp {
            stamps.insert(key.clone(), s);
        }
        if let Some(v) = value {
            body.insert(key.clone(), v);
        }
    }
    // Fields present in a body but never stamped (malformed input) are kept
    // from the record-level winner, so nothing silently disappears.
    let winner = if b.stamp_order(a) == Ordering::Greater {
        &mb
    } else {
        &ma
    };
    for (k, v) in winner {
        if !stamps.contains_key(k) {
            body.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    (
        serde_json::to_string(&body).unwrap_or_else(|_| "{}".into()),
        stamps,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stamp(hlc: u64, origin: &str) -> Stamp {
        Stamp {
            hlc,
            origin: origin.into(),
        }
    }

    /// A replica: its clock, its id, and its versions by key.
    struct Replica {
        id: String,
        clock: u64,
        state: BTreeMap<String, Version>,
    }

    impl Replica {
        fn new(id: &str) -> Self {
            Replica {
                id: id.into(),
                clock: 0,
                state: BTreeMap::new(),
            }
        }

        fn write(&mut self, key: &str, body: Option<&str>) {
            self.clock += 1;
            let prev = self.state.get(key).cloned();
            let mut vv = prev.as_ref().map(|p| p.vv.clone()).unwrap_or_default();
            vv.increment(&self.id);
            let s = stamp(self.clock, &self.id);
            // As registry::commit: a tombstone keeps no body and stamps
            // every field it knew as absent.
            let (body, tombstone) = match body {
                Some(b) => (canonical(b).unwrap(), false),
                None => ("{}".to_owned(), true),
            };
            let fields = match (&prev, tombstone) {
                (Some(p), true) => p.fields.keys().map(|k| (k.clone(), s.clone())).collect(),
                (p, _) => restamp(p.as_ref().map(|p| (p.body.as_str(), &p.fields)), &body, &s),
            };
            self.state.insert(
                key.into(),
                Version {
                    body,
                    hlc: Hlc(self.clock),
                    origin: self.id.clone(),
                    vv,
                    tombstone,
                    fields,
                },
            );
        }

        fn receive(&mut self, key: &str, remote: &Version, strategy: MergeStrategy) {
            self.clock = self.clock.max(remote.hlc.0) + 1;
            let merged = match self.state.get(key) {
                Some(local) => merge(local, remote, strategy).merged,
                None => remote.clone(),
            };
            self.state.insert(key.into(), merged);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write {
            replica: usize,
            key: usize,
            field: usize,
            value: u8,
        },
        Delete {
            replica: usize,
            key: usize,
        },
        Sync {
            from: usize,
            to: usize,
            keys: Vec<usize>,
        },
    }

    fn op(replicas: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..replicas, 0..3usize, 0..3usize, any::<u8>())
                .prop_map(|(replica, key, field, value)| Op::Write { replica, key, field, value }),
            1 => (0..replicas, 0..3usize).prop_map(|(replica, key)| Op::Delete { replica, key }),
            // Partial, duplicated, out-of-order delivery: any subset of keys,
            // repeats allowed.
            3 => (0..replicas, 0..replicas, proptest::collection::vec(0..3usize, 0..5))
                .prop_map(|(from, to, keys)| Op::Sync { from, to, keys }),
        ]
    }

    fn run(ops: &[Op], n: usize, strategy: MergeStrategy) -> Vec<BTreeMap<String, Version>> {
        let mut rs: Vec<Replica> = (0..n).map(|i| Replica::new(&format!("node-{i}"))).collect();
        for op in ops {
            match op {
                Op::Write {
                    replica,
                    key,
                    field,
                    value,
                } => {
                    let k = format!("k{key}");
                    let mut body = rs[*replica]
                        .state
                        .get(&k)
                        .filter(|v| !v.tombstone)
                        .map(|v| object(&v.body))
                        .unwrap_or_default();
                    body.insert(format!("f{field}"), Value::from(*value));
                    let text = serde_json::to_string(&body).unwrap();
                    rs[*replica].write(&k, Some(&text));
                }
                Op::Delete { replica, key } => {
                    let k = format!("k{key}");
                    if rs[*replica].state.get(&k).is_some_and(|v| !v.tombstone) {
                        rs[*replica].write(&k, None);
                    }
                }
                Op::Sync { from, to, keys } => {
                    for key in keys {
                        let k = format!("k{key}");
                        if let Some(v) = rs[*from].state.get(&k).cloned() {
                            rs[*to].receive(&k, &v, strategy);
                        }
                    }
                }
            }
        }
        // The link comes back: every replica sends everything to every other.
        for _ in 0..2 {
            for from in 0..n {
                for to in 0..n {
                    let all: Vec<(String, Version)> = rs[from]
                        .state
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    for (k, v) in all {
                        rs[to].receive(&k, &v, strategy);
                    }
                }
            }
        }
        rs.into_iter().map(|r| r.state).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn replicas_converge_whatever_the_delivery_order(
            ops in proptest::collection::vec(op(3), 0..60),
            fieldwise in any::<bool>(),
        ) {
            let strategy = if fieldwise { MergeStrategy::FieldWise } else { MergeStrategy::LastWriteWins };
            let states = run(&ops, 3, strategy);
            prop_assert_eq!(&states[0], &states[1]);
            prop_assert_eq!(&states[1], &states[2]);
        }

        #[test]
        fn merge_is_a_join(
            ops in proptest::collection::vec(op(3), 0..40),
            fieldwise in any::<bool>(),
        ) {
            // Versions as they occur mid-run, before convergence.
            let strategy = if fieldwise { MergeStrategy::FieldWise } else { MergeStrategy::LastWriteWins };
            let mut rs: Vec<Replica> = (0..3).map(|i| Replica::new(&format!("n{i}"))).collect();
            for (i, r) in rs.iter_mut().enumerate() {
                r.write("k", Some(&format!("{{\"init\":{i}}}")));
            }
            for (i, op) in ops.iter().enumerate() {
                if let Op::Write { replica, field, value, .. } = op {
                    let text = format!("{{\"f{field}\":{value},\"i\":{}}}", i % 2);
                    rs[*replica].write("k", Some(&text));
                }
                if let Op::Sync { from, to, .. } = op {
                    if let Some(v) = rs[*from].state.get("k").cloned() {
                        rs[*to].receive("k", &v, strategy);
                    }
                }
            }
            let vs: Vec<Version> = rs.iter().filter_map(|r| r.state.get("k").cloned()).collect();
            let m = |a: &Version, b: &Version| merge(a, b, strategy).merged;
            let (a, b, c) = (&vs[0], &vs[1], &vs[2]);
            prop_assert_eq!(m(a, a), a.clone(), "idempotent");
            prop_assert_eq!(m(a, b), m(b, a), "commutative");
            prop_assert_eq!(m(&m(a, b), c), m(a, &m(b, c)), "associative");
        }
    }

    fn version(
        body: &str,
        hlc: u64,
        origin: &str,
        vv: &[(&str, u64)],
        fields: &[(&str, u64, &str)],
    ) -> Version {
        Version {
            body: canonical(body).unwrap(),
            hlc: Hlc(hlc),
            origin: origin.into(),
            vv: VersionVector(vv.iter().map(|(k, v)| (k.to_string(), *v)).collect()),
            tombstone: false,
            fields: fields
                .iter()
                .map(|(k, h, o)| (k.to_string(), stamp(*h, o)))
                .collect(),
        }
    }

    #[test]
    fn lww_takes_the_later_write_and_reports_concurrency() {
        let base = [("a", 1)];
        let left = version(r#"{"port":1,"tag":"x"}"#, 10, "a", &[("a", 2)], &[]);
        let right = version(
            r#"{"port":2,"tag":"x"}"#,
            20,
            "b",
            &[("a", 1), ("b", 1)],
            &[],
        );
        let o = merge(&left, &right, MergeStrategy::LastWriteWins);
        assert!(o.concurrent);
        assert_eq!(o.winner, Side::Remote);
        assert_eq!(o.merged.body, r#"{"port":2,"tag":"x"}"#);
        assert_eq!(o.merged.vv.get("a"), 2);
        assert_eq!(o.merged.vv.get("b"), 1);
        // a version that has seen the other is not a conflict
        let newer = version(r#"{"port":3}"#, 30, "a", &[("a", 2), ("b", 1)], &[]);
        assert!(!merge(&o.merged, &newer, MergeStrategy::LastWriteWins).concurrent);
        let _ = base;
    }

    #[test]
    fn fieldwise_keeps_concurrent_edits_to_different_fields() {
        let s0 = [("address", 1, "a"), ("port", 1, "a")];
        let left = version(
            r#"{"address":"10.0.0.9","port":80}"#,
            10,
            "a",
            &[("a", 2)],
            &[("address", 10, "a"), ("port", 1, "a")],
        );
        let right = version(
            r#"{"address":"10.0.0.1","port":8080}"#,
            20,
            "b",
            &[("a", 1), ("b", 1)],
            &[("address", 1, "a"), ("port", 20, "b")],
        );
        let o = merge(&left, &right, MergeStrategy::FieldWise);
        assert!(o.concurrent);
        assert_eq!(o.merged.body, r#"{"address":"10.0.0.9","port":8080}"#);
        let lww = merge(&left, &right, MergeStrategy::LastWriteWins);
        assert_eq!(
            lww.merged.body, r#"{"address":"10.0.0.1","port":8080}"#,
            "LWW loses the address edit"
        );
        let _ = s0;
    }

    #[test]
    fn restamp_only_touches_changed_fields() {
        let prev = r#"{"a":1,"b":2,"gone":true}"#;
        let stamps: FieldStamps = [
            ("a", stamp(1, "x")),
            ("b", stamp(1, "x")),
            ("gone", stamp(1, "x")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let now = stamp(9, "y");
        let out = restamp(Some((prev, &stamps)), r#"{"a":1,"b":3,"new":0}"#, &now);
        assert_eq!(out["a"], stamp(1, "x"));
        assert_eq!(out["b"], now);
        assert_eq!(out["new"], now);
        assert_eq!(out["gone"], now, "a removed field is a change too");
    }

    #[test]
    fn canonical_sorts_keys_and_rejects_non_objects() {
        assert_eq!(
            canonical(r#"{"b":1,"a":{"d":1,"c":2}}"#).unwrap(),
            r#"{"a":{"c":2,"d":1},"b":1}"#
        );
        assert!(canonical("[1]").is_err());
        assert!(canonical("{").is_err());
    }
}
