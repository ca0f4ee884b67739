//! WasmPlugin modules from `https://` and `http://` URLs and from OCI registries (`oci://`, or a
//! url without a scheme, which Istio reads as an image reference), fetched the way Istio's agent
//! fetches them for Envoy: [OCI images](oci) over the distribution API, plain URLs with one GET.
//!
//! Caching follows the agent's: a module is kept under its name (the URL; for an image, the
//! repository) and its checksum (the module's sha256; for an image, the manifest digest), and
//! each URL remembers the checksum it last gave. A plugin whose `sha256` names a cached module,
//! or whose image is pinned by `@sha256:`, never pulls again; otherwise the module the URL last
//! gave is reused unless the pull policy says to pull again: `imagePullPolicy: Always`, or an
//! unspecified policy on an image tagged `:latest`, pull whenever the plugin itself changed (a
//! new resource version in Istio). Modules no plugin names any more are dropped.
//!
//! TLS is rustls (the workspace's one TLS stack) trusting the system's roots plus the PEM bundle
//! named by `AMBIT_WASM_CA_FILE`, for private servers and registries. Redirects are followed (up
//! to five), every pull is bounded in time (connect and whole pull) and size, anything but a 2xx
//! answer is an error, and what arrives must start with the Wasm magic number: a module that
//! cannot be fetched is a plugin that cannot load, which `failStrategy` already covers.

mod oci;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, AUTHORIZATION};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub use oci::{OciError, Reference};

/// Extra PEM roots for module servers and registries (beside the system's).
pub const CA_FILE_ENV: &str = "AMBIT_WASM_CA_FILE";
/// Modules (and image layers) larger than this are refused: filters are a few hundred KiB to a
/// few MiB, and the whole module is held in memory until it is compiled.
pub const MAX_MODULE_BYTES: usize = 64 * 1024 * 1024;
/// The whole pull: token, manifests, redirects and the download (Envoy's remote data source
/// timeout for Wasm modules in Istio's configuration).
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// One TCP connection; a server that does not answer fails fast instead of using up the pull.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_REDIRECTS: usize = 5;
/// Every Wasm binary starts with `\0asm` (then a 4-byte version).
const WASM_MAGIC: &[u8] = b"\0asm";

/// Why a module could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {reason}")]
    Url { url: String, reason: &'static str },
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("{url}: the server answered in plain HTTP, not TLS")]
    NotTls { url: String },
    #[error("{url}: the server answered {status}")]
    Status { url: String, status: StatusCode },
    #[error("{url}: more than {MAX_REDIRECTS} redirects")]
    Redirects { url: String },
    #[error("{url}: more than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{url}: refusing to connect to {ip}: {reason}")]
    Blocked {
        url: String,
        ip: IpAddr,
        reason: &'static str,
    },
    #[error("{url}: no complete answer within {FETCH_TIMEOUT:?}")]
    Timeout { url: String },
    #[error("the CA bundle {path} ({CA_FILE_ENV}): {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("{url}: the module's sha256 is {actual}, but the plugin's sha256 is {expected}")]
    Digest {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{url}: what was fetched is not a Wasm module (it does not start with \\0asm)")]
    NotWasm { url: String },
    #[error("{image}: {source}")]
    Oci { image: String, source: OciError },
}

impl FetchError {
    /// The server or the path to it may answer later (connection refused or reset, a name that
    /// does not resolve yet, a TLS failure, a timeout, `5xx`, `408`, `429`): worth pulling
    /// again. Everything else (a digest or format that is wrong, credentials wanted, a bad URL,
    /// an address no pull may reach, `404`) stays wrong until the plugin changes.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Transport { .. } | FetchError::Timeout { .. } => true,
            FetchError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::REQUEST_TIMEOUT
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

/// `imagePullPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Unset or `UNSPECIFIED_POLICY`: `IfNotPresent`, except `Always` for images tagged `:latest`.
    #[default]
    Unspecified,
    IfNotPresent,
    Always,
}

impl PullPolicy {
    /// The manifest's value (validated there); anything else is unspecified.
    pub fn from_manifest(value: Option<&str>) -> Self {
        match value {
            Some("Always") => PullPolicy::Always,
            Some("IfNotPresent") => PullPolicy::IfNotPresent,
            _ => PullPolicy::Unspecified,
        }
    }
}

/// What a plugin asks of its module besides the URL.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pull<'a> {
    /// The plugin's `sha256`: of the module for a plain URL, of the image manifest for an image.
    pub sha256: Option<&'a str>,
    pub policy: PullPolicy,
    /// The plugin is new or different since the last configuration: the moment Istio's
    /// `Always` pulls again (a new resource version).
    pub changed: bool,
}

/// Where a remote module comes from.
enum Source {
    Http(Uri),
    Oci(Reference),
}

impl Source {
    fn parse(url: &str) -> Result<Source, FetchError> {
        let bad = |reason| FetchError::Url {
            url: url.to_owned(),
            reason,
        };
        match url.split_once("://").map(|(scheme, _)| scheme) {
            Some("http" | "https") => {
                let uri: Uri = url.parse().map_err(|_| bad("not a valid URL"))?;
                if uri.host().is_none() {
                    return Err(bad("no host"));
                }
                Ok(Source::Http(uri))
            }
            // Istio: no scheme is an OCI image reference.
            Some("oci") | None => {
                Reference::parse(url)
                    .map(Source::Oci)
                    .map_err(|source| FetchError::Oci {
                        image: url.to_owned(),
                        source,
                    })
            }
            Some(_) => Err(bad(
                "only http://, https:// and oci:// (or a bare image reference) are fetched",
            )),
        }
    }

    /// The module's name in the cache: the URL, or the image's repository without tag or
    /// digest (so every tag of an image shares the modules of the digests seen).
    fn module_name(&self, url: &str) -> String {
        match self {
            Source::Http(_) => url.to_owned(),
            Source::Oci(reference) => reference.repository_name(),
        }
    }

    /// A new pull could bring a different module, if the policy asks for one.
    fn pulls_again(&self, policy: PullPolicy) -> bool {
        match (self, policy) {
            // A digest names one manifest forever.
            (Source::Oci(reference), _) if reference.is_pinned() => false,
            (_, PullPolicy::Always) => true,
            (_, PullPolicy::IfNotPresent) => false,
            (Source::Oci(reference), PullPolicy::Unspecified) => reference.is_latest(),
            (Source::Http(_), PullPolicy::Unspecified) => false,
        }
    }
}

#[derive(Default)]
struct Cache {
    /// Modules by name and checksum (lowercase hex sha256).
    modules: HashMap<(String, String), Bytes>,
    /// The checksum each URL gave last.
    checksums: HashMap<String, String>,
}

/// Downloaded modules.
#[derive(Default)]
pub struct RemoteModules {
    cache: Mutex<Cache>,
}

impl RemoteModules {
    /// The module at `url` (`http(s)://`, `oci://` or a bare image reference): cached, or
    /// pulled. Blocks the calling thread for at most the fetch timeout.
    pub fn module(&self, url: &str, pull: Pull<'_>) -> Result<Bytes, FetchError> {
        let source = Source::parse(url)?;
        let name = source.module_name(url);
        if let Some(module) = self.cached(url, &name, &source, pull) {
            return Ok(module);
        }
        let (module, checksum) = match &source {
            Source::Http(uri) => {
                let module = run_blocking(url, || fetch_module(uri))?;
                let checksum = hex(&Sha256::digest(&module));
                if let Some(expected) = pull.sha256 {
                    if !expected.eq_ignore_ascii_case(&checksum) {
                        return Err(FetchError::Digest {
                            url: url.to_owned(),
                            expected: expected.to_owned(),
                            actual: checksum,
                        });
                    }
                }
                (module, checksum)
            }
            Source::Oci(reference) => {
                // The manifest is fetched first: a digest already cached is not downloaded again.
                let known = |digest: &str| self.get(&name, digest);
                let pulled = run_blocking(url, || oci::pull(reference, pull.sha256, &known))?;
                (pulled.module, pulled.digest)
            }
        };
        if !module.starts_with(WASM_MAGIC) {
            return Err(FetchError::NotWasm {
                url: url.to_owned(),
            });
        }
        let mut cache = self.cache.lock().expect("module cache lock");
        cache
            .modules
            .insert((name, checksum.clone()), module.clone());
        cache.checksums.insert(url.to_owned(), checksum);
        Ok(module)
    }

    fn get(&self, name: &str, checksum: &str) -> Option<Bytes> {
        let cache = self.cache.lock().expect("module cache lock");
        cache
            .modules
            .get(&(name.to_owned(), checksum.to_ascii_lowercase()))
            .cloned()
    }

    /// The module the plugin's checksum names, else the one the URL last gave unless the
    /// policy pulls again.
    fn cached(&self, url: &str, name: &str, source: &Source, pull: Pull<'_>) -> Option<Bytes> {
        if let Some(module) = pull.sha256.and_then(|sum| self.get(name, sum)) {
            return Some(module);
        }
        if pull.changed && source.pulls_again(pull.policy) {
            return None;
        }
        let checksum = self
            .cache
            .lock()
            .expect("module cache lock")
            .checksums
            .get(url)
            .cloned()?;
        self.get(name, &checksum)
    }

    /// Forgets what no plugin names any more: `in_use` holds each plugin's URL and `sha256`.
    pub fn retain(&self, in_use: &[(&str, Option<&str>)]) {
        let mut cache = self.cache.lock().expect("module cache lock");
        cache
            .checksums
            .retain(|url, _| in_use.iter().any(|(u, _)| u == url));
        let mut keep = HashSet::new();
        for (url, sha256) in in_use {
            let Ok(source) = Source::parse(url) else {
                continue;
            };
            let name = source.module_name(url);
            if let Some(checksum) = cache.checksums.get(*url) {
                keep.insert((name.clone(), checksum.clone()));
            }
            if let Some(sum) = sha256 {
                keep.insert((name, sum.to_ascii_lowercase()));
            }
        }
        cache.modules.retain(|key, _| keep.contains(key));
    }
}

/// Runs a pull on a thread of its own with its own runtime, bounded by the fetch timeout: the
/// caller may be a Tokio worker (the configuration watcher), where blocking on another runtime
/// is not allowed.
fn run_blocking<T, F>(url: &str, pull: impl FnOnce() -> F + Send) -> Result<T, FetchError>
where
    T: Send,
    F: Future<Output = Result<T, FetchError>>,
{
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
                    tokio::time::timeout(FETCH_TIMEOUT, pull())
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

/// A module from an http(s) URL.
async fn fetch_module(uri: &Uri) -> Result<Bytes, FetchError> {
    let (uri, response) = get(uri, HeaderMap::new()).await?;
    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::Status {
            url: uri.to_string(),
            status,
        });
    }
    read_body(&uri, response, MAX_MODULE_BYTES).await
}

/// GET with redirects followed; the final answer is returned whatever its status. Credentials
/// in `headers` are not sent on to another server.
async fn get(
    uri: &Uri,
    mut headers: HeaderMap,
) -> Result<(Uri, http::Response<hyper::body::Incoming>), FetchError> {
    let mut uri = uri.clone();
    for _ in 0..=MAX_REDIRECTS {
        let response = send(&uri, &headers).await?;
        let status = response.status();
        if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
            return Ok((uri, response));
        }
        let transport = |reason| FetchError::Transport {
            url: uri.to_string(),
            reason,
        };
        let location = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| transport(format!("{status} without a location")))?;
        let target = resolve(&uri, location)
            .ok_or_else(|| transport(format!("{status} to an unusable location {location:?}")))?;
        // Registries send blobs to storage elsewhere (a CDN, a bucket) with signed URLs: the
        // registry's token is for the registry only.
        if target.authority() != uri.authority() || target.scheme() != uri.scheme() {
            headers.remove(AUTHORIZATION);
        }
        uri = target;
    }
    Err(FetchError::Redirects {
        url: uri.to_string(),
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

/// A whole answer's body, refused past `limit` bytes.
async fn read_body(
    uri: &Uri,
    response: http::Response<hyper::body::Incoming>,
    limit: usize,
) -> Result<Bytes, FetchError> {
    let too_large = || FetchError::TooLarge {
        url: uri.to_string(),
        limit,
    };
    if response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|length| length > limit as u64)
    {
        return Err(too_large());
    }
    match Limited::new(response.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(err) => Err(FetchError::Transport {
            url: uri.to_string(),
            reason: format!("reading the answer: {err}"),
        }),
    }
}

/// One request on a new connection.
async fn send(
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<http::Response<hyper::body::Incoming>, FetchError> {
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
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect(bare_host, port))
        .await
        .map_err(|_| transport(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| match e {
            ConnectError::Blocked { ip, reason } => FetchError::Blocked {
                url: url.clone(),
                ip,
                reason,
            },
            ConnectError::Failed(reason) => transport(reason),
        })?;
    let mut request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()).to_owned())
        .header(
            http::header::HOST,
            uri.authority().map_or(host, |a| a.as_str()),
        )
        .header(http::header::USER_AGENT, "ambit-waypoint")
        .body(Empty::<Bytes>::new())
        .map_err(|e| transport(e.to_string()))?;
    request.headers_mut().extend(headers.clone());
    if !https {
        return exchange(tcp, request).await.map_err(transport);
    }
    let config = tls_config()?;
    let name =
        ServerName::try_from(bare_host.to_owned()).map_err(|_| bad("not a TLS server name"))?;
    let tls = match tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) if answered_plain_http(&e) => return Err(FetchError::NotTls { url }),
        Err(e) => return Err(transport(format!("TLS: {e}"))),
    };
    exchange(tls, request).await.map_err(transport)
}

/// A connection to the first of `host`'s addresses that takes one; none is made to an address
/// Istio's Wasm fetcher refuses (whatever name or redirect led there).
async fn connect(host: &str, port: u16) -> Result<TcpStream, ConnectError> {
    let addresses = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ConnectError::Failed(format!("resolving {host}: {e}")))?;
    let mut last_error = format!("{host} has no address");
    for address in addresses {
        if let Some(reason) = blocked_address(address.ip()) {
            return Err(ConnectError::Blocked {
                ip: address.ip(),
                reason,
            });
        }
        match TcpStream::connect(address).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last_error = format!("connecting to {address}: {e}"),
        }
    }
    Err(ConnectError::Failed(last_error))
}

/// Why no connection was made: an address no pull may reach (final), or a failure that may
/// pass (refused, unreachable, a name that does not resolve yet).
enum ConnectError {
    Blocked { ip: IpAddr, reason: &'static str },
    Failed(String),
}

/// Why no Wasm pull may reach `ip`, as in Istio: link-local addresses (the cloud instance
/// metadata services at 169.254.169.254 among them) and the metadata services outside that
/// range. Loopback and private addresses are allowed: in-cluster registries and servers.
pub(super) fn blocked_address(ip: IpAddr) -> Option<&'static str> {
    match ip.to_canonical() {
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address"),
        // Alibaba Cloud's metadata service.
        IpAddr::V4(v4) if v4 == Ipv4Addr::new(100, 100, 100, 200) => {
            Some("a cloud metadata address")
        }
        IpAddr::V4(v4) if v4.is_multicast() && v4.octets()[..3] == [224, 0, 0] => {
            Some("a link-local address")
        }
        IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80 => Some("a link-local address"),
        IpAddr::V6(v6) if v6.segments()[0] == 0xff02 => Some("a link-local address"),
        // AWS's IPv6 instance metadata service (fd00:ec2::/32).
        IpAddr::V6(v6) if v6.segments()[..2] == [0xfd00, 0x0ec2] => {
            Some("a cloud metadata address")
        }
        _ => None,
    }
}

/// The handshake failed on a first record that is no TLS record at all: the server answered
/// the ClientHello in plain HTTP (`HTTP/1.1 400 ...`), the case Istio's image fetcher (like
/// Docker's) retries over plain HTTP.
fn answered_plain_http(error: &std::io::Error) -> bool {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)
            )
        })
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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
    fn metadata_services_are_never_reached() {
        let blocked = |ip: &str| blocked_address(ip.parse().unwrap()).is_some();
        assert!(blocked("169.254.169.254"));
        assert!(blocked("::ffff:169.254.169.254"));
        assert!(blocked("fe80::1"));
        assert!(blocked("fd00:ec2::254"));
        assert!(blocked("100.100.100.200"));
        assert!(!blocked("127.0.0.1"));
        assert!(!blocked("10.1.2.3"));
        assert!(!blocked("::1"));
        assert!(!blocked("fd00:1::1"));
        let url = "http://169.254.169.254/m.wasm";
        let uri: Uri = url.parse().unwrap();
        let err = run_blocking(url, || fetch_module(&uri)).unwrap_err();
        assert!(
            err.to_string()
                .contains("refusing to connect to 169.254.169.254"),
            "{err}"
        );
    }

    #[test]
    fn only_failures_that_may_pass_are_transient() {
        let url = || "https://filters.example/f.wasm".to_owned();
        let status = |status| FetchError::Status { url: url(), status };
        assert!(FetchError::Transport {
            url: url(),
            reason: "connection refused".into()
        }
        .is_transient());
        assert!(FetchError::Timeout { url: url() }.is_transient());
        assert!(!FetchError::Blocked {
            url: url(),
            ip: "169.254.169.254".parse().unwrap(),
            reason: "a link-local address"
        }
        .is_transient());
        assert!(status(StatusCode::SERVICE_UNAVAILABLE).is_transient());
        assert!(status(StatusCode::TOO_MANY_REQUESTS).is_transient());
        assert!(!status(StatusCode::NOT_FOUND).is_transient());
        assert!(!FetchError::Digest {
            url: url(),
            expected: "a".into(),
            actual: "b".into()
        }
        .is_transient());
        assert!(!FetchError::Oci {
            image: url(),
            source: OciError::ImageDigest {
                expected: "a".into(),
                actual: "b".into()
            }
        }
        .is_transient());
    }

    #[test]
    fn other_schemes_are_refused_with_the_url() {
        let modules = RemoteModules::default();
        let err = modules
            .module("ftp://filters.example/x.wasm", Pull::default())
            .unwrap_err();
        assert!(
            err.to_string().contains("ftp://filters.example/x.wasm"),
            "{err}"
        );
        assert!(err.to_string().contains("only http://"), "{err}");
    }

    #[test]
    fn urls_without_a_scheme_are_image_references() {
        assert!(matches!(
            Source::parse("ghcr.io/acme/filter:v1"),
            Ok(Source::Oci(_))
        ));
        assert!(matches!(
            Source::parse("oci://ghcr.io/acme/filter:v1"),
            Ok(Source::Oci(_))
        ));
        assert!(matches!(
            Source::parse("https://filters.example/f.wasm"),
            Ok(Source::Http(_))
        ));
        let err = Source::parse("oci://Ghcr.io/UPPER/case").err().unwrap();
        assert!(
            err.to_string().starts_with("oci://Ghcr.io/UPPER/case: "),
            "{err}"
        );
    }

    #[test]
    fn pull_policies_follow_istio() {
        let image = |url: &str| Source::parse(url).ok().unwrap();
        let latest = image("ghcr.io/acme/filter:latest");
        let tagged = image("ghcr.io/acme/filter:v1");
        let untagged = image("ghcr.io/acme/filter");
        let pinned = image(&format!(
            "ghcr.io/acme/filter:latest@sha256:{}",
            "a".repeat(64)
        ));
        let plain = image("https://filters.example/f.wasm");
        // Unspecified: IfNotPresent, except for an explicit `:latest`.
        assert!(latest.pulls_again(PullPolicy::Unspecified));
        assert!(!tagged.pulls_again(PullPolicy::Unspecified));
        assert!(!untagged.pulls_again(PullPolicy::Unspecified));
        assert!(!plain.pulls_again(PullPolicy::Unspecified));
        assert!(!latest.pulls_again(PullPolicy::IfNotPresent));
        assert!(tagged.pulls_again(PullPolicy::Always));
        assert!(plain.pulls_again(PullPolicy::Always));
        // A digest names one manifest: nothing new to pull.
        assert!(!pinned.pulls_again(PullPolicy::Always));
    }

    #[test]
    fn cached_modules_are_found_by_checksum_and_by_url() {
        let modules = RemoteModules::default();
        let url = "oci://ghcr.io/acme/filter:v1";
        let source = Source::parse(url).ok().unwrap();
        let name = source.module_name(url);
        assert_eq!(name, "ghcr.io/acme/filter");
        let digest = "b".repeat(64);
        {
            let mut cache = modules.cache.lock().unwrap();
            cache.modules.insert(
                (name.clone(), digest.clone()),
                Bytes::from_static(b"\0asm\x01\0\0\0"),
            );
            cache.checksums.insert(url.to_owned(), digest.clone());
        }
        let pull = |sha256, policy, changed| Pull {
            sha256,
            policy,
            changed,
        };
        let found = |p| modules.cached(url, &name, &source, p).is_some();
        assert!(found(pull(None, PullPolicy::Unspecified, true)));
        assert!(!found(pull(None, PullPolicy::Always, true)), "pulls again");
        assert!(found(pull(None, PullPolicy::Always, false)), "unchanged");
        assert!(
            found(pull(Some(&digest), PullPolicy::Always, true)),
            "a checksum that names a cached module is never pulled again"
        );
        // Another tag of the same repository shares the modules by digest only.
        let other = "oci://ghcr.io/acme/filter:v2";
        assert!(modules
            .cached(
                other,
                &name,
                &source,
                pull(None, PullPolicy::Unspecified, true)
            )
            .is_none());
        modules.retain(&[(other, Some(&digest))]);
        assert!(modules.get(&name, &digest).is_some(), "named by its sha256");
        modules.retain(&[(other, None)]);
        assert!(modules.get(&name, &digest).is_none());
    }
}
