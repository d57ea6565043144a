//! Health monitoring end to end: real servers on the members fail and recover, the daemon's
//! probes notice within Octavia's bound, traffic moves, and the status tree says so. Root only.

mod common;

use std::time::{Duration, Instant};

use common::{
    daemon::*,
    topology::{self, Topology, VIP, member_addr, wait_until},
    traffic::RequestLoop,
};

/// delay 2 s, timeout 1 s, rise 1, fall 2: down within 2 x 2 + 1 (+1 slack) = 6 s.
const DELAY: u64 = 2;
const TIMEOUT: u64 = 1;
const FALL: u64 = 2;
const RISE: u64 = 1;

fn down_bound() -> Duration {
    Duration::from_secs(DELAY * FALL + TIMEOUT + 1)
}

fn up_bound() -> Duration {
    Duration::from_secs(DELAY * RISE + TIMEOUT + 1)
}

fn monitor(kind: &str, extra: &str) -> String {
    format!(
        "{{type: {kind}, delay: {DELAY}, timeout: {TIMEOUT}, max_retries: {RISE}, max_retries_down: {FALL}{extra}}}"
    )
}

/// One TCP listener (the XDP path) on :80 over members 1 and 2 (and `extra_members`), with
/// `monitor`.
fn web(monitor: &str, port: u16, extra_members: &str) -> String {
    web_over("TCP", monitor, port, extra_members)
}

/// The same with a listener and pool of `protocol` (HTTP: the L7 proxy).
fn web_over(protocol: &str, monitor: &str, port: u16, extra_members: &str) -> String {
    format!(
        "    listeners:\n      - {{name: web, protocol: {protocol}, protocol_port: 80, default_pool: web}}\n    pools:\n      - name: web\n        protocol: {protocol}\n        lb_algorithm: ROUND_ROBIN\n        healthmonitor: {monitor}\n        members:\n          - {{name: m1, address: {}, protocol_port: 80, monitor_port: {port}}}\n          - {{name: m2, address: {}, protocol_port: 80, monitor_port: {port}}}\n{extra_members}",
        member_addr(1),
        member_addr(2)
    )
}

fn member_status(daemon: &Daemon, i: usize) -> String {
    let tree: serde_json::Value =
        serde_json::from_str(&ctl_ok(daemon, &["status", "-o", "json"])).unwrap();
    let members = tree["loadbalancers"][0]["statuses"]["loadbalancer"]["listeners"][0]["pools"][0]
        ["members"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let id = format!("{}:80", member_addr(i));
    members
        .iter()
        .find(|m| m["id"] == id)
        .map(|m| m["operating_status"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn pool_status(daemon: &Daemon) -> String {
    let tree: serde_json::Value =
        serde_json::from_str(&ctl_ok(daemon, &["status", "-o", "json"])).unwrap();
    tree["loadbalancers"][0]["statuses"]["loadbalancer"]["listeners"][0]["pools"][0]["operating_status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Waits for member `i` to reach `status`; returns how long it took.
fn wait_status(daemon: &Daemon, i: usize, status: &str, bound: Duration) -> Duration {
    let start = Instant::now();
    let limit = bound + Duration::from_millis(500);
    loop {
        if member_status(daemon, i) == status {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "member-{i} not {status} within {bound:?} (is {})",
            member_status(daemon, i)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Members 1 and 2 run health-aware servers; `hosts` namespaces are created for members.
fn lab_with(tag: &str, tls: bool, hosts: usize) -> (Topology, Daemon, Vec<u32>) {
    topology::require_root();
    let mut topo = Topology::new(tag, hosts);
    let cert = tls.then(|| make_certificate(&topo));
    let pids = (1..=2)
        .map(|i| {
            topo.start_health_member(i, cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())))
        })
        .collect();
    let daemon = start_daemon(&mut topo, "state");
    (topo, daemon, pids)
}

fn lab(tag: &str, tls: bool) -> (Topology, Daemon, Vec<u32>) {
    lab_with(tag, tls, 2)
}

fn make_certificate(topo: &Topology) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (topo.path("cert.pem"), topo.path("key.pem"));
    topology::run(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=member",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    (cert, key)
}

fn apply(topo: &Topology, daemon: &Daemon, body: &str) {
    ctl_ok(
        daemon,
        &["apply", "-f", &write_config(topo, "lb.yaml", body)],
    );
}

/// Breaks member 1 with `fail`, checks it goes ERROR within the bound and traffic avoids it,
/// mends it with `mend`, checks it comes back.
fn failover(
    topo: &mut Topology,
    daemon: &Daemon,
    fail: impl FnOnce(&mut Topology),
    mend: impl FnOnce(&mut Topology),
) {
    wait_status(daemon, 1, "ONLINE", up_bound());
    wait_status(daemon, 2, "ONLINE", up_bound());
    assert_eq!(curls(topo, 2).len(), 2);
    fail(topo);
    let took = wait_status(daemon, 1, "ERROR", down_bound());
    println!("member-1 ERROR after {took:?} (bound {:?})", down_bound());
    assert_eq!(pool_status(daemon), "DEGRADED");
    assert_eq!(curls(topo, 4), ["member-2"; 4]);
    mend(topo);
    let took = wait_status(daemon, 1, "ONLINE", up_bound() + Duration::from_secs(DELAY));
    println!("member-1 ONLINE after {took:?}");
    assert_eq!(pool_status(daemon), "ONLINE");
    let mut answers = curls(topo, 4);
    answers.sort();
    assert_eq!(
        answers,
        ["member-1", "member-1", "member-2", "member-2"],
        "both serve again"
    );
}

#[test]
fn tcp_monitor_fails_over_with_no_lost_request_after_detection() {
    let (mut topo, daemon, pids) = lab("hc-tcp", false);
    apply(&topo, &daemon, &web(&monitor("TCP", ""), 80, ""));
    wait_status(&daemon, 1, "ONLINE", up_bound());
    // Continuous traffic through the failover, each request on a new connection.
    let traffic = RequestLoop::start(&mut topo, 20);
    std::thread::sleep(Duration::from_millis(500));
    let killed = lbaas_ctl::datapath::monotonic_ns();
    topo.stop(pids[0], "KILL");
    wait_status(&daemon, 1, "ERROR", down_bound());
    let detected = lbaas_ctl::datapath::monotonic_ns();
    assert_eq!(curls(&topo, 4), ["member-2"; 4]);
    std::thread::sleep(Duration::from_secs(2));
    let requests = traffic.stop();
    let failed: Vec<u64> = requests
        .iter()
        .filter(|r| r.failed())
        .map(|r| r.start)
        .collect();
    let after = requests.iter().filter(|r| r.start > detected).count();
    println!(
        "{} requests, {} failed, all between the kill and the detection {:.1} s later; {after} after it",
        requests.len(),
        failed.len(),
        (detected - killed) as f64 / 1e9
    );
    assert!(after > 20, "too little traffic after detection to judge");
    assert!(
        failed.iter().all(|t| *t < detected),
        "a request failed after member-1 was taken out"
    );
    // Recovery: a new server on member-1.
    topo.start_health_member(1, None);
    wait_status(
        &daemon,
        1,
        "ONLINE",
        up_bound() + Duration::from_secs(DELAY),
    );
    let mut answers = curls(&topo, 4);
    answers.sort();
    assert_eq!(answers, ["member-1", "member-1", "member-2", "member-2"]);
}

/// A member that refuses connections is probed at once, not at its next tick: with checks a
/// minute apart and two failed checks to go down, only probes brought forward by the refusals
/// the data path reports can take it out within seconds.
#[test]
fn a_member_refusing_connections_is_probed_at_once() {
    let (mut topo, daemon, pids) = lab("hc-refused", false);
    let slow = "{type: TCP, delay: 60, timeout: 5, max_retries: 1, max_retries_down: 2}";
    apply(&topo, &daemon, &web(slow, 80, ""));
    wait_status(&daemon, 1, "ONLINE", up_bound());
    assert_eq!(curls(&topo, 2).len(), 2);
    topo.stop(pids[0], "KILL");
    let killed = Instant::now();
    let limit = Duration::from_secs(10);
    let mut refused = 0;
    while member_status(&daemon, 1) != "ERROR" {
        assert!(
            killed.elapsed() < limit,
            "member-1 still {} {limit:?} after its server died ({refused} requests refused)\ndaemon log:\n{}",
            member_status(&daemon, 1),
            topo.log("daemon.log")
        );
        if topo.curl(&format!("http://{VIP}/")).is_err() {
            refused += 1;
        }
    }
    println!(
        "member-1 ERROR {:?} after its server died; {refused} requests refused meanwhile",
        killed.elapsed()
    );
    assert!(refused > 0, "no request met the dead member");
    assert_eq!(curls(&topo, 4), ["member-2"; 4]);
}

/// The same through the L7 proxy: a member it cannot connect to is reported and probed at
/// once, while the proxy sends the request to another member (no client sees an error).
#[test]
fn a_member_the_proxy_cannot_connect_to_is_probed_at_once() {
    let (mut topo, daemon, pids) = lab("hc-l7-refused", false);
    let slow = "{type: TCP, delay: 60, timeout: 5, max_retries: 1, max_retries_down: 2}";
    apply(&topo, &daemon, &web_over("HTTP", slow, 80, ""));
    wait_status(&daemon, 1, "ONLINE", up_bound());
    let both = curls(&topo, 4);
    assert!(both.contains(&"member-1".to_string()), "{both:?}");
    topo.stop(pids[0], "KILL");
    let killed = Instant::now();
    let limit = Duration::from_secs(10);
    let mut requests = 0;
    while member_status(&daemon, 1) != "ERROR" {
        assert!(
            killed.elapsed() < limit,
            "member-1 still {} {limit:?} after its server died ({requests} requests sent)\ndaemon log:\n{}",
            member_status(&daemon, 1),
            topo.log("daemon.log")
        );
        // The proxy redispatches a request the dead member cannot take.
        assert_eq!(curls(&topo, 1), ["member-2"]);
        requests += 1;
    }
    println!(
        "member-1 ERROR {:?} after its server died; {requests} requests meanwhile, all answered",
        killed.elapsed()
    );
    assert_eq!(curls(&topo, 4), ["member-2"; 4]);
}

#[test]
fn http_monitor_follows_the_health_endpoint() {
    let (mut topo, daemon, _) = lab("hc-http", false);
    apply(
        &topo,
        &daemon,
        &web(
            &monitor("HTTP", ", url_path: /health, expected_codes: '200'"),
            80,
            "",
        ),
    );
    failover(
        &mut topo,
        &daemon,
        |t| t.set_healthy(1, false),
        |t| t.set_healthy(1, true),
    );
    let status = ctl_ok(&daemon, &["status"]);
    assert!(status.contains("healthmonitor HTTP"), "{status}");
}

#[test]
fn https_monitor_over_tls_with_a_self_signed_certificate() {
    let (mut topo, daemon, _) = lab("hc-https", true);
    apply(
        &topo,
        &daemon,
        &web(&monitor("HTTPS", ", url_path: /health"), 443, ""),
    );
    failover(
        &mut topo,
        &daemon,
        |t| t.set_healthy(1, false),
        |t| t.set_healthy(1, true),
    );
}

#[test]
fn tls_hello_monitor_sees_a_dead_tls_server() {
    let (mut topo, daemon, pids) = lab("hc-tls", true);
    apply(&topo, &daemon, &web(&monitor("TLS-HELLO", ""), 443, ""));
    let cert = (topo.path("cert.pem"), topo.path("key.pem"));
    failover(
        &mut topo,
        &daemon,
        |t| {
            t.stop(pids[0], "KILL");
        },
        |t| {
            t.start_health_member(1, Some((cert.0.as_path(), cert.1.as_path())));
        },
    );
}

#[test]
fn ping_monitor_sees_a_member_address_go_away() {
    let (mut topo, daemon, _) = lab("hc-ping", false);
    apply(&topo, &daemon, &web(&monitor("PING", ""), 80, ""));
    let m1 = topo.member(1);
    let addr = format!("{}/24", member_addr(1));
    failover(
        &mut topo,
        &daemon,
        |t| {
            t.exec(&m1, &["ip", "addr", "del", &addr, "dev", "eth0"]);
        },
        |t| {
            t.exec(&m1, &["ip", "addr", "add", &addr, "dev", "eth0"]);
            t.exec(
                &m1,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    topology::LB_MEMBER_SIDE_ADDR,
                ],
            );
        },
    );
}

#[test]
fn udp_connect_monitor_sees_a_closed_port() {
    topology::require_root();
    let mut topo = Topology::new("hc-udp", 2);
    let pids: Vec<u32> = (1..=2).map(|i| topo.start_udp_member(i)).collect();
    let daemon = start_daemon(&mut topo, "state");
    let body = format!(
        "    listeners:\n      - {{name: dns, protocol: UDP, protocol_port: 53, default_pool: dns}}\n    pools:\n      - name: dns\n        protocol: UDP\n        lb_algorithm: ROUND_ROBIN\n        healthmonitor: {{type: UDP-CONNECT, delay: 3, timeout: 2, max_retries: 1, max_retries_down: 2}}\n        members:\n          - {{address: {}, protocol_port: 5353}}\n          - {{address: {}, protocol_port: 5353}}\n",
        member_addr(1),
        member_addr(2)
    );
    ctl_ok(
        &daemon,
        &["apply", "-f", &write_config(&topo, "udp.yaml", &body)],
    );
    let status = |i: usize| {
        let tree: serde_json::Value =
            serde_json::from_str(&ctl_ok(&daemon, &["status", "-o", "json"])).unwrap();
        let id = format!("{}:5353", member_addr(i));
        tree["loadbalancers"][0]["statuses"]["loadbalancer"]["listeners"][0]["pools"][0]["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .map(|m| m["operating_status"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(status(1), "ONLINE");
    topo.stop(pids[0], "KILL");
    // delay 3 x fall 2 + timeout 2 (+1 slack)
    wait_until(
        Duration::from_secs(9),
        "member-1 ERROR after its UDP server stopped",
        || status(1) == "ERROR",
    );
    let query = format!(
        "import socket\nfor i in range(4):\n s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n s.settimeout(3)\n s.connect(('{VIP}',53))\n s.send(b'q')\n print(s.recv(100).decode())\n"
    );
    let out = topo.exec(&topo.client(), &["/usr/bin/python3", "-c", &query]);
    let answers = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        answers.lines().collect::<Vec<_>>(),
        ["member-2:q"; 4],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn backup_member_serves_when_every_other_member_is_down() {
    let (mut topo, daemon, pids) = lab_with("hc-backup", false, 3);
    // Member 3 exists only as a backup.
    topo.start_health_member(3, None);
    let backup = format!(
        "          - {{name: b, address: {}, protocol_port: 80, backup: true}}\n",
        member_addr(3)
    );
    apply(&topo, &daemon, &web(&monitor("TCP", ""), 80, &backup));
    wait_status(&daemon, 1, "ONLINE", up_bound());
    let mut answers = curls(&topo, 4);
    answers.sort();
    assert_eq!(
        answers,
        ["member-1", "member-1", "member-2", "member-2"],
        "the backup waits"
    );
    topo.stop(pids[0], "KILL");
    topo.stop(pids[1], "KILL");
    wait_status(&daemon, 1, "ERROR", down_bound());
    wait_status(&daemon, 2, "ERROR", down_bound());
    assert_eq!(curls(&topo, 3), ["member-3"; 3]);
}
