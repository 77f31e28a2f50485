//! A byte budget for chitchat's anti-entropy.
//!
//! Every SYN (and the SYN-ACK it draws) carries the digest of every member, about 10 bytes per
//! member after chitchat's compression, three exchanges per round: at 1,000 nodes and 100 ms that
//! is over half a megabyte per second per node, whatever the content. Content changes travel as
//! rumors (`rumor`), so anti-entropy only has to converge eventually and keep the failure
//! detector fed. This wrapper around chitchat's socket sends a SYN only while a token bucket of
//! `budget / 2` bytes per second has tokens (a SYN-ACK answering it costs about as much again); a
//! SYN over budget is not sent (counted as `paced`), which chitchat sees as a lost datagram. Small
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
    /// Bytes of SYN per second; 0: unpaced.
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    catching_up_until: Option<Instant>,
}

impl Pacer {
    /// `budget`: steady-state gossip bytes per second per node (0 = unlimited).
    pub fn new(budget: u64, now: Instant) -> Self {
        let rate = budget as f64 / 2.0;
        // One second's worth, at least one 1,000-member digest.
        let burst = rate.max(12_000.0);
        Self { rate, burst, tokens: burst, last: now, catching_up_until: None }
    }

    /// Whether a SYN may go now.
    pub fn admit_syn(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 || self.catching_up_until.is_some_and(|until| now < until) {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens > 0.0
    }

    /// Charges a SYN that was sent (may go into debt: its size is known only once encoded).
    pub fn charge(&mut self, bytes: usize) {
        if self.rate > 0.0 {
            self.tokens -= bytes as f64;
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
    counters: Arc<Counters>,
}

impl Paced {
    pub async fn open(
        inner: &dyn Transport,
        listen_addr: SocketAddr,
        budget: u64,
        counters: Arc<Counters>,
    ) -> anyhow::Result<Paced> {
        let socket = inner.open(listen_addr).await?;
        Ok(Paced { socket: std::sync::Mutex::new(Some(socket)), budget, counters })
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
            pacer: Arc::new(Mutex::new(Pacer::new(self.budget, Instant::now()))),
            counters: self.counters.clone(),
        }))
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
        if syn {
            self.pacer.lock().await.charge(outcome.num_bytes_sent);
        }
        Ok(outcome)
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        let outcome = self.inner.recv().await?;
        let delta = match &outcome.envelope.message {
            ChitchatMessage::SynAck { delta, .. } | ChitchatMessage::Ack { delta } => delta.serialized_len(),
            _ => 0,
        };
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
    fn unlimited_budget_never_paces() {
        let now = Instant::now();
        let mut p = Pacer::new(0, now);
        for _ in 0..1_000 {
            assert!(p.admit_syn(now));
            p.charge(60_000);
        }
    }

    #[test]
    fn syns_are_held_to_half_the_budget_over_time() {
        let start = Instant::now();
        let mut p = Pacer::new(16_000, start);
        let syn = 10_000; // a ~1,000-member digest
        let mut sent = 0usize;
        // Chitchat offers 3 SYNs every 100 ms for 100 s.
        for round in 0..1_000u64 {
            let now = start + Duration::from_millis(100 * round);
            for _ in 0..3 {
                if p.admit_syn(now) {
                    p.charge(syn);
                    sent += syn;
                }
            }
        }
        let per_second = sent as f64 / 100.0;
        assert!(per_second <= 8_000.0 + 12_000.0 / 100.0 + syn as f64 / 100.0, "{per_second} B/s");
        assert!(per_second >= 7_000.0, "{per_second} B/s: budget left unused");
    }

    #[test]
    fn small_syns_are_not_paced_and_catching_up_lifts_the_limit() {
        let start = Instant::now();
        let mut p = Pacer::new(16_000, start);
        // An 8-member cluster: ~100-byte SYNs, 30 per second, far under budget.
        for round in 0..100u64 {
            let now = start + Duration::from_millis(100 * round);
            for _ in 0..3 {
                assert!(p.admit_syn(now));
                p.charge(100);
            }
        }
        // Exhaust the bucket, then a large delta arrives: SYNs go until the hold ends.
        let now = start + Duration::from_secs(10);
        p.charge(1_000_000);
        assert!(!p.admit_syn(now));
        p.received_delta(60_000, now);
        assert!(p.admit_syn(now + Duration::from_secs(1)));
        assert!(!p.admit_syn(now + CATCH_UP_HOLD + Duration::from_millis(1)));
        p.received_delta(100, now);
        assert!(!p.admit_syn(now + CATCH_UP_HOLD + Duration::from_millis(2)));
    }
}
