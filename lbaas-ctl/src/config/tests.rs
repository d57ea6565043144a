use super::*;

const GOOD: &str = r#"
loadbalancers:
  - name: lb1
    vip_address: 10.0.0.100
    listeners:
      - name: ssh
        protocol: TCP
        protocol_port: 22
        default_pool: ssh-pool
      - name: dns
        protocol: UDP
        protocol_port: 53
        default_pool: dns-pool
    pools:
      - name: ssh-pool
        protocol: TCP
        lb_algorithm: ROUND_ROBIN
        members:
          - {name: a, address: 10.0.1.4, protocol_port: 22}
          - {name: b, address: 10.0.1.6, protocol_port: 22, weight: 3}
      - name: dns-pool
        protocol: UDP
        lb_algorithm: ROUND_ROBIN
        members:
          - {address: 10.0.1.4, protocol_port: 53}
"#;

fn errors(yaml: &str) -> Vec<String> {
    match load_str(yaml, "t.yaml") {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid { errors, .. }) => errors.iter().map(|e| e.to_string()).collect(),
        Err(other) => vec![other.to_string()],
    }
}

/// Applies `edit` to the good file's text and returns the errors.
fn errors_after(from: &str, to: &str) -> Vec<String> {
    assert!(GOOD.contains(from), "fixture does not contain {from:?}");
    errors(&GOOD.replacen(from, to, 1))
}

fn assert_one(errors: Vec<String>, expected: &str) {
    assert_eq!(
        errors.len(),
        1,
        "expected exactly one error, got {errors:#?}"
    );
    assert_eq!(errors[0], expected);
}

#[test]
fn good_file_is_valid_and_gets_octavia_defaults() {
    let config = load_str(GOOD, "t.yaml").expect("valid");
    let lb = &config.loadbalancers[0];
    assert!(lb.admin_state_up);
    let l = &lb.listeners[0];
    assert_eq!(l.connection_limit, -1);
    assert_eq!(l.timeout_client_data, 50_000);
    assert_eq!(l.timeout_member_connect, 5_000);
    assert_eq!(l.timeout_member_data, 50_000);
    assert_eq!(l.timeout_tcp_inspect, 0);
    let m = &lb.pools[0].members[0];
    assert_eq!(m.weight, 1);
    assert!(m.admin_state_up);
    assert!(!m.backup);
    assert_eq!(lb.pools[0].members[1].weight, 3);
}

#[test]
fn port_out_of_range_names_its_path() {
    assert_one(
        errors_after("protocol_port: 22\n", "protocol_port: 99999\n"),
        "loadbalancers[0].listeners[0].protocol_port: 99999 is out of range 1-65535",
    );
}

#[test]
fn unknown_enum_values_list_the_valid_ones() {
    assert_one(
        errors_after(
            "protocol: TCP\n        protocol_port: 22",
            "protocol: SCTPX\n        protocol_port: 22",
        ),
        "loadbalancers[0].listeners[0].protocol: \"SCTPX\" is not one of TCP, UDP, HTTPS, HTTP, TERMINATED_HTTPS",
    );
    let e = errors_after("lb_algorithm: ROUND_ROBIN", "lb_algorithm: RANDOM");
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("loadbalancers[0].pools[0].lb_algorithm: \"RANDOM\" is not one of"));
}

#[test]
fn member_rules() {
    assert_one(
        errors_after("weight: 3", "weight: 257"),
        "loadbalancers[0].pools[0].members[1].weight: 257 is out of range 0-256",
    );
    assert_one(
        errors_after("address: 10.0.1.6", "address: 10.0.1.300"),
        "loadbalancers[0].pools[0].members[1].address: \"10.0.1.300\" is not an IP address",
    );
    assert_one(
        errors_after(
            "address: 10.0.1.6, protocol_port: 22",
            "address: 10.0.1.4, protocol_port: 22",
        ),
        "loadbalancers[0].pools[0].members[1]: 10.0.1.4:22 is already a member of this pool (loadbalancers[0].pools[0].members[0])",
    );
    assert!(
        errors_after("weight: 3", "weight: 0").is_empty(),
        "weight 0 drains, it is valid"
    );
}

#[test]
fn listener_rules() {
    assert_one(
        errors_after("default_pool: ssh-pool", "default_pool: nope"),
        "loadbalancers[0].listeners[0].default_pool: no pool named \"nope\" in this load balancer",
    );
    assert_one(
        errors_after("default_pool: ssh-pool", "default_pool: dns-pool"),
        "loadbalancers[0].listeners[0].default_pool: pool \"dns-pool\" has protocol UDP, but a TCP listener allows HTTP, HTTPS, PROXY, PROXYV2, TCP",
    );
    assert_one(
        errors_after(
            "protocol_port: 53",
            "protocol_port: 53\n        connection_limit: -2",
        ),
        "loadbalancers[0].listeners[1].connection_limit: -2 must be -1 (unlimited) or 0-2147483647",
    );
    assert_one(
        errors_after(
            "protocol_port: 53",
            "protocol_port: 53\n        timeout_client_data: 2073600001",
        ),
        "loadbalancers[0].listeners[1].timeout_client_data: 2073600001 is out of range 0-2073600000",
    );
    assert_one(
        errors_after(
            "protocol_port: 53",
            "protocol_port: 53\n        insert_headers: {X-Forwarded-For: \"true\"}",
        ),
        "loadbalancers[0].listeners[1].insert_headers: is only allowed on HTTP and TERMINATED_HTTPS listeners, not UDP",
    );
}

#[test]
fn duplicate_names_and_ports() {
    assert_one(
        errors_after("name: dns\n", "name: ssh\n"),
        "loadbalancers[0].listeners[1].name: \"ssh\" is already used by loadbalancers[0].listeners[0]",
    );
    // Same port on TCP and UDP is fine; same port twice on TCP is not.
    assert!(errors_after("protocol_port: 53", "protocol_port: 22").is_empty());
    let yaml = GOOD
        .replacen(
            "protocol: UDP\n        protocol_port: 53",
            "protocol: HTTPS\n        protocol_port: 22",
            1,
        )
        .replacen("default_pool: dns-pool", "default_pool: ssh-pool", 1);
    assert_one(
        errors(&yaml),
        "loadbalancers[0].listeners[1].protocol_port: TCP port 22 on 10.0.0.100 is already used by loadbalancers[0].listeners[0]",
    );
    let two = format!("{GOOD}{}", &GOOD["\nloadbalancers:\n".len()..]);
    let e = errors(&two);
    assert!(
        e.contains(
            &"loadbalancers[1].name: \"lb1\" is already used by loadbalancers[0]".to_string()
        ),
        "{e:#?}"
    );
}

#[test]
fn several_errors_are_reported_together() {
    let yaml = GOOD
        .replacen("protocol_port: 22\n", "protocol_port: 0\n", 1)
        .replacen("weight: 3", "weight: -1", 1)
        .replacen("vip_address: 10.0.0.100", "vip_address: banana", 1)
        .replacen("lb_algorithm: ROUND_ROBIN", "lb_algorithm: FASTEST", 1);
    let e = errors(&yaml);
    assert_eq!(e.len(), 4, "{e:#?}");
    assert!(
        e.iter()
            .any(|e| e.starts_with("loadbalancers[0].vip_address:"))
    );
    assert!(
        e.iter()
            .any(|e| e.starts_with("loadbalancers[0].listeners[0].protocol_port:"))
    );
    assert!(
        e.iter()
            .any(|e| e.starts_with("loadbalancers[0].pools[0].members[1].weight:"))
    );
    assert!(
        e.iter()
            .any(|e| e.starts_with("loadbalancers[0].pools[0].lb_algorithm:"))
    );
}

#[test]
fn healthmonitor_rules_follow_octavia() {
    let with_hm = |hm: &str| {
        errors_after(
            "lb_algorithm: ROUND_ROBIN\n        members",
            &format!("lb_algorithm: ROUND_ROBIN\n        healthmonitor: {hm}\n        members"),
        )
    };
    let e = with_hm("{type: TCP, delay: 3, timeout: 5, max_retries: 11, url_path: /x}");
    let at = "loadbalancers[0].pools[0].healthmonitor";
    assert!(
        e.contains(&format!("{at}.timeout: 5 must be less than delay (3)")),
        "{e:#?}"
    );
    assert!(
        e.contains(&format!("{at}.max_retries: 11 is out of range 1-10")),
        "{e:#?}"
    );
    assert!(
        e.contains(&format!(
            "{at}.url_path: is only allowed for HTTP and HTTPS monitors, not TCP"
        )),
        "{e:#?}"
    );
    let e = with_hm(
        "{type: HTTP, delay: 5, timeout: 3, max_retries: 2, expected_codes: '200,201-204', url_path: health}",
    );
    assert!(e.contains(&format!("{at}.expected_codes: \"200,201-204\" is not a code (200), a list (200,202) or a range (200-204)")), "{e:#?}");
    assert!(
        e.contains(&format!(
            "{at}.url_path: \"health\" must be a path starting with /"
        )),
        "{e:#?}"
    );
    let e = with_hm("{type: UDP-CONNECT, delay: 2, timeout: 1, max_retries: 2}");
    assert!(
        e.contains(&format!(
            "{at}.type: UDP-CONNECT is only allowed on UDP pools, not TCP"
        )),
        "{e:#?}"
    );
    assert!(
        e.contains(&format!("{at}.delay: 2 must be at least 3 for UDP-CONNECT")),
        "{e:#?}"
    );
}

#[test]
fn every_algorithm_and_source_ip_persistence_are_accepted() {
    for algorithm in [
        "ROUND_ROBIN",
        "LEAST_CONNECTIONS",
        "SOURCE_IP",
        "SOURCE_IP_PORT",
    ] {
        let e = errors_after(
            "lb_algorithm: ROUND_ROBIN",
            &format!("lb_algorithm: {algorithm}"),
        );
        assert!(e.is_empty(), "{algorithm}: {e:?}");
    }
    let sticky = "lb_algorithm: ROUND_ROBIN\n        session_persistence: {type: SOURCE_IP}";
    assert!(errors_after("lb_algorithm: ROUND_ROBIN", sticky).is_empty());
    let limited = "protocol_port: 53\n        connection_limit: 1000";
    assert!(errors_after("protocol_port: 53", limited).is_empty());
}

#[test]
fn least_connections_pools_are_bounded() {
    let members: String = (0..129)
        .map(|i| {
            format!(
                "\n          - {{address: 10.0.2.{}, protocol_port: {}}}",
                i % 250,
                1000 + i
            )
        })
        .collect();
    let yaml = GOOD.replacen(
        "lb_algorithm: ROUND_ROBIN\n        members:",
        &format!("lb_algorithm: LEAST_CONNECTIONS\n        members:{members}"),
        1,
    );
    assert_eq!(
        errors(&yaml),
        [
            "loadbalancers[0].pools[0].members: 131 members; a LEAST_CONNECTIONS pool has at most 128 (the data path scans them per new flow)"
        ]
    );
}

#[test]
fn expected_codes_forms() {
    for ok in ["200", "200,202", "200, 202 ,204", "200-204"] {
        assert!(valid_expected_codes(ok), "{ok}");
    }
    for bad in ["", "20", "2000", "200-", "200,201-204", "abc", "200;201"] {
        assert!(!valid_expected_codes(bad), "{bad}");
    }
}

#[test]
fn persistence_rules() {
    let with_sp = |sp: &str| {
        errors_after(
            "name: dns-pool\n        protocol: UDP",
            &format!("name: dns-pool\n        protocol: UDP\n        session_persistence: {sp}"),
        )
    };
    let at = "loadbalancers[0].pools[1].session_persistence";
    let e = with_sp("{type: APP_COOKIE}");
    assert!(
        e.contains(&format!("{at}.cookie_name: is required for APP_COOKIE")),
        "{e:#?}"
    );
    assert!(
        e.contains(&format!(
            "{at}.type: APP_COOKIE is not allowed on UDP pools"
        )),
        "{e:#?}"
    );
    let e = with_sp("{type: SOURCE_IP, cookie_name: x}");
    assert!(
        e.contains(&format!(
            "{at}.cookie_name: is only allowed with APP_COOKIE"
        )),
        "{e:#?}"
    );
}

#[test]
fn l7_policies_only_on_http_listeners_and_rules_checked() {
    let e = errors_after(
        "default_pool: ssh-pool",
        "default_pool: ssh-pool\n        l7policies:\n          - {action: REDIRECT_TO_POOL, redirect_pool: missing, rules: [{type: HEADER, compare_type: EQUAL_TO, value: x}, {type: FILE_TYPE, compare_type: CONTAINS, value: png}]}",
    );
    let at = "loadbalancers[0].listeners[0].l7policies";
    assert!(
        e.contains(&format!(
            "{at}: are only allowed on HTTP and TERMINATED_HTTPS listeners, not TCP"
        )),
        "{e:#?}"
    );
    assert!(
        e.contains(&format!(
            "{at}[0].redirect_pool: no pool named \"missing\" in this load balancer"
        )),
        "{e:#?}"
    );
    assert!(
        e.contains(&format!(
            "{at}[0].rules[0].key: is required for HEADER rules"
        )),
        "{e:#?}"
    );
    assert!(
        e.contains(&format!(
            "{at}[0].rules[1].compare_type: FILE_TYPE rules allow REGEX or EQUAL_TO, not CONTAINS"
        )),
        "{e:#?}"
    );
}

#[test]
fn allowed_cidrs_on_l4_listeners_are_checked_entry_by_entry() {
    let e = errors_after(
        "protocol_port: 22\n",
        "protocol_port: 22\n        allowed_cidrs: [10.0.0.0/8, 192.0.2.7/32]\n",
    );
    assert_eq!(e, Vec::<String>::new());
    let e = errors_after(
        "protocol_port: 22\n",
        "protocol_port: 22\n        allowed_cidrs: [10.0.0.0/8, 2001:db8::/32, 10.0.0.0/33]\n",
    );
    assert_eq!(e.len(), 2, "{e:#?}");
    for expected in [
        "loadbalancers[0].listeners[0].allowed_cidrs[1]: \"2001:db8::/32\" is IPv6 but the VIP is IPv4; no client could match it",
        "loadbalancers[0].listeners[0].allowed_cidrs[2]: \"10.0.0.0/33\" is not a CIDR such as 192.0.2.0/24",
    ] {
        assert!(e.contains(&expected.to_string()), "{expected}\n{e:#?}");
    }
}

#[test]
fn unsupported_features_are_refused_clearly() {
    let e = errors_after(
        "lb_algorithm: ROUND_ROBIN",
        "lb_algorithm: ROUND_ROBIN\n        session_persistence: {type: HTTP_COOKIE}",
    );
    assert_one(
        e,
        "loadbalancers[0].listeners[0].default_pool: pool \"ssh-pool\" has HTTP_COOKIE persistence, which needs an HTTP or TERMINATED_HTTPS listener; a TCP listener does not read HTTP",
    );
    let e = errors_after("vip_address: 10.0.0.100", "vip_address: \"2001:db8::1\"");
    assert_one(
        e,
        "loadbalancers[0].vip_address: an IPv6 VIP is not supported yet",
    );
}

#[test]
fn shape_errors_carry_a_line() {
    let err = load_str(
        "loadbalancers:\n  - name: x\n    vip_adress: 1.2.3.4\n",
        "f.yaml",
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("f.yaml: "), "{text}");
    assert!(text.contains("unknown field `vip_adress`"), "{text}");
    assert!(text.contains("line 3"), "{text}");
}

#[test]
fn empty_file_is_an_empty_config() {
    assert_eq!(load_str("", "e").unwrap(), Config::default());
}

#[test]
fn round_trips_through_json() {
    let config = load_str(GOOD, "t.yaml").unwrap();
    let json = serde_json::to_string(&config).unwrap();
    assert_eq!(serde_json::from_str::<Config>(&json).unwrap(), config);
}

/// Seeded mutation fuzzing of the loader and validator: never a panic; every error names
/// where (a YAML path, or the parser's line and column).
#[test]
fn mutated_files_never_panic_and_every_error_says_where() {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let pieces = [
        ":", "-", " ", "\n", "{", "}", "[", "]", "'", "\"", "#", "&a", "*a", "!!int", "-1",
        "99999", "null", "~", "\t", "name: x",
    ];
    for _ in 0..20_000 {
        let mut text: Vec<u8> = GOOD.as_bytes().to_vec();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % text.len().max(1);
            match next() % 4 {
                0 => {
                    text.remove(at.min(text.len() - 1));
                }
                1 => {
                    let piece = pieces[(next() as usize) % pieces.len()];
                    text.splice(at..at, piece.bytes());
                }
                2 => text.truncate(at),
                _ => {
                    let i = at.min(text.len() - 1);
                    text[i] = next() as u8;
                }
            }
            if text.is_empty() {
                break;
            }
        }
        let text = String::from_utf8_lossy(&text).into_owned();
        match load_str(&text, "fuzz.yaml") {
            Ok(_) => {}
            Err(ConfigError::Invalid { errors, .. }) => {
                assert!(!errors.is_empty());
                for e in errors {
                    assert!(
                        e.path.starts_with("loadbalancers"),
                        "error without a path: {e} in\n{text}"
                    );
                    assert!(!e.message.is_empty());
                }
            }
            Err(ConfigError::Parse { message, .. }) => {
                assert!(
                    message.contains("line")
                        || message.contains("at position")
                        || !message.is_empty(),
                    "{message}"
                );
            }
            Err(other) => panic!("unexpected error kind: {other}"),
        }
    }
}

#[test]
fn capacity_limits_are_checked_before_anything_is_written() {
    // 140 SOURCE_IP listeners over one pool: 140 Maglev tables of 16381 slots, over half the ring.
    let mut yaml =
        String::from("loadbalancers:\n  - name: lb\n    vip_address: 10.0.0.1\n    listeners:\n");
    for port in 0..140 {
        yaml.push_str(&format!(
            "      - {{name: l{port}, protocol: TCP, protocol_port: {}, default_pool: p}}\n",
            1000 + port
        ));
    }
    yaml.push_str("    pools:\n      - {name: p, protocol: TCP, lb_algorithm: SOURCE_IP, members: [{address: 10.0.1.1, protocol_port: 80}]}\n");
    let e = errors(&yaml);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(
        e[0].starts_with("loadbalancers: the listeners' selection tables need up to 2293340 slots"),
        "{}",
        e[0]
    );
}

const L7: &str = r#"
loadbalancers:
  - name: lb1
    vip_address: 10.0.0.100
    listeners:
      - name: web
        protocol: HTTP
        protocol_port: 80
        default_pool: login
        insert_headers: {X-Forwarded-For: "true"}
        allowed_cidrs: [10.0.0.0/8]
        l7policies:
          - name: shop
            action: REDIRECT_TO_POOL
            redirect_pool: shop
            position: 1
            rules:
              - {type: HOST_NAME, compare_type: REGEX, value: "^shop\\."}
    pools:
      - name: login
        protocol: HTTP
        lb_algorithm: ROUND_ROBIN
        session_persistence: {type: HTTP_COOKIE}
        members: [{address: 10.0.1.4, protocol_port: 80}]
      - name: shop
        protocol: HTTP
        lb_algorithm: LEAST_CONNECTIONS
        session_persistence: {type: APP_COOKIE, cookie_name: JSESSIONID}
        members: [{address: 10.0.1.5, protocol_port: 80}]
"#;

#[test]
fn l7_listeners_policies_and_cookie_persistence_are_valid() {
    assert_eq!(errors(L7), Vec::<String>::new());
}

#[test]
fn a_bad_regex_an_unknown_inserted_header_and_misplaced_sni_are_named() {
    let yaml = L7
        .replace("value: \"^shop\\\\.\"", "value: \"(shop\"")
        .replace("X-Forwarded-For: \"true\"", "X-Forwarded-Host: \"true\"")
        .replace(
            "allowed_cidrs: [10.0.0.0/8]",
            "sni_container_refs: [/etc/a.pem]",
        );
    let e = errors(&yaml);
    assert_eq!(e.len(), 3, "{e:#?}");
    for expected in [
        "loadbalancers[0].listeners[0].insert_headers.X-Forwarded-Host: is not a header the proxy inserts (X-Forwarded-For, X-Forwarded-Port, X-Forwarded-Proto)",
        "loadbalancers[0].listeners[0].sni_container_refs: are only allowed on TERMINATED_HTTPS listeners, not HTTP",
        "loadbalancers[0].listeners[0].l7policies[0].rules[0].value: \"(shop\" is not a valid regular expression (unclosed group)",
    ] {
        assert!(e.contains(&expected.to_string()), "{expected}\n{e:#?}");
    }
}
