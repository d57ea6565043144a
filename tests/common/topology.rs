//! The two-arm test topology in network namespaces, shared by the integration tests and
//! `cargo xtask demo` (which includes this file by path).
//!
//! ```text
//!  client ns            LB ns                    switch ns          member ns (xN)
//!  eth0 10.77.1.2 ---- lan0 10.77.1.1            br0
//!                      (VIP 10.77.1.100/32)
//!                      mem0 10.77.2.1 -------- p-lb  p-mK -------- eth0 10.77.2.1K
//! ```
//! Members route through the LB node (two-arm `nat` mode). Every name carries a prefix unique
//! to the process and topology, and [`Topology`]'s `Drop` kills the processes it started and
//! deletes its namespaces, also when a test panics.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// Client address.
pub const CLIENT_ADDR: &str = "10.77.1.2";
/// LB node's own client-side address.
pub const LB_CLIENT_SIDE_ADDR: &str = "10.77.1.1";
/// LB node's member-side address (the members' gateway).
pub const LB_MEMBER_SIDE_ADDR: &str = "10.77.2.1";
/// The VIP used by the tests and the demo.
pub const VIP: &str = "10.77.1.100";

/// Address of member `i` (1-based).
pub fn member_addr(i: usize) -> String {
    format!("10.77.2.{}", 10 + i)
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command, panicking with its output when it fails.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command line split on whitespace (no quoting), panicking when it fails.
pub fn sh(line: &str) -> Output {
    run(&line.split_whitespace().collect::<Vec<_>>())
}

/// Runs a command and ignores failure (for cleanup).
fn run_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Panics with a clear message unless running as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions; declared here to avoid a libc dependency.
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    let euid = unsafe { geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (network namespaces, XDP): run `sudo cargo xtask test`"
    );
}

/// A running topology.
pub struct Topology {
    /// Unique prefix of every namespace name.
    pub prefix: String,
    /// Number of members.
    pub members: usize,
    /// Scratch directory (socket, state, member pages); removed on drop.
    pub dir: PathBuf,
    children: Vec<Child>,
    bpffs_mounted: bool,
}

impl Topology {
    /// Namespace of the client.
    pub fn client(&self) -> String {
        format!("{}-c", self.prefix)
    }
    /// Namespace of the LB node.
    pub fn lb(&self) -> String {
        format!("{}-lb", self.prefix)
    }
    /// Namespace of the switch between LB and members.
    pub fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }
    /// Namespace of member `i` (1-based).
    pub fn member(&self, i: usize) -> String {
        format!("{}-m{i}", self.prefix)
    }

    fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.client(), self.lb(), self.switch()];
        all.extend((1..=self.members).map(|i| self.member(i)));
        all
    }

    /// Builds the namespaces and links. `tag` makes names readable (`lbt-<tag>-<pid>-<n>`).
    pub fn new(tag: &str, members: usize) -> Self {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("lbt-{tag}-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let topo = Self {
            prefix,
            members,
            dir,
            children: Vec::new(),
            bpffs_mounted: false,
        };
        // From here on, Drop cleans up whatever was created, even if a step panics.
        topo.build();
        topo
    }

    fn build(&self) {
        for ns in self.namespaces() {
            sh(&format!("ip netns add {ns}"));
            sh(&format!("ip -n {ns} link set lo up"));
        }
        let (c, lb, sw) = (self.client(), self.lb(), self.switch());
        sh(&format!(
            "ip link add eth0 netns {c} type veth peer name lan0 netns {lb}"
        ));
        sh(&format!(
            "ip link add mem0 netns {lb} type veth peer name p-lb netns {sw}"
        ));
        sh(&format!("ip -n {sw} link add br0 type bridge"));
        sh(&format!("ip -n {sw} link set br0 up"));
        sh(&format!("ip -n {sw} link set p-lb master br0 up"));
        sh(&format!("ip -n {c} addr add {CLIENT_ADDR}/24 dev eth0"));
        sh(&format!("ip -n {c} link set eth0 up"));
        sh(&format!(
            "ip -n {c} route add default via {LB_CLIENT_SIDE_ADDR}"
        ));
        sh(&format!(
            "ip -n {lb} addr add {LB_CLIENT_SIDE_ADDR}/24 dev lan0"
        ));
        sh(&format!(
            "ip -n {lb} addr add {LB_MEMBER_SIDE_ADDR}/24 dev mem0"
        ));
        sh(&format!("ip -n {lb} link set lan0 up"));
        sh(&format!("ip -n {lb} link set mem0 up"));
        sh(&format!(
            "ip netns exec {lb} sysctl -qw net.ipv4.ip_forward=1"
        ));
        for i in 1..=self.members {
            let (m, addr) = (self.member(i), member_addr(i));
            sh(&format!(
                "ip link add eth0 netns {m} type veth peer name p-m{i} netns {sw}"
            ));
            sh(&format!("ip -n {sw} link set p-m{i} master br0 up"));
            sh(&format!("ip -n {m} addr add {addr}/24 dev eth0"));
            sh(&format!("ip -n {m} link set eth0 up"));
            sh(&format!(
                "ip -n {m} route add default via {LB_MEMBER_SIDE_ADDR}"
            ));
            // veth offloads checksums; an XDP-forwarded frame would carry a partial one.
            sh(&format!("ip netns exec {m} ethtool -K eth0 tx off"));
        }
        sh(&format!("ip netns exec {c} ethtool -K eth0 tx off"));
        // Frames XDP-redirected into a veth are dropped unless its peer takes XDP frames.
        sh(&format!("ip netns exec {c} ethtool -K eth0 gro on"));
        sh(&format!("ip netns exec {sw} ethtool -K p-lb gro on"));
    }

    /// Deletes the client-side link (both ends) and creates it again as it was: what a
    /// re-created interface looks like to the daemon.
    pub fn recreate_client_link(&self) {
        let (c, lb) = (self.client(), self.lb());
        sh(&format!("ip -n {lb} link del lan0"));
        sh(&format!(
            "ip link add eth0 netns {c} type veth peer name lan0 netns {lb}"
        ));
        sh(&format!("ip -n {c} addr add {CLIENT_ADDR}/24 dev eth0"));
        sh(&format!("ip -n {c} link set eth0 up"));
        sh(&format!(
            "ip -n {c} route add default via {LB_CLIENT_SIDE_ADDR}"
        ));
        sh(&format!(
            "ip -n {lb} addr add {LB_CLIENT_SIDE_ADDR}/24 dev lan0"
        ));
        sh(&format!("ip -n {lb} link set lan0 up"));
        sh(&format!("ip netns exec {c} ethtool -K eth0 tx off"));
        sh(&format!("ip netns exec {c} ethtool -K eth0 gro on"));
    }

    /// A bpf filesystem of this topology's own (mounted on first use, unmounted on drop),
    /// where the daemon pins its maps and links: shared with `ip netns exec`'s mount
    /// namespaces, so the pins outlive a daemon, as on a real node's /sys/fs/bpf.
    pub fn bpffs(&mut self) -> PathBuf {
        let dir = self.dir.join("bpf");
        if !self.bpffs_mounted {
            std::fs::create_dir_all(&dir).expect("bpffs dir");
            sh(&format!("mount -t bpf bpf {}", dir.display()));
            self.bpffs_mounted = true;
        }
        dir
    }

    /// Starts `lbaas-ctl daemon` (binary `ctl`) in the LB namespace on the topology's two arms,
    /// pinning on the topology's bpffs; `extra` arguments go after the daemon's.
    pub fn spawn_daemon(
        &mut self,
        ctl: &str,
        socket: &Path,
        state_dir: &Path,
        extra: &[&str],
    ) -> u32 {
        let lb = self.lb();
        let pins = self.bpffs().join("lbaas").display().to_string();
        let (socket, state_dir) = (
            socket.display().to_string(),
            state_dir.display().to_string(),
        );
        let mut args = vec![
            ctl,
            "--socket",
            &socket,
            "daemon",
            "--interface",
            "lan0",
            "--member-interface",
            "mem0",
            "--state-dir",
            &state_dir,
            "--pin-path",
            &pins,
        ];
        args.extend_from_slice(extra);
        self.spawn(&lb, &args, "daemon.log")
    }

    /// Starts a process inside namespace `ns`; it is killed on drop.
    pub fn spawn(&mut self, ns: &str, args: &[&str], log: &str) -> u32 {
        let log_path = self.dir.join(log);
        let log_file = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {args:?} in {ns}: {e}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Stops a process started by [`Topology::spawn`] with a signal and waits for it.
    pub fn stop(&mut self, pid: u32, signal: &str) -> std::process::ExitStatus {
        run_quiet(&["kill", &format!("-{signal}"), &pid.to_string()]);
        let index = self
            .children
            .iter()
            .position(|c| c.id() == pid)
            .expect("a process this topology started");
        let mut child = self.children.remove(index);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("process {pid} did not stop within 10 s of SIG{signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts an HTTP server on member `i`, port 80, answering `member-i`.
    pub fn start_http_member(&mut self, i: usize) {
        let root = self.dir.join(format!("www{i}"));
        std::fs::create_dir_all(&root).expect("www dir");
        std::fs::write(root.join("index.html"), format!("member-{i}\n")).expect("index.html");
        let root = root.display().to_string();
        let addr = member_addr(i);
        let ns = self.member(i);
        self.spawn(
            &ns,
            &[
                "/usr/bin/python3",
                "-m",
                "http.server",
                "80",
                "--bind",
                &addr,
                "--directory",
                &root,
            ],
            &format!("http{i}.log"),
        );
        self.wait_tcp(&ns, &addr, 80);
    }

    /// Starts an HTTP/1.1 (keep-alive) server on member `i`, port 80, for the L7 tests. Every
    /// answer is one line: `member-i host=<Host> xff=<X-Forwarded-For> xfport=<..> xfproto=<..>
    /// path=<path> got=<request body bytes>`; `/login` also sets `JSESSIONID=member-i-<n>`,
    /// `/slow=<s>` answers after `s` seconds, and `Upgrade: echo` switches protocols and echoes
    /// bytes upper-cased. Returns the server's pid.
    pub fn start_l7_member(&mut self, i: usize) -> u32 {
        self.start_l7_member_with(i, None)
    }

    /// [`Topology::start_l7_member`], also serving HTTPS on port 443 with `tls` = PEM
    /// certificate and key paths (answers then say `tls=True`).
    pub fn start_l7_member_with(&mut self, i: usize, tls: Option<(&Path, &Path)>) -> u32 {
        let script = self.dir.join("l7_member.py");
        std::fs::write(&script, L7_MEMBER).expect("member script");
        let addr = member_addr(i);
        let ns = self.member(i);
        let mut args = vec![
            "/usr/bin/python3".to_string(),
            script.display().to_string(),
            addr.clone(),
            format!("member-{i}"),
        ];
        if let Some((cert, key)) = tls {
            args.push(cert.display().to_string());
            args.push(key.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = self.spawn(&ns, &args, &format!("l7-{i}.log"));
        self.wait_tcp(&ns, &addr, 80);
        if tls.is_some() {
            self.wait_tcp(&ns, &addr, 443);
        }
        pid
    }

    /// Starts an HTTP server on member `i`, port 80 (and HTTPS on 443 with `tls` = PEM
    /// certificate and key paths): `/health` answers 200 while the file `healthy<i>` exists in
    /// the scratch directory and 503 otherwise; every other path answers `member-i`.
    /// Returns the server's pid.
    pub fn start_health_member(&mut self, i: usize, tls: Option<(&Path, &Path)>) -> u32 {
        let flag = self.dir.join(format!("healthy{i}"));
        std::fs::write(&flag, "").expect("health flag");
        let addr = member_addr(i);
        let tls_lines = match tls {
            Some((cert, key)) => format!(
                "import ssl,threading\n\
                 t=ThreadingHTTPServer(('{addr}',443),H)\n\
                 c=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain('{}','{}')\n\
                 t.socket=c.wrap_socket(t.socket,server_side=True)\n\
                 threading.Thread(target=t.serve_forever,daemon=True).start()\n",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        let script = format!(
            "import os\n\
             from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer\n\
             class H(BaseHTTPRequestHandler):\n \
             def do_GET(self):\n  \
             ok=self.path!='/health' or os.path.exists('{flag}')\n  \
             body=(b'member-{i}\\n' if self.path!='/health' else (b'ok\\n' if ok else b'sick\\n'))\n  \
             self.send_response(200 if ok else 503); self.send_header('Content-Length',str(len(body))); self.end_headers(); self.wfile.write(body)\n \
             def log_message(self,*a): pass\n\
             {tls_lines}\
             ThreadingHTTPServer(('{addr}',80),H).serve_forever()\n",
            flag = flag.display()
        );
        let ns = self.member(i);
        let pid = self.spawn(
            &ns,
            &["/usr/bin/python3", "-u", "-c", &script],
            &format!("health{i}.log"),
        );
        self.wait_tcp(&ns, &addr, 80);
        if tls.is_some() {
            self.wait_tcp(&ns, &addr, 443);
        }
        pid
    }

    /// Marks member `i`'s `/health` as failing (503) or passing (200).
    pub fn set_healthy(&self, i: usize, healthy: bool) {
        let flag = self.dir.join(format!("healthy{i}"));
        if healthy {
            std::fs::write(&flag, "").expect("health flag");
        } else {
            let _ = std::fs::remove_file(&flag);
        }
    }

    /// Starts a TCP line-echo server on member `i`, port 7000: each line comes back as
    /// `member-i:<line>`; any number of concurrent connections.
    pub fn start_echo_member(&mut self, i: usize) {
        let addr = member_addr(i);
        let script = format!(
            "import socketserver\n\
             class H(socketserver.StreamRequestHandler):\n \
             def handle(self):\n  \
             for line in self.rfile:\n   \
             self.wfile.write(b'member-{i}:'+line); self.wfile.flush()\n\
             socketserver.ThreadingTCPServer.allow_reuse_address=True\n\
             socketserver.ThreadingTCPServer.daemon_threads=True\n\
             socketserver.ThreadingTCPServer(('{addr}',7000),H).serve_forever()\n"
        );
        let ns = self.member(i);
        self.spawn(
            &ns,
            &["/usr/bin/python3", "-u", "-c", &script],
            &format!("echo{i}.log"),
        );
        self.wait_tcp(&ns, &addr, 7000);
    }

    /// Starts a UDP echo server on member `i`, port 5353: it answers `member-i:<datagram>`.
    /// Returns its pid.
    pub fn start_udp_member(&mut self, i: usize) -> u32 {
        let addr = member_addr(i);
        let script = format!(
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{addr}',5353))\n\
             while True:\n d,a=s.recvfrom(2048)\n s.sendto(b'member-{i}:'+d,a)\n"
        );
        let ns = self.member(i);
        let pid = self.spawn(
            &ns,
            &["/usr/bin/python3", "-u", "-c", &script],
            &format!("udp{i}.log"),
        );
        self.wait_listening(&ns, "-lun", &addr, 5353);
        pid
    }

    /// Waits until something listens on `addr:port` (TCP) in `ns`.
    pub fn wait_tcp(&self, ns: &str, addr: &str, port: u16) {
        self.wait_listening(ns, "-ltn", addr, port);
    }

    /// Waits until `ss FLAGS` in `ns` lists `addr:port`.
    fn wait_listening(&self, ns: &str, flags: &str, addr: &str, port: u16) {
        let what = format!("a listener on {addr}:{port} ({flags})");
        wait_until(Duration::from_secs(10), &what, || {
            let out = self.exec(ns, &["ss", flags]);
            String::from_utf8_lossy(&out.stdout).contains(&format!("{addr}:{port}"))
        });
    }

    /// Runs a command in namespace `ns` and returns its output (not checked).
    pub fn exec(&self, ns: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {args:?} in {ns}: {e}"))
    }

    /// `curl` from the client; returns the body on success.
    pub fn curl(&self, url: &str) -> Result<String, String> {
        let out = self.exec(&self.client(), &["curl", "-sS", "--max-time", "5", url]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Path of a file in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The contents of a log written by a spawned process.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
}

/// Polls `ready` every 50 ms until it holds, or panics naming `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces() {
            // Anything else still running inside (a stray child of a child) goes too.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    run_quiet(&["kill", "-9", pid]);
                }
            }
            run_quiet(&["ip", "netns", "del", &ns]);
        }
        if self.bpffs_mounted {
            // Unmounting drops the pins: the pinned links detach, the maps go.
            run_quiet(&["umount", "-l", &self.dir.join("bpf").display().to_string()]);
        }
        if !std::thread::panicking() || std::env::var_os("LBAAS_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether a path exists (for readability in tests).
pub fn exists(path: &Path) -> bool {
    path.exists()
}

/// The L7 tests' member server (see [`Topology::start_l7_member`]).
const L7_MEMBER: &str = r#"
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
addr, name = sys.argv[1], sys.argv[2]
count = [0]
class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def log_message(self, *args):
        pass
    def do_GET(self):
        if self.headers.get('Upgrade', '').lower() == 'echo':
            self.send_response(101)
            self.send_header('Upgrade', 'echo')
            self.send_header('Connection', 'Upgrade')
            self.end_headers()
            self.wfile.flush()
            while True:
                data = self.connection.recv(4096)
                if not data:
                    break
                self.connection.sendall(data.upper())
            self.close_connection = True
            return
        length = int(self.headers.get('Content-Length') or 0)
        got = len(self.rfile.read(length)) if length else 0
        count[0] += 1
        if self.path.startswith('/slow='):
            time.sleep(float(self.path.split('=')[1]))
        h = self.headers
        body = ('%s host=%s xff=%s xfport=%s xfproto=%s path=%s got=%d tls=%s\n' % (
            name, h.get('Host'), h.get('X-Forwarded-For'), h.get('X-Forwarded-Port'),
            h.get('X-Forwarded-Proto'), self.path, got, getattr(self.server, 'tls', False))).encode()
        self.send_response(200)
        if self.path.startswith('/login'):
            self.send_header('Set-Cookie', 'JSESSIONID=%s-%d; Path=/' % (name, count[0]))
        self.send_header('Content-Type', 'text/plain')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
if len(sys.argv) > 4:
    import ssl, threading
    secure = ThreadingHTTPServer((addr, 443), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[3], sys.argv[4])
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    secure.tls = True
    threading.Thread(target=secure.serve_forever, daemon=True).start()
ThreadingHTTPServer((addr, 80), Handler).serve_forever()
"#;
