//! The shared real-component harness (xtask's `components`, also used by the benchmarks), plus
//! this crate's binary.
#![allow(dead_code, unused_imports)]

pub use xtask::components::*;

pub fn peerd() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_peerd"))
}
