//! Byte-rate limits (`--upload-limit`, `--download-limit`, `--upstream-limit`), so the cache
//! never takes all of a node's bandwidth from its own workloads.
use std::{sync::Arc, time::Duration};

use tokio::time::Instant;

/// A token bucket in bytes per second shared by every transfer in one direction, with one
/// second of burst. A transfer takes what it just moved and sleeps off any debt, so the rate
/// holds however many transfers share it (each new taker waits behind the debt already owed).
pub struct RateLimit {
    rate: u64,
    /// Tokens (may be negative: debt being slept off) and when they were last counted.
    state: std::sync::Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub fn new(rate: u64) -> Arc<Self> {
        let rate = rate.max(1);
        Arc::new(Self { rate, state: std::sync::Mutex::new((rate as f64, Instant::now())) })
    }

    /// Accounts `n` bytes moved; returns once the rate allows them.
    pub async fn take(&self, n: u64) {
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let cap = self.rate as f64;
            s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * cap).min(cap);
            s.1 = now;
            s.0 -= n as f64;
            (s.0 < 0.0).then(|| Duration::from_secs_f64(-s.0 / cap))
        };
        if let Some(w) = wait {
            tokio::time::sleep(w).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes `total` bytes in `chunk`s; returns the (virtual) time it took.
    async fn move_bytes(l: Arc<RateLimit>, total: u64, chunk: u64) -> Duration {
        let start = Instant::now();
        let mut moved = 0;
        while moved < total {
            l.take(chunk).await;
            moved += chunk;
        }
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate_after_one_second_of_burst() {
        let l = RateLimit::new(1_000_000);
        // 5 MB at 1 MB/s with 1 MB of burst: 4 s.
        let t = move_bytes(l, 5_000_000, 64_000).await;
        assert!(t >= Duration::from_millis(3_990) && t <= Duration::from_millis(4_100), "{t:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_transfers_share_the_rate() {
        let l = RateLimit::new(1_000_000);
        let a = tokio::spawn(move_bytes(l.clone(), 3_000_000, 100_000));
        let b = tokio::spawn(move_bytes(l.clone(), 3_000_000, 100_000));
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        // 6 MB together, 1 MB of burst: the later one ends at 5 s; alone, either would have
        // taken 2 s (the split between them is not fair, only the sum is bounded).
        let last = a.max(b);
        assert!(last >= Duration::from_millis(4_900) && last <= Duration::from_millis(5_200), "{a:?} {b:?}");
        assert!(a.min(b) >= Duration::from_millis(3_000), "{a:?} {b:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_refills_one_second_at_most() {
        let l = RateLimit::new(1_000_000);
        l.take(1_000_000).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        // Ten idle seconds bought one second of burst, not ten: 3 MB more take 2 s.
        let t = move_bytes(l, 3_000_000, 100_000).await;
        assert!(t >= Duration::from_millis(1_990) && t <= Duration::from_millis(2_100), "{t:?}");
    }
}
