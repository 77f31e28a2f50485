//! The piece protocol's frames (PROTOCOL.md, "Peer transfer"), encoded and decoded without I/O.
//!
//! One request per bidirectional QUIC stream: the client writes a request and finishes its side;
//! the server answers with a status byte and a body. On the bulk channel (`bulk`) the same
//! `Pieces` frames and answers travel length-prefixed on one TLS stream. All integers are
//! big-endian.
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::store::Digest;

pub const VERSION: u8 = 1;
/// At most this many pieces per request: a peer cannot make us read more than 8 MiB for it at
/// once (with 1 MiB pieces), and a slow piece delays only its own request.
pub const MAX_PIECES_PER_REQUEST: u32 = 8;
/// Largest request frame (a Fetch with credentials and a URL).
pub const MAX_REQUEST: usize = 16 << 10;
/// Largest manifest answer we accept.
pub const MAX_MANIFEST_PIECES: u32 = crate::store::MAX_PIECES;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The blob's size, piece size and piece hashes (complete blobs only).
    Manifest { digest: Digest },
    /// Pieces `first..first+count` of a complete blob, concatenated.
    Pieces { digest: Digest, first: u32, count: u32 },
    /// Ask the node that owns this digest (rendezvous) to get it from upstream, with the
    /// requesting client's credentials; answered when the blob is complete and verified.
    Fetch { digest: Digest, url: String, authorization: Option<String> },
    /// Which pieces the peer holds (verified) right now: answered with a bitfield.
    Have { digest: Digest },
    /// Ask a node to get one part of a blob from upstream (byte ranges, `Part`), with the
    /// requesting client's credentials; answered when this node holds that part's pieces.
    FetchPart { digest: Digest, part: Part, url: String, authorization: Option<String> },
    /// The manifest of a blob the peer holds complete and verified against its sha256 (never of
    /// a blob still arriving): the only piece hashes a range read trusts before this node has
    /// the whole blob to check (PROTOCOL.md, "Range reads").
    VerifiedManifest { digest: Digest },
}

/// Part `index` of `parts` of a blob cut in chunks of `chunk_pieces` pieces: the chunks `c` with
/// `c % parts == index`, so every part covers the blob's start as well as its end (a client
/// streaming the blob in order waits on all parts evenly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub index: u8,
    pub parts: u8,
    pub chunk_pieces: u32,
}

impl Part {
    /// The chunks of this part in a blob of `pieces` pieces, as piece ranges.
    pub fn chunks(self, pieces: u32) -> impl Iterator<Item = std::ops::Range<u32>> {
        let chunk = self.chunk_pieces.max(1);
        let step = usize::from(self.parts.max(1));
        (u32::from(self.index)..pieces.div_ceil(chunk)).step_by(step).map(move |c| c * chunk..((c + 1) * chunk).min(pieces))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    Busy = 2,
    BadRequest = 3,
    UpstreamFailed = 4,
}

impl Status {
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            0 => Status::Ok,
            1 => Status::NotFound,
            2 => Status::Busy,
            3 => Status::BadRequest,
            4 => Status::UpstreamFailed,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("unsupported protocol version {0}")]
    Version(u8),
    #[error("unknown request kind {0}")]
    Kind(u8),
    #[error("frame truncated")]
    Truncated,
    #[error("frame too large")]
    TooLarge,
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

fn need(b: &impl Buf, n: usize) -> Result<(), WireError> {
    if b.remaining() < n {
        Err(WireError::Truncated)
    } else {
        Ok(())
    }
}

fn get_hash(b: &mut impl Buf) -> Result<[u8; 32], WireError> {
    need(b, 32)?;
    let mut d = [0u8; 32];
    b.copy_to_slice(&mut d);
    Ok(d)
}

fn get_digest(b: &mut impl Buf) -> Result<Digest, WireError> {
    get_hash(b).map(Digest::from_sha256_bytes)
}

fn get_str(b: &mut impl Buf) -> Result<String, WireError> {
    need(b, 2)?;
    let n = b.get_u16() as usize;
    need(b, n)?;
    String::from_utf8(b.copy_to_bytes(n).to_vec()).map_err(|_| WireError::Invalid("not UTF-8"))
}

fn put_str(b: &mut BytesMut, s: &str) -> Result<(), WireError> {
    let n = u16::try_from(s.len()).map_err(|_| WireError::TooLarge)?;
    b.put_u16(n);
    b.put_slice(s.as_bytes());
    Ok(())
}

impl Request {
    pub fn encode(&self) -> Result<Bytes, WireError> {
        let mut b = BytesMut::with_capacity(64);
        b.put_u8(VERSION);
        match self {
            Request::Manifest { digest } => {
                b.put_u8(1);
                b.put_slice(digest.as_bytes());
            }
            Request::Pieces { digest, first, count } => {
                b.put_u8(2);
                b.put_slice(digest.as_bytes());
                b.put_u32(*first);
                b.put_u32(*count);
            }
            Request::Fetch { digest, url, authorization } => {
                b.put_u8(3);
                b.put_slice(digest.as_bytes());
                put_str(&mut b, url)?;
                put_str(&mut b, authorization.as_deref().unwrap_or(""))?;
            }
            Request::Have { digest } => {
                b.put_u8(4);
                b.put_slice(digest.as_bytes());
            }
            Request::FetchPart { digest, part, url, authorization } => {
                b.put_u8(5);
                b.put_slice(digest.as_bytes());
                b.put_u8(part.index);
                b.put_u8(part.parts);
                b.put_u32(part.chunk_pieces);
                put_str(&mut b, url)?;
                put_str(&mut b, authorization.as_deref().unwrap_or(""))?;
            }
            Request::VerifiedManifest { digest } => {
                b.put_u8(6);
                b.put_slice(digest.as_bytes());
            }
        }
        if b.len() > MAX_REQUEST {
            return Err(WireError::TooLarge);
        }
        Ok(b.freeze())
    }

    pub fn decode(mut b: &[u8]) -> Result<Self, WireError> {
        if b.len() > MAX_REQUEST {
            return Err(WireError::TooLarge);
        }
        need(&b, 2)?;
        let v = b.get_u8();
        if v != VERSION {
            return Err(WireError::Version(v));
        }
        let req = match b.get_u8() {
            1 => Request::Manifest { digest: get_digest(&mut b)? },
            2 => {
                let digest = get_digest(&mut b)?;
                need(&b, 8)?;
                let (first, count) = (b.get_u32(), b.get_u32());
                if count == 0 || count > MAX_PIECES_PER_REQUEST {
                    return Err(WireError::Invalid("piece count"));
                }
                Request::Pieces { digest, first, count }
            }
            3 => {
                let digest = get_digest(&mut b)?;
                let url = get_str(&mut b)?;
                let auth = get_str(&mut b)?;
                Request::Fetch { digest, url, authorization: (!auth.is_empty()).then_some(auth) }
            }
            4 => Request::Have { digest: get_digest(&mut b)? },
            5 => {
                let digest = get_digest(&mut b)?;
                need(&b, 6)?;
                let part = Part { index: b.get_u8(), parts: b.get_u8(), chunk_pieces: b.get_u32() };
                if part.parts == 0 || part.index >= part.parts || part.chunk_pieces == 0 {
                    return Err(WireError::Invalid("part"));
                }
                let url = get_str(&mut b)?;
                let auth = get_str(&mut b)?;
                Request::FetchPart { digest, part, url, authorization: (!auth.is_empty()).then_some(auth) }
            }
            6 => Request::VerifiedManifest { digest: get_digest(&mut b)? },
            k => return Err(WireError::Kind(k)),
        };
        if b.has_remaining() {
            return Err(WireError::Invalid("trailing bytes"));
        }
        Ok(req)
    }
}

/// A manifest answer: `size u64, piece_size u32, count u32, count x 32-byte blake3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireManifest {
    pub size: u64,
    pub piece_size: u32,
    pub pieces: Vec<[u8; 32]>,
}

/// A complete manifest as it goes on the wire (the store's has every hash).
impl From<&crate::store::Manifest> for WireManifest {
    fn from(m: &crate::store::Manifest) -> Self {
        WireManifest { size: m.size, piece_size: m.piece_size, pieces: m.pieces.iter().map(|h| *h.as_bytes()).collect() }
    }
}

impl WireManifest {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(17 + self.pieces.len() * 32);
        b.put_u8(Status::Ok as u8);
        b.put_u64(self.size);
        b.put_u32(self.piece_size);
        b.put_u32(self.pieces.len() as u32);
        for p in &self.pieces {
            b.put_slice(p);
        }
        b.freeze()
    }

    /// Decodes and checks consistency: the piece count must match size / piece size.
    pub fn decode(mut b: &[u8]) -> Result<Self, WireError> {
        need(&b, 16)?;
        let size = b.get_u64();
        let piece_size = b.get_u32();
        let count = b.get_u32();
        if piece_size == 0 || count > MAX_MANIFEST_PIECES {
            return Err(WireError::Invalid("piece size or count"));
        }
        if size.div_ceil(piece_size as u64) != count as u64 {
            return Err(WireError::Invalid("piece count does not match size"));
        }
        need(&b, count as usize * 32)?;
        let pieces = (0..count).map(|_| get_hash(&mut b)).collect::<Result<Vec<_>, _>>()?;
        if b.has_remaining() {
            return Err(WireError::Invalid("trailing bytes"));
        }
        Ok(Self { size, piece_size, pieces })
    }

    /// Length of piece `i`.
    pub fn piece_len(&self, i: u32) -> u64 {
        let start = i as u64 * self.piece_size as u64;
        (self.size - start).min(self.piece_size as u64)
    }
}

/// A Have answer: `count u32`, then `ceil(count / 8)` bytes, piece i in bit `7 - i % 8` of byte
/// `i / 8`.
pub fn encode_have(bits: &[bool]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + bits.len().div_ceil(8));
    b.put_u8(Status::Ok as u8);
    b.put_u32(bits.len() as u32);
    for chunk in bits.chunks(8) {
        let mut byte = 0u8;
        for (j, &bit) in chunk.iter().enumerate() {
            if bit {
                byte |= 0x80 >> j;
            }
        }
        b.put_u8(byte);
    }
    b.freeze()
}

pub fn decode_have(mut b: &[u8], expected: usize) -> Result<Vec<bool>, WireError> {
    need(&b, 4)?;
    let n = b.get_u32() as usize;
    if n != expected {
        return Err(WireError::Invalid("bitfield length"));
    }
    need(&b, n.div_ceil(8))?;
    Ok((0..n).map(|i| b[i / 8] & (0x80 >> (i % 8)) != 0).collect())
}

/// A status-only answer, with an optional message.
pub fn status_frame(s: Status, msg: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(3 + msg.len());
    b.put_u8(s as u8);
    let _ = put_str(&mut b, &msg[..msg.len().min(1024)]);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let d = Digest::from_sha256_bytes([7u8; 32]);
        for r in [
            Request::Manifest { digest: d },
            Request::Pieces { digest: d, first: 3, count: 8 },
            Request::VerifiedManifest { digest: d },
            Request::Fetch { digest: d, url: "http://r/v2/a/blobs/sha256:x".into(), authorization: Some("Bearer t".into()) },
            Request::Fetch { digest: d, url: "u".into(), authorization: None },
            Request::FetchPart { digest: d, part: Part { index: 2, parts: 3, chunk_pieces: 16 }, url: "u".into(), authorization: Some("Basic x".into()) },
            Request::Have { digest: d },
        ] {
            assert_eq!(Request::decode(&r.encode().unwrap()).unwrap(), r);
        }
        let m = WireManifest { size: 2_500_000, piece_size: 1 << 20, pieces: vec![[1; 32], [2; 32], [3; 32]] };
        let enc = m.encode();
        assert_eq!(enc[0], Status::Ok as u8);
        assert_eq!(WireManifest::decode(&enc[1..]).unwrap(), m);
        assert_eq!(m.piece_len(2), 2_500_000 - 2 * (1 << 20));
        let bits: Vec<bool> = (0..13).map(|i| i % 3 == 0).collect();
        let enc = encode_have(&bits);
        assert_eq!(decode_have(&enc[1..], 13).unwrap(), bits);
        assert!(decode_have(&enc[1..], 12).is_err());
    }

    #[test]
    fn rejects_bad_frames() {
        let d = Digest::from_sha256_bytes([0u8; 32]);
        let mut bad_version = Request::Manifest { digest: d }.encode().unwrap().to_vec();
        bad_version[0] = 9;
        assert_eq!(Request::decode(&bad_version), Err(WireError::Version(9)));
        assert_eq!(Request::decode(&[1, 77]), Err(WireError::Kind(77)));
        assert_eq!(Request::decode(&[1, 1, 0, 0]), Err(WireError::Truncated));
        let too_many = Request::Pieces { digest: d, first: 0, count: MAX_PIECES_PER_REQUEST + 1 }.encode().unwrap();
        assert_eq!(Request::decode(&too_many), Err(WireError::Invalid("piece count")));
        let m = WireManifest { size: 10, piece_size: 4, pieces: vec![[0; 32]; 2] }.encode();
        assert_eq!(WireManifest::decode(&m[1..]), Err(WireError::Invalid("piece count does not match size")));
        assert!(Request::decode(&vec![1u8; MAX_REQUEST + 1]).is_err());
        for part in [Part { index: 3, parts: 3, chunk_pieces: 1 }, Part { index: 0, parts: 0, chunk_pieces: 1 }, Part { index: 0, parts: 2, chunk_pieces: 0 }] {
            let f = Request::FetchPart { digest: d, part, url: "u".into(), authorization: None }.encode().unwrap();
            assert_eq!(Request::decode(&f), Err(WireError::Invalid("part")), "{part:?}");
        }
    }

    #[test]
    fn parts_cover_every_piece_once() {
        for (pieces, parts, chunk) in [(0u32, 3u8, 4u32), (1, 3, 4), (40, 3, 16), (256, 4, 16), (257, 8, 16), (10, 4, 1)] {
            let mut seen = vec![0u8; pieces as usize];
            for index in 0..parts {
                let p = Part { index, parts, chunk_pieces: chunk };
                for r in p.chunks(pieces) {
                    assert!(r.start % chunk == 0 && r.len() as u32 <= chunk && r.end <= pieces, "{r:?}");
                    r.for_each(|i| seen[i as usize] += 1);
                }
            }
            assert!(seen.iter().all(|n| *n == 1), "{pieces} pieces, {parts} parts of {chunk}: {seen:?}");
        }
        // Interleaved: part 1 of 4 in 16-piece chunks of a 256-piece blob.
        let p = Part { index: 1, parts: 4, chunk_pieces: 16 };
        assert_eq!(p.chunks(256).collect::<Vec<_>>(), vec![16..32, 80..96, 144..160, 208..224]);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Request::decode(&b);
            let _ = WireManifest::decode(&b);
        }
    }
}
