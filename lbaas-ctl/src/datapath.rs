//! The XDP program in the kernel: loading, attaching, and the map writer behind
//! [`compile::Tables`](crate::compile::Tables).

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use lbaas_common::{
    FlowCounters, ListenerStats, MAP_CONNS, MAP_CONNTRACK, MAP_EXPIRED, MAP_GLOBAL_STATS,
    MAP_LISTENER_STATS, MAP_MEMBERS, MAP_REVERSE, MAP_RING, MAP_RR, MAP_VIPS, MemberInfo,
    STAT_COUNT, VipInfo, VipKey,
};

use crate::compile::{TableError, Tables};

/// The XDP object built by `build.rs` from `lbaas-ebpf`.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lbaas"));

/// Name of the XDP entry point in the object.
pub const PROGRAM_NAME: &str = "lbaas_xdp";

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
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Entries in each of the connection and reverse-NAT tables.
    pub conntrack_size: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_size: lbaas_common::DEFAULT_CONNTRACK_SIZE,
        }
    }
}

/// How the program got attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native XDP in the driver.
    Native,
    /// Generic XDP in the network stack (the driver has no native XDP).
    Generic,
}

/// The loaded program and typed handles on its maps.
pub struct Datapath {
    ebpf: Ebpf,
    tables: KernelTables,
    links: Vec<XdpLinkId>,
}

/// The map writer over the kernel's maps.
pub struct KernelTables {
    vips: HashMap<MapData, VipKey, VipInfo>,
    members: Array<MapData, MemberInfo>,
    ring: Array<MapData, u32>,
    rr: Array<MapData, u64>,
    conns: Array<MapData, FlowCounters>,
    expired: Array<MapData, u64>,
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
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_CONNTRACK, options.conntrack_size)
            .map_max_entries(MAP_REVERSE, options.conntrack_size)
            .load(PROGRAM_OBJECT)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        program.load()?;
        let tables = KernelTables {
            vips: take(&mut ebpf, MAP_VIPS)?,
            members: take(&mut ebpf, MAP_MEMBERS)?,
            ring: take(&mut ebpf, MAP_RING)?,
            rr: take(&mut ebpf, MAP_RR)?,
            conns: take(&mut ebpf, MAP_CONNS)?,
            expired: take(&mut ebpf, MAP_EXPIRED)?,
        };
        Ok(Self {
            ebpf,
            tables,
            links: Vec::new(),
        })
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

    /// Detaches from every interface.
    pub fn detach_all(&mut self) -> Result<(), DatapathError> {
        let links = std::mem::take(&mut self.links);
        let program = self.program_mut()?;
        for link in links {
            program.detach(link)?;
        }
        Ok(())
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
        let map: PerCpuArray<&MapData, ListenerStats> = self.per_cpu(MAP_LISTENER_STATS)?;
        let values = map
            .get(&listener_id, 0)
            .map_err(map_error(MAP_LISTENER_STATS))?;
        Ok(values.iter().fold(ListenerStats::default(), |mut sum, v| {
            sum.packets_in += v.packets_in;
            sum.bytes_in += v.bytes_in;
            sum.packets_out += v.packets_out;
            sum.bytes_out += v.bytes_out;
            sum.new_flows += v.new_flows;
            sum.refused += v.refused;
            sum
        }))
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

    fn reset_conn_counters(&mut self, slot: u32) -> Result<(), TableError> {
        self.expired.set(slot, 0, 0).map_err(map_err(MAP_EXPIRED))?;
        self.conns
            .set(slot, FlowCounters::default(), 0)
            .map_err(map_err(MAP_CONNS))
    }
}
