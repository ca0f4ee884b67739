//! Plugin configuration: JSON into a serde struct.
//!
//! Istio's `WasmPlugin.pluginConfig` (a protobuf `Struct`) and Envoy's `configuration`
//! (`StringValue` with JSON) both reach the filter as JSON bytes in the plugin configuration
//! buffer. [`PluginConfig::load`] reads that buffer in `on_configure`, parses it, runs the
//! struct's own [`PluginConfig::validate`], and on any error writes one clear line to the host
//! log and returns `None`, so `on_configure` can return `false` and the host keeps (or refuses)
//! the plugin instead of running it half-configured.
//!
//! An absent or blank configuration is parsed as `{}`: a struct whose fields all have
//! `#[serde(default)]` works without one, and a struct with required fields says which one is
//! missing.

use proxy_wasm::types::{BufferType, LogLevel};
use serde::de::DeserializeOwned;

/// Why a plugin configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The bytes are not UTF-8 JSON at all.
    #[error("plugin configuration is not UTF-8 text")]
    NotUtf8,
    /// The configuration was empty but the filter needs fields.
    #[error("plugin configuration is empty, but this filter needs one: {0}")]
    Missing(String),
    /// JSON syntax error, or JSON that does not fit the struct (unknown field, wrong type, ...).
    #[error("plugin configuration is invalid at line {line}, column {column}: {message}")]
    Invalid {
        line: usize,
        column: usize,
        message: String,
    },
    /// Well-formed, but the filter's own checks refused it.
    #[error("plugin configuration is refused: {0}")]
    Refused(String),
    /// The host would not hand over the configuration buffer.
    #[error("cannot read the plugin configuration from the host: status {0:?}")]
    Host(proxy_wasm::types::Status),
}

/// A filter's configuration struct. Implement it (usually with just `validate`, or with the
/// default) on any `DeserializeOwned` type.
pub trait PluginConfig: DeserializeOwned + Sized {
    /// Checks that serde cannot express (ranges, non-empty lists, valid header names). The
    /// message is logged as is, so name the field.
    fn validate(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// Parses configuration bytes; `None` or blank bytes parse as `{}`. Pure: unit-testable.
    fn parse(bytes: Option<&[u8]>) -> Result<Self, ConfigError> {
        let text = match bytes {
            Some(b) => std::str::from_utf8(b).map_err(|_| ConfigError::NotUtf8)?,
            None => "",
        };
        let blank = text.trim().is_empty();
        let mut config: Self = if blank {
            serde_json::from_str("{}").map_err(|e| ConfigError::Missing(e.to_string()))?
        } else {
            serde_json::from_str(text).map_err(|e| ConfigError::Invalid {
                line: e.line(),
                column: e.column(),
                message: strip_position(&e.to_string()),
            })?
        };
        config.validate().map_err(ConfigError::Refused)?;
        Ok(config)
    }

    /// Reads the plugin configuration from the host and parses it. On error, logs it at
    /// `Error` level (prefixed with `plugin`) and returns `None`: return `false` from
    /// `on_configure` then.
    ///
    /// ```ignore
    /// fn on_configure(&mut self, _size: usize) -> bool {
    ///     match Config::load("headers") {
    ///         Some(config) => { self.config = Rc::new(config); true }
    ///         None => false,
    ///     }
    /// }
    /// ```
    fn load(plugin: &str) -> Option<Self> {
        let result =
            match proxy_wasm::hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            {
                Ok(bytes) => Self::parse(bytes.as_deref()),
                Err(status) => Err(ConfigError::Host(status)),
            };
        match result {
            Ok(config) => Some(config),
            Err(e) => {
                // Straight to the host: the `log` facade may be filtered below Error.
                let _ = proxy_wasm::hostcalls::log(LogLevel::Error, &format!("{plugin}: {e}"));
                None
            }
        }
    }
}

/// serde_json appends " at line L column C"; the error already carries them as fields.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Required {
        upstream: String,
        #[serde(default)]
        timeout_ms: u64,
    }

    impl PluginConfig for Required {
        fn validate(&mut self) -> Result<(), String> {
            if self.upstream.is_empty() {
                return Err("upstream must not be empty".into());
            }
            if self.timeout_ms == 0 {
                self.timeout_ms = 500;
            }
            Ok(())
        }
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default)]
    struct Optional {
        enabled: bool,
    }

    impl PluginConfig for Optional {}

    #[test]
    fn parses_and_validates() {
        let c = Required::parse(Some(br#"{"upstream":"authz:8000"}"#)).unwrap();
        assert_eq!(
            c,
            Required {
                upstream: "authz:8000".into(),
                timeout_ms: 500
            }
        );
    }

    #[test]
    fn empty_config_is_an_empty_object() {
        assert_eq!(Optional::parse(None).unwrap(), Optional { enabled: false });
        assert_eq!(Optional::parse(Some(b"  \n")).unwrap(), Optional::default());
        let err = Required::parse(Some(b"")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Missing(m) if m.contains("upstream")),
            "{err}"
        );
    }

    #[test]
    fn syntax_and_shape_errors_have_positions() {
        let err = Required::parse(Some(b"{\n  \"upstream\": 3\n}")).unwrap_err();
        match err {
            ConfigError::Invalid { line, message, .. } => {
                assert_eq!(line, 2);
                assert!(message.contains("invalid type"), "{message}");
                assert!(!message.contains(" at line "), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = Required::parse(Some(br#"{"upstream":"a","nope":1}"#)).unwrap_err();
        assert!(err.to_string().contains("unknown field `nope`"), "{err}");
    }

    #[test]
    fn refused_by_validate_and_not_utf8() {
        let err = Required::parse(Some(br#"{"upstream":""}"#)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "plugin configuration is refused: upstream must not be empty"
        );
        assert_eq!(
            Required::parse(Some(&[0xff, 0xfe])).unwrap_err(),
            ConfigError::NotUtf8
        );
    }
}
