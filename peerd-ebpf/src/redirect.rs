//! Transparent redirect: cgroup connect4/connect6 rewrite registry destinations to the local agent;
//! sock_ops remembers each redirected connection's original destination for the agent.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use peerd_common::{
    Config, Counter, Endpoint, BYPASS_REGISTER, MAX_EXEMPT, MAX_REDIRECTS, MAX_TRACKED_CONNECTIONS,
};

use aya_log_ebpf::debug;

use crate::counters;

/// Logs a connect() decision at debug: the reason (a counter's name, so logs and metrics read
/// alike), the original destination and the calling process. Gated by `AYA_LOG_LEVEL` (main.rs).
macro_rules! decision {
    ($ctx:expr, $fmt:tt, $orig:expr) => {
        log_addr!(debug, $ctx, $fmt, &$orig.ip, $orig.port_host(), current_tgid())
    };
}

/// The calling process as the kernel's root PID namespace numbers it.
#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;
/// A cgroup sock_addr program must return 1 to let connect() proceed.
const ALLOW: i32 = 1;

#[map(name = "REDIRECTS")]
static REDIRECTS: HashMap<Endpoint, Endpoint> = HashMap::with_max_entries(MAX_REDIRECTS, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "BYPASS")]
static BYPASS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(4096, 0);

#[map(name = "EXEMPT")]
static EXEMPT: HashMap<u32, u8> = HashMap::with_max_entries(MAX_EXEMPT, 0);

#[map(name = "PENDING")]
static PENDING: LruHashMap<u64, Endpoint> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

#[map(name = "ORIG_DST")]
static ORIG_DST: LruHashMap<Endpoint, Endpoint> =
    LruHashMap::with_max_entries(MAX_TRACKED_CONNECTIONS, 0);

/// Decides whether `orig` is redirected; returns the agent endpoint to rewrite to.
#[inline(always)]
fn decide(ctx: &SockAddrContext, orig: &Endpoint) -> Option<Endpoint> {
    // SAFETY: HashMap::get may alias a concurrently replaced value; Endpoint is plain data and a
    // torn read only sends one connect() to a stale agent address, which the agent refuses.
    let target = unsafe { REDIRECTS.get(orig) }?;
    let target = *target;

    let cfg = CONFIG.get(0)?;
    // Only the agent's network namespace: elsewhere 127.0.0.1 is somebody else's loopback.
    if cfg.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != cfg.netns_cookie {
        counters::add(Counter::OtherNetns, 1);
        decision!(ctx, "other_netns {:i}:{} pid {}", orig);
        return None;
    }

    // The agent's own connections (all its threads: the tgid is the process) go untouched.
    let tgid = current_tgid();
    if unsafe { EXEMPT.get(&tgid) }.is_some() {
        counters::add(Counter::Exempt, 1);
        decision!(ctx, "exempt {:i}:{} pid {}", orig);
        return None;
    }

    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(v) = unsafe { BYPASS.get(&cookie) } {
        if *v == BYPASS_REGISTER {
            // Registration: the agent cannot name its root-namespace PID, the kernel can.
            let _ = EXEMPT.insert(&tgid, &1, 0);
            debug!(ctx, "exempt_registered pid {}", tgid);
        }
        counters::add(Counter::Bypassed, 1);
        decision!(ctx, "bypassed {:i}:{} pid {}", orig);
        return None;
    }

    // Fail open unless the agent has proven it is alive within the bound.
    let now = unsafe { bpf_ktime_get_ns() };
    if cfg.heartbeat_ns == 0 || now.saturating_sub(cfg.heartbeat_ns) > cfg.stale_after_ns {
        counters::add(Counter::FailOpen, 1);
        decision!(ctx, "fail_open {:i}:{} pid {}", orig);
        return None;
    }

    // Remembered until the SYN, when sock_ops knows the local port and files it under that.
    if PENDING.insert(&cookie, orig, 0).is_err() {
        counters::add(Counter::OrigDstMissing, 1);
        decision!(ctx, "orig_dst_missing {:i}:{} pid {}", orig);
    }
    counters::add(Counter::Redirected, 1);
    log_addr!(debug, ctx, "redirected {:i}:{} pid {} to port {}", &orig.ip, orig.port_host(), tgid, target.port_host());
    Some(target)
}

#[cgroup_sock_addr(connect4)]
pub fn peerd_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context pointer is provided by the kernel; only readable/writable fields of
    // bpf_sock_addr for connect4 are touched (type_, user_ip4, user_port).
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let orig = Endpoint::v4(sa.user_ip4, sa.user_port as u16);
    if let Some(target) = decide(&ctx, &orig) {
        if !target.is_v4() {
            counters::add(Counter::FamilyMismatch, 1);
            decision!(ctx, "family_mismatch {:i}:{} pid {}", orig);
            return ALLOW;
        }
        sa.user_ip4 = target.ip[3];
        sa.user_port = target.port as u32;
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn peerd_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4; user_ip6 must be accessed one 4-byte word at a time.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let orig = Endpoint::v6(
        [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]],
        sa.user_port as u16,
    );
    if let Some(target) = decide(&ctx, &orig) {
        // An IPv4 target is written IPv4-mapped: a dual-stack socket reaches it.
        sa.user_ip6[0] = target.ip[0];
        sa.user_ip6[1] = target.ip[1];
        sa.user_ip6[2] = target.ip[2];
        sa.user_ip6[3] = target.ip[3];
        sa.user_port = target.port as u32;
    }
    ALLOW
}

/// The client's local endpoint, the key the agent computes from its accepted socket's peer address.
#[inline(always)]
fn local_endpoint(ctx: &SockOpsContext) -> Endpoint {
    // local_port is host byte order in bpf_sock_ops; Endpoint stores network order.
    let port = (ctx.local_port() as u16).to_be();
    if ctx.family() == AF_INET {
        Endpoint::v4(ctx.local_ip4(), port)
    } else {
        // Each word is read separately: the verifier rejects a load through a ctx pointer that
        // was offset first, which is what copying the array would compile to.
        // SAFETY: reads of the documented, readable local_ip6 words of the kernel's context.
        let ip = unsafe {
            let ops = ctx.ops;
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ]
        };
        Endpoint::v6(ip, port)
    }
}

#[sock_ops]
pub fn peerd_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let Some(orig) = (unsafe { PENDING.get(&cookie) }) else {
                return 1;
            };
            let orig = *orig;
            let _ = PENDING.remove(&cookie);
            let key = local_endpoint(&ctx);
            if ORIG_DST.insert(&key, &orig, 0).is_ok() {
                counters::add(Counter::OrigDstRecorded, 1);
                log_addr!(trace, &ctx, "orig_dst_recorded {:i}:{} from local port {}", &orig.ip, orig.port_host(), key.port_host());
                // Ask for state callbacks on this socket only, to delete the entry on close.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            } else {
                counters::add(Counter::OrigDstMissing, 1);
                log_addr!(debug, &ctx, "orig_dst_missing {:i}:{} at SYN", &orig.ip, orig.port_host());
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                let key = local_endpoint(&ctx);
                if ORIG_DST.remove(&key).is_ok() {
                    counters::add(Counter::OrigDstClosed, 1);
                    aya_log_ebpf::trace!(&ctx, "orig_dst_closed local port {}", key.port_host());
                }
            }
        }
        _ => {}
    }
    1
}
