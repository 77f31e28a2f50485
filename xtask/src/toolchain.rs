//! Installs, once, what building kernel programs needs: the nightly toolchain's rust-src (for
//! `-Z build-std=core`) and bpf-linker linked against the nightly toolchain's own libLLVM (the
//! linker's LLVM must match rustc's). The linker is cached under ~/.cache/peerd, outside the repo.
use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::status;

const BPF_LINKER_VERSION: &str = "0.13.0";

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("spawn {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("peerd")
}

/// Returns the directory holding `bpf-linker`, to put first on PATH.
pub fn ensure() -> Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context(
        "the nightly toolchain is required to build kernel programs: `rustup toolchain install nightly`",
    )?;
    let sysroot = PathBuf::from(sysroot);
    let src = sysroot.join("lib/rustlib/src/rust/library/core");
    if !src.exists() {
        eprintln!("xtask: installing rust-src for nightly");
        status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
            .context("could not install rust-src; run `rustup component add rust-src --toolchain nightly`")?;
    }

    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm_major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV printed no LLVM version")?
        .to_string();
    let lib = sysroot.join("lib");
    let so = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .find(|n| n.starts_with("libLLVM") && n.contains(".so"))
        .with_context(|| format!("no libLLVM shared library in {}: is the nightly toolchain complete?", lib.display()))?;

    // Keyed by the LLVM library name, so a toolchain update builds a fresh linker.
    let prefix = cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-{so}"));
    let bin = prefix.join("bin");
    if bin.join("bpf-linker").exists() {
        return Ok(bin);
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against {so} into {} (once)", prefix.display());
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for name in ["libLLVM.so", so.as_str()] {
        let link = plib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.join(&so), &link)?;
    }
    status(
        Command::new("cargo")
            .args(["+nightly", "install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", &format!("llvm-{llvm_major}")])
            .arg("--root")
            .arg(&prefix)
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTC")
            .env_remove("CARGO"),
    )
    .with_context(|| {
        format!(
            "could not build bpf-linker (needs network access to crates.io and a C toolchain); \
             build it by hand with LLVM_PREFIX={} cargo +nightly install bpf-linker --version {BPF_LINKER_VERSION} \
             --no-default-features --features llvm-{llvm_major} --root {}",
            prefix.display(),
            prefix.display()
        )
    })?;
    Ok(bin)
}
