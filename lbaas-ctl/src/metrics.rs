//! Prometheus metrics (OpenMetrics text, `prometheus-client`) of the daemon's figures.
//!
//! The object counters live in the kernel (per-CPU maps) and in the proxy; they are read at
//! scrape time, as `lbaas-ctl stats` reads them, and handed to the registry through a
//! [`Collector`] of constant metrics, so a scrape and `stats` show the same numbers. The
//! health-check latency is a real histogram the probes observe.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric, MetricEncoder,
    },
    metrics::{
        MetricType,
        counter::ConstCounter,
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{api::StatsResponse, status::StatusResponse};

/// Health-check durations by monitor type and result (`ok`, `fail`), seconds.
pub type CheckLatency = Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

/// A new health-check latency histogram family: 0.5 ms to ~4 s, doubling.
pub fn check_latency() -> Arc<CheckLatency> {
    fn histogram() -> Histogram {
        Histogram::new(exponential_buckets(0.0005, 2.0, 14))
    }
    Arc::new(Family::new_with_constructor(histogram))
}

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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

type Labels = Vec<(String, String)>;

/// One scrape's figures, as constant metrics.
#[derive(Debug)]
struct Scrape {
    stats: StatsResponse,
    status: StatusResponse,
    daemon: DaemonFigures,
}

/// Writes one metric family of constant samples.
fn family<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: Vec<(Labels, N)>,
) -> std::fmt::Result
where
    N: EncodeCounterValue + EncodeGaugeValue + Copy + std::fmt::Debug,
{
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    // A lone unlabelled sample is written as `name value`, not `name{} value`.
    if let [(labels, value)] = samples.as_slice()
        && labels.is_empty()
    {
        return write(kind, *value, metric);
    }
    for (labels, value) in &samples {
        write(kind, *value, metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn write<N>(kind: MetricType, value: N, sample: MetricEncoder) -> std::fmt::Result
where
    N: EncodeCounterValue + EncodeGaugeValue + std::fmt::Debug,
{
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(sample),
        _ => ConstGauge::new(value).encode(sample),
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let stats = &self.stats;
        for (kind, names) in [
            ("loadbalancer", &["loadbalancer"][..]),
            ("listener", &["loadbalancer", "listener"][..]),
            ("pool", &["loadbalancer", "pool"][..]),
            ("member", &["loadbalancer", "pool", "member"][..]),
        ] {
            for (field, metric_kind, help) in [
                (
                    "active_connections",
                    MetricType::Gauge,
                    "Open connections (flows; requests in flight through the proxy).",
                ),
                ("bytes_in", MetricType::Counter, "Bytes from clients."),
                ("bytes_out", MetricType::Counter, "Bytes to clients."),
                (
                    "total_connections",
                    MetricType::Counter,
                    "Connections (flows, proxied requests) handled.",
                ),
                (
                    "request_errors",
                    MetricType::Counter,
                    "Failed requests (HTTP listeners).",
                ),
            ] {
                let samples = stats
                    .objects
                    .iter()
                    .filter(|o| o.kind == kind)
                    .map(|o| {
                        let parts: Vec<&str> = o.name.splitn(3, '/').collect();
                        let pairs: Vec<(&str, &str)> =
                            names.iter().copied().zip(parts.iter().copied()).collect();
                        let value = match field {
                            "active_connections" => o.active_connections,
                            "bytes_in" => o.bytes_in,
                            "bytes_out" => o.bytes_out,
                            "total_connections" => o.total_connections,
                            _ => o.request_errors,
                        };
                        (labels(&pairs), value)
                    })
                    .collect();
                family(
                    &mut encoder,
                    &format!("lbaas_{kind}_{field}"),
                    help,
                    metric_kind,
                    samples,
                )?;
            }
        }
        let listener = |l: &crate::api::ListenerCounters| {
            labels(&[("loadbalancer", &l.loadbalancer), ("listener", &l.listener)])
        };
        family(
            &mut encoder,
            "lbaas_listener_refused_connections",
            "New connections refused (connection limit, allowed_cidrs).",
            MetricType::Counter,
            stats
                .listeners
                .iter()
                .map(|l| (listener(l), l.refused_connections))
                .collect(),
        )?;
        family(
            &mut encoder,
            "lbaas_listener_member_errors",
            "Requests the proxy answered itself because no member could (502, 503, 504).",
            MetricType::Counter,
            stats
                .listeners
                .iter()
                .map(|l| (listener(l), l.member_errors))
                .collect(),
        )?;
        let (mut up, mut operating) = (Vec::new(), Vec::new());
        for s in &self.status.loadbalancers {
            let lb = &s.statuses.loadbalancer;
            let mut seen = std::collections::BTreeSet::new();
            for p in lb.listeners.iter().flat_map(|l| &l.pools) {
                for m in &p.members {
                    if !seen.insert((p.name.clone(), m.id.clone())) {
                        continue;
                    }
                    let member = [
                        ("loadbalancer", lb.name.as_str()),
                        ("pool", p.name.as_str()),
                        ("member", m.id.as_str()),
                    ];
                    let is_up = matches!(m.operating_status.as_str(), "ONLINE" | "NO_MONITOR");
                    up.push((labels(&member), u64::from(is_up)));
                    let mut with_status = member.to_vec();
                    with_status.push(("status", m.operating_status.as_str()));
                    operating.push((labels(&with_status), 1u64));
                }
            }
        }
        family(
            &mut encoder,
            "lbaas_member_up",
            "1 when a member may get new connections by its operating status (ONLINE, NO_MONITOR), else 0.",
            MetricType::Gauge,
            up,
        )?;
        family(
            &mut encoder,
            "lbaas_member_operating_status",
            "1 for the member's current Octavia operating status.",
            MetricType::Gauge,
            operating,
        )?;
        family(
            &mut encoder,
            "lbaas_datapath_packets",
            "Packets by what the data path did with them.",
            MetricType::Counter,
            stats
                .datapath
                .iter()
                .map(|(reason, v)| (labels(&[("reason", reason)]), *v))
                .collect(),
        )?;
        let d = &self.daemon;
        for (name, help, kind, value) in [
            (
                "lbaas_conntrack_entries",
                "Connection-table entries at the last sweep.",
                MetricType::Gauge,
                d.conntrack_entries,
            ),
            (
                "lbaas_conntrack_size",
                "Connection-table capacity.",
                MetricType::Gauge,
                d.conntrack_size,
            ),
            (
                "lbaas_applies",
                "Configuration applies.",
                MetricType::Counter,
                d.applies,
            ),
            (
                "lbaas_apply_failures",
                "Applies refused or rolled back.",
                MetricType::Counter,
                d.apply_failures,
            ),
            (
                "lbaas_map_update_errors",
                "Map writes that failed (the apply was rolled back).",
                MetricType::Counter,
                d.map_update_errors,
            ),
        ] {
            family(&mut encoder, name, help, kind, vec![(Labels::new(), value)])?;
        }
        family(
            &mut encoder,
            "lbaas_apply_duration_seconds",
            "Time spent applying configurations.",
            MetricType::Counter,
            vec![(Labels::new(), d.apply_seconds_sum)],
        )?;
        Ok(())
    }
}

/// Renders every metric (OpenMetrics text).
pub fn render(
    stats: StatsResponse,
    status: StatusResponse,
    daemon: &DaemonFigures,
    latency: &Arc<CheckLatency>,
) -> String {
    let mut registry = Registry::default();
    registry.register(
        "lbaas_health_check_duration_seconds",
        "Health-check durations by monitor type and result.",
        (**latency).clone(),
    );
    registry.register_collector(Box::new(Scrape {
        stats,
        status,
        daemon: *daemon,
    }));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        return format!("# error rendering metrics: {e}\n");
    }
    out
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
        let latency = check_latency();
        latency
            .get_or_create(&vec![
                ("type".to_string(), "HTTP".to_string()),
                ("result".to_string(), "ok".to_string()),
            ])
            .observe(0.003);
        let text = render(
            stats,
            StatusResponse::default(),
            &DaemonFigures {
                conntrack_size: 1024,
                ..Default::default()
            },
            &latency,
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
        assert!(text.contains("lbaas_conntrack_size 1024\n"), "{text}");
        assert!(text.contains("# TYPE lbaas_health_check_duration_seconds histogram\n"));
        assert!(text.contains(
            "lbaas_health_check_duration_seconds_bucket{le=\"0.004\",type=\"HTTP\",result=\"ok\"} 1\n"
        ), "{text}");
        assert!(text.ends_with("# EOF\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("name and value");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
