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
mod guest;
mod results;
mod cluster;
mod fuzz;
mod serve_bench;
mod transport_bench;
mod swarm_bench;
mod range_bench;
mod redirect_bench;
mod setup;
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
    /// Build, then run every test: unit tests and bpf-tests (needs root), then each fuzz target
    /// for a few seconds.
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build the agent's OCI image without Docker (release binary, umoci):
    /// target/peerd-image.tar, for `ctr images import` or `skopeo copy oci-archive:...`.
    Image,
    /// Runs one test binary again and again (flaky-test hunting): `cargo xtask repeat
    /// cluster_loopback --times 20 --busy`.
    Repeat {
        /// The test binary (a file of `peerd-agent/tests/`, without `.rs`), or `lib` for the
        /// agent's unit tests.
        test: String,
        #[arg(long, default_value_t = 20)]
        times: u32,
        /// Keep both cores busy with spin loops meanwhile (a loaded node).
        #[arg(long)]
        busy: bool,
        /// Extra arguments for the test binary (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Fuzz the parsers that read untrusted bytes (nightly; installs cargo-fuzz once).
    Fuzz {
        /// How long to fuzz each target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only libFuzzer's final statistics and crash reports, not its progress lines.
        #[arg(long)]
        quiet: bool,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
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
    /// (benchmark client of `bench range`) random or sequential range reads of a URL, each
    /// checked against a local file; prints JSON.
    #[command(hide = true)]
    RangeClient {
        #[arg(long)]
        url: String,
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value = "random")]
        mode: String,
        #[arg(long, default_value_t = 16)]
        readers: usize,
        #[arg(long, default_value_t = 20)]
        per_reader: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Build { release } => build(release).map(|_| ()),
        Cmd::Test { args } => test(&args),
        Cmd::Fuzz { seconds, quiet, targets } => fuzz::run(seconds, &targets, quiet),
        Cmd::Image => image().map(|_| ()),
        Cmd::Run { args } => run(&args),
        Cmd::Repeat { test, times, busy, args } => repeat(&test, times, busy, &args),
        Cmd::Bench { which } => bench::run(which),
        Cmd::Cluster { action } => cluster::run(action),
        Cmd::FetchSha256 { url } => swarm_bench::fetch_sha256(&url),
        Cmd::RangeClient { url, file, mode, readers, per_reader } => range_bench::client_main(&url, &file, &mode, readers, per_reader),
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

/// Installs a benchmark's missing tools (tool, Debian package) with apt-get, as the tests'
/// setup does (root; others are told the command to run).
pub fn require_tools(tools: &[(&str, &str)]) -> Result<()> {
    setup::install(tools, &[])
}

pub(crate) fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

fn test(args: &[String]) -> Result<()> {
    if !is_root() {
        bail!("the bpf-tests load programs into the kernel and create namespaces: run as root (CI does)");
    }
    // A fresh machine: system packages and the chart tools first.
    setup::system_packages()?;
    let tools = setup::chart_tools()?;
    let path = std::env::join_paths(std::iter::once(tools).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())))?;
    let obj = build(false)?;
    // The pod harness test (xtask/tests/pod.rs) runs the image made from the release binary.
    let archive = image()?;
    // Every test binary runs even when one fails; the failures are listed once at the end.
    let mut child = Command::new("cargo")
        .current_dir(root())
        .env("PEERD_EBPF_OBJECT", &obj)
        .env("PEERD_IMAGE_ARCHIVE", &archive)
        .env("PATH", path)
        .args(["test", "--workspace", "--exclude", "peerd-ebpf", "--no-fail-fast"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("spawn cargo test")?;
    let mut failed = Vec::new();
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            let line = line.context("reading cargo test's output")?;
            println!("{line}");
            if let Some(name) = line.strip_prefix("test ").and_then(|l| l.strip_suffix(" ... FAILED")) {
                failed.push(name.to_string());
            }
        }
    }
    let st = child.wait().context("waiting for cargo test")?;
    // Short: this keeps the fuzz targets building and their properties holding in CI; longer
    // runs are `cargo xtask fuzz`. A run narrowed to some tests (arguments) skips it.
    let fuzzed = if args.is_empty() { fuzz::run(FUZZ_SECONDS_IN_TEST, &[], true) } else { Ok(()) };
    if !st.success() || fuzzed.is_err() {
        eprintln!("\n=== summary: cargo test {st}; failed tests ({}):", failed.len());
        for f in &failed {
            eprintln!("  {f}");
        }
        if let Err(e) = &fuzzed {
            eprintln!("  fuzzing: {e:#}");
        }
        eprintln!("(cargo's own list of failed test binaries is above; rerun one with `cargo xtask repeat NAME`)");
        bail!("{} test(s) failed{}", failed.len(), if fuzzed.is_err() { ", fuzzing failed" } else { "" });
    }
    println!("=== summary: every test passed, fuzz targets held");
    Ok(())
}

/// `cargo xtask repeat`: builds once, then runs one test binary `times` times and counts.
fn repeat(test: &str, times: u32, busy: bool, args: &[String]) -> Result<()> {
    let obj = build(false)?;
    let cargo = |extra: &[&str]| {
        let mut c = Command::new("cargo");
        c.current_dir(root()).env("PEERD_EBPF_OBJECT", &obj).args(["test", "-p", "peerd-agent"]);
        if test == "lib" {
            c.arg("--lib");
        } else {
            c.args(["--test", test]);
        }
        c.args(extra);
        c
    };
    status(&mut cargo(&["--no-run"]))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let spinners: Vec<_> = (0..if busy { 2 } else { 0 })
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    let mut failures = Vec::new();
    for run in 1..=times {
        let started = std::time::Instant::now();
        let mut c = cargo(&["--"]);
        c.args(args);
        let out = c.output().context("run cargo test")?;
        let ok = out.status.success();
        println!("run {run}/{times}: {} in {:.1}s", if ok { "pass" } else { "FAIL" }, started.elapsed().as_secs_f64());
        if !ok {
            let text = String::from_utf8_lossy(&out.stdout);
            let failed: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED")).collect();
            println!("  failed: {failed:?}");
            let log = target_dir().join(format!("repeat-{test}-{run}.log"));
            let _ = std::fs::write(&log, [out.stdout.as_slice(), out.stderr.as_slice()].concat());
            println!("  output: {}", log.display());
            failures.push(run);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in spinners {
        let _ = s.join();
    }
    println!("{test}: {} of {times} runs passed{}", times - failures.len() as u32, if busy { " (both cores busy)" } else { "" });
    if !failures.is_empty() {
        bail!("runs {failures:?} failed");
    }
    Ok(())
}

/// Seconds per fuzz target in `cargo xtask test`.
const FUZZ_SECONDS_IN_TEST: u64 = 20;

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
    let bin = target_dir().join("debug/peerd");
    println!("The CLI: {} status (or put {} on PATH).\n", bin.display(), bin.parent().map_or(String::new(), |p| p.display().to_string()));
    // The agent replaces this process: a signal sent to this PID (Ctrl-C, SIGTERM from a
    // supervisor) reaches the agent itself, which then shuts down and frees its ports.
    use std::os::unix::process::CommandExt;
    let err = Command::new(&bin).arg("agent").arg("--data-dir").arg(&data).args(args).exec();
    Err(anyhow::anyhow!("exec {}: {err}", bin.display()))
}
