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
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::body::{
    full, header_bytes, AccessLine, BoxBody, Completion, CountingBody, ObservedBody, ReplayBody,
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
}

impl LocalReply {
    pub fn new(status: StatusCode, flags: &'static str, body: impl Into<Bytes>) -> Self {
        LocalReply {
            status,
            flags,
            body: body.into(),
            location: None,
            headers: Box::default(),
        }
    }
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
    let body = CountingBody::new(body.boxed_unsync(), request_bytes.clone()).boxed_unsync();
    let head = RequestHead {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
    };
    let (mut response, flags) = match handle(&context, &tunnel, head, body, upgrade, &mut labels)
        .await
    {
        Ok((response, flags)) => (response, flags),
        Err(reply) => {
            tracing::debug!(target = %tunnel.connect.target, status = %reply.status, flags = reply.flags, "local reply");
            (
                local_response(reply.status, reply.location, reply.body, *reply.headers),
                reply.flags,
            )
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
        access,
    };
    Ok(response.map(|body| ObservedBody::new(body, response_header_bytes, completion)))
}

/// The phases up to a response.
async fn handle(
    context: &Arc<Context>,
    tunnel: &Arc<TunnelInfo>,
    mut head: RequestHead,
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

    let plan = plan(&snapshot, &target, rule.as_deref(), upgrade.is_some())?;
    let request_timeout = rule
        .as_ref()
        .and_then(|r| r.request_timeout)
        .or(context.settings.request_timeout);
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
            _ => ReplayBody::Streaming(Some(body)),
        };
        if let Some(r) = &rule {
            forward::mirror(context, tunnel, &r.mirrors, &head, &body);
        }
        forward::forward(context, tunnel, &plan, &head, &mut body, labels).await
    };
    let timed = async {
        match request_timeout {
            Some(limit) => tokio::time::timeout(limit, forwarding)
                .await
                .unwrap_or_else(|_| {
                    Err(LocalReply::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "UT",
                        "upstream request timeout",
                    ))
                }),
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
