//! The XDP program in the kernel: loading, attaching, and the map writer behind
//! [`compile::Tables`](crate::compile::Tables).

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, ProgramArray, RingBuf,
        lpm_trie::{Key as TrieKey, LpmTrie},
    },
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use std::time::Duration;

use lbaas_common::{
    FLOW_CLOSED, FlowCounters, FlowKey, FlowState, IPPROTO_UDP, ListenerStats, MAP_CONNS,
    MAP_CONNTRACK, MAP_EXPIRED, MAP_GLOBAL_STATS, MAP_LISTENER_STATS, MAP_MEMBERS, MAP_REVERSE,
    MAP_RING, MAP_RR, MAP_VIPS, MAX_MEMBERS, MemberInfo, ReverseNat, STAT_COUNT, SourcePrefix,
    VipInfo, VipKey,
};

use crate::compile::{SourceCidr, TableError, Tables};

/// The XDP object built by `build.rs` from `lbaas-ebpf`.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lbaas"));

/// Name of the XDP entry point in the object.
pub const PROGRAM_NAME: &str = "lbaas_xdp";
/// Name of the do-nothing XDP program in the object (benchmarks' floor).
pub const NOOP_PROGRAM_NAME: &str = "lbaas_noop";
/// Name of the benchmark wrapper program (see [`Datapath::bench_wrapper`]).
pub const BENCH_PROGRAM_NAME: &str = "lbaas_bench";

/// Names of the global counters, indexed by `STAT_*`.
pub const GLOBAL_STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "pass_not_vip",
    "pass_malformed",
    "pass_ip_options",
    "pass_fragment",
    "drop_no_member",
    "pass_no_neighbour",
    "forwarded",
    "pass_l7",
    "refused_rst",
    "drop_conn_limit",
    "drop_source",
];

/// Why the data path could not be loaded, attached or read.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The binary was built without the eBPF object.
    #[error(
        "this lbaas-ctl was built without its XDP program (LBAAS_SKIP_EBPF=1); rebuild after `cargo xtask setup`"
    )]
    NoProgram,
    /// The kernel refused the object (verifier, map creation).
    #[error("loading the XDP program failed: {0}")]
    Load(Box<aya::EbpfError>),
    /// A program operation failed.
    #[error("XDP program: {0}")]
    Program(Box<ProgramError>),
    /// The pin directory is not on a bpf filesystem.
    #[error(
        "pin path {0} is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf, or give --pin-path)"
    )]
    NotBpffs(PathBuf),
    /// Creating the pin directory or a pin failed.
    #[error("pinning under {path}: {message}")]
    Pin {
        /// Where.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Attaching to an interface failed in every mode.
    #[error("attaching XDP to {interface} failed (native: {native}; generic: {generic})")]
    Attach {
        /// Interface name.
        interface: String,
        /// Error in native (driver) mode.
        native: Box<ProgramError>,
        /// Error in generic (skb) mode.
        generic: Box<ProgramError>,
    },
    /// A frame for the benchmark wrapper is shorter than the bytes it restores.
    #[error(
        "a benchmark frame of {0} bytes: the wrapper restores the first {BENCH_FRAME_BYTES}, frames must be at least that long",
        BENCH_FRAME_BYTES = lbaas_common::BENCH_FRAME_BYTES
    )]
    ShortBenchFrame(usize),
    /// A map the program should have is missing.
    #[error("the XDP object has no map {0}")]
    MissingMap(&'static str),
    /// A map read or conversion failed.
    #[error("map {map}: {source}")]
    Map {
        /// Map name.
        map: &'static str,
        /// The error.
        source: Box<MapError>,
    },
}

impl From<aya::EbpfError> for DatapathError {
    fn from(e: aya::EbpfError) -> Self {
        Self::Load(Box::new(e))
    }
}

impl From<ProgramError> for DatapathError {
    fn from(e: ProgramError) -> Self {
        Self::Program(Box::new(e))
    }
}

fn map_error(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        map,
        source: Box::new(source),
    }
}

/// Options for loading the program.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Entries in each of the connection and reverse-NAT tables.
    pub conntrack_size: u32,
    /// Directory on a bpf filesystem where the maps and XDP links are pinned, so that they
    /// outlive the daemon: a restarted daemon reuses them and established flows keep going.
    /// `None` keeps everything private to this process.
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_size: lbaas_common::DEFAULT_CONNTRACK_SIZE,
            pin_dir: None,
        }
    }
}

/// `statfs` magic of the bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `dir` lies on a bpf filesystem.
pub fn on_bpffs(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct it is given.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(path.as_ptr(), &mut st) }) == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// The pin file of the XDP link on `interface`.
fn link_pin(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link_{interface}"))
}

/// Removes everything pinned under `dir` (and its layout subdirectories): the XDP links
/// (which detaches the program once no process holds them) and the maps. Returns the names
/// removed.
pub fn unpin_all(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            removed.extend(unpin_all(&entry.path())?);
        } else {
            std::fs::remove_file(entry.path())?;
            removed.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    std::fs::remove_dir(dir)?;
    Ok(removed)
}

/// Pins of another layout version cannot be reused (this build would misread them): says
/// what that costs, then removes them, which detaches the old program so the new one can
/// attach.
fn retire_other_layouts(base: &Path) -> Result<(), DatapathError> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Ok(());
    };
    let current = format!("v{}", lbaas_common::LAYOUT_VERSION);
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('v') || name == current || !entry.path().is_dir() {
            continue;
        }
        tracing::warn!(
            found = %entry.path().display(),
            this_build = %current,
            "a data path pinned with another layout ({name}) cannot be taken over: its connection \
             table is dropped, so TCP connections through this node are reset and every flow is \
             balanced afresh; its program is detached now and this build's attached"
        );
        unpin_all(&entry.path()).map_err(|e| DatapathError::Pin {
            path: entry.path(),
            message: e.to_string(),
        })?;
    }
    Ok(())
}

/// How the program got attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native XDP in the driver.
    Native,
    /// Generic XDP in the network stack (the driver has no native XDP).
    Generic,
    /// Swapped into the link a previous daemon pinned (mode unchanged).
    Replaced,
}

/// When the controller removes idle flows from the connection table.
#[derive(Clone, Copy, Debug)]
pub struct ExpiryPolicy {
    /// A UDP flow without a client packet for this long is removed (its member is chosen
    /// afresh for the next datagram).
    pub udp_idle: Duration,
    /// A TCP flow that saw FIN or RST is removed after this long without a client packet.
    pub closed_linger: Duration,
}

impl Default for ExpiryPolicy {
    fn default() -> Self {
        Self {
            udp_idle: Duration::from_secs(60),
            closed_linger: Duration::from_secs(10),
        }
    }
}

/// What one sweep of the connection table did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries looked at.
    pub scanned: usize,
    /// Entries removed.
    pub removed: usize,
}

/// The loaded program and typed handles on its maps.
pub struct Datapath {
    ebpf: Ebpf,
    tables: KernelTables,
    conntrack: HashMap<MapData, FlowKey, FlowState>,
    ifaces: Array<MapData, u32>,
    reverse: HashMap<MapData, FlowKey, ReverseNat>,
    links: Vec<XdpLinkId>,
    /// Links pinned on bpffs (or taken over from pins): they stay attached without us.
    pinned: Vec<(String, FdLink)>,
    /// Interfaces attached through [`Datapath::attach_pinned`]: name, index, `IFACE_*` roles.
    attached: Vec<(String, u32, u32)>,
    pin_dir: Option<PathBuf>,
    reused_maps: bool,
    /// Refused connections' member ids (`MAP_REFUSALS`), until the daemon takes them.
    refusals: Option<RingBuf<MapData>>,
}

/// Per-CPU counters summed.
fn sum_stats(values: &aya::maps::PerCpuValues<ListenerStats>) -> ListenerStats {
    values.iter().fold(ListenerStats::default(), |mut sum, v| {
        sum.packets_in += v.packets_in;
        sum.bytes_in += v.bytes_in;
        sum.packets_out += v.packets_out;
        sum.bytes_out += v.bytes_out;
        sum.new_flows += v.new_flows;
        sum.refused += v.refused;
        sum
    })
}

/// Now on the clock `bpf_ktime_get_ns()` reads (CLOCK_MONOTONIC), in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The map writer over the kernel's maps.
pub struct KernelTables {
    vips: HashMap<MapData, VipKey, VipInfo>,
    members: Array<MapData, MemberInfo>,
    ring: Array<MapData, u32>,
    rr: Array<MapData, u64>,
    conns: Array<MapData, FlowCounters>,
    expired: Array<MapData, u64>,
    member_stats: PerCpuArray<MapData, ListenerStats>,
    allowed_sources: LpmTrie<MapData, SourcePrefix, u8>,
    vip_filter: Array<MapData, u32>,
    member_vips: HashMap<MapData, lbaas_common::Endpoint, VipKey>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(map_error(name))
}

impl Datapath {
    /// Loads the program and creates its maps (not attached anywhere yet).
    pub fn load(options: LoadOptions) -> Result<Self, DatapathError> {
        if PROGRAM_OBJECT.is_empty() {
            return Err(DatapathError::NoProgram);
        }
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_CONNTRACK, options.conntrack_size)
            .map_max_entries(MAP_REVERSE, options.conntrack_size)
            .map_max_entries(lbaas_common::MAP_HALF_OPEN, options.conntrack_size)
            .map_max_entries(lbaas_common::MAP_HALF_OPEN_REVERSE, options.conntrack_size);
        let mut reused_maps = false;
        let pin_dir = options
            .pin_dir
            .as_ref()
            .map(|base| base.join(format!("v{}", lbaas_common::LAYOUT_VERSION)));
        if let Some(base) = &options.pin_dir {
            retire_other_layouts(base)?;
        }
        if let Some(dir) = &pin_dir {
            std::fs::create_dir_all(dir).map_err(|e| DatapathError::Pin {
                path: dir.clone(),
                message: e.to_string(),
            })?;
            if !on_bpffs(dir) {
                return Err(DatapathError::NotBpffs(dir.clone()));
            }
            // Maps already pinned there are reused, contents and all.
            reused_maps = dir.join(MAP_VIPS).exists();
            for name in lbaas_common::ALL_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(PROGRAM_OBJECT)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        // The verifier gives up with EAGAIN when a signal arrives during a verification (tens
        // of ms for this program, a few hundred before its least-connections scan went
        // through bpf_loop); it asks to be tried again, so it is.
        let mut attempts = 0;
        loop {
            match program.load() {
                Ok(()) => break,
                Err(ProgramError::LoadError { io_error, .. })
                    if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts < 5 =>
                {
                    attempts += 1;
                    tracing::debug!(attempts, "verifier interrupted; loading again");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let tables = KernelTables {
            vips: take(&mut ebpf, MAP_VIPS)?,
            members: take(&mut ebpf, MAP_MEMBERS)?,
            ring: take(&mut ebpf, MAP_RING)?,
            rr: take(&mut ebpf, MAP_RR)?,
            conns: take(&mut ebpf, MAP_CONNS)?,
            expired: take(&mut ebpf, MAP_EXPIRED)?,
            member_stats: take(&mut ebpf, lbaas_common::MAP_MEMBER_STATS)?,
            allowed_sources: take(&mut ebpf, lbaas_common::MAP_ALLOWED_SOURCES)?,
            vip_filter: take(&mut ebpf, lbaas_common::MAP_VIP_FILTER)?,
            member_vips: take(&mut ebpf, lbaas_common::MAP_MEMBER_VIPS)?,
        };
        Ok(Self {
            conntrack: take(&mut ebpf, MAP_CONNTRACK)?,
            ifaces: take(&mut ebpf, lbaas_common::MAP_IFACES)?,
            reverse: take(&mut ebpf, MAP_REVERSE)?,
            refusals: Some(take(&mut ebpf, lbaas_common::MAP_REFUSALS)?),
            ebpf,
            tables,
            links: Vec::new(),
            pinned: Vec::new(),
            attached: Vec::new(),
            pin_dir,
            reused_maps,
        })
    }

    /// The ring buffer on which the data path names the member of every connection a member
    /// refused (each id a native-endian `u32`); `None` once taken.
    pub fn take_refusals(&mut self) -> Option<RingBuf<MapData>> {
        self.refusals.take()
    }

    /// Whether the maps were taken over from pins a previous daemon left (with its flows).
    pub fn reused_maps(&self) -> bool {
        self.reused_maps
    }

    /// Removes every VIP entry (maps taken over without the state that describes them).
    pub fn clear_vips(&mut self) -> Result<usize, DatapathError> {
        let keys: Vec<VipKey> = self.tables.vips.keys().filter_map(Result::ok).collect();
        for key in &keys {
            self.tables.vips.remove(key).map_err(map_error(MAP_VIPS))?;
        }
        // And the member endpoints' listeners: the next apply writes them afresh.
        let endpoints: Vec<VipKey> = self
            .tables
            .member_vips
            .keys()
            .filter_map(Result::ok)
            .collect();
        for endpoint in &endpoints {
            self.tables
                .member_vips
                .remove(endpoint)
                .map_err(map_error(lbaas_common::MAP_MEMBER_VIPS))?;
        }
        Ok(keys.len())
    }

    /// Attaches to an interface and pins the link, or, when a previous daemon's link is pinned
    /// there, atomically swaps this program into it (the interface never goes without one).
    /// `roles` (`IFACE_*`) tell the data path what arrives there: clients' packets, members'
    /// replies, or both.
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        roles: u32,
    ) -> Result<AttachMode, DatapathError> {
        let mode = self.attach_pinned_link(interface)?;
        let ifindex = crate::net::ifindex(interface).map_err(|e| DatapathError::Pin {
            path: PathBuf::from(interface),
            message: e.to_string(),
        })?;
        self.set_roles(ifindex, roles)?;
        self.attached.retain(|(name, _, _)| name != interface);
        self.attached.push((interface.to_string(), ifindex, roles));
        Ok(mode)
    }

    /// Records an interface's roles (`IFACE_*`) for the data path. An interface whose index
    /// is past the role array keeps every role (correct, only slower for packets that need
    /// neither lookup).
    pub fn set_roles(&mut self, ifindex: u32, roles: u32) -> Result<(), DatapathError> {
        if ifindex >= lbaas_common::MAX_IFACES {
            tracing::warn!(
                ifindex,
                "interface index past the role table: the interface serves every role"
            );
            return Ok(());
        }
        self.ifaces
            .set(ifindex, roles, 0)
            .map_err(map_error(lbaas_common::MAP_IFACES))
    }

    fn attach_pinned_link(&mut self, interface: &str) -> Result<AttachMode, DatapathError> {
        let Some(dir) = self.pin_dir.clone() else {
            return self.attach(interface);
        };
        let pin = link_pin(&dir, interface);
        let pin_error = |message: String| DatapathError::Pin {
            path: pin.clone(),
            message,
        };
        if pin.exists() {
            match self.replace_pinned(&pin) {
                Ok(fd) => {
                    self.pinned.push((interface.to_string(), fd));
                    return Ok(AttachMode::Replaced);
                }
                Err(e) => {
                    // The device the link was made for is gone (deleted and re-created):
                    // the pinned link is defunct. Attach afresh.
                    tracing::warn!(%interface, error = %e, "pinned XDP link unusable; attaching afresh");
                    std::fs::remove_file(&pin).map_err(|e| pin_error(e.to_string()))?;
                }
            }
        }
        let mode = self.attach(interface)?;
        let id = self.links.pop().expect("attach recorded the link");
        let link = self.program_mut()?.take_link(id)?;
        match FdLink::try_from(link) {
            Ok(fd) => {
                let pinned = fd.pin(&pin).map_err(|e| pin_error(e.to_string()))?;
                self.pinned
                    .push((interface.to_string(), FdLink::from(pinned)));
            }
            Err(e) => {
                // A netlink attachment (no bpf_link in this kernel) cannot be pinned.
                tracing::warn!(%interface, error = %e, "XDP link cannot be pinned: a daemon restart will detach the program");
                return Err(pin_error(e.to_string()));
            }
        }
        Ok(mode)
    }

    /// Swaps this program into a pinned link; returns the link's descriptor.
    fn replace_pinned(&mut self, pin: &Path) -> Result<FdLink, String> {
        let old = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?;
        let link = XdpLink::try_from(FdLink::from(old)).map_err(|e| e.to_string())?;
        let program = self.program_mut().map_err(|e| e.to_string())?;
        let id = program.attach_to_link(link).map_err(|e| e.to_string())?;
        let taken = program.take_link(id).map_err(|e| e.to_string())?;
        FdLink::try_from(taken).map_err(|e| e.to_string())
    }

    /// Re-attaches to every interface that was deleted and created again since it was
    /// attached (its index changed; the kernel dropped the old attachment with the device).
    /// Returns the interfaces re-attached, with the outcome.
    pub fn reattach_recreated(&mut self) -> Vec<(String, Result<AttachMode, DatapathError>)> {
        let mut out = Vec::new();
        for (name, index, roles) in self.attached.clone() {
            let Ok(now) = crate::net::ifindex(&name) else {
                continue;
            };
            if now == index {
                continue;
            }
            if index < lbaas_common::MAX_IFACES {
                let _ = self.ifaces.set(index, 0, 0);
            }
            self.pinned.retain(|(n, _)| *n != name);
            out.push((name.clone(), self.attach_pinned(&name, roles)));
        }
        out
    }

    /// Attaches to an interface, natively where the driver supports it, generically otherwise.
    pub fn attach(&mut self, interface: &str) -> Result<AttachMode, DatapathError> {
        let program = self.program_mut()?;
        let native = match program.attach(interface, XdpMode::Driver) {
            Ok(link) => {
                self.links.push(link);
                return Ok(AttachMode::Native);
            }
            Err(e) => e,
        };
        match program.attach(interface, XdpMode::Skb) {
            Ok(link) => {
                self.links.push(link);
                Ok(AttachMode::Generic)
            }
            Err(generic) => Err(DatapathError::Attach {
                interface: interface.to_string(),
                native: Box::new(native),
                generic: Box::new(generic),
            }),
        }
    }

    /// Detaches from every interface and removes every pin.
    pub fn detach_all(&mut self) -> Result<(), DatapathError> {
        if let Some(dir) = &self.pin_dir {
            unpin_all(dir).map_err(|e| DatapathError::Pin {
                path: dir.clone(),
                message: e.to_string(),
            })?;
            // The base directory goes too once no other layout's pins are left in it.
            if let Some(base) = dir.parent() {
                let _ = std::fs::remove_dir(base);
            }
        }
        // Dropping the last descriptor of an unpinned link detaches it.
        self.pinned.clear();
        let links = std::mem::take(&mut self.links);
        let program = self.program_mut()?;
        for link in links {
            program.detach(link)?;
        }
        Ok(())
    }

    /// Loads the do-nothing program shipped beside the data path: the benchmarks' floor.
    pub fn load_noop(&mut self) -> Result<(), DatapathError> {
        self.load_once(NOOP_PROGRAM_NAME).map(|_| ())
    }

    /// One of the object's other programs, loaded into the kernel if it is not yet.
    fn load_once(&mut self, name: &str) -> Result<&mut Xdp, DatapathError> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        if program.fd().is_err() {
            program.load()?;
        }
        Ok(program)
    }

    /// The do-nothing program (after [`Datapath::load_noop`]).
    pub fn noop_program(&self) -> Result<&Xdp, DatapathError> {
        Ok(self
            .ebpf
            .program(NOOP_PROGRAM_NAME)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?)
    }

    /// Loads the benchmark wrapper (once) and points it at the data path, or at the
    /// do-nothing program (`noop`, loaded as needed), with `frame` (its first
    /// [`lbaas_common::BENCH_FRAME_BYTES`] bytes) to write over the packet before each run;
    /// `fresh_source` gives each run a source address of its own (a new flow per run).
    /// Returns the wrapper, to be run with `BPF_PROG_TEST_RUN` on frames of that length or more.
    pub fn bench_wrapper(
        &mut self,
        frame: &[u8],
        fresh_source: bool,
        noop: bool,
    ) -> Result<&Xdp, DatapathError> {
        let mut bytes = [0u8; lbaas_common::BENCH_FRAME_BYTES];
        let restored = frame
            .get(..bytes.len())
            .ok_or(DatapathError::ShortBenchFrame(frame.len()))?;
        bytes.copy_from_slice(restored);
        let mut frames: Array<&mut MapData, lbaas_common::BenchFrame> = Array::try_from(
            self.ebpf
                .map_mut(lbaas_common::MAP_BENCH_FRAME)
                .ok_or(DatapathError::MissingMap(lbaas_common::MAP_BENCH_FRAME))?,
        )
        .map_err(map_error(lbaas_common::MAP_BENCH_FRAME))?;
        // The run count carries on, so that a new target sees new flows too.
        let runs = frames.get(&0, 0).map_or(0, |f| f.runs);
        let value = lbaas_common::BenchFrame {
            bytes,
            fresh_source: u8::from(fresh_source),
            _pad: 0,
            runs,
        };
        frames
            .set(0, value, 0)
            .map_err(map_error(lbaas_common::MAP_BENCH_FRAME))?;
        if noop {
            self.load_noop()?;
        }
        let target = if noop {
            self.noop_program()?
        } else {
            self.program()?
        };
        let target = target.fd()?.try_clone().map_err(ProgramError::from)?;
        let mut jumps = ProgramArray::try_from(
            self.ebpf
                .map_mut(lbaas_common::MAP_BENCH_TARGET)
                .ok_or(DatapathError::MissingMap(lbaas_common::MAP_BENCH_TARGET))?,
        )
        .map_err(map_error(lbaas_common::MAP_BENCH_TARGET))?;
        jumps
            .set(0, &target, 0)
            .map_err(map_error(lbaas_common::MAP_BENCH_TARGET))?;
        Ok(self.load_once(BENCH_PROGRAM_NAME)?)
    }

    /// The program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> Result<&Xdp, DatapathError> {
        Ok(self
            .ebpf
            .program(PROGRAM_NAME)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?)
    }

    fn program_mut(&mut self) -> Result<&mut Xdp, DatapathError> {
        Ok(self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?)
    }

    /// The map writer.
    pub fn tables(&mut self) -> &mut KernelTables {
        &mut self.tables
    }

    /// Global counters (`STAT_*`), summed over CPUs.
    pub fn global_stats(&self) -> Result<[u64; STAT_COUNT as usize], DatapathError> {
        let map: PerCpuArray<&MapData, u64> = self.per_cpu(MAP_GLOBAL_STATS)?;
        let mut out = [0u64; STAT_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = map
                .get(&(i as u32), 0)
                .map_err(map_error(MAP_GLOBAL_STATS))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// A listener's counters, summed over CPUs.
    pub fn listener_stats(&self, listener_id: u32) -> Result<ListenerStats, DatapathError> {
        self.summed(MAP_LISTENER_STATS, listener_id)
    }

    /// A member's counters, summed over CPUs (`refused` stays zero: refusals are per listener).
    pub fn member_stats(&self, member_id: u32) -> Result<ListenerStats, DatapathError> {
        let name = lbaas_common::MAP_MEMBER_STATS;
        let values = self
            .tables
            .member_stats
            .get(&member_id, 0)
            .map_err(map_error(name))?;
        Ok(sum_stats(&values))
    }

    fn summed(&self, name: &'static str, index: u32) -> Result<ListenerStats, DatapathError> {
        let map: PerCpuArray<&MapData, ListenerStats> = self.per_cpu(name)?;
        let values = map.get(&index, 0).map_err(map_error(name))?;
        Ok(sum_stats(&values))
    }

    /// Active flows of a member id, or of `MAX_MEMBERS + listener id`: opened - closed -
    /// expired, as the data path counts them.
    pub fn active_flows(&self, slot: u32) -> Result<u64, DatapathError> {
        self.tables.active(slot).map_err(map_error(MAP_CONNS))
    }

    /// Entries in the connection table (a full scan; for tests and diagnostics).
    pub fn flow_count(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
    }

    /// Entries in the half-open table and in its reverse table (full scans; for tests and
    /// diagnostics). A half-open flow has a reverse entry only if its member's endpoint
    /// serves more than one listener (or its SYN was retransmitted).
    pub fn half_open_counts(&self) -> Result<(usize, usize), DatapathError> {
        Ok((
            self.entries::<lbaas_common::HalfOpen>(lbaas_common::MAP_HALF_OPEN)?,
            self.entries::<ReverseNat>(lbaas_common::MAP_HALF_OPEN_REVERSE)?,
        ))
    }

    fn entries<V: aya::Pod>(&self, name: &'static str) -> Result<usize, DatapathError> {
        let map = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        let table = HashMap::<_, FlowKey, V>::try_from(map).map_err(map_error(name))?;
        Ok(table.keys().filter(Result::is_ok).count())
    }

    /// Removes idle UDP flows and lingering closed TCP flows, both directions, and counts the
    /// removed open flows as expired so least-connections and limits stop counting them.
    /// Established TCP flows are never expired here, however idle: removing one would move
    /// a live connection to another member (the LRU evicts under pressure instead).
    pub fn expire_flows(
        &mut self,
        now_ns: u64,
        policy: &ExpiryPolicy,
    ) -> Result<SweepReport, DatapathError> {
        let keys: Vec<FlowKey> = self.conntrack.keys().filter_map(Result::ok).collect();
        let mut report = SweepReport {
            scanned: keys.len(),
            removed: 0,
        };
        for key in keys {
            let Ok(state) = self.conntrack.get(&key, 0) else {
                continue;
            };
            let idle = now_ns.saturating_sub(state.last_seen_ns);
            let closed = state.state & FLOW_CLOSED != 0;
            let limit = if closed {
                policy.closed_linger
            } else if key.proto == IPPROTO_UDP {
                policy.udp_idle
            } else {
                continue;
            };
            if idle <= limit.as_nanos() as u64 {
                continue;
            }
            if self.conntrack.remove(&key).is_err() {
                continue; // evicted or removed meanwhile
            }
            report.removed += 1;
            let member = self.tables.members.get(&state.member_id, 0).ok();
            let current = member.filter(|m| m.generation == state.member_generation && m.addr != 0);
            if let Some(member) = current {
                let reply = FlowKey::new(
                    member.addr,
                    key.src_addr,
                    member.port,
                    key.src_port,
                    key.proto,
                );
                let _ = self.reverse.remove(&reply);
            }
            if !closed {
                if current.is_some() {
                    self.tables.add_expired(state.member_id)?;
                }
                self.tables.add_expired(MAX_MEMBERS + state.listener_id)?;
            }
        }
        Ok(report)
    }

    fn per_cpu<'a, V: aya::Pod>(
        &'a self,
        name: &'static str,
    ) -> Result<PerCpuArray<&'a MapData, V>, DatapathError> {
        let map = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        PerCpuArray::try_from(map).map_err(map_error(name))
    }
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> TableError {
    move |e| TableError::Map {
        map,
        message: e.to_string(),
    }
}

impl KernelTables {
    /// Open flows of a counter slot: opened - closed - expired.
    fn active(&self, slot: u32) -> Result<u64, MapError> {
        let counters = self.conns.get(&slot, 0)?;
        let expired = self.expired.get(&slot, 0)?;
        Ok(counters
            .opened
            .saturating_sub(counters.closed)
            .saturating_sub(expired))
    }

    /// Adds one to an expired counter (the controller is its only writer).
    fn add_expired(&mut self, slot: u32) -> Result<(), DatapathError> {
        let value = self.expired.get(&slot, 0).map_err(map_error(MAP_EXPIRED))?;
        self.expired
            .set(slot, value + 1, 0)
            .map_err(map_error(MAP_EXPIRED))
    }
}

impl Tables for KernelTables {
    fn set_member(&mut self, id: u32, info: MemberInfo) -> Result<(), TableError> {
        self.members.set(id, info, 0).map_err(map_err(MAP_MEMBERS))
    }

    fn set_ring(&mut self, base: u32, member_ids: &[u32]) -> Result<(), TableError> {
        for (i, id) in member_ids.iter().enumerate() {
            self.ring
                .set(base + i as u32, id, 0)
                .map_err(map_err(MAP_RING))?;
        }
        Ok(())
    }

    fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), TableError> {
        self.vips.insert(key, info, 0).map_err(map_err(MAP_VIPS))
    }

    fn remove_vip(&mut self, key: VipKey) -> Result<(), TableError> {
        if self.vips.get(&key, 0).is_err() {
            return Ok(());
        }
        self.vips.remove(&key).map_err(map_err(MAP_VIPS))
    }

    fn reset_counter(&mut self, listener_id: u32) -> Result<(), TableError> {
        self.rr.set(listener_id, 0, 0).map_err(map_err(MAP_RR))
    }

    fn active_flows(&mut self, slot: u32) -> Result<u64, TableError> {
        self.active(slot).map_err(map_err(MAP_CONNS))
    }

    fn get_member(&mut self, id: u32) -> Result<MemberInfo, TableError> {
        self.members.get(&id, 0).map_err(map_err(MAP_MEMBERS))
    }

    fn get_vip(&mut self, key: VipKey) -> Result<Option<VipInfo>, TableError> {
        match self.vips.get(&key, 0) {
            Ok(info) => Ok(Some(info)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(MAP_VIPS)(e)),
        }
    }

    fn set_member_vip(
        &mut self,
        endpoint: lbaas_common::Endpoint,
        vip: Option<VipKey>,
    ) -> Result<(), TableError> {
        let name = lbaas_common::MAP_MEMBER_VIPS;
        match vip {
            Some(vip) => self
                .member_vips
                .insert(endpoint, vip, 0)
                .map_err(map_err(name)),
            None if self.member_vips.get(&endpoint, 0).is_err() => Ok(()),
            None => self.member_vips.remove(&endpoint).map_err(map_err(name)),
        }
    }

    fn get_member_vip(
        &mut self,
        endpoint: lbaas_common::Endpoint,
    ) -> Result<Option<VipKey>, TableError> {
        match self.member_vips.get(&endpoint, 0) {
            Ok(vip) => Ok(Some(vip)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(lbaas_common::MAP_MEMBER_VIPS)(e)),
        }
    }

    fn set_vip_filter(&mut self, slot: u32, count: u32) -> Result<(), TableError> {
        self.vip_filter
            .set(slot, count, 0)
            .map_err(map_err(lbaas_common::MAP_VIP_FILTER))
    }

    fn get_vip_filter(&mut self, slot: u32) -> Result<u32, TableError> {
        self.vip_filter
            .get(&slot, 0)
            .map_err(map_err(lbaas_common::MAP_VIP_FILTER))
    }

    fn set_source_allowed(
        &mut self,
        listener_id: u32,
        source: SourceCidr,
        allowed: bool,
    ) -> Result<(), TableError> {
        let key = TrieKey::new(
            SourcePrefix::trie_prefix_len(source.len),
            SourcePrefix {
                listener_id,
                addr: u32::from_ne_bytes(source.addr.octets()),
            },
        );
        let result = if allowed {
            self.allowed_sources.insert(&key, 1, 0)
        } else {
            match self.allowed_sources.remove(&key) {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            }
        };
        result.map_err(map_err(lbaas_common::MAP_ALLOWED_SOURCES))
    }

    fn reset_conn_counters(&mut self, slot: u32) -> Result<(), TableError> {
        if slot < MAX_MEMBERS {
            // A reused member id starts its traffic counters afresh too.
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| TableError::Map {
                map: lbaas_common::MAP_MEMBER_STATS,
                message: e.to_string(),
            })?;
            let zeros = aya::maps::PerCpuValues::try_from(vec![ListenerStats::default(); cpus])
                .map_err(|e| TableError::Map {
                    map: lbaas_common::MAP_MEMBER_STATS,
                    message: e.to_string(),
                })?;
            self.member_stats
                .set(slot, zeros, 0)
                .map_err(map_err(lbaas_common::MAP_MEMBER_STATS))?;
        }
        self.expired.set(slot, 0, 0).map_err(map_err(MAP_EXPIRED))?;
        self.conns
            .set(slot, FlowCounters::default(), 0)
            .map_err(map_err(MAP_CONNS))
    }
}
