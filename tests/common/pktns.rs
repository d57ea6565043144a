//! A network namespace holding an LB node's two arms with fixed addresses, MACs and
//! permanent neighbours, entered by the calling thread: `BPF_PROG_TEST_RUN` with its
//! interfaces as ingress gets real FIB answers. Shared by the packet tests and the benchmarks.
#![allow(dead_code)]

use std::{
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{TestRun as _, TestRunOptions, Xdp};

use super::topology::{require_root, run};

/// One `BPF_PROG_TEST_RUN` call: `repeat` runs of `program` on `frame`, arriving by interface
/// `ifindex` (each run after the first on the previous one's output, unless the program
/// restores it). Returns the last run's action and frame, and the kernel's mean ns per run.
pub fn test_run(program: &Xdp, frame: &[u8], ifindex: u32, repeat: u32) -> (u32, Vec<u8>, u32) {
    let mut out = vec![0u8; frame.len() + 256];
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (
        result.return_value,
        out,
        u32::try_from(result.duration.as_nanos()).unwrap_or(u32::MAX),
    )
}

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
pub const LAN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
pub const MEM_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 100);
pub const M1: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 11);
pub const M2: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 12);
pub const M1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x11];
pub const M2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x12];
pub const M3: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 13);
pub const M4: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 14);
pub const M3_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x13];
pub const M4_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x14];

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A namespace that this test's thread has entered; deleted on drop.
pub struct NetNs {
    /// Namespace name.
    pub name: String,
    /// Index of the client-side arm.
    pub lan: u32,
    /// Index of the member-side arm.
    pub mem: u32,
}

impl NetNs {
    /// Creates the namespace and moves this thread into it.
    pub fn enter() -> Self {
        require_root();
        let name = format!(
            "lbp-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        run(&["ip", "netns", "add", &name]);
        let mut ns = NetNs {
            name,
            lan: 0,
            mem: 0,
        };
        let n = ns.name.clone();
        let n = n.as_str();
        for (dev, peer, mac, addr) in [
            ("lan0", "lan1", LAN_MAC, "10.1.0.1/24"),
            ("mem0", "mem1", MEM_MAC, "10.2.0.1/24"),
        ] {
            run(&[
                "ip", "-n", n, "link", "add", dev, "type", "veth", "peer", "name", peer,
            ]);
            run(&["ip", "-n", n, "link", "set", dev, "address", &mac_str(mac)]);
            run(&["ip", "-n", n, "addr", "add", addr, "dev", dev]);
            run(&["ip", "-n", n, "link", "set", dev, "up"]);
            run(&["ip", "-n", n, "link", "set", peer, "up"]);
        }
        for (addr, mac, dev) in [
            (CLIENT, CLIENT_MAC, "lan0"),
            (M1, M1_MAC, "mem0"),
            (M2, M2_MAC, "mem0"),
            (M3, M3_MAC, "mem0"),
            (M4, M4_MAC, "mem0"),
        ] {
            run(&[
                "ip",
                "-n",
                n,
                "neigh",
                "add",
                &addr.to_string(),
                "lladdr",
                &mac_str(mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ]);
        }
        run(&[
            "ip",
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        let file = std::fs::File::open(format!("/var/run/netns/{n}")).expect("netns file");
        // SAFETY: setns on a valid namespace fd; it only changes this thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        ns.lan = lbaas_ctl::net::ifindex("lan0").expect("lan0");
        ns.mem = lbaas_ctl::net::ifindex("mem0").expect("mem0");
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
