//! The L7 proxy: HTTP and TERMINATED_HTTPS listeners served in the daemon.
//!
//! The XDP program passes packets for these listeners to the host stack (`VIP_F_L7_PASS`),
//! where the proxy listens on VIP:port (bound with `IP_FREEBIND`, so it does not depend on the
//! order the VIP address and the socket appear in). hyper serves HTTP/1.1 with keep-alive and
//! HTTP/2 (through ALPN on TLS, or prior knowledge); requests go to members over pooled
//! connections with streamed bodies.
//!
//! An apply is two steps so that a bad certificate or a busy port changes nothing: [`Proxy::
//! prepare`] compiles every listener's plan (policies, pools, TLS) and binds new sockets;
//! [`Proxy::install`] swaps the plans into running listeners (requests in flight finish with
//! the plan they started with, the listening socket stays open), starts new listeners and
//! stops removed ones (their open connections finish).
//!
//! A member the proxy cannot connect to is reported ([`RefusalReports`]) and its health
//! monitor probes it at once; the request itself goes to another member.

pub mod conns;
pub mod forward;
pub mod pool;
pub mod rules;
pub mod shards;
pub mod tls;

use std::{
    collections::{BTreeSet, HashMap},
    io,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::{Arc, RwLock, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{
    compile::{ListenerRef, MemberRef},
    config::{Config, ListenerProtocol, parse_cidr},
};
pub use forward::RefusalReports;
use forward::{InsertHeaders, ListenerCounters, RequestPlan};
use pool::{MemberCounters, PoolRegistry, ProxyPool};

/// Why an apply cannot be served by the proxy; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// An L7 rule does not compile.
    #[error(transparent)]
    Rule(#[from] rules::RuleError),
    /// A listener's certificate cannot be used.
    #[error("{path}: {source}")]
    Certificate {
        /// YAML path of the reference.
        path: String,
        /// What is wrong.
        source: tls::CertError,
    },
    /// A listener's address cannot be bound.
    #[error("{path}: cannot listen on {addr}: {source}")]
    Bind {
        /// YAML path of the listener.
        path: String,
        /// VIP and port.
        addr: SocketAddrV4,
        /// The error.
        source: io::Error,
    },
}

impl ProxyError {
    /// The YAML path the error is about.
    pub fn path(&self) -> &str {
        match self {
            ProxyError::Rule(e) => &e.path,
            ProxyError::Certificate { path, .. } | ProxyError::Bind { path, .. } => path,
        }
    }
}

/// One listener's settings beyond its requests' plan.
struct ListenerPlan {
    key: ListenerRef,
    request: Arc<RequestPlan>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    allowed: Vec<(IpAddr, u8)>,
    connection_limit: Option<u64>,
    client_timeout: Option<Duration>,
}

impl ListenerPlan {
    fn allows(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.allowed.is_empty()
            || self
                .allowed
                .iter()
                .any(|(net, len)| in_prefix(peer, *net, *len))
    }
}

fn in_prefix(addr: IpAddr, net: IpAddr, len: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// A running listener: its current plan, swapped by applies.
struct Shared {
    plan: RwLock<Arc<ListenerPlan>>,
}

impl Shared {
    fn current(&self) -> Arc<ListenerPlan> {
        self.plan.read().expect("listener plan").clone()
    }
}

struct Running {
    shared: Arc<Shared>,
    /// One accept loop per serving thread.
    accept: Vec<tokio::task::JoinHandle<()>>,
}

/// What [`Proxy::prepare`] made, for [`Proxy::install`].
pub struct Prepared {
    plans: Vec<(SocketAddrV4, ListenerPlan)>,
    /// New listeners' sockets, one per serving thread.
    sockets: HashMap<SocketAddrV4, Vec<std::net::TcpListener>>,
}

/// An L7 listener's counters, for statistics.
#[derive(Debug, Clone)]
pub struct ListenerFigures {
    /// Which listener.
    pub listener: ListenerRef,
    /// Its counters.
    pub counters: Arc<ListenerCounters>,
}

/// The proxy's listeners.
#[derive(Default)]
pub struct Proxy {
    running: HashMap<SocketAddrV4, Running>,
    registry: PoolRegistry,
    counters: HashMap<ListenerRef, Arc<ListenerCounters>>,
    refusals: Option<RefusalReports>,
}

/// A timeout in ms from the YAML; 0 means none, as in HAProxy.
fn timeout_ms(ms: i64) -> Option<Duration> {
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// Octavia writes `insert_headers` values as strings: `"true"`.
fn truthy(headers: &std::collections::BTreeMap<String, String>, name: &str) -> bool {
    headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case(name)
            && matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes")
    })
}

/// Binds one listening socket on VIP:port per serving thread (`SO_REUSEPORT`: the kernel
/// spreads connections over them), whether or not the VIP is on an interface yet.
fn bind(addr: SocketAddrV4, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    (0..count)
        .map(|_| {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_freebind(true)?;
            socket.bind(&SocketAddr::V4(addr).into())?;
            socket.listen(1024)?;
            socket.set_nonblocking(true)?;
            Ok(socket.into())
        })
        .collect()
}

impl Proxy {
    /// A proxy that reports the members it cannot connect to on `reports` (plans prepared
    /// from now on carry it).
    pub fn reporting_refusals(reports: RefusalReports) -> Self {
        let mut proxy = Self::default();
        proxy.refusals = Some(reports);
        proxy
    }

    /// Compiles the plans of every enabled L7 listener in `config` and binds the sockets of
    /// new ones. Changes nothing that serves traffic.
    pub fn prepare(
        &mut self,
        config: &Config,
        down: &BTreeSet<MemberRef>,
    ) -> Result<Prepared, ProxyError> {
        let mut prepared = Prepared {
            plans: Vec::new(),
            sockets: HashMap::new(),
        };
        for (i, lb) in config.loadbalancers.iter().enumerate() {
            let Some(vip) = lb.vip() else { continue };
            let l7: Vec<_> = lb
                .listeners
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.protocol.is_l4() && lb.admin_state_up && l.admin_state_up)
                .collect();
            if l7.is_empty() {
                continue;
            }
            let pools: HashMap<String, Arc<ProxyPool>> = lb
                .pools
                .iter()
                .map(|p| {
                    let pool = ProxyPool::new(
                        &lb.name,
                        p,
                        p.admin_state_up,
                        |m| down.contains(m),
                        &self.registry,
                    );
                    (p.name.clone(), Arc::new(pool))
                })
                .collect();
            for (j, l) in l7 {
                let at = format!("loadbalancers[{i}].listeners[{j}]");
                let Ok(port) = u16::try_from(l.protocol_port) else {
                    continue;
                };
                let addr = SocketAddrV4::new(vip, port);
                let https = l.protocol == ListenerProtocol::TerminatedHttps;
                let tls = if https {
                    let default = l.default_tls_container_ref.as_deref().unwrap_or_default();
                    let config =
                        tls::server_config(default, &l.sni_container_refs).map_err(|source| {
                            ProxyError::Certificate {
                                path: format!("{at}.default_tls_container_ref"),
                                source,
                            }
                        })?;
                    Some(tokio_rustls::TlsAcceptor::from(config))
                } else {
                    None
                };
                let key = ListenerRef {
                    loadbalancer: lb.name.clone(),
                    listener: l.name.clone(),
                };
                let counters = self.counters.entry(key.clone()).or_default().clone();
                let request = RequestPlan {
                    policies: rules::Policies::compile(&l.l7policies, &at)?,
                    default_pool: l.default_pool.clone(),
                    pools: pools.clone(),
                    insert: InsertHeaders {
                        forwarded_for: truthy(&l.insert_headers, "X-Forwarded-For"),
                        forwarded_port: truthy(&l.insert_headers, "X-Forwarded-Port"),
                        forwarded_proto: truthy(&l.insert_headers, "X-Forwarded-Proto"),
                    },
                    port,
                    https,
                    member_data_timeout: timeout_ms(l.timeout_member_data),
                    member_connect_timeout: timeout_ms(l.timeout_member_connect),
                    counters,
                    refusals: self.refusals.clone(),
                };
                if !self.running.contains_key(&addr) && !prepared.sockets.contains_key(&addr) {
                    let socket =
                        bind(addr, shards::handles().len()).map_err(|source| ProxyError::Bind {
                            path: at.clone(),
                            addr,
                            source,
                        })?;
                    prepared.sockets.insert(addr, socket);
                }
                prepared.plans.push((
                    addr,
                    ListenerPlan {
                        key,
                        request: Arc::new(request),
                        tls,
                        allowed: l
                            .allowed_cidrs
                            .iter()
                            .filter_map(|c| parse_cidr(c))
                            .collect(),
                        connection_limit: u64::try_from(l.connection_limit).ok(),
                        client_timeout: timeout_ms(l.timeout_client_data),
                    },
                ));
            }
        }
        Ok(prepared)
    }

    /// Puts prepared plans into service, on the serving threads.
    pub fn install(&mut self, prepared: Prepared) {
        let Prepared { plans, mut sockets } = prepared;
        let wanted: BTreeSet<SocketAddrV4> = plans.iter().map(|(a, _)| *a).collect();
        for (addr, plan) in plans {
            let plan = Arc::new(plan);
            if let Some(running) = self.running.get(&addr) {
                *running.shared.plan.write().expect("listener plan") = plan;
                continue;
            }
            let Some(sockets) = sockets.remove(&addr) else {
                continue;
            };
            tracing::info!(%addr, listener = %plan.key.listener, tls = plan.tls.is_some(), "L7 listener serving");
            let shared = Arc::new(Shared {
                plan: RwLock::new(plan),
            });
            let accept = sockets
                .into_iter()
                .zip(shards::handles())
                .map(|(socket, shard)| shard.spawn(accept_loop(socket, addr, shared.clone())))
                .collect();
            self.running.insert(addr, Running { shared, accept });
        }
        self.running.retain(|addr, running| {
            let keep = wanted.contains(addr);
            if !keep {
                tracing::info!(%addr, "L7 listener stopped; open connections finish");
                running.accept.iter().for_each(|a| a.abort());
            }
            keep
        });
        let live: BTreeSet<ListenerRef> = self
            .running
            .values()
            .map(|r| r.shared.current().key.clone())
            .collect();
        self.counters.retain(|k, _| live.contains(k));
    }

    /// The counters of every L7 listener.
    pub fn listener_figures(&self) -> Vec<ListenerFigures> {
        self.counters
            .iter()
            .map(|(k, c)| ListenerFigures {
                listener: k.clone(),
                counters: c.clone(),
            })
            .collect()
    }

    /// The proxy's counters of a member, if it has served through the proxy.
    pub fn member_counters(&self) -> HashMap<MemberRef, Arc<MemberCounters>> {
        self.registry.all_counters().into_iter().collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for running in self.running.values() {
            running.accept.iter().for_each(|a| a.abort());
        }
    }
}

async fn accept_loop(socket: std::net::TcpListener, addr: SocketAddrV4, shared: Arc<Shared>) {
    // Registered here, with the serving thread's own reactor.
    let listener = match tokio::net::TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "L7 listener socket unusable");
            return;
        }
    };
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let plan = shared.current();
        let counters = &plan.request.counters;
        let over_limit = plan
            .connection_limit
            .is_some_and(|limit| counters.active_connections.load(Ordering::Relaxed) >= limit);
        if over_limit || !plan.allows(peer.ip()) {
            counters.refused_connections.fetch_add(1, Ordering::Relaxed);
            // A reset, as the XDP path answers a refused connection.
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            drop(stream);
            continue;
        }
        tokio::spawn(serve(stream, peer, shared.clone(), plan));
    }
}

/// Counts a client connection as active while it lives.
struct Active(Arc<ListenerCounters>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    plan: Arc<ListenerPlan>,
) {
    let counters = plan.request.counters.clone();
    counters.total_connections.fetch_add(1, Ordering::Relaxed);
    counters.active_connections.fetch_add(1, Ordering::Relaxed);
    let _active = Active(counters.clone());
    let _ = stream.set_nodelay(true);
    let io = Counted {
        inner: stream,
        counters: counters.clone(),
    };
    match &plan.tls {
        Some(acceptor) => {
            let limit = plan.client_timeout.unwrap_or(Duration::from_secs(60));
            match tokio::time::timeout(limit, acceptor.accept(io)).await {
                Ok(Ok(tls)) => serve_http(TokioIo::new(tls), peer, shared, &plan).await,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    counters.request_errors.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    counters.request_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        None => serve_http(TokioIo::new(io), peer, shared, &plan).await,
    }
}

async fn serve_http<I>(io: I, peer: SocketAddr, shared: Arc<Shared>, plan: &ListenerPlan)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .writev(false);
    if let Some(limit) = plan.client_timeout {
        // Also what stops a slowloris: the whole header must arrive within the limit.
        builder.http1().header_read_timeout(limit);
    }
    builder.http2().timer(TokioTimer::new());
    let service = service_fn(move |req| {
        // Each request reads the listener's current plan: applies reach kept-alive clients.
        let plan = shared.current().request.clone();
        forward::handle(req, plan, peer)
    });
    if let Err(e) = builder.serve_connection_with_upgrades(io, service).await {
        let client_fault = e.downcast_ref::<hyper::Error>().is_some_and(|e| {
            e.is_parse() || e.is_timeout() || e.is_incomplete_message() || e.is_parse_too_large()
        });
        tracing::debug!(%peer, error = %e, client_fault, "client connection ended with an error");
        if client_fault {
            plan.request
                .counters
                .request_errors
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A client stream that counts the bytes each way (TLS records included), as HAProxy's
/// `bin`/`bout` do.
struct Counted<S> {
    inner: S,
    counters: Arc<ListenerCounters>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let n = buf.filled().len() - before;
            this.counters
                .bytes_in
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.counters
                .bytes_out
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            this.counters
                .bytes_out
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_by_their_length() {
        let net = |s: &str| parse_cidr(s).unwrap();
        let (n, l) = net("10.77.1.0/24");
        assert!(in_prefix("10.77.1.2".parse().unwrap(), n, l));
        assert!(!in_prefix("10.77.2.2".parse().unwrap(), n, l));
        let (n, l) = net("0.0.0.0/0");
        assert!(in_prefix("192.0.2.1".parse().unwrap(), n, l));
        let (n, l) = net("192.0.2.7/32");
        assert!(in_prefix("192.0.2.7".parse().unwrap(), n, l));
        assert!(!in_prefix("192.0.2.8".parse().unwrap(), n, l));
    }
}
