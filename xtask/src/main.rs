//! `cargo xtask setup|build|test|demo`: toolchain bootstrap, builds, the test suite and the demo.

#[path = "../../tests/common/topology.rs"]
mod topology;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lbaas developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent): nightly rust-src, bpf-linker
    /// built against the nightly's own LLVM, bpffs, and the Debian packages the tests use.
    Setup,
    /// Build `target/release/lbaas-ctl` with the XDP program embedded.
    Build,
    /// Run every test: unit, packet (BPF_PROG_TEST_RUN) and network-namespace tests. Root.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks: data-path ns/packet against a do-nothing program, control-plane timings;
    /// writes BENCHMARKS.md. Root.
    Bench {
        /// A short run (a smoke test of the benchmark itself; CI runs it).
        #[arg(long)]
        quick: bool,
    },
    /// Fuzz the packet parser longer than the test suite does (BPF_PROG_TEST_RUN). Root.
    Fuzz {
        /// Frames to run.
        #[arg(long, default_value_t = 20_000_000)]
        frames: u64,
    },
    /// Build, start a demo topology in namespaces, apply examples/demo.yaml, show round robin.
    Demo {
        /// Leave the topology and daemon running and print how to use them.
        #[arg(long)]
        keep: bool,
        /// Tear down a topology left by `demo --keep`.
        #[arg(long, conflicts_with = "keep")]
        down: bool,
    },
}

/// Debian packages the tests and the demo use.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "curl",
    "iputils-ping",
    "python3",
    "procps",
    "openssl",
    // The end-to-end benchmark: members, load generator, the systems compared, the plot's font.
    "nginx-light",
    "wrk",
    "haproxy",
    "nftables",
    "fonts-dejavu-core",
];

/// bpf-linker release known to work with aya 0.14 (see shared/TOOLCHAIN.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

fn status(mut c: Command) -> anyhow::Result<()> {
    let shown = format!("{c:?}");
    let st = c.status().with_context(|| format!("running {shown}"))?;
    ensure!(st.success(), "{shown} failed: {st}");
    Ok(())
}

fn output(mut c: Command) -> anyhow::Result<String> {
    let shown = format!("{c:?}");
    let out = c.output().with_context(|| format!("running {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(cmd("id", &["-u"])).is_ok_and(|uid| uid.trim() == "0")
}

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/lbaas")
}

/// The nightly's libLLVM file name and LLVM major version.
fn nightly_llvm() -> anyhow::Result<(PathBuf, String, u32)> {
    let sysroot = PathBuf::from(output(cmd("rustc", &["+nightly", "--print", "sysroot"]))?.trim());
    let lib_dir = sysroot.join("lib");
    let lib = std::fs::read_dir(&lib_dir)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let major = lib
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM major version from {lib}"))?;
    Ok((lib_dir, lib, major))
}

/// What `setup` would still have to do.
#[derive(Debug, Default)]
struct Missing {
    nightly: bool,
    rust_src: bool,
    bpf_linker: bool,
    bpffs: bool,
    packages: Vec<&'static str>,
}

impl Missing {
    fn nothing(&self) -> bool {
        !self.nightly
            && !self.rust_src
            && !self.bpf_linker
            && !self.bpffs
            && self.packages.is_empty()
    }
}

fn linker_marker() -> PathBuf {
    cache_dir().join("bpf-linker.built-against")
}

fn survey() -> Missing {
    let mut missing = Missing::default();
    let toolchains = output(cmd("rustup", &["toolchain", "list"])).unwrap_or_default();
    missing.nightly = !toolchains.lines().any(|l| l.starts_with("nightly"));
    let components = output(cmd(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    ))
    .unwrap_or_default();
    missing.rust_src = !components.lines().any(|l| l.starts_with("rust-src"));
    // bpf-linker must run, and must have been built against this nightly's libLLVM.
    let linker_ok =
        output(cmd("bpf-linker", &["--version"])).is_ok_and(|v| v.contains(BPF_LINKER_VERSION));
    let built_against = std::fs::read_to_string(linker_marker()).unwrap_or_default();
    let current = nightly_llvm().map(|(_, lib, _)| lib).unwrap_or_default();
    missing.bpf_linker = !linker_ok || current.is_empty() || built_against.trim() != current;
    missing.bpffs = !std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("bpf"));
    missing.packages = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(cmd("dpkg-query", &["-W", "-f", "${Status}", p]))
                .is_ok_and(|s| s.contains("install ok installed"))
        })
        .collect();
    missing
}

fn setup(missing: &Missing) -> anyhow::Result<()> {
    if !missing.packages.is_empty() {
        ensure!(
            is_root(),
            "Debian packages {:?} are missing and installing them needs root: run `sudo cargo xtask setup`",
            missing.packages
        );
        eprintln!("setup: installing Debian packages {:?}", missing.packages);
        status(cmd("apt-get", &["update", "-qq"]))?;
        // nginx and haproxy are only run by the benchmark, inside its namespaces: their
        // packages must not start system services (policy-rc.d answering 101 forbids it, as
        // container images do), and a port-80 clash must not fail the install.
        let policy = Path::new("/usr/sbin/policy-rc.d");
        let own_policy = !policy.exists();
        if own_policy {
            std::fs::write(
                policy,
                "#!/bin/sh\n# written by cargo xtask setup for one install\nexit 101\n",
            )?;
            std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        }
        let mut install = cmd(
            "apt-get",
            &["install", "-y", "-qq", "--no-install-recommends"],
        );
        install
            .args(&missing.packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        let installed = status(install);
        if own_policy {
            let _ = std::fs::remove_file(policy);
        }
        installed?;
    }
    if missing.nightly {
        eprintln!("setup: installing the nightly toolchain");
        status(cmd(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        ))?;
    }
    if missing.rust_src || missing.nightly {
        eprintln!("setup: adding rust-src to nightly (for -Z build-std=core)");
        status(cmd(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        ))?;
    }
    if missing.bpf_linker {
        install_bpf_linker()?;
    }
    if missing.bpffs {
        if is_root() {
            eprintln!("setup: mounting bpffs on /sys/fs/bpf");
            status(cmd("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        } else {
            eprintln!("setup: bpffs is not mounted (needs root: mount -t bpf bpf /sys/fs/bpf)");
        }
    }
    Ok(())
}

/// Builds bpf-linker against the libLLVM that ships inside the nightly toolchain, so that the
/// linker and rustc agree on the LLVM version without a system LLVM.
fn install_bpf_linker() -> anyhow::Result<()> {
    let (lib_dir, lib, major) = nightly_llvm()?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's {lib} (LLVM {major}); about a minute"
    );
    let prefix = cache_dir().join("llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so".to_string(), lib.clone()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&lib), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let mut install = cmd(
        "cargo",
        &[
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--force",
            "--no-default-features",
        ],
    );
    install
        .arg("--features")
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN");
    status(install)?;
    std::fs::write(linker_marker(), &lib)?;
    Ok(())
}

fn ensure_setup() -> anyhow::Result<()> {
    let missing = survey();
    if !missing.nothing() {
        eprintln!("setup: something is missing ({missing:?}); running setup");
        setup(&missing)?;
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Command {
    let mut c = cmd("cargo", args);
    c.current_dir(workspace()).env_remove("RUSTUP_TOOLCHAIN");
    c
}

fn build() -> anyhow::Result<PathBuf> {
    ensure_setup()?;
    status(cargo(&["build", "--release", "-p", "lbaas-ctl"]))?;
    Ok(workspace().join("target/release/lbaas-ctl"))
}

fn test(args: &[String]) -> anyhow::Result<()> {
    ensure!(
        is_root(),
        "the tests load XDP programs and create network namespaces: run as root (`sudo cargo xtask test`)"
    );
    ensure_setup()?;
    let mut c = cargo(&["test"]);
    c.args(args).stdout(std::process::Stdio::piped());
    let mut child = c.spawn().context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count_of(result, "passed");
            failed += count_of(result, "failed");
        }
    }
    let st = child.wait()?;
    // One closing line over every test binary, so the total is read in one place.
    println!("{passed} passed, {failed} failed");
    ensure!(st.success(), "cargo test failed: {st}");
    ensure!(passed > 0, "no test ran");
    Ok(())
}

/// Reads `N word` out of a libtest summary such as `ok. 3 passed; 0 failed; ...`.
fn count_of(summary: &str, word: &str) -> u64 {
    summary
        .split([';', '.'])
        .filter_map(|part| part.trim().strip_suffix(word))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

fn ctl(binary: &Path, socket: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut c = Command::new(binary);
    c.arg("--socket").arg(socket).args(args);
    output(c)
}

fn demo_down() -> anyhow::Result<()> {
    let list = output(cmd("ip", &["netns", "list"]))?;
    let mut removed = 0;
    for ns in list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("lbt-demo-"))
    {
        let pids = output(cmd("ip", &["netns", "pids", ns])).unwrap_or_default();
        for pid in pids.split_whitespace() {
            let _ = cmd("kill", &[pid]).status();
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        status(cmd("ip", &["netns", "del", ns]))?;
        removed += 1;
    }
    // The demo's bpffs (its pins) and scratch directories.
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for target in mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|t| t.contains("/lbt-demo-"))
    {
        let _ = cmd("umount", &["-l", target]).status();
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("lbt-demo-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    println!("removed {removed} demo namespace(s)");
    Ok(())
}

fn demo(keep: bool) -> anyhow::Result<()> {
    ensure!(
        is_root(),
        "the demo creates network namespaces and loads XDP: run as root (`sudo cargo xtask demo`)"
    );
    let binary = build()?;
    println!(
        "== topology: client -- LB node (XDP on both arms) -- switch -- 2 members running HTTP servers"
    );
    let mut topo = topology::Topology::new("demo", 2);
    topo.start_http_member(1);
    topo.start_http_member(2);
    let socket = topo.path("lbaas.sock");
    let state = topo.path("state");
    let (binary_s, socket_s) = (binary.display().to_string(), socket.display().to_string());
    topo.spawn_daemon(&binary_s, &socket, &state, &["--cleanup-on-exit"]);
    topology::wait_until(std::time::Duration::from_secs(20), "the daemon", || {
        ctl(&binary, &socket, &["get", "loadbalancers"]).is_ok()
    });
    let file = workspace().join("examples/demo.yaml");
    println!("== lbaas-ctl apply -f examples/demo.yaml");
    print!(
        "{}",
        ctl(
            &binary,
            &socket,
            &["apply", "-f", &file.display().to_string()]
        )?
    );
    println!(
        "== six connections: curl http://{}/ from the client namespace",
        topology::VIP
    );
    let url = format!("http://{}/", topology::VIP);
    for i in 1..=6 {
        match topo.curl(&url) {
            Ok(body) => println!("curl #{i}: {body}"),
            Err(e) => bail!("curl #{i} failed: {e}\n{}", topo.log("daemon.log")),
        }
    }
    println!("== the HTTP listener (L7 proxy): two requests, then one its REJECT policy answers");
    let l7 = format!("http://{}:8080/", topology::VIP);
    for i in 1..=2 {
        match topo.curl(&l7) {
            Ok(body) => println!("curl :8080/ #{i}: {body}"),
            Err(e) => bail!("curl :8080/ #{i} failed: {e}\n{}", topo.log("daemon.log")),
        }
    }
    let out = topo.exec(
        &topo.client(),
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{l7}admin"),
        ],
    );
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(code == "403", "curl :8080/admin answered {code}, not 403");
    println!("curl :8080/admin: {code}");
    println!("== lbaas-ctl get members");
    print!("{}", ctl(&binary, &socket, &["get", "members"])?);
    println!("== lbaas-ctl stats");
    print!("{}", ctl(&binary, &socket, &["stats"])?);
    if keep {
        let client = topo.client();
        println!("\nThe demo stays up. Try:");
        println!("  ip netns exec {client} curl http://{}/", topology::VIP);
        println!("  {binary_s} --socket {socket_s} get members");
        println!("  {binary_s} --socket {socket_s} apply -f examples/demo.yaml");
        println!("  daemon log: {}", topo.path("daemon.log").display());
        println!("Tear it down with: cargo xtask demo --down");
        std::mem::forget(topo);
    } else {
        println!("== tearing down");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => {
            let missing = survey();
            setup(&missing)?;
            let after = survey();
            ensure!(
                after.nothing(),
                "setup finished but still missing: {after:?}"
            );
            println!("setup: everything is in place");
            Ok(())
        }
        Task::Build => {
            let binary = build()?;
            println!("built {}", binary.display());
            Ok(())
        }
        Task::Test { args } => test(&args),
        Task::Bench { quick } => {
            ensure!(
                is_root(),
                "the benchmarks load XDP programs and create a namespace: run as root"
            );
            ensure_setup()?;
            let out = if quick {
                // A smoke run must not overwrite the published figures.
                std::env::temp_dir().join("lbaas-bench-quick.md")
            } else {
                workspace().join("BENCHMARKS.md")
            };
            let mut c = cargo(&["bench", "-p", "lbaas-ctl", "--bench", "datapath", "--"]);
            if quick {
                c.arg("--quick");
            }
            c.arg("--out").arg(&out);
            status(c)?;
            let plot = if quick {
                std::env::temp_dir().join("lbaas-bench-quick.png")
            } else {
                workspace().join("benchmarks/endtoend.png")
            };
            let mut c = cargo(&["bench", "-p", "lbaas-ctl", "--bench", "endtoend", "--"]);
            if quick {
                c.arg("--quick");
            }
            c.arg("--out").arg(&out).arg("--plot").arg(&plot);
            status(c)?;
            let report = std::fs::read_to_string(&out)?;
            ensure!(
                report.contains("ns/packet")
                    && report.contains("Maglev")
                    && report.contains("ratio to direct")
                    && plot.exists(),
                "the benchmark produced no figures"
            );
            println!("bench: report written to {}", out.display());
            Ok(())
        }
        Task::Fuzz { frames } => {
            ensure!(is_root(), "fuzzing loads XDP programs: run as root");
            ensure_setup()?;
            let mut c = cargo(&[
                "test",
                "--release",
                "-p",
                "lbaas-ctl",
                "--test",
                "packet",
                "fuzzed",
                "--",
                "--nocapture",
            ]);
            c.env("LBAAS_FUZZ_FRAMES", frames.to_string());
            status(c)
        }
        Task::Demo { down: true, .. } => demo_down(),
        Task::Demo { keep, .. } => demo(keep),
    }
}
