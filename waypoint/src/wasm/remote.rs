//! WasmPlugin modules from `https://` and `http://` URLs, fetched the way Istio's agent fetches
//! them for Envoy: downloaded once per URL and kept in memory while a plugin uses it
//! (`imagePullPolicy: Always` downloads again whenever the configuration is applied), the
//! plugin's `sha256` checked by the caller before the module is compiled.
//!
//! TLS is rustls (the workspace's one TLS stack) trusting the system's roots plus the PEM bundle
//! named by `AMBIT_WASM_CA_FILE`, for private servers. Redirects are followed (up to five), the
//! download is bounded in time and size, and anything but a 2xx answer is an error: a module
//! that cannot be fetched is a plugin that cannot load, which `failStrategy` already covers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Extra PEM roots for module servers (beside the system's).
pub const CA_FILE_ENV: &str = "AMBIT_WASM_CA_FILE";
/// Modules larger than this are refused (filters are a few hundred KiB to a few MiB).
pub const MAX_MODULE_BYTES: usize = 64 * 1024 * 1024;
/// The whole download, redirects included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REDIRECTS: usize = 5;

/// Why a module could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {reason}")]
    Url { url: String, reason: &'static str },
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("{url}: the server answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("{url}: more than {MAX_REDIRECTS} redirects")]
    Redirects { url: String },
    #[error("{url}: the module is larger than {MAX_MODULE_BYTES} bytes")]
    TooLarge { url: String },
    #[error("{url}: no complete answer within {FETCH_TIMEOUT:?}")]
    Timeout { url: String },
    #[error("the CA bundle {path} ({CA_FILE_ENV}): {reason}")]
    CaFile { path: PathBuf, reason: String },
}

/// Downloaded modules by URL.
#[derive(Default)]
pub struct RemoteModules {
    cache: Mutex<HashMap<String, Bytes>>,
}

impl RemoteModules {
    /// The module at `url`: from the cache unless `always` (or not there yet), else downloaded.
    /// Blocks the calling thread for at most the fetch timeout.
    pub fn module(&self, url: &str, always: bool) -> Result<Bytes, FetchError> {
        if !always {
            if let Some(module) = self.cache.lock().expect("module cache lock").get(url) {
                return Ok(module.clone());
            }
        }
        let module = fetch_blocking(url)?;
        self.cache
            .lock()
            .expect("module cache lock")
            .insert(url.to_owned(), module.clone());
        Ok(module)
    }

    /// Forgets the modules of URLs no plugin names any more.
    pub fn retain(&self, in_use: &[&str]) {
        self.cache
            .lock()
            .expect("module cache lock")
            .retain(|url, _| in_use.contains(&url.as_str()));
    }
}

/// Runs the download on a thread of its own with its own runtime: the caller may be a Tokio
/// worker (the configuration watcher), where blocking on another runtime is not allowed.
fn fetch_blocking(url: &str) -> Result<Bytes, FetchError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| FetchError::Transport {
                        url: url.to_owned(),
                        reason: format!("cannot start the download: {e}"),
                    })?;
                runtime.block_on(async {
                    tokio::time::timeout(FETCH_TIMEOUT, fetch(url))
                        .await
                        .unwrap_or_else(|_| {
                            Err(FetchError::Timeout {
                                url: url.to_owned(),
                            })
                        })
                })
            })
            .join()
            .unwrap_or_else(|_| {
                Err(FetchError::Transport {
                    url: url.to_owned(),
                    reason: "the download thread panicked".into(),
                })
            })
    })
}

/// GET with redirects followed.
async fn fetch(url: &str) -> Result<Bytes, FetchError> {
    let mut uri: Uri = url.parse().map_err(|_| FetchError::Url {
        url: url.to_owned(),
        reason: "not a valid URL",
    })?;
    for _ in 0..=MAX_REDIRECTS {
        let current = uri.to_string();
        let response = get(&uri).await?;
        let status = response.status();
        if status.is_redirection() {
            let location = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .ok_or_else(|| FetchError::Transport {
                    url: current.clone(),
                    reason: format!("{status} without a location"),
                })?;
            uri = resolve(&uri, location).ok_or_else(|| FetchError::Transport {
                url: current.clone(),
                reason: format!("{status} to an unusable location {location:?}"),
            })?;
            continue;
        }
        if !status.is_success() {
            return Err(FetchError::Status {
                url: current,
                status,
            });
        }
        if response
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|length| length > MAX_MODULE_BYTES as u64)
        {
            return Err(FetchError::TooLarge { url: current });
        }
        let body = Limited::new(response.into_body(), MAX_MODULE_BYTES);
        return match body.collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(err) if err.is::<http_body_util::LengthLimitError>() => {
                Err(FetchError::TooLarge { url: current })
            }
            Err(err) => Err(FetchError::Transport {
                url: current,
                reason: format!("reading the module: {err}"),
            }),
        };
    }
    Err(FetchError::Redirects {
        url: url.to_owned(),
    })
}

/// A redirect's target: absolute, or a path on the same server.
fn resolve(base: &Uri, location: &str) -> Option<Uri> {
    let target: Uri = location.parse().ok()?;
    if target.scheme().is_some() {
        return Some(target);
    }
    if !location.starts_with('/') {
        return None;
    }
    Uri::builder()
        .scheme(base.scheme()?.clone())
        .authority(base.authority()?.clone())
        .path_and_query(location)
        .build()
        .ok()
}

async fn get(uri: &Uri) -> Result<http::Response<hyper::body::Incoming>, FetchError> {
    let url = uri.to_string();
    let bad = |reason| FetchError::Url {
        url: url.clone(),
        reason,
    };
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad("only http:// and https:// are fetched")),
    };
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    // `[::1]` in a URL is `::1` to the resolver and to TLS.
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let transport = |reason: String| FetchError::Transport {
        url: url.clone(),
        reason,
    };
    let tcp = TcpStream::connect((bare_host, port))
        .await
        .map_err(|e| transport(format!("connecting: {e}")))?;
    let request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()).to_owned())
        .header(
            http::header::HOST,
            uri.authority().map_or(host, |a| a.as_str()),
        )
        .header(http::header::USER_AGENT, "ambit-waypoint")
        .body(Empty::<Bytes>::new())
        .map_err(|e| transport(e.to_string()))?;
    if !https {
        return exchange(tcp, request).await.map_err(transport);
    }
    let config = tls_config().map_err(|e| transport(e.to_string()))?;
    let name =
        ServerName::try_from(bare_host.to_owned()).map_err(|_| bad("not a TLS server name"))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| transport(format!("TLS: {e}")))?;
    exchange(tls, request).await.map_err(transport)
}

async fn exchange<S>(
    io: S,
    request: Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))
}

/// The system's roots and the extra bundle, read on every fetch so a rotated bundle applies.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, FetchError> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped; the extra bundle may be all there is.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = std::env::var_os(CA_FILE_ENV).map(PathBuf::from) {
        let ca_error = |reason: String| FetchError::CaFile {
            path: path.clone(),
            reason,
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&path)
            .map_err(|e| ca_error(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| ca_error(e.to_string()))?;
        if certs.is_empty() {
            return Err(ca_error("no certificates in it".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_locations_resolve_against_the_server() {
        let base: Uri = "https://filters.example:8443/a/b.wasm".parse().unwrap();
        assert_eq!(
            resolve(&base, "/c.wasm").unwrap().to_string(),
            "https://filters.example:8443/c.wasm"
        );
        assert_eq!(
            resolve(&base, "http://other/d.wasm").unwrap().to_string(),
            "http://other/d.wasm"
        );
        assert!(resolve(&base, "relative.wasm").is_none());
    }

    #[test]
    fn other_schemes_are_refused_with_the_url() {
        let err = fetch_blocking("ftp://filters.example/x.wasm").unwrap_err();
        assert!(
            err.to_string().contains("ftp://filters.example/x.wasm"),
            "{err}"
        );
        assert!(
            err.to_string().contains("only http:// and https://"),
            "{err}"
        );
    }
}
