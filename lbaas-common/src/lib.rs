//! Layouts shared by the lbaas XDP program and its controller.
//!
//! Everything the kernel and user space must agree on lives here: map names, their sizes,
//! the `#[repr(C)]` keys and values, flag bits and stat indices. Every type has explicit padding
//! and a compile-time size check, so a change to one side cannot silently disagree with the
//! other. When a value layout changes, the map name gets a version suffix (`_V2`).
//!
//! Addresses and ports are kept in **network byte order** (as they sit in the packet), so the
//! data path compares and copies them without swapping.
#![no_std]
#![deny(missing_docs)]

/// Version of the shared layouts as a whole. Pins live under `v<LAYOUT_VERSION>` in the pin
/// directory, so a build with other layouts never reuses maps it would misread; bump it with
/// any change to a map's key or value type, size or kind.
pub const LAYOUT_VERSION: u32 = 3;

/// Name of the VIP table: [`VipKey`] -> [`VipInfo`].
pub const MAP_VIPS: &str = "LB_VIPS";
/// Name of the VIP address filter: [`VIP_FILTER_SLOTS`] counters, slot [`vip_filter_slot`] of
/// an address -> how many VIP keys have an address in that slot. A packet whose destination
/// falls on a zero slot is for no VIP, and is passed (or reverse-translated) without the VIP
/// table's hash lookup: an array read instead. The controller raises a slot before the VIP
/// it counts is written and lowers it after the VIP is gone.
pub const MAP_VIP_FILTER: &str = "LB_VIPF";
/// Slots of [`MAP_VIP_FILTER`].
pub const VIP_FILTER_SLOTS: u32 = 65_536;

/// The [`MAP_VIP_FILTER`] slot of an address (as the packet carries it): the high half of a
/// multiplicative hash, so that addresses that differ anywhere spread.
#[inline(always)]
pub const fn vip_filter_slot(addr: u32) -> u32 {
    addr.wrapping_mul(0x9e37_79b1) >> 16
}

/// Name of the member table: member id (u32 index) -> [`MemberInfo`].
pub const MAP_MEMBERS: &str = "LB_MEMBERS";
/// Name of the selection ring array: slot (u32 index) -> member id (u32).
///
/// Each listener owns a contiguous region `[ring_base, ring_base + ring_len)`; the controller
/// writes a new region beside the live one and then switches the listener's [`VipInfo`] to it
/// with one map write (make-before-break).
pub const MAP_RING: &str = "LB_RING";
/// Name of the round-robin counter array: listener id -> u64 counter, shared by all CPUs.
pub const MAP_RR: &str = "LB_RR";
/// Name of the connection table: client-side [`FlowKey`] -> [`FlowState`] (LRU).
pub const MAP_CONNTRACK: &str = "LB_CT";
/// Name of the reverse-NAT table: member-side [`FlowKey`] -> [`ReverseNat`] (LRU).
pub const MAP_REVERSE: &str = "LB_CT_REV";
/// Name of the half-open table: client-side [`FlowKey`] -> [`HalfOpen`] of TCP flows seen only
/// with a SYN so far, in an LRU of their own so that a SYN flood evicts only other half-open
/// flows, never established ones. Promoted to [`MAP_CONNTRACK`] on the client's next packet.
pub const MAP_HALF_OPEN: &str = "LB_CT_SYN";
/// Name of the half-open flows' reverse-NAT table (SYN-ACKs from members): member-side
/// [`FlowKey`] -> [`ReverseNat`]. Written only for members whose endpoint is not in
/// [`MAP_MEMBER_VIPS`]; the others' SYN-ACKs find their flow in [`MAP_HALF_OPEN`] instead.
pub const MAP_HALF_OPEN_REVERSE: &str = "LB_CT_SYN_REV";
/// Name of the member endpoint table: a member's [`Endpoint`] -> the one TCP listener
/// ([`VipKey`]) it serves, for endpoints that serve exactly one. A SYN-ACK from such an
/// endpoint names the client, and the entry names the VIP, which together make the client-side
/// key of its half-open flow: a new flow to such a member (flagged [`MEMBER_F_SOLE_VIP`]) costs
/// one table insert instead of two.
pub const MAP_MEMBER_VIPS: &str = "LB_MVIP";
/// Entries of [`MAP_MEMBER_VIPS`].
pub const MAX_MEMBER_VIPS: u32 = MAX_MEMBERS;
/// Name of the open/closed flow counters: member id, or `MAX_MEMBERS + listener id` ->
/// [`FlowCounters`], updated atomically by the data path.
pub const MAP_CONNS: &str = "LB_CONNS";
/// Name of the expired-flow counters, same index as [`MAP_CONNS`], written only by the
/// controller when it removes idle flows (a single writer, so no atomics are needed).
pub const MAP_EXPIRED: &str = "LB_EXPIRED";
/// Name of the per-CPU next-hop cache of clients: [`client_hop_slot`] of the client address ->
/// [`CachedHop`] (direct-mapped: a slot holds the last client that hashed there), so that a
/// reply costs an array read instead of a FIB lookup; entries are trusted for
/// [`NEXT_HOP_TTL_NS`]. Per CPU, so that an entry is only ever written and read by one CPU and
/// never seen half-written.
pub const MAP_NEXT_HOP: &str = "LB_NEXTHOP";
/// Name of the per-CPU next-hop cache of members: member id -> [`CachedHop`]; a forwarded
/// packet finds its next hop at its member's index.
pub const MAP_MEMBER_HOPS: &str = "LB_MHOP";
/// Name of the interface roles: an array, ifindex -> `IFACE_*` bits (an array read costs next
/// to nothing on every packet, a hash lookup does not). 0 (no entry), or an ifindex past the
/// array, means every role.
pub const MAP_IFACES: &str = "LB_IFACES";
/// An interface where clients' packets arrive (VIPs are served).
pub const IFACE_CLIENT: u32 = 1 << 0;
/// An interface where members' replies arrive (reverse NAT is looked up).
pub const IFACE_MEMBER: u32 = 1 << 1;
/// Entries of [`MAP_IFACES`]: interfaces with a larger index take every role.
pub const MAX_IFACES: u32 = 65_536;

/// Name of the allowed-source table of listeners with `allowed_cidrs`: an LPM trie keyed by
/// [`SourcePrefix`] (prefix length 32 + the CIDR's length, so the listener id always matches
/// whole) -> `u8` (1). Consulted for new flows of listeners flagged [`VIP_F_SOURCE_FILTER`].
pub const MAP_ALLOWED_SOURCES: &str = "LB_SRC_ALLOW";
/// Entries of [`MAP_ALLOWED_SOURCES`] over all listeners.
pub const MAX_ALLOWED_SOURCES: u32 = 65_536;

/// Name of the per-CPU member counters: member id -> [`ListenerStats`] (same fields).
pub const MAP_MEMBER_STATS: &str = "LB_MSTATS";
/// Name of the per-CPU listener counters: listener id -> [`ListenerStats`].
pub const MAP_LISTENER_STATS: &str = "LB_LSTATS";
/// Name of the per-CPU global counters: stat index (`STAT_*`) -> u64.
pub const MAP_GLOBAL_STATS: &str = "LB_GSTATS";

/// Every map that holds state, e.g. to pin them all. (The data path's clock reading is a
/// global of the program, in its `.bss`: a fresh one is correct from its first packet.)
pub const ALL_MAPS: [&str; 19] = [
    MAP_IFACES,
    MAP_VIP_FILTER,
    MAP_MEMBER_HOPS,
    MAP_ALLOWED_SOURCES,
    MAP_MEMBER_STATS,
    MAP_NEXT_HOP,
    MAP_VIPS,
    MAP_MEMBERS,
    MAP_RING,
    MAP_RR,
    MAP_CONNTRACK,
    MAP_REVERSE,
    MAP_HALF_OPEN,
    MAP_HALF_OPEN_REVERSE,
    MAP_MEMBER_VIPS,
    MAP_CONNS,
    MAP_EXPIRED,
    MAP_LISTENER_STATS,
    MAP_GLOBAL_STATS,
];

/// Name of the benchmark's frame: one [`BenchFrame`], which the benchmark wrapper program
/// (`lbaas_bench`, never attached) writes over the packet before every run. Not pinned.
pub const MAP_BENCH_FRAME: &str = "LB_BENCH_FRAME";
/// Name of the benchmark wrapper's jump table: slot 0 is the program under test. Not pinned.
pub const MAP_BENCH_TARGET: &str = "LB_BENCH_TARGET";
/// Name of the refusals ring buffer: the member id (a native-endian `u32`) of every connection a
/// member refused (its RST to a half-open flow), so that the daemon probes that member at once
/// rather than at its next tick. Not pinned: events are news, not state.
pub const MAP_REFUSALS: &str = "LB_REFUSALS";
/// Size of the refusals ring buffer in bytes (a power of two, a multiple of the page size):
/// room for 2,048 events between two reads of the daemon.
pub const REFUSALS_BYTES: u32 = 32 * 1024;
/// Bytes of the frame the benchmark wrapper restores: Ethernet, IPv4 without options and a
/// TCP header (every byte any path rewrites); frames run through it are at least this long.
pub const BENCH_FRAME_BYTES: usize = 54;

/// What the benchmark wrapper writes over the packet before each run, so that an in-kernel
/// loop (`BPF_PROG_TEST_RUN` with a large `repeat`) runs every iteration on the original frame
/// instead of on the previous iteration's output.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchFrame {
    /// The frame's first [`BENCH_FRAME_BYTES`] bytes.
    pub bytes: [u8; BENCH_FRAME_BYTES],
    /// Non-zero: each run gets a source address of its own (the frame's plus a per-CPU run
    /// count), so that every run is a new flow.
    pub fresh_source: u8,
    /// Explicit padding.
    pub _pad: u8,
    /// Runs so far with `fresh_source` (the wrapper counts them; the benchmark runs on one
    /// CPU).
    pub runs: u32,
}
const _: () = assert!(core::mem::size_of::<BenchFrame>() == 60);

/// Maximum number of VIP:port:protocol entries.
pub const MAX_VIPS: u32 = 4096;
/// Maximum number of listeners (ids `0..MAX_LISTENERS`).
pub const MAX_LISTENERS: u32 = 4096;
/// Maximum number of members over all pools (ids `0..MAX_MEMBERS`).
pub const MAX_MEMBERS: u32 = 65536;
/// Number of slots in the selection ring array shared by all listeners.
pub const RING_SLOTS: u32 = 1 << 22;
/// Slots of [`MAP_CONNS`] and [`MAP_EXPIRED`]: members, then listeners.
pub const CONN_COUNTER_SLOTS: u32 = MAX_MEMBERS + MAX_LISTENERS;
/// Most usable members a LEAST_CONNECTIONS pool may have: the data path scans them all for
/// each new flow, in a loop the verifier must be able to bound.
pub const MAX_LEAST_CONN_MEMBERS: u32 = 128;
/// How long a cached next hop is used before the FIB is asked again (a neighbour that changes
/// its MAC, or a route that changes, is followed within this time).
pub const NEXT_HOP_TTL_NS: u64 = 1_000_000_000;
/// Slots of the clients' next-hop cache (per CPU; a power of two).
pub const NEXT_HOP_ENTRIES: u32 = 16_384;

/// The [`MAP_NEXT_HOP`] slot of a client address (as the packet carries it) and the ingress
/// interface.
#[inline(always)]
pub const fn client_hop_slot(addr: u32, ingress: u32) -> u32 {
    (addr ^ ingress.rotate_left(16)).wrapping_mul(0x9e37_79b1) >> 18
}
/// Default connection-table size (entries in each of the forward and reverse tables).
pub const DEFAULT_CONNTRACK_SIZE: u32 = 262_144;

/// [`VipInfo::flags`]: the listener is served by the userspace proxy; the packet goes to
/// the host stack untouched.
pub const VIP_F_L7_PASS: u32 = 1 << 0;
/// [`VipInfo::flags`]: the listener has `allowed_cidrs`; a new flow whose source is not in
/// [`MAP_ALLOWED_SOURCES`] under the listener's id is dropped.
pub const VIP_F_SOURCE_FILTER: u32 = 1 << 1;

/// [`VipInfo::algorithm`]: weighted round robin over the ring (global rotation).
pub const ALGO_ROUND_ROBIN: u32 = 0;
/// [`VipInfo::algorithm`]: fewest active flows per weight; the ring region lists the usable
/// members once each; ties are broken round robin.
pub const ALGO_LEAST_CONNECTIONS: u32 = 1;
/// [`VipInfo::algorithm`]: the ring region is a Maglev table indexed by [`hash_source`].
pub const ALGO_MAGLEV_SOURCE: u32 = 2;
/// [`VipInfo::algorithm`]: the ring region is a Maglev table indexed by [`hash_5tuple`].
pub const ALGO_MAGLEV_5TUPLE: u32 = 3;

/// [`FlowState::state`]: the flow saw a FIN or RST; its counters were already decremented.
pub const FLOW_CLOSED: u32 = 1;

/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// Global stat: packets not aimed at any VIP, passed to the host untouched.
pub const STAT_PASS_NOT_VIP: u32 = 0;
/// Global stat: frames too short or with bad header lengths, passed untouched.
pub const STAT_PASS_MALFORMED: u32 = 1;
/// Global stat: IPv4 packets with options, passed untouched (unsupported on the fast path).
pub const STAT_PASS_IP_OPTIONS: u32 = 2;
/// Global stat: IPv4 fragments, passed untouched.
pub const STAT_PASS_FRAGMENT: u32 = 3;
/// Global stat: new flows dropped because the listener's pool has no usable member.
pub const STAT_DROP_NO_MEMBER: u32 = 4;
/// Global stat: rewritten packets handed to the host stack because the next hop is unknown.
pub const STAT_PASS_NO_NEIGH: u32 = 5;
/// Global stat: rewritten packets forwarded with XDP_TX or XDP_REDIRECT.
pub const STAT_FORWARDED: u32 = 6;
/// Global stat: L7 listener packets passed to the host stack for the proxy.
pub const STAT_PASS_L7: u32 = 7;
/// Global stat: new TCP connections refused with a RST (connection limit).
pub const STAT_REFUSED_RST: u32 = 8;
/// Global stat: new flows dropped by the connection limit (UDP, or TCP without SYN).
pub const STAT_DROP_CONN_LIMIT: u32 = 9;
/// Global stat: new flows dropped because their source is outside the listener's
/// `allowed_cidrs`.
pub const STAT_DROP_SOURCE: u32 = 10;
/// Number of global stat slots.
pub const STAT_COUNT: u32 = 11;

/// Key of the VIP table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VipKey {
    /// VIP IPv4 address, network byte order.
    pub addr: u32,
    /// Listener port, network byte order.
    pub port: u16,
    /// IP protocol ([`IPPROTO_TCP`] or [`IPPROTO_UDP`]).
    pub proto: u8,
    /// Explicit padding; always zero.
    pub _pad: u8,
}

impl VipKey {
    /// The key of a listener (or a member endpoint), written as two whole words (see
    /// [`FlowKey::new`]: the kernel's hash reads it a word at a time).
    #[inline(always)]
    pub fn new(addr: u32, port: u16, proto: u8) -> Self {
        let [p0, p1] = port.to_ne_bytes();
        let words = [addr, u32::from_ne_bytes([p0, p1, proto, 0])];
        // SAFETY: VipKey is repr(C), 8 bytes of plain integers with no padding of its own
        // (asserted below), so any two words are a valid value, laid out field by field.
        unsafe { core::mem::transmute::<[u32; 2], Self>(words) }
    }
}

/// Value of the VIP table: what the data path needs to serve one listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipInfo {
    /// Listener id: index into the counter maps.
    pub listener_id: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
    /// `ALGO_*` selection algorithm.
    pub algorithm: u32,
    /// First slot of this listener's region in [`MAP_RING`].
    pub ring_base: u32,
    /// Number of slots in the region; 0 means no usable member.
    pub ring_len: u32,
    /// Most concurrent flows the listener takes; 0 for unlimited.
    pub conn_limit: u32,
}

/// Data of an [`MAP_ALLOWED_SOURCES`] key (the trie key adds the prefix length in front).
/// Tries match bits from the first byte on: the listener id comes first and is always
/// matched whole, then the source address's leading bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SourcePrefix {
    /// Listener id (the VIP's [`VipInfo::listener_id`]).
    pub listener_id: u32,
    /// Source address (network byte order); bits past the prefix are zero.
    pub addr: u32,
}

impl SourcePrefix {
    /// Trie prefix length of a CIDR of `cidr_len` bits: the listener id, then the address.
    pub const fn trie_prefix_len(cidr_len: u8) -> u32 {
        32 + cidr_len as u32
    }
}

/// A member endpoint ([`MAP_MEMBER_VIPS`] key): the same layout as a [`VipKey`], with the
/// member's address, port and protocol.
pub type Endpoint = VipKey;

/// [`MemberInfo::flags`]: the member's endpoint serves one TCP listener, which
/// [`MAP_MEMBER_VIPS`] names, so its SYN-ACKs are matched without a reverse half-open entry.
pub const MEMBER_F_SOLE_VIP: u16 = 1 << 0;

/// Value of the member table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MemberInfo {
    /// Member IPv4 address, network byte order.
    pub addr: u32,
    /// Member port, network byte order.
    pub port: u16,
    /// `MEMBER_F_*` bits.
    pub flags: u16,
    /// Generation of this id: a flow pinned to an older generation of a reused id is
    /// rescheduled instead of following the new occupant.
    pub generation: u32,
    /// Weight, 1-256 (LEAST_CONNECTIONS compares active flows per weight).
    pub weight: u32,
}

/// A flow's 5-tuple as seen in one direction, addresses and ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Source address.
    pub src_addr: u32,
    /// Destination address.
    pub dst_addr: u32,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Explicit padding; always zero. A byte and a half-word rather than `[u8; 3]`: the
    /// eBPF compiler zeroes a 3-byte array with a call to a `memset` subprogram, and a call
    /// costs a packet ~5 ns on CPUs whose every return goes through a mitigation thunk.
    pub _pad: u8,
    /// Explicit padding; always zero (see `_pad`).
    pub _pad2: u16,
}

impl FlowKey {
    /// The key of a flow, written as four whole words. The kernel's hash reads a key a word
    /// at a time right after the program wrote it; a word read of bytes just stored in
    /// smaller pieces (a port, the protocol, the padding) cannot be forwarded from the CPU's
    /// store buffer and stalls, on every lookup.
    #[inline(always)]
    pub fn new(src_addr: u32, dst_addr: u32, src_port: u16, dst_port: u16, proto: u8) -> Self {
        let [s0, s1] = src_port.to_ne_bytes();
        let [d0, d1] = dst_port.to_ne_bytes();
        let words = [
            src_addr,
            dst_addr,
            u32::from_ne_bytes([s0, s1, d0, d1]),
            u32::from_ne_bytes([proto, 0, 0, 0]),
        ];
        // SAFETY: FlowKey is repr(C), 16 bytes of plain integers with no padding of its own
        // (asserted below), so any four words are a valid value, laid out field by field.
        unsafe { core::mem::transmute::<[u32; 4], Self>(words) }
    }
}

/// Connection-table value: which member a client flow is pinned to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    /// Member id the flow was given.
    pub member_id: u32,
    /// [`MemberInfo::generation`] at the time the flow was pinned.
    pub member_generation: u32,
    /// Listener the flow belongs to.
    pub listener_id: u32,
    /// `FLOW_*` bits, changed atomically.
    pub state: u32,
    /// `bpf_ktime_get_ns()` of a recent client packet (refreshed at most once a second).
    pub last_seen_ns: u64,
}

/// Half-open table value ([`MAP_HALF_OPEN`]): the flow's member, and what its SYN-ACK needs to
/// reach the client when it is found from the member's side.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct HalfOpen {
    /// The flow, as it moves to [`MAP_CONNTRACK`] once the handshake completes.
    pub flow: FlowState,
    /// Interface the client's SYN arrived on.
    pub client_ifindex: u32,
    /// Whether a [`MAP_HALF_OPEN_REVERSE`] entry was written for the flow (removed with it).
    pub has_reverse: u32,
    /// The client's (or its router's) MAC, as its SYN carried it.
    pub client_mac: [u8; 6],
    /// This node's MAC on that interface, as the client's SYN was sent to it.
    pub local_mac: [u8; 6],
    /// Explicit padding; always zero (a word, not a byte array: see [`FlowKey::_pad`]).
    pub _pad: u32,
}

/// A cached FIB answer ([`MAP_MEMBER_HOPS`], [`MAP_NEXT_HOP`]), valid for the address and
/// ingress interface it was asked for, for [`NEXT_HOP_TTL_NS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CachedHop {
    /// The address it was asked for (a reused member id, or another client in the same slot,
    /// misses).
    pub addr: u32,
    /// Ingress interface it was asked for.
    pub ingress: u32,
    /// Egress interface.
    pub ifindex: u32,
    /// Next hop's MAC.
    pub dmac: [u8; 6],
    /// Our MAC on the egress interface.
    pub smac: [u8; 6],
    /// `bpf_ktime_get_ns()` when the FIB gave it.
    pub stamp_ns: u64,
}

/// Open and closed flow counts of a member or listener; active = opened - closed - expired.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowCounters {
    /// Flows given to it.
    pub opened: u64,
    /// Flows that ended with FIN or RST.
    pub closed: u64,
}

/// Reverse-NAT value: how to rewrite a member's reply back to the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReverseNat {
    /// VIP address, network byte order.
    pub vip_addr: u32,
    /// Listener port, network byte order.
    pub vip_port: u16,
    /// Explicit padding; always zero.
    pub _pad: u16,
    /// Listener the flow belongs to.
    pub listener_id: u32,
    /// Interface the client's packets arrive on.
    pub client_ifindex: u32,
    /// The client's (or its router's) MAC, as its first packet carried it.
    pub client_mac: [u8; 6],
    /// This node's MAC on that interface, as the client's first packet was sent to it.
    pub local_mac: [u8; 6],
    /// Member the flow was given (for its counters).
    pub member_id: u32,
}

/// Per-CPU counters of one listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ListenerStats {
    /// Packets from clients forwarded to members.
    pub packets_in: u64,
    /// IP bytes (header included) from clients forwarded to members.
    pub bytes_in: u64,
    /// Reply packets from members forwarded to clients.
    pub packets_out: u64,
    /// IP bytes of replies forwarded to clients.
    pub bytes_out: u64,
    /// New flows given a member.
    pub new_flows: u64,
    /// New flows refused by the connection limit.
    pub refused: u64,
}

const _: () = {
    assert!(core::mem::size_of::<VipKey>() == 8);
    assert!(core::mem::size_of::<SourcePrefix>() == 8);
    assert!(core::mem::size_of::<VipInfo>() == 24);
    assert!(core::mem::size_of::<MemberInfo>() == 16);
    assert!(core::mem::size_of::<FlowKey>() == 16);
    assert!(core::mem::size_of::<FlowState>() == 24);
    assert!(core::mem::size_of::<HalfOpen>() == 48);
    assert!(core::mem::size_of::<FlowCounters>() == 16);
    assert!(core::mem::size_of::<CachedHop>() == 32);
    assert!(NEXT_HOP_ENTRIES.is_power_of_two() && NEXT_HOP_ENTRIES == 1 << (32 - 18));
    assert!(core::mem::size_of::<ReverseNat>() == 32);
    assert!(core::mem::size_of::<ListenerStats>() == 48);
};

/// One round of MurmurHash3 (32-bit) mixing a word into the state.
#[inline(always)]
const fn murmur_round(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// MurmurHash3's finaliser: every input bit affects every output bit.
#[inline(always)]
const fn murmur_finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Fixed seed: every LB node computes the same hash, so nodes behind ECMP agree.
const HASH_SEED: u32 = 0x6c62_6161; // "lbaa"

/// Hash of a client address (network order as read from the packet) for SOURCE_IP.
#[inline(always)]
pub const fn hash_source(addr: u32) -> u32 {
    murmur_finish(murmur_round(HASH_SEED, addr), 4)
}

/// Hash of a 5-tuple (addresses and ports in network order) for SOURCE_IP_PORT.
#[inline(always)]
pub const fn hash_5tuple(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = murmur_round(HASH_SEED, src);
    h = murmur_round(h, dst);
    h = murmur_round(h, (sport as u32) << 16 | dport as u32);
    h = murmur_round(h, proto as u32);
    murmur_finish(h, 13)
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: every type is #[repr(C)], made only of integers, with explicit padding, so any
    // bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for SourcePrefix {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for MemberInfo {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for HalfOpen {}
    unsafe impl aya::Pod for ReverseNat {}
    unsafe impl aya::Pod for ListenerStats {}
    unsafe impl aya::Pod for FlowCounters {}
    unsafe impl aya::Pod for BenchFrame {}
    unsafe impl aya::Pod for CachedHop {}
}

#[cfg(test)]
mod tests {
    use super::{FlowKey, VipKey};

    #[test]
    fn a_vip_key_built_from_words_has_each_field_in_its_place() {
        assert_eq!(
            VipKey::new(0x0a00_0064, 0x0050, 17),
            VipKey {
                addr: 0x0a00_0064,
                port: 0x0050,
                proto: 17,
                _pad: 0,
            }
        );
    }

    #[test]
    fn a_flow_key_built_from_words_has_each_field_in_its_place() {
        let key = FlowKey::new(0x0a00_0001, 0x0a00_0064, 0x1f90, 0x0050, 6);
        assert_eq!(
            key,
            FlowKey {
                src_addr: 0x0a00_0001,
                dst_addr: 0x0a00_0064,
                src_port: 0x1f90,
                dst_port: 0x0050,
                proto: 6,
                _pad: 0,
                _pad2: 0,
            }
        );
    }
}
