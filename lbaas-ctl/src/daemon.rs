//! The daemon: owns the data path, applies configurations, persists them, serves the API.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use anyhow::Context as _;
use hyper::StatusCode;
use lbaas_common::{IFACE_CLIENT, IFACE_MEMBER};
use serde::{Deserialize, Serialize};
use tokio::{net::UnixListener, signal::unix::SignalKind, sync::Mutex};

use crate::{
    api::{self, ApiError, ApplyRequest, ApplyResponse, ListenerCounters, StatsResponse},
    compile::{self, CompileOptions, ListenerRef, MemberRef, Programmer},
    config::{self, Config, ConfigError},
    datapath::{self as dp, AttachMode, Datapath, ExpiryPolicy, GLOBAL_STAT_NAMES, LoadOptions},
    diff::{self, Change},
    health::{self, Monitors, Transition},
    metrics::{self, DaemonFigures},
    net::VipAddresses,
    proxy::{Proxy, ProxyError, RefusalReports},
    status::{self, MemberHealth, StatusResponse},
};

/// How the daemon runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Client-facing interface: XDP attached, VIPs added here.
    pub interface: String,
    /// Member-facing interface (two-arm mode); XDP attached here too.
    pub member_interface: Option<String>,
    /// The API socket.
    pub socket: PathBuf,
    /// Where the applied state is kept.
    pub state_dir: PathBuf,
    /// Data-path options.
    pub load: LoadOptions,
    /// Table compilation options.
    pub compile: CompileOptions,
    /// Idle-flow expiry.
    pub expiry: ExpiryPolicy,
    /// How long a removed member keeps serving its open flows at most.
    pub member_drain_timeout: std::time::Duration,
    /// A group whose members may use the API socket too (mode 0660 instead of 0600).
    pub socket_group: Option<u32>,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// On SIGTERM/SIGINT, detach the program and remove pins and VIP addresses (by default
    /// they stay, so a restart or an upgrade loses no flow).
    pub cleanup_on_exit: bool,
}

/// How often the connection table is swept for idle flows.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// Reports of members the L7 proxy could not connect to that may wait for the daemon
/// (more are dropped: the daemon is behind, and one report per member is enough).
const PROXY_REFUSALS_CAPACITY: usize = 1024;
/// The least time between two rounds of probes brought on by refused connections: a member
/// refusing thousands of connections a second is probed ten times a second, not thousands.
const REFUSAL_PROBE_GAP: std::time::Duration = std::time::Duration::from_millis(100);

/// What the daemon persists.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// The applied configuration.
    pub config: Config,
    /// VIP addresses this daemon added to the interface (and so may remove).
    pub owned_addresses: BTreeSet<Ipv4Addr>,
    /// The client-facing interface the addresses are on.
    #[serde(default)]
    pub interface: String,
    /// Where the data path is pinned.
    #[serde(default)]
    pub pin_dir: Option<PathBuf>,
}

/// The daemon's state file in its state directory.
pub const STATE_FILE: &str = "state.json";
/// The programmer's snapshot (ids, generations, ring regions of the pinned maps).
const SNAPSHOT_FILE: &str = "datapath.json";

/// The daemon's mutable core, behind one lock: applies are serialized.
struct Controller {
    datapath: Datapath,
    programmer: Programmer,
    /// Health probes of monitored members.
    monitors: Monitors,
    /// Monitored members' last known health.
    health: BTreeMap<MemberRef, MemberHealth>,
    /// Monitored members that failed their checks.
    down: BTreeSet<MemberRef>,
    /// Figures for the metrics.
    figures: DaemonFigures,
    /// Health-check durations, for the metrics.
    check_latency: Arc<metrics::CheckLatency>,
    state: State,
    addresses: VipAddresses,
    state_path: PathBuf,
    compile: CompileOptions,
    /// The L7 proxy's listeners.
    proxy: Proxy,
}

/// A proxy error as the API reports it: what cannot be served, with its YAML path.
fn proxy_error(e: ProxyError) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("the configuration cannot be served: {e}"),
        errors: vec![config::ValidationError {
            path: e.path().to_string(),
            message: match &e {
                ProxyError::Rule(r) => r.message.clone(),
                ProxyError::Certificate { source, .. } => source.to_string(),
                ProxyError::Bind { addr, source, .. } => {
                    format!("cannot listen on {addr}: {source}")
                }
            },
        }],
    }
}

/// Reads a state file (missing: empty state).
pub fn read_state(path: &Path) -> anyhow::Result<State> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "state file {} is corrupt; refusing to start (move it away to start empty)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(e).with_context(|| format!("reading state file {}", path.display())),
    }
}

/// Adds one object's figures to a total.
fn add(total: &mut api::ObjectStats, o: &api::ObjectStats) {
    total.active_connections += o.active_connections;
    total.bytes_in += o.bytes_in;
    total.bytes_out += o.bytes_out;
    total.total_connections += o.total_connections;
    total.request_errors += o.request_errors;
}

/// Writes a file atomically: temporary file, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn vips(config: &Config) -> BTreeSet<Ipv4Addr> {
    config
        .loadbalancers
        .iter()
        .filter_map(|lb| lb.vip())
        .collect()
}

impl Controller {
    /// Programs the data path and the addresses for `new`, then persists it.
    async fn commit(&mut self, new: Config) -> Result<Vec<Change>, ApiError> {
        let started = std::time::Instant::now();
        self.figures.applies += 1;
        let result = self.commit_inner(new).await;
        self.figures.apply_seconds_sum += started.elapsed().as_secs_f64();
        if result.is_err() {
            self.figures.apply_failures += 1;
        }
        result
    }

    async fn commit_inner(&mut self, new: Config) -> Result<Vec<Change>, ApiError> {
        let errors = config::validate(&new);
        if !errors.is_empty() {
            return Err(ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "the resulting configuration is invalid: {} error(s)",
                    errors.len()
                ),
                errors,
            });
        }
        let changes = diff::diff(&self.state.config, &new);
        // Certificates, regexes and sockets first: what the proxy cannot serve changes nothing.
        let proxied = self.proxy.prepare(&new, &self.down).map_err(proxy_error)?;
        // Probes follow the configuration; a new or changed probe starts its member as up.
        let probes = health::probes(&new);
        for member in self.monitors.sync(&probes) {
            self.down.remove(&member);
            self.health.insert(
                member,
                MemberHealth {
                    up: true,
                    reason: "checks started".into(),
                },
            );
        }
        self.down.retain(|m| probes.contains_key(m));
        self.health.retain(|m, _| probes.contains_key(m));
        let summary = self
            .programmer
            .apply(
                self.datapath.tables(),
                &compile::desired(&new, self.compile, &self.down),
            )
            .map_err(|e| {
                if matches!(e, compile::TableError::Map { .. }) {
                    self.figures.map_update_errors += 1;
                }
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            })?;
        self.sync_addresses(&vips(&new)).await?;
        self.proxy.install(proxied);
        self.state.config = new;
        self.persist()?;
        tracing::info!(
            changes = changes.len(),
            vips_written = summary.vips_written,
            vips_removed = summary.vips_removed,
            members_written = summary.members_written,
            members_removed = summary.members_removed,
            "applied: {}",
            changes
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(changes)
    }

    /// The periodic chores: interfaces that came back, idle flows, drained members.
    async fn housekeeping(&mut self, client_interface: &str, policy: &ExpiryPolicy) {
        self.check_interfaces(client_interface).await;
        let swept = self.datapath.expire_flows(dp::monotonic_ns(), policy);
        if let Ok(r) = &swept {
            self.figures.conntrack_entries = (r.scanned - r.removed) as u64;
        }
        match swept {
            Ok(r) if r.removed > 0 => {
                tracing::debug!(
                    scanned = r.scanned,
                    removed = r.removed,
                    "expired idle flows"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweeping the connection table failed"),
        }
        let now = std::time::Instant::now();
        match self.programmer.release_drained(self.datapath.tables(), now) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(members = n, "removed members drained and released");
                if let Err(e) = self.persist() {
                    tracing::warn!(error = %e, "saving the data-path snapshot failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "releasing drained members failed"),
        }
    }

    /// Notices interfaces deleted and created again: attaches anew and, for the client side,
    /// puts the VIP addresses back.
    async fn check_interfaces(&mut self, client_interface: &str) {
        for (interface, result) in self.datapath.reattach_recreated() {
            match result {
                Ok(mode) => {
                    tracing::warn!(%interface, ?mode, "interface re-created: XDP attached again")
                }
                Err(e) => {
                    tracing::error!(%interface, error = %e, "interface re-created but attaching XDP failed");
                    continue;
                }
            }
            if interface == client_interface {
                match VipAddresses::new(client_interface) {
                    Ok(addresses) => self.addresses = addresses,
                    Err(e) => {
                        tracing::error!(%interface, error = %e, "reopening rtnetlink failed");
                        continue;
                    }
                }
                let wanted = vips(&self.state.config);
                match self.sync_addresses(&wanted).await {
                    Ok(()) => {
                        tracing::warn!(%interface, addresses = wanted.len(), "VIP addresses restored")
                    }
                    Err(e) => {
                        tracing::error!(%interface, error = %e, "restoring VIP addresses failed")
                    }
                }
            }
        }
    }

    /// Probes now the monitored members (still up) that the data path saw refuse connections.
    fn on_refusals(&mut self, member_ids: &BTreeSet<u32>) {
        let refused: BTreeSet<MemberRef> = self
            .health
            .keys()
            .filter(|m| {
                self.programmer
                    .member_id(m)
                    .is_some_and(|id| member_ids.contains(&id))
            })
            .cloned()
            .collect();
        self.probe_refused(&refused);
    }

    /// Probes now the monitored members of `refused` that are still up.
    fn probe_refused(&mut self, refused: &BTreeSet<MemberRef>) {
        for member in refused {
            if self.health.contains_key(member)
                && !self.down.contains(member)
                && self.monitors.probe_now(member)
            {
                tracing::debug!(?member, "member refused a connection: probing it now");
            }
        }
    }

    /// Applies health transitions, all that were waiting at once: their members leave or
    /// rejoin selection, with one reprogramming for the lot (and none when no member changed
    /// sides). One apply per transition fell behind with thousands of members: a member
    /// that died waited in line behind the others' news.
    fn on_transitions(&mut self, batch: Vec<Transition>) {
        let mut changed = false;
        for t in batch {
            if !self.health.contains_key(&t.member) {
                continue; // no longer monitored
            }
            let member = format!(
                "{}/{}/{}:{}",
                t.member.loadbalancer, t.member.pool, t.member.addr, t.member.port
            );
            if t.up {
                tracing::info!(%member, reason = %t.reason, "member ONLINE");
                changed |= self.down.remove(&t.member);
            } else {
                tracing::warn!(%member, reason = %t.reason, "member ERROR: out of selection, its flows rescheduled");
                changed |= self.down.insert(t.member.clone());
            }
            self.health.insert(
                t.member,
                MemberHealth {
                    up: t.up,
                    reason: t.reason,
                },
            );
        }
        if !changed {
            return;
        }
        let want = compile::desired(&self.state.config, self.compile, &self.down);
        if let Err(e) = self.programmer.apply(self.datapath.tables(), &want) {
            tracing::error!(error = %e, "reprogramming after a health change failed");
        }
        match self.proxy.prepare(&self.state.config, &self.down) {
            Ok(prepared) => self.proxy.install(prepared),
            Err(e) => {
                tracing::error!(error = %e, "updating the L7 proxy after a health change failed")
            }
        }
        if let Err(e) = self.persist() {
            tracing::warn!(error = %e, "saving the data-path snapshot failed");
        }
    }

    async fn sync_addresses(&mut self, wanted: &BTreeSet<Ipv4Addr>) -> Result<(), ApiError> {
        let fail = |e: crate::net::NetError| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        };
        for addr in wanted {
            if self.addresses.add(*addr).await.map_err(fail)? {
                tracing::info!(%addr, "VIP address added");
                self.state.owned_addresses.insert(*addr);
            }
        }
        let stale: Vec<Ipv4Addr> = self
            .state
            .owned_addresses
            .difference(wanted)
            .copied()
            .collect();
        for addr in stale {
            self.addresses.remove(addr).await.map_err(fail)?;
            tracing::info!(%addr, "VIP address removed");
            self.state.owned_addresses.remove(&addr);
        }
        Ok(())
    }

    fn persist(&self) -> Result<(), ApiError> {
        let fail = |path: &Path, e: String| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("writing {}: {e}", path.display()),
            )
        };
        // The snapshot first: a state file never names tables the snapshot does not describe.
        let snapshot_path = self.state_path.with_file_name(SNAPSHOT_FILE);
        let snapshot = serde_json::to_vec(&self.programmer.snapshot())
            .map_err(|e| fail(&snapshot_path, e.to_string()))?;
        write_atomic(&snapshot_path, &snapshot).map_err(|e| fail(&snapshot_path, e.to_string()))?;
        let bytes = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| fail(&self.state_path, e.to_string()))?;
        write_atomic(&self.state_path, &bytes).map_err(|e| fail(&self.state_path, e.to_string()))
    }

    /// Octavia's statistics: listeners from their counters (read once, by `stats`), load
    /// balancers as the sum of their listeners, members from their data-path counters, pools
    /// as the sum of their members.
    fn octavia_stats(
        &self,
        listener_counters: &[ListenerCounters],
    ) -> Result<Vec<api::ObjectStats>, crate::datapath::DatapathError> {
        let mut out = Vec::new();
        let proxied = self.proxy.member_counters();
        for lb in &self.state.config.loadbalancers {
            let mut lb_total = api::ObjectStats {
                kind: "loadbalancer".into(),
                name: lb.name.clone(),
                ..Default::default()
            };
            let mut listeners = Vec::new();
            for c in listener_counters
                .iter()
                .filter(|c| c.loadbalancer == lb.name)
            {
                let o = api::ObjectStats {
                    kind: "listener".into(),
                    name: format!("{}/{}", c.loadbalancer, c.listener),
                    active_connections: c.active_connections,
                    bytes_in: c.bytes_in,
                    bytes_out: c.bytes_out,
                    total_connections: c.total_connections,
                    request_errors: c.request_errors,
                };
                add(&mut lb_total, &o);
                listeners.push(o);
            }
            out.push(lb_total);
            out.extend(listeners);
            for pool in &lb.pools {
                let mut pool_total = api::ObjectStats {
                    kind: "pool".into(),
                    name: format!("{}/{}", lb.name, pool.name),
                    ..Default::default()
                };
                let mut members = Vec::new();
                for m in &pool.members {
                    let (Some(addr), Ok(port)) = (m.ipv4(), u16::try_from(m.protocol_port)) else {
                        continue;
                    };
                    let key = MemberRef {
                        loadbalancer: lb.name.clone(),
                        pool: pool.name.clone(),
                        addr,
                        port,
                    };
                    let mut o = api::ObjectStats {
                        kind: "member".into(),
                        name: format!(
                            "{}/{}/{}:{}",
                            lb.name, pool.name, m.address, m.protocol_port
                        ),
                        ..Default::default()
                    };
                    if let Some(id) = self.programmer.member_id(&key) {
                        let s = self.datapath.member_stats(id)?;
                        o.active_connections = self.datapath.active_flows(id)?;
                        o.bytes_in = s.bytes_in;
                        o.bytes_out = s.bytes_out;
                        o.total_connections = s.new_flows;
                    }
                    // Requests the proxy sent (in flight, and body bytes each way).
                    if let Some(p) = proxied.get(&key) {
                        o.active_connections += p.in_flight.load(Ordering::Relaxed);
                        o.bytes_in += p.bytes_in.load(Ordering::Relaxed);
                        o.bytes_out += p.bytes_out.load(Ordering::Relaxed);
                        o.total_connections += p.requests.load(Ordering::Relaxed);
                    }
                    add(&mut pool_total, &o);
                    members.push(o);
                }
                out.push(pool_total);
                out.extend(members);
            }
        }
        Ok(out)
    }

    fn stats(&self) -> Result<StatsResponse, ApiError> {
        let fail = |e: crate::datapath::DatapathError| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        };
        let global = self.datapath.global_stats().map_err(fail)?;
        let mut listeners = Vec::new();
        let proxied: BTreeMap<ListenerRef, _> = self
            .proxy
            .listener_figures()
            .into_iter()
            .map(|f| (f.listener, f.counters))
            .collect();
        for lb in &self.state.config.loadbalancers {
            for l in &lb.listeners {
                let key = ListenerRef {
                    loadbalancer: lb.name.clone(),
                    listener: l.name.clone(),
                };
                if !l.protocol.is_l4() {
                    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                    let c = proxied.get(&key).cloned().unwrap_or_default();
                    listeners.push(ListenerCounters {
                        loadbalancer: lb.name.clone(),
                        listener: l.name.clone(),
                        packets_in: 0,
                        bytes_in: load(&c.bytes_in),
                        packets_out: 0,
                        bytes_out: load(&c.bytes_out),
                        total_connections: load(&c.total_connections),
                        active_connections: load(&c.active_connections),
                        refused_connections: load(&c.refused_connections),
                        request_errors: load(&c.request_errors),
                        member_errors: load(&c.member_errors),
                    });
                    continue;
                }
                let Some(id) = self.programmer.listener_id(&key) else {
                    continue;
                };
                let s = self.datapath.listener_stats(id).map_err(fail)?;
                listeners.push(ListenerCounters {
                    loadbalancer: lb.name.clone(),
                    listener: l.name.clone(),
                    packets_in: s.packets_in,
                    bytes_in: s.bytes_in,
                    packets_out: s.packets_out,
                    bytes_out: s.bytes_out,
                    total_connections: s.new_flows,
                    active_connections: self
                        .datapath
                        .active_flows(lbaas_common::MAX_MEMBERS + id)
                        .map_err(fail)?,
                    refused_connections: s.refused,
                    request_errors: 0,
                    member_errors: 0,
                });
            }
        }
        let objects = self.octavia_stats(&listeners).map_err(fail)?;
        Ok(StatsResponse {
            objects,
            datapath: GLOBAL_STAT_NAMES
                .iter()
                .zip(global)
                .map(|(name, value)| (name.to_string(), value))
                .collect(),
            listeners,
        })
    }
}

struct Daemon {
    controller: Mutex<Controller>,
}

impl api::Handler for Daemon {
    async fn config(&self) -> Config {
        self.controller.lock().await.state.config.clone()
    }

    async fn apply(&self, request: ApplyRequest, prune: bool) -> Result<ApplyResponse, ApiError> {
        let file = config::load_str(&request.yaml, &request.origin).map_err(|e| match e {
            ConfigError::Invalid { origin, errors } => ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!("{origin}: {} error(s)", errors.len()),
                errors,
            },
            other => ApiError::new(StatusCode::BAD_REQUEST, other.to_string()),
        })?;
        let mut controller = self.controller.lock().await;
        let merged = diff::merge(&controller.state.config, &file, prune);
        let changes = controller.commit(merged).await?;
        Ok(ApplyResponse { changes })
    }

    async fn delete(&self, name: String) -> Result<ApplyResponse, ApiError> {
        let mut controller = self.controller.lock().await;
        let Some(new) = diff::remove(&controller.state.config, &name) else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no load balancer named {name:?}"),
            ));
        };
        let changes = controller.commit(new).await?;
        Ok(ApplyResponse { changes })
    }

    async fn stats(&self) -> Result<StatsResponse, ApiError> {
        self.controller.lock().await.stats()
    }

    async fn status(&self) -> StatusResponse {
        let controller = self.controller.lock().await;
        status::tree(&controller.state.config, &controller.health)
    }
}

/// Serves `GET /metrics` in Prometheus text format.
async fn serve_metrics(listener: tokio::net::TcpListener, daemon: Arc<Daemon>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let daemon = daemon.clone();
                    async move {
                        let response = if request.uri().path() == "/metrics" {
                            let controller = daemon.controller.lock().await;
                            let body = match controller.stats() {
                                Ok(stats) => {
                                    let status =
                                        status::tree(&controller.state.config, &controller.health);
                                    metrics::render(
                                        stats,
                                        status,
                                        &controller.figures,
                                        &controller.check_latency,
                                    )
                                }
                                Err(e) => format!("# error: {}\n", e.message),
                            };
                            hyper::Response::builder()
                                .header("content-type", metrics::CONTENT_TYPE)
                                .body(Full::new(Bytes::from(body)))
                        } else {
                            hyper::Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                        };
                        Ok::<_, std::convert::Infallible>(response.expect("static response parts"))
                    }
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn warn_if_not_forwarding() {
    match std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward") {
        Ok(v) if v.trim() == "1" => {}
        _ => tracing::warn!(
            "net.ipv4.ip_forward is off: XDP forwards established flows, but packets handed to the \
             host stack (first packets before the neighbour is known) will not be routed"
        ),
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(options: Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(&options.state_dir)
        .with_context(|| format!("creating state dir {}", options.state_dir.display()))?;
    let state_path = options.state_dir.join(STATE_FILE);
    let saved = read_state(&state_path)?;
    let errors = config::validate(&saved.config);
    anyhow::ensure!(
        errors.is_empty(),
        "state file {} holds an invalid configuration; refusing to start:\n{}",
        state_path.display(),
        errors
            .iter()
            .map(|e| format!("  {e}"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let mut datapath = Datapath::load(options.load.clone())?;
    let refusals = datapath.take_refusals();
    let snapshot_path = options.state_dir.join(SNAPSHOT_FILE);
    let mut programmer = Programmer::with_drain_timeout(options.member_drain_timeout);
    if datapath.reused_maps() {
        match std::fs::read(&snapshot_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<compile::Snapshot>(&b).ok())
        {
            Some(snapshot) => {
                programmer = Programmer::restore(&snapshot, options.member_drain_timeout);
                tracing::info!(pins = ?options.load.pin_dir, "took over the pinned data path and its flows");
            }
            None => {
                let cleared = datapath.clear_vips()?;
                tracing::warn!(
                    snapshot = %snapshot_path.display(),
                    cleared,
                    "pinned maps found without their snapshot: VIP entries cleared and rebuilt; flows of changed ids will be rescheduled"
                );
            }
        }
    }
    // Two arms: clients on one interface, members' replies on the other; one arm: both.
    let mut interfaces = vec![(options.interface.clone(), IFACE_CLIENT | IFACE_MEMBER)];
    if let Some(member) = &options.member_interface
        && member != &options.interface
    {
        interfaces = vec![
            (options.interface.clone(), IFACE_CLIENT),
            (member.clone(), IFACE_MEMBER),
        ];
    }
    for (interface, roles) in &interfaces {
        let mode = datapath.attach_pinned(interface, *roles)?;
        match mode {
            AttachMode::Native => {
                tracing::info!(%interface, "XDP attached in native (driver) mode")
            }
            AttachMode::Generic => {
                tracing::warn!(%interface, "driver has no native XDP: attached in generic (skb) mode")
            }
            AttachMode::Replaced => {
                tracing::info!(%interface, "XDP program replaced atomically in the pinned link")
            }
        }
    }
    warn_if_not_forwarding();
    let addresses = VipAddresses::new(&options.interface)?;
    let (transitions_tx, mut transitions) = tokio::sync::mpsc::unbounded_channel();
    let (proxy_refusals, proxy_refused) = RefusalReports::channel(PROXY_REFUSALS_CAPACITY);
    let check_latency = metrics::check_latency();
    let mut controller = Controller {
        monitors: Monitors::new(transitions_tx, check_latency.clone()),
        check_latency,
        health: BTreeMap::new(),
        down: BTreeSet::new(),
        figures: DaemonFigures {
            conntrack_size: u64::from(options.load.conntrack_size),
            ..DaemonFigures::default()
        },
        datapath,
        programmer,
        state: State {
            config: Config::default(),
            owned_addresses: saved.owned_addresses,
            interface: options.interface.clone(),
            pin_dir: options.load.pin_dir.clone(),
        },
        addresses,
        state_path,
        compile: options.compile,
        proxy: Proxy::reporting_refusals(proxy_refusals),
    };
    if !saved.config.loadbalancers.is_empty() {
        let n = saved.config.loadbalancers.len();
        controller
            .commit(saved.config)
            .await
            .map_err(|e| anyhow::anyhow!("restoring the saved state: {e}"))?;
        tracing::info!(loadbalancers = n, "restored saved state");
    }

    if let Some(dir) = options.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(&options.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("removing stale socket {}", options.socket.display()));
        }
    }
    let listener = UnixListener::bind(&options.socket)
        .with_context(|| format!("binding API socket {}", options.socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        // Owner only, or owner and one group (`--socket-group`).
        let mode = if let Some(gid) = options.socket_group {
            std::os::unix::fs::chown(&options.socket, None, Some(gid))
                .with_context(|| format!("giving {} to group {gid}", options.socket.display()))?;
            0o660
        } else {
            0o600
        };
        std::fs::set_permissions(&options.socket, std::fs::Permissions::from_mode(mode))?;
    }
    let daemon = Arc::new(Daemon {
        controller: Mutex::new(controller),
    });
    tracing::info!(socket = %options.socket.display(), interfaces = ?interfaces, "lbaas daemon ready");

    let health_task = {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            while let Some(first) = transitions.recv().await {
                let mut batch = vec![first];
                while let Ok(t) = transitions.try_recv() {
                    batch.push(t);
                }
                daemon.controller.lock().await.on_transitions(batch);
            }
        })
    };
    // Refused connections bring their member's next probe forward.
    let refusal_task = refusals.map(|ring| tokio::spawn(watch_refusals(daemon.clone(), ring)));
    let proxy_refusal_task = tokio::spawn(watch_proxy_refusals(daemon.clone(), proxy_refused));
    let sweeper = {
        let daemon = daemon.clone();
        let policy = options.expiry;
        let client_interface = options.interface.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tick.tick().await;
                let mut guard = daemon.controller.lock().await;
                guard.housekeeping(&client_interface, &policy).await;
            }
        })
    };

    let metrics = match options.metrics {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint {addr}"))?;
            tracing::info!(%addr, "Prometheus metrics at /metrics");
            Some(tokio::spawn(serve_metrics(listener, daemon.clone())))
        }
        None => None,
    };

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    tokio::select! {
        () = api::serve(listener, daemon.clone(), api::Access { group: options.socket_group }) => {}
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }

    sweeper.abort();
    if let Some(task) = metrics {
        task.abort();
    }
    health_task.abort();
    proxy_refusal_task.abort();
    if let Some(task) = refusal_task {
        task.abort();
    }
    let mut controller = daemon.controller.lock().await;
    if options.cleanup_on_exit {
        let owned: Vec<Ipv4Addr> = controller.state.owned_addresses.iter().copied().collect();
        for addr in owned {
            match controller.addresses.remove(addr).await {
                Ok(()) => {
                    controller.state.owned_addresses.remove(&addr);
                }
                Err(e) => tracing::warn!(%addr, error = %e, "could not remove VIP address"),
            }
        }
        controller.datapath.detach_all()?;
    }
    if let Err(e) = controller.persist() {
        tracing::warn!(error = %e, "could not save state on shutdown");
    }
    let _ = std::fs::remove_file(&options.socket);
    if options.cleanup_on_exit {
        tracing::info!("stopped: program detached, pins and VIP addresses removed");
    } else {
        tracing::info!(
            "stopped: the data path stays in place and keeps forwarding (--cleanup-on-exit or `lbaas-ctl detach` removes it)"
        );
    }
    Ok(())
}

/// Reads the members the L7 proxy could not connect to, and has them probed now; one round
/// per [`REFUSAL_PROBE_GAP`] at the most.
async fn watch_proxy_refusals(
    daemon: Arc<Daemon>,
    mut reports: tokio::sync::mpsc::Receiver<MemberRef>,
) {
    while let Some(first) = reports.recv().await {
        let mut refused = BTreeSet::from([first]);
        while let Ok(member) = reports.try_recv() {
            refused.insert(member);
        }
        daemon.controller.lock().await.probe_refused(&refused);
        tokio::time::sleep(REFUSAL_PROBE_GAP).await;
    }
}

/// Reads the member ids of refused connections as the data path reports them, and has those
/// members probed now; one round per [`REFUSAL_PROBE_GAP`] at the most.
async fn watch_refusals(daemon: Arc<Daemon>, ring: aya::maps::RingBuf<aya::maps::MapData>) {
    // SAFETY: the ring buffer owns its map's descriptor, which stays open, and the same, for
    // as long as the ring buffer lives (it moves into the AsyncFd).
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
    };
    let mut ring = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch refused connections: members are probed at their delay only");
            return;
        }
    };
    loop {
        let Ok(mut ready) = ring.readable_mut().await else {
            return;
        };
        let mut member_ids = BTreeSet::new();
        while let Some(event) = ready.get_inner_mut().next() {
            if let Ok(bytes) = <[u8; 4]>::try_from(&event[..]) {
                member_ids.insert(u32::from_ne_bytes(bytes));
            }
        }
        ready.clear_ready();
        if !member_ids.is_empty() {
            daemon.controller.lock().await.on_refusals(&member_ids);
        }
        tokio::time::sleep(REFUSAL_PROBE_GAP).await;
    }
}
