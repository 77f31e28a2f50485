//! Measures what the redirect programs add to connect() on loopback, side by side in one run:
//! no programs, programs attached but the destination not redirected (every other connection on a
//! node), and a redirected connection (rewrite + sock_ops bookkeeping); each with the kernel log
//! off (the default) and on (debug: one aya-log record per redirect decision, read by the agent's
//! reader thread and formatted by tracing, written nowhere). Prints a Markdown table.
//! Run by `cargo xtask bench connect` (root). `PEERD_BENCH_BASE_OBJECT=FILE` adds a row for
//! another build of the kernel programs (e.g. before a change), redirected, in the same rounds.
use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bpf_tests::{Cgroup, Netns};
use peerd_agent::bpf::{Kernel, KernelLog, LOG_TARGET};
use peerd_common::Counter;

const ROUNDS: usize = 10;
const PER_ROUND: usize = 2_000;
const WARMUP: usize = 1_000;

/// One way of connecting: the cgroup the process sits in and the destination.
struct Case {
    name: String,
    cgroup: usize,
    redirected: bool,
    samples: Vec<f64>,
}

fn main() -> Result<()> {
    bpf_tests::require_root();
    let base_object = match std::env::var_os("PEERD_BENCH_BASE_OBJECT") {
        Some(p) => Some((std::fs::read(&p).with_context(|| format!("read {p:?}"))?, p)),
        None => None,
    };
    // What the agent's log would receive with RUST_LOG=peerd_agent::bpf=debug, counted, not kept.
    let lines = Arc::new(AtomicU64::new(0));
    let counted = lines.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(format!("{LOG_TARGET}=debug")))
            .with_ansi(false)
            .with_writer(move || LineCounter(counted.clone()))
            .finish(),
    )?;

    let ns = Netns::new()?;
    // Sibling cgroups: one without programs (baseline), one per loaded set of programs. The
    // process hops between them, so the cases interleave in rounds and share the machine's noise.
    let n_cgroups = if base_object.is_some() { 4 } else { 3 };
    let cgroups: Vec<Cgroup> = (0..n_cgroups).map(|_| Cgroup::create("bpf")).collect();
    bpf_tests::enter_netns(&ns.name)?;

    let registry = listener("127.0.0.2:5000")?;
    let unlisted = listener("127.0.0.2:5001")?;
    let agent = listener("127.0.0.1:0")?;

    let mut kernels = vec![Kernel::load_with(KernelLog::Off)?, Kernel::load_with(KernelLog::Debug)?];
    if let Some((object, _)) = &base_object {
        kernels.push(Kernel::load_object(object, KernelLog::Off)?);
    }
    for (k, cg) in kernels.iter_mut().zip(&cgroups[1..]) {
        k.attach_cgroup(&cg.path)?;
        k.set_stale_after(Duration::from_secs(3600))?;
        k.heartbeat()?;
        k.set_redirect(registry, agent)?;
    }

    let case = |name: &str, cgroup, redirected| Case { name: name.into(), cgroup, redirected, samples: Vec::new() };
    let mut cases = vec![
        case("no programs attached", 0, true),
        case("attached, destination not redirected", 1, false),
        case("attached, redirected to the agent", 1, true),
        case("log on: attached, destination not redirected", 2, false),
        case("log on: attached, redirected to the agent", 2, true),
    ];
    if let Some((_, path)) = &base_object {
        println!("Base object (PEERD_BENCH_BASE_OBJECT): {}.", path.to_string_lossy());
        cases.push(case("base object: attached, redirected to the agent", 3, true));
    }

    let join = |cg: &Cgroup| std::fs::write(cg.path.join("cgroup.procs"), std::process::id().to_string());
    for cg in &cgroups[1..] {
        join(cg)?;
        sample(registry, WARMUP)?;
    }
    for _ in 0..ROUNDS {
        for c in cases.iter_mut() {
            join(&cgroups[c.cgroup])?;
            c.samples.extend(sample(if c.redirected { registry } else { unlisted }, PER_ROUND)?);
        }
    }
    let redirected_per_kernel = (WARMUP + ROUNDS * PER_ROUND) as u64;
    for k in &kernels {
        assert_eq!(k.counter(Counter::Redirected), redirected_per_kernel, "every registry connect was redirected");
    }

    // Leave the cgroups so they can be removed.
    if let Some(p) = cgroups[0].path.parent() {
        std::fs::write(p.join("cgroup.procs"), std::process::id().to_string())?;
    }
    drop(kernels);
    // The reader thread drains the ring buffer within its poll interval.
    std::thread::sleep(Duration::from_millis(500));
    let logged = lines.load(Ordering::Relaxed);

    let stats: Vec<(f64, f64)> = cases.iter_mut().map(|c| percentiles(&mut c.samples)).collect();
    let n = ROUNDS * PER_ROUND;
    println!("connect() on loopback, blocking, closed with RST; {n} connections per case, interleaved in {ROUNDS} rounds.");
    println!(
        "Log on: the programs loaded with aya-log at debug, a reader thread forwarding each record to a \
         tracing subscriber (`{LOG_TARGET}=debug`, formatted, written nowhere); it received {logged} of the \
         {redirected_per_kernel} redirect records (a full ring buffer drops records).\n"
    );
    println!("| case | median | p99 | median ratio | p99 ratio |");
    println!("|---|---|---|---|---|");
    for (c, s) in cases.iter().zip(&stats) {
        println!(
            "| {} | {:.1} us | {:.1} us | {:.2}x | {:.2}x |",
            c.name, s.0, s.1, s.0 / stats[0].0, s.1 / stats[0].1
        );
    }
    Ok(())
}

/// Counts the lines the subscriber writes.
struct LineCounter(Arc<AtomicU64>);

impl Write for LineCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.iter().filter(|&&b| b == b'\n').count() as u64;
        self.0.fetch_add(n, Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// (median, p99) in microseconds.
fn percentiles(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

/// A listener that accepts and drops connections on its own thread until the process exits.
fn listener(addr: &str) -> Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let local = l.local_addr()?;
    std::thread::spawn(move || {
        for s in l.incoming() {
            drop(s);
        }
    });
    Ok(local)
}

/// connect() latencies in microseconds.
fn sample(dst: SocketAddr, n: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let s = TcpStream::connect(dst)?;
        out.push(t.elapsed().as_secs_f64() * 1e6);
        // RST on close: no TIME_WAIT, so many connections do not exhaust ephemeral ports.
        set_linger_zero(&s);
    }
    Ok(out)
}

fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid socket fd and a properly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
