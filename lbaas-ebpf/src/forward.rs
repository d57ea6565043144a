//! Client -> VIP: keep established flows on their member, pick one for new flows, DNAT.

use core::intrinsics::{AtomicOrdering, atomic_xadd, atomic_xchg};

use aya_ebpf::{
    bindings::xdp_action, cty::c_void, helpers::generated::bpf_loop, programs::XdpContext,
};
use lbaas_common::{
    ALGO_LEAST_CONNECTIONS, ALGO_MAGLEV_5TUPLE, ALGO_MAGLEV_SOURCE, FLOW_CLOSED, FlowKey,
    FlowState, HalfOpen, IPPROTO_TCP, MAX_LEAST_CONN_MEMBERS, MEMBER_F_SOLE_VIP, MemberInfo,
    ReverseNat, STAT_DROP_NO_MEMBER, STAT_DROP_SOURCE, STAT_PASS_L7, VIP_F_L7_PASS,
    VIP_F_SOURCE_FILTER, VipInfo, hash_5tuple, hash_source,
};

use crate::{
    egress::{self, Rewrite},
    maps::{
        self, Direction, LB_CT, LB_CT_REV, LB_CT_SYN, LB_CT_SYN_REV, LB_MEMBERS, LB_RING, LB_RR,
    },
    parse::{self, Packet},
    refuse,
};

/// How often (ns) a flow's `last_seen_ns` is refreshed: often enough for idle expiry in
/// seconds, rarely enough not to write the entry on every packet.
const LAST_SEEN_REFRESH_NS: u64 = 1_000_000_000;

/// Serves a packet of an established flow (`None`: the packet opens or belongs to no flow
/// in the connection table). Looked up before the VIP table: an established packet needs
/// nothing from its listener's entry but the id its flow remembers, and the VIP lookup
/// would be a second hash lookup on every packet. (So a flow of a listener since removed
/// finishes on its member, as a removed member's flows do, and as HAProxy's old process
/// finishes its connections after a reload.)
#[inline(always)]
pub fn established(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    now: u64,
) -> Result<Option<u32>, ()> {
    let Some((member_id, member, listener_id)) = established_member(flow, pkt, now) else {
        return Ok(None);
    };
    maps::count_listener(listener_id, Direction::In, pkt.tot_len, false);
    maps::count_member(member_id, Direction::In, pkt.tot_len, false);
    to_member_rewrite(ctx, pkt, member_id, &member, now).map(Some)
}

/// Serves a packet aimed at a configured listener that is in no established flow.
#[inline(always)]
pub fn to_member(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    vip: &VipInfo,
    now: u64,
) -> Result<u32, ()> {
    if vip.flags & VIP_F_L7_PASS != 0 {
        maps::count(STAT_PASS_L7);
        return Ok(xdp_action::XDP_PASS);
    }
    let ((member_id, member), new_flow) = match half_open_member(ctx, flow, pkt, vip) {
        Some(member) => (member, false),
        None => {
            // Like a security group: an outside source gets no answer at all. Only new flows
            // are checked, so the lookup costs established traffic nothing.
            if vip.flags & VIP_F_SOURCE_FILTER != 0
                && !maps::source_allowed(vip.listener_id, pkt.src_addr)
            {
                maps::count_refused(vip.listener_id);
                maps::count(STAT_DROP_SOURCE);
                return Ok(xdp_action::XDP_DROP);
            }
            if vip.conn_limit != 0
                && maps::active_flows(maps::listener_slot(vip.listener_id))
                    >= u64::from(vip.conn_limit)
            {
                maps::count_refused(vip.listener_id);
                return refuse::connection(ctx, pkt);
            }
            match new_flow_member(ctx, flow, pkt, vip, now) {
                Some(member) => (member, true),
                None => {
                    // Refused at once (a RST to a SYN) rather than left to time out.
                    maps::count(STAT_DROP_NO_MEMBER);
                    return refuse::connection(ctx, pkt);
                }
            }
        }
    };
    maps::count_listener(vip.listener_id, Direction::In, pkt.tot_len, new_flow);
    maps::count_member(member_id, Direction::In, pkt.tot_len, new_flow);
    to_member_rewrite(ctx, pkt, member_id, &member, now)
}

/// DNAT to the member, then on to its next hop.
#[inline(always)]
fn to_member_rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    member_id: u32,
    member: &MemberInfo,
    now: u64,
) -> Result<u32, ()> {
    egress::rewrite_and_send(
        ctx,
        pkt,
        Rewrite::Destination {
            member_id,
            addr: member.addr,
            port: member.port,
        },
        now,
    )
}

/// Marks a flow closed, once: the first FIN or RST (either way) ends its active count.
#[inline(always)]
pub fn close_flow(state: *mut FlowState) {
    // SAFETY: a live map value; xchg makes exactly one CPU see the transition.
    let was = unsafe {
        atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(
            core::ptr::addr_of_mut!((*state).state),
            FLOW_CLOSED,
        )
    };
    if was & FLOW_CLOSED != 0 {
        return;
    }
    // SAFETY: as above; plain reads of fields written once at insert.
    let (member_id, generation, listener_id) = unsafe {
        (
            (*state).member_id,
            (*state).member_generation,
            (*state).listener_id,
        )
    };
    // A reused member id counts for its new occupant only.
    if LB_MEMBERS
        .get(member_id)
        .is_some_and(|m| m.generation == generation)
    {
        maps::count_flow(member_id, false);
    }
    maps::count_flow(maps::listener_slot(listener_id), false);
}

/// The member an existing flow is pinned to (and the flow's listener), if that member is
/// still configured and the flow is not a closed one being reopened by a new SYN.
#[inline(always)]
fn established_member(flow: &FlowKey, pkt: &Packet, now: u64) -> Option<(u32, MemberInfo, u32)> {
    let state = LB_CT.get_ptr_mut(flow)?;
    // SAFETY: a live map value; fields other than `state` and `last_seen_ns` never change.
    let (member_id, generation, flags, last_seen, listener_id) = unsafe {
        (
            (*state).member_id,
            (*state).member_generation,
            (*state).state,
            (*state).last_seen_ns,
            (*state).listener_id,
        )
    };
    let member = LB_MEMBERS.get(member_id)?;
    // A removed member has its address cleared; a reused id has a new generation.
    if member.addr == 0 || member.generation != generation {
        close_flow(state);
        return None;
    }
    if flags & FLOW_CLOSED != 0 && pkt.is_syn() {
        // The client reuses the ports of a finished connection: the new one starts afresh.
        let _ = LB_CT.remove(flow);
        return None;
    }
    if pkt.is_close() {
        close_flow(state);
    }
    if now.wrapping_sub(last_seen) > LAST_SEEN_REFRESH_NS {
        // SAFETY: a live map value; a racing refresh from another CPU writes a similar time.
        unsafe { (*state).last_seen_ns = now };
    }
    Some((member_id, *member, listener_id))
}

/// A half-open TCP flow's member: a retransmitted SYN goes where the first went; any other
/// packet promotes the flow to the connection table (the handshake went through), where it
/// starts counting as open.
#[inline(always)]
fn half_open_member(
    ctx: &XdpContext,
    flow: &FlowKey,
    pkt: &Packet,
    vip: &VipInfo,
) -> Option<(u32, MemberInfo)> {
    if pkt.proto != IPPROTO_TCP {
        return None;
    }
    let entry = LB_CT_SYN.get_ptr_mut(flow)?;
    // SAFETY: a live map value, written whole at insert; only `has_reverse` changes after.
    let (state, has_reverse) = unsafe { ((*entry).flow, (*entry).has_reverse) };
    let member = *LB_MEMBERS.get(state.member_id)?;
    if member.addr == 0 || member.generation != state.member_generation {
        let _ = LB_CT_SYN.remove(flow);
        return None;
    }
    let reply = reply_key(&member, pkt);
    let nat = reverse_nat(ctx, pkt, vip, state.member_id, parse::macs(ctx).ok()?);
    if pkt.is_syn() {
        // A retransmitted SYN: the member's SYN-ACK may not have found its way back (an apply
        // took the member's endpoint out of LB_MVIP meanwhile), so the next one finds the
        // reverse entry. Retransmissions only: the first SYN of such a member skips it.
        if has_reverse == 0 && LB_CT_SYN_REV.insert(reply, nat, 0).is_ok() {
            // SAFETY: as above; a racing CPU writes the same value.
            unsafe { (*entry).has_reverse = 1 };
        }
        return Some((state.member_id, member));
    }
    LB_CT_REV.insert(reply, nat, 0).ok()?;
    LB_CT.insert(flow, state, 0).ok()?;
    if has_reverse != 0 {
        let _ = LB_CT_SYN_REV.remove(reply);
    }
    let _ = LB_CT_SYN.remove(flow);
    maps::count_flow(state.member_id, true);
    maps::count_flow(maps::listener_slot(vip.listener_id), true);
    if pkt.is_close()
        && let Some(state) = LB_CT.get_ptr_mut(flow)
    {
        close_flow(state);
    }
    Some((state.member_id, member))
}

/// The key a member's replies to this client carry.
#[inline(always)]
fn reply_key(member: &MemberInfo, pkt: &Packet) -> FlowKey {
    FlowKey::new(
        member.addr,
        pkt.src_addr,
        member.port,
        pkt.src_port,
        pkt.proto,
    )
}

/// How a member's replies are made to come from the VIP, and the client's L2 address as a
/// fallback next hop.
#[inline(always)]
fn reverse_nat(
    ctx: &XdpContext,
    pkt: &Packet,
    vip: &VipInfo,
    member_id: u32,
    (local_mac, client_mac): ([u8; 6], [u8; 6]),
) -> ReverseNat {
    ReverseNat {
        vip_addr: pkt.dst_addr,
        vip_port: pkt.dst_port,
        _pad: 0,
        listener_id: vip.listener_id,
        client_ifindex: ctx.ingress_ifindex() as u32,
        client_mac,
        local_mac,
        member_id,
    }
}

/// Picks a member id for a new flow by the listener's algorithm.
#[inline(always)]
fn select(pkt: &Packet, vip: &VipInfo) -> Option<u32> {
    // checked_rem: a zero length is refused by the caller, and the check keeps any panic
    // path (which the verifier rejects) out of the program.
    let slot = match vip.algorithm {
        ALGO_MAGLEV_SOURCE => hash_source(pkt.src_addr).checked_rem(vip.ring_len)?,
        ALGO_MAGLEV_5TUPLE => hash_5tuple(
            pkt.src_addr,
            pkt.dst_addr,
            pkt.src_port,
            pkt.dst_port,
            pkt.proto,
        )
        .checked_rem(vip.ring_len)?,
        ALGO_LEAST_CONNECTIONS => return least_connections(vip),
        _ => next_turn(vip.listener_id)?.checked_rem(u64::from(vip.ring_len))? as u32,
    };
    LB_RING.get(vip.ring_base + slot).copied()
}

/// The listener's shared turn counter, incremented: strict global round robin.
#[inline(always)]
fn next_turn(listener_id: u32) -> Option<u64> {
    let counter = LB_RR.get_ptr_mut(listener_id)?;
    // One counter shared by all CPUs gives a strict global rotation; the BPF target has no
    // compare-and-swap, so core's AtomicU64 lacks fetch_add, but BPF_ATOMIC fetch-add exists.
    // SeqCst on purpose: with Relaxed, LLVM 22's BPF backend emits the non-fetching `lock +=`
    // and then uses the addend as if it were the old value (every turn read as 1).
    // SAFETY: the pointer is to a live, aligned u64 map value; all CPUs touch it atomically.
    Some(unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(counter, 1) })
}

/// The least-connections scan's running state, which [`least_connections_visit`] reads
/// and updates once per candidate.
#[repr(C)]
struct LeastConnScan {
    ring_base: u32,
    len: u32,
    start: u32,
    best: u32,
    best_active: u64,
    best_weight: u64,
}

/// The candidate with the fewest active flows per weight; the scan starts at the next
/// round-robin turn, so ties rotate. The scan runs through `bpf_loop`, so the verifier proves
/// its body once instead of once per candidate on every path that reaches it (up to
/// `MAX_LEAST_CONN_MEMBERS` times the rest of the program's branches).
#[inline(always)]
fn least_connections(vip: &VipInfo) -> Option<u32> {
    let len = vip.ring_len;
    let start = next_turn(vip.listener_id)?.checked_rem(u64::from(len))? as u32;
    let mut scan = LeastConnScan {
        ring_base: vip.ring_base,
        len,
        start,
        best: u32::MAX,
        best_active: 0,
        best_weight: 1,
    };
    // SAFETY: the callback is a static function of this program and the context a live
    // stack value it alone reads and writes, for the duration of the call.
    unsafe {
        bpf_loop(
            len.min(MAX_LEAST_CONN_MEMBERS),
            least_connections_visit as *const () as *mut c_void,
            (&raw mut scan).cast(),
            0,
        )
    };
    (scan.best != u32::MAX).then_some(scan.best)
}

/// One candidate of the least-connections scan (`bpf_loop` callback: 0 goes on).
#[inline(never)]
extern "C" fn least_connections_visit(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands back the context `least_connections` passed: its LeastConnScan.
    let scan = unsafe { &mut *ctx.cast::<LeastConnScan>() };
    let mut index = scan.start.wrapping_add(i as u32);
    if index >= scan.len {
        index = index.wrapping_sub(scan.len);
    }
    let Some(id) = LB_RING.get(scan.ring_base.wrapping_add(index)).copied() else {
        return 0;
    };
    let Some(member) = LB_MEMBERS.get(id) else {
        return 0;
    };
    if member.addr == 0 || member.weight == 0 {
        return 0;
    }
    let active = maps::active_flows(id);
    let weight = u64::from(member.weight);
    // active / weight < best_active / best_weight, without division.
    if scan.best == u32::MAX || active * scan.best_weight < scan.best_active * weight {
        scan.best = id;
        scan.best_active = active;
        scan.best_weight = weight;
    }
    0
}

/// Picks a member for a new flow and records the flow both ways.
#[inline(always)]
fn new_flow_member(
    ctx: &XdpContext,
    flow: &FlowKey,
    pkt: &Packet,
    vip: &VipInfo,
    now: u64,
) -> Option<(u32, MemberInfo)> {
    if vip.ring_len == 0 {
        return None;
    }
    let member_id = select(pkt, vip)?;
    let member = *LB_MEMBERS.get(member_id)?;
    if member.addr == 0 {
        return None;
    }
    let state = FlowState {
        member_id,
        member_generation: member.generation,
        listener_id: vip.listener_id,
        state: 0,
        last_seen_ns: now,
    };
    // Every new flow records the client's L2 addresses (a reply's fallback next hop).
    let macs = parse::macs(ctx).ok()?;
    if pkt.proto == IPPROTO_TCP {
        // Half-open until the client's next packet: a SYN flood churns only these tables.
        // A member whose endpoint serves only this listener needs no reverse entry: its
        // SYN-ACK finds the flow through LB_MVIP (reply::half_open_nat).
        let has_reverse = member.flags & MEMBER_F_SOLE_VIP == 0;
        if has_reverse {
            // Reverse entry first: a reply can never find a flow without its way back.
            LB_CT_SYN_REV
                .insert(
                    reply_key(&member, pkt),
                    reverse_nat(ctx, pkt, vip, member_id, macs),
                    0,
                )
                .ok()?;
        }
        let (local_mac, client_mac) = macs;
        let half_open = HalfOpen {
            flow: state,
            client_ifindex: ctx.ingress_ifindex() as u32,
            has_reverse: u32::from(has_reverse),
            client_mac,
            local_mac,
            _pad: 0,
        };
        LB_CT_SYN.insert(flow, half_open, 0).ok()?;
        return Some((member_id, member));
    }
    let reply = reply_key(&member, pkt);
    let nat = reverse_nat(ctx, pkt, vip, member_id, macs);
    LB_CT_REV.insert(reply, nat, 0).ok()?;
    LB_CT.insert(flow, state, 0).ok()?;
    maps::count_flow(member_id, true);
    maps::count_flow(maps::listener_slot(vip.listener_id), true);
    Some((member_id, member))
}
