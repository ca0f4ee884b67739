//! Forwarding one request: attempts at endpoints of the chosen backend with Istio's retry
//! semantics, each attempt bounded by the per-try timeout, and mirrors sent on the side.
//!
//! Retries follow Istio: the default policy (2 retries on connect failure and refused tunnels,
//! and on gRPC `unavailable`/`cancelled`) always applies; a route's `retry` (GEP-1731) sets the
//! number of retries and the base backoff, and adds its `codes`, resets before the response
//! headers and per-try timeouts. Each retry goes to an endpoint not tried yet when there is one,
//! after an exponential backoff with full jitter (Envoy's: `rand(0, base × 2^(n-1))`, capped at
//! ten times the base). Request bodies stream to the first attempt at once and are copied on
//! the way; a retry sends the copy and then the rest of the body as the client sends it, so a
//! body still streaming when the first attempt failed is sent whole; a body that outgrew the
//! buffer limit cannot be sent again, and then no retry happens (the client gets the endpoint's
//! own answer, a gRPC client its `UNAVAILABLE`). Retries happen on
//! response headers only, never once a byte of a response went to the client. Failures are answered the way Envoy
//! answers them (503 `UF,URX`, 503 `UH`, 503 `UC`, 504 `UT`, and 400 `DPE` when the client's own
//! body breaks off), with the same response flags.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::state::{Snapshot, Workload};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{BoxBody, InFlightBody, ReplayBody};
use super::filters::RequestHead;
use super::inbound::TunnelInfo;
use super::pipeline::LocalReply;
use super::upstream::{Failure, Target, UpstreamProtocol};
use super::Context;
use crate::l7::routes::{Backend, Mirror, RetryPolicy};
use crate::metrics::RequestLabels;

/// Connection-specific headers that never cross a proxy (RFC 9110 §7.6.1).
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// gRPC statuses in Istio's default `retry_on`: `cancelled` (1) and `unavailable` (14).
const GRPC_RETRIED: [&str; 2] = ["1", "14"];

/// How one request is to be forwarded, as routing decided it.
pub struct Plan {
    pub target: Target,
    /// The route's retry policy; `None`: Istio's default.
    pub retry: Option<RetryPolicy>,
    /// Bound on each attempt (`timeouts.backendRequest`).
    pub per_try_timeout: Option<Duration>,
    /// The request asks for a protocol upgrade (WebSocket): one attempt on a connection of its
    /// own, kept for the upgraded stream.
    pub upgrade: bool,
    /// The HTTP version the client spoke: undeclared ports keep it upstream.
    pub downstream: Version,
}

/// A uniformly random number, from the standard library's per-process random hash keys.
pub fn random() -> u64 {
    RandomState::new().hash_one(std::time::Instant::now())
}

/// The wait before retry `n` (1-based): full jitter over an exponentially growing interval.
pub(super) fn backoff(base: Duration, n: u32) -> Duration {
    let ceiling = (base * 2u32.saturating_pow(n.saturating_sub(1))).min(base * 10);
    let nanos = ceiling.as_nanos().max(1) as u64;
    Duration::from_nanos(random() % nanos)
}

/// Resolves a route's backend to the Service in the state: by its cluster hostname, else by
/// name and namespace (a state whose hostnames use another domain).
pub fn backend_target(snapshot: &Snapshot, backend: &Backend) -> Option<Target> {
    let (ns, name) = (&backend.namespace, &backend.name);
    let key = format!(
        "{ns}/{name}.{ns}.svc.{}",
        ambit_local::control::DOMAIN_SUFFIX
    );
    let service = snapshot.service(&key).cloned().or_else(|| {
        snapshot
            .services()
            .find(|s| &s.namespace == ns && &s.name == name)
            .cloned()
    })?;
    Some(Target::Service {
        service,
        port: backend.port,
    })
}

/// Picks one of a rule's backends by weight. `None`: every weight is 0.
pub fn weighted(backends: &[Backend]) -> Option<&Backend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = random() % total;
    for backend in backends {
        let w = u64::from(backend.weight);
        if point < w {
            return Some(backend);
        }
        point -= w;
    }
    None
}

/// What one attempt came to.
enum Attempt {
    Response(Response<Incoming>),
    Failed(Failure),
    TimedOut,
}

/// Sends the request, retrying as the policy allows; returns the response (streamed, not
/// buffered) with Envoy's response flags, or the waypoint's own reply.
pub async fn forward(
    context: &Context,
    tunnel: &TunnelInfo,
    plan: &Plan,
    head: &RequestHead,
    body: &mut ReplayBody,
    labels: &mut RequestLabels,
) -> Result<(Response<BoxBody>, &'static str), LocalReply> {
    let snapshot = context.state.load();
    let configured = plan.retry.is_some();
    let (retries, base_backoff) = match &plan.retry {
        Some(r) => (r.attempts, r.backoff),
        None => (context.settings.retries, context.settings.retry_backoff),
    };
    let attempts = if plan.upgrade { 1 } else { 1 + retries };
    let protocol = if plan.upgrade {
        UpstreamProtocol::Upgrade
    } else {
        plan.target.upstream_protocol(plan.downstream)
    };
    let base = context.upstreams.next_base();
    let mut tried: Vec<Arc<Workload>> = Vec::new();
    let mut last = LocalReply::new(StatusCode::SERVICE_UNAVAILABLE, "UH", "no healthy upstream");
    let mut connect_failures = 0;
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(backoff(base_backoff, attempt)).await;
        }
        let more = attempt + 1 < attempts;
        let Some(endpoint) =
            context
                .upstreams
                .pick(&snapshot, &plan.target, base + attempt as usize, &tried)
        else {
            return Err(LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UH",
                "no healthy upstream",
            ));
        };
        labels.destination_principal = endpoint.workload.identity().ok();
        labels.destination = Some(endpoint.workload.clone());
        let mut in_flight = context.upstreams.start(&endpoint.workload);
        labels.destination_service = endpoint.service.clone();
        if !body.replayable() {
            // A streamed body went with an earlier attempt.
            break;
        }
        let sent = async {
            match context
                .upstreams
                .send(
                    context,
                    tunnel,
                    &endpoint,
                    head,
                    body,
                    protocol,
                    &mut in_flight,
                )
                .await
            {
                Ok(response) => Attempt::Response(response),
                Err(failure) => Attempt::Failed(failure),
            }
        };
        let outcome = match plan.per_try_timeout {
            Some(limit) => tokio::time::timeout(limit, sent)
                .await
                .unwrap_or(Attempt::TimedOut),
            None => sent.await,
        };
        let replay = more && body.replayable();
        match outcome {
            Attempt::Response(response) => {
                let status = response.status();
                context
                    .upstreams
                    .record(&endpoint.workload, status.is_server_error());
                let retriable = retriable_response(&response, plan.retry.as_ref());
                if retriable && replay {
                    tracing::debug!(endpoint = %endpoint.workload.uid, %status, attempt, "retriable response; retrying");
                    tried.push(endpoint.workload);
                    continue;
                }
                if retriable && more {
                    tracing::debug!(endpoint = %endpoint.workload.uid, %status, attempt, "retriable response not retried: the request body outgrew the retry buffer");
                }
                let flags = if retriable && attempt > 0 { "URX" } else { "-" };
                let response =
                    response.map(|body| InFlightBody::new(body, in_flight).boxed_unsync());
                return Ok((response, flags));
            }
            Attempt::Failed(Failure::Connect { message, retryable }) => {
                tracing::debug!(endpoint = %endpoint.workload.uid, attempt, error = %message, "upstream connect failed");
                context.upstreams.record(&endpoint.workload, true);
                connect_failures += 1;
                last = LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UF",
                    format!("upstream connect error or disconnect/reset before headers. reset reason: connection failure, transport failure reason: {message}"),
                );
                if !retryable {
                    break;
                }
                tried.push(endpoint.workload);
            }
            Attempt::Failed(Failure::ClientBody(reason)) => {
                tracing::debug!(endpoint = %endpoint.workload.uid, attempt, %reason, "the client's request body broke off");
                return Err(LocalReply::new(
                    StatusCode::BAD_REQUEST,
                    "DPE",
                    "malformed request body",
                ));
            }
            Attempt::Failed(Failure::Reset(reason)) => {
                tracing::debug!(endpoint = %endpoint.workload.uid, attempt, %reason, "upstream reset before response headers");
                context.upstreams.record(&endpoint.workload, true);
                last = LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UC",
                    format!("upstream connect error or disconnect/reset before headers. reset reason: connection termination ({reason})"),
                );
                if !(configured && replay) {
                    return Err(last);
                }
                tried.push(endpoint.workload);
            }
            Attempt::TimedOut => {
                tracing::debug!(endpoint = %endpoint.workload.uid, attempt, "per-try timeout");
                context.upstreams.record(&endpoint.workload, true);
                last = LocalReply::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "UT",
                    "upstream request timeout",
                );
                if !(configured && replay) {
                    return Err(last);
                }
                tried.push(endpoint.workload);
            }
        }
    }
    if last.flags == "UF" && connect_failures > 1 {
        // Envoy's wording when the retries ran out.
        last.flags = "UF,URX";
        last.body = String::from_utf8_lossy(&last.body)
            .replacen("reset reason:", "retried and the latest reset reason:", 1)
            .into();
    } else if attempts > 1 && last.flags == "UT" {
        last.flags = "UT,URX";
    }
    Err(last)
}

/// Whether a response is one the policy retries: a listed code under a route's policy, or a
/// gRPC `unavailable`/`cancelled` under any (trailers-only responses carry it in the headers).
fn retriable_response(response: &Response<Incoming>, policy: Option<&RetryPolicy>) -> bool {
    let status = response.status().as_u16();
    policy.is_some_and(|p| p.codes.contains(&status))
        || response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|s| GRPC_RETRIED.contains(&s))
}

/// Sends copies of the request to each mirror's backend, in the background; their responses are
/// read and dropped. Envoy's convention marks the copy: `-shadow` is appended to the host.
pub fn mirror(
    context: &Arc<Context>,
    tunnel: &Arc<TunnelInfo>,
    mirrors: &[Mirror],
    head: &RequestHead,
    body: &ReplayBody,
    downstream: Version,
) {
    for m in mirrors {
        if let Some(f) = m.fraction {
            if random() % u64::from(f.denominator.max(1)) >= u64::from(f.numerator) {
                continue;
            }
        }
        let mut copy = match body {
            ReplayBody::Buffered { chunks, trailers } => ReplayBody::Buffered {
                chunks: chunks.clone(),
                trailers: trailers.clone(),
            },
            ReplayBody::Streaming(_) | ReplayBody::Teed(_) => {
                tracing::debug!(backend = %m.backend.name, "request body too large to mirror; mirror skipped");
                continue;
            }
        };
        let snapshot = context.state.load();
        let Some(target) = backend_target(&snapshot, &m.backend) else {
            tracing::debug!(backend = %m.backend.name, "mirror backend is not a known service");
            continue;
        };
        let mut head = head.clone();
        let host = head.authority();
        let (name, port) = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => {
                (h.to_owned(), format!(":{p}"))
            }
            _ => (host.clone(), String::new()),
        };
        if let Ok(v) = HeaderValue::from_str(&format!("{name}-shadow{port}")) {
            head.headers.insert(header::HOST, v);
            if let Ok(uri) = Uri::builder()
                .path_and_query(head.uri.path_and_query().map_or("/", |p| p.as_str()))
                .build()
            {
                head.uri = uri;
            }
        }
        let (context, tunnel) = (context.clone(), tunnel.clone());
        let protocol = target.upstream_protocol(downstream);
        tokio::spawn(async move {
            let snapshot = context.state.load();
            let base = context.upstreams.next_base();
            let Some(endpoint) = context.upstreams.pick(&snapshot, &target, base, &[]) else {
                return;
            };
            // A mirror counts at its endpoint (and on its stream) as any request does.
            let mut in_flight = context.upstreams.start(&endpoint.workload);
            let sent = context.upstreams.send(
                &context,
                &tunnel,
                &endpoint,
                &head,
                &mut copy,
                protocol,
                &mut in_flight,
            );
            match sent.await {
                Ok(response) => {
                    let _ = response.into_body().collect().await;
                }
                Err(failure) => tracing::debug!(?failure, "mirrored request failed"),
            }
        });
    }
}

/// The request as the endpoint is to receive it. HTTP/1.1: origin form with a `host` header,
/// whatever version it arrived in; an upgrade request keeps its `connection: upgrade` and
/// `upgrade` headers. HTTP/2: `:scheme` and `:authority` (from `host` when the client sent
/// HTTP/1.1), and `te: trailers` kept when the client asked for it (gRPC servers require it).
pub fn upstream_request(
    head: &RequestHead,
    body: BoxBody,
    protocol: UpstreamProtocol,
) -> Request<BoxBody> {
    let mut headers = head.headers.clone();
    let authority = head.authority();
    let upgrade_to = headers.get(header::UPGRADE).cloned();
    let trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    strip_hop_by_hop(&mut headers);
    let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::new(body);
    *request.method_mut() = head.method.clone();
    match protocol {
        UpstreamProtocol::Http1 | UpstreamProtocol::Upgrade => {
            if !headers.contains_key(header::HOST) {
                if let Ok(host) = HeaderValue::from_str(&authority) {
                    headers.insert(header::HOST, host);
                }
            }
            if let (UpstreamProtocol::Upgrade, Some(to)) = (protocol, upgrade_to) {
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, to);
            }
            *request.uri_mut() = path.parse().unwrap_or_else(|_| Uri::from_static("/"));
            *request.version_mut() = Version::HTTP_11;
        }
        UpstreamProtocol::Http2 => {
            // `:authority` replaces `host` (RFC 9113 §8.3.1).
            headers.remove(header::HOST);
            if trailers {
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
            }
            let scheme = head.uri.scheme_str().unwrap_or("http");
            *request.uri_mut() = format!("{scheme}://{authority}{path}")
                .parse()
                .or_else(|_| path.parse())
                .unwrap_or_else(|_| Uri::from_static("/"));
            *request.version_mut() = Version::HTTP_2;
        }
    }
    *request.headers_mut() = headers;
    request
}

/// Removes connection-specific headers, including those the `connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::body::full;

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
        let head = RequestHead {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
        };
        let request = upstream_request(&head, full(""), UpstreamProtocol::Http1);
        assert_eq!(request.version(), Version::HTTP_11);
        assert_eq!(request.uri(), "/a/b?c=d");
        assert_eq!(request.headers()["host"], "echo.default:80");
        assert_eq!(request.headers()["x-kept"], "yes");
        for gone in ["connection", "x-private", "te", "keep-alive"] {
            assert!(!request.headers().contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn weights_and_backoff() {
        let b = |name: &str, weight| Backend {
            namespace: "default".into(),
            name: name.into(),
            port: 80,
            weight,
        };
        assert!(weighted(&[b("a", 0), b("b", 0)]).is_none());
        assert_eq!(weighted(&[b("a", 0), b("b", 3)]).unwrap().name, "b");
        let base = Duration::from_millis(25);
        for n in 1..8 {
            assert!(backoff(base, n) < base * 10);
        }
        assert!(backoff(base, 1) < base);
    }
}
