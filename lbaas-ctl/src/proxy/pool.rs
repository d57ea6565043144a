//! Proxied pools: the member for each request (ROUND_ROBIN, LEAST_CONNECTIONS by requests in
//! flight, SOURCE_IP over a Maglev table) and session persistence (HTTP_COOKIE, APP_COOKIE,
//! SOURCE_IP), from the same configuration and health state the XDP path is programmed from.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    compile::{MemberRef, weighted_schedule},
    config::{LbAlgorithm, PersistenceType, Pool},
    maglev,
};

/// Cookie the proxy inserts for HTTP_COOKIE persistence (HAProxy's and Octavia's name).
pub const PERSISTENCE_COOKIE: &str = "SRV";
/// How long an APP_COOKIE value sticks when the pool sets no `persistence_timeout` (s).
const APP_COOKIE_DEFAULT_TIMEOUT_S: u64 = 1800;
/// Most application cookie values remembered per pool.
const APP_COOKIE_TABLE_SIZE: usize = 10_000;

/// Per-member counters that outlive applies (keyed by member).
#[derive(Debug, Default)]
pub struct MemberCounters {
    /// Requests being served now.
    pub in_flight: AtomicU64,
    /// Requests sent.
    pub requests: AtomicU64,
    /// Request body bytes sent to the member.
    pub bytes_in: AtomicU64,
    /// Response body bytes received from the member.
    pub bytes_out: AtomicU64,
}

/// A member the proxy can send requests to.
#[derive(Debug, Clone)]
pub struct ProxyMember {
    /// Which member.
    pub key: MemberRef,
    /// `address:port`, the request's authority at the member.
    pub authority: String,
    /// Weight, 0-256 (0: only persistent sessions).
    pub weight: u32,
    /// Value of the persistence cookie that names this member.
    pub cookie: String,
    /// Counters.
    pub counters: Arc<MemberCounters>,
}

/// Remembered application cookie values and the member that set each.
#[derive(Debug, Default)]
pub struct StickTable {
    entries: Mutex<HashMap<String, (MemberRef, Instant)>>,
}

impl StickTable {
    fn get(&self, value: &str, ttl: Duration) -> Option<MemberRef> {
        let entries = self.entries.lock().expect("stick table");
        entries
            .get(value)
            .filter(|(_, seen)| seen.elapsed() < ttl)
            .map(|(m, _)| m.clone())
    }

    fn put(&self, value: &str, member: &MemberRef, ttl: Duration) {
        let mut entries = self.entries.lock().expect("stick table");
        if entries.len() >= APP_COOKIE_TABLE_SIZE && !entries.contains_key(value) {
            entries.retain(|_, (_, seen)| seen.elapsed() < ttl);
            if entries.len() >= APP_COOKIE_TABLE_SIZE
                && let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, (_, seen))| *seen)
                    .map(|(k, _)| k.clone())
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(value.to_string(), (member.clone(), Instant::now()));
    }
}

/// How a pool keeps a client on a member.
#[derive(Debug, Clone)]
pub enum Persistence {
    /// None: every request is balanced.
    None,
    /// The proxy sets [`PERSISTENCE_COOKIE`] naming the member.
    HttpCookie,
    /// The application's cookie `name`: a value the member set sticks to that member.
    AppCookie {
        /// Cookie name.
        name: String,
        /// Values seen and their members.
        table: Arc<StickTable>,
        /// How long a value sticks after it was last set.
        ttl: Duration,
    },
    /// A Maglev table over the client address.
    SourceIp,
}

/// How a pool picks a member without persistence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    RoundRobin,
    LeastConnections,
    SourceIp,
}

/// One pool as the proxy serves it.
#[derive(Debug)]
pub struct ProxyPool {
    /// Pool name.
    pub name: String,
    /// Members that take new sessions (healthy, enabled, weight > 0; backups when no other).
    usable: Vec<ProxyMember>,
    /// Members a persistent session may stay on (healthy and enabled, any weight).
    sticky: Vec<ProxyMember>,
    algorithm: Algorithm,
    /// Indices into `usable`, one per weight unit (round robin).
    schedule: Vec<usize>,
    /// Indices into `usable` (SOURCE_IP).
    table: Vec<usize>,
    next: AtomicUsize,
    /// How sessions stick.
    pub persistence: Persistence,
    /// Members are spoken to over TLS (`tls_enabled`).
    pub tls: bool,
}

/// Where a member choice came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// The request's persistence cookie named this member.
    Persisted,
    /// Balanced: a persistence cookie should be set if the pool uses one.
    Balanced,
}

/// The persistence cookie value for a member: stable, and without the member's address.
pub fn member_cookie(m: &MemberRef) -> String {
    let text = format!("{}/{}/{}:{}", m.loadbalancer, m.pool, m.addr, m.port);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// State shared by successive versions of the proxy's pools.
#[derive(Debug, Default)]
pub struct PoolRegistry {
    counters: Mutex<HashMap<MemberRef, Arc<MemberCounters>>>,
    sticks: Mutex<HashMap<(String, String), Arc<StickTable>>>,
}

impl PoolRegistry {
    /// The counters of a member (created on first use, kept across applies).
    pub fn counters(&self, m: &MemberRef) -> Arc<MemberCounters> {
        self.counters
            .lock()
            .expect("counters")
            .entry(m.clone())
            .or_default()
            .clone()
    }

    /// Every member's counters.
    pub fn all_counters(&self) -> Vec<(MemberRef, Arc<MemberCounters>)> {
        let map = self.counters.lock().expect("counters");
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn stick_table(&self, lb: &str, pool: &str) -> Arc<StickTable> {
        self.sticks
            .lock()
            .expect("sticks")
            .entry((lb.to_string(), pool.to_string()))
            .or_default()
            .clone()
    }
}

impl ProxyPool {
    /// Builds a pool from its configuration; `down` says which monitored members failed.
    pub fn new(
        lb: &str,
        pool: &Pool,
        enabled: bool,
        is_down: impl Fn(&MemberRef) -> bool,
        registry: &PoolRegistry,
    ) -> Self {
        let (mut usable, mut backups, mut sticky) = (Vec::new(), Vec::new(), Vec::new());
        for m in &pool.members {
            let (Some(addr), Ok(port)) = (m.ipv4(), u16::try_from(m.protocol_port)) else {
                continue;
            };
            let key = MemberRef {
                loadbalancer: lb.to_string(),
                pool: pool.name.clone(),
                addr,
                port,
            };
            if !enabled || !m.admin_state_up || is_down(&key) {
                continue;
            }
            let member = ProxyMember {
                authority: format!("{addr}:{port}"),
                weight: m.weight.clamp(0, 256) as u32,
                cookie: member_cookie(&key),
                counters: registry.counters(&key),
                key,
            };
            sticky.push(member.clone());
            match (member.weight, m.backup) {
                (0, _) => {}
                (_, true) => backups.push(member),
                (_, false) => usable.push(member),
            }
        }
        if usable.is_empty() {
            usable = backups;
        }
        let persistence = match pool
            .session_persistence
            .as_ref()
            .map(|p| &p.persistence_type)
        {
            Some(PersistenceType::HttpCookie) => Persistence::HttpCookie,
            Some(PersistenceType::AppCookie) => {
                let sp = pool.session_persistence.as_ref().expect("checked above");
                let ttl = sp
                    .persistence_timeout
                    .and_then(|t| u64::try_from(t).ok())
                    .filter(|t| *t > 0)
                    .unwrap_or(APP_COOKIE_DEFAULT_TIMEOUT_S);
                Persistence::AppCookie {
                    name: sp.cookie_name.clone().unwrap_or_default(),
                    table: registry.stick_table(lb, &pool.name),
                    ttl: Duration::from_secs(ttl),
                }
            }
            Some(PersistenceType::SourceIp) => Persistence::SourceIp,
            _ => Persistence::None,
        };
        let algorithm = match (&persistence, &pool.lb_algorithm) {
            (Persistence::SourceIp, _) | (_, LbAlgorithm::SourceIp | LbAlgorithm::SourceIpPort) => {
                Algorithm::SourceIp
            }
            (_, LbAlgorithm::LeastConnections) => Algorithm::LeastConnections,
            _ => Algorithm::RoundRobin,
        };
        let weights: Vec<u32> = usable.iter().map(|m| m.weight).collect();
        let schedule = weighted_schedule(&weights);
        let table = if algorithm == Algorithm::SourceIp {
            let backends: Vec<maglev::Backend> = usable
                .iter()
                .map(|m| {
                    let mut id = m.key.addr.octets().to_vec();
                    id.extend_from_slice(&m.key.port.to_be_bytes());
                    maglev::Backend {
                        id,
                        weight: m.weight,
                    }
                })
                .collect();
            maglev::build(&backends, maglev::default_table_size(usable.len()))
        } else {
            Vec::new()
        };
        Self {
            name: pool.name.clone(),
            usable,
            sticky,
            algorithm,
            schedule,
            table,
            next: AtomicUsize::new(0),
            persistence,
            tls: pool.tls_enabled,
        }
    }

    /// Whether any member can take a new session.
    pub fn has_members(&self) -> bool {
        !self.usable.is_empty()
    }

    /// The member for a request: the one its persistence names when that member may still
    /// serve it, else one chosen by the pool's algorithm. `None` when no member is usable.
    pub fn choose(
        &self,
        client: IpAddr,
        cookie: impl Fn(&str) -> Option<String>,
    ) -> Option<(&ProxyMember, Choice)> {
        match &self.persistence {
            Persistence::HttpCookie => {
                if let Some(value) = cookie(PERSISTENCE_COOKIE)
                    && let Some(m) = self.sticky.iter().find(|m| m.cookie == value)
                {
                    return Some((m, Choice::Persisted));
                }
            }
            Persistence::AppCookie { name, table, ttl } => {
                if let Some(value) = cookie(name)
                    && let Some(owner) = table.get(&value, *ttl)
                    && let Some(m) = self.sticky.iter().find(|m| m.key == owner)
                {
                    return Some((m, Choice::Persisted));
                }
            }
            Persistence::SourceIp | Persistence::None => {}
        }
        self.balance(client).map(|m| (m, Choice::Balanced))
    }

    fn balance(&self, client: IpAddr) -> Option<&ProxyMember> {
        if self.usable.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        match self.algorithm {
            Algorithm::RoundRobin => self
                .schedule
                .get(turn % self.schedule.len().max(1))
                .map(|i| &self.usable[*i]),
            Algorithm::LeastConnections => {
                // Fewest requests in flight per unit of weight; ties rotate from `turn`.
                let n = self.usable.len();
                (0..n).map(|k| &self.usable[(turn + k) % n]).min_by(|a, b| {
                    let load = |m: &ProxyMember| {
                        u128::from(m.counters.in_flight.load(Ordering::Relaxed)) * 256
                            / u128::from(m.weight.max(1))
                    };
                    load(a).cmp(&load(b))
                })
            }
            Algorithm::SourceIp => {
                let v4 = match client {
                    IpAddr::V4(a) => a,
                    IpAddr::V6(a) => a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
                };
                let h = lbaas_common::hash_source(u32::from_ne_bytes(v4.octets()));
                let slot = h as usize % self.table.len().max(1);
                self.table.get(slot).map(|i| &self.usable[*i])
            }
        }
    }

    /// Another member for a request whose earlier choices (`tried`) refused it.
    pub fn choose_other(&self, tried: &[MemberRef]) -> Option<&ProxyMember> {
        let n = self.usable.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| &self.usable[(start + k) % n])
            .find(|m| !tried.contains(&m.key))
    }

    /// Remembers the member that set an APP_COOKIE value in a response.
    pub fn learn_app_cookie(&self, value: &str, member: &MemberRef) {
        if let Persistence::AppCookie { table, ttl, .. } = &self.persistence {
            table.put(value, member, *ttl);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(yaml: &str) -> Pool {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    const MEMBERS: &str = "members: [{address: 10.0.0.1, protocol_port: 80}, {address: 10.0.0.2, protocol_port: 80}, {address: 10.0.0.3, protocol_port: 80, weight: 0}]";

    fn build(yaml: &str, registry: &PoolRegistry) -> ProxyPool {
        ProxyPool::new("lb", &pool(yaml), true, |_| false, registry)
    }

    fn no_cookie(_: &str) -> Option<String> {
        None
    }

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

    #[test]
    fn round_robin_alternates_and_skips_weight_zero() {
        let r = PoolRegistry::default();
        let p = build(
            &format!("{{name: p, protocol: HTTP, lb_algorithm: ROUND_ROBIN, {MEMBERS}}}"),
            &r,
        );
        let picks: Vec<String> = (0..6)
            .map(|_| p.choose(CLIENT, no_cookie).unwrap().0.authority.clone())
            .collect();
        assert_eq!(picks.iter().filter(|a| *a == "10.0.0.1:80").count(), 3);
        assert_eq!(picks.iter().filter(|a| *a == "10.0.0.2:80").count(), 3);
        assert_ne!(picks[0], picks[1]);
    }

    #[test]
    fn http_cookie_names_a_member_and_survives_a_drain_but_not_a_failure() {
        let r = PoolRegistry::default();
        let yaml = format!(
            "{{name: p, protocol: HTTP, lb_algorithm: ROUND_ROBIN, session_persistence: {{type: HTTP_COOKIE}}, {MEMBERS}}}"
        );
        let p = build(&yaml, &r);
        let (first, how) = p.choose(CLIENT, no_cookie).unwrap();
        assert_eq!(how, Choice::Balanced);
        let value = first.cookie.clone();
        for _ in 0..20 {
            let (m, how) = p
                .choose(CLIENT, |n| (n == PERSISTENCE_COOKIE).then(|| value.clone()))
                .unwrap();
            assert_eq!(
                (m.authority.as_str(), how),
                (first.authority.as_str(), Choice::Persisted)
            );
        }
        // The drained member (weight 0) keeps its sessions.
        let drained = member_cookie(&MemberRef {
            loadbalancer: "lb".into(),
            pool: "p".into(),
            addr: Ipv4Addr::new(10, 0, 0, 3),
            port: 80,
        });
        let (m, how) = p.choose(CLIENT, |_| Some(drained.clone())).unwrap();
        assert_eq!(
            (m.authority.as_str(), how),
            ("10.0.0.3:80", Choice::Persisted)
        );
        // A member that failed its checks does not.
        let failed = ProxyPool::new(
            "lb",
            &pool(&yaml),
            true,
            |m| m.addr == Ipv4Addr::new(10, 0, 0, 3),
            &r,
        );
        let (m, how) = failed.choose(CLIENT, |_| Some(drained.clone())).unwrap();
        assert_eq!(how, Choice::Balanced);
        assert_ne!(m.authority, "10.0.0.3:80");
    }

    #[test]
    fn app_cookie_values_stick_to_the_member_that_set_them() {
        let r = PoolRegistry::default();
        let p = build(
            &format!(
                "{{name: p, protocol: HTTP, lb_algorithm: ROUND_ROBIN, session_persistence: {{type: APP_COOKIE, cookie_name: JSESSIONID}}, {MEMBERS}}}"
            ),
            &r,
        );
        let second = p.usable[1].key.clone();
        p.learn_app_cookie("abc", &second);
        for _ in 0..10 {
            let (m, how) = p
                .choose(CLIENT, |n| (n == "JSESSIONID").then(|| "abc".to_string()))
                .unwrap();
            assert_eq!((m.key.clone(), how), (second.clone(), Choice::Persisted));
        }
        // An unknown value is balanced; the table outlives a rebuild of the pool.
        let (_, how) = p.choose(CLIENT, |_| Some("zzz".into())).unwrap();
        assert_eq!(how, Choice::Balanced);
        let rebuilt = build(
            &format!(
                "{{name: p, protocol: HTTP, lb_algorithm: ROUND_ROBIN, session_persistence: {{type: APP_COOKIE, cookie_name: JSESSIONID}}, {MEMBERS}}}"
            ),
            &r,
        );
        assert_eq!(
            rebuilt
                .choose(CLIENT, |_| Some("abc".into()))
                .unwrap()
                .0
                .key,
            second
        );
    }

    #[test]
    fn least_connections_prefers_fewer_requests_in_flight() {
        let r = PoolRegistry::default();
        let p = build(
            &format!("{{name: p, protocol: HTTP, lb_algorithm: LEAST_CONNECTIONS, {MEMBERS}}}"),
            &r,
        );
        p.usable[0].counters.in_flight.store(3, Ordering::Relaxed);
        for _ in 0..5 {
            assert_eq!(
                p.choose(CLIENT, no_cookie).unwrap().0.authority,
                "10.0.0.2:80"
            );
        }
    }

    #[test]
    fn source_ip_keeps_a_client_on_one_member_and_spreads_clients() {
        let r = PoolRegistry::default();
        let p = build(
            &format!("{{name: p, protocol: HTTP, lb_algorithm: SOURCE_IP, {MEMBERS}}}"),
            &r,
        );
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..64u8 {
            let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, i));
            let first = p.choose(client, no_cookie).unwrap().0.authority.clone();
            for _ in 0..5 {
                assert_eq!(p.choose(client, no_cookie).unwrap().0.authority, first);
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn no_usable_member_gives_none_and_backups_take_over() {
        let r = PoolRegistry::default();
        let p = ProxyPool::new(
            "lb",
            &pool(&format!(
                "{{name: p, protocol: HTTP, lb_algorithm: ROUND_ROBIN, {MEMBERS}}}"
            )),
            true,
            |_| true,
            &r,
        );
        assert!(p.choose(CLIENT, no_cookie).is_none());
        let b = build(
            "{name: p, protocol: HTTP, lb_algorithm: ROUND_ROBIN, members: [{address: 10.0.0.1, protocol_port: 80, admin_state_up: false}, {address: 10.0.0.9, protocol_port: 80, backup: true}]}",
            &r,
        );
        assert_eq!(
            b.choose(CLIENT, no_cookie).unwrap().0.authority,
            "10.0.0.9:80"
        );
    }
}
