//! From desired state to data-path tables: the controller computes, the kernel only looks up.
//!
//! [`desired`] turns a validated [`Config`] into per-listener plans (VIP key, flags, and the
//! weighted round-robin schedule over the pool's usable members). [`Programmer`] keeps what is
//! live in the kernel and moves it to a new plan through the [`Tables`] trait in a
//! make-before-break order: new members first, each changed schedule written into a free ring
//! region beside the live one and switched with one VIP-table write, removals last.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use lbaas_common::{
    ALGO_LEAST_CONNECTIONS, ALGO_MAGLEV_5TUPLE, ALGO_MAGLEV_SOURCE, ALGO_ROUND_ROBIN, Endpoint,
    IPPROTO_TCP, MAX_LISTENERS, MAX_MEMBERS, MEMBER_F_SOLE_VIP, MemberInfo, RING_SLOTS,
    VIP_F_L7_PASS, VIP_F_SOURCE_FILTER, VipInfo, VipKey, vip_filter_slot,
};

use crate::{
    config::{Config, LbAlgorithm, PersistenceType, Pool, parse_cidr},
    maglev,
};

/// Identity of a listener: load balancer and listener names.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ListenerRef {
    /// Load balancer name.
    pub loadbalancer: String,
    /// Listener name.
    pub listener: String,
}

/// Identity of a member: load balancer, pool, address and port.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct MemberRef {
    /// Load balancer name.
    pub loadbalancer: String,
    /// Pool name.
    pub pool: String,
    /// Member address.
    pub addr: Ipv4Addr,
    /// Member port.
    pub port: u16,
}

/// What one listener needs in the data path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerPlan {
    /// VIP table key.
    pub vip: VipKey,
    /// `VIP_F_*` flags.
    pub flags: u32,
    /// `ALGO_*`.
    pub algorithm: u32,
    /// Most concurrent flows, 0 for unlimited.
    pub conn_limit: u32,
    /// Source prefixes admitted (`allowed_cidrs`); empty admits every source. Sorted.
    pub allowed: Vec<SourceCidr>,
    /// The listener's ring region: the round-robin schedule, the least-connections candidate
    /// list or the Maglev table, by `algorithm`. Empty refuses new connections.
    pub slots: Vec<MemberRef>,
}

/// The data path a configuration asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredTables {
    /// Every listener, including those with no usable member.
    pub listeners: BTreeMap<ListenerRef, ListenerPlan>,
    /// Every member of every pool a listener uses, with its weight (drained and disabled ones
    /// too, so that established flows keep their member).
    pub members: BTreeMap<MemberRef, MemberSpec>,
}

/// An IPv4 source prefix of `allowed_cidrs`, host bits cleared.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct SourceCidr {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length, 0-32.
    pub len: u8,
}

impl SourceCidr {
    /// The prefix of `addr/len` (host bits cleared; `len` above 32 is taken as 32).
    pub fn new(addr: Ipv4Addr, len: u8) -> Self {
        let len = len.min(32);
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        Self {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            len,
        }
    }

    /// The IPv4 prefixes of a listener's `allowed_cidrs`, sorted and without duplicates
    /// (validation refuses anything else, so nothing is skipped in a valid configuration).
    pub fn from_config(cidrs: &[String]) -> Vec<Self> {
        let set: BTreeSet<Self> = cidrs
            .iter()
            .filter_map(|c| match parse_cidr(c)? {
                (std::net::IpAddr::V4(addr), len) => Some(Self::new(addr, len)),
                _ => None,
            })
            .collect();
        set.into_iter().collect()
    }
}

impl std::fmt::Display for SourceCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What the data path holds for one member.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemberSpec {
    /// Weight, 0-256.
    pub weight: u32,
    /// Failed its health checks: out of selection, and flows pinned to it are rescheduled.
    pub down: bool,
}

/// Compiler settings that are not part of the YAML model.
#[derive(Clone, Copy, Debug, Default)]
pub struct CompileOptions {
    /// Maglev table size for every pool (a prime); `None` sizes each table by its pool
    /// ([`maglev::default_table_size`]).
    pub maglev_table_size: Option<u32>,
}

/// The data-path algorithm of a pool: SOURCE_IP persistence makes any pool SOURCE_IP.
pub fn algorithm(pool: &Pool) -> u32 {
    let sticky = pool
        .session_persistence
        .as_ref()
        .is_some_and(|sp| sp.persistence_type == PersistenceType::SourceIp);
    match pool.lb_algorithm {
        _ if sticky => ALGO_MAGLEV_SOURCE,
        LbAlgorithm::SourceIp => ALGO_MAGLEV_SOURCE,
        LbAlgorithm::SourceIpPort => ALGO_MAGLEV_5TUPLE,
        LbAlgorithm::LeastConnections => ALGO_LEAST_CONNECTIONS,
        LbAlgorithm::RoundRobin | LbAlgorithm::Invalid(_) => ALGO_ROUND_ROBIN,
    }
}

/// The ring region of a pool's usable members (with weights > 0) for an algorithm.
fn slots(algorithm: u32, usable: &[(MemberRef, u32)], options: CompileOptions) -> Vec<MemberRef> {
    match algorithm {
        ALGO_MAGLEV_SOURCE | ALGO_MAGLEV_5TUPLE => {
            let backends: Vec<maglev::Backend> = usable
                .iter()
                .map(|(m, w)| {
                    let mut id = m.addr.octets().to_vec();
                    id.extend_from_slice(&m.port.to_be_bytes());
                    maglev::Backend { id, weight: *w }
                })
                .collect();
            let size = options
                .maglev_table_size
                .unwrap_or_else(|| maglev::default_table_size(usable.len()));
            maglev::build(&backends, size)
                .into_iter()
                .map(|i| usable[i].0.clone())
                .collect()
        }
        ALGO_LEAST_CONNECTIONS => {
            let mut candidates: Vec<MemberRef> = usable.iter().map(|(m, _)| m.clone()).collect();
            candidates.sort();
            candidates
        }
        _ => {
            let weights: Vec<u32> = usable.iter().map(|(_, w)| *w).collect();
            weighted_schedule(&weights)
                .into_iter()
                .map(|i| usable[i].0.clone())
                .collect()
        }
    }
}

/// Computes the data-path tables of a validated configuration.
/// Members whose health checks failed are in `down`: they get no new flows, and when every
/// other member of a pool is unusable its `backup: true` members take over.
pub fn desired(
    config: &Config,
    options: CompileOptions,
    down: &BTreeSet<MemberRef>,
) -> DesiredTables {
    let mut out = DesiredTables::default();
    for lb in &config.loadbalancers {
        let Some(vip) = lb.vip() else { continue };
        for listener in &lb.listeners {
            let Ok(port) = u16::try_from(listener.protocol_port) else {
                continue;
            };
            let pool = listener
                .default_pool
                .as_deref()
                .and_then(|name| lb.pool(name));
            let mut region = Vec::new();
            let mut algo = ALGO_ROUND_ROBIN;
            if let Some(pool) = pool {
                algo = algorithm(pool);
                let (mut usable, mut backups) = (Vec::new(), Vec::new());
                for member in &pool.members {
                    let (Some(addr), Ok(port)) =
                        (member.ipv4(), u16::try_from(member.protocol_port))
                    else {
                        continue;
                    };
                    let member_ref = MemberRef {
                        loadbalancer: lb.name.clone(),
                        pool: pool.name.clone(),
                        addr,
                        port,
                    };
                    let weight = member.weight.clamp(0, 256) as u32;
                    let is_down = down.contains(&member_ref);
                    out.members.insert(
                        member_ref.clone(),
                        MemberSpec {
                            weight,
                            down: is_down,
                        },
                    );
                    if member.admin_state_up && weight > 0 && !is_down {
                        if member.backup {
                            backups.push((member_ref, weight));
                        } else {
                            usable.push((member_ref, weight));
                        }
                    }
                }
                if usable.is_empty() {
                    usable = backups;
                }
                // L7 listeners' packets go to the proxy: no selection table in the kernel.
                let enabled = lb.admin_state_up
                    && listener.admin_state_up
                    && pool.admin_state_up
                    && listener.protocol.is_l4();
                if enabled {
                    region = slots(algo, &usable, options);
                }
            }
            // L7 listeners filter sources at accept, in the proxy.
            let allowed = if listener.protocol.is_l4() {
                SourceCidr::from_config(&listener.allowed_cidrs)
            } else {
                Vec::new()
            };
            let flags = match (listener.protocol.is_l4(), allowed.is_empty()) {
                (false, _) => VIP_F_L7_PASS,
                (true, false) => VIP_F_SOURCE_FILTER,
                (true, true) => 0,
            };
            out.listeners.insert(
                ListenerRef {
                    loadbalancer: lb.name.clone(),
                    listener: listener.name.clone(),
                },
                ListenerPlan {
                    vip: VipKey {
                        addr: u32::from_ne_bytes(vip.octets()),
                        port: port.to_be(),
                        proto: listener.protocol.ip_protocol(),
                        _pad: 0,
                    },
                    flags,
                    algorithm: algo,
                    conn_limit: u32::try_from(listener.connection_limit).unwrap_or(0),
                    allowed,
                    slots: region,
                },
            );
        }
    }
    out
}

/// VIP filter counts of a set of VIP keys (each key counted once).
fn filter_counts(keys: impl Iterator<Item = VipKey>) -> BTreeMap<u32, u32> {
    let unique: BTreeSet<VipKey> = keys.collect();
    let mut counts = BTreeMap::new();
    for key in unique {
        *counts.entry(vip_filter_slot(key.addr)).or_insert(0) += 1;
    }
    counts
}

/// The member endpoints that serve exactly one TCP listener of the data path, with its VIP
/// key, and the schedule entries (member refs or ids) to flag [`MEMBER_F_SOLE_VIP`]: a function
/// of the schedules alone, so a restarted programmer computes what its predecessor wrote.
struct SoleEndpoints<T> {
    vips: BTreeMap<Endpoint, VipKey>,
    members: BTreeSet<T>,
}

impl<T: Ord + Clone> SoleEndpoints<T> {
    /// From each listener's VIP key, `VIP_F_*` flags and schedule; `endpoint` names an entry's
    /// member endpoint.
    fn of<'a>(
        listeners: impl Iterator<Item = (VipKey, u32, &'a [T])> + Clone,
        endpoint: impl Fn(&T) -> Endpoint,
    ) -> Self
    where
        T: 'a,
    {
        // Only TCP listeners the XDP path serves have half-open flows.
        let served = listeners
            .filter(|(vip, flags, _)| vip.proto == IPPROTO_TCP && flags & VIP_F_L7_PASS == 0);
        let mut served_by: BTreeMap<Endpoint, BTreeSet<VipKey>> = BTreeMap::new();
        for (vip, _, schedule) in served.clone() {
            for entry in schedule {
                served_by.entry(endpoint(entry)).or_default().insert(vip);
            }
        }
        let vips: BTreeMap<Endpoint, VipKey> = served_by
            .into_iter()
            .filter(|(_, vips)| vips.len() == 1)
            .filter_map(|(endpoint, vips)| Some((endpoint, *vips.first()?)))
            .collect();
        let members = served
            .flat_map(|(_, _, schedule)| schedule)
            .filter(|entry| vips.contains_key(&endpoint(entry)))
            .cloned()
            .collect();
        Self { vips, members }
    }
}

/// The endpoint of a member as the data path sees its packets.
fn member_endpoint(info: &MemberInfo) -> Endpoint {
    VipKey {
        addr: info.addr,
        port: info.port,
        proto: IPPROTO_TCP,
        _pad: 0,
    }
}

/// The same, from the member's identity.
fn ref_endpoint(member: &MemberRef) -> Endpoint {
    VipKey {
        addr: u32::from_ne_bytes(member.addr.octets()),
        port: member.port.to_be(),
        proto: IPPROTO_TCP,
        _pad: 0,
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Smooth weighted round robin (as nginx does it): returns member indices in the order new
/// connections get them. The cycle is `sum(weights) / gcd(weights)` long, each member appears
/// `weight / gcd` times, and a heavy member's turns are spread out rather than bunched.
/// Zero weights are left out.
pub fn weighted_schedule(weights: &[u32]) -> Vec<usize> {
    let g = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd);
    if g == 0 {
        return Vec::new();
    }
    let reduced: Vec<i64> = weights.iter().map(|w| i64::from(w / g)).collect();
    let total: i64 = reduced.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = usize::MAX;
        for (i, w) in reduced.iter().enumerate() {
            if *w == 0 {
                continue;
            }
            current[i] += w;
            if best == usize::MAX || current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    out
}

/// Writes to the kernel tables. Implemented over aya maps by `datapath`, and in memory for
/// tests of the reconciler.
pub trait Tables {
    /// Sets a member slot.
    fn set_member(&mut self, id: u32, info: MemberInfo) -> Result<(), TableError>;
    /// Writes member ids into consecutive ring slots from `base`.
    fn set_ring(&mut self, base: u32, member_ids: &[u32]) -> Result<(), TableError>;
    /// Creates or replaces a VIP entry (the single write that switches a listener).
    fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), TableError>;
    /// Removes a VIP entry.
    fn remove_vip(&mut self, key: VipKey) -> Result<(), TableError>;
    /// Resets a listener's round-robin counter (a reused id starts afresh).
    fn reset_counter(&mut self, listener_id: u32) -> Result<(), TableError>;
    /// Zeroes a member's or listener's flow counters (`MAP_CONNS` slot) before its id is
    /// (re)used.
    fn reset_conn_counters(&mut self, slot: u32) -> Result<(), TableError>;
    /// Open flows of a member id (or `MAX_MEMBERS + listener id`) as the data path counts them.
    fn active_flows(&mut self, slot: u32) -> Result<u64, TableError>;
    /// Reads a member slot (for undo).
    fn get_member(&mut self, id: u32) -> Result<MemberInfo, TableError>;
    /// Reads a VIP entry (for undo); `None` when absent.
    fn get_vip(&mut self, key: VipKey) -> Result<Option<VipInfo>, TableError>;
    /// Sets (or, with `None`, removes) the one TCP listener a member endpoint serves.
    fn set_member_vip(&mut self, endpoint: Endpoint, vip: Option<VipKey>)
    -> Result<(), TableError>;
    /// Reads a member endpoint's listener (for undo); `None` when absent.
    fn get_member_vip(&mut self, endpoint: Endpoint) -> Result<Option<VipKey>, TableError>;
    /// Sets a VIP address filter slot's count.
    fn set_vip_filter(&mut self, slot: u32, count: u32) -> Result<(), TableError>;
    /// Reads a VIP address filter slot's count (for undo).
    fn get_vip_filter(&mut self, slot: u32) -> Result<u32, TableError>;
    /// Admits a source prefix for a listener's new flows, or (`allowed` false) stops.
    fn set_source_allowed(
        &mut self,
        listener_id: u32,
        source: SourceCidr,
        allowed: bool,
    ) -> Result<(), TableError>;
}

/// One write to take back.
#[derive(Debug, Clone, Copy)]
enum Undo {
    Member(u32, MemberInfo),
    Vip(VipKey, Option<VipInfo>),
    MemberVip(Endpoint, Option<VipKey>),
    /// The programmer writes only changes, so taking one back is writing its opposite.
    Source(u32, SourceCidr, bool),
    Filter(u32, u32),
}

/// Records what every member and VIP write replaces, so a failed apply can be taken back.
/// Ring writes need no undo (they go to regions nothing points at); counter resets concern
/// ids nothing uses yet.
struct UndoLog<'a> {
    inner: &'a mut dyn Tables,
    log: Vec<Undo>,
}

impl UndoLog<'_> {
    /// Writes back what was replaced, newest first. Returns the first error, if any.
    fn roll_back(mut self) -> Result<(), TableError> {
        let mut first = Ok(());
        while let Some(undo) = self.log.pop() {
            let result = match undo {
                Undo::Member(id, info) => self.inner.set_member(id, info),
                Undo::Vip(key, Some(info)) => self.inner.set_vip(key, info),
                Undo::Vip(key, None) => self.inner.remove_vip(key),
                Undo::MemberVip(endpoint, vip) => self.inner.set_member_vip(endpoint, vip),
                Undo::Source(id, source, allowed) => {
                    self.inner.set_source_allowed(id, source, !allowed)
                }
                Undo::Filter(slot, count) => self.inner.set_vip_filter(slot, count),
            };
            if first.is_ok() {
                first = result;
            }
        }
        first
    }
}

impl Tables for UndoLog<'_> {
    fn set_member(&mut self, id: u32, info: MemberInfo) -> Result<(), TableError> {
        let old = self.inner.get_member(id)?;
        self.inner.set_member(id, info)?;
        self.log.push(Undo::Member(id, old));
        Ok(())
    }
    fn set_ring(&mut self, base: u32, member_ids: &[u32]) -> Result<(), TableError> {
        self.inner.set_ring(base, member_ids)
    }
    fn set_vip(&mut self, key: VipKey, info: VipInfo) -> Result<(), TableError> {
        let old = self.inner.get_vip(key)?;
        self.inner.set_vip(key, info)?;
        self.log.push(Undo::Vip(key, old));
        Ok(())
    }
    fn remove_vip(&mut self, key: VipKey) -> Result<(), TableError> {
        let old = self.inner.get_vip(key)?;
        self.inner.remove_vip(key)?;
        self.log.push(Undo::Vip(key, old));
        Ok(())
    }
    fn reset_counter(&mut self, listener_id: u32) -> Result<(), TableError> {
        self.inner.reset_counter(listener_id)
    }
    fn reset_conn_counters(&mut self, slot: u32) -> Result<(), TableError> {
        self.inner.reset_conn_counters(slot)
    }
    fn active_flows(&mut self, slot: u32) -> Result<u64, TableError> {
        self.inner.active_flows(slot)
    }
    fn get_member(&mut self, id: u32) -> Result<MemberInfo, TableError> {
        self.inner.get_member(id)
    }
    fn get_vip(&mut self, key: VipKey) -> Result<Option<VipInfo>, TableError> {
        self.inner.get_vip(key)
    }
    fn set_member_vip(
        &mut self,
        endpoint: Endpoint,
        vip: Option<VipKey>,
    ) -> Result<(), TableError> {
        let old = self.inner.get_member_vip(endpoint)?;
        self.inner.set_member_vip(endpoint, vip)?;
        self.log.push(Undo::MemberVip(endpoint, old));
        Ok(())
    }
    fn get_member_vip(&mut self, endpoint: Endpoint) -> Result<Option<VipKey>, TableError> {
        self.inner.get_member_vip(endpoint)
    }
    fn set_vip_filter(&mut self, slot: u32, count: u32) -> Result<(), TableError> {
        let old = self.inner.get_vip_filter(slot)?;
        self.inner.set_vip_filter(slot, count)?;
        self.log.push(Undo::Filter(slot, old));
        Ok(())
    }
    fn get_vip_filter(&mut self, slot: u32) -> Result<u32, TableError> {
        self.inner.get_vip_filter(slot)
    }
    fn set_source_allowed(
        &mut self,
        listener_id: u32,
        source: SourceCidr,
        allowed: bool,
    ) -> Result<(), TableError> {
        self.inner
            .set_source_allowed(listener_id, source, allowed)?;
        self.log.push(Undo::Source(listener_id, source, allowed));
        Ok(())
    }
}

/// A failed table write or a exhausted table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// A kernel map write failed.
    #[error("writing map {map} failed: {message}")]
    Map {
        /// Map name.
        map: &'static str,
        /// The kernel's error.
        message: String,
    },
    /// More listeners than the data path holds.
    #[error("too many listeners: the data path holds {MAX_LISTENERS}")]
    TooManyListeners,
    /// More members than the data path holds.
    #[error("too many members: the data path holds {MAX_MEMBERS}")]
    TooManyMembers,
    /// The schedules do not fit in the ring.
    #[error(
        "selection ring full: listener {listener} needs {needed} slots, {free} are free of {RING_SLOTS}"
    )]
    RingFull {
        /// The listener.
        listener: String,
        /// Slots needed.
        needed: u32,
        /// Largest free region.
        free: u32,
    },
}

/// Hands out small integer ids: never-used ones first, then the lowest freed one. An id
/// given back is taken again as late as possible, because flows in the kernel may still
/// carry it (a removed listener's established flows finish, counted under its id).
#[derive(Debug, Clone)]
struct IdPool {
    free: BTreeSet<u32>,
    next: u32,
    max: u32,
}

impl IdPool {
    /// A pool where `used` ids are taken.
    fn with_used(max: u32, used: &BTreeSet<u32>) -> Self {
        let next = used.last().map_or(0, |last| last + 1);
        Self {
            free: (0..next).filter(|id| !used.contains(id)).collect(),
            next,
            max,
        }
    }

    fn new(max: u32) -> Self {
        Self {
            free: BTreeSet::new(),
            next: 0,
            max,
        }
    }

    fn take(&mut self) -> Option<u32> {
        if self.next < self.max {
            self.next += 1;
            return Some(self.next - 1);
        }
        self.free.pop_first()
    }

    fn give_back(&mut self, id: u32) {
        self.free.insert(id);
    }
}

/// First-fit allocator of ring regions, coalescing freed neighbours.
#[derive(Debug, Clone)]
struct RingAllocator {
    /// Free regions: start -> length.
    free: BTreeMap<u32, u32>,
}

impl RingAllocator {
    fn new(slots: u32) -> Self {
        Self {
            free: BTreeMap::from([(0, slots)]),
        }
    }

    /// Marks `[start, start + len)` as taken (it must be free).
    fn take_at(&mut self, start: u32, len: u32) {
        let Some((&region, &have)) = self.free.range(..=start).next_back() else {
            return;
        };
        if region + have < start + len {
            return;
        }
        self.free.remove(&region);
        if start > region {
            self.free.insert(region, start - region);
        }
        if region + have > start + len {
            self.free.insert(start + len, region + have - start - len);
        }
    }

    fn largest_free(&self) -> u32 {
        self.free.values().copied().max().unwrap_or(0)
    }

    fn take(&mut self, len: u32) -> Option<u32> {
        let (&start, &have) = self.free.iter().find(|(_, have)| **have >= len)?;
        self.free.remove(&start);
        if have > len {
            self.free.insert(start + len, have - len);
        }
        Some(start)
    }

    fn give_back(&mut self, start: u32, len: u32) {
        if len == 0 {
            return;
        }
        let (mut start, mut len) = (start, len);
        if let Some((&prev, &prev_len)) = self.free.range(..start).next_back()
            && prev + prev_len == start
        {
            self.free.remove(&prev);
            start = prev;
            len += prev_len;
        }
        if let Some(next_len) = self.free.remove(&(start + len)) {
            len += next_len;
        }
        self.free.insert(start, len);
    }
}

/// A listener as it is live in the kernel.
#[derive(Debug, Clone)]
struct LiveListener {
    id: u32,
    vip: VipKey,
    info: VipInfo,
    schedule: Vec<u32>,
    allowed: Vec<SourceCidr>,
}

/// What the programmer knows of the kernel tables, saved beside the pinned maps so that a
/// restarted daemon takes over the same ids, generations and ring regions: the flows in the
/// pinned connection table stay valid and an unchanged configuration writes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// Last generation handed out.
    pub generation: u32,
    /// Live members: identity, id, generation, weight, down.
    pub members: Vec<(MemberRef, u32, u32, u32, bool)>,
    /// Draining members: identity, id, generation, weight.
    pub retired: Vec<(MemberRef, u32, u32, u32)>,
    /// Listeners.
    pub listeners: Vec<SnapshotListener>,
}

/// A listener in a [`Snapshot`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotListener {
    /// Identity.
    pub listener: ListenerRef,
    /// Listener id.
    pub id: u32,
    /// VIP address, port and protocol as in the map.
    pub vip: (u32, u16, u8),
    /// `VIP_F_*`.
    pub flags: u32,
    /// `ALGO_*`.
    pub algorithm: u32,
    /// Ring region start.
    pub ring_base: u32,
    /// Connection limit.
    pub conn_limit: u32,
    /// The ring region's member ids.
    pub schedule: Vec<u32>,
    /// Admitted source prefixes (`allowed_cidrs` of an L4 listener).
    #[serde(default)]
    pub allowed: Vec<SourceCidr>,
}

/// What an apply did to the tables, for logs.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProgramSummary {
    /// VIP entries written (new or switched).
    pub vips_written: usize,
    /// VIP entries removed.
    pub vips_removed: usize,
    /// Member slots written.
    pub members_written: usize,
    /// Members taken out of every schedule; they keep serving their open flows.
    pub members_removed: usize,
    /// Removed members whose last flow ended (or whose drain timed out): slot cleared, id free.
    pub members_released: usize,
}

/// A member removed from the configuration that still serves the flows it had.
#[derive(Debug, Clone, Copy)]
struct Retired {
    id: u32,
    info: MemberInfo,
    since: Instant,
}

/// How long a removed member keeps serving its open flows at most (flows the LRU evicted
/// without a FIN never count down, so draining needs an end).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Keeps the kernel tables in step with desired state.
#[derive(Debug, Clone)]
pub struct Programmer {
    listener_ids: IdPool,
    member_ids: IdPool,
    ring: RingAllocator,
    listeners: BTreeMap<ListenerRef, LiveListener>,
    /// Live members: id and what the kernel holds.
    members: BTreeMap<MemberRef, (u32, MemberInfo, bool)>,
    /// Removed members still draining their open flows.
    retired: BTreeMap<MemberRef, Retired>,
    drain_timeout: Duration,
    generation: u32,
    /// Ring regions switched away from in the last apply. A CPU that read the old VIP entry
    /// just before the switch may still be reading them, so they are reused only from the
    /// next apply on.
    quarantined: Vec<(u32, u32)>,
    /// The VIP address filter as written: slot -> count (absent: 0).
    vip_filter: BTreeMap<u32, u32>,
    /// The member endpoint table as written (see [`SoleEndpoints`]).
    member_vips: BTreeMap<Endpoint, VipKey>,
}

impl Default for Programmer {
    fn default() -> Self {
        Self::new()
    }
}

impl Programmer {
    /// A programmer for empty tables.
    pub fn new() -> Self {
        Self {
            listener_ids: IdPool::new(MAX_LISTENERS),
            member_ids: IdPool::new(MAX_MEMBERS),
            ring: RingAllocator::new(RING_SLOTS),
            listeners: BTreeMap::new(),
            members: BTreeMap::new(),
            retired: BTreeMap::new(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            generation: 0,
            quarantined: Vec::new(),
            vip_filter: BTreeMap::new(),
            member_vips: BTreeMap::new(),
        }
    }

    /// What the programmer holds, to save.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            generation: self.generation,
            members: self
                .members
                .iter()
                .map(|(m, (id, info, down))| (m.clone(), *id, info.generation, info.weight, *down))
                .collect(),
            retired: self
                .retired
                .iter()
                .map(|(m, r)| (m.clone(), r.id, r.info.generation, r.info.weight))
                .collect(),
            listeners: self
                .listeners
                .iter()
                .map(|(l, live)| SnapshotListener {
                    listener: l.clone(),
                    id: live.id,
                    vip: (live.vip.addr, live.vip.port, live.vip.proto),
                    flags: live.info.flags,
                    algorithm: live.info.algorithm,
                    ring_base: live.info.ring_base,
                    conn_limit: live.info.conn_limit,
                    schedule: live.schedule.clone(),
                    allowed: live.allowed.clone(),
                })
                .collect(),
        }
    }

    /// A programmer that takes over tables a previous one left (see [`Snapshot`]). Removed
    /// members still draining restart their drain timeout now.
    pub fn restore(snapshot: &Snapshot, drain_timeout: Duration) -> Self {
        let mut p = Self::with_drain_timeout(drain_timeout);
        p.generation = snapshot.generation;
        let member_info = |m: &MemberRef, generation: u32, weight: u32| MemberInfo {
            addr: u32::from_ne_bytes(m.addr.octets()),
            port: m.port.to_be(),
            flags: 0,
            generation,
            weight,
        };
        let mut used_members = BTreeSet::new();
        for (m, id, generation, weight, down) in &snapshot.members {
            p.members.insert(
                m.clone(),
                (*id, member_info(m, *generation, *weight), *down),
            );
            used_members.insert(*id);
        }
        let now = Instant::now();
        for (m, id, generation, weight) in &snapshot.retired {
            let info = member_info(m, *generation, *weight);
            p.retired.insert(
                m.clone(),
                Retired {
                    id: *id,
                    info,
                    since: now,
                },
            );
            used_members.insert(*id);
        }
        p.member_ids = IdPool::with_used(MAX_MEMBERS, &used_members);
        let mut used_listeners = BTreeSet::new();
        let mut ring = RingAllocator::new(RING_SLOTS);
        for l in &snapshot.listeners {
            let len = l.schedule.len() as u32;
            if len > 0 {
                ring.take_at(l.ring_base, len);
            }
            let (addr, port, proto) = l.vip;
            let vip = VipKey {
                addr,
                port,
                proto,
                _pad: 0,
            };
            let info = VipInfo {
                listener_id: l.id,
                flags: l.flags,
                algorithm: l.algorithm,
                ring_base: l.ring_base,
                ring_len: len,
                conn_limit: l.conn_limit,
            };
            p.listeners.insert(
                l.listener.clone(),
                LiveListener {
                    id: l.id,
                    vip,
                    info,
                    schedule: l.schedule.clone(),
                    allowed: l.allowed.clone(),
                },
            );
            used_listeners.insert(l.id);
        }
        p.listener_ids = IdPool::with_used(MAX_LISTENERS, &used_listeners);
        p.ring = ring;
        // What the last apply left in the pinned filter: the live VIPs' counts.
        p.vip_filter = filter_counts(p.listeners.values().map(|l| l.vip));
        // And in the member endpoint table and flags: the same function of the schedules.
        let endpoints: BTreeMap<u32, Endpoint> = p
            .members
            .values()
            .map(|(id, info, _)| (*id, member_endpoint(info)))
            .collect();
        let sole = SoleEndpoints::of(
            p.listeners
                .values()
                .map(|l| (l.vip, l.info.flags, &l.schedule[..])),
            |id| endpoints.get(id).copied().unwrap_or_default(),
        );
        for (id, info, _) in p.members.values_mut() {
            if sole.members.contains(id) {
                info.flags |= MEMBER_F_SOLE_VIP;
            }
        }
        p.member_vips = sole.vips;
        p
    }

    /// Clears [`MEMBER_F_SOLE_VIP`] from the members that keep it neither in `sole` nor for
    /// the same VIP key: before any listener switches, so that no flagged member is in a
    /// schedule of a VIP other than the member endpoint table's.
    fn unflag_members(
        &mut self,
        tables: &mut dyn Tables,
        sole: &SoleEndpoints<MemberRef>,
    ) -> Result<(), TableError> {
        for (member, (id, info, _)) in &mut self.members {
            let endpoint = member_endpoint(info);
            let keeps = sole.members.contains(member)
                && sole.vips.get(&endpoint) == self.member_vips.get(&endpoint);
            if info.flags & MEMBER_F_SOLE_VIP != 0 && !keeps {
                info.flags &= !MEMBER_F_SOLE_VIP;
                tables.set_member(*id, *info)?;
            }
        }
        Ok(())
    }

    /// Writes the member endpoint table (after [`Self::unflag_members`]: no flagged member's
    /// entry changes).
    fn write_member_vips(
        &mut self,
        tables: &mut dyn Tables,
        sole: &SoleEndpoints<MemberRef>,
    ) -> Result<(), TableError> {
        let gone: Vec<Endpoint> = self
            .member_vips
            .keys()
            .filter(|e| !sole.vips.contains_key(e))
            .copied()
            .collect();
        for endpoint in gone {
            tables.set_member_vip(endpoint, None)?;
            self.member_vips.remove(&endpoint);
        }
        for (endpoint, vip) in &sole.vips {
            if self.member_vips.get(endpoint) != Some(vip) {
                tables.set_member_vip(*endpoint, Some(*vip))?;
                self.member_vips.insert(*endpoint, *vip);
            }
        }
        Ok(())
    }

    /// Flags the members the member endpoint table covers (once every listener has switched:
    /// before, a member may still be in a schedule of the VIP it served before).
    fn flag_members(
        &mut self,
        tables: &mut dyn Tables,
        sole: &SoleEndpoints<MemberRef>,
    ) -> Result<(), TableError> {
        for (member, (id, info, _)) in &mut self.members {
            if sole.members.contains(member) && info.flags & MEMBER_F_SOLE_VIP == 0 {
                info.flags |= MEMBER_F_SOLE_VIP;
                tables.set_member(*id, *info)?;
            }
        }
        Ok(())
    }

    /// Writes the filter slots whose count differs from `want` (only raising them when
    /// `raise_only`), so that every VIP written, or about to be, has a non-zero slot.
    fn write_filter(
        &mut self,
        tables: &mut dyn Tables,
        want: &BTreeMap<u32, u32>,
        raise_only: bool,
    ) -> Result<(), TableError> {
        let slots: BTreeSet<u32> = want.keys().chain(self.vip_filter.keys()).copied().collect();
        for slot in slots {
            let (have, wanted) = (
                self.vip_filter.get(&slot).copied().unwrap_or(0),
                want.get(&slot).copied().unwrap_or(0),
            );
            if have == wanted || (raise_only && wanted < have) {
                continue;
            }
            tables.set_vip_filter(slot, wanted)?;
            if wanted == 0 {
                self.vip_filter.remove(&slot);
            } else {
                self.vip_filter.insert(slot, wanted);
            }
        }
        Ok(())
    }

    /// A programmer whose removed members drain for at most `timeout`.
    pub fn with_drain_timeout(timeout: Duration) -> Self {
        Self {
            drain_timeout: timeout,
            ..Self::new()
        }
    }

    /// Removed members still serving open flows.
    pub fn draining_members(&self) -> usize {
        self.retired.len()
    }

    /// Releases removed members whose open flows have all ended, or whose drain timed out:
    /// their slot is cleared (a flow still pinned to one is rescheduled) and the id freed.
    pub fn release_drained(
        &mut self,
        tables: &mut dyn Tables,
        now: Instant,
    ) -> Result<usize, TableError> {
        let mut released = 0;
        let candidates: Vec<MemberRef> = self.retired.keys().cloned().collect();
        for member in candidates {
            let r = self.retired[&member];
            let timed_out = now.saturating_duration_since(r.since) >= self.drain_timeout;
            if !timed_out && tables.active_flows(r.id)? > 0 {
                continue;
            }
            tables.set_member(r.id, MemberInfo::default())?;
            self.member_ids.give_back(r.id);
            self.retired.remove(&member);
            released += 1;
        }
        Ok(released)
    }

    /// The member id given to a member, if it is live.
    pub fn member_id(&self, member: &MemberRef) -> Option<u32> {
        self.members.get(member).map(|(id, _, _)| *id)
    }

    /// The listener id given to a listener, if it is live.
    pub fn listener_id(&self, listener: &ListenerRef) -> Option<u32> {
        self.listeners.get(listener).map(|l| l.id)
    }

    /// Moves the tables from what is live to `want`, make-before-break.
    pub fn apply(
        &mut self,
        tables: &mut dyn Tables,
        want: &DesiredTables,
    ) -> Result<ProgramSummary, TableError> {
        self.apply_at(tables, want, Instant::now())
    }

    /// [`Programmer::apply`] at a given time (drain timeouts are measured from it).
    ///
    /// All or nothing: if a write fails half way (a full map, a kernel error), every member
    /// and VIP entry already written is put back and the programmer forgets the attempt, so
    /// the data path serves exactly the previous configuration.
    pub fn apply_at(
        &mut self,
        tables: &mut dyn Tables,
        want: &DesiredTables,
        now: Instant,
    ) -> Result<ProgramSummary, TableError> {
        let before = self.clone();
        let mut undo = UndoLog {
            inner: tables,
            log: Vec::new(),
        };
        match self.apply_unlogged(&mut undo, want, now) {
            Ok(summary) => Ok(summary),
            Err(e) => {
                *self = before;
                if let Err(undo_error) = undo.roll_back() {
                    tracing::error!(error = %undo_error, "rolling back a failed apply failed too");
                }
                Err(e)
            }
        }
    }

    fn apply_unlogged(
        &mut self,
        tables: &mut dyn Tables,
        want: &DesiredTables,
        now: Instant,
    ) -> Result<ProgramSummary, TableError> {
        let mut summary = ProgramSummary::default();
        // A removed member that comes back resumes with its id, generation and flows.
        for member in want.members.keys() {
            if let Some(r) = self.retired.remove(member) {
                self.members.insert(member.clone(), (r.id, r.info, false));
            }
        }
        summary.members_released += self.release_drained(tables, now)?;
        for (base, len) in std::mem::take(&mut self.quarantined) {
            self.ring.give_back(base, len);
        }
        // A key that a wanted listener uses is never removed, even if another listener
        // (moved or deleted) used it before.
        let wanted_vips: BTreeSet<VipKey> = want.listeners.values().map(|p| p.vip).collect();
        // 0. Members whose endpoint stops serving one listener only (or changes listener) lose
        //    their flag, then the member endpoint table is written: new members can be
        //    flagged from their first write (no schedule names them yet), the others are once
        //    every listener has switched (at the end).
        let sole = SoleEndpoints::of(
            want.listeners
                .values()
                .map(|p| (p.vip, p.flags, &p.slots[..])),
            ref_endpoint,
        );
        self.unflag_members(tables, &sole)?;
        self.write_member_vips(tables, &sole)?;
        // 1. New members get a slot before any schedule can name them; weights are updated.
        for (member, spec) in &want.members {
            let weight = &spec.weight;
            if let Some((id, info, down)) = self.members.get_mut(member) {
                let falls = spec.down && !*down;
                if info.weight != *weight || falls {
                    info.weight = *weight;
                    if falls {
                        // A new generation: flows pinned to the fallen member are
                        // rescheduled by the data path instead of black-holed.
                        self.generation = self.generation.wrapping_add(1).max(1);
                        info.generation = self.generation;
                    }
                    tables.set_member(*id, *info)?;
                    summary.members_written += 1;
                }
                *down = spec.down;
                continue;
            }
            let id = self.member_ids.take().ok_or(TableError::TooManyMembers)?;
            self.generation = self.generation.wrapping_add(1).max(1);
            let info = MemberInfo {
                addr: u32::from_ne_bytes(member.addr.octets()),
                port: member.port.to_be(),
                flags: if sole.members.contains(member) {
                    MEMBER_F_SOLE_VIP
                } else {
                    0
                },
                generation: self.generation,
                weight: *weight,
            };
            tables.reset_conn_counters(id)?;
            tables.set_member(id, info)?;
            self.members.insert(member.clone(), (id, info, spec.down));
            summary.members_written += 1;
        }
        // The address filter admits every VIP, live or about to be, before any is written.
        let keys: BTreeSet<VipKey> = self
            .listeners
            .values()
            .map(|l| l.vip)
            .chain(wanted_vips.iter().copied())
            .collect();
        self.write_filter(tables, &filter_counts(keys.into_iter()), true)?;
        // 2. Each new or changed listener: ring region beside the live one, then one switch.
        for (listener, plan) in &want.listeners {
            let schedule: Vec<u32> = plan.slots.iter().map(|m| self.members[m].0).collect();
            let live = self.listeners.get(listener).cloned();
            if let Some(live) = &live
                && live.schedule == schedule
                && live.vip == plan.vip
                && live.info.flags == plan.flags
                && live.info.algorithm == plan.algorithm
                && live.info.conn_limit == plan.conn_limit
                && live.allowed == plan.allowed
            {
                continue;
            }
            let id = match &live {
                Some(live) => live.id,
                None => {
                    let id = self
                        .listener_ids
                        .take()
                        .ok_or(TableError::TooManyListeners)?;
                    tables.reset_counter(id)?;
                    id
                }
            };
            let len = schedule.len() as u32;
            let same_region = live.as_ref().is_some_and(|l| l.schedule == schedule);
            let base = if same_region {
                live.as_ref().map_or(0, |l| l.info.ring_base)
            } else if len == 0 {
                0
            } else {
                let base = self.ring.take(len).ok_or_else(|| TableError::RingFull {
                    listener: format!("{}/{}", listener.loadbalancer, listener.listener),
                    needed: len,
                    free: self.ring.largest_free(),
                })?;
                tables.set_ring(base, &schedule)?;
                base
            };
            let info = VipInfo {
                listener_id: id,
                flags: plan.flags,
                algorithm: plan.algorithm,
                ring_base: base,
                ring_len: len,
                conn_limit: plan.conn_limit,
            };
            // Sources: added before the switch, withdrawn after it, so the listener never
            // filters with a half-written set (briefly, it admits the union).
            let live_allowed = live.as_ref().map_or(&[][..], |l| &l.allowed[..]);
            for source in plan.allowed.iter().filter(|s| !live_allowed.contains(s)) {
                tables.set_source_allowed(id, *source, true)?;
            }
            tables.set_vip(plan.vip, info)?;
            summary.vips_written += 1;
            for source in live_allowed.iter().filter(|s| !plan.allowed.contains(s)) {
                tables.set_source_allowed(id, *source, false)?;
            }
            if let Some(live) = &live {
                if live.vip != plan.vip && !wanted_vips.contains(&live.vip) {
                    tables.remove_vip(live.vip)?;
                }
                // Nothing points at the old region any more; it is reused after a grace period.
                self.quarantined
                    .push((live.info.ring_base, live.info.ring_len));
            }
            self.listeners.insert(
                listener.clone(),
                LiveListener {
                    id,
                    vip: plan.vip,
                    info,
                    schedule,
                    allowed: plan.allowed.clone(),
                },
            );
        }
        // 3. Listeners that went away.
        let gone: Vec<ListenerRef> = self
            .listeners
            .keys()
            .filter(|l| !want.listeners.contains_key(*l))
            .cloned()
            .collect();
        for listener in gone {
            let live = self.listeners.remove(&listener).expect("listed above");
            if !wanted_vips.contains(&live.vip) {
                tables.remove_vip(live.vip)?;
            }
            // The id may be given to another listener: it must not inherit these.
            for source in &live.allowed {
                tables.set_source_allowed(live.id, *source, false)?;
            }
            self.quarantined
                .push((live.info.ring_base, live.info.ring_len));
            self.listener_ids.give_back(live.id);
            summary.vips_removed += 1;
        }
        // Slots of VIPs that are gone are lowered once the VIPs are.
        let live = filter_counts(self.listeners.values().map(|l| l.vip));
        self.write_filter(tables, &live, false)?;
        self.flag_members(tables, &sole)?;
        // 4. Members no schedule names any more drain: their open flows continue (as HAProxy's
        //    old process serves its connections after a reload), no new flow reaches them.
        let gone: Vec<MemberRef> = self
            .members
            .keys()
            .filter(|m| !want.members.contains_key(*m))
            .cloned()
            .collect();
        for member in gone {
            let (id, info, _) = self.members.remove(&member).expect("listed above");
            self.retired.insert(
                member,
                Retired {
                    id,
                    info,
                    since: now,
                },
            );
            summary.members_removed += 1;
        }
        summary.members_released += self.release_drained(tables, now)?;
        Ok(summary)
    }
}

#[cfg(test)]
mod tests;
