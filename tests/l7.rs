//! The L7 proxy end to end: HTTP and TERMINATED_HTTPS listeners on the two-arm namespace
//! topology, real HTTP servers on the members, curl and raw sockets from the client. Root only.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{
    daemon::*,
    topology::{CLIENT_ADDR, Topology, VIP, member_addr, require_root, wait_until},
    traffic::RequestLoop,
};

/// A curl answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Answer {
    /// The member that answered (`member-i`), from the body's first word.
    fn member(&self) -> &str {
        self.body.split_whitespace().next().unwrap_or_default()
    }

    /// The value of `field=` in the member's answer line.
    fn field(&self, field: &str) -> &str {
        self.body
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{field}=")))
            .unwrap_or_default()
    }
}

/// Runs curl in the client namespace with `args` (the URL among them) and parses the answer.
fn curl(topo: &Topology, args: &[&str]) -> Answer {
    let mut all = vec!["curl", "-sS", "-i", "--max-time", "5"];
    all.extend_from_slice(args);
    let out = topo.exec(&topo.client(), &all);
    assert!(
        out.status.success(),
        "curl {args:?}: {}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        topo.log("daemon.log")
    );
    parse(&String::from_utf8_lossy(&out.stdout))
}

fn parse(text: &str) -> Answer {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.trim().to_string(),
    }
}

/// Topology with `members` L7 member servers and the daemon.
fn l7_lab(tag: &str, members: usize) -> (Topology, Daemon) {
    require_root();
    let mut topo = Topology::new(tag, members);
    for i in 1..=members {
        topo.start_l7_member(i);
    }
    let daemon = start_daemon(&mut topo, "state");
    (topo, daemon)
}

fn member_line(i: usize, extra: &str) -> String {
    format!(
        "          - {{name: m{i}, address: {}, protocol_port: 80{extra}}}\n",
        member_addr(i)
    )
}

fn pool(name: &str, algorithm: &str, persistence: &str, members: &[usize]) -> String {
    let mut out = format!(
        "      - name: {name}\n        protocol: HTTP\n        lb_algorithm: {algorithm}\n{persistence}        members:\n"
    );
    for i in members {
        out.push_str(&member_line(*i, ""));
    }
    out
}

fn listener_stats(daemon: &Daemon, name: &str) -> serde_json::Value {
    let stats: serde_json::Value =
        serde_json::from_str(&ctl_ok(daemon, &["stats", "-o", "json"])).unwrap();
    stats["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == "listener" && o["name"] == format!("lb1/{name}"))
        .cloned()
        .unwrap_or_else(|| panic!("no stats for listener {name}: {stats:#}"))
}

/// The Octavia L7 cookbook: HOST_NAME and PATH policies to pools, REDIRECT_TO_URL, REJECT,
/// X-Forwarded headers at the member; and the listener's statistics match what curl saw.
#[test]
fn cookbook_policies_redirects_rejects_and_forwarded_headers() {
    let (topo, daemon) = l7_lab("l7book", 3);
    let body = format!(
        "    listeners:
      - name: web
        protocol: HTTP
        protocol_port: 80
        default_pool: login
        insert_headers: {{X-Forwarded-For: \"true\", X-Forwarded-Port: \"true\", X-Forwarded-Proto: \"true\"}}
        l7policies:
          - name: shop
            action: REDIRECT_TO_POOL
            redirect_pool: shop
            position: 1
            rules: [{{type: HOST_NAME, compare_type: EQUAL_TO, value: shop.example.com}}]
          - name: api
            action: REDIRECT_TO_POOL
            redirect_pool: api
            position: 2
            rules: [{{type: PATH, compare_type: STARTS_WITH, value: /api/}}]
          - name: moved
            action: REDIRECT_TO_URL
            redirect_url: http://www.example.com/new
            position: 3
            rules: [{{type: PATH, compare_type: EQUAL_TO, value: /old}}]
          - name: blocked
            action: REJECT
            position: 4
            rules: [{{type: HEADER, key: X-Block, compare_type: EQUAL_TO, value: 'yes'}}]
    pools:
{}{}{}",
        pool("login", "ROUND_ROBIN", "", &[1]),
        pool("shop", "ROUND_ROBIN", "", &[2]),
        pool("api", "ROUND_ROBIN", "", &[3]),
    );
    ctl_ok(
        &daemon,
        &["apply", "-f", &write_config(&topo, "l7.yaml", &body)],
    );
    let url = format!("http://{VIP}/");
    let shop = curl(&topo, &["-H", "Host: shop.example.com", &url]);
    assert_eq!((shop.status, shop.member()), (200, "member-2"), "{shop:?}");
    assert_eq!(shop.field("host"), "shop.example.com");
    for host in ["login.example.com", "other.example.org"] {
        let a = curl(&topo, &["-H", &format!("Host: {host}"), &url]);
        assert_eq!((a.status, a.member()), (200, "member-1"), "{host}: {a:?}");
    }
    let api = curl(&topo, &[&format!("http://{VIP}/api/v1?q=1")]);
    assert_eq!(api.member(), "member-3", "{api:?}");
    assert_eq!(api.field("path"), "/api/v1?q=1");
    // The member sees the client's address and the listener's port and scheme.
    assert_eq!(api.field("xff"), CLIENT_ADDR);
    assert_eq!(api.field("xfport"), "80");
    assert_eq!(api.field("xfproto"), "http");
    let moved = curl(&topo, &[&format!("http://{VIP}/old")]);
    assert_eq!(moved.status, 302, "{moved:?}");
    assert_eq!(moved.headers["location"], "http://www.example.com/new");
    let rejected = curl(&topo, &["-H", "X-Block: yes", &url]);
    assert_eq!(rejected.status, 403, "{rejected:?}");
    // A client's X-Forwarded-For is kept and the client's address appended.
    let chained = curl(&topo, &["-H", "X-Forwarded-For: 192.0.2.9", &url]);
    assert_eq!(
        chained
            .body
            .split(" xff=")
            .nth(1)
            .unwrap()
            .split(" xfport")
            .next()
            .unwrap(),
        format!("192.0.2.9,_{CLIENT_ADDR}").replace('_', " ")
    );

    // Statistics: 7 connections so far; bytes exactly what curl sent and received.
    let stats = listener_stats(&daemon, "web");
    assert_eq!(stats["total_connections"], 7, "{stats:#}");
    let out = topo.exec(
        &topo.client(),
        &[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{size_request} %{size_header} %{size_download}",
            &url,
        ],
    );
    let sizes: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let after = listener_stats(&daemon, "web");
    assert_eq!(after["total_connections"], 8);
    let delta = |k: &str| after[k].as_u64().unwrap() - stats[k].as_u64().unwrap();
    assert_eq!(delta("bytes_in"), sizes[0], "{after:#}");
    assert_eq!(delta("bytes_out"), sizes[1] + sizes[2], "{after:#}");
    assert_eq!(after["active_connections"], 0);
}

/// HTTP_COOKIE keeps a client on one member across 20 requests while a cookie-less client
/// alternates; APP_COOKIE sticks the application's session to the member that set it.
#[test]
fn cookie_persistence_keeps_a_client_on_one_member() {
    let (topo, daemon) = l7_lab("l7cookie", 2);
    let body = format!(
        "    listeners:
      - {{name: web, protocol: HTTP, protocol_port: 80, default_pool: web}}
      - {{name: app, protocol: HTTP, protocol_port: 8080, default_pool: app}}
    pools:
{}{}",
        pool(
            "web",
            "ROUND_ROBIN",
            "        session_persistence: {type: HTTP_COOKIE}\n",
            &[1, 2]
        ),
        pool(
            "app",
            "ROUND_ROBIN",
            "        session_persistence: {type: APP_COOKIE, cookie_name: JSESSIONID}\n",
            &[1, 2]
        ),
    );
    ctl_ok(
        &daemon,
        &["apply", "-f", &write_config(&topo, "l7.yaml", &body)],
    );
    let url = format!("http://{VIP}/");
    let jar = topo.path("cookies.txt").display().to_string();
    let first = curl(&topo, &["-c", &jar, "-b", &jar, &url]);
    assert!(first.headers["set-cookie"].starts_with("SRV="), "{first:?}");
    for n in 0..20 {
        let a = curl(&topo, &["-c", &jar, "-b", &jar, &url]);
        assert_eq!(a.member(), first.member(), "request {n} with the cookie");
        assert!(
            !a.headers.contains_key("set-cookie"),
            "no new cookie once stuck"
        );
    }
    let bare: Vec<String> = (0..6)
        .map(|_| curl(&topo, &[&url]).member().to_string())
        .collect();
    for pair in bare.windows(2) {
        assert_ne!(
            pair[0], pair[1],
            "a cookie-less client alternates: {bare:?}"
        );
    }

    let app = format!("http://{VIP}:8080/");
    let login = curl(&topo, &[&format!("{app}login")]);
    let session = login.headers["set-cookie"]
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(
        session.starts_with(&format!("JSESSIONID={}-", login.member())),
        "{session}"
    );
    for n in 0..10 {
        let a = curl(&topo, &["-H", &format!("Cookie: {session}"), &app]);
        assert_eq!(a.member(), login.member(), "request {n} with the session");
    }
}

fn pem_bundle(cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> String {
    format!("{}{}", cert.pem(), key.serialize_pem())
}

/// TERMINATED_HTTPS with two certificates made here and chosen by SNI; the client verifies
/// each against the test CA; HTTP/2 is negotiated through ALPN; X-Forwarded-Proto says https.
#[test]
fn terminated_https_picks_the_certificate_by_sni() {
    let (topo, daemon) = l7_lab("l7tls", 2);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lbaas test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issue = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let path = topo.path(&format!("{name}.pem"));
        std::fs::write(&path, pem_bundle(&cert, &key)).unwrap();
        path.display().to_string()
    };
    let login_pem = issue("login.example.com");
    let shop_pem = issue("shop.example.com");
    let ca_path = topo.path("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let ca_path = ca_path.display().to_string();
    let body = format!(
        "    listeners:
      - name: secure
        protocol: TERMINATED_HTTPS
        protocol_port: 443
        default_pool: web
        default_tls_container_ref: {login_pem}
        sni_container_refs: [{shop_pem}]
        insert_headers: {{X-Forwarded-Proto: \"true\"}}
    pools:
{}",
        pool("web", "ROUND_ROBIN", "", &[1, 2]),
    );
    ctl_ok(
        &daemon,
        &["apply", "-f", &write_config(&topo, "tls.yaml", &body)],
    );
    for name in ["shop.example.com", "login.example.com"] {
        let resolve = format!("{name}:443:{VIP}");
        let a = curl(
            &topo,
            &[
                "--cacert",
                &ca_path,
                "--resolve",
                &resolve,
                &format!("https://{name}/"),
            ],
        );
        assert_eq!(a.status, 200, "{name}: {a:?}");
        assert_eq!(a.field("xfproto"), "https");
        assert_eq!(a.field("host"), name);
    }
    // Raw curl to `https://<name>/` resolved to the VIP, verifying against the test CA.
    let curl_tls = |name: &str, extra: &[&str]| {
        let resolve = format!("{name}:443:{VIP}");
        let url = format!("https://{name}/");
        let mut args = vec!["curl", "-sS", "--max-time", "5", "--cacert", &ca_path];
        args.extend_from_slice(&["--resolve", &resolve]);
        args.extend_from_slice(extra);
        args.push(&url);
        topo.exec(&topo.client(), &args)
    };
    // A name no SNI certificate serves gets the default one: verification for it fails.
    let out = curl_tls("other.example.com", &[]);
    assert!(
        !out.status.success(),
        "the default certificate does not name other.example.com"
    );
    // HTTP/2 through ALPN.
    let out = curl_tls(
        "shop.example.com",
        &[
            "--http2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200", "{out:?}");
    // A certificate file that does not exist is an error naming it, and changes nothing.
    let broken = body.replace(&shop_pem, "/nonexistent/cert.pem");
    let out = ctl(
        &daemon,
        &["apply", "-f", &write_config(&topo, "bad.yaml", &broken)],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    assert!(
        text.contains("loadbalancers[0].listeners[0].default_tls_container_ref")
            && text.contains("/nonexistent/cert.pem"),
        "{text}"
    );
    let out = curl_tls("shop.example.com", &[]);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("member-"),
        "the running listener kept its certificates: {out:?}"
    );
}

fn web_listener(extra: &str, members: &[usize]) -> String {
    format!(
        "    listeners:\n      - {{name: web, protocol: HTTP, protocol_port: 80, default_pool: web{extra}}}\n    pools:\n{}",
        pool("web", "ROUND_ROBIN", "", members)
    )
}

/// A member killed while requests flow costs at most the request in flight to it: refused
/// connections are retried on the other member. No health monitor is involved.
#[test]
fn a_killed_member_costs_no_more_than_its_requests_in_flight() {
    require_root();
    let mut topo = Topology::new("l7kill", 2);
    let victim = topo.start_l7_member(1);
    topo.start_l7_member(2);
    let daemon = start_daemon(&mut topo, "state");
    ctl_ok(
        &daemon,
        &[
            "apply",
            "-f",
            &write_config(&topo, "l7.yaml", &web_listener("", &[1, 2])),
        ],
    );
    let traffic = RequestLoop::start(&mut topo, 20);
    std::thread::sleep(Duration::from_secs(1));
    topo.stop(victim, "KILL");
    std::thread::sleep(Duration::from_secs(2));
    let requests = traffic.stop();
    let failed: Vec<_> = requests.iter().filter(|r| r.failed()).collect();
    assert!(
        failed.len() <= 1,
        "{} of {} failed: {failed:?}",
        failed.len(),
        requests.len()
    );
    let after_kill: Vec<_> = requests.iter().rev().take(20).collect();
    assert!(
        after_kill.iter().all(|r| r.body.starts_with("member-2")),
        "{after_kill:?}"
    );
}

/// A member that refuses connections is skipped for requests with bodies too: nothing was
/// sent to it, so each request goes whole to the other member (`option redispatch`).
#[test]
fn requests_with_bodies_go_to_another_member_when_one_refuses() {
    require_root();
    let mut topo = Topology::new("l7redis", 2);
    // Member 2 is configured but never started: its port refuses.
    topo.start_l7_member(1);
    let daemon = start_daemon(&mut topo, "state");
    ctl_ok(
        &daemon,
        &[
            "apply",
            "-f",
            &write_config(&topo, "l7.yaml", &web_listener("", &[1, 2])),
        ],
    );
    let body = "x".repeat(1000);
    for _ in 0..6 {
        let answer = curl(
            &topo,
            &["--data-binary", &body, &format!("http://{VIP}/post")],
        );
        assert_eq!(answer.status, 200, "{answer:?}");
        assert!(answer.body.starts_with("member-1"), "{answer:?}");
        assert_eq!(
            answer.field("got"),
            "1000",
            "the whole body reached member-1"
        );
    }
}

/// Applying changes to an L7 listener under continuous traffic drops no request.
#[test]
fn applies_under_traffic_drop_no_request() {
    let (mut topo, daemon) = l7_lab("l7apply", 3);
    let file = write_config(&topo, "l7.yaml", &web_listener("", &[1, 2]));
    ctl_ok(&daemon, &["apply", "-f", &file]);
    let traffic = RequestLoop::start(&mut topo, 10);
    let sets: [&[usize]; 4] = [&[1, 2, 3], &[2, 3], &[3, 1], &[1, 2]];
    for n in 0..20 {
        let members = sets[n % sets.len()];
        let extra = if n % 2 == 0 {
            ", connection_limit: 1000"
        } else {
            ""
        };
        let file = write_config(&topo, "l7.yaml", &web_listener(extra, members));
        ctl_ok(&daemon, &["apply", "-f", &file]);
        std::thread::sleep(Duration::from_millis(100));
    }
    let requests = traffic.stop();
    let failed: Vec<_> = requests.iter().filter(|r| r.failed()).collect();
    assert!(requests.len() > 50, "{} requests", requests.len());
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        requests.len()
    );
}

/// Runs a Python snippet in the client namespace and returns its output.
fn client_python(topo: &Topology, script: &str) -> String {
    let out = topo.exec(&topo.client(), &["python3", "-c", script]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Sends a request's headers one byte per 100 ms; prints `closed <s>` when the proxy cuts
/// the connection, `open <s>` if it never does.
const SLOWLORIS: &str = r#"
import socket, time
s = socket.create_connection(('VIP', 80))
s.sendall(b'GET / HTTP/1.1\r\n')
t = time.monotonic()
state = 'open'
for c in b'X-Slow: ' + b'a' * 50:
    time.sleep(0.1)
    try:
        s.sendall(bytes([c]))
        s.settimeout(0.01)
        if s.recv(100) == b'':
            state = 'closed'
    except socket.timeout:
        pass
    except OSError:
        state = 'closed'
    if state == 'closed':
        break
print(state, round(time.monotonic() - t, 1))
"#;

/// A slowloris client (headers one byte at a time) is cut after `timeout_client_data` and
/// counted as a request error, while other clients are served meanwhile.
#[test]
fn a_slow_client_is_timed_out_and_does_not_block_others() {
    let (mut topo, daemon) = l7_lab("l7slow", 1);
    ctl_ok(
        &daemon,
        &[
            "apply",
            "-f",
            &write_config(
                &topo,
                "l7.yaml",
                &web_listener(", timeout_client_data: 1000", &[1]),
            ),
        ],
    );
    let script = SLOWLORIS.replace("VIP", VIP);
    topo.spawn(&topo.client(), &["python3", "-c", &script], "slow.out");
    std::thread::sleep(Duration::from_millis(300));
    // Others are served while the slow client dawdles.
    let a = curl(&topo, &[&format!("http://{VIP}/")]);
    assert_eq!(a.member(), "member-1");
    wait_until(Duration::from_secs(15), "the slow client to finish", || {
        !topo.log("slow.out").is_empty()
    });
    let outcome = topo.log("slow.out");
    assert!(
        outcome.starts_with("closed"),
        "the slow client was not cut: {outcome}"
    );
    let stats = listener_stats(&daemon, "web");
    assert!(stats["request_errors"].as_u64().unwrap() >= 1, "{stats:#}");
    // A kept-alive client that goes quiet after a request is cut within the same limit.
    let script = format!(
        "import socket,time\ns=socket.create_connection(('{VIP}',80),timeout=10)\n\
         s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n')\n\
         head=b''\nwhile b'member-1' not in head: head+=s.recv(1000)\n\
         t=time.time()\nrest=s.recv(1000)\n\
         print('closed' if rest==b'' else 'data', round(time.time()-t))\n"
    );
    let out = client_python(&topo, &script);
    assert_eq!(
        out, "closed 1",
        "an idle kept-alive client was not cut after 1 s"
    );
}

/// WebSocket-style upgrades are passed through: after `101`, bytes flow both ways.
#[test]
fn upgrades_are_passed_through() {
    let (topo, daemon) = l7_lab("l7up", 1);
    ctl_ok(
        &daemon,
        &[
            "apply",
            "-f",
            &write_config(&topo, "l7.yaml", &web_listener("", &[1])),
        ],
    );
    let script = format!(
        "import socket\ns=socket.create_connection(('{VIP}',80),timeout=5)\n\
         s.sendall(b'GET /ws HTTP/1.1\\r\\nHost: x\\r\\nConnection: Upgrade\\r\\nUpgrade: echo\\r\\n\\r\\n')\n\
         head=b''\nwhile b'\\r\\n\\r\\n' not in head: head+=s.recv(1)\n\
         s.sendall(b'hello through the proxy')\nback=b''\nwhile len(back)<23: back+=s.recv(100)\n\
         print(head.split(b'\\r\\n')[0].decode(), back.decode())\n"
    );
    let out = client_python(&topo, &script);
    assert_eq!(
        out,
        "HTTP/1.1 101 Switching Protocols HELLO THROUGH THE PROXY"
    );
}

/// `allowed_cidrs` refuses clients outside the prefixes; `connection_limit` refuses the
/// connection over the limit; both are counted.
#[test]
fn allowed_cidrs_and_connection_limit_refuse_and_count() {
    let (topo, daemon) = l7_lab("l7acl", 1);
    let apply = |extra: &str| {
        ctl_ok(
            &daemon,
            &[
                "apply",
                "-f",
                &write_config(&topo, "l7.yaml", &web_listener(extra, &[1])),
            ],
        )
    };
    apply(", allowed_cidrs: [192.0.2.0/24]");
    let out = topo.exec(
        &topo.client(),
        &["curl", "-sS", "--max-time", "3", &format!("http://{VIP}/")],
    );
    assert!(
        !out.status.success(),
        "a client outside allowed_cidrs was served"
    );
    apply(", allowed_cidrs: [10.77.1.0/24, 192.0.2.0/24]");
    assert_eq!(
        curl(&topo, &[&format!("http://{VIP}/")]).member(),
        "member-1"
    );
    apply(", connection_limit: 2");
    let script = format!(
        "import socket,time\nheld=[socket.create_connection(('{VIP}',80)) for _ in range(2)]\ntime.sleep(0.3)\n\
         s=socket.create_connection(('{VIP}',80))\ns.settimeout(3)\n\
         try:\n s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'); r=s.recv(100); print('served' if r else 'refused')\n\
         except OSError: print('refused')\n"
    );
    assert_eq!(client_python(&topo, &script), "refused");
    let stats: serde_json::Value =
        serde_json::from_str(&ctl_ok(&daemon, &["stats", "-o", "json"])).unwrap();
    let web = stats["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["listener"] == "web")
        .unwrap()
        .clone();
    assert_eq!(web["refused_connections"], 2, "{web:#}");
}

/// A `tls_enabled` pool: the proxy re-encrypts to the members' HTTPS port.
#[test]
fn tls_enabled_pools_are_spoken_to_over_tls() {
    require_root();
    let mut topo = Topology::new("l7reenc", 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![member_addr(1)])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (topo.path("member.crt"), topo.path("member.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    topo.start_l7_member_with(1, Some((&cert_path, &key_path)));
    let daemon = start_daemon(&mut topo, "state");
    let body = format!(
        "    listeners:\n      - {{name: web, protocol: HTTP, protocol_port: 80, default_pool: web}}\n    pools:\n      - name: web\n        protocol: HTTP\n        lb_algorithm: ROUND_ROBIN\n        tls_enabled: true\n        members:\n          - {{address: {}, protocol_port: 443}}\n",
        member_addr(1)
    );
    ctl_ok(
        &daemon,
        &["apply", "-f", &write_config(&topo, "l7.yaml", &body)],
    );
    let a = curl(&topo, &[&format!("http://{VIP}/")]);
    assert_eq!(
        (a.status, a.member(), a.field("tls")),
        (200, "member-1", "True"),
        "{a:?}"
    );
}

/// The proxy takes health from the same state as the XDP path: a member failing its HTTP
/// checks gets no request (although it still answers), and comes back when it recovers.
#[test]
fn members_failing_their_health_checks_get_no_requests() {
    require_root();
    let mut topo = Topology::new("l7health", 2);
    topo.start_health_member(1, None);
    topo.start_health_member(2, None);
    let daemon = start_daemon(&mut topo, "state");
    let body = format!(
        "    listeners:\n      - {{name: web, protocol: HTTP, protocol_port: 80, default_pool: web}}\n    pools:\n      - name: web\n        protocol: HTTP\n        lb_algorithm: ROUND_ROBIN\n        healthmonitor: {{type: HTTP, delay: 2, timeout: 1, max_retries: 1, max_retries_down: 1, url_path: /health}}\n        members:\n{}{}",
        member_line(1, ""),
        member_line(2, "")
    );
    ctl_ok(
        &daemon,
        &["apply", "-f", &write_config(&topo, "l7.yaml", &body)],
    );
    let url = format!("http://{VIP}/");
    let answers = |n: usize| -> Vec<String> {
        (0..n)
            .map(|_| topo.curl(&url).expect("curl through the proxy"))
            .collect()
    };
    let both = answers(4);
    assert!(
        both.contains(&"member-1".to_string()) && both.contains(&"member-2".to_string()),
        "{both:?}"
    );
    topo.set_healthy(1, false);
    wait_until(
        Duration::from_secs(10),
        "member-1 out of the proxy's selection",
        || answers(4).iter().all(|b| b == "member-2"),
    );
    assert!(answers(10).iter().all(|b| b == "member-2"));
    topo.set_healthy(1, true);
    wait_until(Duration::from_secs(10), "member-1 back", || {
        answers(4).contains(&"member-1".to_string())
    });
}
