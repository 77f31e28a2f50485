//! The cluster coordinator's policy for one blob: get it into this node's store from the cluster
//! (peers that hold it; else the blob's rendezvous owner, asked to fetch it from upstream once
//! for everyone while this node swarms on the pieces as they arrive; else this node fetches for
//! the cluster as the owner), or say "go upstream yourself".
//!
//! The policy sees the world only through [`Ops`] (the agent: `transfer` and the peer
//! directory; tests: fakes with injected delays on tokio's paused clock), so its recovery paths
//! (a busy owner, a dead owner, a lying cluster, this node as owner) are tested
//! deterministically, without processes.
use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::time::Instant;

use crate::{
    store::Digest,
    transfer::{self, TransferError},
};

/// What the policy needs from the cluster.
pub trait Ops: Send + Sync {
    /// Peers that may hold `d` (complete first), with "same zone".
    fn holders(&self, d: &Digest) -> Vec<(SocketAddr, bool)>;
    /// Live members, this node included.
    fn members(&self) -> Vec<SocketAddr>;
    fn me(&self) -> SocketAddr;
    /// Whether `peer` failed to answer a moment ago.
    fn is_down(&self, peer: SocketAddr) -> bool;
    /// Swarms `d` from `sources` (the first is the origin) into the store.
    fn download(&self, d: &Digest, sources: &[(SocketAddr, bool)]) -> impl Future<Output = Result<(), TransferError>> + Send;
    /// Asks `owner` to fetch `d` from upstream; done when it holds the verified blob.
    fn ask_fetch(&self, owner: SocketAddr, d: &Digest, within: Duration) -> impl Future<Output = Result<(), TransferError>> + Send;
    /// This node, as the blob's owner with other members, fetches it for the cluster.
    fn fetch_here(&self, d: &Digest) -> impl Future<Output = Result<(), transfer::FetchError>> + Send;
}

/// Bounds of the policy.
#[derive(Clone, Copy, Debug)]
pub struct Budgets {
    /// Getting a blob from peers that hold it.
    pub peers: Duration,
    /// Waiting for an owner's fetch (it may be a large blob behind a slow upstream).
    pub owner: Duration,
}

/// How the attempt ended.
#[derive(Debug)]
pub enum Outcome {
    /// The blob is in the store, verified.
    Stored,
    /// The cluster cannot help (alone, every owner failed, this node's own fetch failed): the
    /// caller fetches from upstream itself.
    Upstream,
    /// Every piece matched the manifest the cluster gave, the blob did not match its digest.
    Lied(TransferError),
}

/// What happened on the way, for counters and logs.
#[derive(Debug)]
pub enum Event<'a> {
    /// The swarm stalled while the owner was still fetching: started again on the same owner.
    SwarmRetry(&'a TransferError),
    /// An owner could not provide the blob: the next one by rendezvous is asked.
    OwnerFailed(SocketAddr, &'a TransferError),
}

/// How often a swarm that found nothing to take is started again while its owner still works.
const RETRY_EVERY: Duration = Duration::from_millis(100);
/// Owners asked in turn before giving up (the first and two successors).
const OWNERS: usize = 3;

/// Gets `d` from the cluster (module docs).
pub async fn get(ops: &impl Ops, d: &Digest, budgets: Budgets, mut on: impl FnMut(Event<'_>)) -> Outcome {
    let holders = ops.holders(d);
    if !holders.is_empty() {
        match tokio::time::timeout(budgets.peers, ops.download(d, &holders)).await {
            Ok(Ok(())) => return Outcome::Stored,
            Ok(Err(e @ TransferError::Lied { .. })) => return Outcome::Lied(e),
            Ok(Err(e)) => tracing::debug!(%d, "not from peers: {e}"),
            Err(_) => tracing::debug!(%d, "peers too slow; falling back"),
        }
    }
    let me = ops.me();
    // A member that just failed to answer is not asked (the next by rendezvous is: the others
    // see it gone as well, or the owner's single flight still collapses the fetch).
    let mut members: Vec<SocketAddr> = ops.members().into_iter().filter(|m| *m == me || !ops.is_down(*m)).collect();
    for _ in 0..OWNERS {
        let Some(owner) = transfer::owner(d, &members) else { return Outcome::Upstream };
        if owner == me {
            // With other members this node fetches for the cluster (split among them); alone,
            // the caller's pull-through is the fetch.
            if members.len() < 2 {
                return Outcome::Upstream;
            }
            return match ops.fetch_here(d).await {
                Ok(()) => Outcome::Stored,
                // The helpers of a split fetch gave a wrong blob: as a lie from any source.
                Err(transfer::FetchError::Cluster(e @ TransferError::Lied { .. })) => Outcome::Lied(e),
                Err(e) => {
                    tracing::debug!(%d, "fetch for the cluster failed: {e}");
                    Outcome::Upstream
                }
            };
        }
        let mut sources = vec![(owner, true)];
        sources.extend(members.iter().filter(|a| **a != owner && **a != me).map(|a| (*a, true)));
        match from_owner(ops, d, owner, &sources, budgets.owner, &mut on).await {
            Ok(()) => return Outcome::Stored,
            Err(e @ TransferError::Lied { .. }) => return Outcome::Lied(e),
            Err(e) => {
                on(Event::OwnerFailed(owner, &e));
                members.retain(|m| *m != owner);
            }
        }
    }
    Outcome::Upstream
}

/// Asks `owner` to fetch and meanwhile swarms on the pieces it (and everyone else asking)
/// already has. While the owner's Fetch is unanswered and its connection alive, a swarm that
/// finds nothing to take or stalls is started again on the same owner: the owner is working, and
/// asking another member would fetch the blob from upstream a second time. A false suspicion
/// costs time, never a second upstream fetch.
async fn from_owner(ops: &impl Ops, d: &Digest, owner: SocketAddr, sources: &[(SocketAddr, bool)], within: Duration, on: &mut impl FnMut(Event<'_>)) -> Result<(), TransferError> {
    let started = Instant::now();
    let ask = ops.ask_fetch(owner, d, within);
    tokio::pin!(ask);
    let (mut asking, mut owner_done, mut retried) = (true, false, false);
    loop {
        let r = if asking {
            let dl = ops.download(d, sources);
            tokio::pin!(dl);
            tokio::select! {
                r = &mut dl => r,
                joined = &mut ask => {
                    asking = false;
                    match joined {
                        Ok(()) => {
                            owner_done = true;
                            dl.await
                        }
                        // The owner could not fetch it (dead, or upstream refused): the swarm it
                        // fed cannot finish either.
                        Err(e) => return Err(e),
                    }
                }
            }
        } else {
            ops.download(d, sources).await
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e @ TransferError::Lied { .. }) => return Err(e),
            Err(e) if asking && started.elapsed() < within => {
                if !matches!(e, TransferError::NoPeer(_)) {
                    on(Event::SwarmRetry(&e));
                }
                // The owner's answer may land meanwhile.
                tokio::select! {
                    joined = &mut ask => {
                        asking = false;
                        match joined {
                            Ok(()) => owner_done = true,
                            Err(ae) => return Err(ae),
                        }
                    }
                    _ = tokio::time::sleep(RETRY_EVERY) => {}
                }
            }
            // The owner finished meanwhile: one last try.
            Err(_) if owner_done && !retried => retried = true,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{Arc, Mutex},
    };

    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 0, i], 30002))
    }

    type Ask = (SocketAddr, u64, Result<(), TransferError>);

    /// A scripted cluster: each call takes the next (delay, result) of its script, on tokio's
    /// paused clock; the asks are recorded.
    #[derive(Default)]
    struct Fake {
        me: u8,
        members: Vec<u8>,
        holders: Vec<u8>,
        downloads: Mutex<VecDeque<(u64, Result<(), TransferError>)>>,
        /// Per owner: (delay ms, result).
        asks: Mutex<Vec<Ask>>,
        asked: Mutex<Vec<SocketAddr>>,
        fetched_here: Mutex<u32>,
        /// Set when an owner's fetch succeeded: unscripted downloads then find the pieces.
        stored: std::sync::atomic::AtomicBool,
        /// This node's own fetch (as owner) ends in a lie from its split's helpers.
        here_lies: bool,
    }

    fn stall(d: &Digest) -> Result<(), TransferError> {
        let _ = d;
        Err(TransferError::Peer { peer: addr(99), msg: "stalled".into() })
    }

    impl Ops for Fake {
        fn holders(&self, _d: &Digest) -> Vec<(SocketAddr, bool)> {
            self.holders.iter().map(|i| (addr(*i), true)).collect()
        }
        fn members(&self) -> Vec<SocketAddr> {
            self.members.iter().map(|i| addr(*i)).collect()
        }
        fn me(&self) -> SocketAddr {
            addr(self.me)
        }
        fn is_down(&self, _peer: SocketAddr) -> bool {
            false
        }
        async fn download(&self, d: &Digest, _sources: &[(SocketAddr, bool)]) -> Result<(), TransferError> {
            let next = self.downloads.lock().unwrap().pop_front();
            let stored = self.stored.load(std::sync::atomic::Ordering::SeqCst);
            let (ms, r) = next.unwrap_or(if stored { (100, Ok(())) } else { (50, Err(TransferError::NoPeer(*d))) });
            tokio::time::sleep(Duration::from_millis(ms)).await;
            r
        }
        async fn ask_fetch(&self, owner: SocketAddr, d: &Digest, _within: Duration) -> Result<(), TransferError> {
            self.asked.lock().unwrap().push(owner);
            let script = {
                let mut asks = self.asks.lock().unwrap();
                asks.iter().position(|a| a.0 == owner).map(|i| asks.remove(i))
            };
            let (ms, r) = script.map_or((10, Err(TransferError::NoPeer(*d))), |(_, ms, r)| (ms, r));
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if r.is_ok() {
                self.stored.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            r
        }
        async fn fetch_here(&self, _d: &Digest) -> Result<(), transfer::FetchError> {
            *self.fetched_here.lock().unwrap() += 1;
            if self.here_lies {
                return Err(transfer::FetchError::Cluster(TransferError::Lied { peer: addr(2), msg: "sha256".into() }));
            }
            Ok(())
        }
    }

    const BUDGETS: Budgets = Budgets { peers: Duration::from_secs(120), owner: Duration::from_secs(600) };

    /// A digest whose rendezvous owner among `members` is `want`.
    fn owned_by(want: u8, members: &[u8]) -> Digest {
        let m: Vec<SocketAddr> = members.iter().map(|i| addr(*i)).collect();
        (0u32..)
            .map(|i| Digest::from_sha256_bytes(*blake3::hash(&i.to_le_bytes()).as_bytes()))
            .find(|d| transfer::owner(d, &m) == Some(addr(want)))
            .unwrap()
    }

    fn events() -> (Arc<Mutex<Vec<String>>>, impl FnMut(Event<'_>)) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        (log, move |e: Event<'_>| l.lock().unwrap().push(match e {
            Event::SwarmRetry(_) => "retry".to_string(),
            Event::OwnerFailed(o, _) => format!("owner-failed {o}"),
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_owner_is_waited_for_not_replaced() {
        // The owner answers its Fetch after 30 s (a slow upstream, a loaded node); meanwhile the
        // swarm stalls again and again (nothing new for seconds at a time).
        let d = owned_by(2, &[1, 2, 3]);
        let f = Fake { me: 1, members: vec![1, 2, 3], ..Default::default() };
        f.asks.lock().unwrap().push((addr(2), 30_000, Ok(())));
        for _ in 0..5 {
            f.downloads.lock().unwrap().push_back((5_000, stall(&d)));
        }
        f.downloads.lock().unwrap().push_back((1_000, Ok(())));
        let (log, on) = events();
        let out = get(&f, &d, BUDGETS, on).await;
        assert!(matches!(out, Outcome::Stored), "{out:?}");
        assert_eq!(*f.asked.lock().unwrap(), vec![addr(2)], "only the owner was asked: one upstream fetch");
        assert!(log.lock().unwrap().iter().filter(|e| *e == "retry").count() >= 5, "{:?}", log.lock().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_owner_hands_over_to_the_next() {
        let d = owned_by(2, &[1, 2, 3]);
        let next = transfer::owner(&d, &[addr(1), addr(3)]).unwrap();
        let f = Fake { me: 1, members: vec![1, 2, 3], ..Default::default() };
        // The owner's connection times out after 4 s of silence.
        f.asks.lock().unwrap().push((addr(2), 4_000, Err(TransferError::Unreachable { peer: addr(2), msg: "timed out".into() })));
        f.asks.lock().unwrap().push((next, 2_000, Ok(())));
        let (log, on) = events();
        let t = Instant::now();
        let out = get(&f, &d, BUDGETS, on).await;
        if next == addr(1) {
            // This node is next in line: it fetches for the cluster itself.
            assert!(matches!(out, Outcome::Stored));
            assert_eq!(*f.fetched_here.lock().unwrap(), 1);
        } else {
            assert!(matches!(out, Outcome::Stored), "{out:?}");
            assert_eq!(*f.asked.lock().unwrap(), vec![addr(2), next]);
        }
        assert_eq!(log.lock().unwrap().iter().filter(|e| e.starts_with("owner-failed")).count(), 1);
        assert!(t.elapsed() >= Duration::from_secs(4), "the dead owner costs its timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lie_ends_the_attempt() {
        let d = owned_by(2, &[1, 2, 3]);
        let f = Fake { me: 1, members: vec![1, 2, 3], ..Default::default() };
        f.asks.lock().unwrap().push((addr(2), 60_000, Ok(())));
        f.downloads.lock().unwrap().push_back((1_000, Err(TransferError::Lied { peer: addr(2), msg: "sha256".into() })));
        let out = get(&f, &d, BUDGETS, |_| {}).await;
        assert!(matches!(out, Outcome::Lied(_)), "{out:?}");
        assert_eq!(*f.asked.lock().unwrap(), vec![addr(2)], "no other owner after a lie");
    }

    /// As the blob's owner this node splits the fetch; a lie from its helpers is a lie (the
    /// caller distrusts the digest), not a plain failure (it was a string once, and never
    /// distrusted).
    #[tokio::test(start_paused = true)]
    async fn a_lie_to_the_owner_is_a_lie() {
        let d = owned_by(1, &[1, 2]);
        let f = Fake { me: 1, members: vec![1, 2], here_lies: true, ..Default::default() };
        assert!(matches!(get(&f, &d, BUDGETS, |_| {}).await, Outcome::Lied(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn holders_first_then_owner_then_self() {
        // Peers hold it: no owner is asked.
        let d = owned_by(2, &[1, 2]);
        let f = Fake { me: 1, members: vec![1, 2], holders: vec![2], ..Default::default() };
        f.downloads.lock().unwrap().push_back((300, Ok(())));
        assert!(matches!(get(&f, &d, BUDGETS, |_| {}).await, Outcome::Stored));
        assert!(f.asked.lock().unwrap().is_empty());
        // This node is the owner with other members: it fetches for the cluster.
        let d = owned_by(1, &[1, 2]);
        let f = Fake { me: 1, members: vec![1, 2], ..Default::default() };
        assert!(matches!(get(&f, &d, BUDGETS, |_| {}).await, Outcome::Stored));
        assert_eq!(*f.fetched_here.lock().unwrap(), 1);
        // Alone: the caller's own pull-through.
        let f = Fake { me: 1, members: vec![1], ..Default::default() };
        assert!(matches!(get(&f, &d, BUDGETS, |_| {}).await, Outcome::Upstream));
    }

    #[tokio::test(start_paused = true)]
    async fn every_owner_failing_sends_the_node_upstream() {
        let d = owned_by(2, &[1, 2, 3, 4]);
        let f = Fake { me: 1, members: vec![1, 2, 3, 4], ..Default::default() };
        let (log, on) = events();
        let out = get(&f, &d, BUDGETS, on).await;
        // Each owner refuses at once (scripted default); after three, or when this node is
        // next, the node fetches itself.
        assert!(matches!(out, Outcome::Upstream | Outcome::Stored), "{out:?}");
        assert!(!log.lock().unwrap().is_empty());
    }
}
