//! `cargo xtask fuzz`: runs every cargo-fuzz target in `fuzz/` (peerd-http's parsers and the
//! store's digest parser) for a bounded time each, with AddressSanitizer and debug assertions
//! (so arithmetic overflow is a crash too). cargo-fuzz is installed once from crates.io into
//! ~/.cache/peerd, like bpf-linker; fuzzing needs the nightly toolchain.
//!
//! The corpus grows under target/fuzz/corpus (kept between local runs, not committed); the
//! committed seeds in fuzz/seeds start each target on well-formed input. A crash fails the run
//! and leaves its input under fuzz/artifacts/TARGET/.
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{root, status, target_dir};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every target, with the longest input worth trying: the head parser has to see inputs past
/// its 16 KiB limit.
const TARGETS: &[(&str, usize)] = &[("head", 20 << 10), ("range", 512), ("digest", 256)];

fn cache_dir() -> PathBuf {
    crate::toolchain::cache_dir()
}

/// Returns the directory holding `cargo-fuzz`, to put first on PATH.
fn ensure_cargo_fuzz() -> Result<PathBuf> {
    let prefix = cache_dir().join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = prefix.join("bin");
    if bin.join("cargo-fuzz").exists() {
        return Ok(bin);
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} into {} (once)", prefix.display());
    status(
        Command::new("cargo")
            .args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION])
            .arg("--root")
            .arg(&prefix)
            .env_remove("RUSTC")
            .env_remove("CARGO"),
    )
    .context("could not install cargo-fuzz (needs network access to crates.io)")?;
    Ok(bin)
}

/// Builds every target once, then fuzzes each for `seconds`; `only` limits it to those named.
/// `quiet` leaves out libFuzzer's progress lines (thousands per minute), keeping its final
/// statistics and any crash report.
pub fn run(seconds: u64, only: &[String], quiet: bool) -> Result<()> {
    let bin = ensure_cargo_fuzz()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))?;
    let fuzz_dir = root().join("fuzz");
    let out = target_dir().join("fuzz");
    let cargo_fuzz = |sub: &str| {
        let mut c = Command::new("cargo");
        c.current_dir(root())
            .env("PATH", &path)
            // The outer cargo's settings would pin the inner build to this (stable) toolchain.
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO")
            .args(["+nightly", "fuzz", sub, "--fuzz-dir"])
            .arg(&fuzz_dir)
            .args(["--debug-assertions", "--target-dir"])
            .arg(&out);
        c
    };
    let targets: Vec<_> = TARGETS.iter().filter(|(t, _)| only.is_empty() || only.iter().any(|o| o == t)).collect();
    if targets.is_empty() {
        anyhow::bail!("no fuzz target named {only:?}; there are {:?}", TARGETS.iter().map(|t| t.0).collect::<Vec<_>>());
    }
    status(&mut cargo_fuzz("build")).context("building the fuzz targets needs the nightly toolchain")?;
    for (target, max_len) in targets {
        let corpus = out.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        status(
            cargo_fuzz("run")
                .arg(target)
                .arg(&corpus)
                .arg(fuzz_dir.join("seeds").join(target))
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg(format!("-max_len={max_len}"))
                .arg("-print_final_stats=1")
                .arg(format!("-verbosity={}", u8::from(!quiet))),
        )
        .with_context(|| format!("fuzz target {target} failed: the input that crashed it is under fuzz/artifacts/{target}/"))?;
    }
    Ok(())
}
