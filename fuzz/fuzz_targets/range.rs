//! Range / If-Range decisions with arbitrary fields, sizes, methods and entity tags.
//!
//! Input: a flags byte, up to 8 size bytes, then the Range value, and after the first `\n` the
//! If-Range value (absent without one). A partial answer lies inside the representation, only a
//! GET is ever answered in part, a non-matching If-Range always gets the whole body, a matching
//! one changes nothing, and the HeaderMap entry point agrees with the plain one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerd_http::{
    http::{HeaderMap, HeaderValue, Method},
    parse_content_range,
    range::{answer, answer_headers, RangeAnswer},
};

const TAG: &str = "\"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"";

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let (raw_size, rest) = rest.split_at(rest.len().min(8));
    let mut size = [0u8; 8];
    size[..raw_size.len()].copy_from_slice(raw_size);
    let size = u64::from_le_bytes(size);
    // Small sizes and the edges are where the arithmetic could go wrong.
    let size = match flags >> 6 {
        0 => size,
        1 => size % 1024,
        2 => size % 2,
        _ => u64::MAX - size % 2,
    };
    let method = match flags & 3 {
        0 | 1 => Method::GET,
        2 => Method::HEAD,
        _ => Method::POST,
    };
    let (range, if_range) = match rest.iter().position(|&c| c == b'\n') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    // Sometimes the If-Range is our tag (or our "tag" is whatever the client sent).
    let etag = match (flags >> 2) & 3 {
        1 => if_range.and_then(|v| std::str::from_utf8(v).ok()).map_or(TAG.to_string(), |s| s.trim().to_string()),
        2 => String::from_utf8_lossy(range).into_owned(),
        _ => TAG.to_string(),
    };

    let got = answer(&method, Some(range), if_range, &etag, size);
    if let RangeAnswer::Partial { start, end } = got {
        assert!(start <= end && end < size, "{start}-{end} of {size}");
        assert_eq!(method, Method::GET, "only GET has ranges");
    }
    if method != Method::GET {
        assert_eq!(got, RangeAnswer::Full);
    }
    assert_eq!(answer(&method, None, if_range, &etag, size), RangeAnswer::Full, "no Range, no part");
    let strong = |t: &[u8]| t.len() >= 2 && t.first() == Some(&b'"') && t.last() == Some(&b'"');
    if let Some(v) = if_range {
        let v = v.trim_ascii();
        if v != etag.as_bytes() || !strong(v) {
            assert_eq!(got, RangeAnswer::Full, "If-Range {v:?} does not match {etag:?}");
        }
    }
    if strong(etag.as_bytes()) {
        let plain = answer(&method, Some(range), None, &etag, size);
        assert_eq!(answer(&method, Some(range), Some(etag.as_bytes()), &etag, size), plain, "a matching If-Range changes nothing");
    }
    if let (Ok(r), Some(Ok(i))) = (HeaderValue::from_bytes(range), if_range.map(HeaderValue::from_bytes)) {
        let mut h = HeaderMap::new();
        h.insert("range", r);
        h.insert("if-range", i);
        assert_eq!(answer_headers(&method, &h, &etag, size), got);
    }

    if let Ok(s) = std::str::from_utf8(range) {
        let _ = parse_content_range(s);
    }
});
