//! Incremental Internet checksum updates (RFC 1624): only the changed words are folded in,
//! so a rewrite costs the same whatever the packet size.
//!
//! Values are the raw header words as read from the packet (network byte order in memory);
//! one's complement arithmetic is byte-order independent, so no swapping is needed.

/// Folds a 32-bit one's complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Returns `check` updated for a 32-bit field changing from `old` to `new`.
#[inline(always)]
pub fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let not_old = !old;
    let sum =
        u32::from(!check) + (not_old >> 16) + (not_old & 0xffff) + (new >> 16) + (new & 0xffff);
    !fold(sum)
}

/// Returns `check` updated for a 16-bit field changing from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(sum)
}
