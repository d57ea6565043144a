//! A request loop from the client namespace: each request on a new connection, logged with
//! its start and end (CLOCK_MONOTONIC ns, comparable with `datapath::monotonic_ns`) and the
//! body or `FAIL:<why>`, until stopped.

use std::{path::PathBuf, time::Duration};

use super::topology::{Topology, VIP, wait_until};

/// One request of the loop.
#[derive(Debug, Clone)]
pub struct Request {
    /// When it started, ns.
    pub start: u64,
    /// When it ended, ns.
    pub end: u64,
    /// The body, or `FAIL:<why>`.
    pub body: String,
}

impl Request {
    /// Whether it failed.
    pub fn failed(&self) -> bool {
        self.body.starts_with("FAIL")
    }
}

/// A running loop.
pub struct RequestLoop {
    log: PathBuf,
    stop: PathBuf,
}

impl RequestLoop {
    /// Starts requesting `http://VIP/`, pausing `pause_ms` between requests; returns once
    /// requests flow.
    pub fn start(topo: &mut Topology, pause_ms: u32) -> Self {
        let log = topo.path("traffic.log");
        let stop = topo.path("traffic.stop");
        let script = format!(
            "import time,urllib.request,os\nout=open('{log}','w')\nwhile not os.path.exists('{stop}'):\n \
             t=time.monotonic_ns()\n try:\n  b=urllib.request.urlopen('http://{VIP}/',timeout=3).read().decode().strip()\n \
             except Exception as e:\n  b='FAIL:'+repr(e).replace(' ','_')\n \
             out.write('%d %d %s\\n'%(t,time.monotonic_ns(),b)); out.flush(); time.sleep({pause})\n",
            log = log.display(),
            stop = stop.display(),
            pause = f64::from(pause_ms) / 1000.0
        );
        let client = topo.client();
        topo.spawn(&client, &["/usr/bin/python3", "-c", &script], "traffic.out");
        wait_until(Duration::from_secs(10), "requests to flow", || {
            std::fs::read_to_string(&log).is_ok_and(|t| t.lines().count() > 5)
        });
        Self { log, stop }
    }

    /// Stops the loop and returns every request it made.
    pub fn stop(self) -> Vec<Request> {
        std::fs::write(&self.stop, "").expect("stop file");
        std::thread::sleep(Duration::from_millis(500));
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ' ');
                Some(Request {
                    start: parts.next()?.parse().ok()?,
                    end: parts.next()?.parse().ok()?,
                    body: parts.next()?.to_string(),
                })
            })
            .collect()
    }
}
