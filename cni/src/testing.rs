//! Test helpers (feature `testing`): a fake Kubernetes API server, enough of one for the node
//! agent's controller and kube-rs' watcher.
//!
//! It serves, over plain HTTP on a local port, `v1` pods and namespaces: list (with
//! `resourceVersion`, and `fieldSelector=spec.nodeName=...` for pods), get, watch (newline-
//! delimited `ADDED`/`MODIFIED`/`DELETED` events from a resource version, `BOOKMARK`s on demand,
//! and, as etcd compaction makes a real server do, an `ERROR` event with a 410 Gone status for a
//! resource version that has expired, which forces the client to relist), and `PATCH` of
//! `pods/{name}/status` with a JSON merge patch, which it records. Tests change objects through
//! it and can cut every open watch, cleanly or in the middle of an event.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// The kinds the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    Namespace,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
        }
    }
}

/// A `PATCH` the server received.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedPatch {
    pub namespace: String,
    pub name: String,
    pub subresource: String,
    pub content_type: String,
    pub body: Value,
}

/// A pod to create with [`FakeApiServer::add_pod`].
/// The Kubernetes UID (`metadata.uid`) the fake API server gives pod `namespace/name`: shaped as
/// the API server's (a v4 UUID), derived from the name so that tests can predict it.
pub fn pod_uid(namespace: &str, name: &str) -> String {
    // FNV-1a, twice with different offsets, for 128 bits.
    let hash = |offset: u64| {
        format!("{namespace}/{name}").bytes().fold(offset, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    };
    let (a, b) = (hash(0xcbf2_9ce4_8422_2325), hash(0x8422_2325_cbf2_9ce4));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

#[derive(Clone, Debug)]
pub struct FakePod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub ip: Option<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub service_account: String,
    pub host_network: bool,
}

impl FakePod {
    /// A running pod on `node` with address `ip`, uid [`pod_uid`]`(namespace, name)`.
    pub fn new(namespace: &str, name: &str, node: &str, ip: Option<IpAddr>) -> Self {
        FakePod {
            namespace: namespace.into(),
            name: name.into(),
            uid: pod_uid(namespace, name),
            node: node.into(),
            ip,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            service_account: name.into(),
            host_network: false,
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    fn to_json(&self) -> Value {
        let status = match self.ip {
            Some(ip) => {
                json!({"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]})
            }
            None => json!({"phase": "Pending"}),
        };
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "labels": self.labels,
                "annotations": self.annotations,
            },
            "spec": {
                "nodeName": self.node,
                "serviceAccountName": self.service_account,
                "hostNetwork": self.host_network,
                "containers": [{"name": "app", "image": "app"}],
            },
            "status": status,
        })
    }
}

struct Watcher {
    kind: Kind,
    node: Option<String>,
    events: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct Inner {
    resource_version: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// Every change: (resource version, kind, event type, object as of then).
    log: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches from a resource version below this get 410 Gone.
    expired_before: u64,
    watchers: Vec<Watcher>,
    /// Deliver the next event only half, then end every watch (and expire, if set).
    cut_next: Option<bool>,
    patches: Vec<RecordedPatch>,
    lists: BTreeMap<Kind, usize>,
    watches: BTreeMap<Kind, usize>,
}

impl Inner {
    /// Stores (or, with `None`, deletes) an object and tells the watchers.
    fn change(&mut self, kind: Kind, namespace: &str, name: &str, object: Option<Value>) {
        let key = (kind, namespace.to_owned(), name.to_owned());
        self.resource_version += 1;
        let rv = self.resource_version;
        let (event_type, mut object) = match object {
            Some(object) => {
                let event_type = if self.objects.contains_key(&key) {
                    "MODIFIED"
                } else {
                    "ADDED"
                };
                (event_type, object)
            }
            None => match self.objects.remove(&key) {
                Some(object) => ("DELETED", object),
                None => return,
            },
        };
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if event_type != "DELETED" {
            self.objects.insert(key, object.clone());
        }
        self.log.push((rv, kind, event_type, object.clone()));
        let line = event_line(event_type, &object);
        let cut = self.cut_next.take();
        self.watchers.retain(|watcher| {
            if !matches_watch(watcher.kind, watcher.node.as_deref(), kind, &object) {
                return true;
            }
            if cut.is_some() {
                let _ = watcher.events.send(line.slice(..line.len() / 2));
                return false;
            }
            watcher.events.send(line.clone()).is_ok()
        });
        if let Some(expire) = cut {
            // Every watch ends, matching or not: a connection cut is for all of them.
            self.watchers.clear();
            if expire {
                self.expired_before = rv;
            }
        }
    }
}

fn matches_watch(watch_kind: Kind, node: Option<&str>, kind: Kind, object: &Value) -> bool {
    watch_kind == kind && node.is_none_or(|node| object["spec"]["nodeName"].as_str() == Some(node))
}

fn event_line(event_type: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": event_type, "object": object}))
        .expect("events serialize");
    line.push(b'\n');
    Bytes::from(line)
}

/// The fake API server; it stops when dropped.
pub struct FakeApiServer {
    address: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
        self.inner.lock().expect("fake api lock").watchers.clear();
    }
}

impl FakeApiServer {
    /// Listens on 127.0.0.1 on a free port.
    pub async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let address = listener.local_addr().expect("local address");
        let inner = Arc::new(Mutex::new(Inner {
            resource_version: 100,
            ..Default::default()
        }));
        let shared = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let inner = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(handle(&inner, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeApiServer {
            address,
            inner,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// A client for this server (plain HTTP, no credentials).
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("valid url"));
        kube::Client::try_from(config).expect("client for the fake API server")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("fake api lock")
    }

    /// Creates the namespace, or replaces its labels.
    pub fn set_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let object = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "uid": format!("uid-ns-{name}"), "labels": labels},
            "spec": {},
            "status": {"phase": "Active"},
        });
        self.lock().change(Kind::Namespace, "", name, Some(object));
    }

    pub fn delete_namespace(&self, name: &str) {
        self.lock().change(Kind::Namespace, "", name, None);
    }

    pub fn add_pod(&self, pod: &FakePod) {
        self.lock()
            .change(Kind::Pod, &pod.namespace, &pod.name, Some(pod.to_json()));
    }

    /// Changes a pod in place (labels, status...) and publishes the change.
    pub fn update_pod(&self, namespace: &str, name: &str, change: impl FnOnce(&mut Value)) {
        let mut inner = self.lock();
        let key = (Kind::Pod, namespace.to_owned(), name.to_owned());
        let mut object = inner.objects.get(&key).cloned().expect("no such pod");
        change(&mut object);
        inner.change(Kind::Pod, namespace, name, Some(object));
    }

    /// Sets (or with `None` removes) a pod label.
    pub fn label_pod(&self, namespace: &str, name: &str, key: &str, value: Option<&str>) {
        self.update_pod(namespace, name, |pod| {
            let labels = &mut pod["metadata"]["labels"];
            if !labels.is_object() {
                *labels = json!({});
            }
            let labels = labels.as_object_mut().expect("labels object");
            match value {
                Some(value) => labels.insert(key.into(), json!(value)),
                None => labels.remove(key),
            };
        });
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) {
        self.lock().change(Kind::Pod, namespace, name, None);
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(Kind::Pod, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    pub fn pod_annotation(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        let pod = self.pod(namespace, name)?;
        pod["metadata"]["annotations"][key]
            .as_str()
            .map(str::to_owned)
    }

    /// Every PATCH received, oldest first.
    pub fn patches(&self) -> Vec<RecordedPatch> {
        self.lock().patches.clone()
    }

    /// How many times `kind` was listed (a relist shows up here).
    pub fn lists(&self, kind: Kind) -> usize {
        self.lock().lists.get(&kind).copied().unwrap_or(0)
    }

    /// How many watches of `kind` were started.
    pub fn watches(&self, kind: Kind) -> usize {
        self.lock().watches.get(&kind).copied().unwrap_or(0)
    }

    /// Open watches.
    pub fn open_watches(&self) -> usize {
        let mut inner = self.lock();
        inner.watchers.retain(|w| !w.events.is_closed());
        inner.watchers.len()
    }

    /// Sends a BOOKMARK at the current resource version to every open watch.
    pub fn bookmark(&self) {
        let mut inner = self.lock();
        let rv = inner.resource_version.to_string();
        inner.watchers.retain(|watcher| {
            let object = json!({
                "apiVersion": "v1",
                "kind": watcher.kind.name(),
                "metadata": {"resourceVersion": rv},
            });
            watcher.events.send(event_line("BOOKMARK", &object)).is_ok()
        });
    }

    /// Ends every open watch cleanly, between events.
    pub fn cut_watches(&self) {
        self.lock().watchers.clear();
    }

    /// The next change reaches the watches only half-written, then every watch ends. With
    /// `expire`, that change's resource version also becomes the oldest one the server still
    /// knows, so clients resuming from before it get 410 Gone and must relist.
    pub fn cut_next_event(&self, expire: bool) {
        self.lock().cut_next = Some(expire);
    }

    /// Expires every resource version before the current one: the next watch resumed from an
    /// older one gets 410 Gone.
    pub fn expire(&self) {
        let mut inner = self.lock();
        inner.expired_before = inner.resource_version;
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).expect("json"))).boxed_unsync())
        .expect("valid response")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(code, &status_object(code.as_u16(), reason, message))
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn query(request: &Request<Incoming>) -> BTreeMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(inner: &Arc<Mutex<Inner>>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let params = query(&request);
    match (request.method().clone(), segments.as_slice()) {
        (Method::GET, ["api", "v1", "pods"]) => collection(inner, Kind::Pod, &params),
        (Method::GET, ["api", "v1", "namespaces"]) => collection(inner, Kind::Namespace, &params),
        (Method::GET, ["api", "v1", "namespaces", name]) => get(inner, Kind::Namespace, "", name),
        (Method::GET, ["api", "v1", "namespaces", namespace, "pods", name]) => {
            get(inner, Kind::Pod, namespace, name)
        }
        (Method::PATCH, ["api", "v1", "namespaces", namespace, "pods", name, "status"]) => {
            let (namespace, name) = (namespace.to_string(), name.to_string());
            patch_status(inner, &namespace, &name, request).await
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the fake serves no such path",
        ),
    }
}

fn get(inner: &Arc<Mutex<Inner>>, kind: Kind, namespace: &str, name: &str) -> Response<Body> {
    let inner = inner.lock().expect("fake api lock");
    match inner
        .objects
        .get(&(kind, namespace.to_owned(), name.to_owned()))
    {
        Some(object) => full(StatusCode::OK, object),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} \"{name}\" not found", kind.name().to_lowercase()),
        ),
    }
}

fn node_selector(params: &BTreeMap<String, String>) -> Option<String> {
    params.get("fieldSelector").and_then(|selector| {
        selector
            .split(',')
            .find_map(|term| term.strip_prefix("spec.nodeName="))
            .map(str::to_owned)
    })
}

fn collection(
    inner: &Arc<Mutex<Inner>>,
    kind: Kind,
    params: &BTreeMap<String, String>,
) -> Response<Body> {
    let node = node_selector(params);
    let watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    let mut inner = inner.lock().expect("fake api lock");
    if !watch {
        *inner.lists.entry(kind).or_default() += 1;
        let items: Vec<Value> = inner
            .objects
            .iter()
            .filter(|((k, _, _), object)| matches_watch(kind, node.as_deref(), *k, object))
            .map(|(_, object)| object.clone())
            .collect();
        let list = json!({
            "apiVersion": "v1",
            "kind": format!("{}List", kind.name()),
            "metadata": {"resourceVersion": inner.resource_version.to_string()},
            "items": items,
        });
        return full(StatusCode::OK, &list);
    }
    *inner.watches.entry(kind).or_default() += 1;
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(inner.resource_version);
    let (events, receiver) = mpsc::unbounded_channel();
    if from < inner.expired_before {
        // As the real server does: 200, then one ERROR event, then the end of the stream.
        let gone = status_object(
            410,
            "Expired",
            &format!(
                "too old resource version: {from} ({})",
                inner.expired_before
            ),
        );
        let _ = events.send(event_line("ERROR", &gone));
        drop(events);
    } else {
        for (rv, k, event_type, object) in &inner.log {
            if *rv > from && matches_watch(kind, node.as_deref(), *k, object) {
                let _ = events.send(event_line(event_type, object));
            }
        }
        inner.watchers.push(Watcher { kind, node, events });
    }
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let chunk = receiver.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), receiver))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed_unsync(StreamBody::new(stream.boxed())))
        .expect("valid response")
}

async fn patch_status(
    inner: &Arc<Mutex<Inner>>,
    namespace: &str,
    name: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let Ok(body) = request.into_body().collect().await else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body");
    };
    let Ok(patch) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the patch is not JSON",
        );
    };
    let mut inner = inner.lock().expect("fake api lock");
    inner.patches.push(RecordedPatch {
        namespace: namespace.into(),
        name: name.into(),
        subresource: "status".into(),
        content_type: content_type.clone(),
        body: patch.clone(),
    });
    if content_type != "application/merge-patch+json" {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "the fake takes merge patches only",
        );
    }
    let key = (Kind::Pod, namespace.to_owned(), name.to_owned());
    let Some(mut object) = inner.objects.get(&key).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pods \"{name}\" not found"),
        );
    };
    merge_patch(&mut object, &patch);
    inner.change(Kind::Pod, namespace, name, Some(object));
    let object = inner.objects.get(&key).cloned().expect("just stored");
    full(StatusCode::OK, &object)
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let object = target.as_object_mut().expect("made an object");
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_sets_and_removes() {
        let mut doc = json!({"metadata": {"annotations": {"a": "1", "b": "2"}}});
        merge_patch(
            &mut doc,
            &json!({"metadata": {"annotations": {"a": null, "c": "3"}}}),
        );
        assert_eq!(
            doc,
            json!({"metadata": {"annotations": {"b": "2", "c": "3"}}})
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(
            percent_decode("spec.nodeName%3Dnode-1"),
            "spec.nodeName=node-1"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
