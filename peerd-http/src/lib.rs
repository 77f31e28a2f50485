//! The parsers of the mirror's HTTP server that read untrusted bytes: request heads
//! ([`head`]) and byte ranges ([`range`]).
//!
//! They live apart from `peerd-agent` so that they can be fuzzed (`fuzz/`, with sanitizers) without
//! building tokio, TLS and the rest of the agent, and so that they stay pure: bytes in, a decision
//! out, no I/O.
#![forbid(unsafe_code)]

/// The `http` crate these types come from, for callers (the fuzz targets) that have no other need of it.
pub use http;

pub mod head;
pub mod range;

pub use head::{parse as parse_head, Head, HeadError, MAX_HEAD, MAX_HEADERS};
pub use range::{parse_content_range, RangeAnswer};
