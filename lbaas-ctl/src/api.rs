//! The control API: HTTP/1.1 with JSON bodies on the daemon's Unix socket, and its client.
//!
//! | method and path                 | body in            | body out                       |
//! |---------------------------------|--------------------|--------------------------------|
//! | `GET /v1/config`                |                    | the running [`Config`]         |
//! | `POST /v1/apply?prune=true`     | [`ApplyRequest`]   | [`ApplyResponse`]              |
//! | `DELETE /v1/loadbalancers/NAME` |                    | [`ApplyResponse`]              |
//! | `GET /v1/stats`                 |                    | [`StatsResponse`]              |
//! | `GET /v1/status`                |                    | [`StatusResponse`]             |
//!
//! Errors come back with a 4xx/5xx status and an [`ErrorResponse`].

use std::{future::Future, path::Path, pin::Pin, sync::Arc};

use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::net::{UnixListener, UnixStream};

use crate::{
    config::{Config, ValidationError},
    diff::Change,
    status::StatusResponse,
};

/// Body of `POST /v1/apply`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApplyRequest {
    /// The YAML text, validated again by the daemon.
    pub yaml: String,
    /// Where it came from, for error messages.
    pub origin: String,
}

/// Answer to a change.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// Objects created, updated, deleted.
    pub changes: Vec<Change>,
}

/// An error answer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// What went wrong.
    pub error: String,
    /// Validation errors with their YAML paths, when the input was invalid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ValidationError>,
}

/// Counters of one listener.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListenerCounters {
    /// Load balancer name.
    pub loadbalancer: String,
    /// Listener name.
    pub listener: String,
    /// Packets client -> member.
    pub packets_in: u64,
    /// IP bytes client -> member.
    pub bytes_in: u64,
    /// Packets member -> client.
    pub packets_out: u64,
    /// IP bytes member -> client.
    pub bytes_out: u64,
    /// New flows.
    pub total_connections: u64,
    /// Open flows (opened - closed - expired).
    pub active_connections: u64,
    /// New connections refused by the connection limit (or, on L7 listeners, by
    /// `allowed_cidrs`).
    pub refused_connections: u64,
    /// Requests that failed on the client's side (L7 listeners: malformed, too slow, cut).
    #[serde(default)]
    pub request_errors: u64,
    /// Requests the proxy answered itself because no member could (L7 listeners).
    #[serde(default)]
    pub member_errors: u64,
}

/// Octavia's statistics of one object (`GET /v2/lbaas/.../stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectStats {
    /// `loadbalancer`, `listener`, `pool` or `member`.
    pub kind: String,
    /// Path: `lb`, `lb/listener`, `lb/pool`, `lb/pool/address:port`.
    pub name: String,
    /// Open connections (flows) now.
    pub active_connections: u64,
    /// IP bytes from clients.
    pub bytes_in: u64,
    /// IP bytes to clients.
    pub bytes_out: u64,
    /// Connections (flows) handled.
    pub total_connections: u64,
    /// Failed requests (HTTP listeners; always 0 for L4).
    pub request_errors: u64,
}

/// Body of `GET /v1/stats`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StatsResponse {
    /// Global data-path counters by name.
    pub datapath: Vec<(String, u64)>,
    /// Per-listener counters.
    pub listeners: Vec<ListenerCounters>,
    /// Octavia's statistics of every load balancer, listener, pool and member.
    #[serde(default)]
    pub objects: Vec<ObjectStats>,
}

/// An API failure as the handler reports it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Message.
    pub message: String,
    /// Validation errors, if any.
    pub errors: Vec<ValidationError>,
}

impl ApiError {
    /// An error with a status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            errors: Vec::new(),
        }
    }
}

/// What the daemon does for each request.
pub trait Handler: Send + Sync + 'static {
    /// The running configuration.
    fn config(&self) -> impl Future<Output = Config> + Send;
    /// Applies a YAML document.
    fn apply(
        &self,
        request: ApplyRequest,
        prune: bool,
    ) -> impl Future<Output = Result<ApplyResponse, ApiError>> + Send;
    /// Deletes one load balancer.
    fn delete(&self, name: String) -> impl Future<Output = Result<ApplyResponse, ApiError>> + Send;
    /// Reads the counters.
    fn stats(&self) -> impl Future<Output = Result<StatsResponse, ApiError>> + Send;
    /// The Octavia status trees.
    fn status(&self) -> impl Future<Output = StatusResponse> + Send;
}

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes =
        serde_json::to_vec(body).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static response parts are valid")
}

fn error_response(e: ApiError) -> Response<Full<Bytes>> {
    json_response(
        e.status,
        &ErrorResponse {
            error: e.message,
            errors: e.errors,
        },
    )
}

async fn route<H: Handler>(handler: Arc<H>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let prune = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "prune=true"));
    let result = match (&method, path.as_str()) {
        (&Method::GET, "/v1/config") => Ok(json_response(StatusCode::OK, &handler.config().await)),
        (&Method::POST, "/v1/apply") => match read_json::<ApplyRequest>(request).await {
            Ok(body) => handler
                .apply(body, prune)
                .await
                .map(|r| json_response(StatusCode::OK, &r)),
            Err(e) => Err(e),
        },
        (&Method::GET, "/v1/status") => Ok(json_response(StatusCode::OK, &handler.status().await)),
        (&Method::GET, "/v1/stats") => handler
            .stats()
            .await
            .map(|r| json_response(StatusCode::OK, &r)),
        (&Method::DELETE, p) if p.starts_with("/v1/loadbalancers/") => {
            let name = p.trim_start_matches("/v1/loadbalancers/").to_string();
            handler
                .delete(name)
                .await
                .map(|r| json_response(StatusCode::OK, &r))
        }
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {method} {path}"),
        )),
    };
    result.unwrap_or_else(error_response)
}

/// Largest request body the API reads (a YAML file of thousands of members fits easily).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

async fn read_json<T: DeserializeOwned>(request: Request<Incoming>) -> Result<T, ApiError> {
    let body = http_body_util::Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("reading request body (at most {MAX_BODY_BYTES} bytes): {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("request body: {e}")))
}

/// Who may use the API besides root and the daemon's own user.
#[derive(Clone, Copy, Debug, Default)]
pub struct Access {
    /// Members of this group (primary or supplementary) may.
    pub group: Option<u32>,
}

/// The groups of a process: its primary group and the supplementary ones in /proc.
fn process_groups(pid: i32, primary: u32) -> Vec<u32> {
    let mut groups = vec![primary];
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
        && let Some(line) = status.lines().find(|l| l.starts_with("Groups:"))
    {
        groups.extend(
            line["Groups:".len()..]
                .split_whitespace()
                .filter_map(|g| g.parse::<u32>().ok()),
        );
    }
    groups
}

impl Access {
    /// Whether the peer on a connection may use the API (checked from its credentials, on top
    /// of the socket file's permissions).
    fn allows(&self, stream: &UnixStream) -> Result<(), String> {
        let cred = stream
            .peer_cred()
            .map_err(|e| format!("reading peer credentials: {e}"))?;
        // SAFETY: geteuid has no preconditions.
        let own = unsafe { libc::geteuid() };
        if cred.uid() == 0 || cred.uid() == own {
            return Ok(());
        }
        if let (Some(group), Some(pid)) = (self.group, cred.pid())
            && process_groups(pid, cred.gid()).contains(&group)
        {
            return Ok(());
        }
        Err(format!(
            "uid {} (pid {:?}) is not allowed",
            cred.uid(),
            cred.pid()
        ))
    }
}

/// Serves the API on `listener` until the future is dropped, to the peers `access` allows.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>, access: Access) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting an API connection failed");
                continue;
            }
        };
        if let Err(why) = access.allows(&stream) {
            tracing::warn!(%why, "API connection refused");
            continue; // dropping the stream closes it
        }
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let handler = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(route(handler, request).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "API connection ended with an error");
            }
        });
    }
}

/// Why a CLI request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon listens on the socket.
    #[error(
        "cannot reach the daemon at {socket}: {source} (is `lbaas-ctl daemon` running? see --socket)"
    )]
    Connect {
        /// Socket path.
        socket: String,
        /// The error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("talking to the daemon: {0}")]
    Http(#[from] hyper::Error),
    /// The daemon refused the request.
    #[error("{}", render_error(.0))]
    Refused(ErrorResponse),
    /// The answer was not what was expected.
    #[error("unexpected answer from the daemon: {0}")]
    Decode(String),
}

fn render_error(e: &ErrorResponse) -> String {
    let mut out = e.error.clone();
    for v in &e.errors {
        out.push_str(&format!("\n  {v}"));
    }
    out
}

/// A client of the daemon's API.
pub struct Client {
    socket: std::path::PathBuf,
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl Client {
    /// A client for the daemon at `socket`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    fn call<'a, T: DeserializeOwned + 'a>(
        &'a self,
        method: Method,
        path: &'a str,
        body: Option<Vec<u8>>,
    ) -> BoxFuture<'a, Result<T, ClientError>> {
        Box::pin(async move {
            let stream =
                UnixStream::connect(&self.socket)
                    .await
                    .map_err(|source| ClientError::Connect {
                        socket: self.socket.display().to_string(),
                        source,
                    })?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "lbaas")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| ClientError::Decode(e.to_string()))?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            if !status.is_success() {
                let error = serde_json::from_slice::<ErrorResponse>(&bytes).unwrap_or_else(|_| {
                    ErrorResponse {
                        error: format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
                        errors: Vec::new(),
                    }
                });
                return Err(ClientError::Refused(error));
            }
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
        })
    }

    /// The running configuration.
    pub async fn config(&self) -> Result<Config, ClientError> {
        self.call(Method::GET, "/v1/config", None).await
    }

    /// Applies a YAML document.
    pub async fn apply(
        &self,
        request: &ApplyRequest,
        prune: bool,
    ) -> Result<ApplyResponse, ClientError> {
        let path = if prune {
            "/v1/apply?prune=true"
        } else {
            "/v1/apply"
        };
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Decode(e.to_string()))?;
        self.call(Method::POST, path, Some(body)).await
    }

    /// Deletes a load balancer.
    pub async fn delete(&self, name: &str) -> Result<ApplyResponse, ClientError> {
        let path = format!("/v1/loadbalancers/{name}");
        self.call(Method::DELETE, &path, None).await
    }

    /// Reads the counters.
    pub async fn stats(&self) -> Result<StatsResponse, ClientError> {
        self.call(Method::GET, "/v1/stats", None).await
    }

    /// The Octavia status trees.
    pub async fn status(&self) -> Result<StatusResponse, ClientError> {
        self.call(Method::GET, "/v1/status", None).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;

    impl Handler for Nothing {
        async fn config(&self) -> Config {
            Config::default()
        }
        async fn apply(&self, _r: ApplyRequest, _prune: bool) -> Result<ApplyResponse, ApiError> {
            Ok(ApplyResponse::default())
        }
        async fn delete(&self, name: String) -> Result<ApplyResponse, ApiError> {
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no load balancer named {name:?}"),
            ))
        }
        async fn stats(&self) -> Result<StatsResponse, ApiError> {
            Ok(StatsResponse::default())
        }
        async fn status(&self) -> StatusResponse {
            StatusResponse::default()
        }
    }

    async fn raw(socket: &Path, request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = UnixStream::connect(socket).await.unwrap();
        // The server may answer (and close) before it has read a huge body.
        let _ = stream.write_all(request).await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn malformed_and_oversized_bodies_get_400_and_the_client_reports_errors() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        tokio::spawn(serve(listener, Arc::new(Nothing), Access::default()));

        let bad_json = b"POST /v1/apply HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\nConnection: close\r\n\r\n{\"yaml\": ";
        let answer = raw(&socket, bad_json).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("request body"), "{answer}");

        let size = MAX_BODY_BYTES + 1;
        let mut huge = format!("POST /v1/apply HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n").into_bytes();
        huge.extend(std::iter::repeat_n(b' ', size));
        let answer = raw(&socket, &huge).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{}",
            &answer[..answer.len().min(200)]
        );

        let client = Client::new(&socket);
        let err = client.delete("nope").await.unwrap_err();
        assert_eq!(err.to_string(), "no load balancer named \"nope\"");
        let answer = raw(
            &socket,
            b"GET /v2/nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        assert!(client.config().await.unwrap().loadbalancers.is_empty());
    }
}
