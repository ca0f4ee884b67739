//! The delta ADS client: one long-lived `DeltaAggregatedResources` stream to istiod, subscribed
//! (wildcard) to workloads/services (`istio.workload.Address`) and L4 policies
//! (`istio.security.Authorization`), feeding the [`StateStore`].
//!
//! Every response is applied resource by resource: a resource that fails to decode or convert is
//! NACKed (`error_detail`, code INVALID_ARGUMENT, naming it and the field) and its last good
//! version stays; the others are applied and a new snapshot swapped in. A response whose valid
//! resources conflict with the rest of the state (a duplicate IP, say) is undone whole and
//! NACKed. Disconnected, the last good state keeps serving; the client reconnects with capped
//! exponential backoff and resubscribes with `initial_resource_versions`, so istiod sends only
//! what changed and names what was removed meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::rbac::Authorization;
use ambit_mesh::state::{Snapshot, StateStore};
use http::uri::PathAndQuery;
use tokio::sync::{mpsc, watch};
use tonic_prost::ProstCodec;

use crate::convert::{self, AddressResource, ConvertError};
use crate::proto::envoy::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, DELTA_ADS_PATH};
use crate::proto::google::{Any, Status, Struct};
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use crate::transport::{ControlPlane, TransportError};

/// The types ztunnel subscribes to, in the order it sends the initial requests.
pub const TYPE_URLS: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];

/// Istio's ztunnel accepts xDS messages up to 200 MiB (a large mesh's initial push).
const MAX_MESSAGE: usize = 200 * 1024 * 1024;

/// gRPC `INVALID_ARGUMENT`, the code of a NACK.
const INVALID_ARGUMENT: i32 = 3;

/// Why an ADS stream ended.
#[derive(Debug, thiserror::Error)]
pub enum AdsError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("istiod at {address} is not accepting calls: {source}")]
    NotReady {
        address: String,
        source: hyper::Error,
    },
    #[error("the xDS stream with istiod failed: {code:?}: {message}")]
    Stream { code: tonic::Code, message: String },
    #[error("istiod ended the xDS stream")]
    Ended,
}

impl From<tonic::Status> for AdsError {
    fn from(status: tonic::Status) -> Self {
        AdsError::Stream {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// Who this ztunnel is, as istiod learns it from the `Node` (Istio's env names in brackets).
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    /// The ztunnel pod's IP (`INSTANCE_IP`).
    pub ip: String,
    /// `POD_NAME`.
    pub pod_name: String,
    /// `POD_NAMESPACE`.
    pub pod_namespace: String,
    /// The Kubernetes node (`NODE_NAME`).
    pub node_name: String,
    /// `ISTIO_META_CLUSTER_ID` / `CLUSTER_ID`.
    pub cluster_id: String,
}

impl NodeInfo {
    /// `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`: istiod recognises a
    /// ztunnel by the `ztunnel` type and finds its pod from the rest.
    pub fn node_id(&self) -> String {
        format!(
            "ztunnel~{}~{}.{}~{}.svc.cluster.local",
            self.ip, self.pod_name, self.pod_namespace, self.pod_namespace
        )
    }

    /// The `Node` sent with the initial requests, with the metadata Istio's ztunnel sends.
    pub fn node(&self) -> Node {
        let mut metadata = Struct::from_strings([
            ("NAME", self.pod_name.as_str()),
            ("NAMESPACE", self.pod_namespace.as_str()),
            ("INSTANCE_IPS", self.ip.as_str()),
            ("NODE_NAME", self.node_name.as_str()),
        ]);
        if !self.cluster_id.is_empty() {
            metadata.fields.insert(
                "CLUSTER_ID".into(),
                crate::proto::google::Value::string(self.cluster_id.clone()),
            );
        }
        Node {
            id: self.node_id(),
            metadata: Some(metadata),
            user_agent_name: "ambit-ztunnel".into(),
            ..Default::default()
        }
    }
}

/// Reconnection pacing.
#[derive(Clone, Debug)]
pub struct AdsSettings {
    /// First wait after a failed or ended stream; doubled up to `max_backoff`, and back to this
    /// once a stream has delivered a response.
    pub initial_backoff: Duration,
    /// Istio's ztunnel caps at 15 s.
    pub max_backoff: Duration,
}

impl Default for AdsSettings {
    fn default() -> Self {
        AdsSettings {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
        }
    }
}

/// A resource the state holds, with the version istiod gave it.
#[derive(Clone, Debug)]
struct Held<T> {
    version: String,
    value: T,
}

/// Every accepted resource, by xDS name. Survives reconnects: it is the last good state.
#[derive(Default)]
struct Resources {
    addresses: BTreeMap<String, Held<AddressResource>>,
    policies: BTreeMap<String, Held<Authorization>>,
}

impl Resources {
    fn snapshot(&self) -> Result<Snapshot, ambit_mesh::state::StateError> {
        let mut workloads = Vec::new();
        let mut services = Vec::new();
        for held in self.addresses.values() {
            match &held.value {
                AddressResource::Workload(w) => workloads.push(w.clone()),
                AddressResource::Service(s) => services.push(s.clone()),
            }
        }
        let policies = self.policies.values().map(|h| h.value.clone()).collect();
        Snapshot::build(workloads, services, policies)
    }

    fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        fn of<T>(map: &BTreeMap<String, Held<T>>) -> BTreeMap<String, String> {
            map.iter()
                .map(|(name, held)| (name.clone(), held.version.clone()))
                .collect()
        }
        match type_url {
            ADDRESS_TYPE_URL => of(&self.addresses),
            AUTHORIZATION_TYPE_URL => of(&self.policies),
            _ => BTreeMap::new(),
        }
    }
}

/// What a response changed, to put back if the result is refused as a whole.
type Undo<T> = Vec<(String, Option<Held<T>>)>;

fn apply_delta<T>(
    map: &mut BTreeMap<String, Held<T>>,
    response: &DeltaDiscoveryResponse,
    convert: impl Fn(&str, Option<&Any>) -> Result<T, ConvertError>,
    errors: &mut Vec<String>,
) -> Undo<T> {
    let mut undo = Vec::new();
    for name in &response.removed_resources {
        if let Some(old) = map.remove(name) {
            undo.push((name.clone(), Some(old)));
        }
    }
    for resource in &response.resources {
        match convert(&resource.name, resource.resource.as_ref()) {
            Ok(value) => {
                let held = Held {
                    version: resource.version.clone(),
                    value,
                };
                let old = map.insert(resource.name.clone(), held);
                undo.push((resource.name.clone(), old));
            }
            Err(e) => {
                tracing::error!(error = %e, version = %resource.version, "xDS resource rejected; keeping its last good version");
                errors.push(e.to_string());
            }
        }
    }
    undo
}

fn revert<T>(map: &mut BTreeMap<String, Held<T>>, undo: Undo<T>) {
    for (name, old) in undo.into_iter().rev() {
        match old {
            Some(old) => map.insert(name, old),
            None => map.remove(&name),
        };
    }
}

/// The delta ADS client. [`run`](Self::run) it on a task; read readiness from
/// [`readiness`](Self::readiness).
pub struct AdsClient {
    plane: ControlPlane,
    node: NodeInfo,
    settings: AdsSettings,
    store: Arc<StateStore>,
    resources: Resources,
    /// Types that have not had their first response yet.
    awaiting_first: BTreeSet<&'static str>,
    ready: watch::Sender<bool>,
}

impl AdsClient {
    pub fn new(
        plane: ControlPlane,
        node: NodeInfo,
        settings: AdsSettings,
        store: Arc<StateStore>,
    ) -> Self {
        AdsClient {
            plane,
            node,
            settings,
            store,
            resources: Resources::default(),
            awaiting_first: TYPE_URLS.into_iter().collect(),
            ready: watch::channel(false).0,
        }
    }

    /// Turns `true` once istiod's first response for every subscribed type has been applied
    /// (Istio's ztunnel is not ready before either), and stays so through reconnects: the
    /// last good state keeps serving.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Streams from istiod forever, reconnecting with backoff.
    pub async fn run(mut self) {
        let mut backoff = self.settings.initial_backoff;
        loop {
            let mut delivered = false;
            let err = match self.session(&mut delivered).await {
                Ok(never) => match never {},
                Err(e) => e,
            };
            if delivered {
                backoff = self.settings.initial_backoff;
            }
            tracing::warn!(
                error = %err,
                retry_in = ?backoff,
                address = self.plane.address(),
                "xDS stream to istiod lost; keeping the last good state"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.settings.max_backoff);
        }
    }

    /// One stream, from connect to failure. `delivered` turns true at its first response.
    async fn session(
        &mut self,
        delivered: &mut bool,
    ) -> Result<std::convert::Infallible, AdsError> {
        let connection = self.plane.connect().await?;
        let mut grpc = self
            .plane
            .grpc(connection)
            .max_decoding_message_size(MAX_MESSAGE);
        // Room for both initial requests and an ACK each: the sender never waits on istiod.
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(TYPE_URLS.len() * 4);
        for (i, type_url) in TYPE_URLS.into_iter().enumerate() {
            let initial_resource_versions = self.resources.versions(type_url);
            tracing::debug!(
                type_url,
                known = initial_resource_versions.len(),
                "subscribing"
            );
            let request = DeltaDiscoveryRequest {
                // The node is only needed on the stream's first request.
                node: (i == 0).then(|| self.node.node()),
                type_url: type_url.to_owned(),
                initial_resource_versions,
                ..Default::default()
            };
            tx.try_send(request)
                .expect("the channel has room for the initial requests");
        }
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|request| (request, rx))
        });
        let mut request = tonic::Request::new(outbound);
        self.plane.authorize(&mut request)?;
        grpc.ready().await.map_err(|source| AdsError::NotReady {
            address: self.plane.address().to_owned(),
            source,
        })?;
        let codec = ProstCodec::<DeltaDiscoveryRequest, DeltaDiscoveryResponse>::default();
        let mut inbound = grpc
            .streaming(request, PathAndQuery::from_static(DELTA_ADS_PATH), codec)
            .await?
            .into_inner();
        tracing::info!(
            address = self.plane.address(),
            "xDS stream to istiod established"
        );
        loop {
            let Some(response) = inbound.message().await? else {
                return Err(AdsError::Ended);
            };
            *delivered = true;
            let nack = self.apply(&response);
            let reply = DeltaDiscoveryRequest {
                type_url: response.type_url.clone(),
                response_nonce: response.nonce.clone(),
                error_detail: nack.map(|message| Status {
                    code: INVALID_ARGUMENT,
                    message,
                    details: Vec::new(),
                }),
                ..Default::default()
            };
            self.mark_received(&response.type_url);
            if tx.send(reply).await.is_err() {
                return Err(AdsError::Ended);
            }
        }
    }

    /// Applies one response to the state; returns the NACK reason if anything was refused.
    fn apply(&mut self, response: &DeltaDiscoveryResponse) -> Option<String> {
        let mut errors = Vec::new();
        let resources = &mut self.resources;
        let result = match response.type_url.as_str() {
            ADDRESS_TYPE_URL => {
                let undo = apply_delta(
                    &mut resources.addresses,
                    response,
                    convert::address_from_any,
                    &mut errors,
                );
                let snapshot = resources.snapshot();
                if snapshot.is_err() {
                    revert(&mut resources.addresses, undo);
                }
                snapshot
            }
            AUTHORIZATION_TYPE_URL => {
                let undo = apply_delta(
                    &mut resources.policies,
                    response,
                    convert::authorization_from_any,
                    &mut errors,
                );
                let snapshot = resources.snapshot();
                if snapshot.is_err() {
                    revert(&mut resources.policies, undo);
                }
                snapshot
            }
            other => {
                // Istio's ztunnel acknowledges types it does not know, so neither side loops.
                tracing::warn!(
                    type_url = other,
                    "xDS response of an unsubscribed type ignored"
                );
                return None;
            }
        };
        match result {
            Ok(snapshot) => {
                tracing::debug!(
                    type_url = %response.type_url,
                    updated = response.resources.len(),
                    removed = response.removed_resources.len(),
                    "xDS update applied"
                );
                self.store.replace(snapshot);
            }
            Err(e) => {
                tracing::error!(error = %e, "xDS update refused whole: it conflicts with the current state; keeping the last good state");
                errors.push(format!(
                    "the update conflicts with the rest of the state and was not applied: {e}"
                ));
            }
        }
        (!errors.is_empty()).then(|| errors.join("; "))
    }

    fn mark_received(&mut self, type_url: &str) {
        if self.awaiting_first.remove(type_url) && self.awaiting_first.is_empty() {
            tracing::info!("first xDS responses applied; state ready");
            self.ready.send_replace(true);
        }
    }
}
