//! Connections to members. Each serving thread keeps its own idle HTTP/1.1 connections by
//! member address (HAProxy's per-thread idle lists under `http-reuse safe`): a request takes
//! one, or opens one, and the response gives it back once its body has been read whole. The
//! thread-local list needs no lock, and a connection's driving task runs on the thread that
//! uses it, so a request crosses no thread and no shared pool.

use std::{
    cell::RefCell,
    collections::HashMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::forward::ProxyBody;

/// How long an idle connection is kept for reuse (members usually keep theirs longer:
/// nginx 75 s, HAProxy's `timeout http-keep-alive` follows the client timeout).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per member and thread at most.
const MAX_IDLE_PER_MEMBER: usize = 256;
/// Every this many give-backs, a thread drops the idle connections that expired or closed
/// for every member (those of removed members included); a quiet thread does so on a timer
/// (see [`expire_idle`]).
const SWEEP_EVERY: u32 = 4096;
/// How often a serving thread closes its expired idle connections, busy or not.
const EXPIRE_INTERVAL: Duration = Duration::from_secs(10);

/// Which idle connections can carry a request: the member's address, and whether it is
/// spoken to over TLS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// The member's address.
    pub addr: SocketAddr,
    /// TLS (`tls_enabled` pools) or plain HTTP.
    pub tls: bool,
}

/// Why no connection to a member could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TCP connect failed (refused, unreachable, ...).
    #[error("connecting to {addr}: {source}")]
    Tcp {
        /// The member.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake with {addr}: {source}")]
    Tls {
        /// The member.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TCP connect and TLS handshake took longer than the listener's `timeout_member_connect`.
    #[error("connecting to {addr}: no answer within {limit:?}")]
    Timeout {
        /// The member.
        addr: SocketAddr,
        /// The limit.
        limit: Duration,
    },
    /// The HTTP/1.1 connection could not be set up.
    #[error("HTTP/1.1 handshake with {addr}: {source}")]
    Handshake {
        /// The member.
        addr: SocketAddr,
        /// Why.
        source: hyper::Error,
    },
}

/// A connection to a member, taken for one request. [`Lease::give_back`] returns it to this
/// thread's idle list; dropped otherwise, it closes once the member's answer is done.
#[derive(Debug)]
pub struct Lease {
    key: ConnKey,
    sender: SendRequest<ProxyBody>,
}

struct Idle {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

#[derive(Default)]
struct IdleLists {
    by_member: HashMap<ConnKey, Vec<Idle>>,
    give_backs: u32,
}

thread_local! {
    static IDLE: RefCell<IdleLists> = RefCell::new(IdleLists::default());
}

impl Lease {
    /// An idle connection of this thread to `key`, else a new one.
    pub async fn take(
        key: &ConnKey,
        connect_timeout: Option<Duration>,
    ) -> Result<Self, ConnectError> {
        while let Some(mut sender) = take_idle(key) {
            // Ready at once in the common case; an error means the member closed it.
            if sender.ready().await.is_ok() {
                return Ok(Self {
                    key: key.clone(),
                    sender,
                });
            }
        }
        Self::open(key, connect_timeout).await
    }

    /// A new connection to `key`, never an idle one (for a request an idle connection could
    /// not take because the member had just closed it).
    pub async fn open(
        key: &ConnKey,
        connect_timeout: Option<Duration>,
    ) -> Result<Self, ConnectError> {
        let sender = match connect_timeout {
            Some(limit) => tokio::time::timeout(limit, connect(key))
                .await
                .map_err(|_| ConnectError::Timeout {
                    addr: key.addr,
                    limit,
                })??,
            None => connect(key).await?,
        };
        Ok(Self {
            key: key.clone(),
            sender,
        })
    }

    /// The connection, to send on.
    pub fn sender(&mut self) -> &mut SendRequest<ProxyBody> {
        &mut self.sender
    }

    /// Returns the connection to this thread's idle list (its answer has been read whole).
    pub fn give_back(self) {
        if self.sender.is_closed() {
            return;
        }
        IDLE.with(|idle| {
            let mut idle = idle.borrow_mut();
            idle.give_backs = idle.give_backs.wrapping_add(1);
            if idle.give_backs % SWEEP_EVERY == 0 {
                sweep(&mut idle.by_member, IDLE_TIMEOUT);
            }
            let list = idle.by_member.entry(self.key).or_default();
            if list.len() < MAX_IDLE_PER_MEMBER {
                list.push(Idle {
                    sender: self.sender,
                    since: Instant::now(),
                });
            }
        });
    }
}

/// The most recently used idle connection to `key` that has not expired or closed.
fn take_idle(key: &ConnKey) -> Option<SendRequest<ProxyBody>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.by_member.get_mut(key)?;
        while let Some(conn) = list.pop() {
            if !conn.sender.is_closed() && conn.since.elapsed() < IDLE_TIMEOUT {
                return Some(conn.sender);
            }
        }
        None
    })
}

fn sweep(by_member: &mut HashMap<ConnKey, Vec<Idle>>, max_idle: Duration) {
    for list in by_member.values_mut() {
        list.retain(|c| !c.sender.is_closed() && c.since.elapsed() < max_idle);
    }
    by_member.retain(|_, list| !list.is_empty());
}

/// Closes this thread's idle connections that have been idle `max_idle` or longer (and
/// forgets those their member closed); see [`expire_idle_forever`].
pub fn expire_idle(max_idle: Duration) {
    IDLE.with(|idle| sweep(&mut idle.borrow_mut().by_member, max_idle));
}

/// This thread's idle connections, all members together.
#[cfg(test)]
fn idle_count() -> usize {
    IDLE.with(|idle| idle.borrow().by_member.values().map(Vec::len).sum())
}

/// Closes this thread's expired idle connections every [`EXPIRE_INTERVAL`], for ever (a
/// serving thread runs it, so that a quiet thread does not keep them open).
pub async fn expire_idle_forever() {
    let mut tick = tokio::time::interval(EXPIRE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        expire_idle(IDLE_TIMEOUT);
    }
}

/// Opens a connection and starts its driving task on this thread.
async fn connect(key: &ConnKey) -> Result<SendRequest<ProxyBody>, ConnectError> {
    let addr = key.addr;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| ConnectError::Tcp { addr, source })?;
    let _ = tcp.set_nodelay(true);
    let io = if key.tls {
        let connector = tokio_rustls::TlsConnector::from(tls_config());
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = connector
            .connect(name, TokioIo::new(TokioIo::new(tcp)))
            .await
            .map_err(|source| ConnectError::Tls { addr, source })?;
        MaybeHttpsStream::Https(TokioIo::new(tls))
    } else {
        MaybeHttpsStream::Http(TokioIo::new(tcp))
    };
    let (sender, conn) = http1::Builder::new()
        .writev(false)
        .handshake(io)
        .await
        .map_err(|source| ConnectError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(member = %addr, error = %e, "member connection ended with an error");
        }
    });
    Ok(sender)
}

/// Members' certificates are not verified (as Octavia's HAProxy does with `ssl verify none`).
fn tls_config() -> Arc<rustls::ClientConfig> {
    thread_local! {
        static CONFIG: Arc<rustls::ClientConfig> = crate::health::insecure_client_config();
    }
    CONFIG.with(Arc::clone)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty};
    use hyper::Request;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// A member on loopback that answers every request `ok` and counts the connections it
    /// accepted.
    async fn member() -> (ConnKey, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let key = ConnKey {
            addr: listener.local_addr().unwrap(),
            tls: false,
        };
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (key, accepted)
    }

    /// One GET on a leased connection; the answer's body, read whole.
    async fn get(lease: &mut Lease) -> Vec<u8> {
        let request = Request::builder()
            .uri("/")
            .header("host", "member")
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap();
        let response = lease.sender().send_request(request).await.unwrap();
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    #[tokio::test]
    async fn a_connection_given_back_carries_the_next_requests() {
        let (key, accepted) = member().await;
        for _ in 0..3 {
            let mut lease = Lease::take(&key, None).await.unwrap();
            assert_eq!(get(&mut lease).await, b"ok");
            lease.give_back();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_not_given_back_is_not_reused() {
        let (key, accepted) = member().await;
        for _ in 0..2 {
            let mut lease = Lease::take(&key, None).await.unwrap();
            assert_eq!(get(&mut lease).await, b"ok");
            drop(lease);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_are_kept_per_member_and_scheme_and_tls_is_under_the_connect_timeout()
    {
        let (key, accepted) = member().await;
        let mut lease = Lease::take(&key, None).await.unwrap();
        get(&mut lease).await;
        lease.give_back();
        // The same address spoken to over TLS is another member: the plain connection is
        // not handed out for it; a new one is opened, whose handshake this plain member never
        // answers, and the connect timeout covers the handshake.
        let tls = ConnKey {
            tls: true,
            ..key.clone()
        };
        let err = Lease::take(&tls, Some(Duration::from_millis(300)))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Timeout { .. }), "{err}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let mut again = Lease::take(&key, None).await.unwrap();
        assert_eq!(get(&mut again).await, b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn expired_idle_connections_are_closed() {
        let (key, accepted) = member().await;
        let mut lease = Lease::take(&key, None).await.unwrap();
        get(&mut lease).await;
        lease.give_back();
        assert_eq!(idle_count(), 1);
        expire_idle(Duration::from_secs(30));
        assert_eq!(idle_count(), 1, "not idle that long yet");
        expire_idle(Duration::ZERO);
        assert_eq!(idle_count(), 0);
        // Closed: the next request needs a new connection.
        let mut again = Lease::take(&key, None).await.unwrap();
        assert_eq!(get(&mut again).await, b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_member() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let key = ConnKey {
            addr: closed.local_addr().unwrap(),
            tls: false,
        };
        drop(closed);
        let err = Lease::take(&key, None).await.unwrap_err();
        assert!(matches!(err, ConnectError::Tcp { .. }), "{err}");
        assert!(err.to_string().contains(&key.addr.to_string()), "{err}");
    }
}
