//! The sealed UDP transport for chitchat.
//!
//! chitchat 0.13 keeps its message (de)serialization crate-private, so a `Socket` cannot turn an
//! envelope into bytes itself. Instead chitchat's own plaintext `UdpSocket` is bound to loopback
//! and talks to one loopback relay socket per peer; the relay seals what it receives and sends it
//! to the peer from the public socket, and opens what the public socket receives and hands it to
//! chitchat from that peer's relay. Plaintext never leaves loopback; a datagram reaching chitchat
//! from anything but one of our relays is dropped. Reading or injecting on loopback needs
//! CAP_NET_RAW on the node, i.e. root.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as PlainSocket};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use super::seal::{Channel, Counters, MAX_DATAGRAM, Reassembly, Sealer};
use super::{RumorLink, RumorSender};

/// Relays kept at once; past this the oldest is closed (and re-created if that peer comes back).
const MAX_RELAYS: usize = 4_096;

type RumorInbox = mpsc::Receiver<(SocketAddr, Vec<u8>)>;

/// Rumor datagrams waiting for the rumor task; more are dropped (counted).
const RUMOR_INBOX: usize = 1_024;

/// A chitchat transport that seals every datagram with the cluster secret. Rumors share its
/// public socket under their own magic (`seal::Channel::Rumor`).
pub struct SealedUdpTransport {
    secret: Vec<u8>,
    counters: Arc<Counters>,
    shared: Arc<OnceLock<Arc<Shared>>>,
    rumor_tx: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    rumor_rx: Mutex<Option<RumorInbox>>,
}

impl SealedUdpTransport {
    pub fn new(secret: &[u8], counters: Arc<Counters>) -> Self {
        let (rumor_tx, rumor_rx) = mpsc::channel(RUMOR_INBOX);
        Self {
            secret: secret.to_vec(),
            counters,
            shared: Arc::new(OnceLock::new()),
            rumor_tx,
            rumor_rx: Mutex::new(Some(rumor_rx)),
        }
    }

    /// The rumor side of this transport (once; sends go nowhere until the socket is open).
    pub fn rumor_link(&self) -> Option<RumorLink> {
        let inbox = self.rumor_rx.lock().ok()?.take()?;
        Some(RumorLink { sender: Arc::new(SealedRumors(self.shared.clone())), inbox })
    }
}

struct SealedRumors(Arc<OnceLock<Arc<Shared>>>);

#[async_trait]
impl RumorSender for SealedRumors {
    async fn send(&self, to: SocketAddr, payload: &[u8]) {
        let Some(shared) = self.0.get() else { return };
        let sealed = match shared.sealer.lock() {
            Ok(mut sealer) => sealer.seal_on(Channel::Rumor, payload),
            Err(_) => return,
        };
        match sealed {
            Ok(datagrams) => {
                for datagram in datagrams {
                    send_sealed(shared, &datagram, to).await;
                }
            }
            Err(reason) => shared.counters.count(reason),
        }
    }
}

async fn send_sealed(shared: &Shared, datagram: &[u8], to: SocketAddr) {
    use std::sync::atomic::Ordering::Relaxed;
    match shared.public.send_to(datagram, to).await {
        Ok(sent) => {
            shared.counters.datagrams_sent.fetch_add(1, Relaxed);
            shared.counters.bytes_sent.fetch_add(sent as u64, Relaxed);
        }
        Err(error) => debug!(%to, %error, "gossip send failed"),
    }
}

struct Relay {
    socket: Arc<UdpSocket>,
    task: JoinHandle<()>,
    created: u64,
}

struct Shared {
    public: Arc<UdpSocket>,
    /// chitchat's plaintext socket, on loopback.
    inner_addr: SocketAddr,
    sealer: Mutex<Sealer>,
    counters: Arc<Counters>,
    relays: Mutex<Relays>,
    rumor_tx: mpsc::Sender<(SocketAddr, Vec<u8>)>,
}

#[derive(Default)]
struct Relays {
    by_peer: HashMap<SocketAddr, Relay>,
    peer_of: HashMap<SocketAddr, SocketAddr>,
    created: u64,
}

impl Drop for Relays {
    fn drop(&mut self) {
        for relay in self.by_peer.values() {
            relay.task.abort();
        }
    }
}

struct SealedSocket {
    shared: Arc<Shared>,
    inner: PlainSocket,
    receiver: JoinHandle<()>,
}

impl Drop for SealedSocket {
    fn drop(&mut self) {
        self.receiver.abort();
        if let Ok(mut relays) = self.shared.relays.lock() {
            for relay in relays.by_peer.values() {
                relay.task.abort();
            }
            relays.by_peer.clear();
        }
    }
}

#[async_trait]
impl Transport for SealedUdpTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let public = Arc::new(UdpSocket::bind(listen_addr).await?);
        let inner = PlainSocket::open((Ipv4Addr::LOCALHOST, 0).into()).await?;
        let inner_addr = inner.local_addr()?;
        let shared = Arc::new(Shared {
            public,
            inner_addr,
            sealer: Mutex::new(Sealer::new(&self.secret)),
            counters: self.counters.clone(),
            relays: Mutex::new(Relays::default()),
            rumor_tx: self.rumor_tx.clone(),
        });
        let _ = self.shared.set(shared.clone());
        let receiver = tokio::spawn(receive_loop(shared.clone()));
        Ok(Box::new(SealedSocket { shared, inner, receiver }))
    }
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.shared.public.local_addr()?)
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        let relay = relay_for(&self.shared, to).await?;
        self.inner.send(relay, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let mut outcome = self.inner.recv().await?;
            let peer = self
                .shared
                .relays
                .lock()
                .ok()
                .and_then(|relays| relays.peer_of.get(&outcome.from_addr).copied());
            match peer {
                Some(peer) => {
                    outcome.from_addr = peer;
                    return Ok(outcome);
                }
                // Not from one of our relays: a local process writing to loopback.
                None => self.shared.counters.count(super::seal::Drop::NotSealed),
            }
        }
    }
}

/// The loopback address chitchat sends to when it means `peer`.
async fn relay_for(shared: &Arc<Shared>, peer: SocketAddr) -> anyhow::Result<SocketAddr> {
    if let Ok(relays) = shared.relays.lock() {
        if let Some(relay) = relays.by_peer.get(&peer) {
            return Ok(relay.socket.local_addr()?);
        }
    }
    let socket = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?);
    let addr = socket.local_addr()?;
    let task = tokio::spawn(relay_loop(shared.clone(), socket.clone(), peer));
    let mut relays = shared.relays.lock().map_err(|_| anyhow::anyhow!("relay table poisoned"))?;
    if relays.by_peer.len() >= MAX_RELAYS {
        let oldest = relays.by_peer.iter().min_by_key(|(_, r)| r.created).map(|(p, _)| *p);
        if let Some(oldest) = oldest {
            if let Some(relay) = relays.by_peer.remove(&oldest) {
                relay.task.abort();
                if let Ok(old_addr) = relay.socket.local_addr() {
                    relays.peer_of.remove(&old_addr);
                }
            }
        }
    }
    relays.created += 1;
    let created = relays.created;
    if let Some(previous) = relays.by_peer.insert(peer, Relay { socket, task, created }) {
        // Lost a race with another send to the same peer: keep ours, close theirs.
        previous.task.abort();
        if let Ok(old_addr) = previous.socket.local_addr() {
            relays.peer_of.remove(&old_addr);
        }
    }
    relays.peer_of.insert(addr, peer);
    Ok(addr)
}

/// chitchat -> relay -> sealed -> peer.
async fn relay_loop(shared: Arc<Shared>, socket: Arc<UdpSocket>, peer: SocketAddr) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Ok((len, from)) = socket.recv_from(&mut buf).await else { return };
        if from != shared.inner_addr {
            shared.counters.count(super::seal::Drop::NotSealed);
            continue;
        }
        let sealed = match shared.sealer.lock() {
            Ok(mut sealer) => sealer.seal(&buf[..len]),
            Err(_) => return,
        };
        let datagrams = match sealed {
            Ok(datagrams) => datagrams,
            Err(reason) => {
                shared.counters.count(reason);
                continue;
            }
        };
        for datagram in datagrams {
            send_sealed(&shared, &datagram, peer).await;
        }
    }
}

/// peer -> opened -> relay -> chitchat.
async fn receive_loop(shared: Arc<Shared>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut reassembly = Reassembly::default();
    loop {
        let (len, from) = match shared.public.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(error) => {
                debug!(%error, "gossip receive error");
                continue;
            }
        };
        shared.counters.datagrams_received.fetch_add(1, Relaxed);
        shared.counters.bytes_received.fetch_add(len as u64, Relaxed);
        let channel = super::seal::channel_of(&buf[..len]);
        let opened = match shared.sealer.lock() {
            Ok(sealer) => sealer.open(&mut buf[..len]),
            Err(_) => return,
        };
        let fragment = match opened {
            Ok(fragment) => fragment,
            Err(reason) => {
                shared.counters.count(reason);
                continue;
            }
        };
        let Some(message) = reassembly.push(from, fragment, &shared.counters) else { continue };
        if channel == Some(Channel::Rumor) {
            if shared.rumor_tx.try_send((from, message)).is_err() {
                shared.counters.rumor_backlog.fetch_add(1, Relaxed);
            }
            continue;
        }
        let Ok(relay) = relay_for(&shared, from).await else { continue };
        let socket = shared
            .relays
            .lock()
            .ok()
            .and_then(|relays| relays.by_peer.get(&from).map(|r| r.socket.clone()));
        if let Some(socket) = socket {
            debug_assert_eq!(socket.local_addr().ok(), Some(relay));
            let _ = socket.send_to(&message, shared.inner_addr).await;
        }
    }
}
