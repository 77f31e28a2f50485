//! HTTP byte ranges (RFC 9110 §14): what to answer a request's `Range` for a resource of known
//! size, and upstream's `Content-Range`.
//!
//! Only [`answer`] decides how to serve a request: it also applies the method and `If-Range`,
//! which a bare Range parser cannot see, so there is no public way to honour a Range without
//! them.

use http::Method;

/// What to send for a request's Range header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// 200 with the whole body (no Range, a multi-range request, a unit we do not serve, a
    /// method without ranges, or an `If-Range` that does not match).
    Full,
    /// 206 with bytes `start..=end` (`start <= end < size`).
    Partial { start: u64, end: u64 },
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

/// Decides how to answer a request for a representation of `size` bytes whose strong entity tag
/// is `etag` (with its quotes, as sent in `ETag`), given the request's `Range` and `If-Range`
/// field values (`None` when absent).
///
/// - Only GET has ranges (RFC 9110 §14.2): HEAD and every other method get the whole
///   representation, so a HEAD's headers are those of the GET without Range.
/// - `If-Range` (§13.1.5) lets the Range through only if it is exactly our entity tag (strong
///   comparison: a weak tag never matches). A date never matches: we send no Last-Modified.
///   An `If-Range` that is not valid text is still present and so does not match either.
/// - The range unit is case-insensitive; another unit is ignored (200).
/// - Several ranges are answered with the whole body (a server may ignore Range, and one
///   200 costs less than a multipart body); empty list elements are skipped (§5.6.1).
/// - A malformed or reversed range (`bytes=10-5`) or one starting at or past the end gets 416,
///   so a client that asked for a part never receives something else by mistake. A last
///   position past the end, even one that overflows u64, is clamped to the last byte.
pub fn answer(method: &Method, range: Option<&[u8]>, if_range: Option<&[u8]>, etag: &str, size: u64) -> RangeAnswer {
    let Some(range) = range else { return RangeAnswer::Full };
    if method != Method::GET {
        return RangeAnswer::Full;
    }
    if let Some(v) = if_range {
        if !strong_match(v, etag.as_bytes()) {
            return RangeAnswer::Full;
        }
    }
    byte_range(range, size)
}

/// [`answer`] with the fields read from a request's headers. A field sent on several lines is
/// treated as their comma-separated combination (RFC 9110 §5.3): several Range lines are a
/// multi-range (200), several If-Range lines never match (200).
pub fn answer_headers(method: &Method, headers: &http::HeaderMap, etag: &str, size: u64) -> RangeAnswer {
    let combined = |name: http::header::HeaderName| -> Option<Vec<u8>> {
        let mut values = headers.get_all(name).iter();
        let mut out = values.next()?.as_bytes().to_vec();
        for v in values {
            out.extend_from_slice(b", ");
            out.extend_from_slice(v.as_bytes());
        }
        Some(out)
    };
    let range = combined(http::header::RANGE);
    let if_range = combined(http::header::IF_RANGE);
    answer(method, range.as_deref(), if_range.as_deref(), etag, size)
}

/// `If-Range: "tag"` against our entity tag: both strong (no `W/`) and byte for byte equal.
fn strong_match(if_range: &[u8], etag: &[u8]) -> bool {
    let v = if_range.trim_ascii();
    let is_strong_tag = |t: &[u8]| t.len() >= 2 && t[0] == b'"' && t[t.len() - 1] == b'"';
    is_strong_tag(v) && is_strong_tag(etag) && v == etag
}

/// The Range field for a GET whose preconditions hold (RFC 9110 §14.1.1, §14.2).
fn byte_range(field: &[u8], size: u64) -> RangeAnswer {
    let field = field.trim_ascii();
    // ranges-specifier = range-unit "=" range-set; anything else is not a Range we understand.
    let Some(eq) = field.iter().position(|&c| c == b'=') else { return RangeAnswer::Full };
    let (unit, set) = (&field[..eq], &field[eq + 1..]);
    if !unit.eq_ignore_ascii_case(b"bytes") {
        return RangeAnswer::Full;
    }
    let mut specs = set.split(|&c| c == b',').map(<[u8]>::trim_ascii).filter(|s| !s.is_empty());
    let Some(spec) = specs.next() else { return RangeAnswer::Unsatisfiable };
    if specs.next().is_some() {
        return RangeAnswer::Full;
    }
    match spec.iter().position(|&c| c == b'-') {
        // suffix-range = "-" suffix-length: the last N bytes.
        Some(0) => match digits(&spec[1..]) {
            None | Some(0) => RangeAnswer::Unsatisfiable,
            // Satisfiable but empty: the whole (empty) representation (§14.1.1).
            Some(_) if size == 0 => RangeAnswer::Full,
            Some(n) => RangeAnswer::Partial { start: size - n.min(size), end: size - 1 },
        },
        // int-range = first-pos "-" [ last-pos ]
        Some(dash) => {
            let (Some(first), last) = (digits(&spec[..dash]), &spec[dash + 1..]) else {
                return RangeAnswer::Unsatisfiable;
            };
            let last = if last.is_empty() { Some(u64::MAX) } else { digits(last) };
            match last {
                Some(last) if first <= last && first < size => RangeAnswer::Partial { start: first, end: last.min(size - 1) },
                _ => RangeAnswer::Unsatisfiable,
            }
        }
        None => RangeAnswer::Unsatisfiable,
    }
}

/// `1*DIGIT`, saturating at u64::MAX: a position that large is past any end (first) or means
/// "to the end" (last, suffix length), which is what its true value means too.
fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, &c| n.saturating_mul(10).saturating_add(u64::from(c - b'0'))))
}

/// `(first, last, size)` from a 206's `Content-Range: bytes first-last/size`. The numbers are not
/// checked against each other: the caller compares them with what it asked for.
pub fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let (range, size) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    Some((first.trim().parse().ok()?, last.trim().parse().ok()?, size.trim().parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::{answer, answer_headers, parse_content_range, RangeAnswer::*};
    use http::Method;

    const TAG: &str = "\"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"";

    fn get(range: &str, size: u64) -> super::RangeAnswer {
        answer(&Method::GET, Some(range.as_bytes()), None, TAG, size)
    }

    #[test]
    fn byte_ranges() {
        let p = |start, end| Partial { start, end };
        let cases = [
            // (Range, size, answer)
            ("bytes=0-9", 100, p(0, 9)),
            ("bytes=0-0", 100, p(0, 0)),
            ("bytes=99-99", 100, p(99, 99)),
            ("bytes=90-", 100, p(90, 99)),
            ("bytes=0-", 100, p(0, 99)),
            ("bytes=-10", 100, p(90, 99)),
            ("bytes=-100", 100, p(0, 99)),
            ("bytes=-1000", 100, p(0, 99)),
            // The unit is case-insensitive (§14.1).
            ("BYTES=0-0", 100, p(0, 0)),
            ("Bytes=5-", 100, p(5, 99)),
            // A last-pos past the end is clamped, however large (§14.1.2).
            ("bytes=50-150", 100, p(50, 99)),
            ("bytes=50-18446744073709551615", 100, p(50, 99)),
            ("bytes=50-18446744073709551616", 100, p(50, 99)),
            ("bytes=50-99999999999999999999999999", 100, p(50, 99)),
            ("bytes=-99999999999999999999999999", 100, p(0, 99)),
            ("bytes=00-007", 100, p(0, 7)),
            // OWS around list elements, and empty elements, are allowed (§5.6.1).
            ("bytes= 0-9 ", 100, p(0, 9)),
            ("bytes=0-9,", 100, p(0, 9)),
            ("bytes=, ,0-9", 100, p(0, 9)),
            // Reversed: invalid.
            ("bytes=10-5", 100, Unsatisfiable),
            // A first-pos at or past the end: not satisfiable.
            ("bytes=100-", 100, Unsatisfiable),
            ("bytes=100-200", 100, Unsatisfiable),
            ("bytes=200-300", 100, Unsatisfiable),
            ("bytes=99999999999999999999999-", 100, Unsatisfiable),
            ("bytes=99999999999999999999999-99999999999999999999999", 100, Unsatisfiable),
            // Zero suffix: not satisfiable.
            ("bytes=-0", 100, Unsatisfiable),
            // Malformed byte ranges.
            ("bytes=a-b", 100, Unsatisfiable),
            ("bytes=-", 100, Unsatisfiable),
            ("bytes=", 100, Unsatisfiable),
            ("bytes=,", 100, Unsatisfiable),
            ("bytes=5", 100, Unsatisfiable),
            ("bytes=+5-6", 100, Unsatisfiable),
            ("bytes=5-+6", 100, Unsatisfiable),
            ("bytes=0 - 9", 100, Unsatisfiable),
            ("bytes=1-2-3", 100, Unsatisfiable),
            ("bytes=--5", 100, Unsatisfiable),
            ("bytes=0x1-2", 100, Unsatisfiable),
            // Several ranges: the whole body.
            ("bytes=0-1,5-6", 100, Full),
            ("bytes=0-1, 200-300", 100, Full),
            ("bytes=0-1,x", 100, Full),
            // Another unit, or no ranges-specifier: ignored.
            ("items=0-1", 100, Full),
            ("bytes 0-1", 100, Full),
            ("bytes =0-1", 100, Full),
            ("", 100, Full),
            // An empty representation: only a non-zero suffix is satisfiable, and it is empty.
            ("bytes=0-0", 0, Unsatisfiable),
            ("bytes=0-", 0, Unsatisfiable),
            ("bytes=-1", 0, Full),
            ("bytes=-0", 0, Unsatisfiable),
            ("bytes=-1", 1, p(0, 0)),
            ("bytes=0-", u64::MAX, p(0, u64::MAX - 1)),
        ];
        for (range, size, want) in cases {
            assert_eq!(get(range, size), want, "Range: {range:?}, size {size}");
        }
    }

    #[test]
    fn methods_and_if_range() {
        let p09 = Partial { start: 0, end: 9 };
        let weak = format!("W/{TAG}");
        let cases: &[(Method, Option<&str>, Option<&str>, super::RangeAnswer)] = &[
            (Method::GET, None, None, Full),
            // If-Range without Range is ignored.
            (Method::GET, None, Some("\"other\""), Full),
            // Range is defined for GET only: HEAD (and anything else) gets the whole thing.
            (Method::HEAD, Some("bytes=0-9"), None, Full),
            (Method::HEAD, Some("bytes=500-"), None, Full),
            (Method::POST, Some("bytes=0-9"), None, Full),
            (Method::GET, Some("bytes=0-9"), Some(TAG), p09),
            (Method::GET, Some("bytes=0-9"), Some(&format!("  {TAG} ")), p09),
            // A matching If-Range does not make a bad range good.
            (Method::GET, Some("bytes=500-"), Some(TAG), Unsatisfiable),
            // A different tag, a weak one (strong comparison), a list, a date, garbage:
            // the Range is ignored, even an unsatisfiable one.
            (Method::GET, Some("bytes=0-9"), Some("\"sha256:0\""), Full),
            (Method::GET, Some("bytes=500-"), Some("\"sha256:0\""), Full),
            (Method::GET, Some("bytes=0-9"), Some(&weak), Full),
            (Method::GET, Some("bytes=0-9"), Some(&format!("{TAG}, {TAG}")), Full),
            (Method::GET, Some("bytes=0-9"), Some("Sun, 06 Nov 1994 08:49:37 GMT"), Full),
            (Method::GET, Some("bytes=0-9"), Some(&TAG[1..TAG.len() - 1]), Full),
            (Method::GET, Some("bytes=0-9"), Some("\""), Full),
            (Method::GET, Some("bytes=0-9"), Some(""), Full),
            (Method::GET, Some("bytes=0-9"), Some("*"), Full),
            (Method::HEAD, Some("bytes=0-9"), Some(TAG), Full),
        ];
        for (method, range, if_range, want) in cases {
            let got = answer(method, range.map(str::as_bytes), if_range.map(str::as_bytes), TAG, 100);
            assert_eq!(got, *want, "{method} Range {range:?} If-Range {if_range:?}");
        }
        // Our tag must itself be a strong one for anything to match.
        assert_eq!(answer(&Method::GET, Some(b"bytes=0-9"), Some(b"x"), "x", 100), Full);
        assert_eq!(answer(&Method::GET, Some(b"bytes=0-9"), Some(weak.as_bytes()), &weak, 100), Full);
        // Bytes that are not valid text: the Range is malformed, the If-Range does not match.
        assert_eq!(answer(&Method::GET, Some(b"bytes=0-\xff"), None, TAG, 100), Unsatisfiable);
        assert_eq!(answer(&Method::GET, Some(b"bytes=0-9"), Some(b"\"\xff\""), TAG, 100), Full);
    }

    #[test]
    fn from_headers() {
        use http::{header::HeaderValue, HeaderMap};
        let mut h = HeaderMap::new();
        assert_eq!(answer_headers(&Method::GET, &h, TAG, 100), Full);
        h.insert("range", HeaderValue::from_static("bytes=0-9"));
        assert_eq!(answer_headers(&Method::GET, &h, TAG, 100), Partial { start: 0, end: 9 });
        assert_eq!(answer_headers(&Method::HEAD, &h, TAG, 100), Full);
        h.insert("if-range", HeaderValue::from_str(TAG).unwrap());
        assert_eq!(answer_headers(&Method::GET, &h, TAG, 100), Partial { start: 0, end: 9 });
        h.append("if-range", HeaderValue::from_str(TAG).unwrap());
        assert_eq!(answer_headers(&Method::GET, &h, TAG, 100), Full);
        h.remove("if-range");
        h.append("range", HeaderValue::from_static("bytes=20-29"));
        assert_eq!(answer_headers(&Method::GET, &h, TAG, 100), Full);
        // Not visible ASCII, still a header value: an If-Range that matches nothing.
        let mut h = HeaderMap::new();
        h.insert("range", HeaderValue::from_static("bytes=0-9"));
        h.insert("if-range", HeaderValue::from_bytes(b"\"\xe9\"").unwrap());
        assert_eq!(answer_headers(&Method::GET, &h, TAG, 100), Full);
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("bytes 0-16777215/268435456"), Some((0, 16777215, 268435456)));
        assert_eq!(parse_content_range("bytes 5-9/10"), Some((5, 9, 10)));
        for bad in ["bytes */10", "bytes 0-9/*", "items 0-9/10", "bytes 0-9", ""] {
            assert_eq!(parse_content_range(bad), None, "{bad}");
        }
    }
}
