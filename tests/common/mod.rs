//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod daemon;
pub mod frames;
pub mod pktns;
pub mod topology;
pub mod traffic;
