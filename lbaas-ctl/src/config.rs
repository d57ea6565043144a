//! The declarative YAML model (Octavia v2 object names and defaults) and its validation.
//!
//! Enumerated fields deserialize into enums with an `Invalid` variant and numbers into `i64`,
//! so that a file with several mistakes is read whole and [`validate`] can report every error
//! at once, each with its YAML path. Only malformed YAML or a wrong shape (a list where a map
//! belongs, an unknown key) stops at the first error, which the YAML parser locates by line.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::Path, str::FromStr};

use serde::{Deserialize, Serialize};

/// Octavia's upper bound for listener timeouts, in milliseconds.
pub const MAX_TIMEOUT_MS: i64 = 2_073_600_000;
/// Octavia's limit on name and description lengths.
const MAX_NAME_LEN: usize = 255;

/// Defines a string enum with Octavia's spellings and an `Invalid` catch-all, so that an
/// unknown value is a validation error with a path instead of a parse failure.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
            /// A value Octavia does not define; reported by [`validate`].
            Invalid(String),
        }

        impl $name {
            /// Every valid spelling, for error messages.
            pub const ALL: &'static [&'static str] = &[$($text),+];

            /// The Octavia spelling.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)+
                    Self::Invalid(other) => other,
                }
            }
        }

        impl From<String> for $name {
            fn from(text: String) -> Self {
                match text.as_str() {
                    $($text => Self::$variant,)+
                    _ => Self::Invalid(text),
                }
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.as_str().to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// Listener protocol.
    ListenerProtocol {
        /// TCP, balanced in XDP.
        Tcp => "TCP",
        /// UDP, balanced in XDP.
        Udp => "UDP",
        /// TLS passthrough, balanced in XDP like TCP.
        Https => "HTTPS",
        /// HTTP, served by the userspace proxy.
        Http => "HTTP",
        /// TLS terminated by the userspace proxy.
        TerminatedHttps => "TERMINATED_HTTPS",
    }
);

string_enum!(
    /// Pool protocol.
    PoolProtocol {
        /// TCP.
        Tcp => "TCP",
        /// UDP.
        Udp => "UDP",
        /// HTTP.
        Http => "HTTP",
        /// HTTPS.
        Https => "HTTPS",
        /// HAProxy PROXY protocol v1.
        Proxy => "PROXY",
        /// HAProxy PROXY protocol v2.
        ProxyV2 => "PROXYV2",
    }
);

string_enum!(
    /// Member selection algorithm.
    LbAlgorithm {
        /// Weighted round robin.
        RoundRobin => "ROUND_ROBIN",
        /// Fewest active connections.
        LeastConnections => "LEAST_CONNECTIONS",
        /// Consistent hash of the source address.
        SourceIp => "SOURCE_IP",
        /// Consistent hash of the 5-tuple.
        SourceIpPort => "SOURCE_IP_PORT",
    }
);

string_enum!(
    /// Session persistence type.
    PersistenceType {
        /// By client address.
        SourceIp => "SOURCE_IP",
        /// By a cookie the proxy inserts.
        HttpCookie => "HTTP_COOKIE",
        /// By the application's own cookie.
        AppCookie => "APP_COOKIE",
    }
);

string_enum!(
    /// Health monitor type.
    MonitorType {
        /// ICMP echo.
        Ping => "PING",
        /// TCP connect.
        Tcp => "TCP",
        /// HTTP request.
        Http => "HTTP",
        /// HTTPS request.
        Https => "HTTPS",
        /// TLS handshake.
        TlsHello => "TLS-HELLO",
        /// UDP datagram, ICMP unreachable means down.
        UdpConnect => "UDP-CONNECT",
    }
);

string_enum!(
    /// HTTP method of HTTP/HTTPS health checks.
    HttpMethod {
        /// GET.
        Get => "GET",
        /// HEAD.
        Head => "HEAD",
        /// POST.
        Post => "POST",
        /// PUT.
        Put => "PUT",
        /// DELETE.
        Delete => "DELETE",
        /// TRACE.
        Trace => "TRACE",
        /// OPTIONS.
        Options => "OPTIONS",
        /// CONNECT.
        Connect => "CONNECT",
        /// PATCH.
        Patch => "PATCH",
    }
);

string_enum!(
    /// L7 policy action.
    L7Action {
        /// Send the request to another pool.
        RedirectToPool => "REDIRECT_TO_POOL",
        /// Answer with a redirect to a URL.
        RedirectToUrl => "REDIRECT_TO_URL",
        /// Answer with a redirect to a prefix plus the request path.
        RedirectPrefix => "REDIRECT_PREFIX",
        /// Answer 403.
        Reject => "REJECT",
    }
);

string_enum!(
    /// L7 rule type.
    L7RuleType {
        /// Host header.
        HostName => "HOST_NAME",
        /// Request path.
        Path => "PATH",
        /// Extension of the path.
        FileType => "FILE_TYPE",
        /// A header, named by `key`.
        Header => "HEADER",
        /// A cookie, named by `key`.
        Cookie => "COOKIE",
    }
);

string_enum!(
    /// L7 rule comparison.
    CompareType {
        /// Regular expression.
        Regex => "REGEX",
        /// Prefix.
        StartsWith => "STARTS_WITH",
        /// Suffix.
        EndsWith => "ENDS_WITH",
        /// Substring.
        Contains => "CONTAINS",
        /// Equality.
        EqualTo => "EQUAL_TO",
    }
);

fn yes() -> bool {
    true
}
fn minus_one() -> i64 {
    -1
}
fn one() -> i64 {
    1
}
fn three() -> i64 {
    3
}
fn timeout_client_data() -> i64 {
    50_000
}
fn timeout_member_connect() -> i64 {
    5_000
}
fn timeout_member_data() -> i64 {
    50_000
}
fn redirect_http_code() -> i64 {
    302
}

/// A whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The load balancers, each identified by its name.
    #[serde(default)]
    pub loadbalancers: Vec<LoadBalancer>,
}

/// A load balancer: one VIP and its listeners and pools.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancer {
    /// Unique name; the identity used by `apply`, `get` and `delete`.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// The virtual IP address.
    pub vip_address: String,
    /// `false` disables every listener of the load balancer.
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    /// Listeners on the VIP.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Pools the listeners use.
    #[serde(default)]
    pub pools: Vec<Pool>,
}

/// A listener: a protocol and port on the VIP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Unique name within the load balancer.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Protocol.
    pub protocol: ListenerProtocol,
    /// Port, 1-65535.
    pub protocol_port: i64,
    /// Name of the pool new connections go to.
    #[serde(default)]
    pub default_pool: Option<String>,
    /// Maximum concurrent connections, -1 for unlimited.
    #[serde(default = "minus_one")]
    pub connection_limit: i64,
    /// `false` refuses new connections on this listener.
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    /// Client inactivity timeout, ms.
    #[serde(default = "timeout_client_data")]
    pub timeout_client_data: i64,
    /// Member connect timeout, ms.
    #[serde(default = "timeout_member_connect")]
    pub timeout_member_connect: i64,
    /// Member inactivity timeout, ms.
    #[serde(default = "timeout_member_data")]
    pub timeout_member_data: i64,
    /// Time to wait for content inspection, ms.
    #[serde(default)]
    pub timeout_tcp_inspect: i64,
    /// Headers the proxy adds (HTTP listeners only).
    #[serde(default)]
    pub insert_headers: BTreeMap<String, String>,
    /// Source prefixes allowed to connect; empty allows all.
    #[serde(default)]
    pub allowed_cidrs: Vec<String>,
    /// Certificate reference for TERMINATED_HTTPS: a PEM file holding the certificate chain
    /// and its private key (what Octavia keeps in a Barbican container).
    #[serde(default)]
    pub default_tls_container_ref: Option<String>,
    /// More certificates (PEM files as above), chosen by the name the client asks for (SNI);
    /// the default certificate answers other names.
    #[serde(default)]
    pub sni_container_refs: Vec<String>,
    /// L7 policies (HTTP listeners only).
    #[serde(default)]
    pub l7policies: Vec<L7Policy>,
}

/// An L7 policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L7Policy {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// What to do when every rule matches.
    pub action: L7Action,
    /// Evaluation order, 1 first.
    #[serde(default)]
    pub position: Option<i64>,
    /// Target pool of REDIRECT_TO_POOL.
    #[serde(default)]
    pub redirect_pool: Option<String>,
    /// Target of REDIRECT_TO_URL.
    #[serde(default)]
    pub redirect_url: Option<String>,
    /// Target of REDIRECT_PREFIX.
    #[serde(default)]
    pub redirect_prefix: Option<String>,
    /// Status code of redirects.
    #[serde(default = "redirect_http_code")]
    pub redirect_http_code: i64,
    /// Enabled.
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    /// The rules, all of which must match.
    #[serde(default)]
    pub rules: Vec<L7Rule>,
}

/// An L7 rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L7Rule {
    /// What part of the request is compared.
    #[serde(rename = "type")]
    pub rule_type: L7RuleType,
    /// How it is compared.
    pub compare_type: CompareType,
    /// The value compared with.
    pub value: String,
    /// Header or cookie name for HEADER and COOKIE rules.
    #[serde(default)]
    pub key: Option<String>,
    /// Negates the match.
    #[serde(default)]
    pub invert: bool,
    /// Enabled.
    #[serde(default = "yes")]
    pub admin_state_up: bool,
}

/// A pool of members.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// Unique name within the load balancer.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Protocol spoken to members.
    pub protocol: PoolProtocol,
    /// Selection algorithm.
    pub lb_algorithm: LbAlgorithm,
    /// Stickiness.
    #[serde(default)]
    pub session_persistence: Option<SessionPersistence>,
    /// `false` refuses new connections to the pool.
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    /// The proxy speaks TLS to the members (re-encryption; certificates not verified, as
    /// Octavia without a CA reference). Proxied (HTTP) pools only.
    #[serde(default)]
    pub tls_enabled: bool,
    /// Health monitor.
    #[serde(default)]
    pub healthmonitor: Option<HealthMonitor>,
    /// Members.
    #[serde(default)]
    pub members: Vec<Member>,
}

/// Session persistence settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionPersistence {
    /// Type.
    #[serde(rename = "type")]
    pub persistence_type: PersistenceType,
    /// Cookie of APP_COOKIE.
    #[serde(default)]
    pub cookie_name: Option<String>,
    /// UDP only: seconds.
    #[serde(default)]
    pub persistence_timeout: Option<i64>,
    /// UDP only: netmask.
    #[serde(default)]
    pub persistence_granularity: Option<String>,
}

/// A health monitor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthMonitor {
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Type.
    #[serde(rename = "type")]
    pub monitor_type: MonitorType,
    /// Seconds between checks.
    pub delay: i64,
    /// Seconds a check may take.
    pub timeout: i64,
    /// Successes before a member is up, 1-10.
    pub max_retries: i64,
    /// Failures before a member is down, 1-10.
    #[serde(default = "three")]
    pub max_retries_down: i64,
    /// HTTP method (HTTP/HTTPS).
    #[serde(default)]
    pub http_method: Option<HttpMethod>,
    /// Path (HTTP/HTTPS).
    #[serde(default)]
    pub url_path: Option<String>,
    /// Expected status codes (HTTP/HTTPS): `200`, `200,202`, `200-204`.
    #[serde(default)]
    pub expected_codes: Option<String>,
    /// Enabled.
    #[serde(default = "yes")]
    pub admin_state_up: bool,
}

/// A member of a pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Name (optional; address and port identify the member).
    #[serde(default)]
    pub name: String,
    /// Address.
    pub address: String,
    /// Port, 1-65535.
    pub protocol_port: i64,
    /// Weight, 0-256; 0 drains.
    #[serde(default = "one")]
    pub weight: i64,
    /// `false` takes the member out of service.
    #[serde(default = "yes")]
    pub admin_state_up: bool,
    /// Used only when every non-backup member is down.
    #[serde(default)]
    pub backup: bool,
    /// Address health checks go to instead.
    #[serde(default)]
    pub monitor_address: Option<String>,
    /// Port health checks go to instead.
    #[serde(default)]
    pub monitor_port: Option<i64>,
}

impl Member {
    /// The member's address, once validated.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.address.parse().ok()
    }
}

impl LoadBalancer {
    /// The VIP, once validated.
    pub fn vip(&self) -> Option<Ipv4Addr> {
        self.vip_address.parse().ok()
    }

    /// The pool a listener sends new connections to.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }
}

impl ListenerProtocol {
    /// True for protocols the XDP data path balances; false for the userspace proxy's.
    pub fn is_l4(&self) -> bool {
        matches!(self, Self::Tcp | Self::Udp | Self::Https)
    }

    /// The IP protocol the listener receives.
    pub fn ip_protocol(&self) -> u8 {
        match self {
            Self::Udp => lbaas_common::IPPROTO_UDP,
            _ => lbaas_common::IPPROTO_TCP,
        }
    }

    /// Pool protocols Octavia allows behind this listener protocol.
    fn allowed_pools(&self) -> &'static [&'static str] {
        match self {
            Self::Tcp => &["HTTP", "HTTPS", "PROXY", "PROXYV2", "TCP"],
            Self::Http | Self::TerminatedHttps => &["HTTP", "PROXY", "PROXYV2"],
            Self::Https => &["HTTPS", "PROXY", "PROXYV2", "TCP"],
            Self::Udp => &["UDP"],
            Self::Invalid(_) => &[],
        }
    }
}

/// One validation problem, located by its YAML path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationError {
    /// Path such as `loadbalancers[0].listeners[1].protocol_port`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not YAML of the expected shape.
    #[error("{origin}: {message}")]
    Parse {
        /// File name or `<input>`.
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The model breaks one or more rules; all of them are listed.
    #[error("{origin}: {} error(s):\n{}", .errors.len(), list(.errors))]
    Invalid {
        /// File name or `<input>`.
        origin: String,
        /// Every problem found.
        errors: Vec<ValidationError>,
    },
}

fn list(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Parses YAML text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    if text.trim().is_empty() {
        return Ok(Config::default());
    }
    serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Parse {
        origin: origin.to_string(),
        message: e.to_string(),
    })
}

/// Parses and validates YAML text.
pub fn load_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let config = parse(text, origin)?;
    let errors = validate(&config);
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            origin: origin.to_string(),
            errors,
        })
    }
}

/// Reads, parses and validates a file.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: origin.clone(),
        source,
    })?;
    load_str(&text, &origin)
}

/// Collects errors under a path prefix.
struct Checker {
    errors: Vec<ValidationError>,
}

impl Checker {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ValidationError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn range(&mut self, path: String, value: i64, min: i64, max: i64) {
        if value < min || value > max {
            self.error(path, format!("{value} is out of range {min}-{max}"));
        }
    }

    fn text(&mut self, path: String, value: &str, required: bool) {
        if required && value.trim().is_empty() {
            self.error(path, "is required and must not be empty");
        } else if value.chars().count() > MAX_NAME_LEN {
            self.error(path, format!("is longer than {MAX_NAME_LEN} characters"));
        }
    }

    fn enum_value(&mut self, path: String, shown: &str, invalid: bool, all: &[&str]) {
        if invalid {
            self.error(path, format!("{shown:?} is not one of {}", all.join(", ")));
        }
    }

    fn not_yet(&mut self, path: String, what: &str) {
        self.error(path, format!("{what} is not supported yet"));
    }
}

macro_rules! check_enum {
    ($checker:expr, $path:expr, $value:expr, $ty:ident) => {
        $checker.enum_value(
            $path,
            $value.as_str(),
            matches!($value, $ty::Invalid(_)),
            $ty::ALL,
        )
    };
}

/// Checks a configuration against Octavia's rules (and what this version supports); returns
/// every error found, empty when the configuration is valid.
pub fn validate(config: &Config) -> Vec<ValidationError> {
    let mut c = Checker { errors: Vec::new() };
    let mut lb_names = BTreeMap::new();
    let mut endpoints: BTreeMap<(Ipv4Addr, u8, i64), String> = BTreeMap::new();
    for (i, lb) in config.loadbalancers.iter().enumerate() {
        let at = format!("loadbalancers[{i}]");
        c.text(format!("{at}.name"), &lb.name, true);
        if let Some(first) = lb_names.insert(lb.name.clone(), i) {
            c.error(
                format!("{at}.name"),
                format!("{:?} is already used by loadbalancers[{first}]", lb.name),
            );
        }
        c.text(format!("{at}.description"), &lb.description, false);
        let vip = validate_vip(&mut c, &at, &lb.vip_address);
        let mut listener_names = BTreeMap::new();
        for (j, listener) in lb.listeners.iter().enumerate() {
            let lat = format!("{at}.listeners[{j}]");
            if let Some(first) = listener_names.insert(listener.name.clone(), j) {
                c.error(
                    format!("{lat}.name"),
                    format!(
                        "{:?} is already used by {at}.listeners[{first}]",
                        listener.name
                    ),
                );
            }
            validate_listener(&mut c, &lat, listener, lb);
            // The data path keys listeners by VIP, IP protocol and port.
            if let Some(vip) = vip {
                let key = (vip, listener.protocol.ip_protocol(), listener.protocol_port);
                if let Some(first) = endpoints.insert(key, lat.clone()) {
                    c.error(
                        format!("{lat}.protocol_port"),
                        format!(
                            "{} port {} on {vip} is already used by {first}",
                            if key.1 == lbaas_common::IPPROTO_UDP {
                                "UDP"
                            } else {
                                "TCP"
                            },
                            listener.protocol_port
                        ),
                    );
                }
            }
        }
        let mut pool_names = BTreeMap::new();
        for (j, pool) in lb.pools.iter().enumerate() {
            let pat = format!("{at}.pools[{j}]");
            if let Some(first) = pool_names.insert(pool.name.clone(), j) {
                c.error(
                    format!("{pat}.name"),
                    format!("{:?} is already used by {at}.pools[{first}]", pool.name),
                );
            }
            validate_pool(&mut c, &pat, pool);
        }
    }
    check_capacity(&mut c, config);
    c.errors
}

/// The data path's fixed capacities, checked before anything is written: a configuration
/// that cannot fit is refused whole with the limit it hits, never half applied.
fn check_capacity(c: &mut Checker, config: &Config) {
    use lbaas_common::{MAX_LISTENERS, MAX_MEMBERS, MAX_VIPS, RING_SLOTS};
    let listeners: usize = config
        .loadbalancers
        .iter()
        .map(|lb| lb.listeners.len())
        .sum();
    let members: usize = config
        .loadbalancers
        .iter()
        .flat_map(|lb| &lb.pools)
        .map(|p| p.members.len())
        .sum();
    if listeners > MAX_LISTENERS.min(MAX_VIPS) as usize {
        c.error(
            "loadbalancers",
            format!(
                "{listeners} listeners in all; the data path holds {}",
                MAX_LISTENERS.min(MAX_VIPS)
            ),
        );
    }
    if members > MAX_MEMBERS as usize {
        c.error(
            "loadbalancers",
            format!("{members} members in all; the data path holds {MAX_MEMBERS}"),
        );
    }
    // Ring slots each listener's table needs at most (round robin: the sum of weights;
    // least connections: one per member; Maglev: the table), twice over while a change is
    // made beside the live table.
    let mut slots: u64 = 0;
    for lb in &config.loadbalancers {
        for l in &lb.listeners {
            let Some(pool) = l.default_pool.as_deref().and_then(|p| lb.pool(p)) else {
                continue;
            };
            let n = pool.members.len() as u64;
            slots += match pool.lb_algorithm {
                LbAlgorithm::LeastConnections => n,
                LbAlgorithm::SourceIp | LbAlgorithm::SourceIpPort => {
                    u64::from(crate::maglev::default_table_size(pool.members.len()))
                }
                _ if pool.session_persistence.is_some() => {
                    u64::from(crate::maglev::default_table_size(pool.members.len()))
                }
                _ => pool
                    .members
                    .iter()
                    .map(|m| m.weight.clamp(0, 256) as u64)
                    .sum(),
            };
        }
    }
    if slots * 2 > u64::from(RING_SLOTS) {
        c.error(
            "loadbalancers",
            format!(
                "the listeners' selection tables need up to {slots} slots (twice that while changing); the data path holds {RING_SLOTS}"
            ),
        );
    }
}

/// Headers a listener's `insert_headers` may name (the subset of Octavia's list the proxy
/// implements; the X-SSL-Client ones need client certificates, which we do not take yet).
pub const INSERT_HEADERS: [&str; 3] = ["X-Forwarded-For", "X-Forwarded-Port", "X-Forwarded-Proto"];

fn validate_vip(c: &mut Checker, at: &str, vip: &str) -> Option<Ipv4Addr> {
    let path = format!("{at}.vip_address");
    match vip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4))
            if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() =>
        {
            c.error(path, format!("{vip} is not a unicast address"));
            None
        }
        Ok(std::net::IpAddr::V4(v4)) => Some(v4),
        Ok(std::net::IpAddr::V6(_)) => {
            c.not_yet(path, "an IPv6 VIP");
            None
        }
        Err(_) => {
            c.error(path, format!("{vip:?} is not an IP address"));
            None
        }
    }
}

fn validate_listener(c: &mut Checker, at: &str, l: &Listener, lb: &LoadBalancer) {
    c.text(format!("{at}.name"), &l.name, true);
    c.text(format!("{at}.description"), &l.description, false);
    check_enum!(c, format!("{at}.protocol"), l.protocol, ListenerProtocol);
    c.range(format!("{at}.protocol_port"), l.protocol_port, 1, 65535);
    if l.connection_limit < -1 || l.connection_limit > i64::from(i32::MAX) {
        c.error(
            format!("{at}.connection_limit"),
            format!(
                "{} must be -1 (unlimited) or 0-{}",
                l.connection_limit,
                i32::MAX
            ),
        );
    }
    for (name, value) in [
        ("timeout_client_data", l.timeout_client_data),
        ("timeout_member_connect", l.timeout_member_connect),
        ("timeout_member_data", l.timeout_member_data),
        ("timeout_tcp_inspect", l.timeout_tcp_inspect),
    ] {
        c.range(format!("{at}.{name}"), value, 0, MAX_TIMEOUT_MS);
    }
    let http = matches!(
        l.protocol,
        ListenerProtocol::Http | ListenerProtocol::TerminatedHttps
    );
    if !l.insert_headers.is_empty() && !http {
        c.error(
            format!("{at}.insert_headers"),
            format!(
                "is only allowed on HTTP and TERMINATED_HTTPS listeners, not {}",
                l.protocol
            ),
        );
    }
    if l.protocol == ListenerProtocol::TerminatedHttps && l.default_tls_container_ref.is_none() {
        c.error(
            format!("{at}.default_tls_container_ref"),
            "is required for TERMINATED_HTTPS listeners",
        );
    }
    for (k, cidr) in l.allowed_cidrs.iter().enumerate() {
        match parse_cidr(cidr) {
            None => c.error(
                format!("{at}.allowed_cidrs[{k}]"),
                format!("{cidr:?} is not a CIDR such as 192.0.2.0/24"),
            ),
            // As Octavia: the CIDR's IP version must be the VIP's, or it could never match.
            Some((std::net::IpAddr::V6(_), _)) => c.error(
                format!("{at}.allowed_cidrs[{k}]"),
                format!("{cidr:?} is IPv6 but the VIP is IPv4; no client could match it"),
            ),
            Some(_) => {}
        }
    }
    if let Some(pool_name) = &l.default_pool {
        match lb.pool(pool_name) {
            None => c.error(
                format!("{at}.default_pool"),
                format!("no pool named {pool_name:?} in this load balancer"),
            ),
            Some(pool) => {
                if !http
                    && let Some(sp) = &pool.session_persistence
                    && matches!(
                        sp.persistence_type,
                        PersistenceType::HttpCookie | PersistenceType::AppCookie
                    )
                {
                    c.error(
                        format!("{at}.default_pool"),
                        format!(
                            "pool {pool_name:?} has {} persistence, which needs an HTTP or TERMINATED_HTTPS listener; a {} listener does not read HTTP",
                            sp.persistence_type, l.protocol
                        ),
                    );
                }
                let allowed = l.protocol.allowed_pools();
                if !matches!(pool.protocol, PoolProtocol::Invalid(_))
                    && !matches!(l.protocol, ListenerProtocol::Invalid(_))
                    && !allowed.contains(&pool.protocol.as_str())
                {
                    c.error(
                        format!("{at}.default_pool"),
                        format!(
                            "pool {pool_name:?} has protocol {}, but a {} listener allows {}",
                            pool.protocol,
                            l.protocol,
                            allowed.join(", ")
                        ),
                    );
                }
            }
        }
    }
    if !http && !l.l7policies.is_empty() {
        c.error(
            format!("{at}.l7policies"),
            format!(
                "are only allowed on HTTP and TERMINATED_HTTPS listeners, not {}",
                l.protocol
            ),
        );
    }
    for (k, policy) in l.l7policies.iter().enumerate() {
        validate_policy(c, &format!("{at}.l7policies[{k}]"), policy, lb);
    }
    if !l.sni_container_refs.is_empty() && l.protocol != ListenerProtocol::TerminatedHttps {
        c.error(
            format!("{at}.sni_container_refs"),
            format!(
                "are only allowed on TERMINATED_HTTPS listeners, not {}",
                l.protocol
            ),
        );
    }
    for key in l.insert_headers.keys() {
        if !INSERT_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(key)) {
            c.error(
                format!("{at}.insert_headers.{key}"),
                format!(
                    "is not a header the proxy inserts ({})",
                    INSERT_HEADERS.join(", ")
                ),
            );
        }
    }
}

/// Parses `a.b.c.d/n` into address and prefix length.
pub fn parse_cidr(text: &str) -> Option<(std::net::IpAddr, u8)> {
    let (addr, len) = text.split_once('/')?;
    let addr: std::net::IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((addr, len))
}

fn validate_policy(c: &mut Checker, at: &str, p: &L7Policy, lb: &LoadBalancer) {
    c.text(format!("{at}.name"), &p.name, false);
    check_enum!(c, format!("{at}.action"), p.action, L7Action);
    if let Some(position) = p.position {
        c.range(format!("{at}.position"), position, 1, 2_147_483_647);
    }
    match p.action {
        L7Action::RedirectToPool => match &p.redirect_pool {
            None => c.error(
                format!("{at}.redirect_pool"),
                "is required for REDIRECT_TO_POOL",
            ),
            Some(name) if lb.pool(name).is_none() => c.error(
                format!("{at}.redirect_pool"),
                format!("no pool named {name:?} in this load balancer"),
            ),
            Some(_) => {}
        },
        L7Action::RedirectToUrl => match &p.redirect_url {
            None => c.error(
                format!("{at}.redirect_url"),
                "is required for REDIRECT_TO_URL",
            ),
            Some(url) if !is_http_url(url) => c.error(
                format!("{at}.redirect_url"),
                format!("{url:?} is not an http(s) URL"),
            ),
            Some(_) => {}
        },
        L7Action::RedirectPrefix => match &p.redirect_prefix {
            None => c.error(
                format!("{at}.redirect_prefix"),
                "is required for REDIRECT_PREFIX",
            ),
            Some(url) if !is_http_url(url) => c.error(
                format!("{at}.redirect_prefix"),
                format!("{url:?} is not an http(s) URL"),
            ),
            Some(_) => {}
        },
        L7Action::Reject | L7Action::Invalid(_) => {}
    }
    if ![301, 302, 303, 307, 308].contains(&p.redirect_http_code) {
        c.error(
            format!("{at}.redirect_http_code"),
            format!(
                "{} is not one of 301, 302, 303, 307, 308",
                p.redirect_http_code
            ),
        );
    }
    if p.rules.len() > 50 {
        c.error(
            format!("{at}.rules"),
            format!("{} rules; at most 50 are allowed", p.rules.len()),
        );
    }
    for (k, rule) in p.rules.iter().enumerate() {
        validate_rule(c, &format!("{at}.rules[{k}]"), rule);
    }
}

fn is_http_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace))
}

/// True for a valid HTTP token (header or cookie name).
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn validate_rule(c: &mut Checker, at: &str, r: &L7Rule) {
    check_enum!(c, format!("{at}.type"), r.rule_type, L7RuleType);
    check_enum!(c, format!("{at}.compare_type"), r.compare_type, CompareType);
    c.text(format!("{at}.value"), &r.value, true);
    if r.value.contains(['\r', '\n']) {
        c.error(format!("{at}.value"), "must not contain CR or LF");
    }
    if matches!(r.rule_type, L7RuleType::Header | L7RuleType::Cookie) {
        match &r.key {
            None => c.error(
                format!("{at}.key"),
                format!("is required for {} rules", r.rule_type),
            ),
            Some(key) if !is_token(key) => c.error(
                format!("{at}.key"),
                format!("{key:?} is not a valid header or cookie name"),
            ),
            Some(_) => {}
        }
    }
    if r.compare_type == CompareType::Regex
        && let Err(message) = crate::proxy::rules::compile_regex(&r.value)
    {
        c.error(format!("{at}.value"), message);
    }
    if r.rule_type == L7RuleType::FileType
        && !matches!(
            r.compare_type,
            CompareType::Regex | CompareType::EqualTo | CompareType::Invalid(_)
        )
    {
        c.error(
            format!("{at}.compare_type"),
            format!(
                "FILE_TYPE rules allow REGEX or EQUAL_TO, not {}",
                r.compare_type
            ),
        );
    }
}

fn validate_pool(c: &mut Checker, at: &str, p: &Pool) {
    c.text(format!("{at}.name"), &p.name, true);
    c.text(format!("{at}.description"), &p.description, false);
    check_enum!(c, format!("{at}.protocol"), p.protocol, PoolProtocol);
    check_enum!(c, format!("{at}.lb_algorithm"), p.lb_algorithm, LbAlgorithm);
    if let Some(sp) = &p.session_persistence {
        validate_persistence(c, &format!("{at}.session_persistence"), sp, &p.protocol);
    }
    if let Some(hm) = &p.healthmonitor {
        validate_monitor(c, &format!("{at}.healthmonitor"), hm, &p.protocol);
    }
    let mut seen = BTreeMap::new();
    for (k, m) in p.members.iter().enumerate() {
        let mat = format!("{at}.members[{k}]");
        validate_member(c, &mat, m);
        if let Some(first) = seen.insert((m.address.clone(), m.protocol_port), k) {
            c.error(
                mat,
                format!(
                    "{}:{} is already a member of this pool ({at}.members[{first}])",
                    m.address, m.protocol_port
                ),
            );
        }
    }
    let max_lc = lbaas_common::MAX_LEAST_CONN_MEMBERS as usize;
    if p.lb_algorithm == LbAlgorithm::LeastConnections && p.members.len() > max_lc {
        c.error(
            format!("{at}.members"),
            format!(
                "{} members; a LEAST_CONNECTIONS pool has at most {max_lc} (the data path scans them per new flow)",
                p.members.len()
            ),
        );
    }
}

fn validate_persistence(
    c: &mut Checker,
    at: &str,
    sp: &SessionPersistence,
    protocol: &PoolProtocol,
) {
    check_enum!(
        c,
        format!("{at}.type"),
        sp.persistence_type,
        PersistenceType
    );
    let cookie = matches!(
        sp.persistence_type,
        PersistenceType::HttpCookie | PersistenceType::AppCookie
    );
    if sp.persistence_type == PersistenceType::AppCookie && sp.cookie_name.is_none() {
        c.error(format!("{at}.cookie_name"), "is required for APP_COOKIE");
    }
    if sp.persistence_type != PersistenceType::AppCookie && sp.cookie_name.is_some() {
        c.error(
            format!("{at}.cookie_name"),
            "is only allowed with APP_COOKIE",
        );
    }
    if let Some(name) = &sp.cookie_name
        && !is_token(name)
    {
        c.error(
            format!("{at}.cookie_name"),
            format!("{name:?} is not a valid cookie name"),
        );
    }
    if cookie && *protocol == PoolProtocol::Udp {
        c.error(
            format!("{at}.type"),
            format!("{} is not allowed on UDP pools", sp.persistence_type),
        );
    }
    if *protocol != PoolProtocol::Udp {
        if sp.persistence_timeout.is_some() {
            c.error(
                format!("{at}.persistence_timeout"),
                "is only allowed on UDP pools",
            );
        }
        if sp.persistence_granularity.is_some() {
            c.error(
                format!("{at}.persistence_granularity"),
                "is only allowed on UDP pools",
            );
        }
    }
}

/// Checks Octavia's `expected_codes` forms: `200`, `200,202`, `200-204` (not mixed).
pub fn valid_expected_codes(codes: &str) -> bool {
    let code = |s: &str| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit());
    if let Some((a, b)) = codes.split_once('-') {
        return code(a) && code(b);
    }
    codes.split(',').all(|part| code(part.trim())) && !codes.trim().is_empty()
}

fn validate_monitor(c: &mut Checker, at: &str, hm: &HealthMonitor, protocol: &PoolProtocol) {
    c.text(format!("{at}.name"), &hm.name, false);
    check_enum!(c, format!("{at}.type"), hm.monitor_type, MonitorType);
    c.range(format!("{at}.delay"), hm.delay, 1, i64::from(i32::MAX));
    c.range(format!("{at}.timeout"), hm.timeout, 1, i64::from(i32::MAX));
    c.range(format!("{at}.max_retries"), hm.max_retries, 1, 10);
    c.range(format!("{at}.max_retries_down"), hm.max_retries_down, 1, 10);
    if hm.timeout >= hm.delay {
        c.error(
            format!("{at}.timeout"),
            format!("{} must be less than delay ({})", hm.timeout, hm.delay),
        );
    }
    let http = matches!(hm.monitor_type, MonitorType::Http | MonitorType::Https);
    if !http {
        for (name, set) in [
            ("http_method", hm.http_method.is_some()),
            ("url_path", hm.url_path.is_some()),
            ("expected_codes", hm.expected_codes.is_some()),
        ] {
            if set {
                c.error(
                    format!("{at}.{name}"),
                    format!(
                        "is only allowed for HTTP and HTTPS monitors, not {}",
                        hm.monitor_type
                    ),
                );
            }
        }
    }
    if let Some(method) = &hm.http_method {
        check_enum!(c, format!("{at}.http_method"), method, HttpMethod);
    }
    if let Some(path) = &hm.url_path
        && (!path.starts_with('/') || path.contains(char::is_whitespace))
    {
        c.error(
            format!("{at}.url_path"),
            format!("{path:?} must be a path starting with /"),
        );
    }
    if let Some(codes) = &hm.expected_codes
        && !valid_expected_codes(codes)
    {
        c.error(
            format!("{at}.expected_codes"),
            format!("{codes:?} is not a code (200), a list (200,202) or a range (200-204)"),
        );
    }
    if hm.monitor_type == MonitorType::UdpConnect {
        if *protocol != PoolProtocol::Udp {
            c.error(
                format!("{at}.type"),
                format!("UDP-CONNECT is only allowed on UDP pools, not {protocol}"),
            );
        }
        if hm.delay < 3 {
            c.error(
                format!("{at}.delay"),
                format!("{} must be at least 3 for UDP-CONNECT", hm.delay),
            );
        }
    }
}

fn validate_member(c: &mut Checker, at: &str, m: &Member) {
    c.text(format!("{at}.name"), &m.name, false);
    match m.address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4))
            if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() =>
        {
            c.error(
                format!("{at}.address"),
                format!("{v4} is not a unicast address"),
            )
        }
        Ok(std::net::IpAddr::V4(_)) => {}
        Ok(std::net::IpAddr::V6(_)) => c.not_yet(format!("{at}.address"), "an IPv6 member"),
        Err(_) => c.error(
            format!("{at}.address"),
            format!("{:?} is not an IP address", m.address),
        ),
    }
    c.range(format!("{at}.protocol_port"), m.protocol_port, 1, 65535);
    c.range(format!("{at}.weight"), m.weight, 0, 256);
    if let Some(addr) = &m.monitor_address
        && std::net::IpAddr::from_str(addr).is_err()
    {
        c.error(
            format!("{at}.monitor_address"),
            format!("{addr:?} is not an IP address"),
        );
    }
    if let Some(port) = m.monitor_port {
        c.range(format!("{at}.monitor_port"), port, 1, 65535);
    }
}

#[cfg(test)]
mod tests;
