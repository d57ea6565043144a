//! Health monitoring: Octavia's monitor types probed from the daemon on tokio, one schedule per
//! member, with rise/fall thresholds. Transitions go to the daemon, which takes a fallen member
//! out of new-flow selection (and reschedules its flows) and puts a risen one back.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    ops::RangeInclusive,
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    sync::{Notify, mpsc},
    task::JoinHandle,
};

use crate::{
    compile::MemberRef,
    config::{Config, HealthMonitor, MonitorType},
};

/// Octavia's `expected_codes`: one code, a list, or a range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedCodes(Vec<RangeInclusive<u16>>);

impl ExpectedCodes {
    /// Parses `200`, `200,202` or `200-204`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        if !crate::config::valid_expected_codes(text) {
            return None;
        }
        if let Some((a, b)) = text.split_once('-') {
            return Some(Self(vec![a.trim().parse().ok()?..=b.trim().parse().ok()?]));
        }
        text.split(',')
            .map(|c| c.trim().parse::<u16>().ok().map(|c| c..=c))
            .collect::<Option<Vec<_>>>()
            .map(Self)
    }

    /// Whether a status code is expected.
    pub fn matches(&self, code: u16) -> bool {
        self.0.iter().any(|r| r.contains(&code))
    }
}

/// What to probe and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Monitor type.
    pub kind: MonitorType,
    /// Where: the member's address and port, or its `monitor_address` / `monitor_port`.
    pub target: SocketAddrV4,
    /// Seconds between probes.
    pub delay: Duration,
    /// How long one probe may take.
    pub timeout: Duration,
    /// Successes that bring a member up.
    pub rise: u32,
    /// Failures that take a member down.
    pub fall: u32,
    /// HTTP method, path and expected codes (HTTP and HTTPS).
    pub http: Option<(String, String, ExpectedCodes)>,
}

impl Probe {
    /// The probe for a member of a pool with a monitor, if the monitor is enabled.
    pub fn for_member(
        monitor: &HealthMonitor,
        address: &str,
        port: i64,
        monitor_address: Option<&str>,
        monitor_port: Option<i64>,
    ) -> Option<Self> {
        if !monitor.admin_state_up {
            return None;
        }
        let addr: Ipv4Addr = monitor_address.unwrap_or(address).parse().ok()?;
        let port = u16::try_from(monitor_port.unwrap_or(port)).ok()?;
        let http =
            matches!(monitor.monitor_type, MonitorType::Http | MonitorType::Https).then(|| {
                let method = monitor
                    .http_method
                    .as_ref()
                    .map_or("GET", |m| m.as_str())
                    .to_string();
                let path = monitor.url_path.clone().unwrap_or_else(|| "/".into());
                let codes = monitor
                    .expected_codes
                    .as_deref()
                    .and_then(ExpectedCodes::parse);
                (
                    method,
                    path,
                    codes.unwrap_or(ExpectedCodes(vec![200..=200])),
                )
            });
        Some(Self {
            kind: monitor.monitor_type.clone(),
            target: SocketAddrV4::new(addr, port),
            delay: Duration::from_secs(monitor.delay.max(1) as u64),
            timeout: Duration::from_secs(monitor.timeout.max(1) as u64),
            rise: monitor.max_retries.clamp(1, 10) as u32,
            fall: monitor.max_retries_down.clamp(1, 10) as u32,
            http,
        })
    }
}

/// Rise/fall bookkeeping of one member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Current state.
    pub up: bool,
    successes: u32,
    failures: u32,
}

impl Default for Thresholds {
    /// A new member starts up (as HAProxy's servers do) and needs `fall` failures to go down.
    fn default() -> Self {
        Self {
            up: true,
            successes: 0,
            failures: 0,
        }
    }
}

impl Thresholds {
    /// Records one probe; returns the new state when it changes.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.up && self.successes >= rise {
                self.up = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.up && self.failures >= fall {
                self.up = false;
                return Some(false);
            }
        }
        None
    }
}

/// Offset of a member's first probe in `[0, delay)`, from its identity: thousands of members
/// with one delay spread over the whole interval instead of probing in lock step, and the
/// offset is stable across restarts.
pub fn jitter(member: &MemberRef, delay: Duration) -> Duration {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let key = format!(
        "{}/{}/{}:{}",
        member.loadbalancer, member.pool, member.addr, member.port
    );
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let nanos = delay.as_nanos().max(1) as u64;
    Duration::from_nanos(h % nanos)
}

/// A member's state changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The member.
    pub member: MemberRef,
    /// Its new state.
    pub up: bool,
    /// Why, e.g. `HTTP 503`, `timeout`, `connection refused`.
    pub reason: String,
}

/// Runs one probe; `Err` carries why it failed.
pub async fn probe(p: &Probe) -> Result<(), String> {
    match tokio::time::timeout(p.timeout, probe_once(p)).await {
        Ok(result) => result,
        Err(_) => Err("timeout".into()),
    }
}

async fn probe_once(p: &Probe) -> Result<(), String> {
    let target = SocketAddr::V4(p.target);
    match p.kind {
        MonitorType::Tcp => connect(target).await.map(|_| ()),
        MonitorType::Http => {
            let stream = connect(target).await?;
            http_check(stream, p).await
        }
        MonitorType::Https => {
            let stream = tls_connect(p.target).await?;
            http_check(stream, p).await
        }
        MonitorType::TlsHello => tls_connect(p.target).await.map(|_| ()),
        MonitorType::UdpConnect => udp_check(p.target).await,
        MonitorType::Ping => {
            let addr = *p.target.ip();
            let timeout = p.timeout;
            tokio::task::spawn_blocking(move || ping(addr, timeout))
                .await
                .map_err(|e| format!("ping task: {e}"))?
        }
        MonitorType::Invalid(ref other) => Err(format!("unknown monitor type {other}")),
    }
}

/// A probe's TCP connection. It is closed with a reset, as HAProxy closes its checks: the
/// prober (which would close first) keeps no TIME_WAIT socket, where 10,000 members at a
/// 1 s delay would leave 600,000 of them (60 s each), past the kernel's table of 262,144.
async fn connect(target: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(target).await.map_err(io_reason)?;
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    Ok(stream)
}

fn io_reason(e: std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::ConnectionReset => "connection reset".into(),
        _ => e.to_string(),
    }
}

async fn http_check<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    p: &Probe,
) -> Result<(), String> {
    let (method, path, codes) = p.http.as_ref().ok_or("no HTTP settings")?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: lbaas-health\r\nConnection: close\r\n\r\n",
        p.target.ip()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(io_reason)?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = stream.read(&mut chunk).await.map_err(io_reason)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let code = line
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| "no HTTP status line".to_string())?;
    if codes.matches(code) {
        Ok(())
    } else {
        Err(format!("HTTP {code}"))
    }
}

/// Accepts any server certificate: Octavia does not verify members' certificates either.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS client configuration that does not verify the server's certificate (Octavia's
/// HTTPS and TLS-HELLO checks, and re-encryption to members, do not either).
pub fn insecure_client_config() -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

async fn tls_connect(
    target: SocketAddrV4,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let connector = tokio_rustls::TlsConnector::from(insecure_client_config());
    let stream = connect(SocketAddr::V4(target)).await?;
    let name = rustls::pki_types::ServerName::IpAddress((*target.ip()).into());
    connector
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))
}

/// UDP-CONNECT: a datagram is sent; an ICMP port unreachable (seen as ECONNREFUSED on the
/// connected socket) means down; an answer or silence until the timeout means up.
async fn udp_check(target: SocketAddrV4) -> Result<(), String> {
    let socket = UdpSocket::bind("0.0.0.0:0").await.map_err(io_reason)?;
    socket
        .connect(SocketAddr::V4(target))
        .await
        .map_err(io_reason)?;
    socket.send(b"lbaas-health\n").await.map_err(io_reason)?;
    let mut buf = [0u8; 512];
    // Unreachables come back in milliseconds; waiting longer only delays the verdict.
    match tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err("ICMP port unreachable".into())
        }
        Ok(Err(e)) => Err(io_reason(e)),
        Ok(Ok(_)) | Err(_) => Ok(()),
    }
}

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// PING: one ICMP echo over a raw socket (the daemon runs as root), answered within `timeout`.
fn ping(addr: Ipv4Addr, timeout: Duration) -> Result<(), String> {
    static SEQ: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
    let ident = (std::process::id() as u16) ^ 0x1b7a;
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // SAFETY: plain socket syscalls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        );
        if fd < 0 {
            return Err(format!(
                "raw ICMP socket: {}",
                std::io::Error::last_os_error()
            ));
        }
        let _close = CloseOnDrop(fd);
        let mut packet = [0u8; 16];
        packet[0] = 8; // echo request
        packet[4..6].copy_from_slice(&ident.to_be_bytes());
        packet[6..8].copy_from_slice(&seq.to_be_bytes());
        packet[8..16].copy_from_slice(b"lbaas-hc");
        let check = icmp_checksum(&packet);
        packet[2..4].copy_from_slice(&check.to_be_bytes());
        let mut to: libc::sockaddr_in = std::mem::zeroed();
        to.sin_family = libc::AF_INET as u16;
        to.sin_addr.s_addr = u32::from_ne_bytes(addr.octets());
        let sent = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const to).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        if sent < 0 {
            return Err(format!("send echo: {}", std::io::Error::last_os_error()));
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err("timeout".into());
            }
            let tv = libc::timeval {
                tv_sec: left.as_secs() as libc::time_t,
                tv_usec: left.subsec_micros().max(1) as libc::suseconds_t,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
            let mut buf = [0u8; 1500];
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                return Err("timeout".into());
            }
            let reply = &buf[..n as usize];
            let ihl = usize::from(reply.first().copied().unwrap_or(0) & 0x0f) * 4;
            if reply.len() < ihl + 8 || reply[12..16] != addr.octets() {
                continue;
            }
            let icmp = &reply[ihl..];
            if icmp[0] == 0 && icmp[4..6] == ident.to_be_bytes() && icmp[6..8] == seq.to_be_bytes()
            {
                return Ok(());
            }
        }
    }
}

struct CloseOnDrop(i32);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned by this guard.
        unsafe { libc::close(self.0) };
    }
}

/// The probes a configuration asks for, per member.
pub fn probes(config: &Config) -> BTreeMap<MemberRef, Probe> {
    let mut out = BTreeMap::new();
    for lb in &config.loadbalancers {
        for pool in &lb.pools {
            let Some(monitor) = &pool.healthmonitor else {
                continue;
            };
            for m in &pool.members {
                let (Some(addr), Ok(port)) = (m.ipv4(), u16::try_from(m.protocol_port)) else {
                    continue;
                };
                let Some(probe) = Probe::for_member(
                    monitor,
                    &m.address,
                    m.protocol_port,
                    m.monitor_address.as_deref(),
                    m.monitor_port,
                ) else {
                    continue;
                };
                let member = MemberRef {
                    loadbalancer: lb.name.clone(),
                    pool: pool.name.clone(),
                    addr,
                    port,
                };
                out.insert(member, probe);
            }
        }
    }
    out
}

/// One task per monitored member, started, restarted and stopped as the configuration changes.
pub struct Monitors {
    tasks: BTreeMap<MemberRef, (Probe, JoinHandle<()>, Arc<Notify>)>,
    transitions: mpsc::UnboundedSender<Transition>,
    latency: Arc<crate::metrics::CheckLatency>,
}

impl Monitors {
    /// Monitors reporting transitions on `transitions` and each check's duration in
    /// `latency`.
    pub fn new(
        transitions: mpsc::UnboundedSender<Transition>,
        latency: Arc<crate::metrics::CheckLatency>,
    ) -> Self {
        Self {
            tasks: BTreeMap::new(),
            transitions,
            latency,
        }
    }

    /// Makes the running probes match `wanted`: new members start probing (up until proven
    /// down), changed probes restart, gone members stop. Returns the members whose probe
    /// (re)started, whose health starts over as up.
    pub fn sync(&mut self, wanted: &BTreeMap<MemberRef, Probe>) -> Vec<MemberRef> {
        let gone: Vec<MemberRef> = self
            .tasks
            .iter()
            .filter(|(m, (p, _, _))| wanted.get(*m) != Some(p))
            .map(|(m, _)| m.clone())
            .collect();
        for member in gone {
            if let Some((_, task, _)) = self.tasks.remove(&member) {
                task.abort();
            }
        }
        let mut started = Vec::new();
        for (member, probe) in wanted {
            if self.tasks.contains_key(member) {
                continue;
            }
            let now = Arc::new(Notify::new());
            let task = tokio::spawn(run(
                member.clone(),
                probe.clone(),
                now.clone(),
                self.transitions.clone(),
                self.latency.clone(),
            ));
            self.tasks
                .insert(member.clone(), (probe.clone(), task, now));
            started.push(member.clone());
        }
        started
    }

    /// Whether a member is monitored.
    pub fn is_monitored(&self, member: &MemberRef) -> bool {
        self.tasks.contains_key(member)
    }

    /// Has a monitored member probed now, rather than at its next tick (the data path saw it
    /// refuse a connection). The probe counts like any other: the member still needs its
    /// `max_retries_down` failed checks in a row to go down. Returns whether it is monitored.
    pub fn probe_now(&self, member: &MemberRef) -> bool {
        let Some((_, _, now)) = self.tasks.get(member) else {
            return false;
        };
        now.notify_one();
        true
    }
}

impl Drop for Monitors {
    fn drop(&mut self) {
        for (_, task, _) in self.tasks.values() {
            task.abort();
        }
    }
}

async fn run(
    member: MemberRef,
    probe: Probe,
    now: Arc<Notify>,
    transitions: mpsc::UnboundedSender<Transition>,
    latency: Arc<crate::metrics::CheckLatency>,
) {
    let mut thresholds = Thresholds::default();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + jitter(&member, probe.delay),
        probe.delay,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = String::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = now.notified() => {}
        }
        let started = std::time::Instant::now();
        let result = crate::health::probe(&probe).await;
        let ok = result.is_ok();
        let labels = vec![
            ("type".to_string(), probe.kind.to_string()),
            (
                "result".to_string(),
                if ok { "ok" } else { "fail" }.to_string(),
            ),
        ];
        latency
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = result {
            last_error = e;
        }
        if let Some(up) = thresholds.record(ok, probe.rise, probe.fall) {
            let reason = if up {
                format!("{} consecutive successful checks", probe.rise)
            } else {
                last_error.clone()
            };
            if transitions
                .send(Transition {
                    member: member.clone(),
                    up,
                    reason,
                })
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_counts() {
        let mut t = Thresholds::default();
        assert!(t.up);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(
            t.record(true, 2, 3),
            None,
            "a success resets the failure count"
        );
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), None);
        assert_eq!(t.record(false, 2, 3), Some(false));
        assert_eq!(t.record(false, 2, 3), None, "already down");
        assert_eq!(t.record(true, 2, 3), None);
        assert_eq!(
            t.record(false, 2, 3),
            None,
            "a failure resets the success count"
        );
        assert_eq!(t.record(true, 2, 3), None);
        assert_eq!(t.record(true, 2, 3), Some(true));
        assert_eq!(t.record(true, 2, 3), None);
    }

    #[test]
    fn expected_codes() {
        let one = ExpectedCodes::parse("200").unwrap();
        assert!(one.matches(200) && !one.matches(201));
        let list = ExpectedCodes::parse("200, 202").unwrap();
        assert!(list.matches(202) && !list.matches(201));
        let range = ExpectedCodes::parse("200-204").unwrap();
        assert!(
            range.matches(200) && range.matches(204) && !range.matches(205) && !range.matches(199)
        );
        assert!(ExpectedCodes::parse("2xx").is_none());
        assert!(ExpectedCodes::parse("200,201-204").is_none());
    }

    #[test]
    fn jitter_is_within_the_delay_stable_and_spread() {
        let delay = Duration::from_secs(5);
        let offsets: Vec<Duration> = (0..1000u32)
            .map(|i| {
                let m = MemberRef {
                    loadbalancer: "lb".into(),
                    pool: "p".into(),
                    addr: Ipv4Addr::from(0x0a00_0000 + i),
                    port: 80,
                };
                let j = jitter(&m, delay);
                assert_eq!(j, jitter(&m, delay), "stable");
                j
            })
            .collect();
        assert!(offsets.iter().all(|j| *j < delay));
        // Spread: every fifth of the interval gets a fair part of 1000 members.
        for k in 0..5u32 {
            let lo = delay * k / 5;
            let hi = delay * (k + 1) / 5;
            let n = offsets.iter().filter(|j| **j >= lo && **j < hi).count();
            assert!((150..=250).contains(&n), "fifth {k}: {n} of 1000");
        }
    }

    #[test]
    fn icmp_checksum_of_a_known_echo() {
        // An echo request with id 1, seq 1 and no payload: checksum 0xf7fd.
        let packet = [8u8, 0, 0, 0, 0, 1, 0, 1];
        assert_eq!(icmp_checksum(&packet), 0xf7fd);
    }

    #[tokio::test]
    async fn tcp_and_http_probes_against_real_sockets() {
        // A listener that answers HTTP 503, on loopback.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                    .await;
            }
        });
        let base = Probe {
            kind: MonitorType::Tcp,
            target: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            delay: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 1,
            fall: 1,
            http: Some((
                "GET".into(),
                "/health".into(),
                ExpectedCodes::parse("200").unwrap(),
            )),
        };
        assert_eq!(probe(&base).await, Ok(()));
        let http = Probe {
            kind: MonitorType::Http,
            ..base.clone()
        };
        assert_eq!(probe(&http).await, Err("HTTP 503".into()));
        let accepting = Probe {
            http: Some((
                "GET".into(),
                "/".into(),
                ExpectedCodes::parse("500-503").unwrap(),
            )),
            ..http
        };
        assert_eq!(probe(&accepting).await, Ok(()));
        // Nothing listens on port 1 of loopback.
        let refused = Probe {
            target: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1),
            ..base
        };
        assert_eq!(probe(&refused).await, Err("connection refused".into()));
    }

    #[tokio::test]
    async fn probes_close_with_a_reset_and_leave_no_time_wait() {
        // A member that waits for the prober to close, then closes too.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        let tcp = Probe {
            kind: MonitorType::Tcp,
            target: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            delay: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 1,
            fall: 1,
            http: None,
        };
        for _ in 0..3 {
            assert_eq!(probe(&tcp).await, Ok(()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(time_wait_sockets_to(port), 0);
        // The check can fail: a connection closed the ordinary way leaves one.
        drop(
            TcpStream::connect(SocketAddr::V4(tcp.target))
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(time_wait_sockets_to(port), 1);
    }

    /// TIME_WAIT sockets (state 06 in `/proc/net/tcp`) whose remote port is `port`.
    fn time_wait_sockets_to(port: u16) -> usize {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        let remote = format!(":{port:04X}");
        table
            .lines()
            .skip(1)
            .filter(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.len() > 3 && fields[2].ends_with(&remote) && fields[3] == "06"
            })
            .count()
    }

    #[tokio::test]
    async fn udp_connect_sees_port_unreachable() {
        let closed = Probe {
            kind: MonitorType::UdpConnect,
            target: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9),
            delay: Duration::from_secs(3),
            timeout: Duration::from_secs(2),
            rise: 1,
            fall: 1,
            http: None,
        };
        assert_eq!(probe(&closed).await, Err("ICMP port unreachable".into()));
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let open = Probe {
            target: SocketAddrV4::new(Ipv4Addr::LOCALHOST, server.local_addr().unwrap().port()),
            ..closed
        };
        assert_eq!(probe(&open).await, Ok(()));
    }
}
