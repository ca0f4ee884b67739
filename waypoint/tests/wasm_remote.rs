//! WasmPlugins whose `url` is `https://` (or `http://`): the module is fetched from a real HTTPS
//! server (rustls, certificates from a test CA handed over in `AMBIT_WASM_CA_FILE`) and filters
//! requests through a real waypoint. A wrong `sha256`, an untrusted server and a missing module
//! keep a fail-closed plugin from loading (its requests are refused); `IfNotPresent` reuses a
//! fetched module and `Always` fetches it again. Fixture: `support/l7mesh.rs`, nets
//! 127.78.{14,15,16}.x.

#[path = "support/fetched.rs"]
mod fetched;
#[path = "support/l7mesh.rs"]
mod l7mesh;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ambit_waypoint::proxy::ProxySettings;
use bytes::Bytes;
use fetched::{pki, plugin, trusted, wait_for_tag, TestPki};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use l7mesh::{write_config, L7Mesh};
use tokio::net::TcpListener;

/// An HTTPS server with `pki`'s certificate: `/headers.wasm` is the example headers filter,
/// `/moved.wasm` redirects to it, anything else is 404. Counts the module downloads.
struct ModuleServer {
    address: SocketAddr,
    downloads: Arc<AtomicUsize>,
}

async fn serve_modules(pki: &TestPki, module: PathBuf) -> ModuleServer {
    let acceptor = pki.acceptor();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let downloads = Arc::new(AtomicUsize::new(0));
    let module = Bytes::from(std::fs::read(module).unwrap());
    let counter = downloads.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, module, counter) = (acceptor.clone(), module.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let (module, counter) = (module.clone(), counter.clone());
                    async move {
                        let response = match request.uri().path() {
                            "/headers.wasm" => {
                                counter.fetch_add(1, Ordering::SeqCst);
                                Response::new(Full::new(module))
                            }
                            "/moved.wasm" => Response::builder()
                                .status(StatusCode::FOUND)
                                .header("location", "/headers.wasm")
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                            _ => Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    ModuleServer { address, downloads }
}

fn module() -> PathBuf {
    ambit_wasm_host::testing::build_filter("ambit-filter-headers")
}

fn sha256(path: &PathBuf) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(std::fs::read(path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_module_loads_is_cached_and_refetched_when_always() {
    let server = serve_modules(trusted(), module()).await;
    let url = format!("https://{}/moved.wasm", server.address);
    let digest = sha256(&module());
    let config = plugin(&url, &format!("  sha256: {digest}\n"), "v1");
    let mesh = L7Mesh::start(14, &config, ProxySettings::default()).await;
    let (status, seen) = wait_for_tag(&mesh, "v1").await;
    assert_eq!(
        (status, seen.as_str()),
        (StatusCode::OK, "v1"),
        "fetched over https (through a redirect) and in force"
    );
    assert_eq!(server.downloads.load(Ordering::SeqCst), 1);

    // A new configuration of the same module: IfNotPresent (the default) reuses it.
    write_config(&mesh.config_path, &plugin(&url, "", "v2"));
    assert_eq!(wait_for_tag(&mesh, "v2").await.1, "v2");
    assert_eq!(
        server.downloads.load(Ordering::SeqCst),
        1,
        "not fetched again"
    );

    // Always fetches on every change.
    write_config(
        &mesh.config_path,
        &plugin(&url, "  imagePullPolicy: Always\n", "v3"),
    );
    assert_eq!(wait_for_tag(&mesh, "v3").await.1, "v3");
    assert_eq!(server.downloads.load(Ordering::SeqCst), 2, "fetched again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_digest_or_a_missing_module_keeps_a_fail_closed_plugin_out() {
    let server = serve_modules(trusted(), module()).await;
    let wrong = "0".repeat(64);
    let config = plugin(
        &format!("https://{}/headers.wasm", server.address),
        &format!("  sha256: {wrong}\n"),
        "never",
    );
    let mesh = L7Mesh::start(15, &config, ProxySettings::default()).await;
    let (status, _, body) = mesh.get("/", &[]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body, "WasmPlugin default.remote is not running");

    // A 404 is no module either.
    write_config(
        &mesh.config_path,
        &plugin(
            &format!("https://{}/gone.wasm", server.address),
            "",
            "never",
        ),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, _, _) = mesh.get("/", &[]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_the_waypoint_does_not_trust_is_refused() {
    trusted();
    // Same module, but a certificate from a CA nobody named.
    let stranger = serve_modules(&pki(), module()).await;
    let config = plugin(
        &format!("https://{}/headers.wasm", stranger.address),
        "",
        "never",
    );
    let mesh = L7Mesh::start(16, &config, ProxySettings::default()).await;
    let (status, _, body) = mesh.get("/", &[]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(
        stranger.downloads.load(Ordering::SeqCst),
        0,
        "nothing was fetched"
    );
}
