//! Refusing a new connection (over the listener's limit, or with no usable member, as for a
//! disabled listener): a TCP SYN is answered with a RST
//! (the client sees "connection refused" at once instead of retrying into a timeout); anything
//! else is dropped.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_redirect, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lbaas_common::{IPPROTO_TCP, STAT_DROP_CONN_LIMIT, STAT_REFUSED_RST};

use crate::{
    checksum::fold,
    maps,
    parse::{Packet, TCP_ACK, TCP_RST, ip, l4, read, write},
};

const IPV4_HLEN: u16 = 20;
const TCP_HLEN: u16 = 20;

/// Refuses the connection `pkt` opens.
#[inline(always)]
pub fn connection(ctx: &XdpContext, pkt: &Packet) -> Result<u32, ()> {
    if !pkt.is_syn() {
        maps::count(STAT_DROP_CONN_LIMIT);
        return Ok(xdp_action::XDP_DROP);
    }
    let action = reset(ctx, pkt)?;
    maps::count(STAT_REFUSED_RST);
    Ok(action)
}

/// Turns the SYN in place into the RST|ACK that answers it, and sends it back.
#[inline(always)]
fn reset(ctx: &XdpContext, pkt: &Packet) -> Result<u32, ()> {
    let seq = u32::from_be(read::<u32>(ctx, pkt.l4_off + l4::TCP_SEQ)?);
    // Drop options and payload: the answer is a bare 20-byte TCP header.
    let frame_len = (ctx.data_end() - ctx.data()) as i32;
    let want = (pkt.l4_off + usize::from(TCP_HLEN)) as i32;
    if frame_len > want {
        // SAFETY: shrinking the frame is always allowed; pointers are re-read afterwards.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want - frame_len) } != 0 {
            return Err(());
        }
    }
    // Ethernet: back to the sender.
    let dst_mac: [u8; 6] = read(ctx, 0)?;
    let src_mac: [u8; 6] = read(ctx, 6)?;
    write(ctx, 0, src_mac)?;
    write(ctx, 6, dst_mac)?;
    // IPv4: swapped addresses, fresh header.
    let l3 = pkt.l3_off;
    write(ctx, l3 + ip::TOT_LEN, (IPV4_HLEN + TCP_HLEN).to_be())?;
    write(ctx, l3 + 4, 0u32)?; // id, flags, fragment offset
    write(ctx, l3 + 8, [64u8, IPPROTO_TCP])?; // TTL, protocol
    write(ctx, l3 + ip::CHECK, 0u16)?;
    write(ctx, l3 + ip::SADDR, pkt.dst_addr)?;
    write(ctx, l3 + ip::DADDR, pkt.src_addr)?;
    let header: [u16; 10] = read(ctx, l3)?;
    let mut sum = 0u32;
    for word in header {
        sum += u32::from(word);
    }
    write(ctx, l3 + ip::CHECK, !fold(sum))?;
    // TCP: RST|ACK acknowledging the SYN.
    let l4o = pkt.l4_off;
    write(ctx, l4o + l4::SPORT, pkt.dst_port)?;
    write(ctx, l4o + l4::DPORT, pkt.src_port)?;
    write(ctx, l4o + l4::TCP_SEQ, 0u32)?;
    write(ctx, l4o + 8, seq.wrapping_add(1).to_be())?;
    write(ctx, l4o + l4::TCP_DOFF, [5u8 << 4, TCP_RST | TCP_ACK])?;
    write(ctx, l4o + 14, 0u16)?; // window
    write(ctx, l4o + l4::TCP_CHECK, 0u32)?; // checksum and urgent pointer
    let segment: [u16; 10] = read(ctx, l4o)?;
    let mut sum = (pkt.src_addr >> 16)
        + (pkt.src_addr & 0xffff)
        + (pkt.dst_addr >> 16)
        + (pkt.dst_addr & 0xffff);
    sum += u32::from(u16::from(IPPROTO_TCP).to_be()) + u32::from(TCP_HLEN.to_be());
    for word in segment {
        sum += u32::from(word);
    }
    write(ctx, l4o + l4::TCP_CHECK, !fold(sum))?;
    // Back out of the interface it came in by. A redirect rather than XDP_TX: veth flushes
    // XDP_TX frames to its peer only when the peer runs an XDP program, so a RST could sit
    // queued until unrelated traffic came by; the redirect path always flushes. Refusals are
    // rare, the difference in cost does not matter.
    // SAFETY: plain helper call; it only records the target for after the program returns.
    Ok(unsafe { bpf_redirect(ctx.ingress_ifindex() as u32, 0) } as u32)
}
