use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_SOCK_OPS_TCP_CONNECT_CB, sk_action},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, RingBuf, SockMap, lpm_trie::Key},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use palisade_ebpf_common::*;

/// Capacity of the policy tables; doubled because they hold two banks (the generation in force
/// and the one before it, which ztunnel turns into the next).
const MAX_WORKLOAD_PREFIXES: u32 = 2 * 65_536;
const MAX_POLICY_CELLS: u32 = 2 * 524_288;
const MAX_INFLIGHT: u32 = 65_536;

const SOCK_STREAM: u32 = 1;

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static IDENTITIES: LpmTrie<IpKey, IdentityValue> = LpmTrie::with_max_entries(MAX_WORKLOAD_PREFIXES, BPF_F_NO_PREALLOC);
#[map]
static POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::with_max_entries(MAX_POLICY_CELLS, BPF_F_NO_PREALLOC);
#[map]
static PODS: HashMap<u64, PodValue> = HashMap::with_max_entries(MAX_PODS, 0);
#[map]
static INBOUND_ADDRS: HashMap<Addr, u32> = HashMap::with_max_entries(MAX_PODS * MAX_ADDRS_PER_POD, 0);
#[map]
static INBOUND_SOCKETS: SockMap = SockMap::with_max_entries(MAX_PODS, 0);
#[map]
static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(MAX_INFLIGHT, 0);
#[map]
static ORIG_DST: LruHashMap<SockKey, OrigDst> = LruHashMap::with_max_entries(MAX_INFLIGHT, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Reads a context field with a constant offset. The verifier rejects context accesses
/// through computed pointers, which LLVM produces when it merges field reads of different
/// branches; a volatile read per field keeps each access separate.
macro_rules! ctx_read {
    ($ptr:expr, $($field:tt)+) => {
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$($field)+)) }
    };
}

struct Verdict {
    action: u32,
    rule: u32,
    src_identity: u32,
    dst_identity: u32,
    /// The policy generation read for this verdict (carried in its flow event).
    generation: u32,
}

#[inline(always)]
fn generation() -> u32 {
    CONFIG.get(0).map(|c| c.generation).unwrap_or(0)
}

#[inline(always)]
fn config_flags() -> u32 {
    CONFIG.get(0).map(|c| c.flags).unwrap_or(0)
}

#[inline(always)]
fn identity(generation: u32, addr: Addr) -> IdentityValue {
    let key = Key::new(160, IpKey { bank: bank(generation), addr });
    match IDENTITIES.get(&key) {
        Some(v) => *v,
        None => IdentityValue { identity: IDENTITY_WORLD, flags: 0 },
    }
}

/// (action, rule) of one policy cell; action 0 when absent. Plain integers rather than an
/// `Option<PolicyValue>`: LLVM may leave an absent option's payload in a register the
/// verifier considers uninitialised.
#[inline(always)]
fn cell(generation: u32, direction: u8, src: u32, dst: u32, port: u16) -> (u32, u32) {
    let key = PolicyKey { bank: bank(generation), src, dst, port, proto: PROTO_TCP, direction };
    match POLICY.get_ptr(&key) {
        Some(p) => unsafe { ((*p).action, (*p).rule) },
        None => (0, 0),
    }
}

/// One direction's (action, rule): deny beats allow across its four cells; with neither, the
/// default of the end the direction belongs to. Ingress cells wildcard the source, egress
/// cells the destination.
#[inline(always)]
fn direction_verdict(generation: u32, direction: u8, s: &IdentityValue, d: &IdentityValue, port: u16) -> (u32, u32) {
    // A Service VIP's egress is its own cells only (see `IDENTITY_SERVICE`): the wildcard
    // probes repeat the exact ones.
    let any_dst = if d.flags & IDENTITY_SERVICE != 0 { d.identity } else { IDENTITY_ANY };
    let probes = if direction == DIRECTION_EGRESS {
        [
            (s.identity, d.identity, port),
            (s.identity, d.identity, PORT_ANY),
            (s.identity, any_dst, port),
            (s.identity, any_dst, PORT_ANY),
        ]
    } else {
        [
            (s.identity, d.identity, port),
            (s.identity, d.identity, PORT_ANY),
            (IDENTITY_ANY, d.identity, port),
            (IDENTITY_ANY, d.identity, PORT_ANY),
        ]
    };
    let mut allowed = false;
    let mut allow_rule = 0;
    for (src_identity, dst_identity, port) in probes {
        let (action, rule) = cell(generation, direction, src_identity, dst_identity, port);
        if action == ACTION_DENY {
            return (action, rule);
        }
        if action == ACTION_ALLOW && !allowed {
            allowed = true;
            allow_rule = rule;
        }
    }
    if allowed {
        (ACTION_ALLOW, allow_rule)
    } else if direction == DIRECTION_EGRESS && s.flags & IDENTITY_EGRESS_DEFAULT_DENY != 0 {
        (ACTION_DENY, RULE_EGRESS_DEFAULT_DENY)
    } else if direction == DIRECTION_INGRESS && d.flags & IDENTITY_DEFAULT_DENY != 0 {
        (ACTION_DENY, RULE_DEFAULT_DENY)
    } else {
        (ACTION_ALLOW, RULE_DEFAULT_ALLOW)
    }
}

/// A connection needs the source's egress consent and the destination's ingress consent,
/// wherever it is checked: at the source's connect() and again at the destination's socket
/// lookup (which then re-checks the source's egress: it knows the source's identity, and
/// one algorithm at both ends means both ends agree). `Snapshot::verdict` in
/// palisade-model is this algorithm in user space; `combine` there picks the rule named.
/// `generation` is read from `CONFIG` once per verdict, by the caller: every lookup of one
/// verdict reads the same bank, which ztunnel leaves alone until well after the switch away from it.
#[inline(always)]
fn decide(generation: u32, src: Addr, dst: Addr, port: u16) -> Verdict {
    let s = identity(generation, src);
    let d = identity(generation, dst);
    let egress = direction_verdict(generation, DIRECTION_EGRESS, &s, &d, port);
    let ingress = direction_verdict(generation, DIRECTION_INGRESS, &s, &d, port);
    let (action, rule) = if egress.0 == ACTION_DENY {
        egress
    } else if ingress.0 == ACTION_DENY || ingress.1 != RULE_DEFAULT_ALLOW {
        ingress
    } else {
        egress
    };
    Verdict { action, rule, src_identity: s.identity, dst_identity: d.identity, generation }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn emit(
    kind: u32,
    family: u32,
    src: (Addr, u16),
    dst: (Addr, u16),
    v: &Verdict,
    netns_cookie: u64,
    socket_cookie: u64,
) {
    let event = FlowEventRaw {
        kind,
        family,
        src_addr: src.0,
        dst_addr: dst.0,
        src_port: src.1,
        dst_port: dst.1,
        src_identity: v.src_identity,
        dst_identity: v.dst_identity,
        rule: v.rule,
        generation: v.generation,
        _pad: 0,
        netns_cookie,
        socket_cookie,
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    };
    // A full ring drops the event, never the connection; ztunnel counts what it receives.
    let _ = EVENTS.output::<FlowEventRaw>(&event, 0);
}

#[inline(always)]
fn is_loopback(addr: &Addr) -> bool {
    let v4_loopback = addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD && addr[3].to_ne_bytes()[0] == 127;
    let v6_loopback = addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == u32::from_ne_bytes([0, 0, 0, 1]);
    v4_loopback || v6_loopback
}

/// Shared body of connect4/connect6: returns 1 to let the connect proceed, 0 for EPERM.
#[inline(always)]
fn capture_connect(ctx: &SockAddrContext, dst: Addr, family: u32) -> i32 {
    let sa = ctx.sock_addr;
    if ctx_read!(sa, type_) != SOCK_STREAM || ctx_read!(sa, protocol) != PROTO_TCP as u32 {
        return 1;
    }
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let pod = match PODS.get_ptr(&netns_cookie) {
        Some(p) => unsafe { *p },
        None => return 1,
    };
    if is_loopback(&dst) || dst == pod.addr {
        return 1;
    }
    let port = u16::from_be(ctx_read!(sa, user_port) as u16);
    let verdict = decide(generation(), pod.addr, dst, port);
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if verdict.action == ACTION_DENY {
        emit(EVENT_CONNECT_DENY, family, (pod.addr, 0), (dst, port), &verdict, netns_cookie, socket_cookie);
        return 0;
    }
    let orig = OrigDst {
        addr: dst,
        port,
        _pad: 0,
        family,
        src_identity: verdict.src_identity,
        dst_identity: verdict.dst_identity,
        rule: verdict.rule,
        _pad2: 0,
    };
    if ORIG_BY_COOKIE.insert(&socket_cookie, &orig, 0).is_err() {
        // Without a record ztunnel could not find the destination: fail closed.
        return 0;
    }
    emit(EVENT_CONNECT_ALLOW, family, (pod.addr, 0), (dst, port), &verdict, netns_cookie, socket_cookie);
    let listener_port = (OUTBOUND_PORT.to_be()) as u32;
    // SAFETY: the context is writable for these fields in connect4/connect6; each write has a
    // constant offset.
    unsafe {
        if family == AF_INET {
            (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        } else {
            let loopback = if dst[2] == V4_MAPPED_WORD && dst[0] == 0 && dst[1] == 0 {
                v4_mapped(u32::from_ne_bytes([127, 0, 0, 1]))
            } else {
                [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
            };
            (*sa).user_ip6[0] = loopback[0];
            (*sa).user_ip6[1] = loopback[1];
            (*sa).user_ip6[2] = loopback[2];
            (*sa).user_ip6[3] = loopback[3];
        }
        (*sa).user_port = listener_port;
    }
    1
}

#[cgroup_sock_addr(connect4)]
pub fn pl_connect4(ctx: SockAddrContext) -> i32 {
    let ip4 = ctx_read!(ctx.sock_addr, user_ip4);
    capture_connect(&ctx, v4_mapped(ip4), AF_INET)
}

#[cgroup_sock_addr(connect6)]
pub fn pl_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let dst = [
        ctx_read!(sa, user_ip6[0]),
        ctx_read!(sa, user_ip6[1]),
        ctx_read!(sa, user_ip6[2]),
        ctx_read!(sa, user_ip6[3]),
    ];
    capture_connect(&ctx, dst, AF_INET6)
}

#[sock_ops]
pub fn pl_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = match ORIG_BY_COOKIE.get_ptr(&cookie) {
        Some(p) => unsafe { *p },
        None => return 1,
    };
    let key = SockKey { netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }, port: ctx.local_port(), _pad: 0 };
    let _ = ORIG_DST.insert(&key, &orig, 0);
    let _ = ORIG_BY_COOKIE.remove(&cookie);
    1
}

#[sk_lookup]
pub fn pl_inbound(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    if ctx_read!(l, protocol) != PROTO_TCP as u32 {
        return sk_action::SK_PASS;
    }
    let port = ctx_read!(l, local_port) as u16;
    if port == HBONE_PORT {
        return sk_action::SK_PASS;
    }
    // Read every address field first, each at its constant offset, then choose by family.
    let family = ctx_read!(l, family);
    let (remote4, local4) = (ctx_read!(l, remote_ip4), ctx_read!(l, local_ip4));
    let remote6 = [
        ctx_read!(l, remote_ip6[0]),
        ctx_read!(l, remote_ip6[1]),
        ctx_read!(l, remote_ip6[2]),
        ctx_read!(l, remote_ip6[3]),
    ];
    let local6 = [
        ctx_read!(l, local_ip6[0]),
        ctx_read!(l, local_ip6[1]),
        ctx_read!(l, local_ip6[2]),
        ctx_read!(l, local_ip6[3]),
    ];
    let (src, dst) = if family == AF_INET { (v4_mapped(remote4), v4_mapped(local4)) } else { (remote6, local6) };
    // Traffic from the pod to itself (the application's own, and ztunnel delivering an
    // inbound connection over the pod's loopback) is local. Locally routed packets report the
    // address owner's ifindex, not lo's, so the test is on the addresses; a packet from outside
    // cannot carry a local source (the kernel drops it as martian).
    if src == dst || is_loopback(&src) {
        return sk_action::SK_PASS;
    }
    let src_port = u16::from_be(ctx_read!(l, remote_port));
    // Once per verdict: the plaintext check and the policy read the same generation.
    let generation = generation();
    // This program runs only in the namespaces of enrolled pods, so an address without an
    // entry is one of the pod's that ztunnel was not told about (or whose entry a conflicting
    // enrollment would have taken): refuse, never let it bypass the proxy.
    let index = match INBOUND_ADDRS.get_ptr(&dst) {
        Some(i) => unsafe { *i },
        None => {
            let v = Verdict {
                action: ACTION_DENY,
                rule: RULE_UNKNOWN_ADDRESS,
                src_identity: 0,
                dst_identity: 0,
                generation,
            };
            emit(EVENT_INBOUND_DENY, family, (src, src_port), (dst, port), &v, 0, 0);
            return sk_action::SK_DROP;
        }
    };
    // With a CA, mesh workloads reach each other only through HBONE (15008, passed above):
    // plaintext from a workload's address means its ztunnel is down or bypassed.
    if config_flags() & CONFIG_REQUIRE_HBONE != 0 {
        let s = identity(generation, src);
        if s.flags & IDENTITY_WORKLOAD != 0 {
            let dst_identity = identity(generation, dst).identity;
            let v = Verdict {
                action: ACTION_DENY,
                rule: RULE_PLAINTEXT_FROM_MESH,
                src_identity: s.identity,
                dst_identity,
                generation,
            };
            emit(EVENT_INBOUND_DENY, family, (src, src_port), (dst, port), &v, 0, 0);
            return sk_action::SK_DROP;
        }
    }
    let verdict = decide(generation, src, dst, port);
    if verdict.action == ACTION_DENY {
        emit(EVENT_INBOUND_DENY, family, (src, src_port), (dst, port), &verdict, 0, 0);
        // SK_DROP on a TCP lookup answers the SYN with a reset: the client sees a refusal.
        return sk_action::SK_DROP;
    }
    emit(EVENT_INBOUND_ALLOW, family, (src, src_port), (dst, port), &verdict, 0, 0);
    match INBOUND_SOCKETS.redirect_sk_lookup(&ctx, index, 0) {
        Ok(()) => sk_action::SK_PASS,
        // No listener (ztunnel restarting): refuse rather than bypass the proxy.
        Err(_) => sk_action::SK_DROP,
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
