//! Forwarding one request: pick an endpoint of the addressed service (round robin over healthy
//! endpoints), open an HBONE tunnel to its `podIP:15008` as the waypoint, send the request over
//! HTTP/1.1 inside it and stream the response back.
//!
//! Istio's default route applies: 2 retries when the endpoint cannot be reached (connect
//! failure, refused tunnel), each to an endpoint not tried yet when there is one, and no timeout
//! unless one is configured. Failures are answered the way Envoy answers them (503 `UF,URX`,
//! 503 `UH`, 504 `UT`, ...), with the same response flags in the metrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ambit_mesh::hbone::client::{ClientError, TunnelRequest};
use ambit_mesh::hbone::server::Upstream;
use ambit_mesh::hbone::{ConnectHeaders, HBONE_PORT};
use ambit_mesh::state::{Destination, Protocol, Service, Snapshot, Workload};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::{full, header_bytes, BoxBody, Completion, CountingBody, ObservedBody};
use super::inbound::TunnelInfo;
use super::Context;
use crate::metrics::RequestLabels;

/// How many picks may be spent looking for an endpoint not tried yet (Envoy's
/// `host_selection_retry_max_attempts`, as Istio sets it).
const HOST_SELECTION_ATTEMPTS: usize = 5;

/// Connection-specific headers that never cross a proxy (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A reply the waypoint makes itself.
#[derive(Debug)]
struct LocalReply {
    status: StatusCode,
    flags: &'static str,
    body: String,
}

impl LocalReply {
    fn new(status: StatusCode, flags: &'static str, body: impl Into<String>) -> Self {
        LocalReply {
            status,
            flags,
            body: body.into(),
        }
    }
}

/// Serves one request from a tunnel: forwards it and records its metrics when the response ends.
pub async fn serve(
    context: Arc<Context>,
    tunnel: Arc<TunnelInfo>,
    request: Request<Incoming>,
) -> Result<Response<ObservedBody>, Infallible> {
    let start = Instant::now();
    let grpc = is_grpc(request.headers());
    let mut labels = RequestLabels {
        source: tunnel.source.clone(),
        source_principal: Some(tunnel.connect.peer_identity.clone()),
        request_protocol: if grpc { "grpc" } else { "http" },
        ..Default::default()
    };
    let request_bytes = Arc::new(AtomicU64::new(header_bytes(request.headers())));
    let (parts, body) = request.into_parts();
    let body = CountingBody::new(body.boxed_unsync(), request_bytes.clone()).boxed_unsync();
    let attempt = forward(&context, &tunnel, parts, body, &mut labels);
    let result = match context.settings.request_timeout {
        Some(timeout) => tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(LocalReply::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout",
                ))
            }),
        None => attempt.await,
    };
    let (mut response, flags) = match result {
        Ok(response) => (response.map(BodyExt::boxed_unsync), "-"),
        Err(reply) => {
            tracing::debug!(target = %tunnel.connect.target, status = %reply.status, flags = reply.flags, "local reply");
            let response = Response::builder()
                .status(reply.status)
                .header(header::CONTENT_TYPE, "text/plain")
                .body(full(reply.body))
                .expect("static response parts are valid");
            (response, reply.flags)
        }
    };
    strip_hop_by_hop(response.headers_mut());
    labels.response_code = response.status().as_u16();
    labels.response_flags = flags.to_owned();
    if grpc {
        labels.grpc_response_status = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
    }
    let response_header_bytes = header_bytes(response.headers());
    let completion = Completion {
        metrics: context.metrics.clone(),
        labels,
        start,
        request_bytes,
    };
    Ok(response.map(|body| ObservedBody::new(body, response_header_bytes, completion)))
}

/// The endpoint chosen for one attempt.
struct Endpoint {
    service: Option<Arc<Service>>,
    workload: Arc<Workload>,
    port: u16,
}

/// Tries endpoints until one takes the request; the response is streamed, not buffered.
async fn forward(
    context: &Context,
    tunnel: &TunnelInfo,
    parts: Parts,
    body: BoxBody,
    labels: &mut RequestLabels,
) -> Result<Response<Incoming>, LocalReply> {
    let snapshot = context.state.load();
    let target = tunnel.connect.target;
    let base = context.next_pick.fetch_add(1, Ordering::Relaxed);
    let attempts = 1 + context.settings.retries;
    let mut tried: Vec<Arc<Workload>> = Vec::new();
    let mut last_error = String::new();
    for attempt in 0..attempts {
        if attempt > 0 {
            let backoff = context.settings.retry_backoff * 2u32.saturating_pow(attempt - 1);
            tokio::time::sleep(backoff).await;
        }
        let endpoint = pick(
            &snapshot,
            &context.network,
            target,
            base + attempt as usize,
            &tried,
        )?;
        labels.destination_principal = endpoint.workload.identity().ok();
        labels.destination = Some(endpoint.workload.clone());
        labels.destination_service = endpoint.service.clone();
        match open(context, tunnel, &endpoint).await {
            Ok(io) => return send(io, parts, body).await,
            Err((error, retryable)) => {
                tracing::debug!(%target, endpoint = %endpoint.workload.uid, attempt, %error, "upstream connect failed");
                last_error = error;
                if !retryable {
                    break;
                }
                tried.push(endpoint.workload);
            }
        }
    }
    let (flags, retried) = if attempts > 1 {
        ("UF,URX", "retried and the latest ")
    } else {
        ("UF", "")
    };
    Err(LocalReply::new(
        StatusCode::SERVICE_UNAVAILABLE,
        flags,
        format!("upstream connect error or disconnect/reset before headers. {retried}reset reason: connection failure, transport failure reason: {last_error}"),
    ))
}

/// Resolves the original destination to an endpoint, preferring one not tried yet.
fn pick(
    snapshot: &Snapshot,
    network: &str,
    target: SocketAddr,
    base: usize,
    tried: &[Arc<Workload>],
) -> Result<Endpoint, LocalReply> {
    let mut chosen = None;
    for offset in 0..HOST_SELECTION_ATTEMPTS {
        let endpoint = match snapshot.resolve(network, target, base.wrapping_add(offset)) {
            Destination::Service {
                service,
                endpoint,
                target_port,
            } => Endpoint {
                service: Some(service),
                workload: endpoint,
                port: target_port,
            },
            // Pod-addressed traffic goes to that pod: policy only, no load balancing.
            Destination::Workload { workload, port } => {
                return Ok(Endpoint {
                    service: None,
                    workload,
                    port,
                })
            }
            Destination::NoEndpoint { .. } => {
                return Err(LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UH",
                    "no healthy upstream",
                ))
            }
            Destination::Passthrough => {
                return Err(LocalReply::new(StatusCode::NOT_FOUND, "NR", ""));
            }
        };
        let fresh = !tried.iter().any(|w| w.uid == endpoint.workload.uid);
        chosen = Some(endpoint);
        if fresh {
            break;
        }
    }
    Ok(chosen.expect("at least one pick was made"))
}

/// Opens the byte stream to an endpoint: HBONE to `podIP:15008` when it is in the mesh, plain
/// TCP otherwise. Errors say whether another attempt may help.
async fn open(
    context: &Context,
    tunnel: &TunnelInfo,
    endpoint: &Endpoint,
) -> Result<Box<dyn Upstream>, (String, bool)> {
    let Some(&ip) = endpoint.workload.workload_ips.first() else {
        return Err((
            format!("workload {} has no address", endpoint.workload.uid),
            true,
        ));
    };
    let target = SocketAddr::new(ip, endpoint.port);
    if endpoint.workload.protocol == Protocol::Tcp {
        return match TcpStream::connect(target).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                Ok(Box::new(stream))
            }
            Err(err) => Err((format!("{target}: {err}"), true)),
        };
    }
    let identity = endpoint
        .workload
        .identity()
        .map_err(|e| (e.to_string(), true))?;
    let request = TunnelRequest {
        source: context.identity.clone(),
        destination_identities: vec![identity],
        hbone_address: SocketAddr::new(ip, HBONE_PORT),
        target,
        headers: ConnectHeaders {
            forwarded_for: tunnel
                .connect
                .headers
                .forwarded_for
                .or(Some(tunnel.connect.peer_addr)),
            forwarded_host: endpoint.service.as_ref().map(|s| s.hostname.clone()),
            baggage: None,
            traceparent: tunnel.connect.headers.traceparent.clone(),
        },
    };
    match context.client.connect(&request).await {
        Ok(stream) => Ok(Box::new(stream)),
        Err(err) => {
            let retryable = !matches!(
                err,
                ClientError::Certificate { .. }
                    | ClientError::Config { .. }
                    | ClientError::BadRequest(_)
            );
            Err((err.to_string(), retryable))
        }
    }
}

/// Sends the request over HTTP/1.1 on `io` and returns the response as soon as its headers
/// arrive; the connection lives on until the body is read.
async fn send(
    io: Box<dyn Upstream>,
    parts: Parts,
    body: BoxBody,
) -> Result<Response<Incoming>, LocalReply> {
    let reset = |reason: String| {
        LocalReply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UC",
            format!("upstream connect error or disconnect/reset before headers. reset reason: connection termination ({reason})"),
        )
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| reset(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "upstream HTTP/1.1 connection ended with an error");
        }
    });
    let request = upstream_request(parts, body);
    sender
        .send_request(request)
        .await
        .map_err(|e| reset(e.to_string()))
}

/// The request as an HTTP/1.1 origin-form request, whatever version it arrived in.
fn upstream_request(mut parts: Parts, body: BoxBody) -> Request<BoxBody> {
    if !parts.headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
        }
    }
    strip_hop_by_hop(&mut parts.headers);
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = Version::HTTP_11;
    Request::from_parts(parts, body)
}

/// Removes connection-specific headers, including those the `connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_request_is_origin_form_http11_with_host() {
        let (parts, _) = Request::builder()
            .version(Version::HTTP_2)
            .uri("http://echo.default:80/a/b?c=d")
            .header("connection", "x-private, keep-alive")
            .header("x-private", "1")
            .header("te", "trailers")
            .header("x-kept", "yes")
            .body(())
            .unwrap()
            .into_parts();
        let request = upstream_request(parts, full(""));
        assert_eq!(request.version(), Version::HTTP_11);
        assert_eq!(request.uri(), "/a/b?c=d");
        assert_eq!(request.headers()["host"], "echo.default:80");
        assert_eq!(request.headers()["x-kept"], "yes");
        for gone in ["connection", "x-private", "te", "keep-alive"] {
            assert!(!request.headers().contains_key(gone), "{gone}");
        }
    }
}
