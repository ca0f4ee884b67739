//! WasmPlugins whose module is an OCI image (`oci://`, or a url without a scheme): a real
//! waypoint pulls it from a registry stand-in that speaks the distribution API over HTTPS (a
//! test CA handed over in `AMBIT_WASM_CA_FILE`): `401` with a bearer challenge, an anonymous
//! token from the realm, manifests (images and an index) and blobs (behind a redirect to
//! storage, as registries do), every request counted. Both of Istio's image formats load and
//! filter requests end to end; a `sha256` that is not the image's digest, a layer that does not
//! match its digest and an untrusted registry keep a fail-closed plugin out (its requests are
//! refused); the pull policies decide what is pulled again; a registry answering in plain HTTP
//! is asked again over HTTP, as Istio does. A registry that is not up yet (refusing
//! connections, then answering 503) is pulled from again until it answers, with no
//! configuration change; a digest mismatch is reported and not pulled again. `https://`
//! modules: `wasm_remote.rs`. Fixture: `support/l7mesh.rs`, nets 127.78.{40..45,86}.x.

#[path = "support/fetched.rs"]
mod fetched;
#[path = "support/l7mesh.rs"]
mod l7mesh;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_local::manifest::Object;
use ambit_wasm_host::PluginHooks;
use ambit_waypoint::l7::WaypointName;
use ambit_waypoint::proxy::ProxySettings;
use ambit_waypoint::wasm::WasmFilters;
use bytes::Bytes;
use fetched::{pki, plugin, trusted, wait_for_tag, TestPki};
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use l7mesh::{write_config, L7Mesh};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const SERVICE: &str = "ambit-test-registry";

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// A manifest (or index) and the blobs it names.
struct Image {
    media_type: &'static str,
    manifest: Bytes,
    blobs: Vec<(String, Bytes)>,
}

impl Image {
    /// The hex digest a plugin's `sha256` names the image by.
    fn digest(&self) -> String {
        sha256_hex(&self.manifest)
    }
}

fn descriptor(media_type: &str, blob: &[u8]) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": digest(blob), "size": blob.len()})
}

/// Istio's OCI artifact variant: a config and a layer that is the module.
fn artifact_image(module: &Bytes) -> Image {
    let config = Bytes::from_static(b"{}");
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.module.wasm.config.v1+json", &config),
        "layers": [descriptor(WASM_LAYER, module)],
    });
    Image {
        media_type: OCI_MANIFEST,
        manifest: serde_json::to_vec(&manifest).unwrap().into(),
        blobs: vec![(digest(&config), config), (digest(module), module.clone())],
    }
}

/// A gzipped tar holding `plugin.wasm` (beside another file), as `docker build` makes it from
/// `FROM scratch` + `COPY`.
fn plugin_layer(module: &Bytes) -> Bytes {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in [("LICENSE", &b"Apache-2.0"[..]), ("plugin.wasm", module)] {
        let mut header = tar::Header::new_ustar();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, path, content).unwrap();
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&builder.into_inner().unwrap()).unwrap();
    gz.finish().unwrap().into()
}

/// Istio's "compat" variant as Docker pushes it.
fn docker_image(module: &Bytes) -> Image {
    let layer = plugin_layer(module);
    let config = Bytes::from_static(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor("application/vnd.docker.container.image.v1+json", &config),
        "layers": [descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", &layer)],
    });
    Image {
        media_type: DOCKER_MANIFEST,
        manifest: serde_json::to_vec(&manifest).unwrap().into(),
        blobs: vec![(digest(&config), config), (digest(&layer), layer)],
    }
}

/// The "compat" variant in OCI types behind an index, with an attestation beside it as
/// BuildKit pushes it: the index, and the image it leads to.
fn indexed_oci_image(module: &Bytes) -> (Image, Image) {
    let layer = plugin_layer(module);
    let config = Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer)],
    });
    let image = Image {
        media_type: OCI_MANIFEST,
        manifest: serde_json::to_vec(&manifest).unwrap().into(),
        blobs: vec![(digest(&config), config), (digest(&layer), layer)],
    };
    let attestation = Bytes::from_static(b"{\"schemaVersion\":2,\"layers\":[]}");
    let mut image_entry = descriptor(OCI_MANIFEST, &image.manifest);
    image_entry["platform"] = json!({"os": "linux", "architecture": "amd64"});
    let mut attestation_entry = descriptor(OCI_MANIFEST, &attestation);
    attestation_entry["platform"] = json!({"os": "unknown", "architecture": "unknown"});
    let index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [attestation_entry, image_entry],
    });
    let index = Image {
        media_type: OCI_INDEX,
        manifest: serde_json::to_vec(&index).unwrap().into(),
        blobs: Vec::new(),
    };
    (index, image)
}

/// `(repository, tag or digest)` → (media type, manifest).
type Manifests = HashMap<(String, String), (&'static str, Bytes)>;

#[derive(Default)]
struct RegistryState {
    manifests: Mutex<Manifests>,
    blobs: Mutex<HashMap<String, Bytes>>,
    /// Manifests and blobs served (200), tokens issued, requests refused for want of a token.
    manifests_served: AtomicUsize,
    blobs_served: AtomicUsize,
    tokens: AtomicUsize,
    challenged: AtomicUsize,
    /// Every request, TLS or not, that reached the HTTP layer.
    requests: AtomicUsize,
    /// The token endpoint refuses anonymous requests (a private image).
    private: AtomicBool,
    /// Every request is answered 503 (a registry whose storage is not up yet).
    unavailable: AtomicBool,
}

/// The registry stand-in: `https://127.0.0.1:<port>` (or plain HTTP without a certificate).
struct Registry {
    address: SocketAddr,
    state: Arc<RegistryState>,
}

impl Registry {
    async fn start(pki: Option<&TestPki>) -> Registry {
        Registry::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), pki)
    }

    fn serve(listener: TcpListener, pki: Option<&TestPki>) -> Registry {
        let acceptor = pki.map(TestPki::acceptor);
        let address = listener.local_addr().unwrap();
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let realm = format!("{scheme}://{address}/token");
        let state = Arc::new(RegistryState::default());
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, state, realm) = (acceptor.clone(), shared.clone(), realm.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<_>| {
                        let response = answer(&state, &realm, &request);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Registry { address, state }
    }

    /// Stores `image` under `repository:tag` (and its digest), with its blobs.
    fn push(&self, repository: &str, tag: &str, image: &Image) {
        let mut manifests = self.state.manifests.lock().unwrap();
        for reference in [tag.to_owned(), digest(&image.manifest)] {
            manifests.insert(
                (repository.to_owned(), reference),
                (image.media_type, image.manifest.clone()),
            );
        }
        let mut blobs = self.state.blobs.lock().unwrap();
        for (digest, blob) in &image.blobs {
            blobs.insert(digest.clone(), blob.clone());
        }
    }

    /// Replaces the blob stored under `digest` (a registry serving corrupt data).
    fn corrupt(&self, digest: &str, replacement: Bytes) {
        self.state
            .blobs
            .lock()
            .unwrap()
            .insert(digest.to_owned(), replacement);
    }

    fn counts(&self) -> (usize, usize, usize) {
        (
            self.state.manifests_served.load(Ordering::SeqCst),
            self.state.blobs_served.load(Ordering::SeqCst),
            self.state.tokens.load(Ordering::SeqCst),
        )
    }
}

fn status(status: StatusCode) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// The distribution API's pull side: `/v2/<repository>/manifests/<reference>` and
/// `/v2/<repository>/blobs/<digest>` want `Bearer token-for:<repository>`, given by `/token` for
/// the scope `repository:<repository>:pull`; blobs answer with a redirect to `/storage/`.
fn answer<B>(state: &RegistryState, realm: &str, request: &Request<B>) -> Response<Full<Bytes>> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    if state.unavailable.load(Ordering::SeqCst) {
        return status(StatusCode::SERVICE_UNAVAILABLE);
    }
    let path = request.uri().path();
    if path == "/token" {
        let query: HashMap<String, String> = request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_owned(), percent_decode(v)))
            .collect();
        let Some(repository) = query
            .get("scope")
            .and_then(|s| s.strip_prefix("repository:"))
            .and_then(|s| s.strip_suffix(":pull"))
        else {
            return status(StatusCode::BAD_REQUEST);
        };
        if query.get("service").map(String::as_str) != Some(SERVICE) {
            return status(StatusCode::BAD_REQUEST);
        }
        if state.private.load(Ordering::SeqCst) {
            return status(StatusCode::UNAUTHORIZED);
        }
        state.tokens.fetch_add(1, Ordering::SeqCst);
        let body = json!({"token": format!("token-for:{repository}"), "expires_in": 300});
        return Response::new(Full::new(serde_json::to_vec(&body).unwrap().into()));
    }
    if let Some(digest) = path.strip_prefix("/storage/") {
        let blob = state.blobs.lock().unwrap().get(digest).cloned();
        return match blob {
            Some(blob) => {
                state.blobs_served.fetch_add(1, Ordering::SeqCst);
                Response::new(Full::new(blob))
            }
            None => status(StatusCode::NOT_FOUND),
        };
    }
    let Some(api) = path.strip_prefix("/v2/") else {
        return status(StatusCode::NOT_FOUND);
    };
    let (repository, kind, reference) = if let Some((r, m)) = api.rsplit_once("/manifests/") {
        (r, "manifests", m)
    } else if let Some((r, b)) = api.rsplit_once("/blobs/") {
        (r, "blobs", b)
    } else {
        return status(StatusCode::NOT_FOUND);
    };
    let authorized = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(format!("Bearer token-for:{repository}").as_str());
    if !authorized {
        state.challenged.fetch_add(1, Ordering::SeqCst);
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(
                "www-authenticate",
                format!(
                    r#"Bearer realm="{realm}",service="{SERVICE}",scope="repository:{repository}:pull""#
                ),
            )
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    if kind == "blobs" {
        return Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header("location", format!("/storage/{reference}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    let manifest = state
        .manifests
        .lock()
        .unwrap()
        .get(&(repository.to_owned(), reference.to_owned()))
        .cloned();
    match manifest {
        Some((media_type, body)) => {
            state.manifests_served.fetch_add(1, Ordering::SeqCst);
            Response::builder()
                .header("content-type", media_type)
                .header("docker-content-digest", digest(&body))
                .body(Full::new(body))
                .unwrap()
        }
        None => status(StatusCode::NOT_FOUND),
    }
}

fn module_path() -> PathBuf {
    ambit_wasm_host::testing::build_filter("ambit-filter-headers")
}

fn module() -> Bytes {
    std::fs::read(module_path()).unwrap().into()
}

/// Writes `config` and waits for the plugin it configures (`x-test: tag`) to be in force.
async fn apply(mesh: &L7Mesh, config: &str, tag: &str) {
    write_config(&mesh.config_path, config);
    assert_eq!(
        wait_for_tag(mesh, tag).await,
        (StatusCode::OK, tag.to_owned()),
        "{config}"
    );
}

/// Why the plugins of `config` do not load, as the waypoint reports it (from a plugin set of
/// its own, beside the mesh's).
fn load_errors(config: &str) -> Vec<String> {
    let plugins: Vec<_> = ambit_local::manifest::parse(config)
        .unwrap()
        .into_iter()
        .filter_map(|object| match object {
            Object::WasmPlugin(plugin) => Some(plugin),
            _ => None,
        })
        .collect();
    let me = WaypointName {
        namespace: "default".into(),
        gateway: "waypoint".into(),
    };
    WasmFilters::new(PluginHooks::default(), "default")
        .update(&plugins, &me)
        .iter()
        .map(|e| e.to_string())
        .collect()
}

fn assert_error(config: &str, wanted: &str) {
    let errors = load_errors(config);
    assert!(
        errors.len() == 1 && errors[0].contains(wanted),
        "wanted {wanted:?} in {errors:?}"
    );
}

/// The plugin is not running and, fail-closed, refuses its requests.
async fn assert_refused(mesh: &L7Mesh) {
    let (status, _, body) = mesh.get("/", &[]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body, "WasmPlugin default.remote is not running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oci_artifact_loads_through_a_token_challenge_and_pull_policies_apply() {
    let registry = Registry::start(Some(trusted())).await;
    let module = module();
    registry.push("wasm/artifact", "v1", &artifact_image(&module));
    // No scheme: an image reference, as in Istio.
    let url = format!("{}/wasm/artifact:v1", registry.address);
    let mesh = L7Mesh::start(40, &plugin(&url, "", "v1"), ProxySettings::default()).await;
    assert_eq!(
        wait_for_tag(&mesh, "v1").await,
        (StatusCode::OK, "v1".to_owned()),
        "pulled and in force"
    );
    assert_eq!(
        registry.counts(),
        (1, 1, 1),
        "one manifest, one layer, one token"
    );
    assert!(registry.state.challenged.load(Ordering::SeqCst) >= 1);

    // The plugin changes, the policy is unspecified (IfNotPresent for a tag other than latest):
    // nothing is pulled.
    apply(&mesh, &plugin(&url, "", "v2"), "v2").await;
    assert_eq!(registry.counts(), (1, 1, 1), "not pulled again");

    // Always pulls the manifest again; its digest is the module already held.
    apply(
        &mesh,
        &plugin(&url, "  imagePullPolicy: Always\n", "v3"),
        "v3",
    )
    .await;
    assert_eq!(registry.counts(), (2, 1, 2), "manifest pulled, layer not");

    // The tag moves to a new image (Docker format): Always brings it.
    registry.push("wasm/artifact", "v1", &docker_image(&module));
    apply(
        &mesh,
        &plugin(&url, "  imagePullPolicy: Always\n", "v4"),
        "v4",
    )
    .await;
    assert_eq!(registry.counts(), (3, 2, 3), "the new image pulled");

    // `:latest` with no policy pulls whenever the plugin changes; IfNotPresent does not.
    registry.push("wasm/artifact", "latest", &artifact_image(&module));
    let latest = format!("oci://{}/wasm/artifact:latest", registry.address);
    apply(&mesh, &plugin(&latest, "", "v5"), "v5").await;
    assert_eq!(registry.counts().0, 4);
    apply(&mesh, &plugin(&latest, "", "v6"), "v6").await;
    assert_eq!(registry.counts().0, 5, "latest pulled again");
    apply(
        &mesh,
        &plugin(&latest, "  imagePullPolicy: IfNotPresent\n", "v7"),
        "v7",
    )
    .await;
    assert_eq!(registry.counts().0, 5, "IfNotPresent keeps it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_and_indexed_oci_images_with_plugin_wasm_load() {
    let registry = Registry::start(Some(trusted())).await;
    let module = module();
    let docker = docker_image(&module);
    registry.push("filters/docker", "1.0", &docker);
    let (index, image) = indexed_oci_image(&module);
    registry.push("filters/indexed", "1.0", &index);
    registry.push("filters/indexed", "unused", &image);

    // The plugin's sha256 is the image's (manifest) digest.
    let url = format!("oci://{}/filters/docker:1.0", registry.address);
    let config = plugin(&url, &format!("  sha256: {}\n", docker.digest()), "docker");
    let mesh = L7Mesh::start(41, &config, ProxySettings::default()).await;
    assert_eq!(
        wait_for_tag(&mesh, "docker").await,
        (StatusCode::OK, "docker".to_owned())
    );
    assert_eq!(registry.counts(), (1, 1, 1));

    // An index: the linux/amd64 image is taken, not the attestation; its digest is the one
    // `sha256` names.
    let url = format!("oci://{}/filters/indexed:1.0", registry.address);
    let config = plugin(&url, &format!("  sha256: {}\n", image.digest()), "indexed");
    apply(&mesh, &config, "indexed").await;
    assert_eq!(registry.counts(), (3, 2, 2), "index, image, layer");

    // Pinned by the index's digest: the same image.
    let url = format!(
        "{}/filters/indexed@sha256:{}",
        registry.address,
        index.digest()
    );
    apply(&mesh, &plugin(&url, "", "pinned"), "pinned").await;
    assert_eq!(registry.counts().1, 2, "the module held is reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sha256_that_is_not_the_images_digest_is_refused_before_the_layer_is_pulled() {
    let registry = Registry::start(Some(trusted())).await;
    let module = module();
    registry.push("wasm/artifact", "v1", &artifact_image(&module));
    // The module's own sha256: right for a file or an https URL, wrong for an image.
    let url = format!("oci://{}/wasm/artifact:v1", registry.address);
    let config = plugin(
        &url,
        &format!("  sha256: {}\n", sha256_hex(&module)),
        "never",
    );
    let mesh = L7Mesh::start(42, &config, ProxySettings::default()).await;
    assert_refused(&mesh).await;
    assert_eq!(registry.counts(), (1, 0, 1), "the manifest only");
    let image = artifact_image(&module).digest();
    let wanted = format!("the image's digest is sha256:{image}, but the plugin's sha256 is");
    // Reported, and not pulled again: a retry would bring the same image. Longer than the
    // first two retries of a fetch that failed for want of a server.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(registry.counts(), (1, 0, 1), "never pulled again");
    assert_error(&config, &wanted);
    let metrics = mesh.metrics().await;
    assert!(
        metrics.contains(r#"ambit_wasm_plugin_state{plugin="default.remote",state="failed"} 1"#)
            && metrics.contains(r#"ambit_wasm_plugin_failures{plugin="default.remote"} 1"#)
            && metrics.lines().any(|l| l
                .starts_with(r#"ambit_wasm_plugin_last_error{plugin="default.remote",error="#)
                && l.contains(&wanted)),
        "{metrics}"
    );
    assert_refused(&mesh).await;
}

/// The value of the sample `line_start` (a metric and its labels), if present.
fn sample(metrics: &str, line_start: &str) -> Option<u64> {
    metrics
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_starts_after_the_waypoint_is_pulled_from_once_it_answers() {
    trusted();
    // An address nobody listens on yet: the registry's pod is still starting.
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("oci://{address}/wasm/late:v1");
    let mesh = L7Mesh::start(86, &plugin(&url, "", "late"), ProxySettings::default()).await;
    assert_refused(&mesh).await;
    let failures = r#"ambit_wasm_plugin_failures{plugin="default.remote"} "#;
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = mesh.metrics().await;
        if sample(&metrics, failures).unwrap_or(0) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sample(&metrics, failures).unwrap_or(0) >= 2
            && metrics
                .contains(r#"ambit_wasm_plugin_state{plugin="default.remote",state="retrying"} 1"#)
            && metrics.contains("Connection refused"),
        "fetched again, with the reason reported: {metrics}"
    );

    // The registry comes up, still answering 503 at first: the waypoint keeps trying.
    let registry = Registry::serve(TcpListener::bind(address).await.unwrap(), Some(trusted()));
    registry.state.unavailable.store(true, Ordering::SeqCst);
    registry.push("wasm/late", "v1", &artifact_image(&module()));
    for _ in 0..150 {
        if registry.state.requests.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(registry.state.requests.load(Ordering::SeqCst) > 0);
    assert_refused(&mesh).await;
    let metrics = mesh.metrics().await;
    assert!(
        metrics.contains("answered 503 Service Unavailable"),
        "{metrics}"
    );

    // It answers: the plugin is in force at the next retry (at most the backoff's cap later),
    // with no configuration change.
    registry.state.unavailable.store(false, Ordering::SeqCst);
    let answering = std::time::Instant::now();
    let mut seen = (StatusCode::OK, String::new());
    while answering.elapsed() < Duration::from_secs(15) {
        seen = wait_for_tag(&mesh, "late").await;
        if seen.1 == "late" {
            break;
        }
    }
    let took = answering.elapsed();
    assert_eq!(seen, (StatusCode::OK, "late".to_owned()));
    assert!(
        took < ambit_waypoint::wasm::RETRY_MAX + Duration::from_secs(2),
        "in force {took:?} after the registry answered"
    );
    assert_eq!(registry.counts(), (1, 1, 1), "pulled once it answered");
    let metrics = mesh.metrics().await;
    assert!(
        metrics.contains(r#"ambit_wasm_plugin_state{plugin="default.remote",state="running"} 1"#)
            && metrics.contains(r#"ambit_wasm_plugin_failures{plugin="default.remote"} 0"#)
            && !metrics.contains("ambit_wasm_plugin_last_error{"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_that_does_not_match_its_digest_is_refused() {
    let registry = Registry::start(Some(trusted())).await;
    let module = module();
    registry.push("wasm/artifact", "v1", &artifact_image(&module));
    // A valid module, but not the one the manifest names.
    let mut other = module.to_vec();
    other.extend_from_slice(&[0, 4, b'n', b'o', b'p', b'e', 0]);
    registry.corrupt(&digest(&module), other.into());
    let url = format!("oci://{}/wasm/artifact:v1", registry.address);
    let config = plugin(&url, "", "never");
    let mesh = L7Mesh::start(43, &config, ProxySettings::default()).await;
    assert_refused(&mesh).await;
    assert_eq!(registry.counts(), (1, 1, 1), "downloaded, then refused");
    assert_error(
        &config,
        &format!("the layer {} arrived with digest", digest(&module)),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_the_waypoint_does_not_trust_is_refused() {
    trusted();
    // A certificate from a CA nobody named.
    let stranger = Registry::start(Some(&pki())).await;
    stranger.push("wasm/artifact", "v1", &artifact_image(&module()));
    let url = format!("oci://{}/wasm/artifact:v1", stranger.address);
    let config = plugin(&url, "", "never");
    let mesh = L7Mesh::start(44, &config, ProxySettings::default()).await;
    assert_refused(&mesh).await;
    assert_error(&config, "TLS: invalid peer certificate");
    assert_eq!(
        stranger.state.requests.load(Ordering::SeqCst),
        0,
        "no request got past the handshake"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_wants_credentials_is_reported_as_such() {
    let registry = Registry::start(Some(trusted())).await;
    registry.push("wasm/private", "v1", &artifact_image(&module()));
    registry.state.private.store(true, Ordering::SeqCst);
    let url = format!("oci://{}/wasm/private:v1", registry.address);
    assert_error(
        &plugin(&url, "", "never"),
        "wants credentials: this waypoint pulls images anonymously",
    );
    assert_eq!(registry.counts(), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_speaking_plain_http_is_asked_again_over_http() {
    trusted();
    let registry = Registry::start(None).await;
    registry.push("wasm/artifact", "v1", &artifact_image(&module()));
    let url = format!("oci://{}/wasm/artifact:v1", registry.address);
    let mesh = L7Mesh::start(45, &plugin(&url, "", "plain"), ProxySettings::default()).await;
    assert_eq!(
        wait_for_tag(&mesh, "plain").await,
        (StatusCode::OK, "plain".to_owned())
    );
    assert_eq!(registry.counts(), (1, 1, 1));
}
