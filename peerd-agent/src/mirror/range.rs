//! HTTP `Range: bytes=...` for one resource of known size (RFC 9110 §14).

/// What to send for a request's Range header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// 200 with the whole body (no Range, a multi-range request, or a unit we do not serve).
    Full,
    /// 206 with bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

/// Decides how to answer `header` for a resource of `size` bytes.
///
/// Multi-range requests are answered with the whole body (RFC 9110 lets a server ignore Range);
/// malformed or reversed ranges (`bytes=10-5`) and ranges starting past the end get 416, so a
/// client that asked for a part never receives something else by mistake.
pub fn answer(header: Option<&str>, size: u64) -> RangeAnswer {
    let Some(h) = header else { return RangeAnswer::Full };
    let Some(spec) = h.trim().strip_prefix("bytes=") else { return RangeAnswer::Full };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return RangeAnswer::Unsatisfiable };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    match (a.is_empty(), b.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match num(b) {
            Some(0) | None => RangeAnswer::Unsatisfiable,
            Some(_) if size == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial { start: size.saturating_sub(n), end: size - 1 },
        },
        // bytes=N-: from N to the end.
        (false, true) => match num(a) {
            Some(s) if s < size => RangeAnswer::Partial { start: s, end: size - 1 },
            _ => RangeAnswer::Unsatisfiable,
        },
        (false, false) => match (num(a), num(b)) {
            (Some(s), Some(e)) if s <= e && s < size => {
                RangeAnswer::Partial { start: s, end: e.min(size - 1) }
            }
            _ => RangeAnswer::Unsatisfiable,
        },
        (true, true) => RangeAnswer::Unsatisfiable,
    }
}

#[cfg(test)]
mod tests {
    use super::{answer, RangeAnswer::*};

    #[test]
    fn ranges() {
        assert_eq!(answer(None, 100), Full);
        assert_eq!(answer(Some("bytes=0-9"), 100), Partial { start: 0, end: 9 });
        assert_eq!(answer(Some("bytes=90-"), 100), Partial { start: 90, end: 99 });
        assert_eq!(answer(Some("bytes=-10"), 100), Partial { start: 90, end: 99 });
        assert_eq!(answer(Some("bytes=-1000"), 100), Partial { start: 0, end: 99 });
        // Huge end is clamped to the size.
        assert_eq!(answer(Some("bytes=50-18446744073709551615"), 100), Partial { start: 50, end: 99 });
        assert_eq!(answer(Some("bytes=10-5"), 100), Unsatisfiable);
        assert_eq!(answer(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(answer(Some("bytes=200-300"), 100), Unsatisfiable);
        assert_eq!(answer(Some("bytes=99999999999999999999999-"), 100), Unsatisfiable);
        assert_eq!(answer(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(answer(Some("bytes=a-b"), 100), Unsatisfiable);
        assert_eq!(answer(Some("bytes=-"), 100), Unsatisfiable);
        assert_eq!(answer(Some("bytes=0-1,5-6"), 100), Full);
        assert_eq!(answer(Some("items=0-1"), 100), Full);
        assert_eq!(answer(Some("bytes=0-0"), 0), Unsatisfiable);
    }
}
