//! `rate-limit`: a local token bucket per key, shared by every worker of the proxy.
//!
//! Configuration:
//!
//! ```json
//! {
//!   "key": {"header": "x-api-key"},
//!   "max_tokens": 20, "tokens_per_fill": 10, "fill_interval_ms": 1000,
//!   "missing_key": "shared",
//!   "domain": "orders"
//! }
//! ```
//!
//! `key` is `{"header": name}` or `{"property": [path...]}`; the default is the client's
//! SPIFFE identity, the property `["connection", "uri_san_peer_certificate"]` (in the mesh,
//! the peer certificate's URI SAN). Each key's bucket lives in shared data under
//! `ambit.rate-limit/<domain>/<key>` and is updated with compare-and-swap, retried on
//! `CasMismatch`, so every worker thread draws from the same bucket. A request without a key
//! uses one bucket for all such requests (`"missing_key": "shared"`, the default), or is let
//! through (`"allow"`) or refused (`"deny"`). A limited request gets `429` with
//! `retry-after` (seconds until the next fill) and a JSON error. If the bucket stays
//! contended through every retry, the request is allowed and a warning logged (failing open:
//! the limiter must not become an outage).
//!
//! Shared data has no expiry: every distinct key keeps 16 bytes for the life of the proxy.
//! Key by something bounded (identities, API keys), not by free-form client input.

pub mod bucket;

use std::rc::Rc;
use std::time::UNIX_EPOCH;

use ambit_sdk::prelude::*;
use ambit_sdk::proxy_wasm;
use ambit_sdk::shared::{self, HostShared};
use serde::Deserialize;

use crate::bucket::{Decision, Limits};

/// Attempts at a compare-and-swap update before failing open.
pub const CAS_ATTEMPTS: u32 = 16;
/// Keys longer than this are cut (shared-data keys stay small).
pub const MAX_KEY_LEN: usize = 256;

/// Where the bucket key comes from.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KeySource {
    Header(String),
    Property(Vec<String>),
}

impl Default for KeySource {
    fn default() -> Self {
        KeySource::Property(vec!["connection".into(), "uri_san_peer_certificate".into()])
    }
}

/// What to do with a request that has no key.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    #[default]
    Shared,
    Allow,
    Deny,
}

/// The plugin configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub key: KeySource,
    pub max_tokens: u64,
    pub tokens_per_fill: u64,
    pub fill_interval_ms: u64,
    #[serde(default)]
    pub missing_key: MissingKey,
    #[serde(default = "default_domain")]
    pub domain: String,
}

fn default_domain() -> String {
    "default".into()
}

impl PluginConfig for Config {
    fn validate(&mut self) -> Result<(), String> {
        if self.max_tokens == 0 || self.tokens_per_fill == 0 || self.fill_interval_ms == 0 {
            return Err("max_tokens, tokens_per_fill and fill_interval_ms must be positive".into());
        }
        if let KeySource::Header(name) = &mut self.key {
            *name = name.to_ascii_lowercase();
            if !ambit_sdk::headers::is_valid_name(name, false) {
                return Err(format!("key.header {name:?} is not a header name"));
            }
        }
        if let KeySource::Property(path) = &self.key {
            if path.is_empty() {
                return Err("key.property must have at least one segment".into());
            }
        }
        Ok(())
    }
}

impl Config {
    pub fn limits(&self) -> Limits {
        Limits {
            max_tokens: self.max_tokens,
            tokens_per_fill: self.tokens_per_fill,
            fill_interval_ns: self.fill_interval_ms.saturating_mul(1_000_000),
        }
    }

    /// Which bucket a request with this key (or none) draws from.
    pub fn bucket_key(&self, key: Option<&str>) -> BucketKey {
        let key = match key.filter(|k| !k.is_empty()) {
            Some(k) => truncate(k, MAX_KEY_LEN),
            None => match self.missing_key {
                MissingKey::Shared => "",
                MissingKey::Allow => return BucketKey::Skip,
                MissingKey::Deny => return BucketKey::Refuse,
            },
        };
        // The empty key (after the last '/') is the shared bucket of key-less requests.
        BucketKey::Bucket(format!("ambit.rate-limit/{}/{key}", self.domain))
    }
}

/// The bucket of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BucketKey {
    /// Draw from the bucket under this shared-data key.
    Bucket(String),
    /// No key and `missing_key: allow`: no limit.
    Skip,
    /// No key and `missing_key: deny`.
    Refuse,
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The 429.
pub fn limited_response(retry_after_secs: u64) -> LocalResponse {
    LocalResponse::json_error(429, "rate_limited", "too many requests")
        .header("retry-after", &retry_after_secs.to_string())
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(LimitRoot { config: None }));
}}

struct LimitRoot {
    config: Option<Rc<Config>>,
}

impl Context for LimitRoot {}

impl RootContext for LimitRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.config = Config::load("rate-limit").map(Rc::new);
        self.config.is_some()
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(LimitStream {
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct LimitStream {
    config: Option<Rc<Config>>,
}

impl Context for LimitStream {}

impl LimitStream {
    fn key(&self, config: &Config) -> Option<String> {
        match &config.key {
            KeySource::Header(name) => self.header(Direction::Request, name),
            KeySource::Property(path) => {
                let path: Vec<&str> = path.iter().map(String::as_str).collect();
                ambit_sdk::properties::get_string(&path)
            }
        }
    }
}

impl HttpContext for LimitStream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        let Some(config) = self.config.clone() else {
            return Action::Continue;
        };
        let key = self.key(&config);
        let bucket_key = match config.bucket_key(key.as_deref()) {
            BucketKey::Bucket(k) => k,
            BucketKey::Skip => return Action::Continue,
            BucketKey::Refuse => {
                LocalResponse::json_error(
                    429,
                    "rate_limited",
                    "requests without a rate-limit key are refused",
                )
                .send();
                return Action::Pause;
            }
        };
        let now_ns = self
            .get_current_time()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let limits = config.limits();
        match shared::update(&HostShared, &bucket_key, CAS_ATTEMPTS, |current| {
            bucket::take(&limits, current, now_ns)
        }) {
            Ok(Decision::Allowed { .. }) => Action::Continue,
            Ok(Decision::Limited { retry_after_secs }) => {
                limited_response(retry_after_secs).send();
                Action::Pause
            }
            Err(e) => {
                ambit_sdk::log::warn!("rate-limit: letting the request through: {e}");
                Action::Continue
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_keys() {
        let c = Config::parse(Some(
            br#"{"max_tokens": 2, "tokens_per_fill": 1, "fill_interval_ms": 500}"#,
        ))
        .unwrap();
        assert_eq!(c.key, KeySource::default());
        assert_eq!(c.limits().fill_interval_ns, 500_000_000);
        assert_eq!(
            c.bucket_key(Some("spiffe://cluster.local/ns/a/sa/b")),
            BucketKey::Bucket("ambit.rate-limit/default/spiffe://cluster.local/ns/a/sa/b".into())
        );
        assert_eq!(
            c.bucket_key(None),
            BucketKey::Bucket("ambit.rate-limit/default/".into())
        );
        let long = "é".repeat(200);
        let BucketKey::Bucket(k) = c.bucket_key(Some(&long)) else {
            panic!("no bucket")
        };
        assert!(k.len() <= "ambit.rate-limit/default/".len() + MAX_KEY_LEN);
    }

    #[test]
    fn missing_key_policies() {
        let parse = |extra: &str| {
            Config::parse(Some(
                format!(r#"{{"max_tokens": 1, "tokens_per_fill": 1, "fill_interval_ms": 1, "key": {{"header": "X-Api-Key"}}{extra}}}"#)
                    .as_bytes(),
            ))
            .unwrap()
        };
        let allow = parse(r#", "missing_key": "allow""#);
        assert_eq!(allow.key, KeySource::Header("x-api-key".into()));
        assert_eq!(allow.bucket_key(Some("")), BucketKey::Skip);
        assert_eq!(
            parse(r#", "missing_key": "deny""#).bucket_key(None),
            BucketKey::Refuse
        );
    }

    #[test]
    fn config_errors() {
        for bad in [
            r#"{"max_tokens": 0, "tokens_per_fill": 1, "fill_interval_ms": 1}"#,
            r#"{"max_tokens": 1, "tokens_per_fill": 1}"#,
            r#"{"max_tokens": 1, "tokens_per_fill": 1, "fill_interval_ms": 1, "key": {"header": "a b"}}"#,
            r#"{"max_tokens": 1, "tokens_per_fill": 1, "fill_interval_ms": 1, "key": {"property": []}}"#,
            r#"{"max_tokens": 1, "tokens_per_fill": 1, "fill_interval_ms": 1, "key": {"cookie": "a"}}"#,
        ] {
            assert!(Config::parse(Some(bad.as_bytes())).is_err(), "{bad}");
        }
    }

    #[test]
    fn limited_response_has_retry_after() {
        let r = limited_response(3);
        assert_eq!(r.status, 429);
        assert_eq!(r.get_header("retry-after"), Some("3"));
    }
}
