//! Gossip simulation benchmark: N agents in one process on a paused clock; prints Markdown.
//!
//! `cargo run --release -p peerd-sim --bin gossip-sim -- --nodes 1000 --blobs 2000`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use peerd_sim::gossip::{self as sim, SimOptions};

/// Counts live heap bytes so the report can state memory per node.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    #[arg(long, default_value_t = 2_000)]
    blobs: usize,
    /// Gossip interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Anti-entropy byte budget per node per second (0 = unlimited), as `--gossip-budget`.
    #[arg(long, default_value_t = 16_000)]
    budget: u64,
    /// Packet loss (0..1) for the lossy propagation run.
    #[arg(long, default_value_t = 0.05)]
    loss: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Simulated seconds to wait for convergence.
    #[arg(long, default_value_t = 300)]
    max_wait_s: u64,
    /// Skip the lossy propagation and partition phases (the scaling runs).
    #[arg(long)]
    quick: bool,
    /// Only time lookups in filters built directly (no chitchat; cheap at 5,000 nodes).
    #[arg(long)]
    lookup_only: bool,
    /// With --lookup-only: each node holds 0.5-1.5 x --blobs (filters of many sizes).
    #[arg(long)]
    vary: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.lookup_only {
        print!("{}", sim::lookup_bench(args.nodes, args.blobs, args.seed, args.vary));
        return std::process::ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("gossip-sim: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let opts = SimOptions {
        nodes: args.nodes.max(2),
        blobs: args.blobs,
        interval: Duration::from_millis(args.interval_ms),
        budget: args.budget,
        loss: args.loss,
        seed: args.seed,
        max_wait: Duration::from_secs(args.max_wait_s),
        quick: args.quick,
    };
    let report = runtime.block_on(sim::run(opts, || LIVE.load(Ordering::Relaxed)));
    print!("{report}");
    std::process::ExitCode::SUCCESS
}
