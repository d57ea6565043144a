//! Address rewrite with incremental checksums, then the next hop from the kernel's FIB.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lbaas_common::{
    CachedHop, IPPROTO_TCP, NEXT_HOP_TTL_NS, STAT_FORWARDED, STAT_PASS_NO_NEIGH, client_hop_slot,
};

use crate::{
    checksum,
    maps::{self, LB_MHOP, LB_NEXTHOP},
    parse::{Packet, ip, l4, read, write},
};

const AF_INET: u8 = 2;

/// Which end of the packet gets a new address and port.
pub enum Rewrite {
    /// DNAT: client -> member.
    Destination {
        /// The member's id (its next hop is cached at that index).
        member_id: u32,
        /// New destination address (network order).
        addr: u32,
        /// New destination port (network order).
        port: u16,
    },
    /// Reverse NAT: member -> client appears to come from the VIP.
    Source {
        /// New source address (network order).
        addr: u32,
        /// New source port (network order).
        port: u16,
        /// Where the client's packets came from (interface, client MAC, our MAC): the next
        /// hop when the FIB has no neighbour entry for the client. Handing such a reply to
        /// the host stack would not do: its source is a local address (the VIP), which the
        /// stack drops as martian.
        fallback: (u32, [u8; 6], [u8; 6]),
    },
}

/// Rewrites the packet, then forwards it to the next hop the FIB names. `now` is the
/// packet's [`maps::now_ns`] (the caller's, so a packet reads the clock once).
#[inline(always)]
pub fn rewrite_and_send(
    ctx: &XdpContext,
    pkt: &Packet,
    rewrite: Rewrite,
    now: u64,
) -> Result<u32, ()> {
    let (addr_off, port_off, old_addr, old_port, addr, port) = match rewrite {
        Rewrite::Destination { addr, port, .. } => {
            (ip::DADDR, l4::DPORT, pkt.dst_addr, pkt.dst_port, addr, port)
        }
        Rewrite::Source { addr, port, .. } => {
            (ip::SADDR, l4::SPORT, pkt.src_addr, pkt.src_port, addr, port)
        }
    };
    let ip_check_off = pkt.l3_off + ip::CHECK;
    let ip_check: u16 = read(ctx, ip_check_off)?;
    write(
        ctx,
        ip_check_off,
        checksum::replace4(ip_check, old_addr, addr),
    )?;
    write(ctx, pkt.l3_off + addr_off, addr)?;

    let l4_check_off = if pkt.proto == IPPROTO_TCP {
        pkt.l4_off + l4::TCP_CHECK
    } else {
        pkt.l4_off + l4::UDP_CHECK
    };
    let l4_check: u16 = read(ctx, l4_check_off)?;
    // A UDP checksum of zero means "none" and must stay so.
    if pkt.proto == IPPROTO_TCP || l4_check != 0 {
        let mut check = checksum::replace4(l4_check, old_addr, addr);
        check = checksum::replace2(check, old_port, port);
        if pkt.proto != IPPROTO_TCP && check == 0 {
            check = 0xffff;
        }
        write(ctx, l4_check_off, check)?;
    }
    write(ctx, pkt.l4_off + port_off, port)?;

    let (src, dst, fallback, member) = match rewrite {
        Rewrite::Destination { member_id, .. } => (pkt.src_addr, addr, None, Some(member_id)),
        Rewrite::Source { fallback, .. } => (addr, pkt.dst_addr, Some(fallback), None),
    };
    let to = Destination {
        src,
        dst,
        member,
        fallback,
    };
    next_hop(ctx, pkt, &to, now)
}

/// Sets the MACs of the next hop and sends the frame out of the interface the FIB names.
///
/// When the FIB cannot name a resolved next hop (no neighbour entry yet, or a VLAN-tagged frame
/// leaving by another device), the rewritten packet goes to the host stack, which routes it
/// to the same place and resolves the neighbour for the next packets.
#[inline(always)]
fn next_hop(ctx: &XdpContext, pkt: &Packet, to: &Destination, now: u64) -> Result<u32, ()> {
    let ingress = ctx.ingress_ifindex() as u32;
    let (ifindex, dmac, smac) = match cached_hop(to, ingress, now) {
        Some(hop) => hop,
        None => match fib_hop(ctx, pkt, to, ingress, now) {
            Some(hop) => hop,
            None => match to.fallback {
                Some(hop) if hop.0 != 0 && !pkt.vlan => hop,
                _ => {
                    maps::count(STAT_PASS_NO_NEIGH);
                    return Ok(xdp_action::XDP_PASS);
                }
            },
        },
    };
    let same_link = ifindex == ingress;
    if pkt.vlan && !same_link {
        maps::count(STAT_PASS_NO_NEIGH);
        return Ok(xdp_action::XDP_PASS);
    }
    write(ctx, 0, dmac)?;
    write(ctx, 6, smac)?;
    maps::count(STAT_FORWARDED);
    if same_link {
        return Ok(xdp_action::XDP_TX);
    }
    // SAFETY: plain helper call; it only records the target for after the program returns.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as u32)
}

/// Where a rewritten packet goes: its addresses after the rewrite, the member it goes to
/// (forward direction), and the client's remembered L2 next hop (replies).
struct Destination {
    src: u32,
    dst: u32,
    member: Option<u32>,
    fallback: Option<(u32, [u8; 6], [u8; 6])>,
}

/// This CPU's cache slot for a destination: the member's own (forward direction) or the
/// client address's hash slot (replies).
#[inline(always)]
fn hop_slot(to: &Destination, ingress: u32) -> Option<*mut CachedHop> {
    match to.member {
        Some(id) => LB_MHOP.get_ptr_mut(id),
        None => LB_NEXTHOP.get_ptr_mut(client_hop_slot(to.dst, ingress)),
    }
}

/// A next hop the FIB gave this CPU, for this address and ingress interface, less than
/// `NEXT_HOP_TTL_NS` ago: an array read instead of a FIB lookup, which costs several times
/// more per packet. (Source-based policy routing is followed only as often as the TTL.)
#[inline(always)]
fn cached_hop(to: &Destination, ingress: u32, now: u64) -> Option<(u32, [u8; 6], [u8; 6])> {
    // SAFETY: this CPU's own slot, read while nothing else can write it.
    let hop = unsafe { *hop_slot(to, ingress)? };
    (hop.addr == to.dst
        && hop.ingress == ingress
        && now.wrapping_sub(hop.stamp_ns) < NEXT_HOP_TTL_NS)
        .then_some((hop.ifindex, hop.dmac, hop.smac))
}

/// Asks the FIB for the next hop (and caches a resolved answer).
#[inline(always)]
fn fib_hop(
    ctx: &XdpContext,
    pkt: &Packet,
    to: &Destination,
    ingress: u32,
    now: u64,
) -> Option<(u32, [u8; 6], [u8; 6])> {
    let (src, dst) = (to.src, to.dst);
    // SAFETY: an all-zero bpf_fib_lookup is a valid input (plain integers and unions of them).
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = pkt.proto;
    params.__bindgen_anon_1.tot_len = pkt.tot_len;
    params.__bindgen_anon_3.ipv4_src = src;
    params.__bindgen_anon_4.ipv4_dst = dst;
    params.ifindex = ingress;
    // SAFETY: params lives on the stack for the duration of the call, with its true size.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        return None;
    }
    if let Some(slot) = hop_slot(to, ingress) {
        // SAFETY: this CPU's own slot; no other CPU reads or writes it.
        unsafe {
            *slot = CachedHop {
                addr: dst,
                ingress,
                ifindex: params.ifindex,
                dmac: params.dmac,
                smac: params.smac,
                stamp_ns: now,
            }
        };
    }
    Some((params.ifindex, params.dmac, params.smac))
}
