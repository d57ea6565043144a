//! `lbaas-ctl`: the lbaas daemon and its command-line client.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use lbaas_ctl::{
    api::{ApplyRequest, Client},
    compile::CompileOptions,
    config, daemon, datapath,
    datapath::{ExpiryPolicy, LoadOptions},
    diff, maglev, net,
    render::{self, Format, Kind},
    status,
};

/// mimalloc instead of glibc's malloc: the L7 proxy allocates and frees small buffers on
/// every request, and glibc's allocator was ~3% of a serving thread's time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load balancing as a service: an XDP data path programmed from Octavia-style YAML.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The daemon's API socket.
    #[arg(
        long,
        global = true,
        env = "LBAAS_SOCKET",
        default_value = "/run/lbaas/lbaas.sock"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the data path, restore the saved state and serve the API.
    Daemon {
        /// Client-facing interface: XDP is attached and VIPs are added here.
        #[arg(long)]
        interface: String,
        /// Member-facing interface (two-arm nat mode): XDP is attached here too.
        #[arg(long)]
        member_interface: Option<String>,
        /// Where the applied state is kept.
        #[arg(long, default_value = "/var/lib/lbaas")]
        state_dir: PathBuf,
        /// Entries in each of the connection and reverse-NAT tables.
        #[arg(long, default_value_t = lbaas_common::DEFAULT_CONNTRACK_SIZE)]
        conntrack_size: u32,
        /// Maglev table size for SOURCE_IP/SOURCE_IP_PORT pools, a prime (default: the
        /// smallest prime >= 16381 x 2^k giving at least 100 slots per member).
        #[arg(long, value_parser = parse_prime)]
        maglev_table_size: Option<u32>,
        /// Seconds after which an idle UDP flow is forgotten (its next datagram is balanced
        /// afresh).
        #[arg(long, default_value_t = 60)]
        udp_idle_timeout: u64,
        /// Where maps and XDP links are pinned (a bpf filesystem) so that they outlive the
        /// daemon (default: /sys/fs/bpf/lbaas/net-<network namespace id>).
        #[arg(long)]
        pin_path: Option<PathBuf>,
        /// On SIGTERM/SIGINT, detach the program and remove pins and VIP addresses.
        #[arg(long)]
        cleanup_on_exit: bool,
        /// A group (name or gid) whose members may use the API socket too.
        #[arg(long, value_parser = parse_group)]
        socket_group: Option<u32>,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9101; give a
        /// non-loopback address only on purpose).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// Seconds a removed member keeps serving its open flows at most (it gets no new ones).
        #[arg(long, default_value_t = 300)]
        member_drain_timeout: u64,
        /// Log format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Make each load balancer named in FILE match it exactly.
    Apply {
        /// The YAML file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Also delete load balancers that FILE does not name.
        #[arg(long)]
        prune: bool,
    },
    /// Show what `apply` would change.
    Diff {
        /// The YAML file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// As with `apply --prune`.
        #[arg(long)]
        prune: bool,
    },
    /// Check a file offline (no daemon needed).
    Validate {
        /// The YAML file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List objects.
    Get {
        /// What to list.
        #[arg(value_enum)]
        kind: Kind,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Show the Octavia status tree (provisioning and operating status, member health).
    Status {
        /// Only this load balancer.
        name: Option<String>,
        /// Output format (`table` is an indented tree; json/yaml follow Octavia's layout).
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Delete a load balancer and everything under it.
    Delete {
        /// Load balancer name.
        name: String,
    },
    /// Remove a daemon's data path: detach the program, remove its pins and the VIP addresses
    /// it added (the daemon should be stopped first).
    Detach {
        /// The daemon's state directory (names the pins and the addresses).
        #[arg(long, default_value = "/var/lib/lbaas")]
        state_dir: PathBuf,
        /// The pin directory, if not the one the state file names.
        #[arg(long)]
        pin_path: Option<PathBuf>,
    },
    /// Show Octavia's statistics (load balancers, listeners, pools, members) and the data
    /// path's counters.
    Stats {
        /// Only this load balancer.
        name: Option<String>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
        /// Refresh every 2 seconds until interrupted.
        #[arg(long)]
        watch: bool,
    },
}

/// `/sys/fs/bpf/lbaas/net-<id>`: daemons in different network namespaces share bpffs, so the
/// namespace's id keeps their pins apart. Mounts bpffs on /sys/fs/bpf if nothing is there.
fn default_pin_dir() -> anyhow::Result<PathBuf> {
    let ns = std::fs::read_link("/proc/self/ns/net").context("reading /proc/self/ns/net")?;
    let id: String = ns
        .to_string_lossy()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let root = Path::new("/sys/fs/bpf");
    if !datapath::on_bpffs(root) {
        let (src, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
        // SAFETY: mount(2) with valid NUL-terminated strings and no data.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        anyhow::ensure!(
            rc == 0,
            "no bpf filesystem on /sys/fs/bpf and mounting one failed ({}): give --pin-path",
            std::io::Error::last_os_error()
        );
        if std::fs::read_link("/proc/self/ns/mnt").ok() != std::fs::read_link("/proc/1/ns/mnt").ok()
        {
            tracing::warn!(
                "bpffs mounted on /sys/fs/bpf in a private mount namespace (ip netns exec?): its pins \
                 vanish with this process; give --pin-path on a shared bpffs to keep flows across restarts"
            );
        }
    }
    Ok(root.join("lbaas").join(format!("net-{id}")))
}

async fn detach(state_dir: &Path, pin_path: Option<PathBuf>) -> anyhow::Result<()> {
    let state_file = state_dir.join(daemon::STATE_FILE);
    let mut state = daemon::read_state(&state_file)?;
    let pins = pin_path.or_else(|| state.pin_dir.clone());
    match &pins {
        Some(dir) => {
            let removed = datapath::unpin_all(dir)
                .with_context(|| format!("removing pins in {}", dir.display()))?;
            println!(
                "removed {} pin(s) in {} (program detached)",
                removed.len(),
                dir.display()
            );
        }
        None => println!("no pin directory known (give --pin-path)"),
    }
    if !state.owned_addresses.is_empty() {
        let addresses = net::VipAddresses::new(&state.interface)?;
        for addr in std::mem::take(&mut state.owned_addresses) {
            addresses.remove(addr).await?;
            println!("removed VIP address {addr}/32 from {}", state.interface);
        }
        let bytes = serde_json::to_vec_pretty(&state)?;
        daemon::write_atomic(&state_file, &bytes)?;
    }
    Ok(())
}

/// A group name (from /etc/group) or a numeric gid.
fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    let groups =
        std::fs::read_to_string("/etc/group").map_err(|e| format!("reading /etc/group: {e}"))?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            Some((f.next()?, f.nth(1)?))
        })
        .find(|(name, _)| *name == text)
        .and_then(|(_, gid)| gid.parse().ok())
        .ok_or_else(|| format!("no group named {text:?}"))
}

fn parse_prime(text: &str) -> Result<u32, String> {
    let n: u32 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if !maglev::is_prime(u64::from(n)) || n > lbaas_common::RING_SLOTS / 4 {
        return Err(format!(
            "{n} must be a prime of at most {}",
            lbaas_common::RING_SLOTS / 4
        ));
    }
    Ok(n)
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn print_changes(changes: &[diff::Change], nothing: &str) {
    if changes.is_empty() {
        println!("{nothing}");
    }
    for change in changes {
        println!("{change}");
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.socket);
    match cli.command {
        Command::Daemon {
            interface,
            member_interface,
            state_dir,
            conntrack_size,
            maglev_table_size,
            udp_idle_timeout,
            member_drain_timeout,
            pin_path,
            cleanup_on_exit,
            socket_group,
            metrics,
            log_format,
        } => {
            init_logging(log_format);
            daemon::run(daemon::Options {
                interface,
                member_interface,
                socket: cli.socket,
                state_dir,
                load: LoadOptions {
                    conntrack_size,
                    pin_dir: Some(match pin_path {
                        Some(path) => path,
                        None => default_pin_dir()?,
                    }),
                },
                cleanup_on_exit,
                socket_group,
                metrics,
                compile: CompileOptions { maglev_table_size },
                expiry: ExpiryPolicy {
                    udp_idle: Duration::from_secs(udp_idle_timeout),
                    ..ExpiryPolicy::default()
                },
                member_drain_timeout: Duration::from_secs(member_drain_timeout),
            })
            .await
        }
        Command::Validate { file } => {
            let config = config::load_file(&file)?;
            println!(
                "{}: valid ({} load balancer(s))",
                file.display(),
                config.loadbalancers.len()
            );
            Ok(())
        }
        Command::Apply { file, prune } => {
            // Validated here first so that errors need no daemon; the daemon checks again.
            config::load_file(&file)?;
            let yaml = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let request = ApplyRequest {
                yaml,
                origin: file.display().to_string(),
            };
            let response = client.apply(&request, prune).await?;
            print_changes(&response.changes, "no changes");
            Ok(())
        }
        Command::Diff { file, prune } => {
            let wanted = config::load_file(&file)?;
            let running = client.config().await?;
            let merged = diff::merge(&running, &wanted, prune);
            print_changes(&diff::diff(&running, &merged), "no changes");
            Ok(())
        }
        Command::Get { kind, output } => {
            let running = client.config().await?;
            let status = client.status().await?;
            print!(
                "{}",
                render::rows(&running, kind, Some(&status)).render(output)
            );
            Ok(())
        }
        Command::Status { name, output } => {
            let mut status = client.status().await?;
            if let Some(name) = &name {
                status
                    .loadbalancers
                    .retain(|s| &s.statuses.loadbalancer.name == name);
                anyhow::ensure!(
                    !status.loadbalancers.is_empty(),
                    "no load balancer named {name:?}"
                );
            }
            match output {
                Format::Table => print!("{}", status::to_text(&status)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                Format::Yaml => print!("{}", serde_yaml_ng::to_string(&status)?),
            }
            Ok(())
        }
        Command::Detach {
            state_dir,
            pin_path,
        } => detach(&state_dir, pin_path).await,
        Command::Delete { name } => {
            let response = client.delete(&name).await?;
            print_changes(&response.changes, "no changes");
            Ok(())
        }
        Command::Stats {
            name,
            output,
            watch,
        } => loop {
            let stats = client.stats().await?;
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            match output {
                Format::Table => {
                    print!(
                        "{}",
                        render::object_stats_rows(&stats, name.as_deref()).to_table()
                    );
                    println!();
                    print!("{}", render::stats_rows(&stats).to_table());
                    println!();
                    for (counter, value) in &stats.datapath {
                        println!("{counter:<20} {value}");
                    }
                }
                Format::Json => println!("{}", serde_json::to_string_pretty(&stats)?),
                Format::Yaml => print!("{}", serde_yaml_ng::to_string(&stats)?),
            }
            if !watch {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        },
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
