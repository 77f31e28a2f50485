//! Harness for tests that load peerd's kernel programs into the real kernel: throwaway cgroups,
//! network namespaces and the probe client. Everything created is removed on drop, also when a
//! test fails (drops run during unwinding).
use std::{
    fs::File,
    os::fd::AsRawFd,
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique, short name for this test process (interface names are limited to 15 bytes).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed))
}

/// These tests need root (CI runs as root); fail loudly rather than pass vacuously.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "bpf-tests must run as root");
}

pub fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("spawn {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A throwaway cgroup v2 directory (processes left in it killed, removed on drop): the same
/// helper the multi-node harness uses.
pub use xtask::cgroup::Cgroup;

/// A network namespace with loopback up; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Result<Self> {
        let name = unique("peerd-t-");
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `f` on a fresh thread that has entered this namespace, so sockets it creates (and
    /// interfaces it resolves) belong here. The caller's thread is unaffected.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter_netns(&self.name)?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))?
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Moves the calling thread into the named network namespace.
pub fn enter_netns(name: &str) -> Result<()> {
    let f = File::open(Path::new("/run/netns").join(name)).with_context(|| format!("open netns {name}"))?;
    // SAFETY: setns on an open namespace fd; affects only the calling thread for CLONE_NEWNET.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// What the agent's log would show: a `tracing` subscriber, scoped to the calling thread, whose
/// output is kept in memory (the kernel log reader thread inherits it from the thread that loads
/// the programs).
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Installs the subscriber with an `EnvFilter` directive (as in `RUST_LOG`) until the guard drops.
    pub fn install(&self, filter: &str) -> tracing::subscriber::DefaultGuard {
        let buf = self.0.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_ansi(false)
            .with_writer(move || CaptureWriter(buf.clone()))
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Waits (bounded) until `n` lines contain `needle`; returns the whole log.
    pub fn wait_for(&self, needle: &str, n: usize) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = self.text();
            if text.lines().filter(|l| l.contains(needle)).count() >= n {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!("{n} log lines with {needle:?} expected; the log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
