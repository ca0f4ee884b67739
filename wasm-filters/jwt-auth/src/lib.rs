//! `jwt-auth`: verify a bearer JWT (RS256, ES256) against a configured JWKS.
//!
//! Configuration:
//!
//! ```json
//! {
//!   "issuers": ["https://issuer.example"],
//!   "audiences": ["orders"],
//!   "jwks": {"keys": [{"kty": "RSA", "kid": "k1", "n": "...", "e": "AQAB"}]},
//!   "claim_to_headers": [{"claim": "sub", "header": "x-jwt-sub"}],
//!   "clock_skew_seconds": 60,
//!   "from_header": "authorization",
//!   "forward": true,
//!   "allow_missing": false,
//!   "require_exp": false,
//!   "realm": "ambit"
//! }
//! ```
//!
//! `jwks` is the key set as a JSON object or as a string holding one (Istio's
//! `RequestAuthentication.jwtRules[].jwks` is a string). A request without a token, or with a
//! token that fails any check, gets `401` with `www-authenticate: Bearer realm="..."` (plus
//! `error="invalid_token"` and a description when a token was presented, RFC 6750 §3) and a
//! JSON error body; `allow_missing` lets token-less requests through (a bad token is still
//! refused). For good tokens each configured claim is copied into its header (strings as is,
//! numbers and booleans as text, string lists joined with `,`, other values as JSON; dotted
//! claim names reach into objects). The configured claim headers are always removed from the
//! incoming request first, so a client cannot forge them. `forward: false` strips the token
//! before the request goes upstream.

pub mod jwks;
pub mod jwt;

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use ambit_sdk::prelude::*;
use ambit_sdk::proxy_wasm;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::jwks::Key;
use crate::jwt::{JwtError, Rules};

/// `jwks` as an object or as a string containing the JSON.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum JwksSource {
    Text(String),
    Object(Value),
}

/// One claim copied to one request header.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    pub claim: String,
    pub header: String,
}

/// The plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub issuers: Vec<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
    #[serde(default)]
    pub claim_to_headers: Vec<ClaimToHeader>,
    #[serde(default = "default_skew")]
    pub clock_skew_seconds: u64,
    #[serde(default = "default_header")]
    pub from_header: String,
    #[serde(default = "default_true")]
    pub forward: bool,
    #[serde(default)]
    pub allow_missing: bool,
    #[serde(default)]
    pub require_exp: bool,
    #[serde(default = "default_realm")]
    pub realm: String,
    /// The keys parsed from `jwks` by `validate`.
    #[serde(skip)]
    pub keys: Vec<Key>,
}

fn default_skew() -> u64 {
    60
}
fn default_header() -> String {
    "authorization".into()
}
fn default_true() -> bool {
    true
}
fn default_realm() -> String {
    "ambit".into()
}

impl PluginConfig for Config {
    fn validate(&mut self) -> Result<(), String> {
        let text = match &self.jwks {
            JwksSource::Text(t) => t.clone(),
            JwksSource::Object(v) => v.to_string(),
        };
        self.keys = jwks::parse_jwks(&text).map_err(|e| e.to_string())?;
        self.from_header = self.from_header.to_ascii_lowercase();
        if !ambit_sdk::headers::is_valid_name(&self.from_header, false) {
            return Err(format!(
                "from_header {:?} is not a header name",
                self.from_header
            ));
        }
        for c in &mut self.claim_to_headers {
            c.header = c.header.to_ascii_lowercase();
            if c.claim.is_empty() || !ambit_sdk::headers::is_valid_name(&c.header, false) {
                return Err(format!(
                    "claim_to_headers: {:?} → {:?} needs a claim and a header name",
                    c.claim, c.header
                ));
            }
        }
        if self.realm.contains(['"', '\\']) || !ambit_sdk::headers::is_valid_value(&self.realm) {
            return Err("realm must not contain quotes, backslashes or line breaks".into());
        }
        Ok(())
    }
}

impl Config {
    fn rules(&self) -> Rules {
        Rules {
            issuers: self.issuers.clone(),
            audiences: self.audiences.clone(),
            clock_skew_secs: self.clock_skew_seconds,
            require_exp: self.require_exp,
        }
    }
}

/// The outcome for one request.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// Good token: these headers go on the request.
    Authenticated(Vec<(String, String)>),
    /// No token and `allow_missing`.
    Anonymous,
    /// Refused: the 401 to send.
    Rejected(LocalResponse),
}

/// Decides a request from its token header value at `now` (seconds since the epoch).
pub fn authenticate(config: &Config, rules: &Rules, header: Option<&str>, now: u64) -> Outcome {
    let token = match header.map(str::trim) {
        None | Some("") => {
            return if config.allow_missing {
                Outcome::Anonymous
            } else {
                Outcome::Rejected(unauthorized(config, None))
            }
        }
        Some(value) => match bearer_token(value) {
            Some(t) => t,
            None => return Outcome::Rejected(unauthorized(config, Some(&JwtError::NotBearer))),
        },
    };
    match jwt::verify(token, &config.keys, rules, now) {
        Ok(claims) => Outcome::Authenticated(claim_headers(config, &claims)),
        Err(e) => Outcome::Rejected(unauthorized(config, Some(&e))),
    }
}

/// The token after a case-insensitive `Bearer ` scheme.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The 401: RFC 6750 says to leave out `error` when the request carried no credentials.
pub fn unauthorized(config: &Config, error: Option<&JwtError>) -> LocalResponse {
    let (challenge, message) = match error {
        None => (
            format!("Bearer realm=\"{}\"", config.realm),
            "a bearer token is required".to_string(),
        ),
        Some(e) => (
            format!(
                "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{e}\"",
                config.realm
            ),
            e.to_string(),
        ),
    };
    LocalResponse::json_error(401, "unauthorized", &message).header("www-authenticate", &challenge)
}

/// The configured claim → header pairs present in `claims`.
pub fn claim_headers(config: &Config, claims: &Map<String, Value>) -> Vec<(String, String)> {
    config
        .claim_to_headers
        .iter()
        .filter_map(|c| {
            let value = lookup(claims, &c.claim)?;
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                Value::Array(items) if items.iter().all(Value::is_string) => items
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
                Value::Null => return None,
                other => other.to_string(),
            };
            // A claim must not be able to split the header it lands in.
            ambit_sdk::headers::is_valid_value(&text).then(|| (c.header.clone(), text))
        })
        .collect()
}

/// A claim by name, or by a dotted path into nested objects when no claim has the full name.
fn lookup<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(name) {
        return Some(v);
    }
    let mut parts = name.split('.');
    let mut current = claims.get(parts.next()?)?;
    for part in parts {
        current = current.as_object()?.get(part)?;
    }
    Some(current)
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(JwtRoot { state: None }));
}}

struct Shared {
    config: Config,
    rules: Rules,
}

struct JwtRoot {
    state: Option<Rc<Shared>>,
}

impl Context for JwtRoot {}

impl RootContext for JwtRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        match Config::load("jwt-auth") {
            Some(config) => {
                let rules = config.rules();
                self.state = Some(Rc::new(Shared { config, rules }));
                true
            }
            None => false,
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        // on_configure refused → no state: the host does not run streams on a refused plugin,
        // but be safe and create a context that denies.
        Some(Box::new(JwtStream {
            state: self.state.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct JwtStream {
    state: Option<Rc<Shared>>,
}

impl Context for JwtStream {}

impl HttpContext for JwtStream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let Some(state) = self.state.clone() else {
            LocalResponse::json_error(500, "misconfigured", "jwt-auth has no configuration").send();
            return Action::Pause;
        };
        let config = &state.config;
        let forged: Vec<&str> = config
            .claim_to_headers
            .iter()
            .map(|c| c.header.as_str())
            .collect();
        self.remove_headers(Direction::Request, &forged);

        let now = self
            .get_current_time()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let header = self.header(Direction::Request, &config.from_header);
        match authenticate(config, &state.rules, header.as_deref(), now) {
            Outcome::Authenticated(headers) => {
                for (name, value) in &headers {
                    self.set_header(Direction::Request, name, value);
                }
                if !config.forward {
                    self.remove_headers(Direction::Request, &[config.from_header.as_str()]);
                }
                Action::Continue
            }
            Outcome::Anonymous => Action::Continue,
            Outcome::Rejected(response) => {
                ambit_sdk::log::debug!(
                    "jwt-auth: rejected: {:?}",
                    response.get_header("www-authenticate")
                );
                response.send();
                Action::Pause
            }
        }
    }
}

#[cfg(test)]
mod tests;
