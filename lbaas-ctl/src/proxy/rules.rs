//! L7 policies and rules: compiled at apply time (regexes included), evaluated per request in
//! `position` order, first match wins, every enabled rule of a policy must match.
//!
//! Matching follows what Octavia's HAProxy driver renders: HOST_NAME compares the `Host`
//! header without its port and ignoring case; PATH the path without the query; FILE_TYPE the
//! extension of the path's last segment; HEADER and COOKIE the value under `key`. A missing
//! header or cookie does not match (so an inverted rule on it does). REGEX searches (it is not
//! anchored), as HAProxy's `-m reg` does.

use hyper::http::{HeaderMap, HeaderName, header};

use crate::config::{CompareType, L7Action, L7Policy, L7Rule, L7RuleType};

/// What a rule compares its subject with.
#[derive(Debug, Clone)]
enum Matcher {
    Equal(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(regex::Regex),
}

impl Matcher {
    fn matches(&self, subject: &str) -> bool {
        match self {
            Matcher::Equal(v) => subject == v,
            Matcher::Prefix(v) => subject.starts_with(v.as_str()),
            Matcher::Suffix(v) => subject.ends_with(v.as_str()),
            Matcher::Contains(v) => subject.contains(v.as_str()),
            Matcher::Regex(r) => r.is_match(subject),
        }
    }
}

/// What part of the request a rule looks at.
#[derive(Debug, Clone)]
enum Subject {
    Host,
    Path,
    FileType,
    Header(HeaderName),
    Cookie(String),
}

/// One compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    subject: Subject,
    matcher: Matcher,
    invert: bool,
}

/// The parts of a request rules look at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// Host name (from `Host` or the HTTP/2 authority), port removed.
    pub host: Option<&'a str>,
    /// Path without the query.
    pub path: &'a str,
    /// Request headers.
    pub headers: &'a HeaderMap,
}

/// A policy's action, with its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the request to this pool.
    Pool(String),
    /// Answer with a redirect to this URL.
    RedirectUrl {
        /// Location.
        url: String,
        /// Status code.
        code: u16,
    },
    /// Answer with a redirect to this prefix followed by the request's path and query.
    RedirectPrefix {
        /// Location prefix.
        prefix: String,
        /// Status code.
        code: u16,
    },
    /// Answer 403.
    Reject,
}

/// One compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The policy's name (for logs).
    pub name: String,
    /// What a match does.
    pub action: Action,
    rules: Vec<Rule>,
}

/// A listener's policies in evaluation order.
#[derive(Debug, Clone, Default)]
pub struct Policies(Vec<Policy>);

/// A rule that cannot be compiled (only a bad regex; validation catches it first).
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct RuleError {
    /// YAML path of the rule.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Compiles a rule's regex, for validation and for the proxy.
pub fn compile_regex(value: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(value)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| {
            // The parser's message draws a caret over several lines; its last line says why.
            let text = e.to_string();
            let why = text.lines().last().unwrap_or_default().trim();
            format!(
                "{value:?} is not a valid regular expression ({})",
                why.trim_start_matches("error: ")
            )
        })
}

impl Rule {
    fn compile(rule: &L7Rule, at: &str) -> Result<Self, RuleError> {
        let subject = match rule.rule_type {
            L7RuleType::HostName => Subject::Host,
            L7RuleType::Path => Subject::Path,
            L7RuleType::FileType => Subject::FileType,
            L7RuleType::Header => {
                let key = rule.key.as_deref().unwrap_or_default();
                Subject::Header(
                    HeaderName::from_bytes(key.as_bytes()).map_err(|_| RuleError {
                        path: format!("{at}.key"),
                        message: format!("{key:?} is not a header name"),
                    })?,
                )
            }
            L7RuleType::Cookie => Subject::Cookie(rule.key.clone().unwrap_or_default()),
            L7RuleType::Invalid(_) => {
                return Err(RuleError {
                    path: format!("{at}.type"),
                    message: "unknown rule type".into(),
                });
            }
        };
        // Host names compare ignoring case; FILE_TYPE values may be written with their dot.
        let value = match subject {
            Subject::Host => rule.value.to_ascii_lowercase(),
            Subject::FileType => rule.value.trim_start_matches('.').to_string(),
            _ => rule.value.clone(),
        };
        let matcher = match rule.compare_type {
            CompareType::EqualTo => Matcher::Equal(value),
            CompareType::StartsWith => Matcher::Prefix(value),
            CompareType::EndsWith => Matcher::Suffix(value),
            CompareType::Contains => Matcher::Contains(value),
            CompareType::Regex => {
                let source = match subject {
                    Subject::Host => format!("(?i){}", rule.value),
                    _ => rule.value.clone(),
                };
                Matcher::Regex(compile_regex(&source).map_err(|message| RuleError {
                    path: format!("{at}.value"),
                    message,
                })?)
            }
            CompareType::Invalid(_) => {
                return Err(RuleError {
                    path: format!("{at}.compare_type"),
                    message: "unknown compare type".into(),
                });
            }
        };
        Ok(Self {
            subject,
            matcher,
            invert: rule.invert,
        })
    }

    /// Whether the request satisfies this rule (`invert` applied).
    pub fn matches(&self, request: &RequestView<'_>) -> bool {
        let hit = match &self.subject {
            Subject::Host => request
                .host
                .is_some_and(|h| self.matcher.matches(&h.to_ascii_lowercase())),
            Subject::Path => self.matcher.matches(request.path),
            Subject::FileType => file_type(request.path).is_some_and(|t| self.matcher.matches(t)),
            Subject::Header(name) => request
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| self.matcher.matches(v)),
            Subject::Cookie(name) => {
                cookie(request.headers, name).is_some_and(|v| self.matcher.matches(v))
            }
        };
        hit != self.invert
    }
}

/// The extension of the path's last segment (`/a/b.tar.gz` -> `gz`).
fn file_type(path: &str) -> Option<&str> {
    let last = path.rsplit('/').next()?;
    let (_, ext) = last.rsplit_once('.')?;
    (!ext.is_empty()).then_some(ext)
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

impl Policies {
    /// Compiles a listener's policies (`at` is the listener's YAML path). Disabled policies
    /// and rules are left out, and so are policies left without an enabled rule: Octavia
    /// renders no ACL for them, so they never match.
    pub fn compile(policies: &[L7Policy], at: &str) -> Result<Self, RuleError> {
        let mut order: Vec<(i64, usize)> = policies
            .iter()
            .enumerate()
            .map(|(i, p)| (p.position.unwrap_or(i64::MAX), i))
            .collect();
        order.sort();
        let mut out = Vec::new();
        for (_, i) in order {
            let p = &policies[i];
            let pat = format!("{at}.l7policies[{i}]");
            if !p.admin_state_up {
                continue;
            }
            let mut rules = Vec::new();
            for (k, r) in p.rules.iter().enumerate() {
                if r.admin_state_up {
                    rules.push(Rule::compile(r, &format!("{pat}.rules[{k}]"))?);
                }
            }
            if rules.is_empty() {
                continue;
            }
            let code = u16::try_from(p.redirect_http_code).unwrap_or(302);
            let action = match p.action {
                L7Action::RedirectToPool => {
                    Action::Pool(p.redirect_pool.clone().unwrap_or_default())
                }
                L7Action::RedirectToUrl => Action::RedirectUrl {
                    url: p.redirect_url.clone().unwrap_or_default(),
                    code,
                },
                L7Action::RedirectPrefix => Action::RedirectPrefix {
                    prefix: p.redirect_prefix.clone().unwrap_or_default(),
                    code,
                },
                L7Action::Reject | L7Action::Invalid(_) => Action::Reject,
            };
            out.push(Policy {
                name: if p.name.is_empty() {
                    pat
                } else {
                    p.name.clone()
                },
                action,
                rules,
            });
        }
        Ok(Self(out))
    }

    /// The first policy every rule of which matches the request.
    pub fn evaluate(&self, request: &RequestView<'_>) -> Option<&Policy> {
        self.0
            .iter()
            .find(|p| p.rules.iter().all(|r| r.matches(request)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::http::HeaderValue;

    fn rule(t: &str, c: &str, value: &str, key: Option<&str>, invert: bool) -> L7Rule {
        serde_yaml_ng::from_str(&format!(
            "{{type: {t}, compare_type: {c}, value: {value:?}, invert: {invert}{}}}",
            key.map(|k| format!(", key: {k}")).unwrap_or_default()
        ))
        .unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// A rule type, its key, and a value that matches the hit request per compare type.
    type Case<'a> = (&'a str, Option<&'a str>, [(&'a str, &'a str); 5]);

    /// Every rule type x compare type, each plain and inverted, against a request that
    /// matches and one that does not.
    #[test]
    fn every_rule_type_and_compare_type_with_and_without_invert() {
        let h = headers(&[
            ("x-tenant", "blue-team"),
            ("cookie", "a=1; session=abc123; z=9"),
        ]);
        let hit = RequestView {
            host: Some("Shop.Example.com"),
            path: "/static/img/logo.png",
            headers: &h,
        };
        let empty = HeaderMap::new();
        let miss = RequestView {
            host: Some("login.example.org"),
            path: "/api/v1/users",
            headers: &empty,
        };
        let cases: &[Case] = &[
            (
                "HOST_NAME",
                None,
                [
                    ("EQUAL_TO", "shop.example.com"),
                    ("STARTS_WITH", "shop."),
                    ("ENDS_WITH", ".example.com"),
                    ("CONTAINS", "p.exam"),
                    ("REGEX", "^shop\\.[a-z]+\\.com$"),
                ],
            ),
            (
                "PATH",
                None,
                [
                    ("EQUAL_TO", "/static/img/logo.png"),
                    ("STARTS_WITH", "/static/"),
                    ("ENDS_WITH", "logo.png"),
                    ("CONTAINS", "/img/"),
                    ("REGEX", "^/static/.*\\.png$"),
                ],
            ),
            (
                "HEADER",
                Some("X-Tenant"),
                [
                    ("EQUAL_TO", "blue-team"),
                    ("STARTS_WITH", "blue"),
                    ("ENDS_WITH", "-team"),
                    ("CONTAINS", "e-t"),
                    ("REGEX", "^b.*m$"),
                ],
            ),
            (
                "COOKIE",
                Some("session"),
                [
                    ("EQUAL_TO", "abc123"),
                    ("STARTS_WITH", "abc"),
                    ("ENDS_WITH", "123"),
                    ("CONTAINS", "c1"),
                    ("REGEX", "^[a-c]+[0-9]+$"),
                ],
            ),
        ];
        for (t, key, compares) in cases {
            for (c, value) in compares {
                for invert in [false, true] {
                    let r = Rule::compile(&rule(t, c, value, *key, invert), "r").unwrap();
                    assert_eq!(
                        r.matches(&hit),
                        !invert,
                        "{t} {c} {value:?} invert={invert}"
                    );
                    assert_eq!(
                        r.matches(&miss),
                        invert,
                        "{t} {c} {value:?} invert={invert} (miss)"
                    );
                }
            }
        }
        // FILE_TYPE allows EQUAL_TO and REGEX.
        for (c, value) in [
            ("EQUAL_TO", "png"),
            ("EQUAL_TO", ".png"),
            ("REGEX", "^(png|jpg)$"),
        ] {
            for invert in [false, true] {
                let r = Rule::compile(&rule("FILE_TYPE", c, value, None, invert), "r").unwrap();
                assert_eq!(r.matches(&hit), !invert, "FILE_TYPE {c} {value}");
                assert_eq!(r.matches(&miss), invert, "FILE_TYPE {c} {value} (miss)");
            }
        }
    }

    #[test]
    fn missing_host_header_or_cookie_does_not_match() {
        let empty = HeaderMap::new();
        let view = RequestView {
            host: None,
            path: "/",
            headers: &empty,
        };
        for (t, key) in [
            ("HOST_NAME", None),
            ("HEADER", Some("X-A")),
            ("COOKIE", Some("c")),
        ] {
            let plain = Rule::compile(&rule(t, "CONTAINS", "", key, false), "r").unwrap();
            assert!(!plain.matches(&view), "{t}");
            let inverted = Rule::compile(&rule(t, "CONTAINS", "", key, true), "r").unwrap();
            assert!(inverted.matches(&view), "{t} inverted");
        }
    }

    fn policies(yaml: &str) -> Policies {
        let list: Vec<L7Policy> = serde_yaml_ng::from_str(yaml).unwrap();
        Policies::compile(&list, "listeners[0]").unwrap()
    }

    #[test]
    fn position_order_first_match_wins_and_all_rules_must_match() {
        let p = policies(
            r#"
- {name: late, action: REJECT, position: 5, rules: [{type: PATH, compare_type: STARTS_WITH, value: /}]}
- {name: both, action: REDIRECT_TO_POOL, redirect_pool: api, position: 1,
   rules: [{type: PATH, compare_type: STARTS_WITH, value: /api}, {type: HOST_NAME, compare_type: EQUAL_TO, value: a.example}]}
- {name: unplaced, action: REDIRECT_TO_URL, redirect_url: "http://x.example/", rules: [{type: PATH, compare_type: EQUAL_TO, value: /old}]}
- {name: disabled, action: REJECT, position: 0, admin_state_up: false, rules: [{type: PATH, compare_type: STARTS_WITH, value: /}]}
- {name: no-rules, action: REJECT, position: 1}
"#,
        );
        let h = HeaderMap::new();
        let at = |host: &str, path: &'static str| {
            p.evaluate(&RequestView {
                host: Some(host),
                path,
                headers: &h,
            })
            .map(|p| p.name.clone())
        };
        assert_eq!(at("a.example", "/api/x").as_deref(), Some("both"));
        // One rule of `both` fails: the next policy in position order takes it.
        assert_eq!(at("b.example", "/api/x").as_deref(), Some("late"));
        // Unpositioned policies come after positioned ones.
        assert_eq!(at("a.example", "/old").as_deref(), Some("late"));
        let actions: Vec<&str> = p.0.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(actions, ["both", "late", "unplaced"]);
    }

    #[test]
    fn a_bad_regex_names_the_rule() {
        let list: Vec<L7Policy> = serde_yaml_ng::from_str(
            "[{action: REJECT, rules: [{type: PATH, compare_type: REGEX, value: '(unclosed'}]}]",
        )
        .unwrap();
        let e = Policies::compile(&list, "loadbalancers[0].listeners[1]").unwrap_err();
        assert_eq!(
            e.path,
            "loadbalancers[0].listeners[1].l7policies[0].rules[0].value"
        );
        assert!(e.message.contains("(unclosed"), "{e}");
    }

    #[test]
    fn cookies_are_found_among_several_headers() {
        let h = headers(&[("cookie", "a=1"), ("cookie", "SRV=\"m2\"; b=2")]);
        assert_eq!(cookie(&h, "SRV"), Some("m2"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
