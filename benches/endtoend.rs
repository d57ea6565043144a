//! `cargo xtask bench`, end to end: real nginx members behind each system under test on the
//! two-arm namespace topology, driven by wrk (HTTP) and a UDP blaster, with the systems
//! alternated round by round (A B C ... A B C ...) so that a noisy neighbour hits them all
//! alike; then failover convergence and the health checks' CPU. Appends to the report the
//! data-path bench wrote and draws the ratios as a PNG. Reports; never fails on a figure. Root.
//!
//! The configurations compared are kept in `benchmarks/` (lbaas YAML, nftables, HAProxy,
//! nginx), with the same members and the same algorithm (round robin).

#[path = "../tests/common/daemon.rs"]
#[allow(dead_code)]
mod daemon;
#[path = "../tests/common/topology.rs"]
mod topology;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use daemon::{ctl_ok, start_daemon};
use topology::{Topology, member_addr, sh, wait_until};

/// Run lengths and repetitions.
struct Settings {
    rounds: usize,
    seconds: u64,
    connections: u32,
    /// Members of each health-check load measured (100 pools, HTTP monitors every 2 s).
    health_members: Vec<usize>,
    cpu_window: Duration,
    /// Failovers measured (member-1 killed at as many points of the probe cycle).
    failovers: usize,
}

/// One system under test: where its HTTP and UDP traffic goes.
struct System {
    name: &'static str,
    /// wrk targets, one wrk each, run at once with the connections split evenly (direct: one
    /// per member; the others: the VIP twice, so every system gets the same two load threads).
    http: Vec<String>,
    /// UDP targets; `None` when the system has no UDP path.
    udp: Option<Vec<SocketAddr>>,
}

/// The three traffic kinds measured for each system.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Load {
    KeepAlive,
    NewConnection,
    Udp,
}

impl Load {
    fn label(self) -> &'static str {
        match self {
            Load::KeepAlive => "HTTP requests/s, keep-alive",
            Load::NewConnection => "HTTP requests/s, a new TCP connection per request",
            Load::Udp => "UDP datagrams/s (32-byte payload, 16 flows)",
        }
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open the namespace");
        // SAFETY: setns on a valid namespace fd moves only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        f()
    })
}

/// Requests/s and error count of wrk runs started together against `urls`.
fn wrk(topo: &Topology, urls: &[String], s: &Settings, close: bool) -> (f64, u64) {
    let per = (s.connections / urls.len() as u32).max(1).to_string();
    let secs = format!("{}s", s.seconds);
    let children: Vec<_> = urls
        .iter()
        .map(|url| {
            let mut c = std::process::Command::new("ip");
            c.args([
                "netns",
                "exec",
                &topo.client(),
                "wrk",
                "-t1",
                "-c",
                &per,
                "-d",
            ])
            .arg(&secs)
            .args(["--timeout", "2s"]);
            if close {
                c.args(["-H", "Connection: close"]);
            }
            c.arg(url)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("run wrk")
        })
        .collect();
    let (mut rate, mut errors) = (0.0, 0);
    for child in children {
        let out = child.wait_with_output().expect("wrk");
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            let line = line.trim();
            if let Some(v) = line.strip_prefix("Requests/sec:") {
                rate += v.trim().parse::<f64>().unwrap_or(0.0);
            }
            if line.starts_with("Socket errors:") || line.starts_with("Non-2xx") {
                errors += line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum::<u64>();
            }
        }
    }
    (rate, errors)
}

/// The members' UDP sinks: bound sockets nobody reads, so that a datagram costs the member
/// no system call and no wake-up (a full socket buffer drops it, counted by the kernel).
/// What is counted is what reached the members' UDP layer, from each member namespace's
/// `/proc/net/snmp`: the LB's work ends there.
struct Sinks {
    members: Vec<String>,
}

/// Datagrams moved per system call by the client: it spends a fraction of a core on system
/// calls, so the cost of what lies between it and the members (the LB) shows.
const UDP_BATCH: usize = 64;

impl Sinks {
    /// A socket per member and port, held open for the rest of the run.
    fn start(topo: &Topology, ports: &[u16]) -> Self {
        let mut members = Vec::new();
        for i in 1..=topo.members {
            let (addr, ports) = (member_addr(i), ports.to_vec());
            in_netns(&topo.member(i), move || {
                let _sockets: Vec<UdpSocket> = ports
                    .iter()
                    .map(|port| UdpSocket::bind((addr.as_str(), *port)).expect("bind UDP sink"))
                    .collect();
                std::thread::park();
            });
            members.push(topo.member(i));
        }
        Self { members }
    }

    /// Datagrams that reached the members' UDP layer so far (delivered to a socket, or
    /// dropped there because its buffer was full).
    fn received(&self) -> u64 {
        self.members
            .iter()
            .map(|ns| {
                in_netns(ns, || {
                    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")
                        .expect("read /proc/net/snmp");
                    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
                    let (names, values) = (
                        udp.next().expect("Udp: names"),
                        udp.next().expect("Udp: values"),
                    );
                    let field = |name: &str| -> u64 {
                        let at = names
                            .split_whitespace()
                            .position(|n| n == name)
                            .expect("Udp field");
                        values
                            .split_whitespace()
                            .nth(at)
                            .and_then(|v| v.parse().ok())
                            .expect("Udp value")
                    };
                    field("InDatagrams") + field("RcvbufErrors")
                })
                .join()
                .expect("read a member's UDP counters")
            })
            .sum()
    }
}

/// Sends `UDP_BATCH` copies of `payload` on a connected socket with one `sendmmsg`.
fn send_batch(socket: &UdpSocket, payload: &[u8]) {
    let mut iovs = [libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    }; UDP_BATCH];
    // SAFETY: an all-zero mmsghdr is valid (no name, no control data).
    let mut msgs: [libc::mmsghdr; UDP_BATCH] = unsafe { std::mem::zeroed() };
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: msgs and the buffers they point to (only read) outlive the call.
    unsafe {
        libc::sendmmsg(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            msgs.as_mut_ptr(),
            UDP_BATCH as u32,
            0,
        )
    };
}

/// Datagrams/s delivered to members when the client blasts `targets` for the run length: one
/// sender thread per core, 16 flows between them, `sendmmsg` in batches.
fn udp_rate(topo: &Topology, sinks: &Sinks, targets: &[SocketAddr], s: &Settings) -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(16));
    let seconds = s.seconds;
    let before = sinks.received();
    let senders: Vec<_> = (0..threads)
        .map(|t| {
            let targets = targets.to_vec();
            in_netns(&topo.client(), move || {
                // Flows t, t + threads, ...: the 16 flows between the threads.
                let sockets: Vec<UdpSocket> = (t..16)
                    .step_by(threads)
                    .map(|flow| {
                        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
                        socket
                            .connect(targets[flow % targets.len()])
                            .expect("connect");
                        socket
                    })
                    .collect();
                let payload = [b'q'; 32];
                let deadline = Instant::now() + Duration::from_secs(seconds);
                let mut k = 0usize;
                while Instant::now() < deadline {
                    send_batch(&sockets[k % sockets.len()], &payload);
                    k += 1;
                }
            })
        })
        .collect();
    for sender in senders {
        sender.join().expect("UDP sender");
    }
    std::thread::sleep(Duration::from_millis(200));
    (sinks.received() - before) as f64 / s.seconds as f64
}

/// A focused comparison's figures: per system and load, the median and every round's value,
/// and each system's per-round ratio to the first one named.
fn print_focus(
    runs: &BTreeMap<(Load, &'static str), Vec<f64>>,
    systems: &[System],
    errors: &BTreeMap<&'static str, u64>,
) {
    for ((load, name), values) in runs {
        let base = &runs[&(*load, systems[0].name)];
        let ratios: Vec<f64> = values.iter().zip(base).map(|(v, b)| v / b).collect();
        println!(
            "{load:?} {name}: median {:.0}, ratio to {} {:.3} (rounds {:?}), errors {}",
            median(values.clone()),
            systems[0].name,
            median(ratios),
            values.iter().map(|v| v.round()).collect::<Vec<_>>(),
            errors.get(name).copied().unwrap_or(0)
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Starts nginx on member `i` from the template in `benchmarks/nginx.conf` (plus extra
/// `listen` ports); returns its pid.
fn start_nginx(topo: &mut Topology, i: usize, extra_ports: &[u16]) -> u32 {
    let dir = topo.dir.display().to_string();
    let name = format!(
        "member-{i}{}",
        if extra_ports.is_empty() { "" } else { "-hc" }
    );
    let mut conf = std::fs::read_to_string(repo().join("benchmarks/nginx.conf"))
        .expect("benchmarks/nginx.conf")
        .replace("@ADDR@", &member_addr(i))
        .replace("@NAME@", &name)
        .replace("@DIR@", &dir);
    if !extra_ports.is_empty() {
        // A second instance that serves only the health checks' ports.
        let listens: String = extra_ports
            .iter()
            .map(|p| format!("\t\tlisten {}:{p};\n", member_addr(i)))
            .collect();
        let start = conf.find("\t\tlisten").expect("listen lines");
        let end = conf.find("\t\tlocation").expect("location line");
        conf.replace_range(start..end, &listens);
    }
    let path = topo.path(&format!("nginx-{name}.conf"));
    std::fs::write(&path, conf).expect("nginx conf");
    let ns = topo.member(i);
    let pid = topo.spawn(
        &ns,
        &[
            "/usr/sbin/nginx",
            "-c",
            &path.display().to_string(),
            "-e",
            "stderr",
        ],
        &format!("nginx-{name}.log"),
    );
    let port = extra_ports.first().copied().unwrap_or(80);
    topo.wait_tcp(&ns, &member_addr(i), port);
    pid
}

/// User + system CPU seconds a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// One GET over a new connection; the member's name, or why it failed.
fn get_once(addr: SocketAddr) -> Result<String, String> {
    let mut conn =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    conn.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    conn.read_to_string(&mut text).map_err(|e| e.to_string())?;
    text.lines()
        .last()
        .filter(|l| l.starts_with("member-"))
        .map(str::to_string)
        .ok_or_else(|| format!("unexpected answer {text:?}"))
}

/// One failover: member-1's server is killed (SIGKILL) `lead` into a loop of new connections.
struct Failover {
    /// From the kill to the last request that reached member-1 or failed, ms.
    converged_ms: f64,
    /// Requests that failed after the kill.
    failed: usize,
    /// Requests sent in the window after the kill.
    sent: usize,
}

/// Kills member-1's server `lead` into a loop of new connections and watches the 6 s after.
fn failover(topo: &mut Topology, nginx_pid: u32, lead: Duration) -> Failover {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let vip: SocketAddr = "10.77.1.100:80".parse().unwrap();
    let client = in_netns(&topo.client(), move || {
        let mut log = Vec::new();
        while !stop2.load(Ordering::Relaxed) {
            log.push((Instant::now(), get_once(vip)));
            std::thread::sleep(Duration::from_millis(5));
        }
        log
    });
    std::thread::sleep(lead);
    let died = Instant::now();
    topo.stop(nginx_pid, "KILL");
    std::thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::Relaxed);
    let log = client.join().expect("request loop");
    let after: Vec<_> = log.iter().filter(|(t, _)| *t >= died).collect();
    let bad = |r: &Result<String, String>| r.as_ref().map_or(true, |m| m == "member-1");
    let converged_ms = after
        .iter()
        .filter(|(_, r)| bad(r))
        .map(|(t, _)| t.duration_since(died).as_secs_f64() * 1e3)
        .fold(0.0, f64::max);
    Failover {
        converged_ms,
        failed: after.iter().filter(|(_, r)| r.is_err()).count(),
        sent: after.len(),
    }
}

/// The lbaas YAML of the health-check load: `members` members in 100 pools, each behind a
/// TCP listener, HTTP monitors every 2 s (the shortest delay validation admits: `timeout`, in
/// whole seconds, must be less than `delay`; twice the members give the probe rate of delay 1).
fn health_yaml(members: usize) -> String {
    let per_pool = members / 100;
    let mut yaml = String::from(
        "loadbalancers:\n  - name: hc\n    vip_address: 10.77.1.110\n    listeners:\n",
    );
    for p in 0..100 {
        let _ = writeln!(
            yaml,
            "      - {{name: l{p}, protocol: TCP, protocol_port: {}, default_pool: p{p}}}",
            1000 + p
        );
    }
    yaml.push_str("    pools:\n");
    for p in 0..100 {
        let _ = write!(
            yaml,
            "      - name: p{p}\n        protocol: TCP\n        lb_algorithm: ROUND_ROBIN\n        healthmonitor: {{type: HTTP, delay: 2, timeout: 1, max_retries: 1, max_retries_down: 1}}\n        members:\n"
        );
        for m in 0..per_pool {
            let _ = writeln!(
                yaml,
                "          - {{address: {}, protocol_port: {}}}",
                member_addr(2),
                20000 + m
            );
        }
    }
    yaml
}

/// Draws the end-to-end ratios (to direct) as grouped bars.
fn plot(path: &Path, table: &BTreeMap<(Load, &'static str), f64>, systems: &[&str]) {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .expect("DejaVuSans.ttf (Debian fonts-dejavu-core)");
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, font.leak());
    let root = BitMapBackend::new(path, (1100, 560)).into_drawing_area();
    root.fill(&WHITE).expect("draw");
    let loads = [Load::KeepAlive, Load::NewConnection, Load::Udp];
    let top = table.values().copied().fold(1.0f64, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "End to end, ratio to direct routing (higher is better)",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0f64..(systems.len() as f64), 0f64..top)
        .expect("chart");
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("ratio to direct")
        .label_style(("sans-serif", 15))
        .draw()
        .expect("mesh");
    let colours = [
        RGBColor(66, 133, 244),
        RGBColor(234, 67, 53),
        RGBColor(52, 168, 83),
    ];
    for (k, load) in loads.iter().enumerate() {
        let colour = colours[k];
        let bars: Vec<_> = systems
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let v = *table.get(&(*load, *name))?;
                let x0 = i as f64 + 0.12 + k as f64 * 0.25;
                Some(Rectangle::new([(x0, 0.0), (x0 + 0.24, v)], colour.filled()))
            })
            .collect();
        chart
            .draw_series(bars)
            .expect("bars")
            .label(load.label())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled()));
    }
    chart
        .draw_series(systems.iter().enumerate().map(|(i, name)| {
            Text::new(
                name.to_string(),
                (i as f64 + 0.1, top * 0.02),
                ("sans-serif", 15).into_font(),
            )
        }))
        .expect("labels");
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 1.0), (systems.len() as f64, 1.0)],
            BLACK,
        )))
        .expect("direct line");
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .expect("legend");
    root.present().expect("write the PNG");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let arg = |name: &str| args.iter().skip_while(|a| *a != name).nth(1).cloned();
    let out_path = arg("--out").unwrap_or_else(|| "BENCHMARKS.md".into());
    let plot_path = arg("--plot");
    // A focused comparison (`--systems "HAProxy http,lbaas L7 proxy" --loads keep-alive`):
    // only those systems and loads, alternated for `--rounds` rounds of `--seconds`, figures
    // printed; no report, no control-plane part. For developers weighing a change.
    let focus: Option<Vec<String>> =
        arg("--systems").map(|v| v.split(',').map(|n| n.trim().to_string()).collect());
    let loads: Vec<Load> = match arg("--loads") {
        Some(v) => v
            .split(',')
            .map(|l| match l.trim() {
                "keep-alive" => Load::KeepAlive,
                "new-connection" => Load::NewConnection,
                "udp" => Load::Udp,
                other => {
                    panic!("--loads: unknown load {other:?} (keep-alive, new-connection, udp)")
                }
            })
            .collect(),
        None => vec![Load::KeepAlive, Load::NewConnection, Load::Udp],
    };
    let number =
        |name: &str| arg(name).map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: a number")));
    let mut s = if quick {
        Settings {
            rounds: 1,
            seconds: 1,
            connections: 32,
            health_members: vec![1_000],
            cpu_window: Duration::from_secs(3),
            failovers: 2,
        }
    } else {
        Settings {
            rounds: 5,
            seconds: 5,
            connections: 32,
            health_members: vec![10_000, 20_000],
            cpu_window: Duration::from_secs(10),
            failovers: 5,
        }
    };
    s.rounds = number("--rounds").map_or(s.rounds, |n: u64| n as usize);
    s.seconds = number("--seconds").unwrap_or(s.seconds);
    topology::require_root();
    let mut topo = Topology::new("bench", 2);
    let (c, lb) = (topo.client(), topo.lb());
    // Enough ports for a few seconds of new connections per request.
    topology::run(&[
        "ip",
        "netns",
        "exec",
        &c,
        "sysctl",
        "-qw",
        "net.ipv4.ip_local_port_range=1024 65535",
    ]);
    sh(&format!(
        "ip netns exec {c} sysctl -qw net.ipv4.tcp_tw_reuse=1"
    ));
    let nginx: Vec<u32> = (1..=2).map(|i| start_nginx(&mut topo, i, &[])).collect();
    let sinks = Sinks::start(&topo, &[5353, 5454]);

    // lbaas: the daemon with the XDP data path and the L7 proxy.
    let daemon = start_daemon(&mut topo, "state");
    let lbaas_yaml = repo().join("benchmarks/lbaas.yaml").display().to_string();
    ctl_ok(&daemon, &["apply", "-f", &lbaas_yaml]);
    // nftables DNAT and HAProxy, on VIPs of their own on the same node.
    for vip in ["10.77.1.102", "10.77.1.103", "10.77.1.104"] {
        sh(&format!("ip -n {lb} addr add {vip}/32 dev lan0"));
    }
    let nft = repo().join("benchmarks/nftables.nft").display().to_string();
    sh(&format!("ip netns exec {lb} nft -f {nft}"));
    let haproxy_cfg = repo().join("benchmarks/haproxy.cfg").display().to_string();
    topo.spawn(
        &lb,
        &["/usr/sbin/haproxy", "-db", "-f", &haproxy_cfg],
        "haproxy.log",
    );
    for vip in ["10.77.1.103", "10.77.1.104"] {
        topo.wait_tcp(&lb, vip, 80);
    }
    wait_until(Duration::from_secs(10), "the lbaas VIPs to answer", || {
        topo.curl("http://10.77.1.100/").is_ok() && topo.curl("http://10.77.1.101/").is_ok()
    });

    let udp = |addrs: &[&str]| Some(addrs.iter().map(|a| a.parse().unwrap()).collect());
    let systems = vec![
        System {
            name: "direct",
            http: vec![
                format!("http://{}/", member_addr(1)),
                format!("http://{}/", member_addr(2)),
            ],
            udp: udp(&["10.77.2.11:5353", "10.77.2.12:5353"]),
        },
        System {
            name: "lbaas XDP",
            http: vec!["http://10.77.1.100/".into(); 2],
            udp: udp(&["10.77.1.100:53"]),
        },
        System {
            name: "nftables DNAT",
            http: vec!["http://10.77.1.102/".into(); 2],
            udp: udp(&["10.77.1.102:53"]),
        },
        System {
            name: "HAProxy tcp",
            http: vec!["http://10.77.1.103/".into(); 2],
            udp: None,
        },
        System {
            name: "HAProxy http",
            http: vec!["http://10.77.1.104/".into(); 2],
            udp: None,
        },
        System {
            name: "lbaas L7 proxy",
            http: vec!["http://10.77.1.101/".into(); 2],
            udp: None,
        },
    ];
    // Every system's figures, round by round, alternating systems within each round.
    let mut runs: BTreeMap<(Load, &'static str), Vec<f64>> = BTreeMap::new();
    let mut errors: BTreeMap<&'static str, u64> = BTreeMap::new();
    let systems: Vec<System> = match &focus {
        Some(names) => {
            for n in names {
                assert!(
                    systems.iter().any(|s| s.name == n),
                    "--systems: unknown system {n:?}"
                );
            }
            systems
                .into_iter()
                .filter(|s| names.iter().any(|n| n == s.name))
                .collect()
        }
        None => systems,
    };
    for round in 0..s.rounds {
        for &load in &loads {
            for system in &systems {
                let value = match load {
                    Load::Udp => match &system.udp {
                        Some(targets) => udp_rate(&topo, &sinks, targets, &s),
                        None => continue,
                    },
                    _ => {
                        let (rate, errs) =
                            wrk(&topo, &system.http, &s, load == Load::NewConnection);
                        *errors.entry(system.name).or_default() += errs;
                        rate
                    }
                };
                eprintln!("round {round} {:?} {}: {value:.0}", load, system.name);
                runs.entry((load, system.name)).or_default().push(value);
            }
        }
    }
    if focus.is_some() {
        print_focus(&runs, &systems, &errors);
        return;
    }
    // Ratios to direct, per round, then the median.
    let mut ratios: BTreeMap<(Load, &'static str), f64> = BTreeMap::new();
    for ((load, name), values) in &runs {
        let direct = &runs[&(*load, "direct")];
        let per_round: Vec<f64> = values
            .iter()
            .zip(direct)
            .map(|(v, d)| if *d > 0.0 { v / d } else { 0.0 })
            .collect();
        ratios.insert((*load, *name), median(per_round));
    }

    // The comparison's nftables NAT table makes the LB namespace track every connection; the
    // health load below (thousands of probes a second) would fill that table and have the
    // probes dropped. It has served its purpose.
    sh(&format!("ip netns exec {lb} nft delete table ip lbbench"));

    // Failover: the benchmark's own configuration with an HTTP monitor (delay 2 s).
    let failover_yaml = std::fs::read_to_string(&lbaas_yaml)
        .unwrap()
        .replacen(
            "lb_algorithm: ROUND_ROBIN",
            "lb_algorithm: ROUND_ROBIN\n        healthmonitor: {type: HTTP, delay: 2, timeout: 1, max_retries: 1, max_retries_down: 1}",
            1,
        );
    let fo_path = topo.path("failover.yaml");
    std::fs::write(&fo_path, failover_yaml).unwrap();
    ctl_ok(&daemon, &["apply", "-f", &fo_path.display().to_string()]);
    // The XDP pool's member-1 as the daemon sees it.
    let member_1 = |daemon: &daemon::Daemon| {
        ctl_ok(daemon, &["get", "members"])
            .lines()
            .find(|l| l.starts_with("xdp") && l.contains(" web ") && l.contains("10.77.2.11"))
            .map(|l| l.split_whitespace().last().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    // Where a kill falls in the monitor's 2 s probe cycle decides most of the figure, so
    // several kills, each later in the cycle than the one before (every round starts just
    // after a probe has found member-1 back up), with its server restarted in between.
    let mut failovers = Vec::new();
    let mut statuses_after = BTreeSet::new();
    let mut member_1_pid = nginx[0];
    for k in 0..s.failovers {
        wait_until(
            Duration::from_secs(20),
            "member-1 ONLINE under its monitor",
            || member_1(&daemon) == "ONLINE",
        );
        let lead = Duration::from_millis(500 + 2000 * k as u64 / s.failovers as u64);
        failovers.push(failover(&mut topo, member_1_pid, lead));
        statuses_after.insert(member_1(&daemon));
        member_1_pid = start_nginx(&mut topo, 1, &[]);
    }

    // Health checks' CPU: the daemon's own CPU time with no monitor, then with many.
    let idle_before = cpu_seconds(daemon.pid);
    std::thread::sleep(s.cpu_window);
    let idle_cpu = (cpu_seconds(daemon.pid) - idle_before) / s.cpu_window.as_secs_f64();
    let most = s.health_members.iter().copied().max().unwrap_or(0);
    let ports: Vec<u16> = (0..(most / 100) as u16).map(|p| 20000 + p).collect();
    start_nginx(&mut topo, 2, &ports);
    // (members, apply ms, members seen ONLINE, CPU share of one core)
    let mut health_rows = Vec::new();
    for members in &s.health_members {
        let hc_path = topo.path(&format!("health-{members}.yaml"));
        std::fs::write(&hc_path, health_yaml(*members)).expect("health yaml");
        let apply_start = Instant::now();
        ctl_ok(&daemon, &["apply", "-f", &hc_path.display().to_string()]);
        let apply_ms = apply_start.elapsed().as_secs_f64() * 1e3;
        // Let every monitor run a first round, then measure a steady window.
        std::thread::sleep(Duration::from_secs(3));
        let online = ctl_ok(&daemon, &["get", "members"])
            .matches("ONLINE")
            .count();
        let before = cpu_seconds(daemon.pid);
        std::thread::sleep(s.cpu_window);
        let cpu = (cpu_seconds(daemon.pid) - before) / s.cpu_window.as_secs_f64();
        health_rows.push((*members, apply_ms, online, cpu));
    }

    // Report.
    let mut md = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = writeln!(
        md,
        "\n## End to end, ratio to direct routing (two-arm namespaces, real nginx members)\n"
    );
    let names: Vec<&str> = systems.iter().map(|s| s.name).collect();
    let _ = writeln!(md, "| load | {} |", names.join(" | "));
    let _ = writeln!(md, "|---|{}", "---:|".repeat(names.len()));
    for load in [Load::KeepAlive, Load::NewConnection, Load::Udp] {
        let cells: Vec<String> = names
            .iter()
            .map(|n| match (runs.get(&(load, *n)), ratios.get(&(load, *n))) {
                (Some(v), Some(r)) => format!("{r:.2}x ({:.0})", median(v.clone())),
                _ => "n/a".into(),
            })
            .collect();
        let _ = writeln!(md, "| {} | {} |", load.label(), cells.join(" | "));
    }
    let ratio = |load: Load, name: &'static str| ratios.get(&(load, name)).copied().unwrap_or(0.0);
    let goal = |what: &str, value: f64, want: f64| {
        format!(
            // Three decimals: a 0.997 shown as "1.00x, not met" would contradict itself.
            "| {what} | {value:.3}x | >= {want:.1}x | {} |",
            if value >= want { "met" } else { "not met" }
        )
    };
    let _ = writeln!(md, "\n| goal | measured | wanted | |\n|---|---:|---:|---|");
    let over = |a: &'static str, b: &'static str, load: Load| {
        let (x, y) = (ratio(load, a), ratio(load, b));
        if y > 0.0 { x / y } else { 0.0 }
    };
    let goals = [
        (
            "XDP path / direct, new connections",
            ratio(Load::NewConnection, "lbaas XDP"),
            1.0,
        ),
        (
            "XDP path / direct, keep-alive",
            ratio(Load::KeepAlive, "lbaas XDP"),
            1.0,
        ),
        (
            "XDP path / HAProxy tcp, new connections",
            over("lbaas XDP", "HAProxy tcp", Load::NewConnection),
            1.5,
        ),
        (
            "L7 proxy / HAProxy http, keep-alive",
            over("lbaas L7 proxy", "HAProxy http", Load::KeepAlive),
            1.0,
        ),
        (
            "L7 proxy / HAProxy http, new connections",
            over("lbaas L7 proxy", "HAProxy http", Load::NewConnection),
            1.0,
        ),
        (
            "UDP, XDP path / nftables DNAT",
            over("lbaas XDP", "nftables DNAT", Load::Udp),
            2.0,
        ),
    ];
    for (what, value, want) in goals {
        let _ = writeln!(md, "{}", goal(what, value, want));
    }
    let error_list: Vec<String> = errors.iter().map(|(n, e)| format!("{n} {e}")).collect();
    let _ = writeln!(
        md,
        "\nCells: median over {} rounds of the per-round ratio to direct (raw median in brackets). Method: client, LB node, switch and two members in network namespaces joined by veth pairs on one {}-core machine, so every system shares the same two cores with wrk and nginx: the ratios say how much of the machine each way of balancing leaves to the work. Each round runs every system once per load, in the same order (A B C ... A B C ...), {} s each; two wrk `-t1` at once with {} connections between them (direct: one per member; the others: both at the VIP), `Connection: close` for the new-connection load; UDP: a sender thread per core, 16 flows between them, 32-byte datagrams sent with `sendmmsg` in batches of 64, counted where they reach the members' UDP layer (`/proc/net/snmp` InDatagrams + RcvbufErrors in each member namespace; the members' sockets are never read, so neither end spends a system call per datagram and the cost of what lies between them shows). Direct is plain routing through the LB node (the XDP program is attached there, as it is while the others are measured, and passes their packets). Members: one nginx worker each (`benchmarks/nginx.conf`); lbaas uses the members' port 8080 and the others port 80, so that one system's member-side flows never meet another's. Configurations: `benchmarks/lbaas.yaml`, `benchmarks/nftables.nft`, `benchmarks/haproxy.cfg` (round robin everywhere; HAProxy with its default threads, one per core). Errors reported by wrk over all runs: {}.",
        s.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        s.seconds,
        s.connections,
        error_list.join(", ")
    );
    if let Some(p) = &plot_path {
        plot(Path::new(p), &ratios, &names);
        let file = Path::new(p).file_name().unwrap().to_string_lossy();
        let _ = writeln!(md, "\n![End-to-end ratios](benchmarks/{file})");
    }
    let _ = writeln!(
        md,
        "\n## Failover and health checks\n\n| what | figure |\n|---|---:|"
    );
    let spread = |figure: &dyn Fn(&Failover) -> f64| {
        let mut v: Vec<f64> = failovers.iter().map(figure).collect();
        v.sort_by(f64::total_cmp);
        let all: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
        let middle = (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0;
        (middle, v[v.len() - 1], all.join(", "))
    };
    let (ms_median, ms_max, ms_all) = spread(&|f| f.converged_ms);
    let (failed_median, failed_max, failed_all) = spread(&|f| f.failed as f64);
    let sent = failovers.iter().map(|f| f.sent).min().unwrap_or(0);
    let statuses: Vec<&str> = statuses_after.iter().map(String::as_str).collect();
    let _ = writeln!(
        md,
        "| failover convergence: member's nginx SIGKILLed under a loop of new connections (HTTP monitor, delay 2 s, timeout 1 s, max_retries_down 1; a member that refuses a connection is probed at once) to the last request that reached it or failed; {} kills spread over the probe cycle, median (max) | {ms_median:.0} ms ({ms_max:.0} ms) |",
        failovers.len()
    );
    let _ = writeln!(
        md,
        "| requests that failed during a failover (of at least {sent} sent in the 6 s after each kill; member-1 then {}), median (max) | {failed_median:.0} ({failed_max:.0}) |",
        statuses.join("/")
    );
    let _ = writeln!(
        md,
        "| the kills one by one: convergence ms; failed requests | {ms_all}; {failed_all} |"
    );
    let _ = writeln!(
        md,
        "| daemon CPU, no health monitor (idle) | {:.1}% of a core |",
        idle_cpu * 100.0
    );
    for (members, apply_ms, online, cpu) in &health_rows {
        let _ = writeln!(
            md,
            "| daemon CPU, {members} members with HTTP monitors at delay 2 s ({} probes/s{}; {online} seen ONLINE) | {:.1}% of a core |",
            members / 2,
            if *members == 20_000 {
                ", the probe rate of 10,000 members at delay 1 s"
            } else {
                ""
            },
            cpu * 100.0
        );
        let _ = writeln!(
            md,
            "| apply of those {members} members (100 pools, through the CLI and API) | {apply_ms:.0} ms |"
        );
    }
    std::fs::write(&out_path, &md).expect("write the report");
    print!("{md}");
}
