//! What a fresh Debian machine lacks for the tests, installed by `cargo xtask test` itself (so
//! the README's one command sets up and tests): system packages from apt, the chart tools
//! (deploy/install-tools.sh), rust-src and bpf-linker (`toolchain`).
use std::process::Command;

use anyhow::{bail, Context, Result};

use xtask::components::PACKAGES;

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        || ["/usr/sbin", "/sbin"].iter().any(|d| std::path::Path::new(d).join(tool).is_file())
}

/// Installs the missing packages the tests need with apt-get (root only; others get the
/// command to run).
pub fn system_packages() -> Result<()> {
    let mut extra = Vec::new();
    if !std::path::Path::new("/usr/include/stdio.h").exists() {
        extra.push("libc6-dev");
    }
    install(PACKAGES, &extra)
}

/// Installs the packages of `tools` (tool, Debian package) whose tool is not found, and `extra`.
pub fn install(tools: &[(&str, &str)], extra: &[&str]) -> Result<()> {
    let mut missing: Vec<&str> = tools.iter().filter(|(t, _)| !on_path(t)).map(|(_, p)| *p).collect();
    missing.extend_from_slice(extra);
    missing.sort();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !super::is_root() {
        bail!("missing packages: run `apt-get install {}` as root", missing.join(" "));
    }
    println!("setup: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let st = Command::new("apt-get").args(args).env("DEBIAN_FRONTEND", "noninteractive").status().context("running apt-get")?;
        if !st.success() {
            bail!("apt-get {} failed ({st})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    apt(&args)
}

/// helm, kubectl and kubernetes-validate for the chart tests (deploy/install-tools.sh, cached
/// under ~/.cache/peerd/bin); returns the directory to put first on PATH.
pub fn chart_tools() -> Result<std::path::PathBuf> {
    let st = Command::new("bash").arg(super::root().join("deploy/install-tools.sh")).stdout(std::process::Stdio::null()).status().context("running deploy/install-tools.sh")?;
    if !st.success() {
        bail!("deploy/install-tools.sh failed ({st})");
    }
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_else(|| "/root".into());
    Ok(home.join(".cache/peerd/bin"))
}
