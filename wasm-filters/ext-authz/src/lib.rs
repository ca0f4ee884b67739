//! `ext-authz`: ask an authorization service about every request, Envoy `ext_authz` style.
//!
//! Configuration:
//!
//! ```json
//! {
//!   "upstream": "authz.default.svc.cluster.local:8000",
//!   "path_prefix": "/check",
//!   "timeout_ms": 200,
//!   "allowed_request_headers": ["authorization", "cookie"],
//!   "allowed_upstream_headers": ["x-user-id"],
//!   "allowed_client_headers": ["www-authenticate"],
//!   "failure_mode_allow": false,
//!   "status_on_error": 403
//! }
//! ```
//!
//! On request headers the filter pauses the request and dispatches a check to `upstream` (an
//! Envoy cluster, or a mesh `host:port` in Ambit): same method, `path_prefix` + the original
//! path, `:authority` = `authority` (default: `upstream`), the original host in
//! `x-forwarded-host`, and the `allowed_request_headers` that are present. Then:
//!
//! - **2xx**: the request goes on, with the `allowed_upstream_headers` of the answer set on it;
//! - **any other status**: the client gets that status, the answer's body, its
//!   `content-type` and its `allowed_client_headers`;
//! - **no answer** (dispatch refused, timeout, connection failure): with
//!   `failure_mode_allow` the request goes on with `x-ambit-ext-authz-failure-mode-allowed:
//!   true`; otherwise the client gets `status_on_error` (default 403) and a JSON error.

use std::rc::Rc;
use std::time::Duration;

use ambit_sdk::prelude::*;
use ambit_sdk::proxy_wasm;
use serde::Deserialize;

/// Set on requests let through because the authorization service could not answer.
pub const FAILURE_MODE_HEADER: &str = "x-ambit-ext-authz-failure-mode-allowed";

/// The plugin configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub upstream: String,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub path_prefix: String,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_request_headers")]
    pub allowed_request_headers: Vec<String>,
    #[serde(default)]
    pub allowed_upstream_headers: Vec<String>,
    #[serde(default)]
    pub allowed_client_headers: Vec<String>,
    #[serde(default)]
    pub failure_mode_allow: bool,
    #[serde(default = "default_error_status")]
    pub status_on_error: u32,
}

fn default_timeout() -> u64 {
    200
}
fn default_request_headers() -> Vec<String> {
    vec!["authorization".into()]
}
fn default_error_status() -> u32 {
    403
}

impl PluginConfig for Config {
    fn validate(&mut self) -> Result<(), String> {
        if self.upstream.trim().is_empty() {
            return Err("upstream must name the authorization service".into());
        }
        if self.timeout_ms == 0 {
            return Err("timeout_ms must be positive".into());
        }
        if !(200..=599).contains(&self.status_on_error) {
            return Err(format!(
                "status_on_error {} is not an HTTP status",
                self.status_on_error
            ));
        }
        if !self.path_prefix.is_empty() && !self.path_prefix.starts_with('/') {
            return Err("path_prefix must start with /".into());
        }
        for (field, list) in [
            ("allowed_request_headers", &mut self.allowed_request_headers),
            (
                "allowed_upstream_headers",
                &mut self.allowed_upstream_headers,
            ),
            ("allowed_client_headers", &mut self.allowed_client_headers),
        ] {
            for name in list.iter_mut() {
                *name = name.to_ascii_lowercase();
                if !ambit_sdk::headers::is_valid_name(name, false) {
                    return Err(format!("{field}: {name:?} is not a header name"));
                }
            }
        }
        Ok(())
    }
}

/// The check request for a client request.
pub fn check_request(config: &Config, request: &Headers) -> CalloutRequest {
    let method = request.get(":method").unwrap_or("GET");
    let path = request.get(":path").unwrap_or("/");
    let mut check = CalloutRequest::new(
        &config.upstream,
        method,
        &format!("{}{path}", config.path_prefix),
    )
    .timeout(Duration::from_millis(config.timeout_ms));
    if let Some(authority) = &config.authority {
        check = check.authority(authority);
    }
    if let Some(host) = request.get(":authority") {
        check = check.header("x-forwarded-host", host);
    }
    for name in &config.allowed_request_headers {
        for value in request.get_all(name) {
            check = check.header(name, value);
        }
    }
    check
}

/// The verdict for an answer (`None`: the service did not answer).
pub fn decide(config: &Config, answer: Option<&CalloutResponse>) -> Verdict {
    let Some(answer) = answer else {
        return if config.failure_mode_allow {
            Verdict::Allow {
                set_headers: vec![(FAILURE_MODE_HEADER.into(), "true".into())],
            }
        } else {
            Verdict::Deny(LocalResponse::json_error(
                config.status_on_error,
                "authz_unavailable",
                "the authorization service did not answer",
            ))
        };
    };
    if answer.is_success() {
        let set_headers = config
            .allowed_upstream_headers
            .iter()
            .filter_map(|name| {
                answer
                    .headers
                    .get(name)
                    .map(|v| (name.clone(), v.to_string()))
            })
            .collect();
        return Verdict::Allow { set_headers };
    }
    let mut response = LocalResponse::new(answer.status.unwrap_or(config.status_on_error))
        .body(answer.body.clone());
    if let Some(ct) = answer.headers.get("content-type") {
        response = response.header("content-type", ct);
    }
    for name in &config.allowed_client_headers {
        for value in answer.headers.get_all(name) {
            response = response.header(name, value);
        }
    }
    Verdict::Deny(response)
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(AuthzRoot { config: None }));
}}

struct AuthzRoot {
    config: Option<Rc<Config>>,
}

impl Context for AuthzRoot {}

impl RootContext for AuthzRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.config = Config::load("ext-authz").map(Rc::new);
        self.config.is_some()
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AuthzStream {
            config: self.config.clone(),
            pending: PendingCallouts::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct AuthzStream {
    config: Option<Rc<Config>>,
    /// One check per request; the map also drops answers to tokens this stream never sent.
    pending: PendingCallouts<()>,
}

impl Context for AuthzStream {
    fn on_http_call_response(
        &mut self,
        token: u32,
        n_headers: usize,
        body_size: usize,
        n_trailers: usize,
    ) {
        let Some(config) = self.config.clone() else {
            return;
        };
        if self.pending.take(token).is_none() {
            return;
        }
        let answer = CalloutResponse::read(n_headers, body_size, n_trailers);
        if answer.is_none() {
            ambit_sdk::log::warn!("ext-authz: no answer from {}", config.upstream);
        }
        decide(&config, answer.as_ref()).apply(Direction::Request);
    }
}

impl HttpContext for AuthzStream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let Some(config) = self.config.clone() else {
            return Action::Continue;
        };
        let check = check_request(&config, &self.headers(Direction::Request));
        match self.pending.dispatch(&check, ()) {
            Ok(_) => Action::Pause,
            Err(status) => {
                ambit_sdk::log::warn!("ext-authz: cannot call {}: {status:?}", config.upstream);
                // Not paused yet: apply the failure verdict here instead of resuming.
                match decide(&config, None) {
                    Verdict::Allow { set_headers } => {
                        for (name, value) in &set_headers {
                            self.set_header(Direction::Request, name, value);
                        }
                        Action::Continue
                    }
                    Verdict::Deny(response) => {
                        response.send();
                        Action::Pause
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::parse(Some(
            format!(
                r#"{{"upstream": "authz.default.svc.cluster.local:8000", "path_prefix": "/check",
                    "allowed_request_headers": ["Authorization", "cookie"],
                    "allowed_upstream_headers": ["x-user-id"],
                    "allowed_client_headers": ["www-authenticate"]{extra}}}"#
            )
            .as_bytes(),
        ))
        .unwrap()
    }

    fn answer(pairs: &[(&str, &str)], body: &str) -> CalloutResponse {
        CalloutResponse::from_parts(
            pairs.iter().copied().collect(),
            body.as_bytes().to_vec(),
            Headers::new(),
        )
    }

    #[test]
    fn check_request_carries_method_path_and_allowed_headers() {
        let c = config("");
        let req: Headers = [
            (":method", "POST"),
            (":path", "/orders?id=1"),
            (":authority", "orders.default.svc.cluster.local"),
            ("authorization", "Bearer t"),
            ("cookie", "a=1"),
            ("cookie", "b=2"),
            ("x-secret", "no"),
        ]
        .into_iter()
        .collect();
        let check = check_request(&c, &req);
        assert_eq!(check.upstream, "authz.default.svc.cluster.local:8000");
        assert_eq!(check.timeout, Duration::from_millis(200));
        assert_eq!(
            check.host_headers(),
            vec![
                (":method", "POST"),
                (":path", "/check/orders?id=1"),
                (":authority", "authz.default.svc.cluster.local:8000"),
                ("x-forwarded-host", "orders.default.svc.cluster.local"),
                ("authorization", "Bearer t"),
                ("cookie", "a=1"),
                ("cookie", "b=2"),
            ]
        );
    }

    #[test]
    fn success_copies_allowed_upstream_headers() {
        let c = config("");
        let v = decide(
            &c,
            Some(&answer(
                &[
                    (":status", "200"),
                    ("x-user-id", "alice"),
                    ("x-other", "no"),
                ],
                "",
            )),
        );
        assert_eq!(
            v,
            Verdict::Allow {
                set_headers: vec![("x-user-id".into(), "alice".into())]
            }
        );
    }

    #[test]
    fn denial_passes_status_body_and_client_headers() {
        let c = config("");
        let v = decide(
            &c,
            Some(&answer(
                &[
                    (":status", "401"),
                    ("www-authenticate", "Bearer"),
                    ("content-type", "text/plain"),
                    ("x-user-id", "no"),
                ],
                "go away",
            )),
        );
        let Verdict::Deny(r) = v else {
            panic!("expected a denial")
        };
        assert_eq!(r.status, 401);
        assert_eq!(r.body, b"go away");
        assert_eq!(r.get_header("www-authenticate"), Some("Bearer"));
        assert_eq!(r.get_header("content-type"), Some("text/plain"));
        assert_eq!(r.get_header("x-user-id"), None);
        // A 5xx from the service is a denial with that status, not a failure.
        let Verdict::Deny(r) = decide(&c, Some(&answer(&[(":status", "503")], ""))) else {
            panic!()
        };
        assert_eq!(r.status, 503);
        // No parsable status: status_on_error.
        let Verdict::Deny(r) = decide(&c, Some(&answer(&[], ""))) else {
            panic!()
        };
        assert_eq!(r.status, 403);
    }

    #[test]
    fn failure_mode() {
        let Verdict::Deny(r) = decide(&config(r#", "status_on_error": 503"#), None) else {
            panic!("fail closed by default")
        };
        assert_eq!(r.status, 503);
        assert_eq!(r.get_header("content-type"), Some("application/json"));
        assert_eq!(
            decide(&config(r#", "failure_mode_allow": true"#), None),
            Verdict::Allow {
                set_headers: vec![(FAILURE_MODE_HEADER.into(), "true".into())]
            }
        );
    }

    #[test]
    fn config_errors() {
        for bad in [
            r#"{}"#,
            r#"{"upstream": " "}"#,
            r#"{"upstream": "a", "timeout_ms": 0}"#,
            r#"{"upstream": "a", "status_on_error": 99}"#,
            r#"{"upstream": "a", "path_prefix": "check"}"#,
            r#"{"upstream": "a", "allowed_client_headers": ["bad name"]}"#,
        ] {
            assert!(Config::parse(Some(bad.as_bytes())).is_err(), "{bad}");
        }
        let c = Config::parse(Some(br#"{"upstream": "a"}"#)).unwrap();
        assert_eq!(c.allowed_request_headers, vec!["authorization"]);
        assert!(!c.failure_mode_allow);
    }
}
