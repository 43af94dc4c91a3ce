//! Applying replicated versions inside a store transaction: the same code on
//! the hub (versions from downstream edges) and on an edge (versions from
//! its hub). Runs on the store thread, called from store jobs.
//!
//! Rules:
//! - the merge is `crdt::merge`, so applying a version twice, or two
//!   versions in either order, gives the same record;
//! - a change gets a new modify index, which is what the change feed (and so
//!   paging and delta sync) follows;
//! - from downstream: a changed record is queued in this node's outbox (for
//!   its own upstream, if it has one), remembers which edge supplied it
//!   verbatim (not echoed back), and a new record is owned by that edge;
//! - from upstream: the outbox entry for the key is dropped when the hub's
//!   version already includes ours, and kept (or added) when ours still
//!   adds something, so the hub hears about it;
//! - concurrent versions are recorded as conflicts, whatever won;
//! - keys are per edge at a hub: two edges that both register `pos` (every
//!   till does) or both write `app/mode` get two records, not one fought
//!   over. An edge's key is used as it is unless another edge already owns
//!   it there; then the hub keeps this edge's record under
//!   `{edge}\u{1f}{key}` ([`QUALIFIER`]; local keys cannot hold control
//!   characters, so nothing else looks like that) and hands it back to the
//!   edge under its own key. A global record (written at the hub) is one
//!   record for everybody: an edge editing it edits the shared one.

use crate::crdt::{self, MergeStrategy, Version};
use crate::store::{Kind, Record, StoreError, Tx};

use super::wire::Incoming;

/// Separates the owning edge from its key in a hub-side key (see above).
pub const QUALIFIER: char = '\u{1f}';

/// Where `edge`'s record `key` lives at this hub, and the record there.
fn hub_key(
    tx: &Tx<'_>,
    kind: Kind,
    edge: &str,
    key: &str,
) -> Result<(String, Option<Record>), StoreError> {
    let qualified = format!("{edge}{QUALIFIER}{key}");
    if let Some(r) = tx.get(kind, &qualified)? {
        return Ok((qualified, Some(r)));
    }
    Ok(match tx.get(kind, key)? {
        Some(r) if !r.owner.is_empty() && r.owner != edge => (qualified, None),
        plain => (key.to_owned(), plain),
    })
}

/// The key a record of this hub has at `edge` (its own records come back
/// under the key it wrote).
pub fn edge_key<'k>(record_key: &'k str, owner: &str, edge: &str) -> &'k str {
    if owner != edge {
        return record_key;
    }
    record_key
        .strip_prefix(edge)
        .and_then(|rest| rest.strip_prefix(QUALIFIER))
        .unwrap_or(record_key)
}

pub enum Direction<'a> {
    /// Versions pushed by a downstream edge to this node acting as its hub.
    FromEdge(&'a str),
    /// Versions sent by this node's hub. `full`: a full sync, which marks
    /// every record it touches as seen.
    FromHub { full: bool },
}

#[derive(Debug, Default)]
pub struct Applied {
    pub changed: bool,
    pub conflict: Option<(String, String)>,
}

pub fn version_of(r: &Record) -> Version {
    Version {
        body: r.body.clone(),
        hlc: r.hlc,
        origin: r.origin.clone(),
        vv: r.vv.clone(),
        tombstone: r.tombstone,
        fields: r.fields.clone(),
    }
}

fn name_of(kind: Kind, body: &str) -> Option<String> {
    if kind != Kind::Service {
        return None;
    }
    serde_json::from_str::<serde_json::Value>(body)
        .ok()?
        .get("name")?
        .as_str()
        .map(str::to_owned)
}

pub fn apply(
    tx: &mut Tx<'_>,
    mut inc: Incoming,
    strategy: MergeStrategy,
    dir: &Direction<'_>,
    now_ms: u64,
) -> Result<Applied, StoreError> {
    tx.observe(inc.version.hlc);
    let from_edge = match dir {
        Direction::FromEdge(e) => Some(*e),
        Direction::FromHub { .. } => None,
    };
    let local = match from_edge {
        Some(edge) => {
            let (key, local) = hub_key(tx, inc.kind, edge, &inc.key)?;
            inc.key = key;
            local
        }
        None => tx.get(inc.kind, &inc.key)?,
    };
    let (merged, conflict) = match &local {
        None => (inc.version.clone(), None),
        Some(l) => {
            let lv = version_of(l);
            let out = crdt::merge(&lv, &inc.version, strategy);
            let conflict = out.concurrent.then(|| {
                let winner = match out.winner {
                    crdt::Side::Local => "local",
                    crdt::Side::Remote => "remote",
                };
                (describe(&lv), describe(&inc.version), winner)
            });
            if out.merged == lv {
                if let Direction::FromHub { full: true } = dir {
                    tx.touch(inc.kind, &inc.key)?;
                }
                if let Some((l, r, w)) = &conflict {
                    tx.record_conflict(
                        inc.kind,
                        &inc.key,
                        from_edge.unwrap_or(""),
                        l,
                        r,
                        w,
                        now_ms,
                    )?;
                }
                return Ok(Applied {
                    changed: false,
                    conflict: conflict.map(|_| (inc.kind.as_str().to_owned(), inc.key.clone())),
                });
            }
            (out.merged, conflict)
        }
    };
    let index = tx.next_index()?;
    let verbatim = merged == inc.version;
    let rec = Record {
        kind: inc.kind,
        key: inc.key.clone(),
        name: name_of(inc.kind, &merged.body),
        body: merged.body,
        hlc: merged.hlc,
        origin: merged.origin,
        vv: merged.vv,
        tombstone: merged.tombstone,
        create_index: match &local {
            Some(l) if !l.tombstone => l.create_index,
            _ => index,
        },
        modify_index: index,
        fields: merged.fields,
        owner: match &local {
            Some(l) => l.owner.clone(),
            None => from_edge.unwrap_or("").to_owned(),
        },
        src: match from_edge {
            Some(e) if verbatim => e.to_owned(),
            _ => String::new(),
        },
    };
    tx.put(&rec)?;
    match dir {
        Direction::FromEdge(_) => tx.enqueue(inc.kind, &inc.key)?,
        Direction::FromHub { .. } if verbatim => tx.dequeue(inc.kind, &inc.key)?,
        Direction::FromHub { .. } => tx.enqueue(inc.kind, &inc.key)?,
    }
    if let Some((l, r, w)) = &conflict {
        tx.record_conflict(inc.kind, &inc.key, from_edge.unwrap_or(""), l, r, w, now_ms)?;
    }
    Ok(Applied {
        changed: true,
        conflict: conflict.map(|_| (inc.kind.as_str().to_owned(), inc.key)),
    })
}

/// A version as operators read it in the conflict list.
fn describe(v: &Version) -> String {
    serde_json::json!({
        "body": serde_json::from_str::<serde_json::Value>(&v.body).unwrap_or_default(),
        "tombstone": v.tombstone,
        "hlc": v.hlc.0,
        "time": crate::clock::rfc3339(v.hlc.millis()),
        "origin": v.origin,
        "vector_clock": v.vv,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edge_gets_its_own_records_back_under_its_own_keys() {
        let q = format!("edge-a{QUALIFIER}pos");
        assert_eq!(edge_key(&q, "edge-a", "edge-a"), "pos");
        // Another edge's record, or a plain key, is left alone.
        assert_eq!(edge_key(&q, "edge-b", "edge-b"), q);
        assert_eq!(edge_key("pos", "edge-a", "edge-a"), "pos");
        assert_eq!(edge_key("edge-a/pos", "edge-a", "edge-a"), "edge-a/pos");
        // One level is removed: a site hub's own qualified keys survive.
        let two = format!("site-1{QUALIFIER}till-2{QUALIFIER}till");
        assert_eq!(
            edge_key(&two, "site-1", "site-1"),
            format!("till-2{QUALIFIER}till")
        );
    }
}
