//! Bounds-checked header parsing. Anything the fast path does not handle (non-IPv4, IP options,
//! fragments, short or inconsistent headers, other L4 protocols) becomes an XDP_PASS verdict
//! with the frame untouched, so the host stack sees exactly what arrived.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lbaas_common::{
    FlowKey, IPPROTO_TCP, IPPROTO_UDP, STAT_PASS_FRAGMENT, STAT_PASS_IP_OPTIONS,
    STAT_PASS_MALFORMED, STAT_PASS_NOT_VIP,
};

use crate::maps::{self, count};

/// Length of an Ethernet header without VLAN tag.
pub const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV4_HLEN: usize = 20;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// The longest IP packet that can be a bare TCP ACK: no IP options, the most TCP options.
const BARE_ACK_MAX_LEN: usize = IPV4_HLEN + 60;

/// Offsets inside the IPv4 header.
pub mod ip {
    /// Total length.
    pub const TOT_LEN: usize = 2;
    /// Flags and fragment offset.
    pub const FRAG_OFF: usize = 6;
    /// Protocol.
    pub const PROTOCOL: usize = 9;
    /// Header checksum.
    pub const CHECK: usize = 10;
    /// Source address.
    pub const SADDR: usize = 12;
    /// Destination address.
    pub const DADDR: usize = 16;
}

/// TCP FIN flag.
pub const TCP_FIN: u8 = 0x01;
/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

/// Offsets inside TCP and UDP headers.
pub mod l4 {
    /// Source port (TCP and UDP).
    pub const SPORT: usize = 0;
    /// Destination port (TCP and UDP).
    pub const DPORT: usize = 2;
    /// TCP checksum.
    pub const TCP_CHECK: usize = 16;
    /// TCP data offset (high nibble).
    pub const TCP_DOFF: usize = 12;
    /// TCP flags.
    pub const TCP_FLAGS: usize = 13;
    /// TCP sequence number.
    pub const TCP_SEQ: usize = 4;
    /// UDP checksum.
    pub const UDP_CHECK: usize = 6;
}

/// The fields of a parsed IPv4 TCP/UDP packet that the later stages need.
pub struct Packet {
    /// Offset of the IPv4 header.
    pub l3_off: usize,
    /// Offset of the TCP/UDP header.
    pub l4_off: usize,
    /// True when the frame carried a VLAN tag.
    pub vlan: bool,
    /// IP protocol.
    pub proto: u8,
    /// IPv4 total length (host order).
    pub tot_len: u16,
    /// TCP flags (`TCP_*`); 0 for UDP.
    pub tcp_flags: u8,
    /// Source address (network order).
    pub src_addr: u32,
    /// Destination address (network order).
    pub dst_addr: u32,
    /// Source port (network order).
    pub src_port: u16,
    /// Destination port (network order).
    pub dst_port: u16,
    /// The destination address passed the VIP address filter (it may be a VIP's). When it
    /// did not, the packet came in by an interface where members' replies arrive.
    pub may_be_vip: bool,
}

impl Packet {
    /// A TCP segment that opens a connection (SYN without ACK).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.proto == IPPROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// A segment a member may send for a connection still half-open at the LB: its SYN-ACK,
    /// a FIN or RST ending it, or a bare ACK, which is how a member's TCP answers a SYN for a
    /// 4-tuple it still holds (a TIME_WAIT socket whose server is gone, an RFC 5961 challenge
    /// ACK); the client must see that ACK from the VIP, and its RST must come back through
    /// the LB to clear the member's socket. Data only follows the client's ACK, which moved
    /// the flow to the connection table.
    #[inline(always)]
    pub fn may_answer_half_open(&self) -> bool {
        self.proto == IPPROTO_TCP
            && (self.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0
                || (self.tcp_flags == TCP_ACK && usize::from(self.tot_len) <= BARE_ACK_MAX_LEN))
    }

    /// A TCP segment that resets a connection.
    #[inline(always)]
    pub fn is_reset(&self) -> bool {
        self.proto == IPPROTO_TCP && self.tcp_flags & TCP_RST != 0
    }

    /// A TCP segment that ends a connection (FIN or RST).
    #[inline(always)]
    pub fn is_close(&self) -> bool {
        self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }

    /// The packet's 5-tuple as a connection-table key.
    #[inline(always)]
    pub fn flow_key(&self) -> FlowKey {
        FlowKey::new(
            self.src_addr,
            self.dst_addr,
            self.src_port,
            self.dst_port,
            self.proto,
        )
    }
}

/// Either a packet for the next stage or a final action.
pub enum Parsed {
    /// An IPv4 TCP/UDP packet with sane headers.
    Packet(Packet),
    /// Not for the fast path: the action to return.
    Verdict(u32),
}

/// Returns a pointer to a `T` at `offset`, or `Err` when it would run past the frame.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *const T)
}

/// Mutable twin of [`ptr_at`].
#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    Ok(ptr_at::<T>(ctx, offset)? as *mut T)
}

/// Reads a `T` at `offset` (unaligned), bounds-checked.
#[inline(always)]
pub fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Result<T, ()> {
    // SAFETY: ptr_at checked that the bytes lie inside the frame.
    Ok(unsafe { core::ptr::read_unaligned(ptr_at::<T>(ctx, offset)?) })
}

/// Writes a `T` at `offset` (unaligned), bounds-checked.
#[inline(always)]
pub fn write<T: Copy>(ctx: &XdpContext, offset: usize, value: T) -> Result<(), ()> {
    // SAFETY: ptr_at_mut checked that the bytes lie inside the frame.
    unsafe { core::ptr::write_unaligned(ptr_at_mut::<T>(ctx, offset)?, value) };
    Ok(())
}

#[inline(always)]
fn pass(stat: u32) -> Parsed {
    count(stat);
    Parsed::Verdict(xdp_action::XDP_PASS)
}

/// `N` bytes of the frame whose bounds were checked once: the fields inside are read with no
/// further check, at offsets the compiler checks against `N`.
#[derive(Clone, Copy)]
pub struct Header<const N: usize> {
    ptr: *const u8,
}

impl<const N: usize> Header<N> {
    /// The `N` bytes at `offset`, or `Err` when they would run past the frame.
    #[inline(always)]
    pub fn at(ctx: &XdpContext, offset: usize) -> Result<Self, ()> {
        Ok(Self {
            ptr: ptr_at::<[u8; N]>(ctx, offset)?.cast(),
        })
    }

    /// The `T` at `OFF` inside the header, as it lies in the frame (network order).
    #[inline(always)]
    pub fn get<T: Copy, const OFF: usize>(&self) -> T {
        const { assert!(OFF + core::mem::size_of::<T>() <= N) };
        // SAFETY: `at` checked that the N bytes from `ptr` lie inside the frame, and the
        // assertion above that the field lies inside those N bytes.
        unsafe { core::ptr::read_unaligned(self.ptr.add(OFF).cast::<T>()) }
    }
}

/// The frame's destination and source MAC addresses (they come before any VLAN tag). Read
/// only by the paths that record them, so that the others do not carry them along.
#[inline(always)]
pub fn macs(ctx: &XdpContext) -> Result<([u8; 6], [u8; 6]), ()> {
    let eth = Header::<ETH_HLEN>::at(ctx, 0)?;
    Ok((eth.get::<[u8; 6], 0>(), eth.get::<[u8; 6], 6>()))
}

/// Parses Ethernet (at most one VLAN tag), IPv4 without options, and the TCP/UDP ports.
/// Where no member replies arrive (the ingress interface's roles, `IFACE_*`, read only for a
/// packet that fails the VIP address filter), a packet for no VIP address is passed on its
/// IP header alone.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let Ok(eth) = Header::<ETH_HLEN>::at(ctx, 0) else {
        return pass(STAT_PASS_MALFORMED);
    };
    // Compared as it lies in the frame: untagged IPv4 is tested first, with no byte swap.
    let ethertype = eth.get::<u16, 12>();
    if ethertype == ETH_P_IP.to_be() {
        return parse_ipv4(ctx, ETH_HLEN, false);
    }
    if ethertype != ETH_P_8021Q.to_be() && ethertype != ETH_P_8021AD.to_be() {
        return pass(STAT_PASS_NOT_VIP);
    }
    match read::<u16>(ctx, ETH_HLEN + 2) {
        Ok(inner) if inner == ETH_P_IP.to_be() => parse_ipv4(ctx, ETH_HLEN + VLAN_HLEN, true),
        Ok(_) => pass(STAT_PASS_NOT_VIP),
        Err(()) => pass(STAT_PASS_MALFORMED),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3_off: usize, vlan: bool) -> Parsed {
    let Ok(header) = Header::<IPV4_HLEN>::at(ctx, l3_off) else {
        return pass(STAT_PASS_MALFORMED);
    };
    let dst_addr = header.get::<u32, { ip::DADDR }>();
    // Most traffic through a node is for no VIP: on a client-side interface it needs no
    // more parsing (its version, options, fragments and ports concern nobody here).
    let may_be_vip = maps::may_be_vip(dst_addr);
    if !may_be_vip && !maps::member_side(ctx) {
        return pass(STAT_PASS_NOT_VIP);
    }
    let version_ihl = header.get::<u8, 0>();
    if version_ihl >> 4 != 4 || version_ihl & 0x0f < 5 {
        return pass(STAT_PASS_MALFORMED);
    }
    if version_ihl & 0x0f > 5 {
        return pass(STAT_PASS_IP_OPTIONS);
    }
    let frag = u16::from_be(header.get::<u16, { ip::FRAG_OFF }>());
    // More-fragments bit or a non-zero offset: ports are not in every fragment.
    if frag & 0x3fff != 0 {
        return pass(STAT_PASS_FRAGMENT);
    }
    let tot_len = u16::from_be(header.get::<u16, { ip::TOT_LEN }>());
    let proto = header.get::<u8, { ip::PROTOCOL }>();
    let l4_min = match proto {
        IPPROTO_TCP => TCP_HLEN,
        IPPROTO_UDP => UDP_HLEN,
        _ => return pass(STAT_PASS_NOT_VIP),
    };
    // The IP length must cover the L4 header and stay inside the frame.
    let frame_len = ctx.data_end() - ctx.data();
    if usize::from(tot_len) < IPV4_HLEN + l4_min || l3_off + usize::from(tot_len) > frame_len {
        return pass(STAT_PASS_MALFORMED);
    }
    let l4_off = l3_off + IPV4_HLEN;
    let (ports, tcp_flags) = if proto == IPPROTO_TCP {
        match Header::<TCP_HLEN>::at(ctx, l4_off) {
            Ok(tcp) if tcp.get::<u8, { l4::TCP_DOFF }>() >> 4 >= 5 => (
                tcp.get::<[u16; 2], { l4::SPORT }>(),
                tcp.get::<u8, { l4::TCP_FLAGS }>(),
            ),
            _ => return pass(STAT_PASS_MALFORMED),
        }
    } else {
        match Header::<UDP_HLEN>::at(ctx, l4_off) {
            Ok(udp) => (udp.get::<[u16; 2], { l4::SPORT }>(), 0),
            Err(()) => return pass(STAT_PASS_MALFORMED),
        }
    };
    Parsed::Packet(Packet {
        l3_off,
        l4_off,
        vlan,
        proto,
        tot_len,
        tcp_flags,
        src_addr: header.get::<u32, { ip::SADDR }>(),
        dst_addr,
        src_port: ports[0],
        dst_port: ports[1],
        may_be_vip,
    })
}
