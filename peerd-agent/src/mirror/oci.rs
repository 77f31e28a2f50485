//! The OCI distribution pull API's paths and error format.
use crate::store::Digest;

/// What a `/v2/...` path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    Manifest { name: String, reference: Reference },
    Blob { name: String, digest: Digest },
    /// A blob or manifest named by a sha512 digest (OCI allows it): relayed to the registry as
    /// is, never cached (the store names and verifies content by sha256 only).
    Relay { name: String, kind: &'static str, reference: String },
}

/// `sha512:<128 lowercase hex>`.
fn sha512_digest(s: &str) -> bool {
    s.strip_prefix("sha512:").is_some_and(|h| h.len() == 128 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => write!(f, "{d}"),
        }
    }
}

/// A request the API rejects, with the spec's error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl Rejection {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

/// Parses a `/v2/` path. `None` means "not an OCI path" (the caller answers 404).
pub fn parse(path: &str) -> Option<Result<Route, Rejection>> {
    let rest = path.strip_prefix("/v2/")?;
    if rest.is_empty() {
        return Some(Ok(Route::Base));
    }
    // The name may contain slashes, so split at the last "/manifests/" or "/blobs/".
    let (name, kind, last) = if let Some(i) = rest.rfind("/manifests/") {
        (&rest[..i], "manifests", &rest[i + "/manifests/".len()..])
    } else if let Some(i) = rest.rfind("/blobs/") {
        (&rest[..i], "blobs", &rest[i + "/blobs/".len()..])
    } else {
        return Some(Err(Rejection::new(404, "UNSUPPORTED", format!("unsupported path {path}"))));
    };
    if !valid_name(name) {
        return Some(Err(Rejection::new(400, "NAME_INVALID", format!("invalid repository name {name:?}"))));
    }
    let name = name.to_string();
    if sha512_digest(last) {
        let kind = if kind == "blobs" { "blobs" } else { "manifests" };
        return Some(Ok(Route::Relay { name, kind, reference: last.to_string() }));
    }
    Some(match kind {
        "blobs" => match last.parse::<Digest>() {
            Ok(digest) => Ok(Route::Blob { name, digest }),
            Err(e) => Err(Rejection::new(400, "DIGEST_INVALID", e.to_string())),
        },
        _ => parse_reference(last).map(|reference| Route::Manifest { name, reference }),
    })
}

pub fn parse_reference(s: &str) -> Result<Reference, Rejection> {
    if s.contains(':') {
        return s
            .parse::<Digest>()
            .map(Reference::Digest)
            .map_err(|e| Rejection::new(400, "DIGEST_INVALID", e.to_string()));
    }
    // Tag grammar: [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(Reference::Tag(s.to_string()))
    } else {
        Err(Rejection::new(400, "MANIFEST_INVALID", format!("invalid tag {s:?}")))
    }
}

/// Repository name grammar of the distribution spec:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
/// Rejects path traversal (`..`, empty components) by construction.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.split('/').all(valid_component)
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-", followed by an alphanumeric.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// The spec's error body: `{"errors":[{"code":..., "message":..., "detail":...}]}`.
pub fn error_body(code: &str, message: &str) -> String {
    format!(
        "{{\"errors\":[{{\"code\":{},\"message\":{},\"detail\":null}}]}}",
        json_string(code),
        json_string(message)
    )
}

/// A JSON string literal.
pub(crate) fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn routes() {
        assert_eq!(parse("/v2/"), Some(Ok(Route::Base)));
        assert_eq!(parse("/healthz"), None);
        match parse(&format!("/v2/library/alpine/blobs/{D}")) {
            Some(Ok(Route::Blob { name, digest })) => {
                assert_eq!(name, "library/alpine");
                assert_eq!(digest.to_string(), D);
            }
            other => panic!("{other:?}"),
        }
        match parse("/v2/a/b/c/manifests/v1.2_x-y") {
            Some(Ok(Route::Manifest { name, reference: Reference::Tag(t) })) => {
                assert_eq!((name.as_str(), t.as_str()), ("a/b/c", "v1.2_x-y"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&format!("/v2/x/manifests/{D}")),
            Some(Ok(Route::Manifest { reference: Reference::Digest(_), .. }))
        ));
        // sha512 (allowed by OCI): relayed, not refused.
        let d512 = format!("sha512:{}", "ab".repeat(64));
        assert_eq!(parse(&format!("/v2/a/b/blobs/{d512}")), Some(Ok(Route::Relay { name: "a/b".into(), kind: "blobs", reference: d512.clone() })));
        assert_eq!(parse(&format!("/v2/a/manifests/{d512}")), Some(Ok(Route::Relay { name: "a".into(), kind: "manifests", reference: d512.clone() })));
        assert!(matches!(parse(&format!("/v2/a/blobs/sha512:{}", "AB".repeat(64))), Some(Err(_))), "uppercase hex");
        assert!(matches!(parse("/v2/a/blobs/sha512:abc"), Some(Err(_))), "short");
    }

    #[test]
    fn rejects_bad_input() {
        let code = |p: &str| match parse(p) {
            Some(Err(r)) => r.code,
            other => panic!("{p}: {other:?}"),
        };
        assert_eq!(code("/v2/x/blobs/sha256:abc"), "DIGEST_INVALID");
        assert_eq!(code("/v2/x/blobs/md5:d41d8cd98f00b204e9800998ecf8427e"), "DIGEST_INVALID");
        assert_eq!(code(&format!("/v2/../etc/blobs/{D}")), "NAME_INVALID");
        assert_eq!(code(&format!("/v2/a//b/blobs/{D}")), "NAME_INVALID");
        assert_eq!(code(&format!("/v2/UPPER/blobs/{D}")), "NAME_INVALID");
        assert_eq!(code("/v2/x/manifests/-bad"), "MANIFEST_INVALID");
        assert_eq!(code("/v2/x/manifests/sha256:zz"), "DIGEST_INVALID");
        assert_eq!(code("/v2/x/tags/list"), "UNSUPPORTED");
    }

    #[test]
    fn names() {
        for ok in ["a", "library/alpine", "a.b_c__d---e/f0", "0/1"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "a/", "/a", "a..b", "a___b", "-a", "a-", ".", "..", "a/../b", "a b", "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn error_json_escapes() {
        assert_eq!(
            error_body("BLOB_UNKNOWN", "a \"b\"\n"),
            r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"a \"b\"\u000a","detail":null}]}"#
        );
    }
}
