//! Member -> client: restore the VIP as the source of a tracked flow's replies.

use crate::{
    egress::{self, Rewrite},
    maps::{self, Direction, LB_CT_REV},
    parse::Packet,
};
use aya_ebpf::programs::XdpContext;

/// Reverse-translates a member's reply; `None` when the packet belongs to no tracked flow.
#[inline(always)]
pub fn to_client(ctx: &XdpContext, pkt: &Packet) -> Result<Option<u32>, ()> {
    let key = pkt.flow_key();
    // SAFETY: read-only copy of an entry written whole.
    let Some(nat) = (unsafe { LB_CT_REV.get(key) }).copied() else {
        return Ok(None);
    };
    maps::count_listener(nat.listener_id, Direction::Out, pkt.tot_len, false);
    egress::rewrite_and_send(
        ctx,
        pkt,
        Rewrite::Source {
            addr: nat.vip_addr,
            port: nat.vip_port,
        },
    )
    .map(Some)
}
