//! On-disk layout and the per-blob metadata file.
//!
//! ```text
//! <root>/blobs/sha256/<hex>.data   blob bytes at their natural offsets (piece i at i * piece_size)
//! <root>/blobs/sha256/<hex>.meta   size, piece size, state, blake3 of each present piece
//! <root>/tmp/                      upstream downloads in progress and metadata being replaced;
//!                                  everything here is garbage after a restart
//! ```
//!
//! The metadata file is the commit record: it is only ever replaced by write-temp, fsync, rename,
//! fsync-dir, and it only lists pieces whose data was fdatasync'ed before. A small text format
//! with a trailing blake3 checksum keeps it debuggable with `cat` and detects damage.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::digest::parse_hex32;
use super::Digest;

const MAGIC: &str = "peerd-store-meta v1";

/// Paths inside the store root.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub blobs: PathBuf,
    pub tmp: PathBuf,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Layout {
    pub(crate) fn new(root: &Path) -> Self {
        Layout { blobs: root.join("blobs").join("sha256"), tmp: root.join("tmp") }
    }

    pub(crate) fn data(&self, d: &Digest) -> PathBuf {
        self.blobs.join(format!("{}.data", d.hex()))
    }

    pub(crate) fn meta(&self, d: &Digest) -> PathBuf {
        self.blobs.join(format!("{}.meta", d.hex()))
    }

    /// A unique name in `tmp/` (pid + sequence, so concurrent stores in one process never clash).
    pub(crate) fn temp(&self, d: &Digest, what: &str) -> PathBuf {
        let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{}.{}.{}.{}", d.hex(), what, std::process::id(), n))
    }
}

/// What the metadata file records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub size: u64,
    pub piece_size: u32,
    /// Whole-blob sha256 verified: the blob may be served in full and its manifest handed out.
    pub complete: bool,
    /// blake3 of each present piece, `None` for pieces not (durably) present.
    pub pieces: Vec<Option<blake3::Hash>>,
}

pub(crate) fn piece_count(size: u64, piece_size: u32) -> usize {
    size.div_ceil(u64::from(piece_size)) as usize
}

impl Meta {
    pub(crate) fn encode(&self, d: &Digest) -> String {
        let mut s = format!(
            "{MAGIC}\ndigest {d}\nsize {}\npiece_size {}\nstate {}\n",
            self.size,
            self.piece_size,
            if self.complete { "complete" } else { "partial" }
        );
        for (i, h) in self.pieces.iter().enumerate() {
            if let Some(h) = h {
                s.push_str(&format!("piece {i} {}\n", h.to_hex()));
            }
        }
        let check = blake3::hash(s.as_bytes());
        s.push_str(&format!("check {}\n", check.to_hex()));
        s
    }

    /// Parses and validates; any inconsistency is an error (the caller then discards the blob).
    pub(crate) fn decode(d: &Digest, text: &str) -> Result<Meta, String> {
        let body_end = text.rfind("check ").ok_or("no checksum line")?;
        let (body, check) = text.split_at(body_end);
        let check = check.strip_prefix("check ").and_then(|c| c.strip_suffix('\n')).ok_or("bad checksum line")?;
        let want = parse_hex32(check).ok_or("bad checksum hex")?;
        if blake3::hash(body.as_bytes()) != blake3::Hash::from_bytes(want) {
            return Err("checksum mismatch".into());
        }
        let mut lines = body.lines();
        if lines.next() != Some(MAGIC) {
            return Err("bad magic".into());
        }
        let mut field = |name: &str| -> Result<String, String> {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
                .map(str::to_owned)
                .ok_or_else(|| format!("missing {name}"))
        };
        if field("digest")? != d.to_string() {
            return Err("digest does not match file name".into());
        }
        let size: u64 = field("size")?.parse().map_err(|_| "bad size")?;
        let piece_size: u32 = field("piece_size")?.parse().map_err(|_| "bad piece_size")?;
        if piece_size == 0 {
            return Err("zero piece size".into());
        }
        let complete = match field("state")?.as_str() {
            "complete" => true,
            "partial" => false,
            _ => return Err("bad state".into()),
        };
        let mut pieces = vec![None; piece_count(size, piece_size)];
        for line in lines {
            let mut it = line.split(' ');
            let (Some("piece"), Some(i), Some(h), None) = (it.next(), it.next(), it.next(), it.next()) else {
                return Err(format!("bad line {line:?}"));
            };
            let i: usize = i.parse().map_err(|_| "bad piece index")?;
            let h = parse_hex32(h).ok_or("bad piece hash")?;
            *pieces.get_mut(i).ok_or("piece index out of range")? = Some(blake3::Hash::from_bytes(h));
        }
        if complete && pieces.iter().any(Option::is_none) {
            return Err("complete blob with missing pieces".into());
        }
        Ok(Meta { size, piece_size, complete, pieces })
    }
}

/// fsync a directory so renames/creates/unlinks in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Atomically replaces the metadata of `d`: write temp, fsync, rename over, fsync the directory.
/// A crash leaves either the old or the new file (plus a temp file that `open` deletes).
pub(crate) fn write_meta(layout: &Layout, d: &Digest, meta: &Meta) -> io::Result<()> {
    let tmp = layout.temp(d, "meta");
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(meta.encode(d).as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, layout.meta(d))?;
        sync_dir(&layout.blobs)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Removes a blob's files. The metadata goes first (and durably), so a crash in between leaves
/// only an orphan data file, which `open` deletes.
pub(crate) fn remove_blob_files(layout: &Layout, d: &Digest) -> io::Result<()> {
    match fs::remove_file(layout.meta(d)) {
        Ok(()) => sync_dir(&layout.blobs)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    match fs::remove_file(layout.data(d)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_and_detects_damage() {
        let d = Digest::from_sha256_bytes([7; 32]);
        let m = Meta {
            size: 2_500_000,
            piece_size: 1 << 20,
            complete: false,
            pieces: vec![Some(blake3::hash(b"a")), None, Some(blake3::hash(b"c"))],
        };
        let text = m.encode(&d);
        assert_eq!(Meta::decode(&d, &text), Ok(m.clone()));
        let other = Digest::from_sha256_bytes([8; 32]);
        assert!(Meta::decode(&other, &text).is_err());
        assert!(Meta::decode(&d, &text.replace("size 2500000", "size 2500001")).is_err());
        assert!(Meta::decode(&d, &text[..text.len() - 3]).is_err());
        assert!(Meta::decode(&d, "").is_err());
    }
}
