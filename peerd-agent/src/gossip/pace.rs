//! A byte budget for chitchat's anti-entropy.
//!
//! Every SYN and SYN-ACK carries the digest of every member (10-30 bytes per member after
//! chitchat's compression): at 1,000 nodes, three exchanges per 100 ms round would be half a
//! megabyte per second or more per node, whatever the content. Content changes travel as rumors
//! (`rumor`), so anti-entropy only has to converge eventually and keep the failure detector fed.
//! This wrapper around chitchat's socket charges the *overhead* of every message it sends (the
//! whole message minus the delta it carries: a SYN, the digest and header of a SYN-ACK, an ACK's
//! header) to a token bucket of `budget` bytes per second, and lets a round's SYNs go only while
//! the bucket has tokens; the SYNs of a round over budget are not sent (counted as `paced`), which
//! chitchat sees as lost datagrams. Deltas are not charged: they are state a peer lacked, not
//! overhead, and in steady state they are empty. Answers are never held (the asker paid for the
//! exchange) but are charged, so a node that answers much initiates less and what it sends stays
//! near the budget; debt is kept (bounded only against pathologies), because forgiving it is
//! exactly what let the digest traffic of 1,000 nodes run at three times the budget. Whole rounds
//! are admitted or held, never single SYNs: chitchat sends a round's SYNs to live nodes first, then
//! maybe to a dead node and a seed, and those last two are how partitions heal, so admitting only
//! the first SYN of each round would starve them. Small clusters stay unpaced (a digest of 8
//! members is tiny); large ones gossip less often, in proportion to their size. While a node is
//! catching up (SYN-ACKs or ACKs bring large deltas, e.g. after joining), its SYNs are neither held
//! nor charged: that traffic is how it gets state it lacks, and charging it would leave every node
//! of a cluster that started together silent (and so seen dead by all) for seconds once it
//! converged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{ChitchatEnvelope, ChitchatMessage, Serializable};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::seal::Counters;

/// A delta at least this large means the node is far behind (joined, or back from a partition):
/// chitchat fills a SYN-ACK's delta up to the datagram size when that much is missing. The
/// trickle of content changes (a few summary shards) stays well below it, so it never unpaces
/// a whole cluster as a shard travels.
const CATCH_UP_DELTA: usize = 16_384;
/// How long one large delta keeps SYNs unpaced.
const CATCH_UP_HOLD: Duration = Duration::from_secs(2);
/// Debt is bounded at this many bursts (a burst is at least a second of budget).
const MAX_DEBT_S: f64 = 30.0;

/// The token bucket (sans-IO).
#[derive(Debug)]
pub struct Pacer {
    /// Bytes per second of everything sent; 0: unpaced.
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    catching_up_until: Option<Instant>,
    /// SYNs until then belong to the current round, which was admitted (true) or held.
    round_until: Option<(Instant, bool)>,
    /// Shorter than a gossip interval, longer than the sending of one round.
    round: Duration,
}

impl Pacer {
    /// `budget`: steady-state gossip bytes per second per node (0 = unlimited); `interval`:
    /// chitchat's gossip interval.
    pub fn new(budget: u64, interval: Duration, now: Instant) -> Self {
        let rate = budget as f64;
        // One second's worth, at least one round of 1,000-member digests.
        let burst = rate.max(60_000.0);
        Self { rate, burst, tokens: burst, last: now, catching_up_until: None, round_until: None, round: interval / 2 }
    }

    /// Whether a SYN may go now: every SYN of an admitted round, or the first of a new round
    /// while the bucket has tokens.
    pub fn admit_syn(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 || self.catching_up(now) {
            return true;
        }
        if let Some((until, admitted)) = self.round_until {
            if now < until {
                return admitted;
            }
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let admitted = self.tokens > 0.0;
        self.round_until = Some((now + self.round, admitted));
        admitted
    }

    /// Charges the overhead of a message that was sent (may go into debt: its size is known only
    /// once encoded, and answers are sent whatever the balance). Nothing is charged while
    /// catching up.
    pub fn charge(&mut self, bytes: usize, now: Instant) {
        if self.rate > 0.0 && !self.catching_up(now) {
            // Debt is kept: forgiving it lets a node that answers a lot send more than the budget.
            // The bound is for pathologies only (it is minutes of silence at any rate).
            self.tokens = (self.tokens - bytes as f64).max(-MAX_DEBT_S * self.burst);
        }
    }

    fn catching_up(&self, now: Instant) -> bool {
        self.catching_up_until.is_some_and(|until| now < until)
    }

    /// A SYN-ACK or ACK arrived carrying `delta_bytes` of state.
    pub fn received_delta(&mut self, delta_bytes: usize, now: Instant) {
        if delta_bytes >= CATCH_UP_DELTA {
            self.catching_up_until = Some(now + CATCH_UP_HOLD);
        }
    }
}

/// Hands chitchat one already opened socket, wrapped in the pacer.
pub struct Paced {
    socket: std::sync::Mutex<Option<Box<dyn Socket>>>,
    budget: u64,
    interval: Duration,
    counters: Arc<Counters>,
}

impl Paced {
    pub async fn open(
        inner: &dyn Transport,
        listen_addr: SocketAddr,
        budget: u64,
        interval: Duration,
        counters: Arc<Counters>,
    ) -> anyhow::Result<Paced> {
        let socket = inner.open(listen_addr).await?;
        Ok(Paced { socket: std::sync::Mutex::new(Some(socket)), budget, interval, counters })
    }
}

#[async_trait]
impl Transport for Paced {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner = self
            .socket
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .ok_or_else(|| anyhow::anyhow!("paced socket already taken"))?;
        Ok(Box::new(PacedSocket {
            inner,
            pacer: Arc::new(Mutex::new(Pacer::new(self.budget, self.interval, Instant::now()))),
            counters: self.counters.clone(),
        }))
    }
}

/// Bytes of node state a message carries.
fn delta_len(message: &ChitchatMessage) -> usize {
    match message {
        ChitchatMessage::SynAck { delta, .. } | ChitchatMessage::Ack { delta } => delta.serialized_len(),
        _ => 0,
    }
}

struct PacedSocket {
    inner: Box<dyn Socket>,
    pacer: Arc<Mutex<Pacer>>,
    counters: Arc<Counters>,
}

#[async_trait]
impl Socket for PacedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        let syn = matches!(envelope.message, ChitchatMessage::Syn { .. });
        if syn && !self.pacer.lock().await.admit_syn(Instant::now()) {
            self.counters.paced.fetch_add(1, Ordering::Relaxed);
            return Ok(SendOutcome { num_bytes_sent: 0 });
        }
        let delta = delta_len(&envelope.message);
        let outcome = self.inner.send(to, envelope).await?;
        self.pacer.lock().await.charge(outcome.num_bytes_sent.saturating_sub(delta), Instant::now());
        Ok(outcome)
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        let outcome = self.inner.recv().await?;
        let delta = delta_len(&outcome.envelope.message);
        if delta > 0 {
            self.pacer.lock().await.received_delta(delta, Instant::now());
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUND: Duration = Duration::from_millis(100);

    /// First instant (in rounds from `start`) at which a SYN is admitted again.
    fn resumes_after(p: &mut Pacer, start: Instant) -> Option<Duration> {
        (1..100_000u64).find(|i| p.admit_syn(start + ROUND * *i as u32)).map(|i| ROUND * i as u32)
    }

    #[test]
    fn answers_are_paid_back_before_syns_resume() {
        let start = Instant::now();
        let mut p = Pacer::new(16_000, ROUND, start);
        // A full bucket (60 KB) and 180 KB of answers: 120 KB of debt, 7.5 s at 16 KB/s.
        p.charge(180_000, start);
        assert!(!p.admit_syn(start));
        let back = resumes_after(&mut p, start);
        assert!(back.is_some_and(|t| t >= Duration::from_millis(7_400) && t <= Duration::from_millis(7_700)), "silent for {back:?}");
        // Debt is bounded (a pathology, not a normal state): minutes, not forever.
        let mut p = Pacer::new(16_000, ROUND, start);
        p.charge(usize::MAX / 2, start);
        let back = resumes_after(&mut p, start);
        assert!(back.is_some_and(|t| t <= Duration::from_secs(MAX_DEBT_S as u64 * 4 + 5)), "silent for {back:?}");
    }

    #[test]
    fn unlimited_budget_never_paces() {
        let now = Instant::now();
        let mut p = Pacer::new(0, ROUND, now);
        for _ in 0..1_000 {
            assert!(p.admit_syn(now));
            p.charge(60_000, now);
        }
    }

    /// chitchat offers 4 SYNs every round for 1,000 s and the node answers others' SYNs
    /// (`answers` bytes per round, never held). Returns bytes sent per second and rounds sent.
    fn offered_load(budget: u64, syn: usize, answers: usize) -> (f64, usize) {
        let start = Instant::now();
        let mut p = Pacer::new(budget, ROUND, start);
        let mut sent = 0usize;
        let mut rounds = 0;
        for round in 0..10_000u64 {
            let now = start + ROUND * round as u32;
            p.charge(answers, now);
            sent += answers;
            let admitted: Vec<bool> = (0..4)
                .map(|i| {
                    let at = now + Duration::from_micros(i * 50);
                    let ok = p.admit_syn(at);
                    if ok {
                        p.charge(syn, at);
                        sent += syn;
                    }
                    ok
                })
                .collect();
            assert!(admitted.iter().all(|a| *a) || admitted.iter().all(|a| !*a), "round {round} split: {admitted:?}");
            rounds += usize::from(admitted[0]);
        }
        (sent as f64 / 1_000.0, rounds)
    }

    #[test]
    fn whole_rounds_are_held_to_the_budget_over_time() {
        // A ~200-member digest: rounds fit the burst.
        let (per_second, rounds) = offered_load(16_000, 10_000, 500);
        assert!(per_second <= 16_000.0 + 60_000.0 / 1_000.0 + 4.0 * 10_000.0 / 1_000.0, "{per_second} B/s");
        assert!(per_second >= 15_000.0, "{per_second} B/s: budget left unused");
        assert!(rounds > 0 && rounds < 10_000);
        // A 1,000-member digest: one round (120 KB) is twice the burst, and answers take a third
        // of the budget. Nothing may be forgiven: the total still holds to the budget.
        let (per_second, rounds) = offered_load(12_000, 30_000, 400);
        assert!(per_second <= 12_000.0 * 1.02 + 120_000.0 / 1_000.0, "{per_second} B/s over a 12,000 B/s budget");
        assert!(per_second >= 11_000.0, "{per_second} B/s: budget left unused");
        assert!(rounds > 0);
        // Answers alone over the budget: the node initiates nothing, answers still go.
        let (per_second, _) = offered_load(12_000, 30_000, 2_000);
        assert!(per_second <= 20_000.0 + 60_000.0 / 1_000.0 + 120.0, "{per_second} B/s");
    }

    #[test]
    fn small_syns_are_not_paced_and_catching_up_lifts_the_limit() {
        let start = Instant::now();
        let mut p = Pacer::new(16_000, ROUND, start);
        // An 8-member cluster: ~100-byte SYNs, 30 per second, far under budget.
        for round in 0..100u64 {
            let now = start + Duration::from_millis(100 * round);
            for _ in 0..3 {
                assert!(p.admit_syn(now));
                p.charge(100, now);
            }
        }
        // Exhaust the bucket, then a large delta arrives: SYNs go, uncharged, until the hold ends.
        let now = start + Duration::from_secs(11);
        p.charge(200_000, now);
        assert!(!p.admit_syn(now));
        assert!(!p.admit_syn(now + Duration::from_millis(1)), "the rest of a held round is held");
        p.received_delta(60_000, now);
        assert!(p.admit_syn(now + Duration::from_secs(1)));
        p.charge(10_000_000, now + Duration::from_secs(1));
        let after = now + CATCH_UP_HOLD + Duration::from_millis(1);
        assert!(!p.admit_syn(after));
        p.received_delta(100, now);
        assert!(!p.admit_syn(after + Duration::from_millis(1)));
        // The catch-up traffic left no debt: only the earlier ~90 KB is paid back (~5.7 s).
        let back = resumes_after(&mut p, after);
        assert!(back.is_some_and(|t| t >= Duration::from_secs(5) && t <= Duration::from_secs(6)), "silent for {back:?} after catching up");
    }
}
