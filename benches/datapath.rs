//! `cargo xtask bench`: the data path's cost per packet through BPF_PROG_TEST_RUN, side by
//! side with a do-nothing XDP program in the same run, and control-plane timings. Writes
//! BENCHMARKS.md. Reports; never fails on a figure. Root.
//!
//! Method. `BPF_PROG_TEST_RUN` with `repeat > 1` runs every iteration on the same buffer, so a
//! rewriting program would see its own output from the second iteration on (a DNATed frame, no
//! longer aimed at the VIP). Every path is therefore taken two ways. In the kernel's own loop
//! (a large `repeat`), through a wrapper program (`lbaas_bench`) that writes the original frame
//! back before every run (and, for new flows, gives each run a source address of its own) and
//! tail-calls the data path; the same wrapper in front of the do-nothing program is measured
//! in the same round and subtracted, and the floor is the do-nothing program in the same loop.
//! And one packet per call (`repeat = 1`, a fresh frame per call for new flows), from the
//! kernel's per-run duration, next to the floor taken the same way: that adds the same ~60 ns
//! of per-call timing to both, which compresses the ratios. The calling thread is pinned to
//! one CPU; each figure is the median of several rounds.

#[path = "../tests/common/frames.rs"]
#[allow(dead_code)]
mod frames;
#[path = "../tests/common/pktns.rs"]
mod pktns;
#[path = "../tests/common/topology.rs"]
mod topology;

use std::{fmt::Write as _, net::Ipv4Addr, time::Instant};

use aya::programs::Xdp;
use frames::Frame;
use lbaas_ctl::{
    compile::{CompileOptions, Programmer, desired},
    config,
    datapath::{Datapath, LoadOptions},
    maglev,
};
use pktns::{CLIENT, CLIENT_MAC, LAN_MAC, M1, M1_MAC, MEM_MAC, NetNs, VIP};

struct Settings {
    rounds: usize,
    calls: u32,
    repeat: u32,
}

/// Mean ns per run, by the kernel's clock, over `calls` calls of `repeat` runs each.
fn measure(
    program: &Xdp,
    frames: &mut dyn FnMut(u32) -> Vec<u8>,
    ifindex: u32,
    calls: u32,
    repeat: u32,
) -> f64 {
    let total: f64 = (0..calls)
        .map(|i| f64::from(pktns::test_run(program, &frames(i), ifindex, repeat).2))
        .sum();
    total / f64::from(calls)
}

/// The CPU's model name, family and model, and the mitigations that make calls and returns
/// cost more (retpolines, return thunks), as the kernel reports them.
fn cpu_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split(':').nth(1))
            .map_or(String::new(), |v| v.trim().to_string())
    };
    let mitigations: Vec<String> = ["spectre_v2", "retbleed", "spec_rstack_overflow"]
        .iter()
        .filter_map(|name| {
            let path = format!("/sys/devices/system/cpu/vulnerabilities/{name}");
            let state = std::fs::read_to_string(path).ok()?;
            // The first clause says what is done ("Mitigation: Retpolines"); the rest is detail.
            Some(format!(
                "{name}: {}",
                state.trim().split(';').next()?.trim()
            ))
        })
        .collect();
    format!(
        "{} (family {}, model {}; {})",
        field("model name"),
        field("cpu family"),
        field("model"),
        mitigations.join("; ")
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One call of `repeat` runs: the action of the last and the kernel's mean ns per run.
fn run_call(program: &Xdp, frame: &[u8], ifindex: u32, repeat: u32) -> (u32, f64) {
    let (action, _, ns) = pktns::test_run(program, frame, ifindex, repeat);
    (action, f64::from(ns))
}

/// The data path's ns per packet in the kernel's own loop of `repeat` runs: the benchmark
/// wrapper restores `frame` before every run (`fresh`: with a source address of its own, so
/// every run is a new flow); the wrapper in front of the do-nothing program is measured in the
/// same round and subtracted, and `floor` (the do-nothing program in the same loop) added.
/// Each run must take the path a single run of the data path on `frame` takes (same action).
/// Also returns the wrapper's own cost (median), to report.
fn in_loop(
    dp: &mut Datapath,
    frame: &[u8],
    fresh: bool,
    ifindex: u32,
    rounds: usize,
    repeat: u32,
    floor: f64,
) -> (f64, f64) {
    let (expected, _) = run_call(dp.program().expect("program"), frame, ifindex, 1);
    let (packet, overhead): (Vec<f64>, Vec<f64>) = (0..rounds)
        .map(|_| {
            let wrapper = dp.bench_wrapper(frame, fresh, true).expect("wrapper");
            let (_, overhead) = run_call(wrapper, frame, ifindex, repeat);
            let wrapper = dp.bench_wrapper(frame, fresh, false).expect("wrapper");
            let (action, total) = run_call(wrapper, frame, ifindex, repeat);
            assert_eq!(action, expected, "the wrapped runs took another path");
            (total - overhead + floor, overhead - floor)
        })
        .unzip();
    (median(packet), median(overhead))
}

fn pool_yaml(algorithm: &str) -> String {
    format!(
        "loadbalancers:\n  - name: lb\n    vip_address: {VIP}\n    listeners:\n      - {{name: web, protocol: TCP, protocol_port: 80, default_pool: web}}\n      - {{name: dns, protocol: UDP, protocol_port: 53, default_pool: dns}}\n    pools:\n      - {{name: web, protocol: TCP, lb_algorithm: {algorithm}, members: [{{address: 10.2.0.11, protocol_port: 8080}}, {{address: 10.2.0.12, protocol_port: 8080}}]}}\n      - {{name: dns, protocol: UDP, lb_algorithm: ROUND_ROBIN, members: [{{address: 10.2.0.11, protocol_port: 5353}}]}}\n"
    )
}

/// The data path with a configuration applied and the two arms' roles set, as the daemon
/// does in two-arm mode.
fn loaded(yaml: &str, ns: &NetNs) -> (Datapath, Programmer) {
    loaded_sized(yaml, ns, LoadOptions::default().conntrack_size)
}

/// The same with a connection table of `conntrack_size` entries.
fn loaded_sized(yaml: &str, ns: &NetNs, conntrack_size: u32) -> (Datapath, Programmer) {
    let mut dp = Datapath::load(LoadOptions {
        conntrack_size,
        ..LoadOptions::default()
    })
    .expect("load the data path");
    dp.set_roles(ns.lan, lbaas_common::IFACE_CLIENT)
        .expect("roles");
    dp.set_roles(ns.mem, lbaas_common::IFACE_MEMBER)
        .expect("roles");
    let mut programmer = Programmer::new();
    let config = config::load_str(yaml, "bench").expect("valid");
    programmer
        .apply(
            dp.tables(),
            &desired(&config, CompileOptions::default(), &Default::default()),
        )
        .expect("program the tables");
    (dp, programmer)
}

/// One listener on :80 as in [`pool_yaml`], plus `extra` TCP listeners of one member each on
/// ports 1000.. of the same VIP (member ports 10000..: as with distinct services, no member
/// endpoint serves two listeners, so the SYN path is the one listener's).
fn many_vips_yaml(extra: u32) -> String {
    let mut yaml = pool_yaml("ROUND_ROBIN");
    let pools_at = yaml.find("    pools:\n").expect("pools");
    let mut listeners = String::new();
    let mut pools = String::new();
    for k in 0..extra {
        listeners.push_str(&format!(
            "      - {{name: l{k}, protocol: TCP, protocol_port: {}, default_pool: p{k}}}\n",
            1000 + k
        ));
        pools.push_str(&format!(
            "      - {{name: p{k}, protocol: TCP, lb_algorithm: ROUND_ROBIN, members: [{{address: 10.2.0.11, protocol_port: {}}}]}}\n",
            10_000 + k
        ));
    }
    yaml.insert_str(pools_at, &listeners);
    yaml.push_str(&pools);
    yaml
}

/// Opens the flow CLIENT:40000 -> VIP:80 (SYN, then ACK) and returns a data segment of it.
fn established_flow(program: &Xdp, ns: &NetNs) -> Vec<u8> {
    measure(program, &mut |_| syn(40000, CLIENT), ns.lan, 1, 1);
    let data = Frame {
        tcp_flags: 0x18,
        payload: vec![b'x'; 64],
        src_mac: CLIENT_MAC,
        dst_mac: LAN_MAC,
        ..Frame::tcp((CLIENT, 40000), (VIP, 80))
    }
    .build();
    measure(program, &mut |_| data.clone(), ns.lan, 1, 1);
    data
}

/// One packet per call: the median ns of `program` and of the do-nothing `floor`, taken one
/// after the other in every round (so both see the machine in the same state), each over
/// `s.calls` calls of a frame from `frames(round, call)`.
fn per_call(
    program: &Xdp,
    floor: &Xdp,
    frames: &mut dyn FnMut(u32, u32) -> Vec<u8>,
    ifindex: u32,
    s: &Settings,
) -> PerCall {
    let (ns, floor): (Vec<f64>, Vec<f64>) = (1..=s.rounds as u32)
        .map(|round| {
            let floor_ns = measure(floor, &mut |i| frames(round, i), ifindex, s.calls, 1);
            let ns = measure(program, &mut |i| frames(round, i), ifindex, s.calls, 1);
            (ns, floor_ns)
        })
        .unzip();
    PerCall {
        ns: median(ns),
        floor: median(floor),
    }
}

/// A path measured both ways, for the scale-of-cost table.
struct ScaleRow {
    name: String,
    /// ns in the kernel's loop (its floor is the main table's).
    in_loop: f64,
    per_call: PerCall,
}

/// An established flow's data segment in `dp`, in the kernel's loop and one per call (`floor`:
/// the do-nothing program, and its figure in the loop).
fn established_both_ways(
    dp: &mut Datapath,
    name: String,
    ns: &NetNs,
    s: &Settings,
    (floor_program, floor_rep): (&Xdp, f64),
) -> ScaleRow {
    let data = established_flow(dp.program().expect("program"), ns);
    let (in_loop, _) = in_loop(dp, &data, false, ns.lan, s.rounds, s.repeat, floor_rep);
    ScaleRow {
        name,
        in_loop,
        per_call: per_call(
            dp.program().expect("program"),
            floor_program,
            &mut |_, _| data.clone(),
            ns.lan,
            s,
        ),
    }
}

/// A one-packet-per-call figure and its do-nothing floor from the same rounds.
#[derive(Clone, Copy)]
struct PerCall {
    ns: f64,
    floor: f64,
}

/// New flows' SYNs one per call: a fresh source (from `first_source` on) and port per call.
fn new_flows(program: &Xdp, floor: &Xdp, ns: &NetNs, s: &Settings, first_source: u32) -> PerCall {
    per_call(
        program,
        floor,
        &mut |round, i| {
            syn(
                1024 + (i % 60000) as u16,
                Ipv4Addr::from(first_source + (round << 20) + i),
            )
        },
        ns.lan,
        s,
    )
}

fn syn(sport: u16, src: Ipv4Addr) -> Vec<u8> {
    Frame {
        src,
        src_mac: CLIENT_MAC,
        dst_mac: LAN_MAC,
        ..Frame::tcp((CLIENT, sport), (VIP, 80))
    }
    .build()
}

struct Row {
    name: String,
    ns: f64,
    floor: f64,
    goal: Option<f64>,
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let out_path = std::env::args()
        .skip_while(|a| a != "--out")
        .nth(1)
        .unwrap_or_else(|| "BENCHMARKS.md".into());
    let s = if quick {
        Settings {
            rounds: 3,
            calls: 2_000,
            repeat: 10_000,
        }
    } else {
        Settings {
            rounds: 7,
            calls: 20_000,
            repeat: 1_000_000,
        }
    };
    topology::require_root();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    // SAFETY: pins this thread to CPU 0 (per-CPU state and a stable clock).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    let ns = NetNs::enter();
    // The paths in the kernel's loop (the goals' measure), and one packet per call.
    let mut rows = Vec::new();
    let mut call_rows: Vec<(String, PerCall)> = Vec::new();
    // The benchmark wrapper's own cost (beyond the do-nothing program's), per measurement.
    let mut overheads: Vec<f64> = Vec::new();

    // The do-nothing program, in a data path of its own that nothing else borrows.
    let mut floor_dp = Datapath::load(LoadOptions::default()).expect("load the data path");
    floor_dp.load_noop().expect("no-op program");
    let floor_program = floor_dp.noop_program().expect("no-op program");
    let (mut rr, _) = loaded(&pool_yaml("ROUND_ROBIN"), &ns);
    let not_vip = Frame {
        dst: Ipv4Addr::new(10, 1, 0, 1),
        src_mac: CLIENT_MAC,
        dst_mac: LAN_MAC,
        ..Frame::tcp((CLIENT, 1), (VIP, 22))
    }
    .build();
    let program = rr.program().unwrap();
    // The in-kernel loop is short enough for the machine's state to move between two long
    // runs (the floor moved 23-28 ns between runs here): each round takes both, one after
    // the other. A packet for no listener passes untouched: no wrapper needed.
    let (floor_runs, not_vip_runs): (Vec<f64>, Vec<f64>) = (0..s.rounds)
        .map(|_| {
            (
                measure(floor_program, &mut |_| not_vip.clone(), ns.lan, 5, s.repeat),
                measure(program, &mut |_| not_vip.clone(), ns.lan, 5, s.repeat),
            )
        })
        .unzip();
    let (floor_rep, not_vip_rep) = (median(floor_runs), median(not_vip_runs));
    rows.push(Row {
        name: "packet for no listener (pass)".into(),
        ns: not_vip_rep,
        floor: floor_rep,
        goal: Some(1.3),
    });
    let not_vip_one = per_call(
        program,
        floor_program,
        &mut |_, _| not_vip.clone(),
        ns.lan,
        &s,
    );
    call_rows.push(("packet for no listener (pass)".to_string(), not_vip_one));

    // New flows: a fresh source address on every run (in the loop) or call (one per call).
    // Each way gets a data path of its own, so both fill the half-open table alike
    // (`rounds x calls` flows, a little over half of it: no evictions).
    for algorithm in [
        "ROUND_ROBIN",
        "LEAST_CONNECTIONS",
        "SOURCE_IP",
        "SOURCE_IP_PORT",
    ] {
        let name = format!("new TCP flow (SYN), {algorithm}");
        let (mut dp, _) = loaded(&pool_yaml(algorithm), &ns);
        let first = syn(40000, Ipv4Addr::new(11, 0, 0, 1));
        let (ns_loop, overhead) =
            in_loop(&mut dp, &first, true, ns.lan, s.rounds, s.calls, floor_rep);
        overheads.push(overhead);
        rows.push(Row {
            name: name.clone(),
            ns: ns_loop,
            floor: floor_rep,
            goal: Some(4.0),
        });
        drop(dp);
        let (dp, _) = loaded(&pool_yaml(algorithm), &ns);
        call_rows.push((
            name,
            new_flows(dp.program().unwrap(), floor_program, &ns, &s, 0x0b00_0000),
        ));
    }

    let data = established_flow(rr.program().unwrap(), &ns);
    // A member's reply to that flow.
    let reply = Frame {
        tcp_flags: 0x18,
        payload: vec![b'y'; 64],
        src_mac: M1_MAC,
        dst_mac: MEM_MAC,
        ..Frame::tcp((M1, 8080), (CLIENT, 40000))
    }
    .build();
    // UDP: a flow's datagrams (32-byte payload, as end to end).
    let udp = Frame {
        src_mac: CLIENT_MAC,
        dst_mac: LAN_MAC,
        ..Frame::udp((CLIENT, 33000), (VIP, 53), &[b'q'; 32])
    }
    .build();
    measure(rr.program().unwrap(), &mut |_| udp.clone(), ns.lan, 1, 1);
    for (name, frame, ifindex) in [
        ("established TCP flow", &data, ns.lan),
        ("member reply (reverse NAT)", &reply, ns.mem),
        ("UDP datagram (known flow)", &udp, ns.lan),
    ] {
        let (ns_loop, overhead) = in_loop(
            &mut rr, frame, false, ifindex, s.rounds, s.repeat, floor_rep,
        );
        overheads.push(overhead);
        rows.push(Row {
            name: name.into(),
            ns: ns_loop,
            floor: floor_rep,
            goal: Some(3.0),
        });
        let program = rr.program().unwrap();
        let one = per_call(
            program,
            floor_program,
            &mut |_, _| frame.clone(),
            ifindex,
            &s,
        );
        call_rows.push((name.into(), one));
    }

    // Scale of cost: the same paths with 1,000 VIPs configured, and with a full connection
    // table (flows opened through the program itself, SYN then ACK); both ways.
    let row_ns = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .map(|r| r.ns)
            .expect("a row measured above")
    };
    let call_figure = |name: &str| {
        call_rows
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, figure)| *figure)
            .expect("a row measured above")
    };
    let mut scale_rows = vec![ScaleRow {
        name: "established TCP flow, 1 VIP, a handful of flows".into(),
        in_loop: row_ns("established TCP flow"),
        per_call: call_figure("established TCP flow"),
    }];
    let (mut many, _) = loaded(&many_vips_yaml(1_000), &ns);
    scale_rows.push(established_both_ways(
        &mut many,
        "established TCP flow, 1,000 VIPs".into(),
        &ns,
        &s,
        (floor_program, floor_rep),
    ));
    drop(many);
    let table_flows: u32 = if quick { 10_000 } else { 1_000_000 };
    let (mut full, _) = loaded_sized(&pool_yaml("ROUND_ROBIN"), &ns, table_flows + 65_536);
    let program = full.program().unwrap();
    let fill_start = Instant::now();
    for i in 0..table_flows {
        let src = Ipv4Addr::from(0x0c00_0000 + i);
        let sport = 1024 + (i % 60_000) as u16;
        measure(program, &mut |_| syn(sport, src), ns.lan, 1, 1);
        let ack = Frame {
            src,
            tcp_flags: 0x10,
            src_mac: CLIENT_MAC,
            dst_mac: LAN_MAC,
            ..Frame::tcp((CLIENT, sport), (VIP, 80))
        }
        .build();
        measure(program, &mut |_| ack.clone(), ns.lan, 1, 1);
    }
    let in_table = full.flow_count();
    eprintln!(
        "filled the connection table with {in_table} flows in {:.1} s",
        fill_start.elapsed().as_secs_f64()
    );
    scale_rows.push(established_both_ways(
        &mut full,
        format!("established TCP flow, {in_table} flows in the connection table"),
        &ns,
        &s,
        (floor_program, floor_rep),
    ));
    let rr_syn = "new TCP flow (SYN), ROUND_ROBIN";
    scale_rows.push(ScaleRow {
        name: format!("{rr_syn}, a handful of flows"),
        in_loop: row_ns(rr_syn),
        per_call: call_figure(rr_syn),
    });
    let first = syn(40000, Ipv4Addr::new(13, 0, 0, 1));
    let (new_full, _) = in_loop(
        &mut full, &first, true, ns.lan, s.rounds, s.calls, floor_rep,
    );
    scale_rows.push(ScaleRow {
        name: format!("{rr_syn}, {in_table} flows in the connection table"),
        in_loop: new_full,
        per_call: new_flows(full.program().unwrap(), floor_program, &ns, &s, 0x0d00_0000),
    });
    drop(full);

    // Control plane.
    let backends: Vec<maglev::Backend> = (0..1000u32)
        .map(|i| maglev::Backend {
            id: i.to_be_bytes().to_vec(),
            weight: 1,
        })
        .collect();
    let maglev_ms = median(
        (0..s.rounds)
            .map(|_| {
                let t = Instant::now();
                let table = maglev::build(&backends, 65_537);
                assert_eq!(table.len(), 65_537);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    // What loading the program costs: the verifier's work and the wall time of a load.
    let load_ms = median(
        (0..s.rounds.min(3))
            .map(|_| {
                let t = Instant::now();
                let dp = Datapath::load(LoadOptions::default()).expect("load");
                drop(dp);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    let verified = rr
        .program()
        .ok()
        .and_then(|p| p.info().ok())
        .and_then(|info| info.verified_instruction_count());
    let mut apply_rows = Vec::new();
    for members in if quick {
        vec![1_000]
    } else {
        vec![1_000, 10_000]
    } {
        let per_pool = members / 100;
        let mut yaml =
            format!("loadbalancers:\n  - name: lb\n    vip_address: {VIP}\n    listeners:\n");
        for p in 0..100 {
            yaml.push_str(&format!(
                "      - {{name: l{p}, protocol: TCP, protocol_port: {}, default_pool: p{p}}}\n",
                1000 + p
            ));
        }
        yaml.push_str("    pools:\n");
        for p in 0..100 {
            yaml.push_str(&format!("      - name: p{p}\n        protocol: TCP\n        lb_algorithm: ROUND_ROBIN\n        members:\n"));
            for m in 0..per_pool {
                let addr = Ipv4Addr::from(0x0a40_0000u32 + (p * per_pool + m) as u32);
                yaml.push_str(&format!(
                    "          - {{address: {addr}, protocol_port: 80}}\n"
                ));
            }
        }
        let config = config::load_str(&yaml, "bench").expect("valid");
        let mut dp = Datapath::load(LoadOptions::default()).expect("load");
        let mut programmer = Programmer::new();
        let t = Instant::now();
        let want = desired(&config, CompileOptions::default(), &Default::default());
        programmer.apply(dp.tables(), &want).expect("apply");
        apply_rows.push((members, t.elapsed().as_secs_f64() * 1e3));
    }

    // Report.
    let mut md = String::new();
    let cpu = cpu_description();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `sudo cargo xtask bench{}` (regenerate with the same command).",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(
        md,
        "Machine: {cpu}, {cores} cores, Linux {}.\n",
        kernel.trim()
    );
    let _ = writeln!(
        md,
        "Every call and return in the data path (helper calls, the hash tables' lookups) costs what the CPU's speculation mitigations make it cost, and the do-nothing floor makes none: the ratios below differ from machine to machine (the same code has measured established flows at 3.7x and at 7.3x on two machines of this kind). Compare figures from one run only.\n"
    );
    let _ = writeln!(
        md,
        "## Data path, ns per packet in the kernel's loop (BPF_PROG_TEST_RUN), against a do-nothing XDP program in the same loop\n"
    );
    let _ = writeln!(
        md,
        "| path | ns/packet | do-nothing | ratio | goal | |\n|---|---:|---:|---:|---:|---|"
    );
    for r in &rows {
        let ratio = r.ns / r.floor;
        let (goal, verdict) = r.goal.map_or((String::new(), ""), |g| {
            (
                format!("<= {g:.1}x"),
                if ratio <= g { "met" } else { "not met" },
            )
        });
        let _ = writeln!(
            md,
            // Three decimals, as the verdict is judged: "1.30x, not met" would contradict itself.
            "| {} | {:.1} | {:.1} | {ratio:.3}x | {goal} | {verdict} |",
            r.name, r.ns, r.floor
        );
    }
    let _ = writeln!(
        md,
        "\nEvery run of the loop ({} runs a call; {} for new flows, so that a data path's half-open table ends a little over half full, without evictions) takes the path named: a wrapper program (`lbaas_bench`, in the same object, never attached) writes the original frame back before each run (for new flows, with a source address of its own) and tail-calls the data path; the same wrapper in front of the do-nothing program, measured in the same round, is subtracted (the wrapper and its tail call cost {:.0}-{:.0} ns beyond the do-nothing program). The benchmark checks that the wrapped runs end with the action a single run of the frame gets. The packet for no listener needs no wrapper (it passes untouched). The kernel reports a loop's mean in whole ns. Median of {} rounds, thread pinned to CPU 0.\n",
        s.repeat,
        s.calls,
        overheads.iter().copied().fold(f64::INFINITY, f64::min),
        overheads.iter().copied().fold(0.0, f64::max),
        s.rounds
    );
    let _ = writeln!(
        md,
        "## The same paths one packet per call\n\n| path | ns/packet | do-nothing | ratio |\n|---|---:|---:|---:|"
    );
    for (name, figure) in &call_rows {
        let _ = writeln!(
            md,
            "| {name} | {:.1} | {:.1} | {:.2}x |",
            figure.ns,
            figure.floor,
            figure.ns / figure.floor
        );
    }
    let _ = writeln!(
        md,
        "\nOne `BPF_PROG_TEST_RUN` call per packet (`repeat = 1`, a fresh frame per call for new flows), from the kernel's own per-run duration, next to the do-nothing program taken the same way in the same rounds (one after the other in each): both include the ~{:.0} ns that timing a single run costs, which compresses these ratios (earlier reports held the goals to them). Median of {} rounds of {} calls.\n",
        median(call_rows.iter().map(|(_, f)| f.floor).collect()) - floor_rep,
        s.rounds,
        s.calls
    );
    let _ = writeln!(
        md,
        "## Scale of cost: the same paths with more VIPs and a fuller connection table\n\n| path | in the loop, ns | ratio | one per call, ns | ratio |\n|---|---:|---:|---:|---:|"
    );
    for r in &scale_rows {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.2}x | {:.1} | {:.2}x |",
            r.name,
            r.in_loop,
            r.in_loop / floor_rep,
            r.per_call.ns,
            r.per_call.ns / r.per_call.floor
        );
    }
    let _ = writeln!(
        md,
        "\nThe connection table is filled through the program itself (a SYN and an ACK per flow, so the flows are in the established table, not the half-open one), sized to hold them all. Both methods as above; the loop's ratios are to its floor, the per-call ones to the floor taken in the same rounds. New flows in the loop come from sources of their own, so each still misses the full connection table before it is inserted into the half-open one.\n"
    );
    let _ = writeln!(md, "## Control plane\n\n| what | ms |\n|---|---:|");
    let _ = writeln!(
        md,
        "| Maglev table, 1,000 members, 65,537 slots (the paper reports 1.8 ms) | {maglev_ms:.2} |"
    );
    let _ = writeln!(
        md,
        "| load the XDP program and create its maps (the verifier processed {} instructions of its 1,000,000 limit) | {load_ms:.1} |",
        verified.map_or_else(|| "an unreported number of".into(), |n| n.to_string())
    );
    for (members, ms) in &apply_rows {
        let _ = writeln!(
            md,
            "| apply {members} members in 100 pools to fresh kernel maps (validated config to tables) | {ms:.1} |"
        );
    }
    std::fs::write(&out_path, &md).expect("write the report");
    print!("{md}");
}
