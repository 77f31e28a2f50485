//! peerd's kernel programs. Built for `bpfel-unknown-none` by `cargo xtask build`; on the host this
//! crate compiles to an empty stub so `cargo test --workspace` still works.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

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
