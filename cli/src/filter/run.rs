//! `ambit filter run FILTER.wasm`: one request through the filter in Ambit's Wasm host, curl
//! style. The upstream is an echo server (it answers 200 with the request it received); HTTP
//! calls the filter makes fail, as they would with no such upstream.

use std::path::PathBuf;

use ambit_filter_test::{FailStrategy, Filter};
use anyhow::{bail, Context as _};
use clap::Args;

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
        serde_json::from_str::<serde_json::Value>(&args.config)
            .context("--config is not valid JSON")?;
    }
    let filter = Filter::wasm(&args.wasm)
        .config(args.config)
        .fail_strategy(if args.fail_open {
            FailStrategy::FailOpen
        } else {
            FailStrategy::FailClose
        })
        .load()
        .with_context(|| format!("loading {}", args.wasm.display()))?;
    let (authority, path) = split_url(&args.path)?;
    let mut request = filter.request().method(&args.method).path(&path);
    if let Some(authority) = authority {
        request = request.authority(&authority);
    }
    for header in &args.headers {
        let Some((name, value)) = header.split_once(':') else {
            bail!("-H {header:?}: expected 'name: value'");
        };
        request = request.header(name.trim(), value.trim());
    }
    if let Some(body) = args.body {
        request = request.body(body);
    }
    let outcome = request.echo().run();
    for log in &outcome.logs {
        eprintln!("* filter log [{:?}] {}", log.level, log.message);
    }
    print!("{outcome}");
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
