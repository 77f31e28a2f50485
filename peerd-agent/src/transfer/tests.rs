use std::net::SocketAddr;

use super::*;
use crate::store::StoreConfig;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

struct Node {
    _dir: tempfile::TempDir,
    store: Store,
    t: Transfer,
}

async fn node(secret: &[u8]) -> Node {
    node_with(secret, |_| {}).await
}

async fn node_with(secret: &[u8], change: impl FnOnce(&mut TransferConfig)) -> Node {
    node_serving(secret, change, Handler::default()).await
}

async fn node_serving(secret: &[u8], change: impl FnOnce(&mut TransferConfig), handler: Handler) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::new(1 << 30)).await.unwrap();
    let mut cfg = TransferConfig::new("127.0.0.1:0".parse().unwrap(), "n".into(), secret.to_vec());
    cfg.swarm.request_timeout = Duration::from_secs(3);
    change(&mut cfg);
    let t = Transfer::start(cfg, store.clone()).unwrap();
    t.serve(handler);
    Node { _dir: dir, store, t }
}

fn blob(len: usize, salt: u8) -> (Digest, Vec<u8>) {
    use sha2::Digest as _;
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ salt).collect();
    (Digest::from_sha256_bytes(sha2::Sha256::digest(&data).into()), data)
}

async fn put(n: &Node, d: &Digest, data: &[u8]) {
    let mut w = n.store.writer(d, data.len() as u64, Source::Upstream("test".into())).await.unwrap();
    w.write(data).await.unwrap();
    w.finish().await.unwrap();
}

fn addr(n: &Node) -> SocketAddr {
    n.t.local_addr().unwrap()
}

/// A bulk channel client holding a certificate from `secret`'s CA, with counters of its own.
fn bulk_client(secret: &[u8]) -> bulk::Client {
    let identity = tls::Identity::new(secret, "test client").unwrap();
    bulk::Client::new(&identity, 1, Duration::from_secs(2), Arc::new(bulk::BulkCounters::default())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_verified_pieces_from_several_peers() {
    let (d, data) = blob((40 << 20) + 777, 1);
    let (a, b, c) = (node(SECRET).await, node(SECRET).await, node(SECRET).await);
    put(&a, &d, &data).await;
    put(&b, &d, &data).await;
    c.t.download(&d, &[(addr(&a), false), (addr(&b), false)]).await.unwrap();
    assert!(c.store.has(&d));
    assert_eq!(c.store.read_range(&d, 0, data.len() as u64).await.unwrap(), data);
    let from_a = a.t.counters().bytes_to_peers.load(Ordering::Relaxed);
    let from_b = b.t.counters().bytes_to_peers.load(Ordering::Relaxed);
    // Endgame hedging may fetch a few runs twice; never much more than the blob.
    let total = from_a + from_b;
    assert!(total >= data.len() as u64 && total <= data.len() as u64 * 5 / 4, "{total} bytes for {}", data.len());
    assert!(from_a > 0 && from_b > 0, "both holders served: {from_a} {from_b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_the_secret_is_refused_both_ways() {
    let (d, data) = blob(1 << 20, 2);
    let honest = node(SECRET).await;
    let outsider = node(b"another secret, not the cluster's").await;
    put(&honest, &d, &data).await;
    // The outsider cannot get content from the cluster...
    assert!(matches!(outsider.t.download(&d, &[(addr(&honest), false)]).await, Err(TransferError::NoPeer(_))));
    assert!(!outsider.store.has(&d));
    // ...and a cluster node does not take content from it.
    put(&outsider, &d, &data).await;
    let other = node(SECRET).await;
    assert!(other.t.download(&d, &[(addr(&outsider), false)]).await.is_err());
    assert!(!other.store.has(&d));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_is_caught_and_pieces_come_from_another() {
    // Enough pieces that the window (4 requests, spread over the peers that hold pieces) is
    // still open when the second bitfield arrives, whichever peer answers first.
    let (d, data) = blob(16 << 20, 3);
    let (liar, honest, me) = (node(SECRET).await, node(SECRET).await, node(SECRET).await);
    put(&liar, &d, &data).await;
    put(&honest, &d, &data).await;
    // Corrupt the liar's copy on disk (its store trusts its disk on reads by default).
    let path = liar.store.blob_file_path(&d).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    for i in (0..bytes.len()).step_by(1 << 20) {
        bytes[i + 100] ^= 0xff;
    }
    std::fs::write(&path, bytes).unwrap();
    // The liar answers the manifest first (its manifest is honest; its pieces are not).
    me.t.download(&d, &[(addr(&liar), true), (addr(&honest), false)]).await.unwrap();
    assert_eq!(me.store.read_range(&d, 0, data.len() as u64).await.unwrap(), data);
    assert!(me.t.counters().corrupt_pieces.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_peer_does_not_stall_the_download() {
    let (d, data) = blob(3 << 20, 4);
    let (a, me) = (node(SECRET).await, node(SECRET).await);
    put(&a, &d, &data).await;
    // An address where nothing answers: the dial is bounded.
    let dead: SocketAddr = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let t = Instant::now();
    me.t.download(&d, &[(dead, true), (addr(&a), false)]).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert!(me.store.has(&d));
}

/// A peer that answers but crawls (uploads throttled to 64 KiB/s: one 1 MiB piece would take
/// 16 s) holds up only the pieces asked of it until the endgame duplicates them to the fast
/// peer, after a few times what the fast peer's requests took (not the request timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_peer_is_hedged_against_another() {
    let (d, data) = blob(6 << 20, 9);
    let slow = node_with(SECRET, |c| c.upload_limit = Some(64 << 10)).await;
    let fast = node(SECRET).await;
    // The longest hedge wait and the request timeout both far above what the test allows.
    let me = node_with(SECRET, |c| {
        c.swarm.hedge_after = Duration::from_secs(10);
        c.swarm.request_timeout = Duration::from_secs(20);
    })
    .await;
    put(&slow, &d, &data).await;
    put(&fast, &d, &data).await;
    let t = Instant::now();
    me.t.download(&d, &[(addr(&slow), true), (addr(&fast), true)]).await.unwrap();
    // A bound, not a speed target: far less than the longest hedge wait and the request
    // timeout, so the slow peer's pieces came from a hedge sized by the fast requests.
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert_eq!(me.store.read_range(&d, 0, data.len() as u64).await.unwrap(), data);
    assert!(me.t.counters().hedged_requests.load(Ordering::Relaxed) >= 1);
    assert_eq!(me.t.counters().peer_timeouts.load(Ordering::Relaxed), 0);
}

/// The first holder listed never answers (a bound UDP port with nothing serving QUIC: the dial
/// hangs until quinn gives the handshake up, ~3 s at its initial round-trip estimate). With the
/// dial and manifest timeouts far above that, the manifest must come from the next holder, asked
/// once the first was silent for the hedge delay (without the hedge this takes ~3.1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_holder_is_hedged_for_the_manifest() {
    let (d, data) = blob(3 << 20, 10);
    let a = node(SECRET).await;
    let me = node_with(SECRET, |c| {
        c.dial_timeout = Duration::from_secs(20);
        c.manifest_timeout = Duration::from_secs(20);
    })
    .await;
    put(&a, &d, &data).await;
    // Kept open for the test: its datagrams are swallowed (no port-unreachable either).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let t = Instant::now();
    me.t.download(&d, &[(silent.local_addr().unwrap(), true), (addr(&a), true)]).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    assert_eq!(me.store.read_range(&d, 0, data.len() as u64).await.unwrap(), data);
}

/// A node serving from its containerd content store (no copy in its store): the right bytes,
/// verified as usual by the receiver; a file not matching its name and a removed one are "not
/// found", so the downloader goes elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_blobs_from_containerds_content_store() {
    let (d, data) = blob((3 << 20) + 4321, 5);
    let ctd = tempfile::tempdir().unwrap();
    let blobs = ctd.path().join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(blobs.join(d.hex()), &data).unwrap();
    let (liar, _) = blob(1000, 6);
    std::fs::write(blobs.join(liar.hex()), b"not what the name says").unwrap();
    let c = crate::containerd::ContainerdContent::start(crate::containerd::ContainerdConfig::new(ctd.path(), crate::store::PIECE_SIZE)).await.unwrap();
    let a = node_serving(SECRET, |_| {}, Handler { fetcher: None, containerd: Some(c.clone()) }).await;
    let me = node(SECRET).await;
    me.t.download(&d, &[(addr(&a), true)]).await.unwrap();
    assert_eq!(me.store.read_range(&d, 0, data.len() as u64).await.unwrap(), data);
    assert!(!a.store.has(&d), "served without a copy in the store");
    assert_eq!(c.counters().bytes_served.load(Ordering::Relaxed), data.len() as u64);
    assert!(matches!(me.t.download(&liar, &[(addr(&a), true)]).await, Err(TransferError::NoPeer(_))));
    assert_eq!(c.counters().verify_failed.load(Ordering::Relaxed), 1);
    let (gone, gone_data) = blob(2 << 20, 7);
    std::fs::write(blobs.join(gone.hex()), &gone_data).unwrap();
    c.scan().unwrap();
    std::fs::remove_file(blobs.join(gone.hex())).unwrap();
    c.scan().unwrap();
    assert!(matches!(me.t.download(&gone, &[(addr(&a), true)]).await, Err(TransferError::NoPeer(_))));
}

#[test]
fn rendezvous_owner_is_stable_and_spread() {
    let members: Vec<SocketAddr> = (1..=8).map(|i| format!("198.18.0.{i}:30001").parse().unwrap()).collect();
    let mut counts = std::collections::HashMap::new();
    for i in 0..800u32 {
        let (d, _) = blob(8, i as u8);
        let d = Digest::from_sha256_bytes(*blake3::hash(&[d.as_bytes().as_slice(), &i.to_le_bytes()].concat()).as_bytes());
        let o = owner(&d, &members).unwrap();
        // Same answer regardless of order.
        let mut rev = members.clone();
        rev.reverse();
        assert_eq!(owner(&d, &rev), Some(o));
        // Removing a non-owner does not move it.
        let others: Vec<SocketAddr> = members.iter().copied().filter(|m| *m != o).collect();
        let without_one: Vec<SocketAddr> = members.iter().copied().filter(|m| *m != others[0]).collect();
        assert_eq!(owner(&d, &without_one), Some(o));
        *counts.entry(o).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 8);
    assert!(counts.values().all(|&c| c > 50), "{counts:?}");
}

/// Three nodes download a blob while it is still arriving at its origin from upstream: the
/// origin sends each fresh piece to one of them (`handout`) and they trade the rest, so until the
/// blob is complete there the origin uploads it about once, not once per downloader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_sends_each_fresh_piece_once() {
    let origin = node(SECRET).await;
    let ps = origin.store.piece_size() as usize;
    let pieces = 12;
    let (d, data) = blob(ps * pieces, 5);
    origin.store.declare(&d, data.len() as u64).await.unwrap();
    let put_piece = |i: usize| {
        let (store, bytes) = (origin.store.clone(), data[i * ps..(i + 1) * ps].to_vec());
        async move {
            let h = blake3::hash(&bytes);
            store.put_piece(&d, i, bytes, h, Source::Upstream("test".into())).await.unwrap();
        }
    };
    put_piece(0).await;
    let nodes = [node(SECRET).await, node(SECRET).await, node(SECRET).await];
    let addrs: Vec<SocketAddr> = nodes.iter().map(addr).collect();
    let downloads: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut peers = vec![(addr(&origin), false)];
            peers.extend(addrs.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, a)| (*a, false)));
            let t = n.t.clone();
            tokio::spawn(async move { t.download(&d, &peers).await })
        })
        .collect();
    // Pieces arrive one by one; the last only once every downloader holds all the others.
    for i in 1..pieces - 1 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        put_piece(i).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes.iter().all(|n| n.store.present_pieces(&d).is_some_and(|p| p[..pieces - 1].iter().all(|b| *b))) {
        assert!(Instant::now() < deadline, "downloaders did not get the arrived pieces");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent_while_arriving = origin.t.counters().bytes_to_peers.load(Ordering::Relaxed);
    put_piece(pieces - 1).await;
    for dl in downloads {
        dl.await.unwrap().unwrap();
    }
    for n in &nodes {
        assert_eq!(n.store.read_range(&d, 0, data.len() as u64).await.unwrap(), data);
    }
    // Each of the 11 arrived pieces left the origin once (three downloaders pulling each fresh
    // piece from it would be up to 33); the rest went between the downloaders.
    let once = ((pieces - 1) * ps) as u64;
    assert!(sent_while_arriving <= once, "origin sent {} pieces' worth for {} pieces", sent_while_arriving / ps as u64, pieces - 1);
    let traded: u64 = nodes.iter().map(|n| n.t.counters().bytes_to_peers.load(Ordering::Relaxed)).sum();
    assert!(traded >= once, "downloaders traded {traded} bytes");
}

/// Piece data goes over the bulk channel (TLS on TCP) by default; a holder without one (QUIC
/// only: an older agent, TCP blocked) is asked over QUIC, and the download is the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piece_data_takes_the_bulk_channel_and_falls_back_to_quic() {
    let (d, data) = blob((6 << 20) + 5, 9);
    let (a, me) = (node(SECRET).await, node(SECRET).await);
    put(&a, &d, &data).await;
    me.t.download(&d, &[(addr(&a), false)]).await.unwrap();
    assert_eq!(me.store.read_range(&d, 0, data.len() as u64).await.unwrap(), data);
    let (mine, theirs) = (&me.t.inner.bulk_counters, &a.t.inner.bulk_counters);
    assert_eq!(mine.requests.load(Ordering::Relaxed), 7, "every piece asked on the bulk channel");
    assert_eq!(theirs.requests.load(Ordering::Relaxed), 7, "and served there");
    assert_eq!(mine.fallbacks.load(Ordering::Relaxed), 0);
    assert_eq!(a.t.counters().bytes_to_peers.load(Ordering::Relaxed), data.len() as u64);

    let (d2, data2) = blob((3 << 20) + 1, 10);
    let quic_only = node_with(SECRET, |c| c.bulk = false).await;
    put(&quic_only, &d2, &data2).await;
    me.t.download(&d2, &[(addr(&quic_only), false)]).await.unwrap();
    assert_eq!(me.store.read_range(&d2, 0, data2.len() as u64).await.unwrap(), data2);
    assert!(mine.fallbacks.load(Ordering::Relaxed) >= 4, "asked over QUIC instead");
    assert_eq!(mine.requests.load(Ordering::Relaxed), 7);
    assert_eq!(quic_only.t.counters().bytes_to_peers.load(Ordering::Relaxed), data2.len() as u64);
}

/// The bulk channel takes only cluster members, and only piece requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bulk_channel_refuses_outsiders_and_other_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (d, data) = blob(1 << 20, 11);
    let honest = node(SECRET).await;
    put(&honest, &d, &data).await;
    let refused = || honest.t.inner.bulk_counters.refused.load(Ordering::Relaxed);

    // Another secret: the handshake fails, nothing is served, and the outsider is told to go
    // over QUIC (where it is refused as well).
    let c = bulk_client(b"another secret, not the cluster's");
    assert!(matches!(c.pieces(addr(&honest), &d, 0, vec![1 << 20]).await, Err(bulk::BulkError::Unavailable(_))));
    for _ in 0..100 {
        if refused() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(refused(), 1);
    assert_eq!(honest.t.counters().bytes_to_peers.load(Ordering::Relaxed), 0);

    // A member asking for a manifest on the bulk channel: BadRequest, and the connection closes.
    let member = tls::Identity::new(SECRET, "m").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr(&honest)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME).unwrap();
    let mut s = tokio_rustls::TlsConnector::from(member.bulk_client_config().unwrap()).connect(name, tcp).await.unwrap();
    s.write_all(&1u16.to_be_bytes()).await.unwrap();
    let req = Request::Manifest { digest: d }.encode().unwrap();
    s.write_all(&(req.len() as u32).to_be_bytes()).await.unwrap();
    s.write_all(&req).await.unwrap();
    s.flush().await.unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    assert_eq!(answer.first().copied(), Some(Status::BadRequest as u8), "{answer:?}");
    assert_eq!(refused(), 2);

    // A member asking for pieces past the end: BadRequest, the connection stays.
    let c = bulk_client(SECRET);
    assert!(matches!(c.pieces(addr(&honest), &d, 1, vec![1]).await, Ok(bulk::Answer::Refused(Status::BadRequest))));
    let Ok(bulk::Answer::Pieces(p)) = c.pieces(addr(&honest), &d, 0, vec![1 << 20]).await else { panic!("no pieces") };
    assert_eq!(p, vec![data]);
}

/// Silent connections from one host hold at most 4 of the bulk channel's handshake slots: its
/// next connection is closed at once (a peer behind that address is asked over QUIC), and the
/// slots free when the silent ones go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_cannot_hold_the_bulk_channels_handshakes() {
    let (d, data) = blob(1 << 20, 12);
    let honest = node(SECRET).await;
    put(&honest, &d, &data).await;
    let refused = || honest.t.inner.bulk_counters.refused.load(Ordering::Relaxed);
    let client = || bulk_client(SECRET);
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(tokio::net::TcpStream::connect(addr(&honest)).await.unwrap());
    }
    assert!(matches!(client().pieces(addr(&honest), &d, 0, vec![1 << 20]).await, Err(bulk::BulkError::Unavailable(_))));
    assert_eq!(refused(), 1);
    drop(silent);
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused() < 5 {
        assert!(Instant::now() < deadline, "the silent handshakes did not end: {} refused", refused());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Ok(bulk::Answer::Pieces(p)) = client().pieces(addr(&honest), &d, 0, vec![1 << 20]).await else { panic!("no pieces") };
    assert_eq!(p, vec![data]);
}
