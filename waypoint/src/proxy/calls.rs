//! `proxy_http_call` from Wasm filters. The `upstream` names a mesh service, as Envoy cluster
//! names do in Istio (`outbound|8000||authz.default.svc.cluster.local`) or as a host
//! (`authz.default.svc.cluster.local:8000`, `authz.default:8000`, `authz:8000` in the waypoint's
//! namespace; port 80 when left out). The call goes the way the waypoint forwards requests:
//! endpoint choice, HBONE as the waypoint, no retries; its response is read whole (bounded).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock, Weak};

use ambit_mesh::hbone::server::ConnectRequest;
use ambit_mesh::hbone::ConnectHeaders;
use ambit_wasm_host::http_call::BoxFuture;
use ambit_wasm_host::{HttpCallRequest, HttpCallResponse, HttpCaller, Pairs};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};
use http_body_util::{BodyExt, Limited};

use super::body::{full, ReplayBody};
use super::filters::RequestHead;
use super::forward::{self, Plan};
use super::inbound::TunnelInfo;
use super::Context;
use crate::l7::routes::Backend;
use crate::metrics::RequestLabels;

/// The largest call response handed to a filter.
const MAX_RESPONSE_BODY: usize = 1024 * 1024;

/// Carries filters' calls through the waypoint; bound to its context once that exists.
#[derive(Default)]
pub struct MeshCalls {
    context: OnceLock<Weak<Context>>,
}

impl MeshCalls {
    pub fn bind(&self, context: &Arc<Context>) {
        let _ = self.context.set(Arc::downgrade(context));
    }
}

impl HttpCaller for MeshCalls {
    fn call(&self, request: HttpCallRequest) -> BoxFuture<Option<HttpCallResponse>> {
        let context = self.context.get().and_then(Weak::upgrade);
        Box::pin(async move {
            let context = context?;
            match call(&context, &request).await {
                Ok(response) => Some(response),
                Err(error) => {
                    tracing::debug!(upstream = %request.upstream, %error, "wasm http call failed");
                    None
                }
            }
        })
    }
}

/// `(namespace, name, port)` of the service an upstream names.
fn parse_upstream(upstream: &str, namespace: &str) -> Option<(String, String, u16)> {
    let (host, port) = match upstream.strip_prefix("outbound|") {
        Some(rest) => {
            let mut parts = rest.splitn(3, '|');
            let port = parts.next()?.parse().ok()?;
            let host = parts.nth(1)?;
            (host, port)
        }
        None => match upstream.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().ok()?),
            None => (upstream, 80),
        },
    };
    let mut labels = host.split('.');
    let name = labels.next().filter(|n| !n.is_empty())?.to_owned();
    let namespace = labels.next().unwrap_or(namespace).to_owned();
    Some((namespace, name, port))
}

async fn call(context: &Context, request: &HttpCallRequest) -> Result<HttpCallResponse, String> {
    let (namespace, name, port) =
        parse_upstream(&request.upstream, context.identity.namespace())
            .ok_or_else(|| format!("cannot tell a service from upstream {:?}", request.upstream))?;
    let snapshot = context.state.load();
    let backend = Backend {
        namespace,
        name,
        port,
        weight: 1,
    };
    let target = forward::backend_target(&snapshot, &backend)
        .ok_or_else(|| format!("no service {}/{}", backend.namespace, backend.name))?;
    let head = request_head(request)?;
    // The waypoint calls on its own behalf: the tunnel it "received" is from itself.
    let tunnel = TunnelInfo::new(
        &snapshot,
        &context.network,
        ConnectRequest {
            target: SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
            peer_identity: context.identity.clone(),
            peer_addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            local_addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            headers: ConnectHeaders::default(),
        },
    );
    let plan = Plan {
        target,
        retry: None,
        per_try_timeout: None,
        upgrade: false,
        // The port's declared protocol decides; an undeclared one gets HTTP/1.1.
        downstream: http::Version::HTTP_11,
    };
    let mut body = ReplayBody::Streaming(Some(full(Bytes::from(request.body.clone()))));
    let mut labels = RequestLabels::default();
    let (response, _) = forward::forward(context, &tunnel, &plan, &head, &mut body, &mut labels)
        .await
        .map_err(|reply| format!("{} {}", reply.status, String::from_utf8_lossy(&reply.body)))?;
    let (parts, body) = response.into_parts();
    let collected = Limited::new(body, MAX_RESPONSE_BODY)
        .collect()
        .await
        .map_err(|e| format!("reading the response: {e}"))?;
    let trailers = collected.trailers().map(pairs).unwrap_or_default();
    let mut headers = vec![(
        ":status".to_owned(),
        parts.status.as_str().as_bytes().to_vec(),
    )];
    headers.extend(pairs(&parts.headers));
    Ok(HttpCallResponse {
        headers,
        body: collected.to_bytes().to_vec(),
        trailers,
    })
}

fn pairs(headers: &HeaderMap) -> Pairs {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

/// The call's pseudo-headers and headers as a request head.
fn request_head(request: &HttpCallRequest) -> Result<RequestHead, String> {
    let method = Method::from_bytes(request.header(":method").unwrap_or("GET").as_bytes())
        .map_err(|e| format!(":method: {e}"))?;
    let uri: Uri = request
        .header(":path")
        .unwrap_or("/")
        .parse()
        .map_err(|e| format!(":path: {e}"))?;
    let mut headers = HeaderMap::new();
    for (name, value) in &request.headers {
        if name.starts_with(':') {
            continue;
        }
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("{name}: {e}"))?;
        let value = HeaderValue::from_bytes(value).map_err(|e| format!("{name}: {e}"))?;
        headers.append(name, value);
    }
    if let Some(authority) = request.header(":authority") {
        if let Ok(host) = HeaderValue::from_str(authority) {
            headers.insert(http::header::HOST, host);
        }
    }
    Ok(RequestHead {
        method,
        uri,
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_upstream;

    #[test]
    fn upstream_names_resolve_to_services() {
        let parse = |u| parse_upstream(u, "default");
        assert_eq!(
            parse("outbound|8000||authz.tools.svc.cluster.local"),
            Some(("tools".into(), "authz".into(), 8000))
        );
        assert_eq!(
            parse("authz.tools.svc.cluster.local:9000"),
            Some(("tools".into(), "authz".into(), 9000))
        );
        assert_eq!(
            parse("authz:8000"),
            Some(("default".into(), "authz".into(), 8000))
        );
        assert_eq!(parse("authz"), Some(("default".into(), "authz".into(), 80)));
        assert_eq!(parse("authz:notaport"), None);
        assert_eq!(parse(""), None);
    }
}
