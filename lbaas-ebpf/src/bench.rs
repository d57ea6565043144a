//! The benchmark's wrapper program (never attached by the daemon): it writes the benchmark's
//! frame over the packet, then tail-calls the program under test. `BPF_PROG_TEST_RUN` with a
//! large `repeat` runs every iteration on one buffer, so without it a rewriting program would
//! see its own output from the second iteration on; with it, each iteration is the real path
//! (and, with `fresh_source`, a new flow). The benchmark measures the wrapper in front of the
//! do-nothing program too, and subtracts.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lbaas_common::BENCH_FRAME_BYTES;

use crate::{
    maps::{LB_BENCH_FRAME, LB_BENCH_TARGET},
    parse::{ETH_HLEN, ip, ptr_at_mut},
};

/// Restores the frame and runs the program under test (`XDP_ABORTED` if either cannot be had).
#[inline(always)]
pub fn restore_and_run(ctx: &XdpContext) -> u32 {
    let Some(frame) = LB_BENCH_FRAME.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let Ok(packet) = ptr_at_mut::<[u8; BENCH_FRAME_BYTES]>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: the frame is a live map value; the packet's first BENCH_FRAME_BYTES bytes were
    // bounds-checked above; the two do not overlap.
    unsafe {
        core::ptr::copy_nonoverlapping(
            (*frame).bytes.as_ptr(),
            packet.cast::<u8>(),
            BENCH_FRAME_BYTES,
        );
        if (*frame).fresh_source != 0 {
            (*frame).runs = (*frame).runs.wrapping_add(1);
            let source = packet.cast::<u8>().add(ETH_HLEN + ip::SADDR).cast::<u32>();
            let base = u32::from_be(core::ptr::read_unaligned(source));
            core::ptr::write_unaligned(source, base.wrapping_add((*frame).runs).to_be());
        }
        LB_BENCH_TARGET.tail_call(ctx, 0);
    }
    xdp_action::XDP_ABORTED
}
