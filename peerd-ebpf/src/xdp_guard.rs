//! XDP guard for the agent's UDP (QUIC/gossip) ports: per-source accounting and a CIDR allow-list.
//! Anything not addressed to a guarded UDP port passes untouched and uncounted.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::{map, xdp},
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruPerCpuHashMap},
    programs::XdpContext,
};
use peerd_common::{v4_mapped, Counter, PeerStats, MAX_ALLOWED_PREFIXES, MAX_PEERS};

use crate::counters;

#[map(name = "GUARDED_PORTS")]
static GUARDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(16, 0);

#[map(name = "ALLOWED")]
static ALLOWED: LpmTrie<[u32; 4], u8> = LpmTrie::with_max_entries(MAX_ALLOWED_PREFIXES, 0);

#[map(name = "PEER_STATS")]
static PEER_STATS: LruPerCpuHashMap<[u32; 4], PeerStats> =
    LruPerCpuHashMap::with_max_entries(MAX_PEERS, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_UDP: u8 = 17;
const IPV6_HLEN: usize = 40;

/// Returns a pointer to `T` at `offset` if it lies wholly inside the packet (the verifier needs
/// this explicit bounds check before every packet read).
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: bounds checked by ptr_at; unaligned read because packet data has no alignment.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

#[xdp]
pub fn peerd_xdp_guard(ctx: XdpContext) -> u32 {
    guard(&ctx).unwrap_or(XDP_PASS)
}

/// `None` means "not ours or not parseable": pass.
#[inline(always)]
fn guard(ctx: &XdpContext) -> Option<u32> {
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    let (src, udp_off) = match ethertype {
        ETH_P_IP => {
            let vihl: u8 = read(ctx, ETH_HLEN)?;
            let ihl = ((vihl & 0x0f) as usize) * 4;
            if ihl < 20 {
                return None;
            }
            if read::<u8>(ctx, ETH_HLEN + 9)? != IPPROTO_UDP {
                return None;
            }
            // Fragments after the first carry no UDP header; they pass (documented limit).
            let frag: u16 = u16::from_be(read(ctx, ETH_HLEN + 6)?);
            if frag & 0x1fff != 0 {
                return None;
            }
            (v4_mapped(read::<u32>(ctx, ETH_HLEN + 12)?), ETH_HLEN + ihl)
        }
        ETH_P_IPV6 => {
            // Only UDP directly after the fixed header; extension headers pass (documented limit).
            if read::<u8>(ctx, ETH_HLEN + 6)? != IPPROTO_UDP {
                return None;
            }
            (read::<[u32; 4]>(ctx, ETH_HLEN + 8)?, ETH_HLEN + IPV6_HLEN)
        }
        _ => return None,
    };
    let dport = u16::from_be(read::<u16>(ctx, udp_off + 2)?);
    // SAFETY: plain-data lookup.
    unsafe { GUARDED_PORTS.get(&dport) }?;

    let len = (ctx.data_end() - ctx.data()) as u64;
    let allowed = ALLOWED.get(&Key::new(128, src)).is_some();
    account(&src, allowed, len);
    // Logged like the counters (gated by AYA_LOG_LEVEL, see main.rs); passes are every QUIC
    // packet, so trace: debug shows only the drops.
    if allowed {
        counters::add(Counter::XdpPassed, 1);
        log_addr!(trace, ctx, "xdp_passed {:i} to port {} len {}", &src, dport, len);
        Some(XDP_PASS)
    } else {
        counters::add(Counter::XdpDropped, 1);
        log_addr!(debug, ctx, "xdp_dropped {:i} to port {} len {}", &src, dport, len);
        Some(XDP_DROP)
    }
}

#[inline(always)]
fn account(src: &[u32; 4], allowed: bool, len: u64) {
    let ptr = match PEER_STATS.get_ptr_mut(src) {
        Some(p) => p,
        None => {
            let _ = PEER_STATS.insert(src, &PeerStats::default(), 0);
            match PEER_STATS.get_ptr_mut(src) {
                Some(p) => p,
                None => return,
            }
        }
    };
    // SAFETY: per-CPU value of this CPU, from the map lookup.
    let s = unsafe { &mut *ptr };
    if allowed {
        s.passed_packets += 1;
        s.passed_bytes += len;
    } else {
        s.dropped_packets += 1;
        s.dropped_bytes += len;
    }
}
