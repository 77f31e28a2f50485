//! peerd-agent's digest parser (store/digest.rs, compiled in here as it stands: it needs nothing
//! else of the agent) on arbitrary strings: only the canonical `sha256:<64 lowercase hex>` is
//! accepted, and it prints back to exactly the input, so one blob never has two names.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../peerd-agent/src/store/digest.rs"]
mod digest;

use digest::Digest;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let canonical = s.len() == 71
        && s.starts_with("sha256:")
        && s[7..].bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    match s.parse::<Digest>() {
        Ok(d) => {
            assert!(canonical, "accepted {s:?}");
            assert_eq!(d.to_string(), s);
            assert_eq!(d.hex(), &s[7..]);
            assert_eq!(Digest::from_sha256_bytes(*d.as_bytes()), d);
        }
        Err(e) => {
            assert!(!canonical, "rejected {s:?}: {e}");
            let _ = e.to_string();
        }
    }
    if let Some(bytes) = digest::parse_hex32(s) {
        assert_eq!(digest::to_hex(&bytes), s);
    }
});
