//! `proxy_get_property` / `proxy_set_property`: Envoy's attribute paths (segments joined by NUL)
//! with Envoy's encodings: strings raw, integers 8 bytes little-endian, booleans one byte,
//! timestamps as integer nanoseconds, maps in the pairs format.

use std::time::UNIX_EPOCH;

use crate::abi::{encode_pairs, Status};
use crate::context::{HostState, StreamData, MAX_FILTER_STATE};

fn int(value: i64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

fn boolean(value: bool) -> Vec<u8> {
    vec![value as u8]
}

fn map<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let pairs: Vec<(&[u8], &[u8])> = pairs.into_iter().map(|(k, v)| (k.as_bytes(), v)).collect();
    encode_pairs(pairs)
}

/// The stream the effective context is about, read-only.
fn stream(state: &HostState) -> Option<&StreamData> {
    state
        .stream
        .as_deref()
        .filter(|s| s.context_id == state.effective_context)
}

fn header<'a>(pairs: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// Looks a property up; `None` is `NotFound`.
pub(crate) fn get(state: &HostState, path: &[u8]) -> Option<Vec<u8>> {
    let path = std::str::from_utf8(path).ok()?;
    let segments: Vec<&str> = path.split('\0').collect();
    let key = segments.join(".");
    if let Some(stream) = stream(state) {
        if let Some(value) = stream.filter_state.get(&key) {
            return Some(value.clone());
        }
        if let Some(value) = stream_property(stream, &segments) {
            return Some(value);
        }
    }
    if let Some(value) = state.root_filter_state.get(&key) {
        return Some(value.clone());
    }
    let config = &state.plugin.config;
    match segments.as_slice() {
        ["plugin_name"] => Some(config.name.clone().into_bytes()),
        ["plugin_root_id"] => Some(config.root_id.clone().into_bytes()),
        ["plugin_vm_id"] => Some(config.vm_id.clone().into_bytes()),
        ["node", "id"] => Some(config.node_id.clone().into_bytes()),
        ["node", "metadata"] => Some(map(config
            .node_metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_bytes())))),
        ["node", "metadata", key] => config
            .node_metadata
            .get(*key)
            .map(|v| v.clone().into_bytes()),
        _ => None,
    }
}

fn stream_property(stream: &StreamData, segments: &[&str]) -> Option<Vec<u8>> {
    let info = &stream.info;
    let request = &stream.request_headers;
    let path = header(request, ":path").unwrap_or(b"");
    let (url_path, query) = match path.iter().position(|&b| b == b'?') {
        Some(at) => (&path[..at], &path[at + 1..]),
        None => (path, &b""[..]),
    };
    let owned = |v: Option<&[u8]>| v.map(<[u8]>::to_vec);
    let text = |v: Option<&String>| v.map(|s| s.clone().into_bytes());
    match segments {
        ["request", "path"] => Some(path.to_vec()),
        ["request", "url_path"] => Some(url_path.to_vec()),
        ["request", "query"] => Some(query.to_vec()),
        ["request", "host"] => owned(header(request, ":authority")),
        ["request", "scheme"] => owned(header(request, ":scheme")),
        ["request", "method"] => owned(header(request, ":method")),
        ["request", "id"] => owned(header(request, "x-request-id")),
        ["request", "useragent"] => owned(header(request, "user-agent")),
        ["request", "referer"] => owned(header(request, "referer")),
        ["request", "protocol"] => Some(b"HTTP/1.1".to_vec()),
        ["request", "time"] => info
            .started
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| int(d.as_nanos() as i64)),
        ["request", "headers"] => {
            Some(map(request.iter().map(|(k, v)| (k.as_str(), v.as_slice()))))
        }
        ["request", "headers", name] => owned(header(request, name)),
        ["response", "code"] => header(&stream.response_headers, ":status")
            .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
            .map(int),
        ["response", "headers"] => Some(map(stream
            .response_headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice())))),
        ["response", "headers", name] => owned(header(&stream.response_headers, name)),
        ["source", "address"] => info.source.map(|a| a.to_string().into_bytes()),
        ["source", "port"] => info.source.map(|a| int(a.port() as i64)),
        ["destination", "address"] => info.destination.map(|a| a.to_string().into_bytes()),
        ["destination", "port"] => info.destination.map(|a| int(a.port() as i64)),
        ["connection", "id"] => Some(int(info.connection_id as i64)),
        ["connection", "mtls"] => Some(boolean(info.mtls)),
        ["connection", "uri_san_peer_certificate"] | ["source", "principal"] => {
            text(info.source_principal.as_ref())
        }
        ["connection", "uri_san_local_certificate"] => text(info.local_principal.as_ref()),
        ["source", "namespace"] => text(info.source_namespace.as_ref()),
        ["source", "workload"] => text(info.source_workload.as_ref()),
        ["destination", "service"] | ["xds", "cluster_name"] => {
            text(info.destination_service.as_ref())
        }
        ["downstream_peer", field] | ["filter_state", "downstream_peer", field] => match *field {
            "namespace" => text(info.source_namespace.as_ref()),
            "workload" => text(info.source_workload.as_ref()),
            "identity" => text(info.source_principal.as_ref()),
            _ => None,
        },
        _ => None,
    }
}

/// Stores a value for the request's later filters and callbacks (Envoy's filter state), or,
/// from the root context, for the VM's root callbacks. The Rust SDK traps on anything but `Ok`
/// here, so a full store drops the value (with a warning) rather than refusing it.
pub(crate) fn set(state: &mut HostState, path: &[u8], value: Vec<u8>) -> Result<(), Status> {
    let path = std::str::from_utf8(path).map_err(|_| Status::BadArgument)?;
    if path.is_empty() {
        return Err(Status::BadArgument);
    }
    let key = path.split('\0').collect::<Vec<_>>().join(".");
    let dropped = {
        let store = match state.effective_stream() {
            Some(stream) => &mut stream.filter_state,
            None => &mut state.root_filter_state,
        };
        if store.len() >= MAX_FILTER_STATE && !store.contains_key(&key) {
            Some(key)
        } else {
            store.insert(key, value);
            None
        }
    };
    if let Some(key) = dropped {
        tracing::warn!(plugin = %state.plugin.config.name, property = %key,
            "proxy_set_property: too many properties set; value dropped");
    }
    Ok(())
}
