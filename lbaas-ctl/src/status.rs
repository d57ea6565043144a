//! The Octavia status tree (`GET /v2/lbaas/loadbalancers/{id}/status`) of the running
//! configuration and member health. Names stand in for Octavia's ids.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{compile::MemberRef, config::Config};

/// Operating status as Octavia names it.
pub mod operating {
    /// All well.
    pub const ONLINE: &str = "ONLINE";
    /// Some children in error.
    pub const DEGRADED: &str = "DEGRADED";
    /// Failing, or all children failing.
    pub const ERROR: &str = "ERROR";
    /// Disabled by `admin_state_up: false`.
    pub const OFFLINE: &str = "OFFLINE";
    /// Weight 0: no new connections.
    pub const DRAINING: &str = "DRAINING";
    /// No health monitor.
    pub const NO_MONITOR: &str = "NO_MONITOR";
}

/// Health of a monitored member, as the daemon last saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberHealth {
    /// Passing its checks.
    pub up: bool,
    /// Why it changed last (`HTTP 503`, `timeout`, ...).
    pub reason: String,
}

/// The whole answer: one tree per load balancer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// `{"statuses": {"loadbalancer": ...}}` per load balancer.
    pub loadbalancers: Vec<Statuses>,
}

/// Octavia's wrapper.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Statuses {
    /// The tree.
    pub statuses: LoadBalancerStatusWrapper,
}

/// Octavia's `{"loadbalancer": ...}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadBalancerStatusWrapper {
    /// The load balancer.
    pub loadbalancer: LoadBalancerStatus,
}

/// A load balancer's statuses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadBalancerStatus {
    /// Id (the name).
    pub id: String,
    /// Name.
    pub name: String,
    /// Provisioning status.
    pub provisioning_status: String,
    /// Operating status.
    pub operating_status: String,
    /// Listeners.
    pub listeners: Vec<ListenerStatus>,
}

/// A listener's statuses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// Id (the name).
    pub id: String,
    /// Name.
    pub name: String,
    /// Provisioning status.
    pub provisioning_status: String,
    /// Operating status.
    pub operating_status: String,
    /// Its default pool.
    pub pools: Vec<PoolStatus>,
}

/// A pool's statuses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Id (the name).
    pub id: String,
    /// Name.
    pub name: String,
    /// Provisioning status.
    pub provisioning_status: String,
    /// Operating status.
    pub operating_status: String,
    /// Its monitor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_monitor: Option<MonitorStatus>,
    /// Members.
    pub members: Vec<MemberStatus>,
}

/// A health monitor's statuses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MonitorStatus {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Type.
    #[serde(rename = "type")]
    pub monitor_type: String,
    /// Provisioning status.
    pub provisioning_status: String,
    /// Operating status.
    pub operating_status: String,
}

/// A member's statuses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Id (address:port).
    pub id: String,
    /// Name.
    pub name: String,
    /// Provisioning status.
    pub provisioning_status: String,
    /// Operating status.
    pub operating_status: String,
    /// Address.
    pub address: String,
    /// Port.
    pub protocol_port: i64,
    /// Why a monitored member is in ERROR (not part of Octavia's tree).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

const ACTIVE: &str = "ACTIVE";

/// ONLINE, DEGRADED when some children are in error, ERROR when all are.
fn aggregate<'a>(children: impl IntoIterator<Item = &'a str>) -> &'static str {
    let (mut any, mut all_error, mut some_bad) = (false, true, false);
    for c in children {
        if c == operating::OFFLINE {
            continue;
        }
        any = true;
        all_error &= c == operating::ERROR;
        some_bad |= c == operating::ERROR || c == operating::DEGRADED;
    }
    match (any, all_error, some_bad) {
        (true, true, _) => operating::ERROR,
        (_, _, true) => operating::DEGRADED,
        _ => operating::ONLINE,
    }
}

/// Builds the trees; `health` holds the monitored members' states.
pub fn tree(config: &Config, health: &BTreeMap<MemberRef, MemberHealth>) -> StatusResponse {
    let mut out = StatusResponse::default();
    for lb in &config.loadbalancers {
        let pools: BTreeMap<&str, PoolStatus> = lb
            .pools
            .iter()
            .map(|pool| {
                let monitored = pool
                    .healthmonitor
                    .as_ref()
                    .is_some_and(|m| m.admin_state_up);
                let members: Vec<MemberStatus> = pool
                    .members
                    .iter()
                    .map(|m| {
                        let key = m.ipv4().zip(u16::try_from(m.protocol_port).ok()).map(
                            |(addr, port)| MemberRef {
                                loadbalancer: lb.name.clone(),
                                pool: pool.name.clone(),
                                addr,
                                port,
                            },
                        );
                        let state = key.and_then(|k| health.get(&k));
                        let (status, reason) = if !m.admin_state_up {
                            (operating::OFFLINE, String::new())
                        } else if monitored && state.is_some_and(|h| !h.up) {
                            (
                                operating::ERROR,
                                state.map(|h| h.reason.clone()).unwrap_or_default(),
                            )
                        } else if m.weight == 0 {
                            (operating::DRAINING, String::new())
                        } else if monitored {
                            (operating::ONLINE, String::new())
                        } else {
                            (operating::NO_MONITOR, String::new())
                        };
                        MemberStatus {
                            id: format!("{}:{}", m.address, m.protocol_port),
                            name: m.name.clone(),
                            provisioning_status: ACTIVE.into(),
                            operating_status: status.into(),
                            address: m.address.clone(),
                            protocol_port: m.protocol_port,
                            reason,
                        }
                    })
                    .collect();
                let status = if pool.admin_state_up {
                    aggregate(members.iter().map(|m| m.operating_status.as_str()))
                } else {
                    operating::OFFLINE
                };
                let health_monitor = pool.healthmonitor.as_ref().map(|hm| MonitorStatus {
                    id: format!("{}-monitor", pool.name),
                    name: hm.name.clone(),
                    monitor_type: hm.monitor_type.to_string(),
                    provisioning_status: ACTIVE.into(),
                    operating_status: if hm.admin_state_up {
                        operating::ONLINE
                    } else {
                        operating::OFFLINE
                    }
                    .into(),
                });
                (
                    pool.name.as_str(),
                    PoolStatus {
                        id: pool.name.clone(),
                        name: pool.name.clone(),
                        provisioning_status: ACTIVE.into(),
                        operating_status: status.into(),
                        health_monitor,
                        members,
                    },
                )
            })
            .collect();
        let listeners: Vec<ListenerStatus> = lb
            .listeners
            .iter()
            .map(|l| {
                let pools: Vec<PoolStatus> = l
                    .default_pool
                    .as_deref()
                    .and_then(|p| pools.get(p))
                    .cloned()
                    .into_iter()
                    .collect();
                let status = if l.admin_state_up {
                    aggregate(pools.iter().map(|p| p.operating_status.as_str()))
                } else {
                    operating::OFFLINE
                };
                ListenerStatus {
                    id: l.name.clone(),
                    name: l.name.clone(),
                    provisioning_status: ACTIVE.into(),
                    operating_status: status.into(),
                    pools,
                }
            })
            .collect();
        let status = if lb.admin_state_up {
            aggregate(listeners.iter().map(|l| l.operating_status.as_str()))
        } else {
            operating::OFFLINE
        };
        out.loadbalancers.push(Statuses {
            statuses: LoadBalancerStatusWrapper {
                loadbalancer: LoadBalancerStatus {
                    id: lb.name.clone(),
                    name: lb.name.clone(),
                    provisioning_status: ACTIVE.into(),
                    operating_status: status.into(),
                    listeners,
                },
            },
        });
    }
    out
}

/// The tree as indented text.
pub fn to_text(response: &StatusResponse) -> String {
    let mut out = String::new();
    for s in &response.loadbalancers {
        let lb = &s.statuses.loadbalancer;
        out.push_str(&format!(
            "loadbalancer {}  {} / {}\n",
            lb.name, lb.provisioning_status, lb.operating_status
        ));
        for l in &lb.listeners {
            out.push_str(&format!(
                "  listener {}  {} / {}\n",
                l.name, l.provisioning_status, l.operating_status
            ));
            for p in &l.pools {
                out.push_str(&format!(
                    "    pool {}  {} / {}\n",
                    p.name, p.provisioning_status, p.operating_status
                ));
                if let Some(hm) = &p.health_monitor {
                    out.push_str(&format!(
                        "      healthmonitor {}  {} / {}\n",
                        hm.monitor_type, hm.provisioning_status, hm.operating_status
                    ));
                }
                for m in &p.members {
                    let reason = if m.reason.is_empty() {
                        String::new()
                    } else {
                        format!("  ({})", m.reason)
                    };
                    out.push_str(&format!(
                        "      member {} {}  {} / {}{reason}\n",
                        m.name, m.id, m.provisioning_status, m.operating_status
                    ));
                }
            }
        }
    }
    out
}

/// A member's operating status in a tree, by load balancer, pool, address and port.
pub fn member_status(response: &StatusResponse, lb: &str, pool: &str, id: &str) -> Option<String> {
    response
        .loadbalancers
        .iter()
        .filter(|s| s.statuses.loadbalancer.name == lb)
        .flat_map(|s| &s.statuses.loadbalancer.listeners)
        .flat_map(|l| &l.pools)
        .filter(|p| p.name == pool)
        .flat_map(|p| &p.members)
        .find(|m| m.id == id)
        .map(|m| m.operating_status.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn config() -> Config {
        load_str(
            "loadbalancers:\n  - name: lb\n    vip_address: 10.9.0.1\n    listeners:\n      - {name: web, protocol: TCP, protocol_port: 80, default_pool: p}\n    pools:\n      - name: p\n        protocol: TCP\n        lb_algorithm: ROUND_ROBIN\n        healthmonitor: {type: TCP, delay: 2, timeout: 1, max_retries: 2}\n        members:\n          - {name: a, address: 10.9.1.1, protocol_port: 80}\n          - {name: b, address: 10.9.1.2, protocol_port: 80}\n",
            "t",
        )
        .unwrap()
    }

    fn member(last: u8) -> MemberRef {
        MemberRef {
            loadbalancer: "lb".into(),
            pool: "p".into(),
            addr: [10, 9, 1, last].into(),
            port: 80,
        }
    }

    fn statuses(t: &StatusResponse) -> (String, String, String, Vec<String>) {
        let lb = &t.loadbalancers[0].statuses.loadbalancer;
        let l = &lb.listeners[0];
        let p = &l.pools[0];
        (
            lb.operating_status.clone(),
            l.operating_status.clone(),
            p.operating_status.clone(),
            p.members
                .iter()
                .map(|m| m.operating_status.clone())
                .collect(),
        )
    }

    #[test]
    fn healthy_degraded_and_failed_trees() {
        let c = config();
        let all_up = tree(&c, &BTreeMap::new());
        assert_eq!(
            statuses(&all_up),
            (
                "ONLINE".into(),
                "ONLINE".into(),
                "ONLINE".into(),
                vec!["ONLINE".into(), "ONLINE".into()]
            )
        );
        let one_down = BTreeMap::from([(
            member(1),
            MemberHealth {
                up: false,
                reason: "timeout".into(),
            },
        )]);
        let t = tree(&c, &one_down);
        assert_eq!(
            statuses(&t),
            (
                "DEGRADED".into(),
                "DEGRADED".into(),
                "DEGRADED".into(),
                vec!["ERROR".into(), "ONLINE".into()]
            )
        );
        assert_eq!(
            t.loadbalancers[0].statuses.loadbalancer.listeners[0].pools[0].members[0].reason,
            "timeout"
        );
        let both = BTreeMap::from([
            (
                member(1),
                MemberHealth {
                    up: false,
                    reason: "timeout".into(),
                },
            ),
            (
                member(2),
                MemberHealth {
                    up: false,
                    reason: "HTTP 503".into(),
                },
            ),
        ]);
        assert_eq!(statuses(&tree(&c, &both)).2, "ERROR");
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(
            json["loadbalancers"][0]["statuses"]["loadbalancer"]["listeners"][0]["pools"][0]["health_monitor"]
                ["type"],
            "TCP"
        );
        assert_eq!(
            member_status(&t, "lb", "p", "10.9.1.1:80").as_deref(),
            Some("ERROR")
        );
    }

    #[test]
    fn unmonitored_drained_and_disabled_members() {
        let text = "loadbalancers:\n  - name: lb\n    vip_address: 10.9.0.1\n    listeners:\n      - {name: web, protocol: TCP, protocol_port: 80, default_pool: p, admin_state_up: false}\n    pools:\n      - name: p\n        protocol: TCP\n        lb_algorithm: ROUND_ROBIN\n        members:\n          - {address: 10.9.1.1, protocol_port: 80, weight: 0}\n          - {address: 10.9.1.2, protocol_port: 80, admin_state_up: false}\n          - {address: 10.9.1.3, protocol_port: 80}\n";
        let t = tree(&load_str(text, "t").unwrap(), &BTreeMap::new());
        let (lb, listener, pool, members) = statuses(&t);
        assert_eq!(members, ["DRAINING", "OFFLINE", "NO_MONITOR"]);
        assert_eq!(pool, "ONLINE");
        assert_eq!(listener, "OFFLINE");
        assert_eq!(
            lb, "ONLINE",
            "an only child OFFLINE by choice does not make the LB fail"
        );
        assert!(to_text(&t).contains("member  10.9.1.1:80  ACTIVE / DRAINING"));
    }
}
