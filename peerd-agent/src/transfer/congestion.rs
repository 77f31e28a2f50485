//! quinn's BBR plus an allowance for ACKs that arrive late and in bursts (Linux BBR's
//! `extra_acked`, which quinn's BBR lacks).
//!
//! quinn's BBR caps the bytes in flight at `2 x max bandwidth x min RTT`. Between nodes the min
//! RTT is a fraction of a millisecond, while a busy agent reads ACKs several milliseconds late,
//! in bursts. The cap then stops the sender most of each round trip, the delivery rate it measures
//! falls, the bandwidth estimate follows it down and the cap shrinks again: in bench swarm (N=4,
//! 200 Mbit/s) the origin's windows sat at 5-70 KB against 3-18 ms round trips and its uplink
//! ran at 60-70% while requests waited. Cubic instead fills the link queues until loss (20-60 ms
//! round trips), which delays the TCP ACKs of the origin's own upstream download.
//!
//! The allowance: over an "ack epoch", bytes acknowledged beyond what the estimated bandwidth
//! would have delivered are aggregation; the window is BBR's plus the largest such excess seen
//! over the last few round trips, at most `MAX_EXTRA` (10 ms) worth of bandwidth. Queues stay
//! bounded (the excess is what the path demonstrably absorbed), and a sender that ACK bursts
//! throttle gets its rate back.
//!
//! And a cap on bytes in flight after lossy round trips (`LossCap`, BBRv2's `inflight_hi`):
//! quinn's BBR is BBRv1, which ignores loss. In STARTUP its window only grows and it paces at
//! 2.9x its estimate until the estimate stops growing; with ACKs arriving in bursts the estimate
//! keeps growing while the link queue overflows. In bench swarm (N=4) the origin, whose uplink
//! everyone waits on, lost 37,000 packets (52 MB, a fifth of the blob) in its first 1.5 s, with
//! 3-4 MB windows on a link whose queue holds 1.25 MB.
use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;

/// At most this much time's worth of the estimated bandwidth is added (Linux uses 100 ms). The
/// allowance's data waits in the sender's uplink queue, ahead of whatever else the node sends,
/// such as the TCP ACKs of an origin's upstream download. Bench swarm (FIFO links, peerd only,
/// max / (S/B) at N=4 and N=8, single runs): 5 ms 1.43x / 2.20x (senders starve again),
/// 10 ms 1.27-1.29x / 1.78x, 25 ms 1.36x / 1.90x, 100 ms 1.37-1.42x / 1.94x.
const MAX_EXTRA: Duration = Duration::from_millis(10);
/// The excess is a max over two slots, each covering this many round trips (as in Linux).
const SLOT_ROUNDS: u32 = 5;
/// An epoch that has acknowledged this much restarts (keeps the estimate current).
const EPOCH_RESET_BYTES: u64 = 1 << 20;

/// Builds [`AggregationBbr`] controllers.
#[derive(Debug, Default)]
pub struct AggregationBbrConfig {
    bbr: Arc<BbrConfig>,
}

impl ControllerFactory for AggregationBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(AggregationBbr { inner: self.bbr.clone().build(now, current_mtu), agg: Aggregation::default(), cap: LossCap::new(current_mtu) })
    }
}

/// The ACK-aggregation bookkeeping, separate from BBR so it is tested on its own.
#[derive(Clone, Debug, Default)]
struct Aggregation {
    epoch_start: Option<Instant>,
    epoch_acked: u64,
    /// Largest excess in the current and the previous slot.
    extra: [u64; 2],
    slot: usize,
    slot_rounds: u32,
    /// Start of the current round trip.
    round_start: Option<Instant>,
}

/// Bytes `bw` (bytes/s) delivers in `elapsed`.
fn bytes_in(bw: u64, elapsed: Duration) -> u64 {
    (bw as u128 * elapsed.as_micros() / 1_000_000) as u64
}

impl Aggregation {
    /// An ACK of `bytes` at `now`, with `bw` the estimated bandwidth (bytes/s) and `rtt` the
    /// smoothed round trip.
    fn on_ack(&mut self, now: Instant, bytes: u64, bw: u64, rtt: Duration) {
        // Round trips, counted coarsely by elapsed smoothed RTTs, age the slots.
        let round_start = *self.round_start.get_or_insert(now);
        if now.duration_since(round_start) >= rtt.max(Duration::from_micros(100)) {
            self.round_start = Some(now);
            self.slot_rounds += 1;
            if self.slot_rounds >= SLOT_ROUNDS {
                self.slot_rounds = 0;
                self.slot ^= 1;
                self.extra[self.slot] = 0;
            }
        }
        let start = *self.epoch_start.get_or_insert(now);
        let mut expected = bytes_in(bw, now.duration_since(start));
        if self.epoch_acked <= expected || self.epoch_acked + bytes >= EPOCH_RESET_BYTES.max(bw / 10) {
            self.epoch_start = Some(now);
            self.epoch_acked = 0;
            expected = 0;
        }
        self.epoch_acked += bytes;
        let excess = self.epoch_acked.saturating_sub(expected);
        self.extra[self.slot] = self.extra[self.slot].max(excess);
    }

    /// Bytes to add to the window.
    fn allowance(&self, bw: u64) -> u64 {
        self.extra[0].max(self.extra[1]).min(bytes_in(bw, MAX_EXTRA))
    }
}

/// A round trip with more than 1/LOSS_DIV of its bytes lost (BBRv2: 2%) ...
const LOSS_DIV: u64 = 50;
/// ... and at least this many packets lost (not a stray loss) caps the bytes in flight ...
const LOSS_PACKETS: u64 = 3;
/// ... at this share (BBRv2's beta, 0.7) of what was in flight, or of the cap if lower.
const CAP_BETA: (u64, u64) = (7, 10);
/// The cap never goes below this many packets.
const CAP_MIN_PACKETS: u64 = 4;

/// The loss response: rounds (one flight of packets, delimited by packet numbers as BBR does)
/// whose loss rate passes the threshold lower the cap multiplicatively; rounds without loss in
/// which the cap limited sending raise it by a step that doubles each such round (BBRv2's probe
/// up), so a cap set by a transient overflow is gone after a few round trips.
#[derive(Clone, Debug)]
struct LossCap {
    cap: Option<u64>,
    mtu: u64,
    /// The largest packet number sent so far, and the one that ends the current round.
    max_sent: u64,
    round_end: u64,
    acked: u64,
    lost: u64,
    /// Bytes in flight as of the last send: quinn reports them only after ACKs (when they are
    /// lowest), the sends since add to that.
    in_flight: u64,
    max_in_flight: u64,
    /// The cap limited sending this round.
    limited: bool,
    probe: u64,
}

impl LossCap {
    fn new(mtu: u16) -> Self {
        Self { cap: None, mtu: mtu.into(), max_sent: 0, round_end: 0, acked: 0, lost: 0, in_flight: 0, max_in_flight: 0, limited: false, probe: mtu.into() }
    }

    fn on_sent(&mut self, bytes: u64, last_packet_number: u64) {
        self.max_sent = self.max_sent.max(last_packet_number);
        self.in_flight += bytes;
        self.max_in_flight = self.max_in_flight.max(self.in_flight);
        if self.cap.is_some_and(|c| self.in_flight + self.mtu >= c) {
            self.limited = true;
        }
    }

    fn on_ack(&mut self, bytes: u64) {
        self.acked += bytes;
    }

    fn on_lost(&mut self, bytes: u64) {
        self.lost += bytes;
    }

    fn on_end_acks(&mut self, in_flight: u64, largest_acked: Option<u64>) {
        self.in_flight = in_flight;
        if largest_acked.is_none_or(|l| l < self.round_end) {
            return;
        }
        let floor = CAP_MIN_PACKETS * self.mtu;
        if self.lost >= LOSS_PACKETS * self.mtu && self.lost * LOSS_DIV > self.acked + self.lost {
            let base = self.cap.map_or(self.max_in_flight, |c| c.min(self.max_in_flight));
            self.cap = Some((base * CAP_BETA.0 / CAP_BETA.1).max(floor));
            self.probe = self.mtu;
        } else if let Some(c) = self.cap.filter(|_| self.limited) {
            self.cap = Some(c + self.probe);
            self.probe = (self.probe * 2).min((c / 2).max(self.mtu));
        }
        self.round_end = self.max_sent;
        self.acked = 0;
        self.lost = 0;
        self.max_in_flight = in_flight;
        self.limited = false;
    }

    fn window(&self, w: u64) -> u64 {
        self.cap.map_or(w, |c| w.min(c))
    }
}

/// quinn's BBR with the allowance added to its window, under the loss cap.
struct AggregationBbr {
    inner: Box<dyn Controller>,
    agg: Aggregation,
    cap: LossCap,
}

impl AggregationBbr {
    /// BBR's bandwidth estimate in bytes/s, from its pacing rate (bits/s, gain near 1 in steady
    /// state); 0 before the first estimate.
    fn bandwidth(&self) -> u64 {
        self.inner.metrics().pacing_rate.unwrap_or(0) / 8
    }
}

impl Controller for AggregationBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.inner.on_sent(now, bytes, last_packet_number);
        self.cap.on_sent(bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        self.inner.on_ack(now, sent, bytes, app_limited, rtt);
        let bw = self.bandwidth();
        self.agg.on_ack(now, bytes, bw, rtt.get());
        self.cap.on_ack(bytes);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_packet_num_acked: Option<u64>) {
        self.inner.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
        self.cap.on_end_acks(in_flight, largest_packet_num_acked);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.inner.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
        self.cap.on_lost(lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu);
        self.cap.mtu = new_mtu.into();
    }

    fn window(&self) -> u64 {
        self.cap.window(self.inner.window() + self.agg.allowance(self.bandwidth()))
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(AggregationBbr { inner: self.inner.clone_box(), agg: self.agg.clone(), cap: self.cap.clone() })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BW: u64 = 25_000_000; // 200 Mbit/s
    const RTT: Duration = Duration::from_millis(5);

    #[test]
    fn smooth_acks_at_the_estimated_rate_add_nothing() {
        let mut a = Aggregation::default();
        let t0 = Instant::now();
        // One 1,200-byte packet acknowledged every 48 us: exactly 25 MB/s.
        for i in 0..20_000u64 {
            a.on_ack(t0 + Duration::from_micros(48 * i), 1_200, BW, RTT);
        }
        assert!(a.allowance(BW) <= 2_400, "smooth ACKs are not aggregation: {}", a.allowance(BW));
    }

    #[test]
    fn acks_read_in_bursts_add_the_burst_bounded() {
        let mut a = Aggregation::default();
        let t0 = Instant::now();
        // 8 ms of packets acknowledged at once, every 8 ms (a busy receiver or sender): each
        // burst is ~200 KB above what the rate explains at its instant.
        let mut t = t0;
        for _ in 0..200 {
            t += Duration::from_millis(8);
            for _ in 0..166 {
                a.on_ack(t, 1_200, BW, RTT);
            }
        }
        let extra = a.allowance(BW);
        assert!(extra >= 150_000, "bursts of ~200 KB are allowed for: {extra}");
        assert!(extra <= bytes_in(BW, MAX_EXTRA), "never more than MAX_EXTRA of bandwidth: {extra}");
        // Bursts stop (smooth ACKs at 12 MB/s, estimated as such): once the epoch restarts
        // (EPOCH_RESET_BYTES) and two slots of round trips pass, the allowance is gone.
        for i in 0..2_000u64 {
            a.on_ack(t + Duration::from_micros(100 * i + 100), 1_200, 12_000_000, RTT);
        }
        assert!(a.allowance(BW) < extra / 4, "the allowance follows the bursts away: {} -> {}", extra, a.allowance(BW));
    }

    /// One round trip: `in_flight` bytes outstanding at its peak, `packets` of 1,200 bytes sent
    /// (numbered from `*pn`), `lost` of them lost, the rest acknowledged (quinn reports what is
    /// in flight after the ACKs).
    fn round(c: &mut LossCap, pn: &mut u64, packets: u64, lost: u64, in_flight: u64) {
        c.on_end_acks(in_flight.saturating_sub(packets * 1_200), None);
        *pn += packets;
        c.on_sent(packets * 1_200, *pn);
        c.on_lost(lost * 1_200);
        c.on_ack((packets - lost) * 1_200);
        c.on_end_acks(in_flight.saturating_sub(packets * 1_200), Some(*pn));
    }

    #[test]
    fn no_loss_no_cap_and_stray_losses_are_ignored() {
        let mut c = LossCap::new(1_200);
        let mut pn = 0;
        for _ in 0..20 {
            round(&mut c, &mut pn, 1_000, 0, 3_000_000);
        }
        // 2 lost of 1,000 (0.2%), and 2 lost of 40 (5%, but only two packets).
        round(&mut c, &mut pn, 1_000, 2, 3_000_000);
        round(&mut c, &mut pn, 40, 2, 3_000_000);
        assert_eq!(c.cap, None);
        assert_eq!(c.window(4_000_000), 4_000_000);
    }

    #[test]
    fn lossy_rounds_cap_in_flight_and_loss_free_rounds_release_it() {
        let mut c = LossCap::new(1_200);
        let mut pn = 0;
        round(&mut c, &mut pn, 1_000, 0, 0);
        // A 4 MB window overflowing a queue: 10% lost per round.
        round(&mut c, &mut pn, 3_000, 300, 4_000_000);
        assert_eq!(c.window(4_000_000), 2_800_000);
        round(&mut c, &mut pn, 3_000, 300, 4_000_000);
        assert_eq!(c.window(4_000_000), 1_960_000, "each lossy round lowers the cap");
        // Lossy rounds with less in flight than the cap.
        round(&mut c, &mut pn, 4, 3, 4_800);
        round(&mut c, &mut pn, 4, 3, 4_800);
        assert_eq!(c.window(4_000_000), CAP_MIN_PACKETS * 1_200, "never below the floor");
        // Loss-free rounds at the cap raise it, by steps that double, until BBR's own window
        // is what limits again.
        let mut rounds = 0;
        while c.window(4_000_000) < 4_000_000 {
            let cap = c.window(4_000_000);
            round(&mut c, &mut pn, 1_000, 0, cap);
            assert!(c.window(4_000_000) > cap, "a loss-free round at the cap raises it");
            rounds += 1;
            assert!(rounds < 40, "the cap comes off within a few dozen round trips");
        }
        // A round that did not reach the cap (application-limited) does not raise it.
        let mut c = LossCap::new(1_200);
        round(&mut c, &mut pn, 800, 300, 1_000_000);
        let cap = c.window(u64::MAX);
        round(&mut c, &mut pn, 100, 0, 120_000);
        assert_eq!(c.window(u64::MAX), cap);
    }

    #[test]
    fn no_bandwidth_estimate_no_allowance() {
        let mut a = Aggregation::default();
        let t0 = Instant::now();
        for i in 0..100u64 {
            a.on_ack(t0 + Duration::from_millis(i), 100_000, 0, RTT);
        }
        assert_eq!(a.allowance(0), 0);
    }
}
