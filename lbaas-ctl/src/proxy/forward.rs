//! One request through the proxy: L7 policies, the pool's member choice and persistence,
//! the request to the member (this thread's idle connections, streamed bodies), and the
//! response back.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{SocketAddr, SocketAddrV4},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode, Uri, Version,
    body::Incoming,
    http::{HeaderMap, HeaderName, HeaderValue, header, request::Parts},
};

use super::{
    conns::{ConnKey, Lease},
    pool::{Choice, MemberCounters, PERSISTENCE_COOKIE, Persistence, ProxyMember, ProxyPool},
    rules::{Action, Policies, RequestView, cookie},
};
use crate::compile::MemberRef;

/// Bodies the proxy sends either way.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Which X-Forwarded headers a listener inserts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InsertHeaders {
    /// `X-Forwarded-For: <client address>`.
    pub forwarded_for: bool,
    /// `X-Forwarded-Port: <listener port>`.
    pub forwarded_port: bool,
    /// `X-Forwarded-Proto: http|https`.
    pub forwarded_proto: bool,
}

/// A listener's counters (Octavia's listener statistics), kept across applies.
#[derive(Debug, Default)]
pub struct ListenerCounters {
    /// Client connections open now.
    pub active_connections: AtomicU64,
    /// Client connections accepted.
    pub total_connections: AtomicU64,
    /// Bytes read from clients (TLS records included).
    pub bytes_in: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
    /// Requests that failed on the client's side: malformed, too slow, or cut.
    pub request_errors: AtomicU64,
    /// Connections refused: over `connection_limit` or outside `allowed_cidrs`.
    pub refused_connections: AtomicU64,
    /// Requests answered by the proxy itself because no member could (502/503/504).
    pub member_errors: AtomicU64,
}

/// Everything a listener's requests need; an apply swaps in a new one as a whole, and
/// requests already running finish with the one they started with.
#[derive(Debug)]
pub struct RequestPlan {
    /// The listener's policies in evaluation order.
    pub policies: Policies,
    /// Where requests no policy takes go.
    pub default_pool: Option<String>,
    /// The load balancer's pools by name.
    pub pools: HashMap<String, Arc<ProxyPool>>,
    /// Headers to insert.
    pub insert: InsertHeaders,
    /// The listener's port (X-Forwarded-Port).
    pub port: u16,
    /// Whether clients speak TLS to the listener (X-Forwarded-Proto).
    pub https: bool,
    /// How long a member may take to answer (`timeout_member_data`); `None`: no limit.
    pub member_data_timeout: Option<Duration>,
    /// How long connecting to a member may take (`timeout_member_connect`).
    pub member_connect_timeout: Option<Duration>,
    /// The listener's counters.
    pub counters: Arc<ListenerCounters>,
    /// Where members no connection could be opened to are reported (their monitors probe
    /// them at once); `None`: nowhere.
    pub refusals: Option<RefusalReports>,
}

/// The sending end of the proxy's reports of members it could not connect to, for the
/// daemon, which brings those members' health checks forward (as it does for members the
/// data path sees refuse connections). The probe decides, with the monitor's thresholds.
#[derive(Debug, Clone)]
pub struct RefusalReports(tokio::sync::mpsc::Sender<MemberRef>);

impl RefusalReports {
    /// A channel of `capacity` reports: the sending end, and the receiving end for the daemon.
    pub fn channel(capacity: usize) -> (Self, tokio::sync::mpsc::Receiver<MemberRef>) {
        let (sender, receiver) = tokio::sync::mpsc::channel(capacity);
        (Self(sender), receiver)
    }

    /// Reports `member` (dropped when the channel is full: the daemon is already behind on
    /// this news, and one report per member is all it needs).
    pub fn report(&self, member: &MemberRef) {
        let _ = self.0.try_send(member.clone());
    }
}

impl RequestPlan {
    fn report_refusal(&self, member: &MemberRef) {
        if let Some(reports) = &self.refusals {
            reports.report(member);
        }
    }
}

const HOP_BY_HOP_COUNT: usize = 8;

/// Hop-by-hop headers (RFC 9110 7.6.1): they concern one connection, never forwarded.
/// `Connection` comes first (`strip_hop_by_hop` reads its names when it is present).
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Handles one request from `client`.
pub async fn handle(
    req: Request<Incoming>,
    plan: Arc<RequestPlan>,
    client: SocketAddr,
) -> Result<Response<ProxyBody>, Infallible> {
    let policy = plan.policies.evaluate(&RequestView {
        host: request_host(&req),
        path: req.uri().path(),
        headers: req.headers(),
    });
    let pool = match policy.map(|p| &p.action) {
        Some(Action::Reject) => return Ok(answer(StatusCode::FORBIDDEN, "Forbidden")),
        Some(Action::RedirectUrl { url, code }) => return Ok(redirect(*code, url)),
        Some(Action::RedirectPrefix { prefix, code }) => {
            let rest = req.uri().path_and_query().map_or("/", |p| p.as_str());
            return Ok(redirect(
                *code,
                &format!("{}{rest}", prefix.trim_end_matches('/')),
            ));
        }
        Some(Action::Pool(name)) => plan.pools.get(name),
        None => plan.default_pool.as_ref().and_then(|n| plan.pools.get(n)),
    };
    let Some(pool) = pool.cloned() else {
        return Ok(no_member(&plan));
    };
    Ok(forward(req, &plan, &pool, client).await)
}

/// The request's host name: `Host`, else the HTTP/2 authority; port removed.
fn request_host(req: &Request<Incoming>) -> Option<&str> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))?;
    Some(match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => raw.split(':').next().unwrap_or(raw),
    })
}

fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A response the proxy writes itself (short text, as HAProxy's error pages are).
fn answer(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut r = Response::new(full(format!("{} {text}\n", status.as_u16())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn redirect(code: u16, location: &str) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::FOUND);
    let mut r = answer(status, status.canonical_reason().unwrap_or("Redirect"));
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn no_member(plan: &RequestPlan) -> Response<ProxyBody> {
    plan.counters.member_errors.fetch_add(1, Ordering::Relaxed);
    answer(
        StatusCode::SERVICE_UNAVAILABLE,
        "Service Unavailable: no server is available to handle this request",
    )
}

/// Counts a member's request in flight for as long as it lives.
struct InFlight(Arc<MemberCounters>);

impl InFlight {
    fn new(counters: &Arc<MemberCounters>) -> Self {
        counters.in_flight.fetch_add(1, Ordering::Relaxed);
        counters.requests.fetch_add(1, Ordering::Relaxed);
        Self(counters.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A body that counts its data bytes and, for a response, holds the member's in-flight
/// count and the connection it came on until it has been sent (or dropped): read whole,
/// the connection goes back to the idle list.
struct Tracked<B: Body> {
    inner: B,
    counter: Arc<MemberCounters>,
    outbound: bool,
    _in_flight: Option<InFlight>,
    lease: Option<Lease>,
    ended: bool,
}

impl<B: Body> Tracked<B> {
    fn new(inner: B, counter: Arc<MemberCounters>, outbound: bool) -> Self {
        Self {
            inner,
            counter,
            outbound,
            _in_flight: None,
            lease: None,
            ended: false,
        }
    }
}

impl<B: Body> Drop for Tracked<B> {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take()
            && (self.ended || self.inner.is_end_stream())
        {
            lease.give_back();
        }
    }
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let bytes = if this.outbound {
                        &this.counter.bytes_out
                    } else {
                        &this.counter.bytes_in
                    };
                    bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => this.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Removes hop-by-hop headers, and those the `Connection` header names, keeping the upgrade
/// handshake's when `upgrade` is set.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names. Most messages carry none, or (every nginx response) just
    // `Connection: keep-alive`: removing only what is there, and reading the Connection
    // header's names only when it names more than the usual tokens, keeps them cheap.
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if present == [false; HOP_BY_HOP_COUNT] {
        return;
    }
    let kept =
        |name: &HeaderName| upgrade && (name == header::CONNECTION || name == header::UPGRADE);
    // `Connection` is HOP_BY_HOP[0]; the names it lists go too.
    if present[0] {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| !n.eq_ignore_ascii_case("keep-alive") && !n.eq_ignore_ascii_case("close"))
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        for name in named {
            if !(upgrade && name == header::UPGRADE) {
                headers.remove(name);
            }
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        if !kept(name) {
            headers.remove(name);
        }
    }
}

/// The request as the member gets it: HTTP/1.1, origin-form target, hop-by-hop headers
/// dropped, a `Host` kept (or made from the client's URI, else the member's address), and
/// the X-Forwarded headers the listener inserts.
fn member_request(
    parts: Parts,
    body: ProxyBody,
    member: &ProxyMember,
    plan: &RequestPlan,
    client: SocketAddr,
    upgrade: bool,
) -> Request<ProxyBody> {
    let Parts {
        method,
        uri,
        mut headers,
        ..
    } = parts;
    strip_hop_by_hop(&mut headers, upgrade);
    if !headers.contains_key(header::HOST) {
        let host = match uri.authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()),
            None => HeaderValue::from_str(&member.authority),
        };
        if let Ok(v) = host {
            headers.insert(header::HOST, v);
        }
    }
    if plan.insert.forwarded_for {
        let ip = client.ip().to_canonical().to_string();
        let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prior) => format!("{prior}, {ip}"),
            None => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert("x-forwarded-for", v);
        }
    }
    if plan.insert.forwarded_port {
        headers.insert("x-forwarded-port", HeaderValue::from(plan.port));
    }
    if plan.insert.forwarded_proto {
        let proto = if plan.https { "https" } else { "http" };
        headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    }
    let mut out = Request::new(body);
    *out.method_mut() = method;
    *out.uri_mut() = origin_form(uri);
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = headers;
    out
}

/// The request target a member gets: `/path?query` (an HTTP/2 client's URI is absolute).
fn origin_form(uri: Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri;
    }
    match uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

/// How one attempt at a member ended, short of a response.
enum Failure {
    /// No connection could be had: nothing was sent, another member may take the request.
    Connect(super::conns::ConnectError),
    /// The member failed the request (connection cut, malformed answer, ...).
    Request(hyper::Error),
    /// No response within `timeout_member_data`.
    Timeout,
}

/// Sends `request` on a connection to `key` and waits for the response head. A request an
/// idle connection could not take (the member closed it meanwhile; nothing was sent) goes
/// once more, on a new connection.
async fn exchange(
    key: &ConnKey,
    request: Request<ProxyBody>,
    plan: &RequestPlan,
    mut lease: Lease,
) -> Result<(Response<Incoming>, Lease), Failure> {
    let attempt = async {
        match lease.sender().try_send_request(request).await {
            Ok(response) => Ok(response),
            Err(mut e) => match e.take_message() {
                Some(request) => {
                    lease = Lease::open(key, plan.member_connect_timeout)
                        .await
                        .map_err(Failure::Connect)?;
                    lease
                        .sender()
                        .send_request(request)
                        .await
                        .map_err(Failure::Request)
                }
                None => Err(Failure::Request(e.into_error())),
            },
        }
    };
    let response = match plan.member_data_timeout {
        Some(limit) => tokio::time::timeout(limit, attempt)
            .await
            .map_err(|_| Failure::Timeout)??,
        None => attempt.await?,
    };
    Ok((response, lease))
}

/// Sends the request to a member of `pool`. A member no connection can be opened to is
/// tried no further for this request, which goes to the next member (nothing was sent), as
/// HAProxy's `option redispatch` does.
async fn forward(
    req: Request<Incoming>,
    plan: &RequestPlan,
    pool: &ProxyPool,
    client: SocketAddr,
) -> Response<ProxyBody> {
    let cookie_of = |name: &str| cookie(req.headers(), name).map(str::to_owned);
    let Some((first, choice)) = pool.choose(client.ip(), cookie_of) else {
        return no_member(plan);
    };
    let mut member = first;
    let upgrade = req.version() == Version::HTTP_11 && req.headers().contains_key(header::UPGRADE);
    let (mut parts, body) = req.into_parts();
    let client_upgrade = upgrade.then(|| {
        let mut r = Request::new(());
        std::mem::swap(r.extensions_mut(), &mut parts.extensions);
        hyper::upgrade::on(r)
    });
    let mut tried: Vec<MemberRef> = Vec::new();
    let (key, lease) = loop {
        let key = ConnKey {
            addr: SocketAddr::V4(SocketAddrV4::new(member.key.addr, member.key.port)),
            tls: pool.tls,
        };
        match Lease::take(&key, plan.member_connect_timeout).await {
            Ok(lease) => break (key, lease),
            Err(e) => {
                tracing::debug!(member = %member.authority, error = %e, "member refused; trying another");
                plan.report_refusal(&member.key);
                tried.push(member.key.clone());
                match pool.choose_other(&tried) {
                    Some(next) => member = next,
                    None => return no_member(plan),
                }
            }
        }
    };
    let in_flight = InFlight::new(&member.counters);
    let sent = Tracked::new(body, member.counters.clone(), false).boxed();
    let request = member_request(parts, sent, member, plan, client, upgrade);
    match exchange(&key, request, plan, lease).await {
        Ok((response, lease)) => respond(
            response,
            pool,
            member,
            choice,
            in_flight,
            lease,
            client_upgrade,
        ),
        Err(failure) => {
            plan.counters.member_errors.fetch_add(1, Ordering::Relaxed);
            let status = match failure {
                Failure::Connect(e) => {
                    tracing::debug!(member = %member.authority, error = %e, "member refused a retried request");
                    plan.report_refusal(&member.key);
                    StatusCode::SERVICE_UNAVAILABLE
                }
                Failure::Request(e) => {
                    tracing::debug!(member = %member.authority, error = %e, "member request failed");
                    StatusCode::BAD_GATEWAY
                }
                Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            };
            answer(status, status.canonical_reason().unwrap_or("Bad Gateway"))
        }
    }
}

/// The member's response as the client gets it: persistence cookie set or learned, upgrade
/// spliced, body streamed and counted.
fn respond(
    mut response: Response<Incoming>,
    pool: &ProxyPool,
    member: &ProxyMember,
    choice: Choice,
    in_flight: InFlight,
    lease: Lease,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<ProxyBody> {
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switching && let Some(client_side) = client_upgrade {
        let member_side = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            if let (Ok(c), Ok(m)) = (client_side.await, member_side.await) {
                let mut c = hyper_util::rt::TokioIo::new(c);
                let mut m = hyper_util::rt::TokioIo::new(m);
                let _ = tokio::io::copy_bidirectional(&mut c, &mut m).await;
            }
            // The member connection now carries the upgraded protocol: not given back.
            drop((in_flight, lease));
        });
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, full(Bytes::new()));
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    match &pool.persistence {
        Persistence::HttpCookie if choice == Choice::Balanced => {
            let set = format!("{PERSISTENCE_COOKIE}={}; path=/", member.cookie);
            if let Ok(v) = HeaderValue::from_str(&set) {
                parts.headers.append(header::SET_COOKIE, v);
            }
        }
        Persistence::AppCookie { name, .. } => {
            for value in parts
                .headers
                .get_all(header::SET_COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
            {
                let first = value.split(';').next().unwrap_or_default().trim();
                if let Some((k, v)) = first.split_once('=')
                    && k == name
                    && !v.is_empty()
                {
                    pool.learn_app_cookie(v, &member.key);
                }
            }
        }
        _ => {}
    }
    let mut body = Tracked::new(body, member.counters.clone(), true);
    body._in_flight = Some(in_flight);
    body.lease = Some(lease);
    Response::from_parts(parts, body.boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-end-to-end", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-end-to-end"]);
        let mut up = HeaderMap::new();
        up.insert("connection", HeaderValue::from_static("Upgrade"));
        up.insert("upgrade", HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut up, true);
        assert_eq!(up.len(), 2);
        // The usual tokens name no header; any case, any spacing.
        let mut usual = HeaderMap::new();
        usual.insert("connection", HeaderValue::from_static(" Keep-Alive ,close"));
        usual.insert("content-length", HeaderValue::from_static("5"));
        usual.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut usual, false);
        let left: Vec<&str> = usual.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-length"]);
    }
}
