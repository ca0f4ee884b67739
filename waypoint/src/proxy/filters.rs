//! HTTPRoute filters as they act on one request or response: RequestRedirect (answered by the
//! waypoint), URLRewrite and RequestHeaderModifier (before forwarding), ResponseHeaderModifier
//! (on the way back). Mirrors are sent by [`forward`](super::forward).

use ambit_local::manifest::{RequestRedirect, UrlRewrite};
use http::header::{self, HeaderMap, HeaderValue};
use http::{StatusCode, Uri};

use crate::l7::routes::{modify_path, Rule};

/// The request line and headers: cheap to copy for each attempt and each mirror, unlike
/// `http::request::Parts` (its extensions are not `Clone`).
#[derive(Clone, Debug)]
pub struct RequestHead {
    pub method: http::Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

impl RequestHead {
    /// `:authority`, else `host`, as the client sent it (port included).
    pub fn authority(&self) -> String {
        self.uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                self.headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    }

    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// Replaces the path, keeping the query.
    fn set_path(&mut self, path: &str) {
        let path_and_query = match self.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        };
        let mut parts = self.uri.clone().into_parts();
        parts.path_and_query = path_and_query.parse().ok();
        if let Ok(uri) = Uri::from_parts(parts) {
            self.uri = uri;
        }
    }

    /// Replaces the host (both `:authority` and `host`), keeping any port.
    fn set_host(&mut self, host: &str) {
        let authority = self.authority();
        let port = split_host_port(&authority).1;
        let value = match port {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            self.headers.insert(header::HOST, v);
        }
        if self.uri.authority().is_some() {
            let mut parts = self.uri.clone().into_parts();
            parts.authority = value.parse().ok();
            if let Ok(uri) = Uri::from_parts(parts) {
                self.uri = uri;
            }
        }
    }
}

/// `host[:port]` → (host, port).
fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => (h, p.parse().ok()),
        _ => (authority, None),
    }
}

/// The response a RequestRedirect filter answers with: the status and a `location` built from
/// the request with the filter's parts replaced (Gateway API: an unset scheme or host keeps the
/// request's; the port is the filter's, else the well-known port of a changed scheme (left
/// out), else the request's).
pub fn redirect_location(
    head: &RequestHead,
    prefix: Option<&str>,
    redirect: &RequestRedirect,
) -> (StatusCode, String) {
    let authority = head.authority();
    let (request_host, request_port) = split_host_port(&authority);
    let request_scheme = head.uri.scheme_str().unwrap_or("http");
    let scheme = redirect.scheme.as_deref().unwrap_or(request_scheme);
    let host = redirect.hostname.as_deref().unwrap_or(request_host);
    let port = match (redirect.port, &redirect.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => request_port,
    };
    let well_known = matches!((scheme, port), ("http", Some(80)) | ("https", Some(443)));
    let port = match port {
        Some(p) if !well_known => format!(":{p}"),
        _ => String::new(),
    };
    let path = match &redirect.path {
        Some(modifier) => modify_path(head.path(), prefix, modifier),
        None => head.path().to_owned(),
    };
    let query = head
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let status = StatusCode::from_u16(redirect.status_code).unwrap_or(StatusCode::FOUND);
    (status, format!("{scheme}://{host}{port}{path}{query}"))
}

/// URLRewrite: the host and path the backend sees.
pub fn rewrite(head: &mut RequestHead, prefix: Option<&str>, rewrite: &UrlRewrite) {
    if let Some(host) = &rewrite.hostname {
        head.set_host(host);
    }
    if let Some(modifier) = &rewrite.path {
        let path = modify_path(head.path(), prefix, modifier);
        head.set_path(&path);
    }
}

/// The request filters of a matched rule, in Gateway API's order of effect: rewrite, then
/// header changes (a header modifier may set `host` after a hostname rewrite).
pub fn request_filters(head: &mut RequestHead, rule: &Rule, prefix: Option<&str>) {
    if let Some(r) = &rule.rewrite {
        rewrite(head, prefix, r);
    }
    if let Some(ops) = &rule.request_headers {
        ops.apply(&mut head.headers);
    }
}

/// The response filters of a matched rule.
pub fn response_filters(headers: &mut HeaderMap, rule: &Rule) {
    if let Some(ops) = &rule.response_headers {
        ops.apply(headers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambit_local::manifest::PathModifier;

    fn head(uri: &str, host: &str) -> RequestHead {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, host.parse().unwrap());
        RequestHead {
            method: http::Method::GET,
            uri: uri.parse().unwrap(),
            headers,
        }
    }

    #[test]
    fn redirect_locations() {
        let h = head("/old/page?x=1", "echo.default:8080");
        let r = RequestRedirect {
            scheme: None,
            hostname: Some("new.example".into()),
            path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
            port: None,
            status_code: 301,
        };
        assert_eq!(
            redirect_location(&h, Some("/old"), &r),
            (
                StatusCode::MOVED_PERMANENTLY,
                "http://new.example:8080/new/page?x=1".to_owned()
            )
        );
        let r = RequestRedirect {
            scheme: Some("https".into()),
            hostname: None,
            path: Some(PathModifier::ReplaceFullPath("/x".into())),
            port: None,
            status_code: 302,
        };
        assert_eq!(
            redirect_location(&h, None, &r).1,
            "https://echo.default/x?x=1"
        );
        let r = RequestRedirect {
            scheme: Some("https".into()),
            hostname: None,
            path: None,
            port: Some(8443),
            status_code: 302,
        };
        assert_eq!(
            redirect_location(&h, None, &r).1,
            "https://echo.default:8443/old/page?x=1"
        );
    }

    #[test]
    fn rewrites_keep_query_and_port() {
        let mut h = head("/api/v1/items?id=3", "echo:80");
        rewrite(
            &mut h,
            Some("/api/v1"),
            &UrlRewrite {
                hostname: Some("backend".into()),
                path: Some(PathModifier::ReplacePrefixMatch("/v2".into())),
            },
        );
        assert_eq!(h.uri, "/v2/items?id=3");
        assert_eq!(h.headers[header::HOST], "backend:80");
    }
}
