//! The operator endpoints: admin (`/config_dump`, localhost), Prometheus (`/metrics`,
//! `/stats/prometheus`) and readiness (`/healthz/ready`), on Istio's ports.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ambit_mesh::identity::CertificateManager;
use ambit_mesh::state::StateStore;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
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
}

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug)]
pub enum Endpoints {
    Admin,
    Stats,
    Readiness,
}

/// Serves `endpoints` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, endpoints: Endpoints, admin: Arc<AdminState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = respond(endpoints, &admin, request.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(endpoints: Endpoints, admin: &AdminState, path: &str) -> Response<Full<Bytes>> {
    match (endpoints, path) {
        (Endpoints::Admin, "/config_dump") => {
            text(StatusCode::OK, "application/json", config_dump(admin))
        }
        (Endpoints::Stats, "/metrics" | "/stats/prometheus") => text(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            admin.metrics.render(),
        ),
        (Endpoints::Readiness | Endpoints::Admin, "/healthz/ready") => {
            if admin.inpod.is_ready() {
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
