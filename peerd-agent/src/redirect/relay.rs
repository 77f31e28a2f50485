//! Relaying a redirected connection to where the client meant it to go, bytes untouched.
//!
//! Plain TCP to plain TCP goes through a pipe with splice(2), so the payload never enters
//! userspace (TLS we do not terminate, and the rest of an HTTP connection after a request the
//! mirror does not serve). Intercepted TLS has to be re-encrypted, so it is copied.
use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncWriteExt, Interest},
    net::TcpStream,
};

/// Bound on connecting to the original destination.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn connect(dst: SocketAddr) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect {dst}: no answer in {CONNECT_TIMEOUT:?}")))??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Relays `client` <-> `upstream` until both directions have ended; `first` (bytes already read
/// from the client) goes upstream first. Returns bytes (client->upstream, upstream->client).
pub async fn splice_both(client: TcpStream, upstream: TcpStream, first: &[u8]) -> io::Result<(u64, u64)> {
    let (client, mut upstream) = (client, upstream);
    upstream.write_all(first).await?;
    let (a, b) = (Arc::new(client), Arc::new(upstream));
    let up = splice_one(a.clone(), b.clone());
    let down = splice_one(b, a);
    let (u, d) = tokio::join!(up, down);
    Ok((u? + first.len() as u64, d?))
}

/// One direction: from `src` into a pipe, from the pipe into `dst`; at EOF, half-close `dst`.
async fn splice_one(src: Arc<TcpStream>, dst: Arc<TcpStream>) -> io::Result<u64> {
    let (rd, wr) = pipe()?;
    let mut total = 0u64;
    loop {
        let n = src
            .async_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), wr.as_raw_fd(), 1 << 16)
            })
            .await?;
        if n == 0 {
            // SAFETY: shutdown(2) on a socket we hold open.
            unsafe { libc::shutdown(dst.as_raw_fd(), libc::SHUT_WR) };
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            let m = dst
                .async_io(Interest::WRITABLE, || splice(rd.as_raw_fd(), dst.as_raw_fd(), left))
                .await?;
            if m == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "peer stopped reading"));
            }
            left -= m;
        }
        total += n as u64;
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for two descriptors, owned right after.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Non-blocking splice; EAGAIN comes back as WouldBlock, which `async_io` turns into waiting.
fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
    // SAFETY: plain splice(2) between descriptors we hold; null offsets (sockets and pipes).
    let r = unsafe {
        libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK)
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A client, the relay, and an echo-ish origin over loopback: every byte arrives, in order,
    /// both ways, and half-closes propagate.
    #[tokio::test]
    async fn splices_both_ways_with_half_close() {
        let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (oaddr, faddr) = (origin.local_addr().unwrap(), front.local_addr().unwrap());
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expect = payload.clone();
        let origin_task = tokio::spawn(async move {
            let (mut s, _) = origin.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            // Answer after the client's half-close: its length and a reversed copy.
            s.write_all(&(got.len() as u64).to_be_bytes()).await.unwrap();
            let mut rev = got.clone();
            rev.reverse();
            s.write_all(&rev).await.unwrap();
            got
        });
        let relay_task = tokio::spawn(async move {
            let (c, _) = front.accept().await.unwrap();
            let u = connect(oaddr).await.unwrap();
            splice_both(c, u, b"HEAD").await.unwrap()
        });
        let mut c = TcpStream::connect(faddr).await.unwrap();
        let (mut r, mut w) = c.split();
        let send = async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let recv = async { r.read_to_end(&mut back).await.unwrap() };
        tokio::join!(send, recv);
        let got = origin_task.await.unwrap();
        assert_eq!(&got[..4], b"HEAD");
        assert_eq!(&got[4..], &expect[..]);
        assert_eq!(u64::from_be_bytes(back[..8].try_into().unwrap()), got.len() as u64);
        let (up, down) = relay_task.await.unwrap();
        assert_eq!(up, got.len() as u64);
        assert_eq!(down, back.len() as u64);
    }
}
