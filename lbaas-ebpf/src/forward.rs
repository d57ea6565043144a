//! Client -> VIP: keep established flows on their member, pick one for new flows, DNAT.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lbaas_common::{
    FlowKey, FlowState, MemberInfo, ReverseNat, STAT_DROP_NO_MEMBER, STAT_PASS_L7, VIP_F_L7_PASS,
    VipInfo,
};

use crate::{
    egress::{self, Rewrite},
    maps::{self, Direction, LB_CT, LB_CT_REV, LB_MEMBERS, LB_RING, LB_RR},
    parse::Packet,
};

/// Serves a packet aimed at a configured listener.
#[inline(always)]
pub fn to_member(ctx: &XdpContext, pkt: &Packet, vip: &VipInfo) -> Result<u32, ()> {
    if vip.flags & VIP_F_L7_PASS != 0 {
        maps::count(STAT_PASS_L7);
        return Ok(xdp_action::XDP_PASS);
    }
    let flow = pkt.flow_key();
    let (member, new_flow) = match established_member(&flow) {
        Some(member) => (member, false),
        None => match new_flow_member(&flow, pkt, vip) {
            Some(member) => (member, true),
            None => {
                maps::count(STAT_DROP_NO_MEMBER);
                return Ok(xdp_action::XDP_DROP);
            }
        },
    };
    maps::count_listener(vip.listener_id, Direction::In, pkt.tot_len, new_flow);
    egress::rewrite_and_send(
        ctx,
        pkt,
        Rewrite::Destination {
            addr: member.addr,
            port: member.port,
        },
    )
}

/// The member an existing flow is pinned to, if that member is still configured.
#[inline(always)]
fn established_member(flow: &FlowKey) -> Option<MemberInfo> {
    // SAFETY: read-only copy of an entry written whole.
    let state = unsafe { LB_CT.get(flow) }?;
    let member = LB_MEMBERS.get(state.member_id)?;
    // A removed member has its generation bumped and its address cleared.
    if member.addr == 0 || member.generation != state.member_generation {
        return None;
    }
    Some(*member)
}

/// Picks a member for a new flow and records the flow both ways.
#[inline(always)]
fn new_flow_member(flow: &FlowKey, pkt: &Packet, vip: &VipInfo) -> Option<MemberInfo> {
    if vip.ring_len == 0 {
        return None;
    }
    let counter = LB_RR.get_ptr_mut(vip.listener_id)?;
    // One counter shared by all CPUs gives a strict global rotation; the BPF target has no
    // compare-and-swap, so core's AtomicU64 lacks fetch_add, but BPF_ATOMIC fetch-add exists.
    // SeqCst on purpose: with Relaxed, LLVM 22's BPF backend emits the non-fetching `lock +=`
    // and then uses the addend as if it were the old value (every turn read as 1).
    // SAFETY: the pointer is to a live, aligned u64 map value; all CPUs touch it atomically.
    let turn = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(counter, 1) };
    let slot = vip.ring_base + (turn % u64::from(vip.ring_len)) as u32;
    let member_id = *LB_RING.get(slot)?;
    let member = *LB_MEMBERS.get(member_id)?;
    if member.addr == 0 {
        return None;
    }
    let state = FlowState {
        member_id,
        member_generation: member.generation,
        listener_id: vip.listener_id,
        _pad: 0,
    };
    let reply = FlowKey {
        src_addr: member.addr,
        dst_addr: pkt.src_addr,
        src_port: member.port,
        dst_port: pkt.src_port,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let nat = ReverseNat {
        vip_addr: pkt.dst_addr,
        vip_port: pkt.dst_port,
        _pad: 0,
        listener_id: vip.listener_id,
    };
    // Reverse entry first: a reply can never find a flow without its way back.
    LB_CT_REV.insert(reply, nat, 0).ok()?;
    LB_CT.insert(flow, state, 0).ok()?;
    Some(member)
}
