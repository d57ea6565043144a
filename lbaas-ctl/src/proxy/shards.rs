//! The threads that serve L7 connections: one single-threaded tokio runtime per core, each
//! accepting from its own `SO_REUSEPORT` socket of every listener and keeping its own idle
//! connections to members (`conns`), so that a request is read, forwarded and answered on one thread
//! (HAProxy's thread model). A work-stealing runtime moved each request between threads twice
//! (the client connection's task and the member connection's task), and the wake-ups cost more
//! than the work.

use std::sync::OnceLock;

use tokio::runtime::Handle;

static SHARDS: OnceLock<Vec<Handle>> = OnceLock::new();

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
            runtime.block_on(super::conns::expire_idle_forever());
        })
        .expect("an L7 serving thread");
    rx.recv().expect("the serving thread sends its handle")
}
