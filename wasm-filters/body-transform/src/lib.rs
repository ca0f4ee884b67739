//! `body-transform`: redact JSON fields in request and/or response bodies.
//!
//! Configuration:
//!
//! ```json
//! {
//!   "request":  {"redact": ["password", "card.number"]},
//!   "response": {"redact": ["ssn", "items.cost"]},
//!   "mode": "replace",
//!   "replacement": "[REDACTED]",
//!   "max_body_bytes": 1048576,
//!   "content_types": ["application/json"]
//! }
//! ```
//!
//! For a side with paths and a JSON `content-type` (media type in `content_types`, parameters
//! ignored), the filter removes `content-length` in the headers callback (the length changes),
//! then returns `Pause` from every body callback until `end_of_stream`, so the host buffers the
//! whole body; at the end it parses the JSON, redacts the paths (see [`redact`]) and replaces
//! the body. A body that is not JSON, or where nothing matched, passes unchanged. A body larger
//! than `max_body_bytes` (by `content-length` up front, or by the buffered size) is refused:
//! `413` for a request, `500` for a response (the client cannot fix an upstream's size).

pub mod redact;

use std::rc::Rc;

use ambit_sdk::prelude::*;
use ambit_sdk::proxy_wasm;
use serde::Deserialize;

use crate::redact::Mode;

/// The paths of one side.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Side {
    pub redact: Vec<String>,
}

/// The plugin configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub request: Side,
    pub response: Side,
    pub mode: Mode,
    pub replacement: String,
    pub max_body_bytes: usize,
    pub content_types: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            request: Side::default(),
            response: Side::default(),
            mode: Mode::Replace,
            replacement: "[REDACTED]".into(),
            max_body_bytes: 1024 * 1024,
            content_types: vec!["application/json".into()],
        }
    }
}

impl PluginConfig for Config {
    fn validate(&mut self) -> Result<(), String> {
        if self.max_body_bytes == 0 {
            return Err("max_body_bytes must be positive".into());
        }
        for path in self.request.redact.iter().chain(&self.response.redact) {
            if path.split('.').any(str::is_empty) {
                return Err(format!("redact path {path:?} has an empty segment"));
            }
        }
        self.content_types
            .iter_mut()
            .for_each(|c| *c = c.trim().to_ascii_lowercase());
        Ok(())
    }
}

impl Config {
    fn side(&self, dir: Direction) -> &Side {
        match dir {
            Direction::Request => &self.request,
            Direction::Response => &self.response,
        }
    }

    /// Does a body with this `content-type` get transformed on `dir`?
    pub fn applies(&self, dir: Direction, content_type: Option<&str>) -> bool {
        if self.side(dir).redact.is_empty() {
            return false;
        }
        let Some(ct) = content_type else {
            return false;
        };
        let media = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        self.content_types.contains(&media)
    }

    /// The answer when a body is too large.
    pub fn too_large(&self, dir: Direction) -> LocalResponse {
        match dir {
            Direction::Request => LocalResponse::json_error(
                413,
                "payload_too_large",
                &format!("request body exceeds {} bytes", self.max_body_bytes),
            ),
            Direction::Response => LocalResponse::json_error(
                500,
                "response_too_large",
                "the response body is too large to process",
            ),
        }
    }

    /// The new body, or `None` to keep it.
    pub fn transform(&self, dir: Direction, body: &[u8]) -> Option<Vec<u8>> {
        redact::redact_body(body, &self.side(dir).redact, self.mode, &self.replacement)
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(BodyRoot { config: None }));
}}

struct BodyRoot {
    config: Option<Rc<Config>>,
}

impl Context for BodyRoot {}

impl RootContext for BodyRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.config = Config::load("body-transform").map(Rc::new);
        self.config.is_some()
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(BodyStream {
            config: self.config.clone(),
            request: false,
            response: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct BodyStream {
    config: Option<Rc<Config>>,
    /// Transforming the request / response body.
    request: bool,
    response: bool,
}

impl Context for BodyStream {}

impl BodyStream {
    /// Headers callback: decide, check the announced size, drop `content-length`.
    fn on_headers(&mut self, dir: Direction, end_of_stream: bool) -> Action {
        let Some(config) = self.config.clone() else {
            return Action::Continue;
        };
        let ct = self.header(dir, "content-type");
        if end_of_stream || !config.applies(dir, ct.as_deref()) {
            return Action::Continue;
        }
        let announced = self
            .header(dir, "content-length")
            .and_then(|l| l.trim().parse::<usize>().ok());
        if announced.is_some_and(|len| len > config.max_body_bytes) {
            config.too_large(dir).send();
            return Action::Pause;
        }
        self.remove_headers(dir, &["content-length"]);
        match dir {
            Direction::Request => self.request = true,
            Direction::Response => self.response = true,
        }
        Action::Continue
    }

    /// Body callback: buffer until the end, then rewrite.
    fn on_body(&mut self, dir: Direction, body_size: usize, end_of_stream: bool) -> Action {
        let active = match dir {
            Direction::Request => self.request,
            Direction::Response => self.response,
        };
        let Some(config) = self.config.clone().filter(|_| active) else {
            return Action::Continue;
        };
        if body_size > config.max_body_bytes {
            match dir {
                Direction::Request => self.request = false,
                Direction::Response => self.response = false,
            }
            config.too_large(dir).send();
            return Action::Pause;
        }
        if !end_of_stream {
            // The host keeps buffering; the next call's body_size is the total so far.
            return Action::Pause;
        }
        let body = match dir {
            Direction::Request => self.get_http_request_body(0, body_size),
            Direction::Response => self.get_http_response_body(0, body_size),
        }
        .unwrap_or_default();
        if let Some(new_body) = config.transform(dir, &body) {
            match dir {
                Direction::Request => self.set_http_request_body(0, body_size, &new_body),
                Direction::Response => self.set_http_response_body(0, body_size, &new_body),
            }
        }
        Action::Continue
    }
}

impl HttpContext for BodyStream {
    fn on_http_request_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        self.on_headers(Direction::Request, end_of_stream)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.on_body(Direction::Request, body_size, end_of_stream)
    }

    fn on_http_response_headers(&mut self, _n: usize, end_of_stream: bool) -> Action {
        self.on_headers(Direction::Response, end_of_stream)
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        self.on_body(Direction::Response, body_size, end_of_stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(Some(
            br#"{"request": {"redact": ["password"]}, "max_body_bytes": 64,
                 "content_types": ["Application/JSON", "application/vnd.api+json"]}"#,
        ))
        .unwrap()
    }

    #[test]
    fn applies_by_side_and_content_type() {
        let c = config();
        assert!(c.applies(Direction::Request, Some("application/json; charset=utf-8")));
        assert!(c.applies(Direction::Request, Some("application/vnd.api+json")));
        assert!(!c.applies(Direction::Request, Some("text/plain")));
        assert!(!c.applies(Direction::Request, None));
        // No response paths configured.
        assert!(!c.applies(Direction::Response, Some("application/json")));
    }

    #[test]
    fn transform_and_limits() {
        let c = config();
        let out = c
            .transform(Direction::Request, br#"{"user":"a","password":"p"}"#)
            .unwrap();
        assert_eq!(out, br#"{"password":"[REDACTED]","user":"a"}"#);
        assert_eq!(c.transform(Direction::Request, b"{}"), None);
        assert_eq!(c.too_large(Direction::Request).status, 413);
        assert_eq!(c.too_large(Direction::Response).status, 500);
    }

    #[test]
    fn config_errors() {
        for bad in [
            r#"{"max_body_bytes": 0}"#,
            r#"{"request": {"redact": ["a..b"]}}"#,
            r#"{"mode": "shred"}"#,
        ] {
            assert!(Config::parse(Some(bad.as_bytes())).is_err(), "{bad}");
        }
        let d = Config::parse(None).unwrap();
        assert_eq!(d, Config::default());
    }
}
