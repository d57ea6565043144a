//! Prometheus text exposition (version 0.0.4) of the daemon's figures, rendered at scrape time
//! from the same numbers `lbaas-ctl stats` and `status` show.

use std::fmt::Write as _;

use crate::{api::StatsResponse, status::StatusResponse};

/// Daemon-level figures that are not in the stats response.
#[derive(Clone, Copy, Debug, Default)]
pub struct DaemonFigures {
    /// Entries in the connection table at the last sweep.
    pub conntrack_entries: u64,
    /// Size of the connection table.
    pub conntrack_size: u64,
    /// Applies done (successful or not).
    pub applies: u64,
    /// Applies that failed (validation or a map write).
    pub apply_failures: u64,
    /// Map writes that failed (each rolled back).
    pub map_update_errors: u64,
    /// Sum of apply durations, seconds.
    pub apply_seconds_sum: f64,
}

/// Escapes a label value.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
            .collect();
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {value}");
        } else {
            let _ = writeln!(self.0, "{name}{{{}}} {value}", labels.join(","));
        }
    }
}

/// Renders every metric.
pub fn render(stats: &StatsResponse, status: &StatusResponse, daemon: &DaemonFigures) -> String {
    let mut out = Out(String::new());
    for (kind, labels) in [
        ("loadbalancer", &["loadbalancer"][..]),
        ("listener", &["loadbalancer", "listener"][..]),
        ("pool", &["loadbalancer", "pool"][..]),
        ("member", &["loadbalancer", "pool", "member"][..]),
    ] {
        for (field, metric_kind, help) in [
            ("active_connections", "gauge", "Open connections (flows)."),
            ("bytes_in", "counter", "IP bytes from clients."),
            ("bytes_out", "counter", "IP bytes to clients."),
            (
                "total_connections",
                "counter",
                "Connections (flows) handled.",
            ),
            (
                "request_errors",
                "counter",
                "Failed requests (HTTP listeners).",
            ),
        ] {
            let suffix = if metric_kind == "counter" {
                "_total"
            } else {
                ""
            };
            let name = format!("lbaas_{kind}_{field}{suffix}");
            out.family(&name, metric_kind, help);
            for o in stats.objects.iter().filter(|o| o.kind == kind) {
                let parts: Vec<&str> = o.name.splitn(3, '/').collect();
                let pairs: Vec<(&str, &str)> =
                    labels.iter().copied().zip(parts.iter().copied()).collect();
                let value = match field {
                    "active_connections" => o.active_connections,
                    "bytes_in" => o.bytes_in,
                    "bytes_out" => o.bytes_out,
                    "total_connections" => o.total_connections,
                    _ => o.request_errors,
                };
                out.sample(&name, &pairs, value);
            }
        }
    }
    out.family(
        "lbaas_listener_refused_connections_total",
        "counter",
        "New connections refused (connection limit, no usable member).",
    );
    for l in &stats.listeners {
        out.sample(
            "lbaas_listener_refused_connections_total",
            &[("loadbalancer", &l.loadbalancer), ("listener", &l.listener)],
            l.refused_connections,
        );
    }
    out.family("lbaas_member_up", "gauge", "1 when a member may get new connections by its operating status (ONLINE, NO_MONITOR), else 0.");
    out.family(
        "lbaas_member_operating_status",
        "gauge",
        "1 for the member's current Octavia operating status.",
    );
    for s in &status.loadbalancers {
        let lb = &s.statuses.loadbalancer;
        let mut seen = std::collections::BTreeSet::new();
        for p in lb.listeners.iter().flat_map(|l| &l.pools) {
            for m in &p.members {
                if !seen.insert((p.name.clone(), m.id.clone())) {
                    continue;
                }
                let labels = [
                    ("loadbalancer", lb.name.as_str()),
                    ("pool", p.name.as_str()),
                    ("member", m.id.as_str()),
                ];
                let up = matches!(m.operating_status.as_str(), "ONLINE" | "NO_MONITOR");
                out.sample("lbaas_member_up", &labels, u8::from(up));
                let mut with_status = labels.to_vec();
                with_status.push(("status", m.operating_status.as_str()));
                out.sample("lbaas_member_operating_status", &with_status, 1);
            }
        }
    }
    out.family(
        "lbaas_datapath_packets_total",
        "counter",
        "Packets by what the data path did with them.",
    );
    for (reason, value) in &stats.datapath {
        out.sample("lbaas_datapath_packets_total", &[("reason", reason)], value);
    }
    out.family(
        "lbaas_conntrack_entries",
        "gauge",
        "Connection-table entries at the last sweep.",
    );
    out.sample("lbaas_conntrack_entries", &[], daemon.conntrack_entries);
    out.family(
        "lbaas_conntrack_size",
        "gauge",
        "Connection-table capacity.",
    );
    out.sample("lbaas_conntrack_size", &[], daemon.conntrack_size);
    out.family("lbaas_applies_total", "counter", "Configuration applies.");
    out.sample("lbaas_applies_total", &[], daemon.applies);
    out.family(
        "lbaas_apply_failures_total",
        "counter",
        "Applies refused or rolled back.",
    );
    out.sample("lbaas_apply_failures_total", &[], daemon.apply_failures);
    out.family(
        "lbaas_map_update_errors_total",
        "counter",
        "Map writes that failed (the apply was rolled back).",
    );
    out.sample(
        "lbaas_map_update_errors_total",
        &[],
        daemon.map_update_errors,
    );
    out.family(
        "lbaas_apply_duration_seconds_sum",
        "counter",
        "Time spent applying configurations.",
    );
    out.sample(
        "lbaas_apply_duration_seconds_sum",
        &[],
        daemon.apply_seconds_sum,
    );
    out.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ListenerCounters, ObjectStats};

    #[test]
    fn renders_valid_exposition_lines_with_labels() {
        let stats = StatsResponse {
            datapath: vec![("forwarded".into(), 42)],
            listeners: vec![ListenerCounters {
                loadbalancer: "lb".into(),
                listener: "web".into(),
                refused_connections: 2,
                ..Default::default()
            }],
            objects: vec![
                ObjectStats {
                    kind: "listener".into(),
                    name: "lb/web".into(),
                    total_connections: 7,
                    bytes_in: 100,
                    ..Default::default()
                },
                ObjectStats {
                    kind: "member".into(),
                    name: "lb/p/10.0.0.1:80".into(),
                    active_connections: 3,
                    ..Default::default()
                },
            ],
        };
        let text = render(
            &stats,
            &StatusResponse::default(),
            &DaemonFigures {
                conntrack_size: 1024,
                ..Default::default()
            },
        );
        assert!(
            text.contains(
                "lbaas_listener_total_connections_total{loadbalancer=\"lb\",listener=\"web\"} 7\n"
            ),
            "{text}"
        );
        assert!(text.contains("lbaas_member_active_connections{loadbalancer=\"lb\",pool=\"p\",member=\"10.0.0.1:80\"} 3\n"), "{text}");
        assert!(text.contains("lbaas_datapath_packets_total{reason=\"forwarded\"} 42\n"));
        assert!(text.contains(
            "lbaas_listener_refused_connections_total{loadbalancer=\"lb\",listener=\"web\"} 2\n"
        ));
        assert!(text.contains("lbaas_conntrack_size 1024\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("name and value");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
