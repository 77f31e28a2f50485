//! A byte budget for chitchat's anti-entropy.
//!
//! Every SYN (and the SYN-ACK it draws) carries the digest of every member, about 10 bytes per
//! member after chitchat's compression, three exchanges per round: at 1,000 nodes and 100 ms that
//! is over half a megabyte per second per node, whatever the content. Content changes travel as
//! rumors (`rumor`), so anti-entropy only has to converge eventually and keep the failure
//! detector fed. This wrapper around chitchat's socket charges every message it sends (SYNs,
//! SYN-ACKs answering others, ACKs; steady-state deltas carry heartbeats, so they count too) to
//! a token bucket of `budget` bytes per second, with debt capped at one burst, and lets a
//! round's SYNs go only while the bucket has tokens; the SYNs of a round over budget are not sent
//! (counted as `paced`), which chitchat sees as lost datagrams. Answers are never held (the asker
//! paid for the exchange), so a node that answers much initiates less, and the total it sends
//! stays near the budget. Whole rounds are admitted or held, never single SYNs: chitchat sends a
//! round's SYNs to live nodes first, then maybe to a dead node and a seed, and those last two are
//! how partitions heal, so admitting only the first SYN of each round would starve them. Small
//! clusters stay unpaced (a digest of 8 members is tiny); large ones gossip less often, in
//! proportion to their size. While a node is catching up (SYN-ACKs or ACKs bring large deltas,
//! e.g. after joining), its SYNs are not paced: that traffic is state it lacks, not overhead.

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

/// A delta at least this large means the node is still catching up.
const CATCH_UP_DELTA: usize = 2_048;
/// How long one large delta keeps SYNs unpaced.
const CATCH_UP_HOLD: Duration = Duration::from_secs(2);

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
        if self.rate == 0.0 || self.catching_up_until.is_some_and(|until| now < until) {
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

    /// Charges a message that was sent (may go into debt: its size is known only once encoded,
    /// and answers are sent whatever the balance).
    pub fn charge(&mut self, bytes: usize) {
        if self.rate > 0.0 {
            // Debt is bounded, so a burst (answering many peers at once) costs at most about
            // two seconds without SYNs, never a silence the failure detector would notice.
            self.tokens = (self.tokens - bytes as f64).max(-self.burst);
        }
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
        let outcome = self.inner.send(to, envelope).await?;
        self.pacer.lock().await.charge(outcome.num_bytes_sent);
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

    #[test]
    fn a_burst_of_answers_costs_a_bounded_silence() {
        let start = Instant::now();
        let mut p = Pacer::new(16_000, ROUND, start);
        p.charge(10_000_000); // answering a joiner's catch-up
        assert!(!p.admit_syn(start));
        // Debt is at most one burst: SYNs resume once it is paid back, well under 10 s.
        let back = (1..200u64).find(|i| p.admit_syn(start + ROUND * *i as u32)).map(|i| ROUND * i as u32);
        assert!(back.is_some_and(|t| t <= Duration::from_secs(8)), "silent for {back:?}");
    }

    #[test]
    fn unlimited_budget_never_paces() {
        let now = Instant::now();
        let mut p = Pacer::new(0, ROUND, now);
        for _ in 0..1_000 {
            assert!(p.admit_syn(now));
            p.charge(60_000);
        }
    }

    const ROUND: Duration = Duration::from_millis(100);

    #[test]
    fn whole_rounds_are_held_to_the_budget_over_time() {
        let start = Instant::now();
        let mut p = Pacer::new(16_000, ROUND, start);
        let syn = 10_000; // a ~200-member digest
        let mut sent = 0usize;
        let mut rounds = 0;
        // chitchat offers 4 SYNs (3 live nodes and a dead one) every 100 ms for 1,000 s, and
        // answers others' SYNs: 500 bytes per round, never held.
        for round in 0..10_000u64 {
            let now = start + ROUND * round as u32;
            p.charge(500);
            sent += 500;
            let admitted: Vec<bool> = (0..4)
                .map(|i| {
                    let ok = p.admit_syn(now + Duration::from_micros(i * 50));
                    if ok {
                        p.charge(syn);
                        sent += syn;
                    }
                    ok
                })
                .collect();
            assert!(admitted.iter().all(|a| *a) || admitted.iter().all(|a| !*a), "round {round} split: {admitted:?}");
            rounds += usize::from(admitted[0]);
        }
        let per_second = sent as f64 / 1_000.0;
        assert!(per_second <= 16_000.0 + 60_000.0 / 1_000.0 + 4.0 * syn as f64 / 1_000.0, "{per_second} B/s");
        assert!(per_second >= 15_000.0, "{per_second} B/s: budget left unused");
        assert!(rounds > 0 && rounds < 10_000);
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
                p.charge(100);
            }
        }
        // Exhaust the bucket, then a large delta arrives: SYNs go until the hold ends.
        let now = start + Duration::from_secs(11);
        p.charge(1_000_000);
        assert!(!p.admit_syn(now));
        assert!(!p.admit_syn(now + Duration::from_millis(1)), "the rest of a held round is held");
        p.received_delta(60_000, now);
        assert!(p.admit_syn(now + Duration::from_secs(1)));
        assert!(!p.admit_syn(now + CATCH_UP_HOLD + Duration::from_millis(1)));
        p.received_delta(100, now);
        assert!(!p.admit_syn(now + CATCH_UP_HOLD + Duration::from_millis(2)));
    }
}
