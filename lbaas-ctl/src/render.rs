//! CLI output: aligned tables (like `openstack loadbalancer ... list`), JSON or YAML.

use serde_json::{Map, Value};

use crate::{api::StatsResponse, config::Config, status::StatusResponse};

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// JSON array of objects.
    Json,
    /// YAML list of maps.
    Yaml,
}

/// Which objects `get` lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Load balancers.
    Loadbalancers,
    /// Listeners.
    Listeners,
    /// Pools.
    Pools,
    /// Members.
    Members,
}

/// Rows with named columns.
#[derive(Debug, Default, PartialEq)]
pub struct Rows {
    /// Column names.
    pub headers: Vec<&'static str>,
    /// One value per column per row.
    pub rows: Vec<Vec<Value>>,
}

fn yes_no(b: bool) -> Value {
    Value::Bool(b)
}

/// Octavia's operating status for an object without health monitoring.
fn operating_status(enabled: bool, drained: bool) -> &'static str {
    match (enabled, drained) {
        (false, _) => "OFFLINE",
        (true, true) => "DRAINING",
        (true, false) => "NO_MONITOR",
    }
}

/// The rows `get KIND` shows for a configuration; member operating statuses come from the
/// daemon's status tree when given (health), or from the configuration alone.
pub fn rows(config: &Config, kind: Kind, status: Option<&StatusResponse>) -> Rows {
    let mut out = Rows::default();
    match kind {
        Kind::Loadbalancers => {
            out.headers = vec![
                "name",
                "vip_address",
                "provisioning_status",
                "operating_status",
                "listeners",
                "pools",
            ];
            for lb in &config.loadbalancers {
                out.rows.push(vec![
                    lb.name.clone().into(),
                    lb.vip_address.clone().into(),
                    "ACTIVE".into(),
                    (if lb.admin_state_up {
                        "ONLINE"
                    } else {
                        "OFFLINE"
                    })
                    .into(),
                    lb.listeners.len().into(),
                    lb.pools.len().into(),
                ]);
            }
        }
        Kind::Listeners => {
            out.headers = vec![
                "loadbalancer",
                "name",
                "protocol",
                "protocol_port",
                "default_pool",
                "connection_limit",
                "admin_state_up",
            ];
            for lb in &config.loadbalancers {
                for l in &lb.listeners {
                    out.rows.push(vec![
                        lb.name.clone().into(),
                        l.name.clone().into(),
                        l.protocol.to_string().into(),
                        l.protocol_port.into(),
                        l.default_pool.clone().map_or(Value::Null, Value::from),
                        l.connection_limit.into(),
                        yes_no(l.admin_state_up),
                    ]);
                }
            }
        }
        Kind::Pools => {
            out.headers = vec![
                "loadbalancer",
                "name",
                "protocol",
                "lb_algorithm",
                "members",
                "admin_state_up",
            ];
            for lb in &config.loadbalancers {
                for p in &lb.pools {
                    out.rows.push(vec![
                        lb.name.clone().into(),
                        p.name.clone().into(),
                        p.protocol.to_string().into(),
                        p.lb_algorithm.to_string().into(),
                        p.members.len().into(),
                        yes_no(p.admin_state_up),
                    ]);
                }
            }
        }
        Kind::Members => {
            out.headers = vec![
                "loadbalancer",
                "pool",
                "name",
                "address",
                "protocol_port",
                "weight",
                "admin_state_up",
                "operating_status",
            ];
            for lb in &config.loadbalancers {
                for p in &lb.pools {
                    for m in &p.members {
                        out.rows.push(vec![
                            lb.name.clone().into(),
                            p.name.clone().into(),
                            m.name.clone().into(),
                            m.address.clone().into(),
                            m.protocol_port.into(),
                            m.weight.into(),
                            yes_no(m.admin_state_up),
                            status
                                .and_then(|s| {
                                    let id = format!("{}:{}", m.address, m.protocol_port);
                                    crate::status::member_status(s, &lb.name, &p.name, &id)
                                })
                                .unwrap_or_else(|| {
                                    operating_status(m.admin_state_up, m.weight == 0).into()
                                })
                                .into(),
                        ]);
                    }
                }
            }
        }
    }
    out
}

/// Octavia's statistics as rows, optionally of one load balancer only.
pub fn object_stats_rows(stats: &StatsResponse, loadbalancer: Option<&str>) -> Rows {
    let mut out = Rows {
        headers: vec![
            "kind",
            "name",
            "active_connections",
            "bytes_in",
            "bytes_out",
            "total_connections",
            "request_errors",
        ],
        rows: Vec::new(),
    };
    for o in &stats.objects {
        let lb = o.name.split('/').next().unwrap_or("");
        if loadbalancer.is_some_and(|want| want != lb) {
            continue;
        }
        out.rows.push(vec![
            o.kind.clone().into(),
            o.name.clone().into(),
            o.active_connections.into(),
            o.bytes_in.into(),
            o.bytes_out.into(),
            o.total_connections.into(),
            o.request_errors.into(),
        ]);
    }
    out
}

/// The rows of `stats`.
pub fn stats_rows(stats: &StatsResponse) -> Rows {
    let mut out = Rows {
        headers: vec![
            "loadbalancer",
            "listener",
            "total_connections",
            "packets_in",
            "bytes_in",
            "packets_out",
            "bytes_out",
        ],
        rows: Vec::new(),
    };
    for l in &stats.listeners {
        out.rows.push(vec![
            l.loadbalancer.clone().into(),
            l.listener.clone().into(),
            l.total_connections.into(),
            l.packets_in.into(),
            l.bytes_in.into(),
            l.packets_out.into(),
            l.bytes_out.into(),
        ]);
    }
    out
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Rows {
    /// The rows as a JSON array of objects.
    pub fn to_value(&self) -> Value {
        Value::Array(
            self.rows
                .iter()
                .map(|row| {
                    let map: Map<String, Value> = self
                        .headers
                        .iter()
                        .map(|h| h.to_string())
                        .zip(row.iter().cloned())
                        .collect();
                    Value::Object(map)
                })
                .collect(),
        )
    }

    /// Aligned text with a header line.
    pub fn to_table(&self) -> String {
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(cell).collect())
            .collect();
        let widths: Vec<usize> = self
            .headers
            .iter()
            .enumerate()
            .map(|(i, h)| {
                cells
                    .iter()
                    .map(|r| r[i].chars().count())
                    .chain([h.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |values: Vec<&str>| {
            values
                .iter()
                .zip(&widths)
                .map(|(v, w)| format!("{v:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let mut out = line(self.headers.clone());
        out.push('\n');
        for row in &cells {
            out.push_str(&line(row.iter().map(String::as_str).collect()));
            out.push('\n');
        }
        out
    }

    /// Renders in a format.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Table => self.to_table(),
            Format::Json => format!(
                "{}\n",
                serde_json::to_string_pretty(&self.to_value()).unwrap_or_default()
            ),
            Format::Yaml => serde_yaml_ng::to_string(&self.to_value()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn config() -> Config {
        load_str(
            "loadbalancers:\n  - name: lb1\n    vip_address: 10.9.0.1\n    listeners:\n      - {name: ssh, protocol: TCP, protocol_port: 22, default_pool: p}\n    pools:\n      - name: p\n        protocol: TCP\n        lb_algorithm: ROUND_ROBIN\n        members:\n          - {name: web1, address: 10.9.1.1, protocol_port: 22}\n          - {name: web2, address: 10.9.1.22, protocol_port: 22, weight: 0}\n          - {name: web3, address: 10.9.1.3, protocol_port: 22, admin_state_up: false}\n",
            "t",
        )
        .unwrap()
    }

    #[test]
    fn members_table_is_aligned_with_statuses() {
        let table = rows(&config(), Kind::Members, None).to_table();
        let expected = "\
loadbalancer  pool  name  address    protocol_port  weight  admin_state_up  operating_status
lb1           p     web1  10.9.1.1   22             1       true            NO_MONITOR
lb1           p     web2  10.9.1.22  22             0       true            DRAINING
lb1           p     web3  10.9.1.3   22             1       false           OFFLINE
";
        assert_eq!(table, expected);
    }

    #[test]
    fn json_and_yaml_keep_column_names() {
        let r = rows(&config(), Kind::Listeners, None);
        let json: Value = serde_json::from_str(&r.render(Format::Json)).unwrap();
        assert_eq!(json[0]["protocol_port"], 22);
        assert_eq!(json[0]["default_pool"], "p");
        let yaml = r.render(Format::Yaml);
        assert!(yaml.contains("protocol: TCP"), "{yaml}");
        let lbs = rows(&config(), Kind::Loadbalancers, None).to_value();
        assert_eq!(lbs[0]["operating_status"], "ONLINE");
        assert_eq!(lbs[0]["provisioning_status"], "ACTIVE");
    }
}
