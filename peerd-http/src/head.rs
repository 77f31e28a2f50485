//! HTTP/1.1 request heads, parsed with `httparse` (the parser hyper uses).
//!
//! Limits, so that a client cannot make the server buffer or allocate without bound: a head
//! over [`MAX_HEAD`] bytes or with more than [`MAX_HEADERS`] header lines is answered with 431.

use http::Request;

/// Largest request head accepted, in bytes.
pub const MAX_HEAD: usize = 16 << 10;
/// Most header lines accepted in one request head.
pub const MAX_HEADERS: usize = 64;

/// A request head read from the start of a connection's buffer.
#[derive(Debug)]
pub enum Head {
    /// The request, keep-alive, and whether a body follows the head.
    Request(Request<()>, bool, bool),
    /// Answer with this status, error code and message, then close the connection.
    Reject(u16, &'static str, &'static str),
}

/// Why bytes are not an HTTP/1.x request head at all (answered with 400, or handed back to the
/// registry on a redirected connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed HTTP request: {0}")]
    Malformed(httparse::Error),
}

/// Parses the request head at the start of `buf`: `Ok(None)` while it is incomplete (read
/// more), else the head's length in bytes and what to do with it.
///
/// A head that can never fit the limits is rejected as soon as that is known, so the caller
/// can stop reading; the length returned with a [`Head::Reject`] is not meaningful (the
/// connection ends).
pub fn parse(buf: &[u8]) -> Result<Option<(usize, Head)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => return Ok(Some((n, too_large()))),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Ok(Some((buf.len(), too_large()))),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Ok(Some((buf.len(), Head::Reject(431, "TOO_LARGE", "more than 64 request headers"))))
        }
        Err(e) => return Err(HeadError::Malformed(e)),
    };
    let mut b = Request::builder().method(req.method.unwrap_or("GET")).uri(req.path.unwrap_or("/"));
    let mut keep_alive = req.version == Some(1);
    let mut has_body = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.contains("close") {
                keep_alive = false;
            } else if v.contains("keep-alive") {
                keep_alive = true;
            }
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
        {
            has_body = true;
        }
        b = b.header(h.name, h.value);
    }
    let Ok(request) = b.body(()) else {
        return Ok(Some((n, Head::Reject(400, "BAD_REQUEST", "malformed request line or header"))));
    };
    Ok(Some((n, Head::Request(request, keep_alive, has_body))))
}

fn too_large() -> Head {
    Head::Reject(431, "TOO_LARGE", "request head larger than 16 KiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(buf: &[u8]) -> (usize, Request<()>, bool, bool) {
        match parse(buf) {
            Ok(Some((n, Head::Request(r, k, b)))) => (n, r, k, b),
            other => panic!("{:?} gave {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn rejected(buf: &[u8]) -> u16 {
        match parse(buf) {
            Ok(Some((_, Head::Reject(status, ..)))) => status,
            other => panic!("{:?} gave {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn requests() {
        let raw = b"GET /v2/x/blobs/sha256:00 HTTP/1.1\r\nHost: a\r\nRange: bytes=0-1\r\n\r\nGET / HTTP/1.1\r\n";
        let (n, r, keep, body) = request(raw);
        assert_eq!(&raw[n..], b"GET / HTTP/1.1\r\n");
        assert_eq!(r.method(), http::Method::GET);
        assert_eq!(r.uri().path(), "/v2/x/blobs/sha256:00");
        assert_eq!(r.headers()["range"], "bytes=0-1");
        assert!(keep && !body);
    }

    #[test]
    fn keep_alive_and_bodies() {
        let cases: &[(&[u8], bool, bool)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", true, false),
            (b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n", false, false),
            (b"GET / HTTP/1.0\r\n\r\n", false, false),
            (b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n", true, false),
            (b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", true, false),
            (b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n", true, true),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", true, true),
        ];
        for (raw, keep, body) in cases {
            let (_, _, k, b) = request(raw);
            assert_eq!((k, b), (*keep, *body), "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn incomplete_then_limits() {
        assert!(matches!(parse(b""), Ok(None)));
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None)));
        // An incomplete head that already fills the limit can never be accepted.
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD, b'a');
        assert_eq!(rejected(&big), 431);
        // A complete head over the limit, even when it arrived in one read.
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(rejected(&big), 431);
        // Exactly at the limit is fine.
        let mut edge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        edge.resize(MAX_HEAD - 4, b'a');
        edge.extend_from_slice(b"\r\n\r\n");
        assert_eq!(request(&edge).0, MAX_HEAD);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        assert_eq!(rejected(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()), 431);
        let enough: String = (0..MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        request(format!("GET / HTTP/1.1\r\n{enough}\r\n").as_bytes());
    }

    #[test]
    fn malformed() {
        for raw in [&b"GET / HTTP/1.1\r\nbad header\r\n\r\n"[..], b"\x00\x01\x02 / HTTP/1.1\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n"] {
            assert!(parse(raw).is_err(), "{:?}", String::from_utf8_lossy(raw));
        }
        // httparse accepts it, http::Request does not: 400, not an error.
        assert_eq!(rejected(b"GET http://[::1 HTTP/1.1\r\n\r\n"), 400);
    }
}
