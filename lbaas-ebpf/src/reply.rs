//! Member -> client: restore the VIP as the source of a tracked flow's replies.

use aya_ebpf::programs::XdpContext;
use lbaas_common::FlowKey;

use crate::{
    egress::{self, Rewrite},
    forward::close_flow,
    maps::{self, Direction, LB_CT, LB_CT_REV, LB_CT_SYN_REV},
    parse::Packet,
};

/// Reverse-translates a member's reply; `None` when the packet belongs to no tracked flow.
#[inline(always)]
pub fn to_client(ctx: &XdpContext, pkt: &Packet) -> Result<Option<u32>, ()> {
    let key = pkt.flow_key();
    // SAFETY: read-only copies of entries written whole.
    let nat = match unsafe { LB_CT_REV.get(key) } {
        Some(nat) => *nat,
        // A SYN-ACK (or a FIN or RST) to a half-open flow. Other packets skip the lookup:
        // a member's own traffic routed through this node costs one miss, not two.
        None if pkt.may_answer_half_open() => match unsafe { LB_CT_SYN_REV.get(key) } {
            Some(nat) => *nat,
            None => return Ok(None),
        },
        None => return Ok(None),
    };
    if pkt.is_close() {
        // The client-side key of this flow: client -> VIP.
        let flow = FlowKey {
            src_addr: pkt.dst_addr,
            dst_addr: nat.vip_addr,
            src_port: pkt.dst_port,
            dst_port: nat.vip_port,
            proto: pkt.proto,
            _pad: [0; 3],
        };
        if let Some(state) = LB_CT.get_ptr_mut(flow) {
            close_flow(state);
        }
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
