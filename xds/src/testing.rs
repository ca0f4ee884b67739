//! Test helpers (feature `testing`): a stand-in istiod speaking delta ADS and the Istio CA
//! service over real gRPC, with knobs to push, update and remove resources, watch the client's
//! ACKs/NACKs and subscriptions, drop streams, refuse new ones, and make the CA fail or answer
//! garbage. Plus the model → proto conversions to feed it the local format's state.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ambit_mesh::identity::{CertificateAuthority, Identity};
use ambit_mesh::rbac;
use ambit_mesh::state::{self, local::LocalConfig};
use futures_util::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

use crate::proto::ca::{
    IstioCertificateRequest, IstioCertificateResponse, CREATE_CERTIFICATE_PATH,
    IMPERSONATED_IDENTITY,
};
use crate::proto::envoy::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource, DELTA_ADS_PATH,
};
use crate::proto::google::{Any, Empty};
use crate::proto::{security, to_any, workload, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

/// How long the `next_*` observers wait before failing the test.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the stand-in CA does with a CSR.
#[derive(Clone, Debug)]
pub enum CaMode {
    /// Sign with the [`CertificateAuthority`], for `ImpersonatedIdentity` (or the CSR's SAN).
    Sign,
    /// Answer this gRPC error.
    Fail(tonic::Code, String),
    /// Answer this `cert_chain` verbatim.
    Garbage(Vec<String>),
    /// Sign, but for this identity instead of the one asked for.
    WrongIdentity(Identity),
}

/// One `CreateCertificate` call as the stand-in saw it.
#[derive(Clone, Debug)]
pub struct CaCall {
    pub csr: String,
    pub validity_duration: i64,
    pub impersonated_identity: Option<String>,
    pub authorization: Option<String>,
    pub cluster_id: Option<String>,
}

/// One open ADS stream.
struct StreamHandle {
    id: u64,
    tx: mpsc::UnboundedSender<Result<DeltaDiscoveryResponse, Status>>,
    subscribed: BTreeSet<String>,
}

#[derive(Default)]
struct AdsState {
    /// type URL → name → (version, resource).
    resources: BTreeMap<String, BTreeMap<String, (String, Any)>>,
    streams: Vec<StreamHandle>,
    next_version: u64,
}

struct Shared {
    ads: Mutex<AdsState>,
    requests: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    /// `authorization` header of each ADS stream.
    ads_authorization: Mutex<Vec<Option<String>>>,
    refuse: AtomicBool,
    streams_opened: AtomicUsize,
    streams_refused: AtomicUsize,
    next_id: AtomicU64,
    ca: CertificateAuthority,
    ca_mode: Mutex<CaMode>,
    ca_calls: mpsc::UnboundedSender<CaCall>,
}

impl Shared {
    fn nonce(&self) -> String {
        format!("nonce-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

/// A stand-in istiod on 127.0.0.1; dropping it stops it (open streams break).
pub struct FakeIstiod {
    pub address: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    requests: tokio::sync::Mutex<mpsc::UnboundedReceiver<DeltaDiscoveryRequest>>,
    ca_calls: tokio::sync::Mutex<mpsc::UnboundedReceiver<CaCall>>,
    task: JoinHandle<()>,
}

impl Drop for FakeIstiod {
    fn drop(&mut self) {
        self.task.abort();
        self.drop_streams();
    }
}

impl FakeIstiod {
    /// A plaintext stand-in (`http://`), signing with `ca`.
    pub async fn start(ca: CertificateAuthority) -> FakeIstiod {
        Self::start_inner(ca, None).await
    }

    /// A TLS stand-in (`https://`) serving `tls` (see [`ServingCert`]).
    pub async fn start_tls(ca: CertificateAuthority, tls: Arc<rustls::ServerConfig>) -> FakeIstiod {
        Self::start_inner(ca, Some(tls)).await
    }

    async fn start_inner(
        ca: CertificateAuthority,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> FakeIstiod {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().unwrap();
        let (requests_tx, requests_rx) = mpsc::unbounded_channel();
        let (ca_tx, ca_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            ads: Mutex::new(AdsState::default()),
            requests: requests_tx,
            ads_authorization: Mutex::new(Vec::new()),
            refuse: AtomicBool::new(false),
            streams_opened: AtomicUsize::new(0),
            streams_refused: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            ca,
            ca_mode: Mutex::new(CaMode::Sign),
            ca_calls: ca_tx,
        });
        let is_tls = tls.is_some();
        let task = tokio::spawn(accept_loop(listener, tls, shared.clone()));
        FakeIstiod {
            address,
            tls: is_tls,
            shared,
            requests: tokio::sync::Mutex::new(requests_rx),
            ca_calls: tokio::sync::Mutex::new(ca_rx),
            task,
        }
    }

    /// The address to give `XDS_ADDRESS` / `CA_ADDRESS`: `http://127.0.0.1:<port>`, or
    /// `https://localhost:<port>` for TLS (the serving certificate's name).
    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.address.port())
        } else {
            format!("http://{}", self.address)
        }
    }

    /// The CA the stand-in signs with.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.shared.ca
    }

    /// Adds or replaces `updated` and deletes `removed` (names) of `type_url`, and pushes one
    /// delta response with exactly that to every stream subscribed to the type.
    pub fn push(&self, type_url: &str, updated: Vec<(String, Any)>, removed: Vec<String>) {
        let mut ads = self.shared.ads.lock().unwrap();
        ads.next_version += 1;
        let version = format!("v{}", ads.next_version);
        let store = ads.resources.entry(type_url.to_owned()).or_default();
        let mut resources = Vec::new();
        for (name, any) in updated {
            store.insert(name.clone(), (version.clone(), any.clone()));
            resources.push(Resource {
                version: version.clone(),
                resource: Some(any),
                name,
                ..Default::default()
            });
        }
        for name in &removed {
            store.remove(name);
        }
        for stream in ads
            .streams
            .iter()
            .filter(|s| s.subscribed.contains(type_url))
        {
            let _ = stream.tx.send(Ok(DeltaDiscoveryResponse {
                type_url: type_url.to_owned(),
                resources: resources.clone(),
                removed_resources: removed.clone(),
                nonce: self.shared.nonce(),
                system_version_info: version.clone(),
            }));
        }
    }

    /// Pushes workloads and services, named as istiod names them (uid, `namespace/hostname`).
    pub fn push_addresses(&self, addresses: Vec<workload::Address>) {
        let updated = addresses
            .into_iter()
            .map(|a| (address_name(&a), to_any(ADDRESS_TYPE_URL, &a)))
            .collect();
        self.push(ADDRESS_TYPE_URL, updated, Vec::new());
    }

    /// Pushes policies, named `namespace/name`.
    pub fn push_policies(&self, policies: Vec<security::Authorization>) {
        let updated = policies
            .into_iter()
            .map(|p| {
                (
                    format!("{}/{}", p.namespace, p.name),
                    to_any(AUTHORIZATION_TYPE_URL, &p),
                )
            })
            .collect();
        self.push(AUTHORIZATION_TYPE_URL, updated, Vec::new());
    }

    /// Pushes a whole local-format configuration (what a test wrote as YAML).
    pub fn push_config(&self, config: &LocalConfig) {
        let mut addresses: Vec<_> = config.workloads.iter().map(address_of_workload).collect();
        addresses.extend(config.services.iter().map(address_of_service));
        self.push_addresses(addresses);
        self.push_policies(config.policies.iter().map(authorization_proto).collect());
    }

    /// Removes resources of `type_url` by name.
    pub fn remove(&self, type_url: &str, names: &[&str]) {
        self.push(
            type_url,
            Vec::new(),
            names.iter().map(|n| n.to_string()).collect(),
        );
    }

    /// The next request the client sent on any stream (subscription, ACK or NACK).
    pub async fn next_request(&self) -> DeltaDiscoveryRequest {
        let mut requests = self.requests.lock().await;
        tokio::time::timeout(OBSERVE_TIMEOUT, requests.recv())
            .await
            .expect("no xDS request from the client in time")
            .expect("stand-in running")
    }

    /// Skips requests until one matches.
    pub async fn next_request_where(
        &self,
        mut pred: impl FnMut(&DeltaDiscoveryRequest) -> bool,
    ) -> DeltaDiscoveryRequest {
        loop {
            let request = self.next_request().await;
            if pred(&request) {
                return request;
            }
        }
    }

    /// Ends every open ADS stream with UNAVAILABLE, as an istiod restart would.
    pub fn drop_streams(&self) {
        let mut ads = self.shared.ads.lock().unwrap();
        for stream in ads.streams.drain(..) {
            let _ = stream.tx.send(Err(Status::unavailable(
                "the stand-in istiod dropped the stream",
            )));
        }
    }

    /// While set, new ADS streams fail at once with UNAVAILABLE.
    pub fn refuse_streams(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::SeqCst);
    }

    /// ADS streams accepted so far.
    pub fn streams_opened(&self) -> usize {
        self.shared.streams_opened.load(Ordering::SeqCst)
    }

    /// ADS streams refused (see [`refuse_streams`](Self::refuse_streams)).
    pub fn streams_refused(&self) -> usize {
        self.shared.streams_refused.load(Ordering::SeqCst)
    }

    /// The `authorization` header each accepted ADS stream carried.
    pub fn ads_authorization(&self) -> Vec<Option<String>> {
        self.shared.ads_authorization.lock().unwrap().clone()
    }

    pub fn set_ca_mode(&self, mode: CaMode) {
        *self.shared.ca_mode.lock().unwrap() = mode;
    }

    /// The next `CreateCertificate` call.
    pub async fn next_ca_call(&self) -> CaCall {
        let mut calls = self.ca_calls.lock().await;
        tokio::time::timeout(OBSERVE_TIMEOUT, calls.recv())
            .await
            .expect("no CA call in time")
            .expect("stand-in running")
    }
}

fn address_name(address: &workload::Address) -> String {
    match &address.r#type {
        Some(workload::address::Type::Workload(w)) => w.uid.clone(),
        Some(workload::address::Type::Service(s)) => format!("{}/{}", s.namespace, s.hostname),
        None => String::new(),
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shared: Arc<Shared>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(tls) => serve_connection(tls, shared).await,
                    Err(e) => tracing::debug!(error = %e, "stand-in istiod: TLS handshake failed"),
                },
                None => serve_connection(tcp, shared).await,
            }
        });
    }
}

async fn serve_connection<IO>(io: IO, shared: Arc<Shared>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(shared, request).await) }
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), service)
        .await;
}

async fn route(
    shared: Arc<Shared>,
    request: http::Request<hyper::body::Incoming>,
) -> http::Response<tonic::body::Body> {
    match request.uri().path() {
        DELTA_ADS_PATH => {
            let codec = ProstCodec::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>::default();
            tonic::server::Grpc::new(codec)
                .streaming(AdsService(shared), request)
                .await
        }
        CREATE_CERTIFICATE_PATH => {
            let codec = ProstCodec::<IstioCertificateResponse, IstioCertificateRequest>::default();
            tonic::server::Grpc::new(codec)
                .unary(CaService(shared), request)
                .await
        }
        path => Status::unimplemented(format!("{path} is not served by the stand-in istiod"))
            .into_http(),
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

struct AdsService(Arc<Shared>);

impl tower_service::Service<Request<Streaming<DeltaDiscoveryRequest>>> for AdsService {
    type Response = Response<ResponseStream>;
    type Error = Status;
    type Future = BoxFuture<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            if shared.refuse.load(Ordering::SeqCst) {
                shared.streams_refused.fetch_add(1, Ordering::SeqCst);
                return Err(Status::unavailable("the stand-in istiod refuses streams"));
            }
            shared.streams_opened.fetch_add(1, Ordering::SeqCst);
            shared.ads_authorization.lock().unwrap().push(
                request
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            );
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = mpsc::unbounded_channel();
            shared.ads.lock().unwrap().streams.push(StreamHandle {
                id,
                tx,
                subscribed: BTreeSet::new(),
            });
            tokio::spawn(read_requests(shared, id, request.into_inner()));
            let stream: ResponseStream =
                Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|item| (item, rx))
                }));
            Ok(Response::new(stream))
        })
    }
}

/// Reads one stream's requests: records them, and answers each subscription with the current
/// resources of its type, minus what the client already holds at the same version, plus the
/// names it holds that are gone (as istiod does with `initial_resource_versions`).
async fn read_requests(
    shared: Arc<Shared>,
    id: u64,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
) {
    while let Ok(Some(request)) = inbound.message().await {
        let _ = shared.requests.send(request.clone());
        if !request.response_nonce.is_empty() {
            continue;
        }
        let mut ads = shared.ads.lock().unwrap();
        let empty = BTreeMap::new();
        let store = ads.resources.get(&request.type_url).unwrap_or(&empty);
        let resources = store
            .iter()
            .filter(|(name, (version, _))| {
                request.initial_resource_versions.get(*name) != Some(version)
            })
            .map(|(name, (version, any))| Resource {
                version: version.clone(),
                resource: Some(any.clone()),
                name: name.clone(),
                ..Default::default()
            })
            .collect();
        let removed_resources = request
            .initial_resource_versions
            .keys()
            .filter(|name| !store.contains_key(*name))
            .cloned()
            .collect();
        let response = DeltaDiscoveryResponse {
            type_url: request.type_url.clone(),
            resources,
            removed_resources,
            nonce: shared.nonce(),
            system_version_info: format!("v{}", ads.next_version),
        };
        if let Some(stream) = ads.streams.iter_mut().find(|s| s.id == id) {
            stream.subscribed.insert(request.type_url.clone());
            let _ = stream.tx.send(Ok(response));
        }
    }
    shared.ads.lock().unwrap().streams.retain(|s| s.id != id);
}

struct CaService(Arc<Shared>);

impl tower_service::Service<Request<IstioCertificateRequest>> for CaService {
    type Response = Response<IstioCertificateResponse>;
    type Error = Status;
    type Future = BoxFuture<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<IstioCertificateRequest>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let header = |name: &str| {
                request
                    .metadata()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let message = request.get_ref();
            let impersonated = message
                .metadata
                .as_ref()
                .and_then(|m| m.string(IMPERSONATED_IDENTITY))
                .map(str::to_owned);
            let _ = shared.ca_calls.send(CaCall {
                csr: message.csr.clone(),
                validity_duration: message.validity_duration,
                impersonated_identity: impersonated.clone(),
                authorization: header("authorization"),
                cluster_id: header("clusterid"),
            });
            let mode = shared.ca_mode.lock().unwrap().clone();
            let identity = match &mode {
                CaMode::Fail(code, message) => return Err(Status::new(*code, message.clone())),
                CaMode::Garbage(chain) => {
                    return Ok(Response::new(IstioCertificateResponse {
                        cert_chain: chain.clone(),
                    }))
                }
                CaMode::WrongIdentity(other) => other.clone(),
                CaMode::Sign => impersonated
                    .ok_or_else(|| {
                        Status::unauthenticated(
                            "the stand-in istiod only issues with ImpersonatedIdentity",
                        )
                    })?
                    .parse::<Identity>()
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            };
            let csr = CertificateSigningRequestDer::from_pem_slice(message.csr.as_bytes())
                .map_err(|e| Status::invalid_argument(format!("CSR is not PEM: {e}")))?;
            let ttl = Duration::from_secs(message.validity_duration.max(1) as u64);
            let issued = match mode {
                // Sign a CSR made for the other identity, so the chain is genuine but foreign.
                CaMode::WrongIdentity(_) => {
                    let other = ambit_mesh::identity::CertificateRequest::new(&identity)
                        .map_err(|e| Status::internal(e.to_string()))?;
                    shared.ca.sign_csr(other.csr_der(), &identity, ttl)
                }
                _ => shared.ca.sign_csr(csr.as_ref(), &identity, ttl),
            }
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
            // Istio's layout: leaf, intermediates, then the root(s) as the last element.
            let mut cert_chain: Vec<String> =
                issued.chain.iter().map(|c| pem("CERTIFICATE", c)).collect();
            cert_chain.push(issued.roots.iter().map(|c| pem("CERTIFICATE", c)).collect());
            Ok(Response::new(IstioCertificateResponse { cert_chain }))
        })
    }
}

fn pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der))
}

/// A serving certificate for a TLS stand-in: a fresh root and a leaf for `localhost`.
pub struct ServingCert {
    /// The root, PEM: what the client's root file holds.
    pub root_pem: String,
    pub server_config: Arc<rustls::ServerConfig>,
}

impl ServingCert {
    pub fn generate() -> ServingCert {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let root_key = KeyPair::generate().unwrap();
        let mut root_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "stand-in istiod root");
        let root = root_params.self_signed(&root_key).unwrap();
        let issuer = Issuer::new(root_params, root_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), root.der().clone()], key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        ServingCert {
            root_pem: root.pem(),
            server_config: Arc::new(config),
        }
    }
}

// --- The local format's model back into istiod's protobufs, to feed the stand-in. ---

fn ip_bytes(ip: std::net::IpAddr) -> Vec<u8> {
    match ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn gateway_proto(g: &state::GatewayAddress) -> workload::GatewayAddress {
    use workload::gateway_address::Destination;
    workload::GatewayAddress {
        destination: Some(match &g.destination {
            state::GatewayDestination::Address(a) => {
                Destination::Address(workload::NetworkAddress {
                    network: a.network.clone(),
                    address: ip_bytes(a.address),
                    length: None,
                })
            }
            state::GatewayDestination::Hostname(h) => {
                Destination::Hostname(workload::NamespacedHostname {
                    namespace: h.namespace.clone(),
                    hostname: h.hostname.clone(),
                })
            }
        }),
        hbone_mtls_port: u32::from(g.hbone_mtls_port),
    }
}

fn ports_proto(
    ports: &state::PortMap,
    protocols: &std::collections::BTreeMap<u16, state::AppProtocol>,
) -> Vec<workload::Port> {
    ports
        .iter()
        .map(|(&service_port, &target_port)| workload::Port {
            service_port: service_port.into(),
            target_port: target_port.into(),
            app_protocol: crate::convert::app_protocol_proto(protocols.get(&service_port)),
        })
        .collect()
}

/// A model workload as istiod would send it.
pub fn workload_proto(w: &state::Workload) -> workload::Workload {
    workload::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.workload_ips.iter().map(|ip| ip_bytes(*ip)).collect(),
        network: w.network.clone(),
        tunnel_protocol: match w.protocol {
            state::Protocol::Tcp => workload::TunnelProtocol::None,
            state::Protocol::Hbone => workload::TunnelProtocol::Hbone,
        } as i32,
        trust_domain: w.trust_domain.clone(),
        service_account: w.service_account.clone(),
        waypoint: w.waypoint.as_ref().map(gateway_proto),
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_name: w.workload_name.clone(),
        services: w
            .services
            .iter()
            .map(|(key, ports)| {
                (
                    key.clone(),
                    workload::PortList {
                        ports: ports_proto(ports, &Default::default()),
                    },
                )
            })
            .collect(),
        authorization_policies: w.authorization_policies.clone(),
        status: match w.status {
            state::HealthStatus::Healthy => workload::WorkloadStatus::Healthy,
            state::HealthStatus::Unhealthy => workload::WorkloadStatus::Unhealthy,
        } as i32,
        cluster_id: w.cluster_id.clone(),
        ..Default::default()
    }
}

pub fn address_of_workload(w: &state::Workload) -> workload::Address {
    workload::Address {
        r#type: Some(workload::address::Type::Workload(workload_proto(w))),
    }
}

/// A model service as istiod would send it.
pub fn service_proto(s: &state::Service) -> workload::Service {
    workload::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s
            .vips
            .iter()
            .map(|v| workload::NetworkAddress {
                network: v.network.clone(),
                address: ip_bytes(v.address),
                length: None,
            })
            .collect(),
        ports: ports_proto(&s.ports, &s.app_protocols),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_ref().map(gateway_proto),
        ..Default::default()
    }
}

pub fn address_of_service(s: &state::Service) -> workload::Address {
    workload::Address {
        r#type: Some(workload::address::Type::Service(service_proto(s))),
    }
}

/// A model policy as istiod would send it.
pub fn authorization_proto(p: &rbac::Authorization) -> security::Authorization {
    use security::string_match::MatchType;
    let strings = |list: &[rbac::StringMatch]| {
        list.iter()
            .map(|s| security::StringMatch {
                match_type: Some(match s {
                    rbac::StringMatch::Exact(v) => MatchType::Exact(v.clone()),
                    rbac::StringMatch::Prefix(v) => MatchType::Prefix(v.clone()),
                    rbac::StringMatch::Suffix(v) => MatchType::Suffix(v.clone()),
                    rbac::StringMatch::Presence => MatchType::Presence(Empty {}),
                }),
            })
            .collect()
    };
    let accounts = |list: &[rbac::ServiceAccountMatch]| {
        list.iter()
            .map(|a| security::ServiceAccountMatch {
                namespace: a.namespace.clone(),
                service_account: a.service_account.clone(),
            })
            .collect()
    };
    let nets = |list: &[ipnet::IpNet]| {
        list.iter()
            .map(|n| security::Address {
                address: ip_bytes(n.addr()),
                length: n.prefix_len().into(),
            })
            .collect()
    };
    let ports = |list: &[u16]| list.iter().map(|&p| u32::from(p)).collect();
    security::Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: match p.scope {
            rbac::Scope::Global => security::Scope::Global,
            rbac::Scope::Namespace => security::Scope::Namespace,
            rbac::Scope::WorkloadSelector => security::Scope::WorkloadSelector,
        } as i32,
        action: match p.action {
            rbac::Action::Allow => security::Action::Allow,
            rbac::Action::Deny => security::Action::Deny,
        } as i32,
        rules: p
            .rules
            .iter()
            .map(|rule| security::Rule {
                clauses: rule
                    .clauses
                    .iter()
                    .map(|clause| security::Clause {
                        matches: clause
                            .matches
                            .iter()
                            .map(|m| security::Match {
                                namespaces: strings(&m.namespaces),
                                not_namespaces: strings(&m.not_namespaces),
                                service_accounts: accounts(&m.service_accounts),
                                not_service_accounts: accounts(&m.not_service_accounts),
                                principals: strings(&m.principals),
                                not_principals: strings(&m.not_principals),
                                source_ips: nets(&m.source_ips),
                                not_source_ips: nets(&m.not_source_ips),
                                destination_ips: nets(&m.destination_ips),
                                not_destination_ips: nets(&m.not_destination_ips),
                                destination_ports: ports(&m.destination_ports),
                                not_destination_ports: ports(&m.not_destination_ports),
                                extensions: Vec::new(),
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: p.dry_run,
        extensions: Vec::new(),
    }
}
