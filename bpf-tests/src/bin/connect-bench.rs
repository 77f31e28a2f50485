//! Measures what the redirect programs add to connect() on loopback, side by side in one run:
//! no programs, programs attached but the destination not redirected (every other connection on a
//! node), and a redirected connection (rewrite + sock_ops bookkeeping). Prints a Markdown table.
//! Run by `cargo xtask bench connect` (root).
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Result;
use bpf_tests::{Netns, Cgroup};
use peerd_agent::bpf::Kernel;

const ROUNDS: usize = 10;
const PER_ROUND: usize = 2_000;
const WARMUP: usize = 1_000;

fn main() -> Result<()> {
    bpf_tests::require_root();
    let ns = Netns::new()?;
    // Two sibling cgroups: one without programs (baseline), one with them attached. The process
    // hops between them, so the cases interleave in rounds and share the machine's noise.
    let plain = Cgroup::create("bpf");
    let attached = Cgroup::create("bpf");
    bpf_tests::enter_netns(&ns.name)?;

    let registry = listener("127.0.0.2:5000")?;
    let unlisted = listener("127.0.0.2:5001")?;
    let agent = listener("127.0.0.1:0")?;

    let mut kernel = Kernel::load()?;
    kernel.attach_cgroup(&attached.path)?;
    kernel.set_stale_after(Duration::from_secs(3600))?;
    kernel.heartbeat()?;
    kernel.set_redirect(registry, agent)?;

    let join = |cg: &Cgroup| std::fs::write(cg.path.join("cgroup.procs"), std::process::id().to_string());
    join(&attached)?;
    sample(registry, WARMUP)?;
    let mut cases: [Vec<f64>; 3] = Default::default();
    for _ in 0..ROUNDS {
        join(&plain)?;
        cases[0].extend(sample(registry, PER_ROUND)?);
        join(&attached)?;
        cases[1].extend(sample(unlisted, PER_ROUND)?);
        cases[2].extend(sample(registry, PER_ROUND)?);
    }
    let redirected = kernel.counter(peerd_common::Counter::Redirected);
    assert_eq!(redirected, (WARMUP + ROUNDS * PER_ROUND) as u64, "every registry connect was redirected");

    // Leave the cgroups so they can be removed.
    if let Some(p) = plain.path.parent() {
        std::fs::write(p.join("cgroup.procs"), std::process::id().to_string())?;
    }
    drop(kernel);

    let stats: Vec<(f64, f64)> = cases.iter_mut().map(|c| percentiles(c)).collect();
    let n = ROUNDS * PER_ROUND;
    println!("connect() on loopback, blocking, closed with RST; {n} connections per case, interleaved in {ROUNDS} rounds.\n");
    println!("| case | median | p99 | median ratio | p99 ratio |");
    println!("|---|---|---|---|---|");
    for (name, s) in [
        "no programs attached",
        "attached, destination not redirected",
        "attached, redirected to the agent",
    ]
    .iter()
    .zip(&stats)
    {
        println!(
            "| {name} | {:.1} us | {:.1} us | {:.2}x | {:.2}x |",
            s.0, s.1, s.0 / stats[0].0, s.1 / stats[0].1
        );
    }
    Ok(())
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
