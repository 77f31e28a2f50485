//! `cargo xtask`: builds the kernel programs and the agent, runs the tests, runs the agent and the
//! benchmarks. Installs what a fresh machine lacks (rust-src for nightly, bpf-linker) into a cache
//! outside the repository, so the second run is quick.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod cluster;
mod serve_bench;
mod swarm_bench;
mod redirect_bench;
mod toolchain;

#[derive(Parser)]
#[command(about = "peerd development tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kernel programs (bpfel-unknown-none) and the agent with them embedded.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run every test: unit tests and bpf-tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the agent's OCI image without Docker (release binary, umoci):
    /// target/peerd-image.tar, for `ctr images import` or `skopeo copy oci-archive:...`.
    Image,
    /// Build and run one agent with defaults (one node, data under ./.peerd).
    Run {
        /// Extra arguments for `peerd agent`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// A multi-node cluster in network namespaces on this machine (root).
    Cluster {
        #[command(subcommand)]
        action: cluster::Action,
    },
    /// Benchmarks; results go to bench/RESULTS.md.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// (benchmark client) GETs a URL and prints the body's sha256: one process reading the
    /// socket and hashing as bytes arrive, so the client costs the benchmark little CPU.
    #[command(hide = true)]
    FetchSha256 { url: String },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Build { release } => build(release).map(|_| ()),
        Cmd::Test { args } => test(&args),
        Cmd::Image => image().map(|_| ()),
        Cmd::Run { args } => run(&args),
        Cmd::Bench { which } => bench::run(which),
        Cmd::Cluster { action } => cluster::run(action),
        Cmd::FetchSha256 { url } => swarm_bench::fetch_sha256(&url),
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

/// Runs a command, failing with its name if it fails.
pub fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("spawn {shown}"))?;
    if !st.success() {
        bail!("{shown} failed: {st}");
    }
    Ok(())
}

/// Builds the kernel object; returns its path.
pub fn build_ebpf() -> Result<PathBuf> {
    let linker_dir = toolchain::ensure()?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![linker_dir];
    paths.extend(std::env::split_paths(&path));
    status(
        Command::new("cargo")
            .current_dir(root().join("peerd-ebpf"))
            .env("PATH", std::env::join_paths(paths)?)
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO")
            .args(["+nightly", "build", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .arg("--target-dir")
            .arg(target_dir()),
    )?;
    Ok(target_dir().join("bpfel-unknown-none/release/peerd"))
}

/// Builds kernel programs and the agent; returns the kernel object path.
pub fn build(release: bool) -> Result<PathBuf> {
    let obj = build_ebpf()?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root()).env("PEERD_EBPF_OBJECT", &obj).args(["build", "-p", "peerd-agent"]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)?;
    Ok(obj)
}

/// Fails with an install hint when a benchmark's tool is missing.
pub fn require_tool(tool: &str) -> Result<()> {
    let found = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    if !found {
        bail!("{tool} is not installed (apt-get install aria2 mktorrent opentracker)");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn test(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the bpf-tests load programs into the kernel and create namespaces: run as root (CI does)");
    }
    let obj = build(false)?;
    // The pod harness test (xtask/tests/pod.rs) runs the image made from the release binary.
    let archive = image()?;
    status(
        Command::new("cargo")
            .current_dir(root())
            .env("PEERD_EBPF_OBJECT", &obj)
            .env("PEERD_IMAGE_ARCHIVE", &archive)
            .args(["test", "--workspace", "--exclude", "peerd-ebpf"])
            .args(args),
    )
}

/// `cargo xtask image`: the release build, then its image; returns the archive's path.
fn image() -> Result<PathBuf> {
    build(true)?;
    let bin = target_dir().join("release/peerd");
    let built = xtask::image::build_agent(&bin, &target_dir()).context("build the agent's image")?;
    println!(
        "image {} ({} files) in {}\n  root filesystem: {}\n  import: ctr images import {}\n  push:   skopeo copy oci-archive:{} docker://REGISTRY/peerd:{}",
        built.reference,
        built.paths.len(),
        built.archive.display(),
        built.rootfs.display(),
        built.archive.display(),
        built.archive.display(),
        xtask::image::version()
    );
    Ok(built.archive)
}

fn run(args: &[String]) -> Result<()> {
    build(false)?;
    let data = root().join(".peerd");
    println!(
        "peerd: one node, data under {}, mirror on http://127.0.0.1:30000 (change with -- --mirror-addr ADDR).\n\
         Point containerd at it, per registry, e.g. /etc/containerd/certs.d/docker.io/hosts.toml:\n\n\
         \x20 server = \"https://registry-1.docker.io\"\n\
         \x20 [host.\"http://127.0.0.1:30000\"]\n\
         \x20   capabilities = [\"pull\", \"resolve\"]\n\n\
         or try it by hand: curl http://127.0.0.1:30000/v2/library/alpine/manifests/latest?ns=docker.io\n\
         Other registries: -- --registry NAME=URL. No containerd configuration at all (as root): -- --transparent.\n\
         Stop with Ctrl-C.\n",
        data.display()
    );
    status(
        Command::new(target_dir().join("debug/peerd"))
            .arg("agent")
            .arg("--data-dir")
            .arg(&data)
            .args(args),
    )
}
