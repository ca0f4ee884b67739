//! The process's log filter, changeable while running through the admin `/logging` endpoint, in
//! the form Envoy's and Istio ztunnel's admin take: `POST /logging` lists the level,
//! `POST /logging?level=debug` sets it, `POST /logging?level=ambit_ztunnel::dns:debug,info` sets
//! it per module (`module=level` works too), `POST /logging?reset` goes back to `RUST_LOG`.

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

struct Filter {
    handle: reload::Handle<EnvFilter, Registry>,
    /// What `RUST_LOG` (or the default) said at start, for `reset`.
    initial: String,
}

static FILTER: OnceLock<Filter> = OnceLock::new();

/// Why a `/logging` request changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("logging is not set up by this process (an embedded ztunnel logs through its host's subscriber)")]
    NotManaged,
    #[error("level {0:?} is invalid: use error|warn|info|debug|trace|off, optionally per module as <module>:<level>, comma-separated")]
    Invalid(String),
    #[error("the log filter could not be replaced: {0}")]
    Reload(#[from] reload::Error),
}

/// Installs the global subscriber: formatted lines on stdout, filtered by `RUST_LOG` (default
/// `info`), the filter replaceable through [`set`].
pub fn init() {
    let initial = std::env::var("RUST_LOG")
        .ok()
        .filter(|spec| EnvFilter::try_new(spec).is_ok())
        .unwrap_or_else(|| "info".into());
    let (layer, handle) = reload::Layer::new(EnvFilter::new(&initial));
    tracing_subscriber::registry()
        .with(layer)
        .with(tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal()))
        .init();
    let _ = FILTER.set(Filter { handle, initial });
}

/// The filter in force.
pub fn current() -> Result<String, LoggingError> {
    let filter = FILTER.get().ok_or(LoggingError::NotManaged)?;
    Ok(filter.handle.with_current(|f| f.to_string())?)
}

/// Replaces the filter with `level` (Istio's form, see the module docs), or the initial one when
/// `level` is `None`. Returns the filter now in force.
pub fn set(level: Option<&str>) -> Result<String, LoggingError> {
    let filter = FILTER.get().ok_or(LoggingError::NotManaged)?;
    let spec = match level {
        Some(level) => to_env_filter(level).ok_or_else(|| LoggingError::Invalid(level.into()))?,
        None => filter.initial.clone(),
    };
    let new = EnvFilter::try_new(&spec).map_err(|_| LoggingError::Invalid(spec.clone()))?;
    filter.handle.reload(new)?;
    current()
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// `a::b:debug,info` → `a::b=debug,info`; `None` if a clause names no level.
fn to_env_filter(level: &str) -> Option<String> {
    let clauses: Option<Vec<String>> = level
        .split(',')
        .map(|clause| {
            let clause = clause.trim();
            if LEVELS.contains(&clause) {
                return Some(clause.to_owned());
            }
            let (module, level) = clause.rsplit_once('=').or_else(|| {
                clause
                    .rsplit_once(':')
                    .filter(|(module, _)| !module.ends_with(':'))
            })?;
            (!module.is_empty() && LEVELS.contains(&level)).then(|| format!("{module}={level}"))
        })
        .collect();
    clauses.filter(|c| !c.is_empty()).map(|c| c.join(","))
}

#[cfg(test)]
mod tests {
    use super::to_env_filter;

    #[test]
    fn istio_levels_become_env_filters() {
        assert_eq!(to_env_filter("debug").unwrap(), "debug");
        assert_eq!(
            to_env_filter("ambit_ztunnel::dns:debug,info").unwrap(),
            "ambit_ztunnel::dns=debug,info"
        );
        assert_eq!(to_env_filter("access=trace").unwrap(), "access=trace");
        for bad in ["", "loud", "ambit_ztunnel::dns", "x:verbose", ":debug"] {
            assert!(to_env_filter(bad).is_none(), "{bad}");
        }
    }
}
