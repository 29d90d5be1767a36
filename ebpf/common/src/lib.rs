//! Map keys, values and constants shared by Palisade's kernel programs and ztunnel.
//!
//! Every type is `#[repr(C)]` with explicit padding so that the kernel and user space agree
//! byte for byte. Addresses are stored as IPv6 (IPv4 mapped as `::ffff:a.b.c.d`) in four
//! 32-bit words whose *memory* order is network byte order: the same bytes the kernel hands
//! the programs in `user_ip6` / `local_ip6`, so LPM prefix matching works on them directly.
#![no_std]

/// ztunnel's outbound listener inside every enrolled pod (`127.0.0.1` / `::1`).
pub const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's inbound plaintext listener inside every enrolled pod.
pub const INBOUND_PORT: u16 = 15006;
/// HBONE (mTLS HTTP/2 CONNECT) listener; inbound steering never touches it.
pub const HBONE_PORT: u16 = 15008;

/// Identity of addresses outside the mesh (no workload, no CIDR identity).
pub const IDENTITY_WORLD: u32 = 2;
/// Wildcard identity in a [`PolicyKey`] (any source).
pub const IDENTITY_ANY: u32 = 0;
/// Wildcard port in a [`PolicyKey`].
pub const PORT_ANY: u16 = 0;

pub const PROTO_TCP: u8 = 6;

/// Pods one ztunnel can capture: the size of the per-pod maps and of its slot table.
pub const MAX_PODS: u32 = 1_024;
/// Addresses per pod (IPv4 and IPv6, a few of each); `INBOUND_ADDRS` holds `MAX_PODS` times this.
pub const MAX_ADDRS_PER_POD: u32 = 4;

/// Layout version of the pinned maps. The maps outlive ztunnel (they are pinned so that the
/// kernel keeps enforcing while it restarts); a ztunnel adopts only maps of its own layout,
/// which it finds under a directory named after this number. Bump it with any change to a
/// map's key, value or size, or to the meaning of a field (4: `IpKey`/`PolicyKey` hold a
/// bank, `generation & 1`, where 3 held the whole generation number).
pub const MAPS_LAYOUT: u32 = 4;

/// [`Config::flags`]: the mesh has a CA, so a mesh workload never talks plaintext to an
/// enrolled pod; a plaintext connection from a workload address is refused.
pub const CONFIG_REQUIRE_HBONE: u32 = 1;

/// [`PolicyValue::action`]: the rule allows.
pub const ACTION_ALLOW: u32 = 1;
/// [`PolicyValue::action`]: the rule denies (beats any allow).
pub const ACTION_DENY: u32 = 2;

/// [`IdentityValue::flags`]: traffic to this identity that no rule allows is denied.
pub const IDENTITY_DEFAULT_DENY: u32 = 1;
/// [`IdentityValue::flags`]: the address is a mesh workload's (not a CIDR block or the world).
pub const IDENTITY_WORKLOAD: u32 = 2;
/// [`IdentityValue::flags`]: an egress policy selects this (source) identity, so its
/// connections that no egress rule allows are denied at its `connect()`.
pub const IDENTITY_EGRESS_DEFAULT_DENY: u32 = 4;
/// [`IdentityValue::flags`]: a Service's virtual address. Nothing listens there (ztunnel picks
/// an endpoint, whose own ingress decides), so it has no ingress default; its egress is decided
/// by the cells naming it only (the compiler writes one per source and Service port from the
/// Service's endpoints), never by cells that wildcard the destination, which are about ports of
/// real destinations and would be wrong for the VIP's port.
pub const IDENTITY_SERVICE: u32 = 8;

/// [`PolicyKey::direction`]: a rule attached to the destination (who may connect to it);
/// the source may be `IDENTITY_ANY`.
pub const DIRECTION_INGRESS: u8 = 0;
/// [`PolicyKey::direction`]: a rule attached to the source (where it may connect); the
/// destination may be `IDENTITY_ANY`.
pub const DIRECTION_EGRESS: u8 = 1;

/// Rule numbers at or above this value name a default verdict, not a policy rule.
pub const RULE_DEFAULT_ALLOW: u32 = u32::MAX - 1;
pub const RULE_DEFAULT_DENY: u32 = u32::MAX;
/// User space only (the kernel never sees a proven identity): a certificate proved an
/// identity that is not the workload at the connection's source address.
pub const RULE_NOT_AT_SOURCE: u32 = u32::MAX - 2;
/// A mesh workload connected in plaintext where the mesh requires HBONE (its own ztunnel is
/// down or bypassed): refused whatever the policy says, identity is never taken from an address
/// of a workload that should have proven it.
pub const RULE_PLAINTEXT_FROM_MESH: u32 = u32::MAX - 3;
/// The destination address of an inbound connection is not registered for the enrolled pod it
/// reached (never "allow" for a missing entry).
pub const RULE_UNKNOWN_ADDRESS: u32 = u32::MAX - 4;
/// The source is selected by an egress policy and no egress rule allows the connection.
pub const RULE_EGRESS_DEFAULT_DENY: u32 = u32::MAX - 5;

/// Flow event kinds written to the `EVENTS` ring buffer.
pub const EVENT_CONNECT_ALLOW: u32 = 1;
pub const EVENT_CONNECT_DENY: u32 = 2;
pub const EVENT_INBOUND_ALLOW: u32 = 3;
pub const EVENT_INBOUND_DENY: u32 = 4;

/// Address families as the kernel numbers them.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// An address as four words in network byte order (IPv4 mapped into IPv6).
pub type Addr = [u32; 4];

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), in memory order.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Maps an IPv4 address (a `u32` holding network-order bytes, as the kernel gives it).
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// The words of an address as user space holds it (IPv4 becomes IPv4-mapped IPv6).
pub fn addr_from_ip(ip: core::net::IpAddr) -> Addr {
    let octets = match ip {
        core::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        core::net::IpAddr::V6(v6) => v6.octets(),
    };
    let word = |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

/// The inverse of [`addr_from_ip`]; IPv4-mapped addresses come back as IPv4.
pub fn ip_from_addr(addr: Addr) -> core::net::IpAddr {
    let mut octets = [0u8; 16];
    for (i, w) in addr.iter().enumerate() {
        octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = core::net::Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => core::net::IpAddr::V4(v4),
        None => core::net::IpAddr::V6(v6),
    }
}

/// The bank of `IDENTITIES` and `POLICY` that holds `generation`'s entries. There are two
/// banks: the one in force (read by programs) and the other one, which ztunnel brings to the
/// next generation before it switches `CONFIG` to it (see [`Config::generation`]).
#[inline(always)]
pub const fn bank(generation: u32) -> u32 {
    generation & 1
}

/// Global settings, `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The policy generation in force: programs read it once per verdict and then only the
    /// entries of its [`bank`]. ztunnel writes it once the other bank holds the next
    /// generation complete, so a switch is one write and a verdict never mixes two policies.
    /// It keeps counting (the bank is its low bit): flow events carry it, and ztunnel names
    /// an event's identities and rule with that generation's snapshot.
    pub generation: u32,
    /// `CONFIG_*` flags.
    pub flags: u32,
}

/// LPM key data for `IDENTITIES`: prefix length = 32 (bank) + address prefix bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpKey {
    /// [`bank`] of the generation this entry belongs to (0 or 1).
    pub bank: u32,
    pub addr: Addr,
}

/// Identity of an address prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityValue {
    pub identity: u32,
    /// `IDENTITY_*` flags of the identity.
    pub flags: u32,
}

/// Key of `POLICY`: one (direction, source, destination, port) cell of the compiled policy.
/// Ingress cells belong to the destination (`src` may be `IDENTITY_ANY`), egress cells to
/// the source (`dst` may be `IDENTITY_ANY`); a connection needs both directions' consent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    /// [`bank`] of the generation this cell belongs to (0 or 1).
    pub bank: u32,
    /// Source identity, or `IDENTITY_ANY` in an ingress cell.
    pub src: u32,
    /// Destination identity, or `IDENTITY_ANY` in an egress cell.
    pub dst: u32,
    /// Destination port or `PORT_ANY`.
    pub port: u16,
    pub proto: u8,
    /// `DIRECTION_*`.
    pub direction: u8,
}

/// The strongest rule of one cell: `ACTION_DENY` wins over `ACTION_ALLOW` when compiled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub action: u32,
    /// Rule number, resolved to a policy name by ztunnel.
    pub rule: u32,
}

/// An enrolled pod, keyed by its network namespace cookie in `PODS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodValue {
    /// The pod's primary address, used to find its identity.
    pub addr: Addr,
    /// Slot of the pod's inbound listener in `INBOUND_SOCKETS`.
    pub index: u32,
    pub _pad: u32,
}

/// The original destination of a captured connection and the verdict that let it through.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: Addr,
    /// Destination port, host byte order.
    pub port: u16,
    pub _pad: u16,
    pub family: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub rule: u32,
    pub _pad2: u32,
}

/// Key of `ORIG_DST`: the client side of a captured connection, as ztunnel sees its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Network namespace cookie of the pod.
    pub netns_cookie: u64,
    /// The client's local (ephemeral) port, host byte order.
    pub port: u32,
    pub _pad: u32,
}

/// A verdict taken in the kernel, sent to ztunnel through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEventRaw {
    /// `EVENT_*`.
    pub kind: u32,
    pub family: u32,
    pub src_addr: Addr,
    pub dst_addr: Addr,
    /// Host byte order; 0 when not yet chosen (outbound connect).
    pub src_port: u16,
    pub dst_port: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub rule: u32,
    /// The policy generation whose maps took the verdict: ztunnel names the identities and
    /// the rule with that generation's snapshot, not with whatever is in force when it reads.
    pub generation: u32,
    pub _pad: u32,
    pub netns_cookie: u64,
    pub socket_cookie: u64,
    /// `bpf_ktime_get_ns` at the verdict.
    pub ktime_ns: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all types are repr(C), Copy, without implicit padding.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for IpKey {}
    unsafe impl aya::Pod for IdentityValue {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for PodValue {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for FlowEventRaw {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Config>(), 8);
        assert_eq!(size_of::<IpKey>(), 20);
        assert_eq!(size_of::<PolicyKey>(), 16);
        assert_eq!(size_of::<PodValue>(), 24);
        assert_eq!(size_of::<OrigDst>(), 40);
        assert_eq!(size_of::<SockKey>(), 16);
        assert_eq!(size_of::<FlowEventRaw>(), 88);
        assert_eq!(core::mem::offset_of!(FlowEventRaw, generation), 56);
        assert_eq!(core::mem::offset_of!(FlowEventRaw, netns_cookie), 64);
    }

    #[test]
    fn addresses_round_trip_and_match_the_kernel_form() {
        let v4: core::net::IpAddr = core::net::Ipv4Addr::new(10, 244, 1, 10).into();
        assert_eq!(addr_from_ip(v4), v4_mapped(u32::from_ne_bytes([10, 244, 1, 10])));
        assert_eq!(ip_from_addr(addr_from_ip(v4)), v4);
        let v6: core::net::IpAddr = core::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7).into();
        assert_eq!(ip_from_addr(addr_from_ip(v6)), v6);
    }

    #[test]
    fn v4_mapped_bytes_are_network_order() {
        let ip = u32::from_ne_bytes([10, 244, 1, 10]);
        let words = v4_mapped(ip);
        let mut bytes = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 244, 1, 10]);
    }
}
