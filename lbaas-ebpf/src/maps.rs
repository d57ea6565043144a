//! The maps of the data path. Names, sizes and layouts come from `lbaas_common`.

use aya_ebpf::{
    macros::map,
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf, lpm_trie::Key,
    },
    programs::XdpContext,
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use lbaas_common::{
    BenchFrame, CONN_COUNTER_SLOTS, CachedHop, DEFAULT_CONNTRACK_SIZE, Endpoint, FlowCounters,
    FlowKey, FlowState, HalfOpen, ListenerStats, MAX_ALLOWED_SOURCES, MAX_IFACES, MAX_LISTENERS,
    MAX_MEMBER_VIPS, MAX_MEMBERS, MAX_VIPS, MemberInfo, NEXT_HOP_ENTRIES, REFUSALS_BYTES,
    RING_SLOTS, ReverseNat, STAT_COUNT, SourcePrefix, VIP_FILTER_SLOTS, VipInfo, VipKey,
};

/// VIP address filter (see `MAP_VIP_FILTER`).
#[map(name = "LB_VIPF")]
pub static LB_VIPF: Array<u32> = Array::with_max_entries(VIP_FILTER_SLOTS, 0);

/// Whether a destination address may be a VIP's (false: certainly not).
#[inline(always)]
pub fn may_be_vip(addr: u32) -> bool {
    LB_VIPF
        .get(lbaas_common::vip_filter_slot(addr))
        .is_some_and(|count| *count != 0)
}

/// VIP:port:protocol -> listener.
#[map(name = "LB_VIPS")]
pub static LB_VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Member id -> address and port.
#[map(name = "LB_MEMBERS")]
pub static LB_MEMBERS: Array<MemberInfo> = Array::with_max_entries(MAX_MEMBERS, 0);

/// Selection rings of all listeners: slot -> member id.
#[map(name = "LB_RING")]
pub static LB_RING: Array<u32> = Array::with_max_entries(RING_SLOTS, 0);

/// Round-robin counters, one per listener, shared by all CPUs (atomic add).
#[map(name = "LB_RR")]
pub static LB_RR: Array<u64> = Array::with_max_entries(MAX_LISTENERS, 0);

/// Client flow -> member. The daemon may resize it at load time.
#[map(name = "LB_CT")]
pub static LB_CT: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, 0);

/// Member-side flow -> VIP to restore on replies.
#[map(name = "LB_CT_REV")]
pub static LB_CT_REV: LruHashMap<FlowKey, ReverseNat> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, 0);

/// Half-open TCP flows (only a SYN seen): their own LRU, so a SYN flood cannot evict
/// established flows.
#[map(name = "LB_CT_SYN")]
pub static LB_CT_SYN: LruHashMap<FlowKey, HalfOpen> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, 0);

/// Reverse NAT of half-open flows (the member's SYN-ACK) whose member endpoint serves more than
/// one listener.
#[map(name = "LB_CT_SYN_REV")]
pub static LB_CT_SYN_REV: LruHashMap<FlowKey, ReverseNat> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, 0);

/// Member endpoint -> the one TCP listener it serves (see `MAP_MEMBER_VIPS`).
#[map(name = "LB_MVIP")]
pub static LB_MVIP: HashMap<Endpoint, VipKey> = HashMap::with_max_entries(MAX_MEMBER_VIPS, 0);

/// Allowed source prefixes of listeners with `allowed_cidrs` (see `VIP_F_SOURCE_FILTER`).
#[map(name = "LB_SRC_ALLOW")]
pub static LB_SRC_ALLOW: LpmTrie<SourcePrefix, u8> =
    LpmTrie::with_max_entries(MAX_ALLOWED_SOURCES, 0);

/// Whether a listener's `allowed_cidrs` admit a source address (network order).
#[inline(always)]
pub fn source_allowed(listener_id: u32, addr: u32) -> bool {
    let key = Key::new(
        SourcePrefix::trie_prefix_len(32),
        SourcePrefix { listener_id, addr },
    );
    LB_SRC_ALLOW.get(&key).is_some()
}

/// Members' cached FIB answers, per CPU (see `MAP_MEMBER_HOPS`).
#[map(name = "LB_MHOP")]
pub static LB_MHOP: PerCpuArray<CachedHop> = PerCpuArray::with_max_entries(MAX_MEMBERS, 0);

/// Cached FIB answers (see `NEXT_HOP_TTL_NS`).
#[map(name = "LB_NEXTHOP")]
pub static LB_NEXTHOP: PerCpuArray<CachedHop> = PerCpuArray::with_max_entries(NEXT_HOP_ENTRIES, 0);

/// Opened/closed flow counts: member id, then `MAX_MEMBERS + listener id`.
#[map(name = "LB_CONNS")]
pub static LB_CONNS: Array<FlowCounters> = Array::with_max_entries(CONN_COUNTER_SLOTS, 0);

/// Flows the controller expired while idle, same index as `LB_CONNS` (controller-written).
#[map(name = "LB_EXPIRED")]
pub static LB_EXPIRED: Array<u64> = Array::with_max_entries(CONN_COUNTER_SLOTS, 0);

/// Interface roles (`IFACE_*`) by ifindex; 0 (or past the end) is every role.
#[map(name = "LB_IFACES")]
pub static LB_IFACES: Array<u32> = Array::with_max_entries(MAX_IFACES, 0);

/// Whether members' replies may arrive by the interface a packet came in by (its roles in
/// `LB_IFACES`; none set means every role).
#[inline(always)]
pub fn member_side(ctx: &XdpContext) -> bool {
    LB_IFACES
        .get(ctx.ingress_ifindex() as u32)
        .is_none_or(|roles| *roles == 0 || *roles & lbaas_common::IFACE_MEMBER != 0)
}

/// Per-CPU counters per member (refused stays zero).
#[map(name = "LB_MSTATS")]
pub static LB_MSTATS: PerCpuArray<ListenerStats> = PerCpuArray::with_max_entries(MAX_MEMBERS, 0);

/// Per-CPU counters per listener.
#[map(name = "LB_LSTATS")]
pub static LB_LSTATS: PerCpuArray<ListenerStats> = PerCpuArray::with_max_entries(MAX_LISTENERS, 0);

/// Per-CPU global counters (`STAT_*`).
#[map(name = "LB_GSTATS")]
pub static LB_GSTATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// The last reading of the clock and the tick (jiffies) it was taken in.
#[repr(C)]
pub struct ClockReading {
    jiffies: u64,
    ns: u64,
}

/// The last clock reading (see [`now_ns`]): a global (`.bss`), shared by all CPUs, so that
/// reading it is two loads, with no map lookup and no key on the stack. Whichever CPU first
/// sees a new tick writes it; a race writes readings of the same tick.
#[unsafe(no_mangle)]
static mut LB_CLOCK_READING: ClockReading = ClockReading { jiffies: 0, ns: 0 };

/// Now (CLOCK_MONOTONIC, the controller's clock too), for flow and next-hop stamps, to
/// within one scheduler tick: the clock is read once per tick and remembered. Reading the
/// tick costs a load (the verifier inlines `bpf_jiffies64`); a clock helper call costs
/// ~20-30 ns here, a fifth of an established packet's whole cost, for a precision nothing
/// needs: every stamp is compared against a second or more.
#[inline(always)]
pub fn now_ns() -> u64 {
    use aya_ebpf::helpers::{bpf_ktime_get_ns, generated::bpf_jiffies64};
    use core::ptr::{addr_of_mut, read_volatile, write_volatile};
    // SAFETY: helper without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let reading = addr_of_mut!(LB_CLOCK_READING);
    // SAFETY: a global of the program's own; volatile, because other CPUs write it. The
    // writer stores the time before the tick (on x86, which keeps stores and loads in order,
    // a reader that sees the new tick sees its time); where a reader could pair a new tick
    // with the previous time, that time is one tick old, which no stamp notices.
    unsafe {
        if read_volatile(addr_of_mut!((*reading).jiffies)) == jiffies {
            return read_volatile(addr_of_mut!((*reading).ns));
        }
        let ns = bpf_ktime_get_ns();
        write_volatile(addr_of_mut!((*reading).ns), ns);
        write_volatile(addr_of_mut!((*reading).jiffies), jiffies);
        ns
    }
}

/// Adds one to a global counter.
#[inline(always)]
pub fn count(stat: u32) {
    if let Some(slot) = LB_GSTATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

/// Index of a listener's slot in `LB_CONNS` / `LB_EXPIRED`.
#[inline(always)]
pub fn listener_slot(listener_id: u32) -> u32 {
    MAX_MEMBERS + listener_id
}

/// Active flows of a `LB_CONNS` slot: opened - closed - expired (never negative: races
/// between CPUs and the controller can make the parts briefly disagree).
#[inline(always)]
pub fn active_flows(slot: u32) -> u64 {
    let Some(c) = LB_CONNS.get(slot) else {
        return 0;
    };
    let expired = LB_EXPIRED.get(slot).copied().unwrap_or(0);
    c.opened.saturating_sub(c.closed).saturating_sub(expired)
}

/// Atomically adds one to a `LB_CONNS` slot's opened (or closed) count.
#[inline(always)]
pub fn count_flow(slot: u32, opened: bool) {
    if let Some(c) = LB_CONNS.get_ptr_mut(slot) {
        // SAFETY: a live, aligned map value; every CPU updates it atomically.
        unsafe {
            let field = if opened {
                core::ptr::addr_of_mut!((*c).opened)
            } else {
                core::ptr::addr_of_mut!((*c).closed)
            };
            atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(field, 1);
        }
    }
}

/// Which way a packet went through a listener, for its counters.
pub enum Direction {
    /// Client to member.
    In,
    /// Member to client.
    Out,
}

/// Adds one packet of `bytes` IP bytes to a listener's counters.
#[inline(always)]
pub fn count_listener(listener_id: u32, dir: Direction, bytes: u16, new_flow: bool) {
    count_in(&LB_LSTATS, listener_id, dir, bytes, new_flow);
}

/// Adds one packet of `bytes` IP bytes to a member's counters.
#[inline(always)]
pub fn count_member(member_id: u32, dir: Direction, bytes: u16, new_flow: bool) {
    count_in(&LB_MSTATS, member_id, dir, bytes, new_flow);
}

#[inline(always)]
fn count_in(
    map: &PerCpuArray<ListenerStats>,
    index: u32,
    dir: Direction,
    bytes: u16,
    new_flow: bool,
) {
    if let Some(stats) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        let stats = unsafe { &mut *stats };
        match dir {
            Direction::In => {
                stats.packets_in += 1;
                stats.bytes_in += u64::from(bytes);
            }
            Direction::Out => {
                stats.packets_out += 1;
                stats.bytes_out += u64::from(bytes);
            }
        }
        if new_flow {
            stats.new_flows += 1;
        }
    }
}

/// Adds one refused connection to a listener's counters.
#[inline(always)]
pub fn count_refused(listener_id: u32) {
    if let Some(stats) = LB_LSTATS.get_ptr_mut(listener_id) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { (*stats).refused += 1 };
    }
}

/// The benchmark wrapper's frame (see `MAP_BENCH_FRAME`).
#[map(name = "LB_BENCH_FRAME")]
pub static LB_BENCH_FRAME: Array<BenchFrame> = Array::with_max_entries(1, 0);

/// The benchmark wrapper's program under test (see `MAP_BENCH_TARGET`).
#[map(name = "LB_BENCH_TARGET")]
pub static LB_BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Member ids of refused connections, for the daemon (see `MAP_REFUSALS`).
#[map(name = "LB_REFUSALS")]
pub static LB_REFUSALS: RingBuf = RingBuf::with_byte_size(REFUSALS_BYTES, 0);

/// Tells the daemon a member refused a connection (dropped when the ring is full: the daemon
/// is already behind on this news, and one event per member is all it needs).
#[inline(always)]
pub fn report_refusal(member_id: u32) {
    let _ = LB_REFUSALS.output::<u32>(&member_id, 0);
}
