//! Sealing gossip datagrams with the cluster secret (sans-IO; the socket is in `transport`).
//!
//! chitchat has no authentication or encryption. Every datagram is sealed with
//! ChaCha20-Poly1305 under a key derived from the cluster secret, with a random nonce, so a host
//! without the secret can neither read summaries nor inject or alter state: anything that fails to
//! open is dropped and counted. Format in PROTOCOL.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// Largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;
const MAGIC: [u8; 2] = *b"pg";
/// Rumor datagrams (`rumor`): same seal, another magic, never handed to chitchat.
const MAGIC_RUMOR: [u8; 2] = *b"pr";
const VERSION: u8 = 1;
const HEADER: usize = 3;
const TAG: usize = 16;
/// Inside the ciphertext: message id (4), fragment index (1), fragment count (1).
const FRAGMENT_HEADER: usize = 6;
/// Bytes a datagram adds to the chitchat message it carries.
pub const OVERHEAD: usize = HEADER + NONCE_LEN + TAG + FRAGMENT_HEADER;
/// Largest chitchat message bytes per datagram.
const MAX_FRAGMENT: usize = MAX_DATAGRAM - OVERHEAD;
/// chitchat fills messages up to 65,507 bytes; with our overhead that is two datagrams at most.
const MAX_FRAGMENTS: u8 = 2;
/// Messages being reassembled at once; the oldest is dropped beyond this.
const MAX_PENDING: usize = 64;
const KEY_CONTEXT: &str = "peerd 2025 gossip datagram key v1";

/// What a sealed datagram carries; the magic that says so is authenticated (part of the AAD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Chitchat,
    Rumor,
}

impl Channel {
    fn magic(self) -> [u8; 2] {
        match self {
            Channel::Chitchat => MAGIC,
            Channel::Rumor => MAGIC_RUMOR,
        }
    }
}

/// The channel a datagram claims (checked when it is opened).
pub fn channel_of(datagram: &[u8]) -> Option<Channel> {
    match datagram.get(..2)? {
        m if m == MAGIC => Some(Channel::Chitchat),
        m if m == MAGIC_RUMOR => Some(Channel::Rumor),
        _ => None,
    }
}

/// Why a datagram was dropped; each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Drop {
    #[error("not a sealed gossip datagram")]
    NotSealed,
    #[error("unknown seal version")]
    UnknownVersion,
    #[error("authentication failed (wrong secret or altered)")]
    AuthFailed,
    #[error("bad fragment header")]
    BadFragment,
    #[error("fragment evicted before its message completed")]
    Evicted,
    #[error("opened but not a chitchat message")]
    Undecodable,
    #[error("message too large to send")]
    Oversize,
}

/// Drop counters by reason, plus traffic totals.
#[derive(Debug, Default)]
pub struct Counters {
    pub not_sealed: AtomicU64,
    pub unknown_version: AtomicU64,
    pub auth_failed: AtomicU64,
    pub bad_fragment: AtomicU64,
    pub evicted: AtomicU64,
    pub undecodable: AtomicU64,
    pub oversize: AtomicU64,
    /// chitchat SYNs not sent because the gossip budget was spent (`pace`).
    pub paced: AtomicU64,
    /// Rumor datagrams that could not be queued to the rumor task (it was behind).
    pub rumor_backlog: AtomicU64,
    pub datagrams_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub datagrams_received: AtomicU64,
    pub bytes_received: AtomicU64,
}

/// A copy of the counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub not_sealed: u64,
    pub unknown_version: u64,
    pub auth_failed: u64,
    pub bad_fragment: u64,
    pub evicted: u64,
    pub undecodable: u64,
    pub oversize: u64,
    pub paced: u64,
    pub rumor_backlog: u64,
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    pub datagrams_received: u64,
    pub bytes_received: u64,
}

impl CounterSnapshot {
    /// All datagrams dropped, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.not_sealed
            + self.unknown_version
            + self.auth_failed
            + self.bad_fragment
            + self.evicted
            + self.undecodable
    }
}

impl Counters {
    pub fn count(&self, reason: Drop) {
        let counter = match reason {
            Drop::NotSealed => &self.not_sealed,
            Drop::UnknownVersion => &self.unknown_version,
            Drop::AuthFailed => &self.auth_failed,
            Drop::BadFragment => &self.bad_fragment,
            Drop::Evicted => &self.evicted,
            Drop::Undecodable => &self.undecodable,
            Drop::Oversize => &self.oversize,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            not_sealed: get(&self.not_sealed),
            unknown_version: get(&self.unknown_version),
            auth_failed: get(&self.auth_failed),
            bad_fragment: get(&self.bad_fragment),
            evicted: get(&self.evicted),
            undecodable: get(&self.undecodable),
            oversize: get(&self.oversize),
            paced: get(&self.paced),
            rumor_backlog: get(&self.rumor_backlog),
            datagrams_sent: get(&self.datagrams_sent),
            bytes_sent: get(&self.bytes_sent),
            datagrams_received: get(&self.datagrams_received),
            bytes_received: get(&self.bytes_received),
        }
    }
}

/// Seals and opens datagrams under one cluster secret.
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
    next_message: u32,
}

impl Sealer {
    /// Derives the datagram key from the secret (blake3 in key-derivation mode), so the secret
    /// file's bytes are never used as a key directly and other uses of it get other keys.
    pub fn new(secret: &[u8]) -> Self {
        let derived = blake3::derive_key(KEY_CONTEXT, secret);
        // CHACHA20_POLY1305 takes exactly 32 bytes, which derive_key always returns.
        let key = match UnboundKey::new(&CHACHA20_POLY1305, &derived) {
            Ok(key) => LessSafeKey::new(key),
            Err(_) => unreachable!("32-byte key"),
        };
        Self { key, rng: SystemRandom::new(), next_message: 0 }
    }

    /// Seals one chitchat message into one or two datagrams.
    pub fn seal(&mut self, message: &[u8]) -> Result<Vec<Vec<u8>>, Drop> {
        self.seal_on(Channel::Chitchat, message)
    }

    /// Seals one message of `channel` into one or two datagrams.
    pub fn seal_on(&mut self, channel: Channel, message: &[u8]) -> Result<Vec<Vec<u8>>, Drop> {
        let count = message.len().div_ceil(MAX_FRAGMENT).max(1);
        let count = u8::try_from(count).map_err(|_| Drop::Oversize)?;
        if count > MAX_FRAGMENTS {
            return Err(Drop::Oversize);
        }
        let id = self.next_message;
        self.next_message = self.next_message.wrapping_add(1);
        let chunks: Vec<&[u8]> = if message.is_empty() {
            vec![message]
        } else {
            message.chunks(MAX_FRAGMENT).collect()
        };
        let mut out = Vec::with_capacity(chunks.len());
        for (index, chunk) in chunks.into_iter().enumerate() {
            let mut nonce = [0u8; NONCE_LEN];
            self.rng.fill(&mut nonce).map_err(|_| Drop::Oversize)?;
            let mut datagram = Vec::with_capacity(chunk.len() + OVERHEAD);
            datagram.extend_from_slice(&channel.magic());
            datagram.push(VERSION);
            datagram.extend_from_slice(&nonce);
            let body_start = datagram.len();
            datagram.extend_from_slice(&id.to_be_bytes());
            datagram.push(index as u8);
            datagram.push(count);
            datagram.extend_from_slice(chunk);
            let (header, body) = datagram.split_at_mut(body_start);
            let tag = self
                .key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(&header[..HEADER]),
                    body,
                )
                .map_err(|_| Drop::Oversize)?;
            datagram.extend_from_slice(tag.as_ref());
            out.push(datagram);
        }
        Ok(out)
    }

    /// Opens one datagram into (message id, index, count, payload).
    pub fn open(&self, datagram: &mut [u8]) -> Result<(u32, u8, u8, Vec<u8>), Drop> {
        if datagram.len() < OVERHEAD || channel_of(datagram).is_none() {
            return Err(Drop::NotSealed);
        }
        if datagram[2] != VERSION {
            return Err(Drop::UnknownVersion);
        }
        let (header, rest) = datagram.split_at_mut(HEADER);
        let (nonce, sealed) = rest.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Drop::NotSealed)?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(&header[..]), sealed)
            .map_err(|_| Drop::AuthFailed)?;
        if plain.len() < FRAGMENT_HEADER {
            return Err(Drop::BadFragment);
        }
        let id = u32::from_be_bytes([plain[0], plain[1], plain[2], plain[3]]);
        let (index, count) = (plain[4], plain[5]);
        if count == 0 || count > MAX_FRAGMENTS || index >= count {
            return Err(Drop::BadFragment);
        }
        Ok((id, index, count, plain[FRAGMENT_HEADER..].to_vec()))
    }
}

/// A message being reassembled: when its first part arrived (an arrival count) and its parts.
type Partial = (u64, Vec<Option<Vec<u8>>>);

/// Reassembles messages split in two datagrams; bounded so junk cannot grow it.
#[derive(Default)]
pub struct Reassembly {
    pending: HashMap<(SocketAddr, u32), Partial>,
    arrivals: u64,
}

impl Reassembly {
    /// Adds an opened fragment; returns the whole message once every fragment is in.
    pub fn push(
        &mut self,
        from: SocketAddr,
        (id, index, count, payload): (u32, u8, u8, Vec<u8>),
        counters: &Counters,
    ) -> Option<Vec<u8>> {
        if count == 1 {
            return Some(payload);
        }
        self.arrivals += 1;
        let arrivals = self.arrivals;
        let entry = self
            .pending
            .entry((from, id))
            .or_insert_with(|| (arrivals, vec![None; count as usize]));
        if entry.1.len() != count as usize {
            counters.count(Drop::BadFragment);
            return None;
        }
        entry.1[index as usize] = Some(payload);
        if entry.1.iter().all(Option::is_some) {
            let (_, parts) = self.pending.remove(&(from, id))?;
            return Some(parts.into_iter().flatten().flatten().collect());
        }
        if self.pending.len() > MAX_PENDING {
            let oldest = self.pending.iter().min_by_key(|(_, (t, _))| *t).map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.pending.remove(&oldest);
                counters.count(Drop::Evicted);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "198.18.0.1:30001".parse().unwrap()
    }

    #[test]
    fn round_trip_small_and_split() {
        let mut sealer = Sealer::new(b"secret");
        let counters = Counters::default();
        let mut reassembly = Reassembly::default();
        for len in [0usize, 10, MAX_FRAGMENT, MAX_FRAGMENT + 1, MAX_DATAGRAM] {
            let message: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let datagrams = sealer.seal(&message).unwrap();
            assert_eq!(datagrams.len(), if len > MAX_FRAGMENT { 2 } else { 1 });
            let mut got = None;
            for mut d in datagrams.into_iter().rev() {
                assert!(d.len() <= MAX_DATAGRAM);
                got = reassembly.push(addr(), sealer.open(&mut d).unwrap(), &counters);
            }
            assert_eq!(got.unwrap(), message);
        }
        assert!(sealer.seal(&vec![0; 2 * MAX_FRAGMENT + 1]).is_err());
    }

    #[test]
    fn the_channel_is_authenticated() {
        let mut sealer = Sealer::new(b"secret");
        let mut rumor = sealer.seal_on(Channel::Rumor, b"rumor").unwrap().remove(0);
        assert_eq!(channel_of(&rumor), Some(Channel::Rumor));
        let mut relabelled = rumor.clone();
        relabelled[..2].copy_from_slice(&MAGIC);
        assert_eq!(channel_of(&relabelled), Some(Channel::Chitchat));
        assert_eq!(sealer.open(&mut relabelled), Err(Drop::AuthFailed));
        assert_eq!(sealer.open(&mut rumor).unwrap().3, b"rumor");
    }

    #[test]
    fn wrong_secret_tampering_and_junk_are_refused() {
        let mut sealer = Sealer::new(b"secret");
        let other = Sealer::new(b"not the secret");
        let mut d = sealer.seal(b"hello").unwrap().remove(0);
        assert_eq!(other.open(&mut d.clone()), Err(Drop::AuthFailed));
        let last = d.len() - 1;
        d[last] ^= 1;
        assert_eq!(sealer.open(&mut d), Err(Drop::AuthFailed));
        let mut d = sealer.seal(b"hello").unwrap().remove(0);
        d[HEADER + NONCE_LEN] ^= 1; // ciphertext
        assert_eq!(sealer.open(&mut d), Err(Drop::AuthFailed));
        let mut d = sealer.seal(b"hello").unwrap().remove(0);
        d[2] = 9;
        assert_eq!(sealer.open(&mut d), Err(Drop::UnknownVersion));
        assert_eq!(sealer.open(&mut b"junk".to_vec()), Err(Drop::NotSealed));
    }

    #[test]
    fn nonces_differ_and_plaintext_is_hidden() {
        let mut sealer = Sealer::new(b"secret");
        let a = sealer.seal(b"zone=eu-west-1a zone=eu-west-1a").unwrap().remove(0);
        let b = sealer.seal(b"zone=eu-west-1a zone=eu-west-1a").unwrap().remove(0);
        assert_ne!(a[HEADER..HEADER + NONCE_LEN], b[HEADER..HEADER + NONCE_LEN]);
        assert!(!a.windows(4).any(|w| w == b"zone"));
    }

    #[test]
    fn reassembly_is_bounded() {
        let mut sealer = Sealer::new(b"secret");
        let counters = Counters::default();
        let mut reassembly = Reassembly::default();
        for _ in 0..(MAX_PENDING + 10) {
            let mut first = sealer.seal(&vec![1; MAX_FRAGMENT + 1]).unwrap().remove(0);
            assert!(reassembly.push(addr(), sealer.open(&mut first).unwrap(), &counters).is_none());
        }
        assert!(reassembly.pending.len() <= MAX_PENDING);
        assert_eq!(counters.snapshot().evicted, 10);
    }
}
