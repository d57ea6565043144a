//! The lbaas XDP data path.
//!
//! Per packet: [`parse`] the headers (bounds-checked, anything unusual passed untouched); for a
//! destination that may be a VIP's, the connection table ([`forward`]: an established flow
//! goes to its member), then the VIP table (half-open and new flows: member selection); DNAT.
//! Otherwise the reverse-NAT table ([`reply`]: a member's answer rewritten back to the VIP).
//! Either way the rewritten frame goes to [`egress`] for the next hop. Each stage returns
//! either a final XDP action or what the next stage needs (Katran's `FURTHER_PROCESSING`).
#![no_std]
#![no_main]
// BPF has no compare-and-swap in core's eyes; fetch-add comes from the intrinsic.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod bench;
mod checksum;
mod egress;
mod forward;
mod maps;
mod parse;
mod refuse;
mod reply;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lbaas_common::{STAT_PASS_NOT_VIP, VipKey};

use crate::parse::{Parsed, parse};

/// Entry point: a thin wrapper that turns a stage error into XDP_ABORTED.
#[xdp]
pub fn lbaas_xdp(ctx: XdpContext) -> u32 {
    match try_lbaas_xdp(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

#[inline(always)]
fn try_lbaas_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let pkt = match parse(ctx) {
        Parsed::Packet(pkt) => pkt,
        Parsed::Verdict(action) => return Ok(action),
    };
    // Every interface serves VIPs (a member may be another VIP's client). Most packets that
    // are for no VIP are told apart by the address filter alone.
    if pkt.may_be_vip {
        let flow = pkt.flow_key();
        let now = maps::now_ns();
        if let Some(action) = forward::established(ctx, &pkt, &flow, now)? {
            return Ok(action);
        }
        let vip = VipKey::new(pkt.dst_addr, pkt.dst_port, pkt.proto);
        // SAFETY: the value is only read, and entries are replaced whole by the controller.
        if let Some(info) = unsafe { maps::LB_VIPS.get(vip) } {
            return forward::to_member(ctx, &pkt, &flow, info, now);
        }
    }
    // Members' replies arrive only on member-side interfaces (the parser has passed a packet
    // for no VIP address that came in by a client-only one).
    if (!pkt.may_be_vip || maps::member_side(ctx))
        && let Some(action) = reply::to_client(ctx, &pkt)?
    {
        return Ok(action);
    }
    maps::count(STAT_PASS_NOT_VIP);
    Ok(xdp_action::XDP_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// A program that does nothing but pass: the floor every data-path figure is compared with in
/// the benchmarks (same run, same machine).
#[xdp]
pub fn lbaas_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The benchmark's wrapper: restores the benchmark frame, then tail-calls the program under
/// test (see [`bench`]). Loaded only by the benchmark.
#[xdp]
pub fn lbaas_bench(ctx: XdpContext) -> u32 {
    bench::restore_and_run(&ctx)
}
