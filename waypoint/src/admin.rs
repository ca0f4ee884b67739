//! The operator endpoints: Prometheus (`/metrics`, `/stats/prometheus`) on 15020 and readiness
//! (`/healthz/ready`) on 15021, Istio's waypoint ports.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use ambit_mesh::lifecycle::{self, Drain};

use crate::metrics::Metrics;

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug)]
pub enum Endpoints {
    Stats,
    Readiness,
}

/// Serves `endpoints` on `listener` until the task is dropped (they keep answering during a
/// drain: readiness must be seen to fail).
pub async fn serve(
    listener: TcpListener,
    endpoints: Endpoints,
    metrics: Arc<Metrics>,
    drain: Drain,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                if !lifecycle::accept_failed(&err, "operator endpoint").await {
                    tracing::error!(?endpoints, error = %err, "operator endpoint listener failed");
                    return;
                }
                continue;
            }
        };
        let metrics = metrics.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = respond(endpoints, &metrics, &drain, request.uri().path());
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
    metrics: &Metrics,
    drain: &Drain,
    path: &str,
) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (endpoints, path) {
        (Endpoints::Stats, "/metrics" | "/stats/prometheus") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        (Endpoints::Readiness, "/healthz/ready") if drain.is_draining() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: shutting down\n".to_owned(),
        ),
        (Endpoints::Readiness, "/healthz/ready") => {
            (StatusCode::OK, "text/plain", "ready\n".to_owned())
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no endpoint {path}\n"),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}
