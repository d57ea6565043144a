//! End-to-end tests: the real daemon and XDP program on veth links between network namespaces,
//! real HTTP and UDP servers on the members, real clients (curl, a UDP socket). Root only.

mod common;

use common::{
    daemon::*,
    traffic::{Request, RequestLoop},
};

use std::time::Duration;

use common::topology::{
    self, CLIENT_ADDR, LB_CLIENT_SIDE_ADDR, Topology, VIP, member_addr, wait_until,
};

#[test]
fn round_robin_alternates_between_http_members() {
    topology::require_root();
    let mut topo = Topology::new("rr", 2);
    topo.start_http_member(1);
    topo.start_http_member(2);
    let daemon = start_daemon(&mut topo, "state");
    let file = write_config(&topo, "lb.yaml", &http_pool(&[1, 2]));
    let out = ctl_ok(&daemon, &["apply", "-f", &file]);
    assert!(out.contains("+ loadbalancer lb1"), "{out}");
    assert!(
        vip_on_interface(&topo),
        "the daemon adds the VIP as a /32 on the client interface"
    );

    let answers = curls(&topo, 6);
    assert_eq!(
        answers,
        [
            "member-1", "member-2", "member-1", "member-2", "member-1", "member-2"
        ]
    );
    // The data path, not the host stack, did the forwarding.
    assert!(
        forwarded_by_xdp(&daemon) > 0,
        "no packet was forwarded by XDP"
    );
    let stats: serde_json::Value =
        serde_json::from_str(&ctl_ok(&daemon, &["stats", "-o", "json"])).unwrap();
    assert_eq!(stats["listeners"][0]["total_connections"], 6, "{stats}");

    let members = ctl_ok(&daemon, &["get", "members"]);
    assert!(
        members.contains(&member_addr(1)) && members.contains(&member_addr(2)),
        "{members}"
    );
    let diff = ctl_ok(&daemon, &["diff", "-f", &file]);
    assert_eq!(diff.trim(), "no changes");
}

#[test]
fn udp_listener_forwards_datagrams_and_replies_come_from_the_vip() {
    topology::require_root();
    let mut topo = Topology::new("udp", 2);
    topo.start_udp_member(1);
    topo.start_udp_member(2);
    let daemon = start_daemon(&mut topo, "state");
    let mut body = String::from(
        "    listeners:\n      - {name: dns, protocol: UDP, protocol_port: 53, default_pool: dns-pool}\n    pools:\n      - name: dns-pool\n        protocol: UDP\n        lb_algorithm: ROUND_ROBIN\n        members:\n",
    );
    for i in 1..=2 {
        body.push_str(&format!(
            "          - {{address: {}, protocol_port: 5353}}\n",
            member_addr(i)
        ));
    }
    let file = write_config(&topo, "udp.yaml", &body);
    ctl_ok(&daemon, &["apply", "-f", &file]);

    // A connected UDP socket only accepts datagrams whose source is VIP:53, so a reply that
    // was not reverse-translated would time out here.
    let script = format!(
        "import socket\nfor i in range(4):\n s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n \
         s.settimeout(3)\n s.connect(('{VIP}',53))\n s.send(b'ping%d'%i)\n print(s.recv(2048).decode())\n s.close()\n"
    );
    let out = topo.exec(&topo.client(), &["/usr/bin/python3", "-c", &script]);
    assert!(
        out.status.success(),
        "UDP client failed: {}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        topo.log("daemon.log")
    );
    let replies: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        replies,
        [
            "member-1:ping0",
            "member-2:ping1",
            "member-1:ping2",
            "member-2:ping3"
        ]
    );
}

#[test]
fn the_lb_host_keeps_working() {
    let (mut topo, _daemon) = web_lab("host", 1, &[]);
    // A service of the LB host itself, on a port no listener owns, on every address.
    let lb = topo.lb();
    let root = topo.path("hostwww");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), "lb-host\n").unwrap();
    topo.spawn(
        &lb,
        &[
            "/usr/bin/python3",
            "-m",
            "http.server",
            "8081",
            "--directory",
            root.to_str().unwrap(),
        ],
        "host-http.log",
    );
    topo.wait_tcp(&lb, "0.0.0.0", 8081);

    let client = topo.client();
    for target in [LB_CLIENT_SIDE_ADDR, VIP] {
        let ping = topo.exec(&client, &["ping", "-c", "1", "-W", "2", target]);
        assert!(
            ping.status.success(),
            "ping {target} failed: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
    }
    assert_eq!(
        topo.curl(&format!("http://{LB_CLIENT_SIDE_ADDR}:8081/"))
            .unwrap(),
        "lb-host"
    );
    assert_eq!(
        topo.curl(&format!("http://{VIP}:8081/")).unwrap(),
        "lb-host"
    );
    // And the listener still balances.
    assert_eq!(curls(&topo, 2), ["member-1", "member-1"]);
    let _ = CLIENT_ADDR;
}

#[test]
fn apply_changes_members_live_and_invalid_files_change_nothing() {
    topology::require_root();
    let mut topo = Topology::new("apply", 2);
    topo.start_http_member(1);
    topo.start_http_member(2);
    let daemon = start_daemon(&mut topo, "state");
    ctl_ok(
        &daemon,
        &[
            "apply",
            "-f",
            &write_config(&topo, "one.yaml", &http_pool(&[1])),
        ],
    );
    assert_eq!(curls(&topo, 3), ["member-1", "member-1", "member-1"]);

    let out = ctl_ok(
        &daemon,
        &[
            "apply",
            "-f",
            &write_config(&topo, "two.yaml", &http_pool(&[2])),
        ],
    );
    assert!(out.contains("+ member lb1/web-pool/10.77.2.12:80"), "{out}");
    assert!(out.contains("- member lb1/web-pool/10.77.2.11:80"), "{out}");
    assert_eq!(curls(&topo, 3), ["member-2", "member-2", "member-2"]);

    // An invalid file: every error with its path, non-zero exit, nothing changed.
    let bad = write_config(
        &topo,
        "bad.yaml",
        &http_pool(&[1])
            .replace(
                "protocol_port: 80, default",
                "protocol_port: 99999, default",
            )
            .replace("weight", "w"),
    );
    let bad = {
        let text = std::fs::read_to_string(&bad)
            .unwrap()
            .replace(&member_addr(1), "10.77.2.300");
        std::fs::write(&bad, text).unwrap();
        bad
    };
    for args in [vec!["validate", "-f", &bad], vec!["apply", "-f", &bad]] {
        let out = ctl(&daemon, &args);
        assert!(!out.status.success(), "{args:?} accepted an invalid file");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(
                "loadbalancers[0].listeners[0].protocol_port: 99999 is out of range 1-65535"
            ),
            "{err}"
        );
        assert!(
            err.contains(
                "loadbalancers[0].pools[0].members[0].address: \"10.77.2.300\" is not an IP address"
            ),
            "{err}"
        );
    }
    assert_eq!(curls(&topo, 2), ["member-2", "member-2"]);
    let members = ctl_ok(&daemon, &["get", "members", "-o", "json"]);
    let members: serde_json::Value = serde_json::from_str(&members).unwrap();
    assert_eq!(members.as_array().unwrap().len(), 1);
    assert_eq!(members[0]["address"], member_addr(2));

    // Deleting the load balancer removes its VIP from the data path and the interface.
    let out = ctl_ok(&daemon, &["delete", "lb1"]);
    assert!(out.contains("- loadbalancer lb1"), "{out}");
    assert!(!vip_on_interface(&topo));
    assert!(topo.curl(&format!("http://{VIP}/")).is_err());
}

#[test]
fn a_restarted_daemon_serves_the_same_vips() {
    let (mut topo, daemon) = web_lab("restart", 2, &[]);
    assert_eq!(curls(&topo, 2), ["member-1", "member-2"]);

    // SIGTERM leaves the data path in place: no daemon, traffic still balanced.
    let status = topo.stop(daemon.pid, "TERM");
    assert!(
        status.success(),
        "daemon exit on SIGTERM: {status}\n{}",
        topo.log("daemon.log")
    );
    assert!(vip_on_interface(&topo), "the VIP stays on the interface");
    assert!(daemon.state_dir.join("state.json").exists());
    assert_eq!(
        curls(&topo, 2),
        ["member-1", "member-2"],
        "forwarding without a daemon"
    );

    // The restarted daemon takes over the same tables: the rotation simply goes on.
    let daemon = start_daemon(&mut topo, "state");
    assert!(vip_on_interface(&topo));
    let lbs = ctl_ok(&daemon, &["get", "loadbalancers"]);
    assert!(lbs.contains("lb1") && lbs.contains(VIP), "{lbs}");
    assert!(
        topo.log("daemon.log")
            .contains("took over the pinned data path"),
        "{}",
        topo.log("daemon.log")
    );
    assert_eq!(
        curls(&topo, 4),
        ["member-1", "member-2", "member-1", "member-2"]
    );

    // `lbaas-ctl detach` removes what the daemon left: program, pins, VIP address.
    topo.stop(daemon.pid, "TERM");
    // (In the LB node's namespace, where its interface is.)
    let state = daemon.state_dir.to_str().unwrap();
    let out = topo.exec(&topo.lb(), &[CTL, "detach", "--state-dir", state]);
    assert!(
        out.status.success(),
        "detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("program detached"), "{out}");
    assert!(!vip_on_interface(&topo), "detach removes the VIP address");
    assert!(topo.curl(&format!("http://{VIP}/")).is_err());
}

#[test]
fn cleanup_on_exit_removes_the_data_path() {
    let (mut topo, daemon) = web_lab("cleanup", 1, &["--cleanup-on-exit"]);
    assert_eq!(curls(&topo, 1), ["member-1"]);
    assert!(topo.stop(daemon.pid, "TERM").success());
    assert!(!vip_on_interface(&topo));
    assert!(topo.curl(&format!("http://{VIP}/")).is_err());
    let pins = topo.bpffs().join("lbaas");
    assert!(
        !pins.exists(),
        "pins removed: {:?}",
        std::fs::read_dir(&pins).map(|d| d.count())
    );
}

#[test]
fn kill_9_of_the_daemon_loses_no_request_and_no_connection() {
    let (mut topo, daemon) = lab("kill9", 2);
    apply(
        &topo,
        &daemon,
        &two_listeners("ROUND_ROBIN", &[(1, ""), (2, "")], ""),
    );
    let mut conn = EchoConn::open(&topo, 7000).unwrap();
    let first = conn.member();
    // A request loop through the VIP, each request on a new connection.
    let traffic = RequestLoop::start(&mut topo, 10);
    let exchange = |conn: &mut EchoConn, n: usize| {
        for i in 0..n {
            assert_eq!(conn.echo(&format!("m{i}")), format!("{first}:m{i}"));
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    exchange(&mut conn, 3);
    topo.stop(daemon.pid, "KILL");
    // No daemon at all for a while: everything keeps flowing.
    exchange(&mut conn, 10);
    let daemon = start_daemon(&mut topo, "state");
    exchange(&mut conn, 5);
    // An apply that changes every pool: established flows stay where they are.
    apply(
        &topo,
        &daemon,
        &two_listeners("ROUND_ROBIN", &[(1, ", weight: 3"), (2, ", weight: 2")], ""),
    );
    exchange(&mut conn, 5);
    let requests = traffic.stop();
    let failed: Vec<&Request> = requests.iter().filter(|r| r.failed()).collect();
    assert!(
        requests.len() > 100,
        "too little traffic: {}",
        requests.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        requests.len(),
        &failed[..failed.len().min(3)]
    );
}

/// A TCP connection opened from the client namespace, speaking the members' line echo.
struct EchoConn {
    reader: std::io::BufReader<std::net::TcpStream>,
}

impl EchoConn {
    /// Connects to VIP:`port` from inside the client namespace (a thread enters it; the socket
    /// stays in it).
    fn open(topo: &Topology, port: u16) -> std::io::Result<Self> {
        let ns = topo.client();
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd as _;
            let file = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
            // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let addr = std::net::SocketAddr::new(VIP.parse().unwrap(), port);
            let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(3)))?;
            Ok(EchoConn {
                reader: std::io::BufReader::new(stream),
            })
        })
        .join()
        .expect("connect thread")
    }

    /// Sends a line and returns the member's answer (`member-i:line`).
    fn echo(&mut self, line: &str) -> String {
        use std::io::{BufRead as _, Write as _};
        self.reader
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .expect("send on the long-lived connection");
        let mut answer = String::new();
        self.reader
            .read_line(&mut answer)
            .expect("answer on the long-lived connection");
        assert!(answer.ends_with('\n'), "connection closed: got {answer:?}");
        answer.trim().to_string()
    }

    /// Which member answers on this connection.
    fn member(&mut self) -> String {
        self.echo("who").split(':').next().unwrap().to_string()
    }
}

/// One load balancer with an HTTP listener (:80) and an echo listener (:7000) over the same
/// members, with the given algorithm, per-member extras (`, weight: 0`) and listener extras.
fn two_listeners(algorithm: &str, members: &[(usize, &str)], echo_extra: &str) -> String {
    let list = |port: u16| {
        members
            .iter()
            .map(|(i, extra)| {
                format!(
                    "{{address: {}, protocol_port: {port}{extra}}}",
                    member_addr(*i)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "    listeners:\n      - {{name: web, protocol: TCP, protocol_port: 80, default_pool: web}}\n      - {{name: echo, protocol: TCP, protocol_port: 7000, default_pool: echo{echo_extra}}}\n    pools:\n      - {{name: web, protocol: TCP, lb_algorithm: {algorithm}, members: [{}]}}\n      - {{name: echo, protocol: TCP, lb_algorithm: {algorithm}, members: [{}]}}\n",
        list(80),
        list(7000)
    )
}

fn lab(tag: &str, members: usize) -> (Topology, Daemon) {
    topology::require_root();
    let mut topo = Topology::new(tag, members);
    for i in 1..=members {
        topo.start_http_member(i);
        topo.start_echo_member(i);
    }
    let daemon = start_daemon(&mut topo, "state");
    (topo, daemon)
}

fn apply(topo: &Topology, daemon: &Daemon, body: &str) -> String {
    ctl_ok(
        daemon,
        &["apply", "-f", &write_config(topo, "lb.yaml", body)],
    )
}

#[test]
fn draining_a_member_keeps_its_long_lived_connection_and_sends_new_ones_elsewhere() {
    let (topo, daemon) = lab("drain", 2);
    apply(
        &topo,
        &daemon,
        &two_listeners("ROUND_ROBIN", &[(1, ""), (2, "")], ""),
    );
    let mut conn = EchoConn::open(&topo, 7000).unwrap();
    assert_eq!(conn.member(), "member-1");
    apply(
        &topo,
        &daemon,
        &two_listeners("ROUND_ROBIN", &[(1, ", weight: 0"), (2, "")], ""),
    );
    for i in 0..5 {
        assert_eq!(conn.echo(&format!("line{i}")), format!("member-1:line{i}"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(curls(&topo, 4), ["member-2"; 4]);
    assert_eq!(EchoConn::open(&topo, 7000).unwrap().member(), "member-2");
    assert_eq!(conn.echo("still-here"), "member-1:still-here");
    let members = ctl_ok(&daemon, &["get", "members"]);
    assert!(members.contains("DRAINING"), "{members}");
}

#[test]
fn least_connections_sends_new_connections_to_the_less_busy_member() {
    let (topo, daemon) = lab("lc", 2);
    apply(
        &topo,
        &daemon,
        &two_listeners("LEAST_CONNECTIONS", &[(1, "")], ""),
    );
    let mut held: Vec<EchoConn> = (0..3)
        .map(|_| EchoConn::open(&topo, 7000).unwrap())
        .collect();
    for conn in &mut held {
        assert_eq!(conn.member(), "member-1");
    }
    apply(
        &topo,
        &daemon,
        &two_listeners("LEAST_CONNECTIONS", &[(1, ""), (2, "")], ""),
    );
    // Member-1 holds 3 idle connections: the next 3 go to member-2.
    for _ in 0..3 {
        let mut conn = EchoConn::open(&topo, 7000).unwrap();
        assert_eq!(conn.member(), "member-2");
        held.push(conn);
    }
    // Even now: the next two connections go one to each.
    let mut next: Vec<String> = (0..2)
        .map(|_| {
            let mut c = EchoConn::open(&topo, 7000).unwrap();
            let m = c.member();
            held.push(c);
            m
        })
        .collect();
    next.sort();
    assert_eq!(next, ["member-1", "member-2"]);
}

#[test]
fn the_connection_limit_refuses_the_third_concurrent_connection() {
    let (topo, daemon) = lab("limit", 1);
    apply(
        &topo,
        &daemon,
        &two_listeners("ROUND_ROBIN", &[(1, "")], ", connection_limit: 2"),
    );
    let mut first = EchoConn::open(&topo, 7000).unwrap();
    let mut second = EchoConn::open(&topo, 7000).unwrap();
    assert_eq!(
        (first.member(), second.member()),
        ("member-1".into(), "member-1".into())
    );
    let third = EchoConn::open(&topo, 7000);
    let err = third
        .err()
        .expect("a third concurrent connection must be refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let (stats, echo) = listener_figures(&daemon, "echo");
    assert_eq!(echo["refused_connections"], 1, "{stats}");
    assert_eq!(echo["active_connections"], 2, "{stats}");
    // One closes: there is room again.
    drop(first);
    wait_until(
        Duration::from_secs(5),
        "the closed connection to free its place",
        || EchoConn::open(&topo, 7000).is_ok_and(|mut c| c.member() == "member-1"),
    );
    assert_eq!(second.echo("ok"), "member-1:ok");
}

/// `stats -o json` whole, and the named listener's figures in it.
fn listener_figures(daemon: &Daemon, name: &str) -> (serde_json::Value, serde_json::Value) {
    let stats: serde_json::Value =
        serde_json::from_str(&ctl_ok(daemon, &["stats", "-o", "json"])).unwrap();
    let listener = stats["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["listener"] == name)
        .unwrap_or_else(|| panic!("no listener {name} in {stats}"))
        .clone();
    (stats, listener)
}

/// `curl` of the VIP's port 80 from a given client source address (connect limit 1 s).
fn curl_from(topo: &Topology, source: &str) -> Result<String, String> {
    let out = topo.exec(
        &topo.client(),
        &[
            "curl",
            "-sS",
            "--interface",
            source,
            "--connect-timeout",
            "1",
            "--max-time",
            "3",
            &format!("http://{VIP}/"),
        ],
    );
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

#[test]
fn allowed_cidrs_on_a_tcp_listener_admit_only_their_sources() {
    let (topo, daemon) = lab("cidrs", 1);
    let other = "10.77.1.3";
    topology::sh(&format!(
        "ip -n {} addr add {other}/24 dev eth0",
        topo.client()
    ));
    let with_cidrs = |cidrs: &str| {
        two_listeners("ROUND_ROBIN", &[(1, "")], "").replacen(
            "default_pool: web}",
            &format!("default_pool: web, allowed_cidrs: [{cidrs}]}}"),
            1,
        )
    };
    apply(&topo, &daemon, &with_cidrs(&format!("{CLIENT_ADDR}/32")));
    assert_eq!(curl_from(&topo, CLIENT_ADDR).unwrap(), "member-1");
    let err = curl_from(&topo, other).expect_err("a source outside allowed_cidrs must not connect");
    // Dropped like a security group drops, not refused: the client hears nothing.
    assert!(
        err.contains("timed out") || err.contains("Timeout"),
        "{err}"
    );
    let (stats, web) = listener_figures(&daemon, "web");
    // The SYN and its retransmissions within the second: each a refused new flow.
    assert!(web["refused_connections"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(web["total_connections"], 1, "{stats}");
    let drops = stats["datapath"]
        .as_array()
        .unwrap()
        .iter()
        .find(|kv| kv[0] == "drop_source")
        .unwrap()[1]
        .as_u64()
        .unwrap();
    assert!(drops >= 1, "{stats}");
    // Widened to the subnet: both sources are served.
    apply(&topo, &daemon, &with_cidrs("10.77.1.0/24"));
    assert_eq!(curl_from(&topo, other).unwrap(), "member-1");
    assert_eq!(curl_from(&topo, CLIENT_ADDR).unwrap(), "member-1");
    // The echo listener on the same VIP never filtered anyone.
    assert_eq!(EchoConn::open(&topo, 7000).unwrap().member(), "member-1");
}

#[test]
fn back_to_back_applies_under_traffic_lose_no_request() {
    let (mut topo, daemon) = lab("loop", 3);
    let all = [(1, ""), (2, ""), (3, "")];
    apply(&topo, &daemon, &two_listeners("ROUND_ROBIN", &all, ""));
    // The client requests continuously, each request on a new connection.
    let traffic = RequestLoop::start(&mut topo, 0);

    // 100 changes: members leave and come back, weights change.
    let sets: [&[(usize, &str)]; 5] = [
        &[(1, ""), (2, "")],
        &[(2, ", weight: 3"), (3, "")],
        &[(1, ""), (3, ", weight: 2")],
        &[(1, ", weight: 5"), (2, ""), (3, "")],
        &[(3, "")],
    ];
    let mut windows = Vec::new(); // (applied_ns, next_apply_start_ns, allowed members)
    for k in 0..100 {
        let set = sets[k % sets.len()];
        let start = lbaas_ctl::datapath::monotonic_ns();
        if let Some(last) = windows.last_mut() {
            let (_, end, _): &mut (u64, u64, Vec<String>) = last;
            *end = start;
        }
        apply(&topo, &daemon, &two_listeners("ROUND_ROBIN", set, ""));
        let done = lbaas_ctl::datapath::monotonic_ns();
        let allowed = set.iter().map(|(i, _)| format!("member-{i}")).collect();
        windows.push((done, u64::MAX, allowed));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let requests = traffic.stop();
    assert!(
        requests.len() > 200,
        "too little traffic to judge: {} requests",
        requests.len()
    );
    let failed: Vec<_> = requests.iter().filter(|r| r.failed()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        requests.len(),
        &failed[..failed.len().min(5)]
    );
    // A request that started and ended between two applies went to a member of that config.
    let mut judged = 0;
    for Request { start, end, body } in &requests {
        if let Some((_, _, allowed)) = windows
            .iter()
            .find(|(from, to, _)| start >= from && end <= to)
        {
            judged += 1;
            assert!(
                allowed.iter().any(|m| m == body),
                "request {start}..{end} reached {body}, configured: {allowed:?}"
            );
        }
    }
    assert!(judged > 100, "only {judged} requests fell between applies");
}

#[test]
fn a_removed_member_finishes_its_connection_then_is_released() {
    let (topo, daemon) = lab("release", 2);
    apply(
        &topo,
        &daemon,
        &two_listeners("ROUND_ROBIN", &[(1, ""), (2, "")], ""),
    );
    let mut conn = EchoConn::open(&topo, 7000).unwrap();
    assert_eq!(conn.member(), "member-1");
    let out = apply(
        &topo,
        &daemon,
        &two_listeners("ROUND_ROBIN", &[(2, "")], ""),
    );
    assert!(out.contains("- member lb1/echo/10.77.2.11:7000"), "{out}");
    for i in 0..3 {
        assert_eq!(
            conn.echo(&format!("still{i}")),
            format!("member-1:still{i}")
        );
    }
    assert_eq!(curls(&topo, 2), ["member-2"; 2]);
    drop(conn);
    wait_until(
        Duration::from_secs(6),
        "the daemon to release the drained member",
        || {
            topo.log("daemon.log")
                .contains("removed members drained and released")
        },
    );
}

#[test]
fn interfaces_that_flap_or_are_recreated_get_the_program_back() {
    let (topo, daemon) = web_lab("flap", 2, &[]);
    assert_eq!(curls(&topo, 2), ["member-1", "member-2"]);
    let lb = topo.lb();
    // Down and up: the attachment and the addresses stay.
    topo.exec(&lb, &["ip", "link", "set", "lan0", "down"]);
    topo.exec(&lb, &["ip", "link", "set", "lan0", "up"]);
    wait_until(Duration::from_secs(5), "traffic after link down/up", || {
        topo.curl(&format!("http://{VIP}/")).is_ok()
    });
    // Deleted and created again: the daemon attaches anew and restores the VIP address.
    topo.recreate_client_link();
    wait_until(
        Duration::from_secs(6),
        "the VIP back on the re-created interface",
        || vip_on_interface(&topo),
    );
    wait_until(
        Duration::from_secs(5),
        "traffic through the re-created interface",
        || topo.curl(&format!("http://{VIP}/")).is_ok(),
    );
    let log = topo.log("daemon.log");
    assert!(
        log.contains("interface re-created: XDP attached again"),
        "{log}"
    );
    assert!(forwarded_by_xdp(&daemon) > 0);
    let answers = curls(&topo, 4);
    assert!(
        answers.contains(&"member-1".to_string()) && answers.contains(&"member-2".to_string()),
        "{answers:?}"
    );
}

#[test]
fn a_corrupt_state_file_stops_the_daemon_and_is_left_alone() {
    topology::require_root();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let file = state.join("state.json");
    std::fs::write(&file, b"{\"config\": {\"loadbalancers\": [ truncated").unwrap();
    let out = std::process::Command::new(CTL)
        .args([
            "--socket",
            dir.path().join("s.sock").to_str().unwrap(),
            "daemon",
            "--interface",
            "lo",
        ])
        .args([
            "--state-dir",
            state.to_str().unwrap(),
            "--pin-path",
            dir.path().join("pins").to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("state file {} is corrupt", file.display())),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"{\"config\": {\"loadbalancers\": [ truncated"
    );
}

#[test]
fn the_api_socket_admits_root_and_the_socket_group_only() {
    topology::require_root();
    let mut topo = Topology::new("sock", 1);
    let daemon = start_daemon_with(&mut topo, "state", &["--socket-group", "nogroup"]);
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let meta = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 65534);
    let as_user = |uid: &str, gid: &str| {
        std::process::Command::new("setpriv")
            .args([
                "--reuid",
                uid,
                "--regid",
                gid,
                "--clear-groups",
                CTL,
                "--socket",
            ])
            .arg(&daemon.socket)
            .args(["get", "loadbalancers"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let member = as_user("65534", "65534");
    assert!(
        member.status.success(),
        "a member of the socket group: {}",
        String::from_utf8_lossy(&member.stderr)
    );
    let stranger = as_user("65533", "65533");
    assert!(!stranger.status.success());
    let err = String::from_utf8_lossy(&stranger.stderr);
    assert!(
        err.contains("cannot reach the daemon") && err.contains("ermission denied"),
        "{err}"
    );
}

#[test]
fn pins_of_another_layout_are_replaced_and_the_cost_is_said() {
    let (mut topo, daemon) = web_lab("layout", 1, &[]);
    assert!(topo.stop(daemon.pid, "TERM").success());
    // Pretend the pins were left by a build with another layout version.
    let pins = topo.bpffs().join("lbaas");
    let current = pins.join(format!("v{}", lbaas_common::LAYOUT_VERSION));
    std::fs::rename(&current, pins.join("v0")).unwrap();
    let _daemon = start_daemon(&mut topo, "state");
    let log = topo.log("daemon.log");
    assert!(log.contains("cannot be taken over"), "{log}");
    assert!(!pins.join("v0").exists(), "old pins removed");
    assert!(current.join("LB_VIPS").exists());
    assert_eq!(curls(&topo, 2), ["member-1"; 2]);
}

#[test]
fn octavia_statistics_add_up_from_members_to_the_load_balancer() {
    let (topo, daemon) = lab("stats", 2);
    apply(
        &topo,
        &daemon,
        &two_listeners("ROUND_ROBIN", &[(1, ""), (2, "")], ""),
    );
    assert_eq!(curls(&topo, 6).len(), 6);
    let held: Vec<EchoConn> = (0..3)
        .map(|_| EchoConn::open(&topo, 7000).unwrap())
        .collect();
    let mut held = held;
    for c in &mut held {
        c.member();
    }
    let stats: serde_json::Value =
        serde_json::from_str(&ctl_ok(&daemon, &["stats", "lb1", "-o", "json"])).unwrap();
    let find = |name: &str| {
        stats["objects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {stats}"))
    };
    let num = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    let (lb, web, echo) = (find("lb1"), find("lb1/web"), find("lb1/echo"));
    assert_eq!(num(&web, "total_connections"), 6);
    assert_eq!(num(&echo, "total_connections"), 3);
    assert_eq!(num(&echo, "active_connections"), 3, "the held connections");
    assert_eq!(num(&lb, "total_connections"), 9);
    assert_eq!(
        num(&lb, "bytes_in"),
        num(&web, "bytes_in") + num(&echo, "bytes_in")
    );
    let pool = find("lb1/web");
    let m1 = find(&format!("lb1/web/{}:80", member_addr(1)));
    let m2 = find(&format!("lb1/web/{}:80", member_addr(2)));
    assert_eq!(
        num(&m1, "total_connections") + num(&m2, "total_connections"),
        6
    );
    assert_eq!(
        num(&m1, "bytes_out") + num(&m2, "bytes_out"),
        num(&pool, "bytes_out")
    );
    assert!(
        num(&pool, "bytes_out") > 6 * 10,
        "the six pages came back through the LB"
    );
    let table = ctl_ok(&daemon, &["stats", "lb1"]);
    assert!(
        table.contains("request_errors") && table.contains("lb1/echo"),
        "{table}"
    );
}

#[test]
fn prometheus_metrics_match_the_stats() {
    let (topo, daemon) = web_lab("metrics", 2, &["--metrics", "127.0.0.1:9109"]);
    // The TCP listener (XDP) and an HTTP listener (the proxy) on one pool, health-checked.
    let both = format!(
        "    listeners:\n      - {{name: web, protocol: TCP, protocol_port: 80, default_pool: web-pool}}\n      - {{name: proxied, protocol: HTTP, protocol_port: 8080, default_pool: web-pool}}\n    pools:\n      - name: web-pool\n        protocol: HTTP\n        lb_algorithm: ROUND_ROBIN\n        healthmonitor: {{type: TCP, delay: 2, timeout: 1, max_retries: 1}}\n        members:\n          - {{address: {}, protocol_port: 80}}\n          - {{address: {}, protocol_port: 80}}\n",
        member_addr(1),
        member_addr(2)
    );
    ctl_ok(
        &daemon,
        &["apply", "-f", &write_config(&topo, "both.yaml", &both)],
    );
    assert_eq!(curls(&topo, 5).len(), 5);
    for _ in 0..3 {
        topo.curl(&format!("http://{VIP}:8080/"))
            .expect("curl through the proxy");
    }
    let scrape = || {
        let out = topo.exec(
            &topo.lb(),
            &[
                "curl",
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:9109/metrics",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_until(Duration::from_secs(10), "a health check observed", || {
        scrape().contains("lbaas_health_check_duration_seconds_count{type=\"TCP\",result=\"ok\"}")
    });
    let text = scrape();
    // Every sample line is `name{labels} number`; families are announced.
    let mut samples = std::collections::BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        samples.insert(name.to_string(), value);
    }
    assert!(text.contains("# TYPE lbaas_listener_total_connections counter"));
    assert!(text.contains("# TYPE lbaas_health_check_duration_seconds histogram"));
    assert_eq!(
        samples["lbaas_listener_total_connections_total{loadbalancer=\"lb1\",listener=\"web\"}"],
        5.0,
        "{text}"
    );
    assert_eq!(
        samples["lbaas_listener_total_connections_total{loadbalancer=\"lb1\",listener=\"proxied\"}"],
        3.0,
        "{text}"
    );
    assert_eq!(
        samples["lbaas_loadbalancer_total_connections_total{loadbalancer=\"lb1\"}"],
        8.0
    );
    let m1 = format!(
        "lbaas_member_up{{loadbalancer=\"lb1\",pool=\"web-pool\",member=\"{}:80\"}}",
        member_addr(1)
    );
    assert_eq!(samples[&m1], 1.0, "{text}");
    assert_eq!(samples["lbaas_applies_total"], 2.0);
    let stats: serde_json::Value =
        serde_json::from_str(&ctl_ok(&daemon, &["stats", "-o", "json"])).unwrap();
    let lb = stats["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "lb1")
        .unwrap()
        .clone();
    assert_eq!(
        samples["lbaas_loadbalancer_bytes_in_total{loadbalancer=\"lb1\"}"],
        lb["bytes_in"].as_f64().unwrap()
    );
    let listener = |name: &str| {
        stats["objects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == format!("lb1/{name}"))
            .unwrap()
            .clone()
    };
    assert_eq!(listener("web")["total_connections"], 5);
    assert_eq!(listener("proxied")["total_connections"], 3);
    assert_eq!(
        samples["lbaas_listener_bytes_out_total{loadbalancer=\"lb1\",listener=\"proxied\"}"],
        listener("proxied")["bytes_out"].as_f64().unwrap()
    );
}
