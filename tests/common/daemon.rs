//! The daemon under test: started in a topology's LB namespace, driven with the real CLI.

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::Duration,
};

use super::topology::{Topology, VIP, member_addr, wait_until};

pub const CTL: &str = env!("CARGO_BIN_EXE_lbaas-ctl");

/// The daemon running in the topology's LB namespace.
pub struct Daemon {
    pub pid: u32,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
}

pub fn start_daemon(topo: &mut Topology, state_dir: &str) -> Daemon {
    start_daemon_with(topo, state_dir, &[])
}

/// Starts the daemon with extra arguments (e.g. `--cleanup-on-exit`).
pub fn start_daemon_with(topo: &mut Topology, state_dir: &str, extra: &[&str]) -> Daemon {
    let socket = topo.path("lbaas.sock");
    let state_dir = topo.path(state_dir);
    let _ = std::fs::remove_file(&socket);
    let pid = topo.spawn_daemon(CTL, &socket, &state_dir, extra);
    let daemon = Daemon {
        pid,
        socket,
        state_dir,
    };
    wait_until(Duration::from_secs(20), "the daemon's API socket", || {
        ctl(&daemon, &["get", "loadbalancers"]).status.success()
    });
    daemon
}

pub fn ctl(daemon: &Daemon, args: &[&str]) -> Output {
    Command::new(CTL)
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run lbaas-ctl")
}

pub fn ctl_ok(daemon: &Daemon, args: &[&str]) -> String {
    let out = ctl(daemon, args);
    assert!(
        out.status.success(),
        "lbaas-ctl {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes a one-load-balancer file with the given listeners and pools blocks.
pub fn write_config(topo: &Topology, name: &str, body: &str) -> String {
    let path = topo.path(name);
    std::fs::write(
        &path,
        format!("loadbalancers:\n  - name: lb1\n    vip_address: {VIP}\n{body}"),
    )
    .unwrap();
    path.display().to_string()
}

pub fn http_pool(members: &[usize]) -> String {
    let mut out = String::from(
        "    listeners:\n      - {name: web, protocol: TCP, protocol_port: 80, default_pool: web-pool}\n    pools:\n      - name: web-pool\n        protocol: TCP\n        lb_algorithm: ROUND_ROBIN\n        members:\n",
    );
    for i in members {
        out.push_str(&format!(
            "          - {{name: m{i}, address: {}, protocol_port: 80}}\n",
            member_addr(*i)
        ));
    }
    out
}

/// HTTP servers on `members` members, the daemon (with `daemon_args`), and one TCP
/// listener on :80 balancing over all of them.
pub fn web_lab(tag: &str, members: usize, daemon_args: &[&str]) -> (Topology, Daemon) {
    super::topology::require_root();
    let mut topo = Topology::new(tag, members);
    for i in 1..=members {
        topo.start_http_member(i);
    }
    let daemon = start_daemon_with(&mut topo, "state", daemon_args);
    let all: Vec<usize> = (1..=members).collect();
    ctl_ok(
        &daemon,
        &[
            "apply",
            "-f",
            &write_config(&topo, "lb.yaml", &http_pool(&all)),
        ],
    );
    (topo, daemon)
}

pub fn vip_on_interface(topo: &Topology) -> bool {
    let out = topo.exec(&topo.lb(), &["ip", "-4", "addr", "show", "dev", "lan0"]);
    String::from_utf8_lossy(&out.stdout).contains(&format!("{VIP}/32"))
}

pub fn curls(topo: &Topology, n: usize) -> Vec<String> {
    let url = format!("http://{VIP}/");
    (0..n)
        .map(|i| {
            topo.curl(&url).unwrap_or_else(|e| {
                panic!(
                    "curl #{i} failed: {e}\ndaemon log:\n{}",
                    topo.log("daemon.log")
                )
            })
        })
        .collect()
}

pub fn forwarded_by_xdp(daemon: &Daemon) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&ctl_ok(daemon, &["stats", "-o", "json"])).unwrap();
    stats["datapath"]
        .as_array()
        .unwrap()
        .iter()
        .find(|kv| kv[0] == "forwarded")
        .and_then(|kv| kv[1].as_u64())
        .unwrap()
}
