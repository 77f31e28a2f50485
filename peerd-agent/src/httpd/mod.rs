//! The HTTP/1.1 front end: requests parsed with `httparse` (the parser hyper uses), responses
//! written here so that file bodies (the mirror's cache hits) go out with sendfile(2), zero-copy
//! from the page cache to the socket. hyper's server owns its socket and cannot do that, nor hand
//! a redirected connection back; this server only has to handle GET and HEAD without request
//! bodies, which keeps it small. It knows nothing of OCI: a [`Handler`] answers each request.
//!
//! Limits: request heads over 16 KiB get 431, more than 64 headers 431; a connection idle for
//! 60 s, or a head not complete within 10 s of its first byte (however it trickles), is closed;
//! a response write that makes no progress for 30 s ends the connection (a client that stops
//! reading holds nothing for long: not a blob's pin, not a descriptor); a request with a body
//! gets 405 and the connection is closed (nothing reads the body). Keep-alive unless the client
//! asks otherwise. At most `max_connections` are served at once; beyond that a connection gets
//! a 503 and is closed. An accept error (out of descriptors) is logged and retried after a
//! pause: the listener never ends.
//!
//! Redirected connections (transparent mode) are served the same way as long as the handler
//! serves their requests; at the first other request (for the mirror: a push, a body, `/v2/`,
//! any other path) the connection is handed back with its unread bytes, to be relayed on.
mod body;
use std::{
    io::IoSlice,
    net::SocketAddr,
    os::fd::AsRawFd,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, BytesMut};
use ::http::{header, Request, Response};
use std::future::Future;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf},
    net::{TcpListener, TcpStream},
};
use peerd_http::head::{parse, Head, MAX_HEAD};
use tracing::{debug, warn};

pub use body::Body;

/// Why the server answered a connection itself, before any handler saw a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 431: the request head is too large (the message says which bound).
    HeadTooLarge(&'static str),
    /// 400: not HTTP/1.1 the parser accepts.
    Malformed(&'static str),
    /// 405: the request has a body (only GET and HEAD are served).
    HasBody,
    /// 503: the connection limit is reached.
    Busy,
}

impl Refusal {
    pub fn status(self) -> u16 {
        match self {
            Refusal::HeadTooLarge(_) => 431,
            Refusal::Malformed(_) => 400,
            Refusal::HasBody => 405,
            Refusal::Busy => 503,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::HeadTooLarge(m) | Refusal::Malformed(m) => m,
            Refusal::HasBody => "request bodies are not accepted (GET and HEAD only)",
            Refusal::Busy => "too many connections to this agent; try again",
        }
    }
}

/// Events the server counts through its handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// accept() failed (e.g. out of descriptors); retried after a pause.
    AcceptError,
    /// A connection was answered 503 at the connection limit.
    Shed,
}

/// Answers the requests of one listener.
pub trait Handler: Clone + Send + Sync + 'static {
    /// What a redirected connection was meant for (for the mirror, the registry).
    type Target: Send + Sync + 'static;
    /// Answers one request (no body: the server refuses requests with one).
    fn handle(&self, req: Request<()>, peer: SocketAddr) -> impl Future<Output = Response<Body>> + Send;
    /// Whether a request on a redirected connection is answered here; the first that is not
    /// ends the loop with a [`Handback`].
    fn serves_redirected(&self, req: &Request<()>, target: &Self::Target) -> bool;
    /// Answers a request on a redirected connection.
    fn handle_redirected(&self, req: Request<()>, peer: SocketAddr, target: &Self::Target) -> impl Future<Output = Response<Body>> + Send;
    /// The response for a request the server refused itself.
    fn refusal(&self, why: Refusal) -> Response<Body> {
        let mut r = Response::new(Body::full(why.message()));
        *r.status_mut() = ::http::StatusCode::from_u16(why.status()).unwrap_or(::http::StatusCode::BAD_REQUEST);
        r
    }
    /// Counts an event (the mirror exports them as metrics).
    fn count(&self, _event: Event) {}
}

/// A client connection: plain TCP (cache hits go out with sendfile), or TLS terminated by the
/// agent (transparent mode with `--tls-intercept`; hits are copied through the TLS stream).
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The rest of a redirected connection the mirror does not serve: relay it to the registry,
/// starting with `unread` (the request that was declined, and anything after it).
pub struct Handback {
    pub stream: Stream,
    pub unread: BytesMut,
}

const IDLE: Duration = Duration::from_secs(60);
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A write that makes no progress for this long ends the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The next connection on `listener`, with TCP_NODELAY set. An accept error (EMFILE, ENFILE,
/// ENOBUFS and the like) is reported to `failed` and retried after a pause, never returned: a
/// listener must not end, nor spin, while descriptors are short (the pending connection stays in
/// the backlog until they free up). Every TCP listener of the agent accepts through this.
pub async fn accept(listener: &TcpListener, failed: impl Fn(&std::io::Error)) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return (stream, peer);
            }
            Err(e) => {
                failed(&e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Accepts connections forever, at most `max_connections` served at once.
pub async fn serve<H: Handler>(handler: H, listener: TcpListener, max_connections: usize) -> std::io::Result<()> {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    loop {
        let (stream, peer) = accept(&listener, |e| {
            handler.count(Event::AcceptError);
            warn!("accepting a connection failed, retrying shortly: {e}");
        })
        .await;
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            handler.count(Event::Shed);
            let resp = handler.refusal(Refusal::Busy);
            tokio::spawn(async move {
                let mut s = Stream::Tcp(stream);
                let _ = tokio::time::timeout(Duration::from_secs(1), write_response(&mut s, resp, false, false)).await;
            });
            continue;
        };
        let h = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(h, Stream::Tcp(stream), peer, None).await {
                debug!(%peer, "connection ended: {e}");
            }
        });
    }
}

/// `fut` (one write), failing with TimedOut when it makes no progress within `WRITE_TIMEOUT`.
async fn timed<T>(fut: impl std::future::Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    tokio::time::timeout(WRITE_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client stopped reading")))
}

/// Serves one connection. `redirected` names what a redirected connection was meant for; then a
/// request the handler does not serve ends the loop with a [`Handback`].
pub async fn connection<H: Handler>(
    handler: H,
    mut stream: Stream,
    peer: SocketAddr,
    redirected: Option<H::Target>,
) -> std::io::Result<Option<Handback>> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        // Read one request head: idle bound before the first byte, then one deadline for the
        // whole head (a client dripping a byte at a time does not extend it).
        let mut head_deadline: Option<tokio::time::Instant> = None;
        let head = loop {
            match parse(&buf) {
                Ok(Some(h)) => break h,
                // What the mirror cannot parse may still be the registry's business.
                Ok(None) if buf.len() >= MAX_HEAD && redirected.is_some() => return Ok(Some(Handback { stream, unread: buf })),
                Err(_) if redirected.is_some() => return Ok(Some(Handback { stream, unread: buf })),
                Ok(None) if buf.len() >= MAX_HEAD => {
                    return reject(&handler, &mut stream, Refusal::HeadTooLarge("request head larger than 16 KiB")).await;
                }
                Ok(None) => {}
                Err(_) => return reject(&handler, &mut stream, Refusal::Malformed("malformed HTTP request")).await,
            }
            let deadline = match head_deadline {
                Some(d) => d,
                None if buf.is_empty() => tokio::time::Instant::now() + IDLE,
                None => *head_deadline.insert(tokio::time::Instant::now() + HEAD_TIMEOUT),
            };
            let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await;
            if head_deadline.is_none() && !buf.is_empty() {
                head_deadline = Some(tokio::time::Instant::now() + HEAD_TIMEOUT);
            }
            match read {
                Ok(Ok(0)) | Err(_) => return Ok(None),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        };
        let (used, head) = head;
        let (req, keep_alive, has_body) = match head {
            Head::Request(r, k, b) => (r, k, b),
            Head::Reject(..) if redirected.is_some() => return Ok(Some(Handback { stream, unread: buf })),
            Head::Reject(431, _, msg) => return reject(&handler, &mut stream, Refusal::HeadTooLarge(msg)).await,
            Head::Reject(_, _, msg) => return reject(&handler, &mut stream, Refusal::Malformed(msg)).await,
        };
        if let Some(reg) = &redirected {
            if has_body || !handler.serves_redirected(&req, reg) {
                return Ok(Some(Handback { stream, unread: buf }));
            }
            buf.advance(used.min(buf.len()));
            let is_head = req.method() == http::Method::HEAD;
            let resp = handler.handle_redirected(req, peer, reg).await;
            if !write_response(&mut stream, resp, is_head, keep_alive).await? || !keep_alive {
                return Ok(None);
            }
            continue;
        }
        buf.advance(used.min(buf.len()));
        if has_body {
            return reject(&handler, &mut stream, Refusal::HasBody).await;
        }
        let is_head = req.method() == http::Method::HEAD;
        let resp = handler.handle(req, peer).await;
        if !write_response(&mut stream, resp, is_head, keep_alive).await? || !keep_alive {
            return Ok(None);
        }
    }
}

async fn reject<H: Handler>(handler: &H, stream: &mut Stream, why: Refusal) -> std::io::Result<Option<Handback>> {
    write_response(stream, handler.refusal(why), false, false).await?;
    Ok(None)
}

/// Writes a response; returns whether the connection may carry another request.
async fn write_response(stream: &mut Stream, resp: Response<Body>, is_head: bool, keep_alive: bool) -> std::io::Result<bool> {
    let (parts, body) = resp.into_parts();
    let length_known = parts.headers.contains_key(header::CONTENT_LENGTH);
    // Without a length, the end of a streamed body is marked by closing the connection.
    let keep = keep_alive && (length_known || is_head || matches!(body, Body::Empty | Body::Full(_) | Body::File { .. }));
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(
        format!("HTTP/1.1 {} {}\r\n", parts.status.as_u16(), parts.status.canonical_reason().unwrap_or("")).as_bytes(),
    );
    for (k, v) in &parts.headers {
        head.extend_from_slice(k.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if !length_known {
        match &body {
            Body::Empty => head.extend_from_slice(b"content-length: 0\r\n"),
            Body::Full(b) => head.extend_from_slice(format!("content-length: {}\r\n", b.len()).as_bytes()),
            Body::File { len, .. } => head.extend_from_slice(format!("content-length: {len}\r\n").as_bytes()),
            Body::Stream(_) => {}
        }
    }
    head.extend_from_slice(if keep { b"connection: keep-alive\r\n\r\n" } else { b"connection: close\r\n\r\n" });
    if is_head {
        timed(stream.write_all(&head)).await?;
        return Ok(keep);
    }
    match body {
        Body::Empty => timed(stream.write_all(&head)).await?,
        Body::Full(b) => {
            head.extend_from_slice(&b);
            timed(stream.write_all(&head)).await?;
        }
        Body::Stream(mut rx) => {
            timed(stream.write_all(&head)).await?;
            while let Some(chunk) = rx.recv().await {
                match chunk {
                    Ok(c) => timed(stream.write_all(&c)).await?,
                    // Abort: the client sees a short body and an error, never a "complete" one.
                    Err(e) => return Err(e),
                }
            }
        }
        Body::File { file, offset, len, hold: _hold } => match stream {
            Stream::Tcp(s) => {
                // Corked, the head leaves in the body's first segment and the body in full
                // segments (nginx's `tcp_nopush`); uncorking pushes the tail at once.
                file_socket_options(s, true);
                timed(s.write_all(&head)).await?;
                send_file(s, &file, offset, len).await?;
                file_socket_options(s, false);
            }
            Stream::Tls(s) => {
                timed(s.write_all(&head)).await?;
                copy_file(s.as_mut(), file, offset, len).await?;
            }
        },
    }
    timed(stream.flush()).await?;
    Ok(keep)
}

/// A file range through a userspace stream (TLS: the bytes have to be encrypted anyway).
async fn copy_file(out: &mut (impl AsyncWrite + Unpin), file: std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use tokio::io::AsyncSeekExt;
    let mut f = tokio::fs::File::from_std(file);
    f.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut f = f.take(len);
    let mut buf = vec![0u8; 256 << 10];
    let mut sent = 0u64;
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        timed(out.write_all(&buf[..n])).await?;
        sent += n as u64;
    }
    if sent != len {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "cache file shorter than expected"));
    }
    Ok(())
}

/// Send buffer for a connection that gets a file body (the kernel doubles it; autotuning would
/// stop at `tcp_wmem`'s 4 MiB). Measured (512 MiB over loopback, curl and server each on its own
/// core, 8 alternating runs, bench/RESULTS.md): the agent's CPU per GiB was 0.42-0.52 s against
/// nginx's 0.30-0.35 s, whatever the sendfile chunk (1 GiB, 2 MiB, 256 KiB); corked 0.33-0.35 s
/// but slower; corked with 4 MiB here 0.21-0.27 s at about nginx's throughput (2 MiB 0.32 s,
/// 8 MiB 0.29 s and slower). Uncorked, a bigger buffer alone gave 0.43 s.
const FILE_SNDBUF: libc::c_int = 4 << 20;

/// Before a file body (`on`): cork and the send buffer; after it: uncork (the send buffer stays
/// for the connection). Failures only cost speed, so they are ignored.
fn file_socket_options(s: &TcpStream, on: bool) {
    let set = |level: libc::c_int, name: libc::c_int, v: libc::c_int| {
        // SAFETY: a socket we own and a c_int option value of the size passed.
        unsafe { libc::setsockopt(s.as_raw_fd(), level, name, &v as *const libc::c_int as *const libc::c_void, std::mem::size_of::<libc::c_int>() as libc::socklen_t) };
    };
    if on {
        set(libc::SOL_SOCKET, libc::SO_SNDBUF, FILE_SNDBUF);
    }
    set(libc::IPPROTO_TCP, libc::TCP_CORK, on.into());
}

/// Bytes per sendfile(2) call, as nginx's `sendfile_max_chunk`. A fast client drains the socket
/// as quickly as it fills, so one call for the whole body (as before) ran for the whole transfer
/// (strace: 537 MB in one 0.2 s call) and held a runtime thread meanwhile; measured against that,
/// 2 MiB and 256 KiB calls cost the same CPU per GiB and throughput (within the runs' spread).
const SENDFILE_CHUNK: usize = 2 << 20;

/// sendfile(2) from the cache file to the socket: the bytes never enter userspace.
async fn send_file(stream: &TcpStream, file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    let mut off = offset as libc::off_t;
    let end = offset + len;
    while (off as u64) < end {
        let want = ((end - off as u64) as usize).min(SENDFILE_CHUNK);
        let n = timed(stream.async_io(Interest::WRITABLE, || {
                // SAFETY: both fds are open for the duration; `off` is a valid off_t we own.
                let r = unsafe { libc::sendfile(stream.as_raw_fd(), file.as_raw_fd(), &mut off, want) };
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
            }))
            .await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "cache file shorter than expected"));
        }
        // Other connections' tasks on this runtime thread get their turn between chunks.
        tokio::task::yield_now().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
