//! The plugin ⇄ agent protocol: the CNI plugin (a short-lived process kubelet's runtime starts
//! for each sandbox) tells the node agent about a new pod over a Unix socket, and waits for the
//! agent's verdict. Like istio-cni (`/var/run/istio-cni/pluginevent.sock`), it is HTTP/1.1: a
//! `POST /cmdadd` or `POST /cmdcheck` with a JSON [`PodEvent`], answered `200` with a JSON
//! [`EventReply`] or with an error status and `{"error": "..."}`.
//!
//! The socket is created mode 0600: only root on the node (kubelet's runtime) may ask the agent to
//! rewrite a pod's network.

use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ambit_mesh::lifecycle::Drain;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

/// Where the agent listens by default (hostPath `/var/run/ambit` in the DaemonSet).
pub const DEFAULT_SOCKET: &str = "/var/run/ambit/pluginevent.sock";
/// Requests bigger than this are refused: an event is a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;

/// A sandbox the runtime just created (or checks), as the CNI call describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEvent {
    pub pod_name: String,
    pub pod_namespace: String,
    /// `CNI_CONTAINERID`: the sandbox.
    #[serde(default)]
    pub container_id: String,
    /// `CNI_NETNS`: the sandbox's network namespace, as a path on the node.
    pub netns: PathBuf,
    /// The pod's addresses, from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// The agent's verdict on a [`PodEvent`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventReply {
    /// True if the pod is (now) in the mesh.
    pub enrolled: bool,
    /// Why not, for a pod left out (in the plugin's log).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// Which CNI command an event is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `ADD`: enroll the pod if it belongs in the mesh.
    Add,
    /// `CHECK`: fail if the pod belongs in the mesh but is not enrolled.
    Check,
}

impl EventKind {
    fn path(self) -> &'static str {
        match self {
            EventKind::Add => "/cmdadd",
            EventKind::Check => "/cmdcheck",
        }
    }
}

/// One event, handed from the socket to whoever decides (the Kubernetes controller).
#[derive(Debug)]
pub struct PluginRequest {
    pub kind: EventKind,
    pub event: PodEvent,
    /// The verdict, or an error message for the plugin (and from it, kubelet's events).
    pub reply: oneshot::Sender<Result<EventReply, String>>,
}

/// Why talking over the plugin socket failed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("cannot listen for CNI plugin events on {}: {source}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach the ambit-cni node agent at {}: {source} (is the ambit-cni DaemonSet running on this node?)", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the ambit-cni node agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("talking to the ambit-cni node agent failed: {0}")]
    Http(#[source] hyper::Error),
    #[error("the ambit-cni node agent refused the pod ({status}): {message}")]
    Refused { status: StatusCode, message: String },
    #[error("the ambit-cni node agent sent an answer that is not JSON: {0}")]
    Decode(#[source] serde_json::Error),
}

/// Binds the plugin socket (replacing a stale one, creating its directory), mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, EventError> {
    let listen_error = |source| EventError::Listen {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen_error)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(listen_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_error)?;
    Ok(listener)
}

/// Serves plugin events from `listener` until `requests` is closed or `drain` starts, one task
/// per connection; each counts as open in `drain` until answered.
pub async fn serve(listener: UnixListener, requests: mpsc::Sender<PluginRequest>, drain: Drain) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.started() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "accepting a CNI plugin connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if requests.is_closed() {
            return;
        }
        let requests = requests.clone();
        let open = drain.track();
        tokio::spawn(async move {
            let _open = open;
            let service = hyper::service::service_fn(move |request| {
                let requests = requests.clone();
                async move { Ok::<_, Infallible>(handle(request, &requests).await) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "CNI plugin connection ended with an error");
            }
        });
    }
}

async fn handle(
    request: Request<Incoming>,
    requests: &mpsc::Sender<PluginRequest>,
) -> Response<Full<Bytes>> {
    let kind = match (request.method(), request.uri().path()) {
        (&Method::POST, "/cmdadd") => EventKind::Add,
        (&Method::POST, "/cmdcheck") => EventKind::Check,
        _ => return error_response(StatusCode::NOT_FOUND, "unknown request"),
    };
    let body = match http_body_util::Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let event: PodEvent = match serde_json::from_slice(&body) {
        Ok(event) => event,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, &format!("bad event: {e}")),
    };
    let (reply, verdict) = oneshot::channel();
    let request = PluginRequest { kind, event, reply };
    if requests.send(request).await.is_err() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down",
        );
    }
    match verdict.await {
        Ok(Ok(reply)) => json_response(StatusCode::OK, &reply),
        Ok(Err(message)) => error_response(StatusCode::INTERNAL_SERVER_ERROR, &message),
        Err(_) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent dropped the request",
        ),
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(body).expect("replies serialize");
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid response")
}

fn error_response(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json_response(status, &serde_json::json!({ "error": message }))
}

/// Sends `event` to the agent at `socket` and waits up to `timeout` for its verdict.
pub async fn send(
    socket: &Path,
    kind: EventKind,
    event: &PodEvent,
    timeout: Duration,
) -> Result<EventReply, EventError> {
    tokio::time::timeout(timeout, send_inner(socket, kind, event))
        .await
        .map_err(|_| EventError::Timeout(timeout))?
}

async fn send_inner(
    socket: &Path,
    kind: EventKind,
    event: &PodEvent,
) -> Result<EventReply, EventError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| EventError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(EventError::Http)?;
    tokio::spawn(connection);
    let body = serde_json::to_vec(event).expect("events serialize");
    let request = Request::builder()
        .method(Method::POST)
        .uri(kind.path())
        .header(http::header::HOST, "ambit-cni")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request");
    let response = sender
        .send_request(request)
        .await
        .map_err(EventError::Http)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(EventError::Http)?
        .to_bytes();
    if status != StatusCode::OK {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(EventError::Refused { status, message });
    }
    serde_json::from_slice(&body).map_err(EventError::Decode)
}
