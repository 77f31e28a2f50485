//! The front end with a handler that knows nothing of OCI, over real loopback sockets.
use std::{
    io::Write,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use bytes::Bytes;
use tokio::{io::AsyncReadExt, io::AsyncWriteExt, net::TcpStream};

use super::*;

#[derive(Clone, Default)]
struct Echo {
    shed: Arc<AtomicUsize>,
    /// Dropped when a file body has been sent (the `hold` of `Body::File`).
    held: Arc<Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
    file: Arc<Mutex<Option<std::fs::File>>>,
}

/// Drops signal the test that the server let go of a file body's hold.
struct Hold(Option<tokio::sync::oneshot::Sender<()>>);
impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

impl Handler for Echo {
    type Target = String;

    async fn handle(&self, req: Request<()>, _peer: SocketAddr) -> Response<Body> {
        if req.uri().path() == "/file" {
            let file = self.file.lock().unwrap().take().expect("one file body");
            let hold = Hold(self.held.lock().unwrap().take());
            return Response::new(Body::File { file, offset: 3, len: 5, hold: Box::new(hold) });
        }
        if req.uri().path() == "/stream" {
            let (tx, body) = Body::channel(2);
            tokio::spawn(async move {
                for part in ["ab", "cd"] {
                    let _ = tx.send(Ok(Bytes::from(part))).await;
                }
            });
            return Response::new(body);
        }
        Response::new(Body::full(format!("you asked for {}", req.uri().path())))
    }

    fn serves_redirected(&self, req: &Request<()>, target: &String) -> bool {
        req.uri().path().starts_with(target.as_str())
    }

    async fn handle_redirected(&self, req: Request<()>, _peer: SocketAddr, target: &String) -> Response<Body> {
        Response::new(Body::full(format!("{target} serves {}", req.uri().path())))
    }

    fn count(&self, event: Event) {
        if event == Event::Shed {
            self.shed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn listen(h: Echo, max: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve(h, l, max));
    addr
}

/// Sends `req` and reads until the server closes or `want` bytes of answer arrived.
async fn ask(c: &mut TcpStream, req: &str, until: &str) -> String {
    c.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(until) {
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap().unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

async fn closed(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
}

#[tokio::test]
async fn answers_requests_on_a_kept_alive_connection_and_heads_without_body() {
    let addr = listen(Echo::default(), 8).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    let a = ask(&mut c, "GET /one HTTP/1.1\r\nHost: x\r\n\r\n", "you asked for /one").await;
    assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
    assert!(a.contains("content-length: 18\r\n") && a.contains("connection: keep-alive"), "{a}");
    let b = ask(&mut c, "HEAD /two HTTP/1.1\r\nHost: x\r\n\r\n", "\r\n\r\n").await;
    assert!(b.contains("content-length: 18\r\n") && b.ends_with("\r\n\r\n"), "HEAD has no body: {b}");
    let d = ask(&mut c, "GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "abcd").await;
    assert!(d.ends_with("abcd") && d.contains("connection: close"), "{d}");
    assert!(closed(&mut c).await);
}

#[tokio::test]
async fn refuses_bodies_oversized_heads_and_garbage_through_the_handler() {
    let addr = listen(Echo::default(), 8).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    let a = ask(&mut c, "PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", "GET and HEAD only").await;
    assert!(a.starts_with("HTTP/1.1 405"), "{a}");
    assert!(closed(&mut c).await, "nothing reads a body: the connection ends");
    let mut c = TcpStream::connect(addr).await.unwrap();
    let big = format!("GET /x HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(MAX_HEAD));
    let a = ask(&mut c, &big, "16 KiB").await;
    assert!(a.starts_with("HTTP/1.1 431"), "{a}");
    let mut c = TcpStream::connect(addr).await.unwrap();
    let a = ask(&mut c, "\x01\x02 nonsense\r\n\r\n", "malformed").await;
    assert!(a.starts_with("HTTP/1.1 400"), "{a}");
}

#[tokio::test]
async fn sheds_connections_past_the_limit_and_counts_them() {
    let h = Echo::default();
    let addr = listen(h.clone(), 1).await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    assert!(ask(&mut first, "GET /a HTTP/1.1\r\n\r\n", "/a").await.contains("200 OK"));
    let mut second = TcpStream::connect(addr).await.unwrap();
    let a = ask(&mut second, "GET /b HTTP/1.1\r\n\r\n", "try again").await;
    assert!(a.starts_with("HTTP/1.1 503"), "{a}");
    assert_eq!(h.shed.load(Ordering::SeqCst), 1);
    drop(first);
    // The slot is free again once the first connection ends.
    let mut ok = None;
    for _ in 0..50 {
        let mut third = TcpStream::connect(addr).await.unwrap();
        let a = ask(&mut third, "GET /c HTTP/1.1\r\n\r\n", "\r\n\r\n").await;
        if a.starts_with("HTTP/1.1 200") {
            ok = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok.is_some(), "a slot was never freed");
}

#[tokio::test]
async fn file_bodies_go_out_whole_and_release_their_hold() {
    let mut f = tempfile::tempfile().unwrap();
    f.write_all(b"0123456789").unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let h = Echo::default();
    *h.file.lock().unwrap() = Some(f);
    *h.held.lock().unwrap() = Some(tx);
    let addr = listen(h, 8).await;
    let mut c = TcpStream::connect(addr).await.unwrap();
    let a = ask(&mut c, "GET /file HTTP/1.1\r\n\r\n", "34567").await;
    assert!(a.contains("content-length: 5\r\n") && a.ends_with("\r\n\r\n34567"), "{a}");
    tokio::time::timeout(Duration::from_secs(5), rx).await.expect("hold released").ok();
}

#[tokio::test]
async fn a_redirected_connection_is_handed_back_at_the_first_request_not_served() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mut c = TcpStream::connect(addr).await.unwrap();
    let (s, peer) = l.accept().await.unwrap();
    let served = tokio::spawn(connection(Echo::default(), Stream::Tcp(s), peer, Some("/v2/".to_string())));
    let a = ask(&mut c, "GET /v2/x HTTP/1.1\r\n\r\n", "serves /v2/x").await;
    assert!(a.contains("/v2/ serves /v2/x"), "{a}");
    c.write_all(b"POST /push HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi").await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(5), served).await.unwrap().unwrap().unwrap().expect("handed back");
    // The declined request is returned whole (whatever of its body had arrived too).
    assert!(back.unread.starts_with(b"POST /push HTTP/1.1\r\n"), "{:?}", back.unread);
}

/// A client that stops reading is cut after `WRITE_TIMEOUT` without progress (on tokio's paused
/// clock: the wait is real socket back-pressure, the 30 s are not waited for).
#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_cut_after_the_write_timeout() {
    #[derive(Clone)]
    struct Big;
    impl Handler for Big {
        type Target = ();
        async fn handle(&self, _req: Request<()>, _peer: SocketAddr) -> Response<Body> {
            Response::new(Body::full(vec![7u8; 64 << 20]))
        }
        fn serves_redirected(&self, _req: &Request<()>, _target: &()) -> bool {
            false
        }
        async fn handle_redirected(&self, _req: Request<()>, _peer: SocketAddr, _target: &()) -> Response<Body> {
            unreachable!()
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, peer) = l.accept().await.unwrap();
    let started = tokio::time::Instant::now();
    let served = tokio::spawn(connection(Big, Stream::Tcp(s), peer, None));
    c.write_all(b"GET /big HTTP/1.1\r\n\r\n").await.unwrap();
    // Never read: 64 MiB do not fit the sockets' buffers.
    let r = tokio::time::timeout(Duration::from_secs(120), served).await.expect("cut within the write timeout, not held forever").unwrap();
    let e = r.err().expect("the write gives up");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert!(started.elapsed() >= WRITE_TIMEOUT, "{:?}", started.elapsed());
    drop(c);
}
