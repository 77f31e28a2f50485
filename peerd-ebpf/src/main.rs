//! peerd's kernel programs. Built for `bpfel-unknown-none` by `cargo xtask build`; on the host this
//! crate compiles to an empty stub so `cargo test --workspace` still works.
//!
//! Logging: each reason-coded decision (the `COUNTERS` it bumps) is also logged through aya-log,
//! at debug (per-packet and per-connection bookkeeping at trace). Every `debug!`/`trace!` first
//! compares its level with aya-log's `AYA_LOG_LEVEL`, a `.rodata` global the agent overrides at
//! load time (0, off, unless its log filter wants debug for `peerd_agent::bpf`). `.rodata` is
//! loaded as a frozen read-only map, so the verifier knows the value: it explores only the live
//! branch and removes the dead one, and with logging off connect() runs no log instructions at
//! all (the bpf-tests check the verified instruction count). With logging on, a record is one
//! ring-buffer reserve + copy + submit (`AYA_LOGS`, 128 KiB); a full buffer drops the record.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

/// An aya-log call whose first argument is an address held as map words (`[u32; 4]`, IPv4 as
/// IPv4-mapped), logged as IPv4 or IPv6. Two calls, not one `IpAddr`: the IPv4 variant of an enum
/// leaves bytes undefined that the record copy would read, and the verifier rejects reading an
/// uninitialised register.
#[cfg(target_arch = "bpf")]
macro_rules! log_addr {
    ($level:ident, $ctx:expr, $fmt:tt, $words:expr $(, $arg:expr)*) => {
        match peerd_common::v4_addr($words) {
            Some(ip) => aya_log_ebpf::$level!($ctx, $fmt, ip $(, $arg)*),
            None => aya_log_ebpf::$level!($ctx, $fmt, peerd_common::v6_addr($words) $(, $arg)*),
        }
    };
}

#[cfg(target_arch = "bpf")]
mod redirect;
#[cfg(target_arch = "bpf")]
mod xdp_guard;

#[cfg(target_arch = "bpf")]
mod counters {
    use aya_ebpf::{macros::map, maps::PerCpuArray};
    use peerd_common::Counter;

    #[map(name = "COUNTERS")]
    static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

    /// Per-CPU, so a plain add is race-free; the agent sums the CPUs.
    #[inline(always)]
    pub fn add(counter: Counter, n: u64) {
        if let Some(p) = COUNTERS.get_ptr_mut(counter as u32) {
            // SAFETY: the pointer comes from the map lookup and is valid for this CPU.
            unsafe { *p += n };
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never called.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
