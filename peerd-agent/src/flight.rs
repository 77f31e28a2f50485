//! Single flight: at most one task does the work for a key at a time; others arriving meanwhile
//! wait for its outcome instead of repeating it. The mirror keys upstream fetches by digest, part
//! fetches by (digest, part) and background prefetches by digest. One node asking the registry
//! once per blob depends on it.
use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;

/// In-flight work by key.
pub struct SingleFlight<K> {
    flights: Arc<Mutex<HashMap<K, watch::Receiver<Option<bool>>>>>,
}

impl<K> Default for SingleFlight<K> {
    fn default() -> Self {
        Self { flights: Arc::default() }
    }
}

/// The caller's part in a key's flight.
pub enum Join<K: Hash + Eq> {
    /// Do the work; the flight ends when this drops (failed, unless [`Lead::succeeded`] was said).
    Lead(Lead<K>),
    /// Someone else is doing it (or it is already done): wait for the outcome.
    Follow(Follow),
}

/// The one task doing a key's work.
pub struct Lead<K: Hash + Eq> {
    flights: Arc<Mutex<HashMap<K, watch::Receiver<Option<bool>>>>>,
    key: Option<K>,
    tx: watch::Sender<Option<bool>>,
    ok: bool,
}

impl<K: Hash + Eq> Lead<K> {
    /// Marks the work done: followers are told it succeeded when this drops.
    pub fn succeeded(&mut self) {
        self.ok = true;
    }
}

impl<K: Hash + Eq> Drop for Lead<K> {
    fn drop(&mut self) {
        // Out of the map before followers wake, so a follower that retries can lead.
        if let Some(k) = self.key.take() {
            self.flights.lock().unwrap_or_else(|e| e.into_inner()).remove(&k);
        }
        let _ = self.tx.send(Some(self.ok));
    }
}

/// Waiting for another task's flight.
pub struct Follow(watch::Receiver<Option<bool>>);

impl Follow {
    /// The flight's outcome: `Some(true)` done, `Some(false)` failed (or its task went away),
    /// `None` still running after `within`.
    pub async fn outcome(mut self, within: Duration) -> Option<bool> {
        match tokio::time::timeout(within, self.0.wait_for(Option::is_some)).await {
            Ok(Ok(v)) => *v,
            Ok(Err(_)) => Some(false),
            Err(_) => None,
        }
    }
}

impl<K: Hash + Eq + Clone> SingleFlight<K> {
    /// Joins the flight of `key`, or leads a new one unless `done` says there is nothing to do
    /// (checked under the same lock: a task that found the work missing just before the last
    /// flight ended does not start a second one).
    pub fn join(&self, key: K, done: impl FnOnce() -> bool) -> Join<K> {
        let mut m = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = m.get(&key) {
            return Join::Follow(Follow(rx.clone()));
        }
        if done() {
            return Join::Follow(Follow(watch::channel(Some(true)).1));
        }
        let (tx, rx) = watch::channel(None);
        m.insert(key.clone(), rx);
        Join::Lead(Lead { flights: self.flights.clone(), key: Some(key), tx, ok: false })
    }

    /// Whether a flight for `key` is running.
    pub fn running(&self, key: &K) -> bool {
        self.flights.lock().unwrap_or_else(|e| e.into_inner()).contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leads_the_others_follow_and_learn_the_outcome() {
        let f: SingleFlight<u32> = SingleFlight::default();
        let Join::Lead(mut lead) = f.join(1, || false) else { panic!("first leads") };
        let Join::Follow(a) = f.join(1, || false) else { panic!("second follows") };
        let Join::Lead(_other) = f.join(2, || false) else { panic!("another key leads") };
        assert!(f.running(&1));
        let waiting = tokio::spawn(a.outcome(Duration::from_secs(5)));
        lead.succeeded();
        drop(lead);
        assert_eq!(waiting.await.unwrap(), Some(true));
        assert!(!f.running(&1), "a new flight may start");
        assert!(matches!(f.join(1, || false), Join::Lead(_)));
    }

    #[tokio::test]
    async fn a_dropped_lead_is_a_failure_and_done_work_is_not_repeated() {
        let f: SingleFlight<u32> = SingleFlight::default();
        let Join::Lead(lead) = f.join(7, || false) else { panic!() };
        let Join::Follow(a) = f.join(7, || unreachable!("not asked while a flight runs")) else { panic!() };
        drop(lead);
        assert_eq!(a.outcome(Duration::from_secs(5)).await, Some(false));
        let Join::Follow(done) = f.join(7, || true) else { panic!("nothing to do: follow") };
        assert_eq!(done.outcome(Duration::from_millis(1)).await, Some(true));
        let Join::Lead(_slow) = f.join(8, || false) else { panic!() };
        let Join::Follow(b) = f.join(8, || false) else { panic!() };
        assert_eq!(b.outcome(Duration::from_millis(20)).await, None, "still running");
    }
}
