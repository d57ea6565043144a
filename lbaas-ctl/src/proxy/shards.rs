//! The threads that serve L7 connections: one single-threaded tokio runtime per core, each
//! accepting from its own `SO_REUSEPORT` socket of every listener and keeping its own pooled
//! connections to members, so that a request is read, forwarded and answered on one thread
//! (HAProxy's thread model). A work-stealing runtime moved each request between threads twice
//! (the client connection's task and the member connection's task), and the wake-ups cost more
//! than the work.

use std::{cell::RefCell, collections::HashMap, sync::OnceLock, time::Duration};

use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::runtime::Handle;

use super::forward::MemberClient;

static SHARDS: OnceLock<Vec<Handle>> = OnceLock::new();

thread_local! {
    /// This thread's clients to members, by connect timeout.
    static CLIENTS: RefCell<HashMap<Option<Duration>, MemberClient>> = RefCell::new(HashMap::new());
}

/// The serving runtimes, started on first use: as many as the machine has cores.
pub fn handles() -> &'static [Handle] {
    SHARDS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (0..cores).map(start).collect()
    })
}

fn start(index: usize) -> Handle {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("lbaas-l7-{index}"))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("an L7 serving runtime");
            tx.send(runtime.handle().clone())
                .expect("the starting thread waits for the handle");
            runtime.block_on(std::future::pending::<()>());
        })
        .expect("an L7 serving thread");
    rx.recv().expect("the serving thread sends its handle")
}

/// The calling thread's client to members with `connect_timeout`; its connections (and the
/// tasks that drive them) stay on this thread.
pub fn member_client(connect_timeout: Option<Duration>) -> MemberClient {
    CLIENTS.with(|clients| {
        clients
            .borrow_mut()
            .entry(connect_timeout)
            .or_insert_with(|| new_client(connect_timeout))
            .clone()
    })
}

fn new_client(connect_timeout: Option<Duration>) -> MemberClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(connect_timeout);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*crate::health::insecure_client_config()).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https)
}
