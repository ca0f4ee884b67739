//! The node agent's health endpoints, as istio-cni serves them (on port 8000): `/healthz`
//! (liveness: 200 while the process serves) and `/readyz` (readiness). Ready only once every
//! [condition](Health::require) holds: in `ambit-cni agent`, the Kubernetes watches have listed
//! once and the ZDS socket listens (istio-cni's "watch ready"), and the plugin is chained into the
//! node's CNI configuration (its "install ready"). Not ready again the moment a drain starts, so
//! the DaemonSet's rollout waits for the replacement rather than for the process to exit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use ambit_mesh::lifecycle::{self, Drain};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// istio-cni's readiness port, on every address.
pub const DEFAULT_ADDRESS: &str = "0.0.0.0:8000";
/// Liveness (istio-cni's path).
pub const LIVENESS_PATH: &str = "/healthz";
/// Readiness (istio-cni's path).
pub const READINESS_PATH: &str = "/readyz";

/// Why the health endpoints cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot listen for health probes on {address}: {source} (the agent runs on the host network: is another process using the port? set AMBIT_READINESS_ADDRESS)")]
    Listen {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

type Condition = Box<dyn Fn() -> bool + Send + Sync>;

/// What readiness waits for. Cloning shares it.
#[derive(Clone)]
pub struct Health {
    drain: Drain,
    /// Each with what the operator is told while it does not hold.
    conditions: Arc<Vec<(&'static str, Condition)>>,
}

impl Health {
    /// Ready until `drain` starts, once the [conditions](Self::require) hold.
    pub fn new(drain: Drain) -> Self {
        Health {
            drain,
            conditions: Arc::default(),
        }
    }

    /// Adds a condition; `waiting` says what is awaited while it is false. Conditions are added
    /// before the health is shared.
    pub fn require(
        mut self,
        waiting: &'static str,
        condition: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        Arc::get_mut(&mut self.conditions)
            .expect("conditions are added before the health is shared")
            .push((waiting, Box::new(condition)));
        self
    }

    /// `Ok` when ready, else why not.
    pub fn ready(&self) -> Result<(), String> {
        if self.drain.is_draining() {
            return Err("shutting down".into());
        }
        let waiting: Vec<&str> = self
            .conditions
            .iter()
            .filter(|(_, holds)| !holds())
            .map(|(waiting, _)| *waiting)
            .collect();
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(format!("waiting for {}", waiting.join(", ")))
        }
    }
}

/// Binds the health endpoints' listener (at start, so a taken port fails the agent at once).
pub async fn bind(address: SocketAddr) -> Result<TcpListener, HealthError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| HealthError::Listen { address, source })
}

/// Serves the endpoints on `listener` until the task is dropped; they keep answering during a
/// drain, so that the kubelet sees readiness fail.
pub async fn serve(listener: TcpListener, health: Health) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                if !lifecycle::accept_failed(&err, "health").await {
                    tracing::error!(error = %err, "health endpoint listener failed");
                    return;
                }
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = respond(&health, request.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(health: &Health, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        LIVENESS_PATH => (StatusCode::OK, "ok\n".to_owned()),
        READINESS_PATH => match health.ready() {
            Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => (StatusCode::NOT_FOUND, format!("no endpoint {path}\n")),
    };
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn ready_once_every_condition_holds_and_never_while_draining() {
        let drain = Drain::default();
        let synced = Arc::new(AtomicBool::new(false));
        let flag = synced.clone();
        let health = Health::new(drain.clone())
            .require("the watch", move || flag.load(Ordering::SeqCst))
            .require("nothing", || true);
        assert_eq!(health.ready(), Err("waiting for the watch".into()));
        synced.store(true, Ordering::SeqCst);
        assert_eq!(health.ready(), Ok(()));
        drain.start("SIGTERM");
        assert_eq!(health.ready(), Err("shutting down".into()));
    }
}
