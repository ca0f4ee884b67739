//! The operator endpoints: admin (`/config_dump`, `/logging`, `/quitquitquit`, localhost),
//! Prometheus (`/metrics`, `/stats/prometheus`) and readiness (`/healthz/ready`), on Istio's
//! ports.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ambit_mesh::identity::CertificateManager;
use ambit_mesh::lifecycle::{self, Drain};
use ambit_mesh::state::StateStore;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::inpod::InpodStatus;
use crate::metrics::Metrics;

/// What the endpoints read from.
pub struct AdminState {
    pub state: Arc<StateStore>,
    pub certificates: Arc<CertificateManager>,
    pub inpod: Arc<InpodStatus>,
    pub metrics: Arc<Metrics>,
    /// Readiness drops as soon as it starts; `/quitquitquit` starts it.
    pub drain: Drain,
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug)]
pub enum Endpoints {
    Admin,
    Stats,
    Readiness,
}

/// Serves `endpoints` on `listener` until the task is dropped (they keep answering during a
/// drain: readiness must be seen to fail).
pub async fn serve(listener: TcpListener, endpoints: Endpoints, admin: Arc<AdminState>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                if !lifecycle::accept_failed(&err, "admin").await {
                    tracing::error!(?endpoints, error = %err, "operator endpoint listener failed");
                    return;
                }
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = respond(endpoints, &admin, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(
    endpoints: Endpoints,
    admin: &AdminState,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    match (endpoints, path) {
        (Endpoints::Admin, "/config_dump") => {
            text(StatusCode::OK, "application/json", config_dump(admin))
        }
        // POST only, as Envoy and Istio's ztunnel: a stray GET (a browser, a crawler) must not
        // stop the node's proxy.
        (Endpoints::Admin, "/quitquitquit") if request.method() == Method::POST => {
            admin.drain.start("/quitquitquit");
            text(
                StatusCode::OK,
                "text/plain",
                "shutting down: draining\n".into(),
            )
        }
        (Endpoints::Admin, "/logging") if request.method() == Method::POST => {
            logging(request.uri().query())
        }
        // Reading the level is harmless, so GET shows it too (Istio's ztunnel answers 405); a
        // change still takes POST.
        (Endpoints::Admin, "/logging")
            if request.method() == Method::GET && request.uri().query().is_none() =>
        {
            logging(None)
        }
        (Endpoints::Admin, "/quitquitquit") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "/quitquitquit takes POST\n".into(),
        ),
        (Endpoints::Admin, "/logging") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "/logging changes the level on POST only (a GET without parameters shows it)\n".into(),
        ),
        (Endpoints::Stats, "/metrics" | "/stats/prometheus") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            admin.metrics.render(),
        ),
        (Endpoints::Readiness | Endpoints::Admin, "/healthz/ready") => {
            if admin.drain.is_draining() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: shutting down\n".into(),
                )
            } else if admin.inpod.is_ready() {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready: waiting for the node agent's ZDS snapshot\n".into(),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no endpoint {path}\n"),
        ),
    }
}

/// `POST /logging[?level=<level>|?reset]` ([`crate::logging`]).
fn logging(query: Option<&str>) -> Response<Full<Bytes>> {
    let mut level = None;
    let mut reset = false;
    for (key, value) in query.unwrap_or_default().split('&').filter_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        Some((key, percent_decode(value)?))
    }) {
        match key {
            "level" => level = Some(value),
            "reset" => reset = true,
            _ => {}
        }
    }
    let result = match (level, reset) {
        (Some(level), _) => crate::logging::set(Some(&level)),
        (None, true) => crate::logging::set(None),
        (None, false) => crate::logging::current(),
    };
    match result {
        Ok(filter) => text(
            StatusCode::OK,
            "text/plain",
            format!("current log level is {filter}\n"),
        ),
        Err(err @ crate::logging::LoggingError::Invalid(_)) => {
            text(StatusCode::BAD_REQUEST, "text/plain", format!("{err}\n"))
        }
        Err(err) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{err}\n"),
        ),
    }
}

/// `%3A` → `:` and `+` → space; `None` for a broken escape or non-UTF-8.
fn percent_decode(value: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(value.len());
    let mut input = value.bytes();
    while let Some(byte) = input.next() {
        match byte {
            b'%' => {
                let hex = [input.next()?, input.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
            }
            b'+' => bytes.push(b' '),
            other => bytes.push(other),
        }
    }
    String::from_utf8(bytes).ok()
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The whole state as JSON: workloads, services, policies, certificates and pods.
pub fn config_dump(admin: &AdminState) -> String {
    let snapshot = admin.state.load();
    let mut workloads: Vec<_> = snapshot.workloads().map(|w| w.as_ref()).collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<_> = snapshot.services().map(|s| s.as_ref()).collect();
    services.sort_by_key(|s| s.key());
    let mut policies: Vec<_> = snapshot.policies().iter().collect();
    policies.sort_by_key(|p| p.key());
    let now = SystemTime::now();
    let mut identities = admin.certificates.identities();
    identities.sort();
    let certificates: Vec<_> = identities
        .iter()
        .filter_map(|id| admin.certificates.current(id))
        .map(|cert| {
            json!({
                "identity": cert.identity().to_string(),
                "notBefore": seconds(cert.not_before()),
                "notAfter": seconds(cert.not_after()),
                "expiresInSeconds": cert.not_after().duration_since(now).unwrap_or_default().as_secs(),
                "chainLength": cert.chain().len(),
            })
        })
        .collect();
    let dump = json!({
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "certificates": certificates,
        "pods": admin.inpod.pods(),
        "ready": admin.inpod.is_ready(),
    });
    serde_json::to_string_pretty(&dump).expect("state serializes")
}
