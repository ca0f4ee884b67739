//! `ambit filter run FILTER.wasm`: one request through the filter in Ambit's Wasm host, curl
//! style. The upstream is an echo server (it answers 200 with the request it received); HTTP
//! calls the filter makes fail, as they would with no such upstream.

use std::path::PathBuf;
use std::sync::Arc;

use ambit_filter_test::protocol::{LoadSpec, RunSpec};
use ambit_filter_test::{FailStrategy, Headers, Response};
use ambit_wasm_host::http_call::BoxFuture;
use anyhow::bail;
use clap::Args;

use super::host::{self, Loaded};

#[derive(Args)]
pub struct RunArgs {
    /// The filter module.
    wasm: PathBuf,
    /// The plugin configuration (JSON), as a WasmPlugin's `pluginConfig`.
    #[arg(long, default_value = "")]
    config: String,
    /// The request method.
    #[arg(short = 'X', long = "request", default_value = "GET")]
    method: String,
    /// A request header, `name: value`; repeat for more.
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// The request body.
    #[arg(short = 'd', long = "data")]
    body: Option<String>,
    /// Skip the filter for a request it fails on, instead of answering 500.
    #[arg(long)]
    fail_open: bool,
    /// Path and query (`/orders?id=1`), or a URL (`http://host/path`: the host becomes
    /// `:authority`).
    path: String,
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    if !args.config.trim().is_empty() {
        if let Err(e) = serde_json::from_str::<serde_json::Value>(&args.config) {
            bail!("--config is not valid JSON: {e}");
        }
    }
    let (authority, path) = split_url(&args.path)?;
    let mut headers = Headers::new();
    headers.add(":method", args.method.as_str());
    headers.add(":path", path.as_str());
    headers.add(":authority", authority.as_deref().unwrap_or("example.com"));
    headers.add(":scheme", "http");
    for header in &args.headers {
        let Some((name, value)) = header.split_once(':') else {
            bail!("-H {header:?}: expected 'name: value'");
        };
        match name.trim() {
            name if name.eq_ignore_ascii_case("host") => headers.set(":authority", value.trim()),
            name => headers.add(name, value.trim()),
        }
    }
    let name = args
        .wasm
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "filter".into());
    let spec = LoadSpec {
        module: args.wasm.clone(),
        root_id: name.clone(),
        name,
        configuration: args.config.into_bytes(),
        fail_strategy: if args.fail_open {
            FailStrategy::FailOpen
        } else {
            FailStrategy::FailClose
        },
        ..LoadSpec::default()
    };
    let request = RunSpec {
        headers,
        body: args.body.map(String::into_bytes).into_iter().collect(),
        ..RunSpec::default()
    };
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = tokio.block_on(async move {
        // No upstreams here: every HTTP call the filter makes fails.
        let answer: host::Answerer = Arc::new(|_| -> BoxFuture<_> { Box::pin(async { None }) });
        let filter = match Loaded::load(&spec, "ambit-filter-run".into(), answer) {
            Ok(filter) => Arc::new(filter),
            Err(e) => bail!("loading {}: {e}", spec.module.display()),
        };
        for log in filter.logs() {
            eprintln!("* filter log [{:?}] {}", log.level, log.message);
        }
        let outcome = host::run(std::slice::from_ref(&filter), request, |sent| async move {
            Response::echo(&sent)
        })
        .await;
        anyhow::Ok(outcome)
    })?;
    for log in &outcome.logs {
        eprintln!("* filter log [{:?}] {}", log.level, log.message);
    }
    print!("{}", outcome.exchange());
    // The plugin's background tasks would keep the runtime's drop waiting.
    tokio.shutdown_background();
    Ok(())
}

/// `http://host:port/path` → (`host:port`, `/path`); `/path` → (none, `/path`).
fn split_url(target: &str) -> anyhow::Result<(Option<String>, String)> {
    let rest = match target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
    {
        Some(rest) => rest,
        None if target.starts_with('/') => return Ok((None, target.to_owned())),
        None => bail!("{target:?}: give a path starting with / or an http:// URL"),
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    Ok((Some(authority.to_owned()), path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths() {
        assert_eq!(
            split_url("http://echo.demo:8080/a?b=1").unwrap(),
            (Some("echo.demo:8080".into()), "/a?b=1".into())
        );
        assert_eq!(
            split_url("https://h").unwrap(),
            (Some("h".into()), "/".into())
        );
        assert_eq!(split_url("/x").unwrap(), (None, "/x".into()));
        assert!(split_url("x").is_err());
    }
}
