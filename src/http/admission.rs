//! Who gets a connection slot, so that slow or hostile clients cannot lock
//! everyone else out (issue 13).
//!
//! Each listener has its own budget (the Unix socket's is separate from
//! TCP's, so local admin works through any TCP flood). Within a budget:
//! - a full slot serves any request; there are `total` of them, and one
//!   peer (an IP address, an IPv6 /64, or a uid on the Unix socket) holds
//!   at most `per_peer`;
//! - past that, a connection is still accepted, into a small reserve that
//!   answers health probes only, one request per connection, with a short
//!   header timeout. When the reserve is full the oldest reserve connection
//!   is closed: a probe sends its request at once and is answered in
//!   microseconds, while a slow client holding a reserve slot is exactly
//!   what should go.
//!
//! The accept loop therefore never waits for a slot: a probe is never left
//! in the kernel's accept queue behind a flood, which is how slow clients
//! used to keep `/health/live` waiting for minutes.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use super::access::Peer;

/// The budget of one listener.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) total: usize,
    pub(super) per_peer: usize,
    pub(super) reserve: usize,
}

/// 128 full slots as before; one peer may take half, so a second client
/// always finds room; 32 reserve connections cost 32 descriptors.
pub(super) const LIMITS: Limits = Limits {
    total: 128,
    per_peer: 64,
    reserve: 32,
};

#[derive(Default)]
struct State {
    open: usize,
    per_peer: HashMap<Peer, usize>,
    /// Oldest first; dropping a sender tells its connection to close.
    reserve: VecDeque<(u64, async_channel::Sender<()>)>,
    next_id: u64,
}

pub(super) struct Admission {
    limits: Limits,
    state: Mutex<State>,
}

/// A connection's place in the budget, given back when it is dropped.
pub(super) enum Slot {
    Full(#[expect(dead_code, reason = "held for its Drop, which gives the slot back")] FullSlot),
    Reserve(ReserveSlot),
}

pub(super) struct FullSlot {
    admission: Arc<Admission>,
    peer: Peer,
}

pub(super) struct ReserveSlot {
    admission: Arc<Admission>,
    id: u64,
    /// Fails (closed) when a newer connection took this one's place.
    pub(super) evicted: async_channel::Receiver<()>,
}

impl Admission {
    pub(super) fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            state: Mutex::default(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The counters stay consistent under a panic elsewhere: every
        // critical section below is a few integer updates.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn admit(self: &Arc<Self>, peer: Peer) -> Slot {
        let peer = budget_key(peer);
        let mut st = self.state();
        let held = st.per_peer.get(&peer).copied().unwrap_or(0);
        if st.open < self.limits.total && held < self.limits.per_peer {
            st.open += 1;
            *st.per_peer.entry(peer).or_default() += 1;
            return Slot::Full(FullSlot {
                admission: self.clone(),
                peer,
            });
        }
        if st.reserve.len() >= self.limits.reserve {
            st.reserve.pop_front();
        }
        let (tx, rx) = async_channel::bounded(1);
        let id = st.next_id;
        st.next_id += 1;
        st.reserve.push_back((id, tx));
        Slot::Reserve(ReserveSlot {
            admission: self.clone(),
            id,
            evicted: rx,
        })
    }
}

/// The unit a per-peer cap counts: an IPv6 host usually owns a whole /64,
/// and an IPv4-mapped address is the IPv4 host.
fn budget_key(peer: Peer) -> Peer {
    match peer {
        Peer::Tcp(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => Peer::Tcp(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                Peer::Tcp(IpAddr::V6(std::net::Ipv6Addr::new(
                    s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                )))
            }
        },
        other => other,
    }
}

impl Drop for FullSlot {
    fn drop(&mut self) {
        let mut st = self.admission.state();
        st.open -= 1;
        if let Some(n) = st.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                st.per_peer.remove(&self.peer);
            }
        }
    }
}

impl Drop for ReserveSlot {
    fn drop(&mut self) {
        let mut st = self.admission.state();
        if let Some(i) = st.reserve.iter().position(|(id, _)| *id == self.id) {
            st.reserve.remove(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Peer {
        Peer::Tcp(
            s.parse()
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        )
    }

    #[test]
    fn caps_a_peer_then_the_total_and_evicts_the_oldest_reserve() {
        let a = Admission::new(Limits {
            total: 3,
            per_peer: 2,
            reserve: 2,
        });
        let f1 = a.admit(ip("10.0.0.1"));
        let f2 = a.admit(ip("10.0.0.1"));
        assert!(matches!((&f1, &f2), (Slot::Full(_), Slot::Full(_))));
        // The same host over its cap, even through an IPv4-mapped address.
        let r1 = a.admit(ip("::ffff:10.0.0.1"));
        assert!(matches!(r1, Slot::Reserve(_)));
        // Another host still gets a full slot, then the total is reached.
        assert!(matches!(a.admit(ip("10.0.0.2")), Slot::Full(_)));
        let held = a.admit(ip("10.0.0.2"));
        assert!(matches!(held, Slot::Full(_)), "the slot given back is free");
        let r2 = a.admit(ip("10.0.0.3"));
        let r3 = a.admit(ip("10.0.0.4"));
        let (Slot::Reserve(r1), Slot::Reserve(r2), Slot::Reserve(_r3)) = (r1, r2, r3) else {
            panic!("over the total goes to the reserve");
        };
        assert!(r1.evicted.is_closed(), "the oldest reserve connection goes");
        assert!(!r2.evicted.is_closed());
        // Unix peers are counted per uid, apart from TCP.
        drop(f1);
        assert!(matches!(a.admit(Peer::Unix { uid: 0 }), Slot::Full(_)));
    }

    #[test]
    fn an_ipv6_host_is_its_64() {
        assert_eq!(budget_key(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
    }
}
