//! OCI content digest (`sha256:<64 lowercase hex>`), the store's only key.
//!
//! Only sha256 is accepted: it is what registries and containerd use for layers, and accepting a
//! second algorithm would mean a second way to name (and verify) the same bytes.

use std::fmt;
use std::str::FromStr;

/// Why a digest string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} does not start with \"sha256:\" (only sha256 is supported)")]
    Algorithm(String),
    #[error("digest {input:?} has {len} hex characters after \"sha256:\", expected 64")]
    Length { input: String, len: usize },
    #[error("digest {0:?} contains a character that is not lowercase hex")]
    NotLowerHex(String),
}

/// A sha256 content digest. Stored as raw bytes so it is `Copy` and cheap to hash and compare.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Wraps raw sha256 output (e.g. from a hasher that just checked the bytes).
    pub fn from_sha256_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    /// The raw 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex characters, used as the on-disk file name.
    pub fn hex(&self) -> String {
        to_hex(&self.0)
    }
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
    s
}

/// Parses exactly 64 lowercase hex characters (uppercase is rejected: digests are canonical
/// lowercase, and accepting both would give one blob two names).
pub(crate) fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| DigestError::Algorithm(s.to_owned()))?;
        if hex.len() != 64 {
            return Err(DigestError::Length { input: s.to_owned(), len: hex.len() });
        }
        parse_hex32(hex).map(Digest).ok_or_else(|| DigestError::NotLowerHex(s.to_owned()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_displays_round_trip() {
        let d: Digest = GOOD.parse().unwrap();
        assert_eq!(d.to_string(), GOOD);
        assert_eq!(d.hex(), &GOOD[7..]);
    }

    #[test]
    fn rejects_malformed() {
        let bad = [
            "",
            "sha256:",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha512:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8555",
            "sha256:g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            " sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n",
            "sha256:../../../../etc/passwd/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ];
        for s in bad {
            assert!(s.parse::<Digest>().is_err(), "accepted {s:?}");
        }
        assert!(matches!("md5:00".parse::<Digest>(), Err(DigestError::Algorithm(_))));
        assert!(matches!("sha256:00".parse::<Digest>(), Err(DigestError::Length { len: 2, .. })));
    }

    proptest! {
        #[test]
        fn any_bytes_round_trip(bytes in proptest::array::uniform32(any::<u8>())) {
            let d = Digest::from_sha256_bytes(bytes);
            prop_assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        }

        #[test]
        fn arbitrary_strings_never_panic(s in ".{0,80}") {
            if let Ok(d) = s.parse::<Digest>() {
                prop_assert_eq!(d.to_string(), s);
            }
        }
    }
}
