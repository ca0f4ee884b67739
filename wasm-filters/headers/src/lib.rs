//! `headers`: add, remove, rename and set request and response headers from configuration.
//!
//! Configuration (every part optional):
//!
//! ```json
//! {
//!   "request":  {"remove": ["x-debug"], "rename": {"x-old": "x-new"},
//!                "set": {":path": "/v2/api", "x-env": "prod"}, "add": {"x-via": "ambit"}},
//!   "response": {"remove": ["server"], "set": {"x-frame-options": "DENY"}}
//! }
//! ```
//!
//! Each side is an [`ambit_sdk::headers::HeaderMutations`], applied in the order remove →
//! rename → set → add when that side's headers arrive. Setting `:path` rewrites the path.

use std::rc::Rc;

use ambit_sdk::prelude::*;
use ambit_sdk::proxy_wasm;
use serde::Deserialize;

/// The plugin configuration.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub request: HeaderMutations,
    pub response: HeaderMutations,
}

impl PluginConfig for Config {
    fn validate(&mut self) -> Result<(), String> {
        self.request
            .normalize()
            .map_err(|e| format!("request.{e}"))?;
        self.response
            .normalize()
            .map_err(|e| format!("response.{e}"))
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(HeadersRoot { config: Rc::default() }));
}}

struct HeadersRoot {
    config: Rc<Config>,
}

impl Context for HeadersRoot {}

impl RootContext for HeadersRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        match Config::load("headers") {
            Some(config) => {
                self.config = Rc::new(config);
                true
            }
            None => false,
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(HeadersStream {
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct HeadersStream {
    config: Rc<Config>,
}

impl Context for HeadersStream {}

impl HttpContext for HeadersStream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if !self.config.request.is_empty() {
            self.apply_mutations(Direction::Request, &self.config.request);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if !self.config.response.is_empty() {
            self.apply_mutations(Direction::Response, &self.config.response);
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_applies_to_both_sides() {
        let config = Config::parse(Some(
            br#"{"request": {"set": {":path": "/v2", "X-Env": "prod"}, "remove": ["X-Debug"]},
                 "response": {"add": [{"name": "via", "value": "ambit"}]}}"#,
        ))
        .unwrap();
        let mut req: Headers = [(":path", "/v1"), ("x-debug", "1"), ("accept", "*/*")]
            .into_iter()
            .collect();
        config.request.apply(&mut req);
        assert_eq!(req.get(":path"), Some("/v2"));
        assert_eq!(req.get("x-env"), Some("prod"));
        assert!(!req.contains("x-debug"));
        let mut resp: Headers = [(":status", "200"), ("via", "envoy")].into_iter().collect();
        config.response.apply(&mut resp);
        assert_eq!(resp.get_all("via"), vec!["envoy", "ambit"]);
    }

    #[test]
    fn bad_config_names_the_side() {
        let err = Config::parse(Some(br#"{"response": {"remove": [":status"]}}"#)).unwrap_err();
        assert!(err.to_string().contains("response.remove"), "{err}");
        assert_eq!(Config::parse(None).unwrap(), Config::default());
    }
}
