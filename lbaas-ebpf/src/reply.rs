//! Member -> client: restore the VIP as the source of a tracked flow's replies.

use aya_ebpf::programs::XdpContext;
use lbaas_common::{FlowKey, ReverseNat, VipKey};

use crate::{
    egress::{self, Rewrite},
    forward::close_flow,
    maps::{self, Direction, LB_CT, LB_CT_REV, LB_CT_SYN, LB_CT_SYN_REV, LB_MEMBERS, LB_MVIP},
    parse::Packet,
};

/// Reverse-translates a member's reply; `None` when the packet belongs to no tracked flow.
#[inline(always)]
pub fn to_client(ctx: &XdpContext, pkt: &Packet) -> Result<Option<u32>, ()> {
    let key = pkt.flow_key();
    // SAFETY: read-only copies of entries written whole.
    let nat = match unsafe { LB_CT_REV.get(key) } {
        Some(nat) => *nat,
        // A member's answer to a half-open flow (SYN-ACK, bare ACK, FIN, RST). Data skips
        // the lookup: a member's own traffic routed through this node costs one miss, not
        // two (its bare ACKs, two).
        None if pkt.may_answer_half_open() => match half_open_nat(pkt, &key) {
            Some(nat) => {
                if pkt.is_reset() {
                    end_half_open(pkt, &key, &nat);
                }
                nat
            }
            None => return Ok(None),
        },
        None => return Ok(None),
    };
    if pkt.is_close()
        && let Some(state) = LB_CT.get_ptr_mut(client_key(pkt, nat.vip_addr, nat.vip_port))
    {
        close_flow(state);
    }
    maps::count_listener(nat.listener_id, Direction::Out, pkt.tot_len, false);
    maps::count_member(nat.member_id, Direction::Out, pkt.tot_len, false);
    egress::rewrite_and_send(
        ctx,
        pkt,
        Rewrite::Source {
            addr: nat.vip_addr,
            port: nat.vip_port,
            fallback: (nat.client_ifindex, nat.client_mac, nat.local_mac),
        },
        maps::now_ns(),
    )
    .map(Some)
}

/// Forgets a half-open flow its member refused (RST): the client's connection is over. Kept,
/// it would send a new connection from the same client port (free again at once after a RST,
/// and soon reused) to the member that refused, as if it were the SYN's retransmission. The
/// daemon hears of the refusal, and probes the member now.
#[inline(always)]
fn end_half_open(pkt: &Packet, key: &FlowKey, nat: &ReverseNat) {
    maps::report_refusal(nat.member_id);
    let _ = LB_CT_SYN.remove(client_key(pkt, nat.vip_addr, nat.vip_port));
    // Only an endpoint shared by several listeners has one (a miss otherwise; RSTs only).
    let _ = LB_CT_SYN_REV.remove(key);
}

/// The client-side key of the flow a member's packet answers: client -> VIP.
#[inline(always)]
fn client_key(pkt: &Packet, vip_addr: u32, vip_port: u16) -> FlowKey {
    FlowKey::new(pkt.dst_addr, vip_addr, pkt.dst_port, vip_port, pkt.proto)
}

/// How to rewrite a member's answer to a half-open flow: from the flow itself when the member's
/// endpoint serves one listener (LB_MVIP names its VIP, the packet its client), else from the
/// reverse half-open table.
#[inline(always)]
fn half_open_nat(pkt: &Packet, key: &FlowKey) -> Option<ReverseNat> {
    let endpoint = VipKey::new(pkt.src_addr, pkt.src_port, pkt.proto);
    // SAFETY: read-only copies of entries written whole.
    if let Some(vip) = unsafe { LB_MVIP.get(endpoint) }.copied()
        && let Some(half) = unsafe { LB_CT_SYN.get(client_key(pkt, vip.addr, vip.port)) }
        // The flow went to this member, not to another that answers for the same client.
        && LB_MEMBERS
            .get(half.flow.member_id)
            .is_some_and(|m| m.addr == pkt.src_addr && m.port == pkt.src_port)
    {
        return Some(ReverseNat {
            vip_addr: vip.addr,
            vip_port: vip.port,
            _pad: 0,
            listener_id: half.flow.listener_id,
            client_ifindex: half.client_ifindex,
            client_mac: half.client_mac,
            local_mac: half.local_mac,
            member_id: half.flow.member_id,
        });
    }
    // The member's endpoint serves several listeners (or did when the SYN went out).
    unsafe { LB_CT_SYN_REV.get(key) }.copied()
}
