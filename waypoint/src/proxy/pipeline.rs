//! One request's way through the waypoint, as a fixed sequence of phases:
//!
//! 0. **Wasm, AUTHN/AUTHZ phases** — WasmPlugins that must see the request before policy;
//! 1. **authorize** — L7 AuthorizationPolicy (403 `RBAC: access denied`, flag `RBAC`);
//! 2. **route** — the HTTPRoute rule for the addressed Service (404 `NR` when routes exist and
//!    none matches), answering RequestRedirect itself;
//! 3. **request filters** — URLRewrite, RequestHeaderModifier;
//! 4. **Wasm, STATS and unphased** — the remaining WasmPlugins; the request body and trailers
//!    stream through every plugin;
//! 5. **forward** — mirrors, then attempts with retries, per-try and request timeouts;
//! 6. **response filters** — ResponseHeaderModifier, then the WasmPlugins, last first;
//! 7. **telemetry** — Istio's metrics, recorded when the response body ends.
//!
//! Every phase may end the request with a [`LocalReply`]; its status and flags are what the
//! metrics record.

use std::convert::Infallible;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use ambit_mesh::state::Snapshot;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::body::{
    full, header_bytes, AccessLine, BoxBody, Completion, CountingBody, DeadlineBody, ObservedBody,
    ReplayBody,
};
use super::filters::{self, RequestHead};
use super::forward::{self, Plan};
use super::inbound::TunnelInfo;
use super::plugins::{self, RequestPlugins};
use super::upstream::Target;
use super::Context;
use crate::l7::authz::{self, normalize_path, HttpAttributes, RequestAttributes, Verdict};
use crate::l7::routes::{RequestView, Routing, Rule};
use crate::l7::L7Config;
use crate::metrics::RequestLabels;

/// A reply the waypoint makes itself.
#[derive(Debug)]
pub struct LocalReply {
    pub status: StatusCode,
    /// Envoy's response flags for it (`-` for none).
    pub flags: &'static str,
    pub body: Bytes,
    /// A redirect's `location`.
    pub location: Option<HeaderValue>,
    /// Headers a Wasm filter's local response asked for (boxed: replies travel in `Err`s).
    pub headers: Box<HeaderMap>,
    /// The gRPC status a gRPC client gets instead of the one the HTTP status maps to.
    pub grpc_status: Option<u16>,
}

impl LocalReply {
    pub fn new(status: StatusCode, flags: &'static str, body: impl Into<Bytes>) -> Self {
        LocalReply {
            status,
            flags,
            body: body.into(),
            location: None,
            headers: Box::default(),
            grpc_status: None,
        }
    }

    /// A timeout of the whole request: Istio bounds routes (and `grpc-timeout`) with Envoy's
    /// `max_stream_duration`, whose expiry a gRPC client sees as `DEADLINE_EXCEEDED`.
    fn request_timeout() -> Self {
        LocalReply {
            grpc_status: Some(GRPC_DEADLINE_EXCEEDED),
            ..LocalReply::new(
                StatusCode::GATEWAY_TIMEOUT,
                "UT",
                "upstream request timeout",
            )
        }
    }
}

const GRPC_DEADLINE_EXCEEDED: u16 = 4;

/// The gRPC status a local reply's HTTP status stands for, as Envoy maps it (gRPC's
/// http-grpc-status-mapping).
fn grpc_status_of(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => 13,                   // INTERNAL
        401 => 16,                   // UNAUTHENTICATED
        403 => 7,                    // PERMISSION_DENIED
        404 => 12,                   // UNIMPLEMENTED
        429 | 502 | 503 | 504 => 14, // UNAVAILABLE
        _ => 2,                      // UNKNOWN
    }
}

/// A local reply to a gRPC request, as Envoy sends one: trailers-only (HTTP 200, `grpc-status`
/// and `grpc-message` in the only header block), so that gRPC clients see a status, not a
/// protocol error. A status a Wasm filter chose stays.
fn grpc_local_response(reply: LocalReply) -> Response<BoxBody> {
    let mut headers = *reply.headers;
    if !headers.contains_key("grpc-status") {
        let status = reply
            .grpc_status
            .unwrap_or_else(|| grpc_status_of(reply.status));
        headers.insert("grpc-status", HeaderValue::from(status));
    }
    if !headers.contains_key("grpc-message") && !reply.body.is_empty() {
        if let Ok(message) = HeaderValue::from_str(&grpc_message(&reply.body)) {
            headers.insert("grpc-message", message);
        }
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.remove(header::CONTENT_LENGTH);
    let mut response = Response::new(full(Bytes::new()));
    *response.headers_mut() = headers;
    response
}

/// `grpc-message` encoding: bytes outside printable ASCII, and `%`, percent-encoded.
fn grpc_message(text: &[u8]) -> String {
    let mut encoded = String::with_capacity(text.len());
    for &b in text {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    encoded
}

/// A `grpc-timeout` header's value (`<up to 8 digits><H|M|S|m|u|n>`); `None` when absent or
/// malformed (gRPC servers ignore a malformed one too).
fn grpc_timeout(headers: &HeaderMap) -> Option<std::time::Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    use std::time::Duration;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Serves one request from a tunnel and arranges for its metrics to be recorded when the
/// response ends.
pub async fn serve(
    context: Arc<Context>,
    tunnel: Arc<TunnelInfo>,
    mut request: Request<Incoming>,
) -> Result<Response<ObservedBody>, Infallible> {
    let start = Instant::now();
    let grpc = is_grpc(request.headers());
    // Built only when the access log is on: three strings per request otherwise wasted.
    let access = tracing::enabled!(target: "access", tracing::Level::INFO).then(|| {
        let header = |name: header::HeaderName| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        AccessLine {
            method: request.method().to_string(),
            path: request
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), ToString::to_string),
            authority: request
                .uri()
                .authority()
                .map(ToString::to_string)
                .unwrap_or_else(|| header(header::HOST)),
            request_id: header(header::HeaderName::from_static("x-request-id")),
        }
    });
    let mut labels = RequestLabels {
        source: tunnel.source.clone(),
        source_principal: Some(tunnel.connect.peer_identity.clone()),
        request_protocol: if grpc { "grpc" } else { "http" },
        ..Default::default()
    };
    let request_bytes = Arc::new(AtomicU64::new(header_bytes(request.headers())));
    // The client's side of an upgrade must be claimed before the request is taken apart.
    let upgrade = wants_upgrade(request.headers()).then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let version = parts.version;
    let request_messages = grpc.then(Arc::default);
    let body = CountingBody::new(body.boxed_unsync(), request_bytes.clone());
    let body = match &request_messages {
        Some(messages) => body.grpc(Arc::clone(messages)).boxed_unsync(),
        None => body.boxed_unsync(),
    };
    let head = RequestHead {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
    };
    let (mut response, flags) = match handle(
        &context,
        &tunnel,
        head,
        version,
        body,
        upgrade,
        &mut labels,
    )
    .await
    {
        Ok((response, flags)) => (response, flags),
        Err(reply) => {
            tracing::debug!(target = %tunnel.connect.target, status = %reply.status, flags = reply.flags, "local reply");
            let flags = reply.flags;
            let response = if grpc {
                grpc_local_response(reply)
            } else {
                local_response(reply.status, reply.location, reply.body, *reply.headers)
            };
            (response, flags)
        }
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        forward::strip_hop_by_hop(response.headers_mut());
    }
    // Telemetry.
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
        request_messages,
        access,
    };
    Ok(response.map(|body| ObservedBody::new(body, response_header_bytes, completion)))
}

/// The phases up to a response.
async fn handle(
    context: &Arc<Context>,
    tunnel: &Arc<TunnelInfo>,
    mut head: RequestHead,
    version: Version,
    body: BoxBody,
    upgrade: Option<OnUpgrade>,
    labels: &mut RequestLabels,
) -> Result<(Response<BoxBody>, &'static str), LocalReply> {
    let snapshot = context.state.load();
    let l7 = context.l7.load();
    let target = addressed(context, &snapshot, tunnel)?;
    if let Target::Service { service, .. } = &target {
        labels.destination_service = Some(service.clone());
    }
    let body_ended = body.is_end_stream();
    let mut wasm = wasm_plugins(context, tunnel, &target)?;
    if let Some(wasm) = &wasm {
        wasm.before_authz(&mut head, body_ended).await?;
    }

    authorize(context, &l7, tunnel, &target, &head)?;

    let (rule, prefix) = route(&l7, &target, &head)?;
    if let Some(redirect) = rule.as_ref().and_then(|r| r.redirect.as_ref()) {
        let (status, location) = filters::redirect_location(&head, prefix.as_deref(), redirect);
        let location = HeaderValue::from_str(&location).ok();
        return Ok((
            local_response(status, location, Bytes::new(), HeaderMap::new()),
            "-",
        ));
    }

    if let Some(rule) = &rule {
        filters::request_filters(&mut head, rule, prefix.as_deref());
    }

    let body = match wasm.as_mut() {
        Some(wasm) => {
            wasm.after_routing(&mut head, body_ended).await?;
            if body_ended {
                body
            } else {
                wasm.request_body(body)
            }
        }
        None => body,
    };

    let plan = plan(
        &snapshot,
        &target,
        rule.as_deref(),
        version,
        upgrade.is_some(),
    )?;
    // A gRPC client's deadline bounds the request too (Istio leaves Envoy's
    // `grpc_timeout_header_max` at 0: no cap on it).
    let grpc_deadline = grpc_timeout(&head.headers);
    let request_timeout = rule
        .as_ref()
        .and_then(|r| r.request_timeout)
        .or(context.settings.request_timeout)
        .into_iter()
        .chain(grpc_deadline)
        .min();
    let started = tokio::time::Instant::now();
    let forwarding = async {
        let mut body = match &rule {
            // Only a body that may be sent again is worth holding in memory.
            Some(r) if r.retry.is_some() || !r.mirrors.is_empty() => {
                ReplayBody::buffer(body, context.settings.body_buffer_limit)
                    .await
                    .map_err(|e| {
                        LocalReply::new(StatusCode::BAD_REQUEST, "DC", format!("request body: {e}"))
                    })?
            }
            // Streamed at once (a gRPC stream must not wait for its end), and copied while it
            // fits so that Istio's default retries (gRPC `unavailable`, refused streams) can
            // send it again.
            _ => ReplayBody::teed(body, context.settings.body_buffer_limit),
        };
        if let Some(r) = &rule {
            forward::mirror(context, tunnel, &r.mirrors, &head, &body, version);
        }
        forward::forward(context, tunnel, &plan, &head, &mut body, labels).await
    };
    let timed = async {
        match request_timeout {
            Some(limit) => tokio::time::timeout(limit, forwarding)
                .await
                .unwrap_or_else(|_| Err(LocalReply::request_timeout())),
            None => forwarding.await,
        }
    };
    // A filter answering while the request body streams ends the attempt in flight.
    let (mut response, flags) = match wasm.as_mut() {
        Some(wasm) => tokio::select! {
            forwarded = timed => forwarded?,
            reply = wasm.aborted() => return Err(reply),
        },
        None => timed.await?,
    };

    if let Some(rule) = &rule {
        filters::response_filters(response.headers_mut(), rule);
    }
    if let Some(deadline) = grpc_deadline {
        // The deadline covers the whole call, streamed responses included.
        response = response.map(|body| DeadlineBody::new(body, started + deadline).boxed_unsync());
    }

    if let Some(client) = upgrade {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            splice_upgrade(client, hyper::upgrade::on(&mut response));
        }
    }
    if let Some(wasm) = &wasm {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut parts, body) = response.into_parts();
            let ended = body.is_end_stream();
            wasm.response_headers(&mut parts, ended).await?;
            let body = if ended {
                body
            } else {
                wasm.response_body(body)
            };
            response = Response::from_parts(parts, body);
        }
    }
    Ok((response, flags))
}

/// What the tunnel addressed: a Service VIP or a workload.
pub(super) fn addressed(
    context: &Context,
    snapshot: &Snapshot,
    tunnel: &TunnelInfo,
) -> Result<Target, LocalReply> {
    let target = tunnel.connect.target;
    if let Some(service) = snapshot.service_by_vip(&context.network, target.ip()) {
        return Ok(Target::Service {
            service: service.clone(),
            port: target.port(),
        });
    }
    if let Some(workload) = snapshot.workload_by_ip(&context.network, target.ip()) {
        return Ok(Target::Workload {
            workload: workload.clone(),
            port: target.port(),
        });
    }
    Err(LocalReply::new(StatusCode::NOT_FOUND, "NR", ""))
}

/// Phase 1: L7 AuthorizationPolicy.
fn authorize(
    context: &Context,
    l7: &L7Config,
    tunnel: &TunnelInfo,
    target: &Target,
    head: &RequestHead,
) -> Result<(), LocalReply> {
    if l7.policies.is_empty() {
        return Ok(());
    }
    let source_ip = tunnel.client_address().ip();
    let (service, _) = target.service_and_port();
    let path = normalize_path(head.path());
    let host = head.authority();
    let verdict = l7.policies.evaluate(&RequestAttributes {
        source_principal: Some(&tunnel.connect.peer_identity),
        source_ip,
        remote_ip: authz::remote_ip(
            source_ip,
            Some(&head.headers),
            context.settings.num_trusted_proxies,
        ),
        destination: tunnel.connect.target,
        service,
        http: Some(HttpAttributes {
            method: head.method.as_str(),
            path: &path,
            host: &host,
            headers: &head.headers,
        }),
    });
    match verdict {
        Verdict::Allow => Ok(()),
        Verdict::Deny(policy) => {
            tracing::debug!(%policy, principal = %tunnel.connect.peer_identity, path, "request denied by authorization policy");
            Err(LocalReply::new(
                StatusCode::FORBIDDEN,
                "RBAC",
                "RBAC: access denied",
            ))
        }
    }
}

/// Phase 2: the matching HTTPRoute rule (and the PathPrefix it matched), `None` when no route
/// is attached (the Service itself, Istio's default route).
fn route(
    l7: &L7Config,
    target: &Target,
    head: &RequestHead,
) -> Result<(Option<Arc<Rule>>, Option<String>), LocalReply> {
    let Target::Service { service, port } = target else {
        // Pod-addressed traffic: policy only, no routing.
        return Ok((None, None));
    };
    let view = RequestView {
        method: &head.method,
        path: head.uri.path(),
        query: head.uri.query(),
        headers: &head.headers,
    };
    match l7
        .routes
        .route(&service.namespace, &service.name, *port, view)
    {
        Routing::Default => Ok((None, None)),
        Routing::NoMatch => Err(LocalReply::new(StatusCode::NOT_FOUND, "NR", "")),
        Routing::Matched { rule, prefix } => {
            tracing::trace!(rule = %rule.name, "route matched");
            Ok((Some(rule.clone()), prefix.map(str::to_owned)))
        }
    }
}

/// Where the request goes and under which retry and timeout policy.
fn plan(
    snapshot: &Snapshot,
    addressed: &Target,
    rule: Option<&Rule>,
    downstream: Version,
    upgrade: bool,
) -> Result<Plan, LocalReply> {
    let target = match rule {
        Some(rule) if !rule.backends.is_empty() => {
            let Some(backend) = forward::weighted(&rule.backends) else {
                // Istio: a route whose backends all weigh 0 answers 500.
                return Err(LocalReply::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "-",
                    "no backend has a weight",
                ));
            };
            forward::backend_target(snapshot, backend).ok_or_else(|| {
                // Gateway API: a backend that does not resolve gets 500.
                LocalReply::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "-",
                    format!(
                        "backend service {}/{} not found",
                        backend.namespace, backend.name
                    ),
                )
            })?
        }
        _ => addressed.clone(),
    };
    Ok(Plan {
        target,
        retry: rule.and_then(|r| r.retry.clone()),
        per_try_timeout: rule.and_then(|r| r.backend_timeout),
        upgrade,
        downstream,
    })
}

/// The request's contexts in the WasmPlugins that apply to its destination, if any do. A
/// fail-closed plugin that could not be loaded refuses the request (500) instead of letting it
/// through unfiltered.
fn wasm_plugins(
    context: &Context,
    tunnel: &TunnelInfo,
    target: &Target,
) -> Result<Option<RequestPlugins>, LocalReply> {
    let (service, port) = target.service_and_port();
    let selected = context.wasm.select(service, port);
    if let Some((plugin, reason)) = &selected.unavailable {
        tracing::debug!(%plugin, %reason, "request refused: a fail-closed WasmPlugin is not running");
        return Err(LocalReply::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "-",
            format!("WasmPlugin {plugin} is not running"),
        ));
    }
    Ok((!selected.is_empty())
        .then(|| RequestPlugins::new(&selected, plugins::stream_info(context, tunnel, target))))
}

/// After a 101, joins the client's upgraded connection and the endpoint's, both ways.
fn splice_upgrade(client: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(err) => {
                tracing::debug!(error = %err, "upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(error = %err, "upgraded connection ended with an error");
        }
    });
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn local_response(
    status: StatusCode,
    location: Option<HeaderValue>,
    body: Bytes,
    headers: HeaderMap,
) -> Response<BoxBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    if let Some(location) = location {
        response.headers_mut().insert(header::LOCATION, location);
    }
    if !response.body().is_end_stream() && !response.headers().contains_key(header::CONTENT_TYPE) {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    response
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
    use std::time::Duration;

    #[test]
    fn grpc_timeouts_parse_as_grpc_defines_them() {
        let timeout = |v: &str| {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", HeaderValue::from_str(v).unwrap());
            grpc_timeout(&headers)
        };
        assert_eq!(timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "100", "100x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_local_replies_are_trailers_only_with_envoys_status_mapping() {
        let reply = |status| grpc_local_response(LocalReply::new(status, "-", "no 100% ü"));
        let denied = reply(StatusCode::FORBIDDEN);
        assert_eq!(denied.status(), StatusCode::OK);
        assert_eq!(denied.headers()["grpc-status"], "7");
        assert_eq!(denied.headers()["content-type"], "application/grpc");
        assert_eq!(denied.headers()["grpc-message"], "no 100%25 %C3%BC");
        assert!(denied.body().is_end_stream());
        assert_eq!(
            reply(StatusCode::SERVICE_UNAVAILABLE).headers()["grpc-status"],
            "14"
        );
        assert_eq!(
            reply(StatusCode::GATEWAY_TIMEOUT).headers()["grpc-status"],
            "14"
        );
        assert_eq!(reply(StatusCode::NOT_FOUND).headers()["grpc-status"], "12");
        assert_eq!(
            reply(StatusCode::INTERNAL_SERVER_ERROR).headers()["grpc-status"],
            "2"
        );
        let timed_out = grpc_local_response(LocalReply::request_timeout());
        assert_eq!(timed_out.headers()["grpc-status"], "4");
        // A Wasm filter's own gRPC status stays.
        let mut filtered = LocalReply::new(StatusCode::FORBIDDEN, "-", "");
        filtered
            .headers
            .insert("grpc-status", HeaderValue::from(16));
        assert_eq!(grpc_local_response(filtered).headers()["grpc-status"], "16");
    }
}
