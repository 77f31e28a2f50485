//! The mirror's request-head parser on arbitrary bytes: it never panics, never reports more bytes
//! than it was given or a head over the limit, decides on the head alone (not what follows it),
//! and says "a body follows" exactly when a header announces one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerd_http::head::{parse, Head, MAX_HEAD};

fuzz_target!(|buf: &[u8]| {
    match parse(buf) {
        Ok(None) => assert!(buf.len() < MAX_HEAD, "incomplete at {} bytes: must be rejected", buf.len()),
        Ok(Some((n, Head::Request(req, keep_alive, has_body)))) => {
            assert!(n <= buf.len() && n <= MAX_HEAD, "head of {n} bytes from {}", buf.len());
            // The head alone parses to the same request: the bytes after it (the next pipelined
            // request) took no part, and one byte less is incomplete.
            match parse(&buf[..n]) {
                Ok(Some((m, Head::Request(again, k, b)))) => {
                    assert_eq!((m, k, b), (n, keep_alive, has_body));
                    assert_eq!(again.method(), req.method());
                    assert_eq!(again.uri(), req.uri());
                    assert_eq!(again.headers(), req.headers());
                }
                other => panic!("the head alone gave {other:?}"),
            }
            assert!(matches!(parse(&buf[..n - 1]), Ok(None)), "a head one byte short is complete");
            let h = req.headers();
            let announced = h.contains_key("transfer-encoding") || h.get_all("content-length").iter().any(|v| v.as_bytes() != b"0");
            assert_eq!(has_body, announced);
        }
        Ok(Some((_, Head::Reject(status, code, _)))) => {
            assert!(matches!((status, code), (431, "TOO_LARGE") | (400, "BAD_REQUEST")), "{status} {code}");
        }
        Err(_) => {}
    }
});
