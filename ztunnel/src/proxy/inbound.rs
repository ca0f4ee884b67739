//! Inbound: HBONE on 15008 (peer verified by mTLS) and plaintext on 15006 (REDIRECTed, no
//! identity), each authorized against the pod's policies before the app is connected.
//!
//! Waypoint enforcement (`AMBIT_ENFORCE_WAYPOINT`, on by default; Istio has no such check and
//! relies on an AuthorizationPolicy): an HBONE connection must come from the waypoint that its
//! addressing calls for, else 401. The addressing is read the way the source ztunnel decided
//! it: a `forwarded: host` naming a service this pod backs means service-addressed, so that
//! service's waypoint (if any) is required; otherwise the connection was addressed to the pod,
//! so the pod's own waypoint (if any) is required. Limits: the `forwarded` host is the client's
//! word, so a client can claim a service without a waypoint to skip a pod's workload waypoint;
//! plaintext inbound (out-of-mesh clients, no identity) is not checked, as Istio's out-of-mesh
//! clients bypass waypoints too.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_mesh::copy::{splice, Buffered};
use ambit_mesh::hbone::server::{
    Accepted, ConnectHandler, ConnectRequest, Rejection, Server, TunnelOutcome,
};
use ambit_mesh::identity::{BoxFuture, Identity};
use ambit_mesh::rbac::ConnectionInfo;
use ambit_mesh::state::{Snapshot, Workload};
use tokio::net::{TcpListener, TcpStream};

use super::{connections, Pod};
use crate::metrics::{Counted, Reporter, TrafficLabels};
use crate::netns::original_destination;

pub(crate) async fn serve_hbone(pod: Arc<Pod>, listener: TcpListener) {
    let server = Server::with_drain(
        pod.identity.clone(),
        pod.context.certificates.clone(),
        Arc::new(HboneInbound { pod: pod.clone() }),
        pod.context.hbone.clone(),
        pod.context.drain.clone(),
    );
    if let Err(err) = server.serve(listener).await {
        tracing::error!(pod = %pod.uid, error = %err, "HBONE listener failed");
    }
}

struct HboneInbound {
    pod: Arc<Pod>,
}

impl ConnectHandler for HboneInbound {
    fn connect(&self, request: ConnectRequest) -> BoxFuture<'_, Result<Accepted, Rejection>> {
        Box::pin(async move {
            let client = request.peer_addr;
            let (snapshot, workload) = local_workload(&self.pod).await?;
            check_waypoint(&self.pod, &snapshot, &workload, &request)?;
            let connection = authorize(
                &snapshot,
                &workload,
                Some(&request.peer_identity),
                client,
                request.target,
            )?;
            let upstream = self
                .pod
                .netns
                .connect_from(Some(client.ip()), request.target)
                .await
                .map_err(|e| {
                    Rejection::Unavailable(format!("connect to {}: {e}", request.target))
                })?;
            let open = self
                .pod
                .context
                .metrics
                .connection_opened(labels(&self.pod, &request, true));
            let upstream =
                self.pod
                    .context
                    .connections
                    .track(&self.pod.local, connection, upstream);
            Ok(Accepted::splice(Counted::new(upstream, open)))
        })
    }

    /// The workload's identity, as Istio's inbound takes its certificate: the trust domain is
    /// known only from the state. Not waited for here (the `CONNECT` waits, and a second wait
    /// before the handshake would double a refused client's delay): until the workload arrives,
    /// the identity derived when the pod's proxy started is presented.
    fn local_identity(&self) -> BoxFuture<'_, Option<Identity>> {
        let snapshot = self.pod.context.state.load();
        let identity = self
            .pod
            .local
            .find(&snapshot)
            .ok()
            .and_then(|workload| workload.identity().ok());
        Box::pin(std::future::ready(identity))
    }

    // Metrics are counted by the `Counted` upstream, which also sees tunnels that never got here.
    fn finished(&self, request: &ConnectRequest, outcome: &TunnelOutcome) {
        tracing::info!(
            target: "access",
            pod = %self.pod.uid, src = %request.peer_addr, peer = %request.peer_identity,
            dst = %request.target, received = outcome.received, sent = outcome.sent,
            error = ?outcome.error,
            "inbound HBONE connection complete"
        );
    }
}

/// Destination-side labels: the source is found by its address (the HBONE connection comes
/// from the client pod's own address), the service by the `forwarded` host.
fn labels(pod: &Pod, request: &ConnectRequest, mutual_tls: bool) -> TrafficLabels {
    inbound_labels(
        pod,
        request.peer_addr,
        Some(request.peer_identity.clone()),
        request.headers.forwarded_host.as_deref(),
        mutual_tls,
    )
}

fn inbound_labels(
    pod: &Pod,
    client: SocketAddr,
    peer: Option<Identity>,
    service_host: Option<&str>,
    mutual_tls: bool,
) -> TrafficLabels {
    let snapshot = pod.context.state.load();
    let network = &pod.context.network;
    let destination = pod.local.find(&snapshot).ok();
    TrafficLabels {
        reporter: Reporter::Destination,
        source: snapshot.workload_by_ip(network, client.ip()).cloned(),
        source_principal: peer,
        destination_principal: mutual_tls
            .then_some(destination.as_ref())
            .map(|destination| {
                destination
                    .and_then(|workload| workload.identity().ok())
                    .unwrap_or_else(|| pod.identity.clone())
            }),
        destination,
        destination_service: service_host.map(|host| {
            // Kubernetes hostnames are <name>.<namespace>.svc.<domain>.
            let mut parts = host.split('.');
            let name = parts.next().unwrap_or_default().to_owned();
            let namespace = parts.next().unwrap_or_default().to_owned();
            (host.to_owned(), namespace, name)
        }),
        mutual_tls,
        response_flags: "-",
    }
}

/// The pod's workload, waited for as Istio waits ([`super::local`]); 503 with the reason when
/// the state does not deliver it in time.
async fn local_workload(pod: &Pod) -> Result<(Arc<Snapshot>, Arc<Workload>), Rejection> {
    pod.local
        .wait(&pod.context.state, super::local::WAIT)
        .await
        .map_err(|err| Rejection::Unavailable(err.to_string()))
}

/// Refuses (401) a tunnel that bypassed the waypoint its addressing requires (module docs).
fn check_waypoint(
    pod: &Pod,
    snapshot: &Snapshot,
    workload: &Workload,
    request: &ConnectRequest,
) -> Result<(), Rejection> {
    if !pod.context.enforce_waypoint {
        return Ok(());
    }
    let service = request.headers.forwarded_host.as_deref().and_then(|host| {
        workload
            .services
            .keys()
            .find(|key| key.split_once('/').is_some_and(|(_, h)| h == host))
            .and_then(|key| snapshot.service(key))
    });
    let (gateway, addressed) = match service {
        Some(service) => (
            service.waypoint.as_ref(),
            format!("service {}", service.hostname),
        ),
        None => (
            workload.waypoint.as_ref(),
            format!("pod {}/{}", workload.namespace, workload.name),
        ),
    };
    let Some(gateway) = gateway else {
        return Ok(());
    };
    // The waypoint's own pod receives its traffic directly.
    if super::is_waypoint(snapshot, gateway, workload) {
        return Ok(());
    }
    let allowed = snapshot.waypoint_identities(gateway);
    if allowed.contains(&request.peer_identity) {
        return Ok(());
    }
    Err(Rejection::Unauthorized(format!(
        "{addressed} has a waypoint; {} bypassed it",
        request.peer_identity
    )))
}

/// The ports ztunnel listens on inside every pod.
const PROXY_PORTS: [u16; 4] = [
    super::OUTBOUND_PORT,
    super::INBOUND_PLAINTEXT_PORT,
    super::HBONE_PORT,
    crate::dns::DNS_PORT,
];

/// Checks that `target` is the pod's `workload` and that policy lets `peer` reach it; returns
/// what the decision was made on, so the connection can be re-checked when policy changes.
fn authorize(
    snapshot: &Snapshot,
    workload: &Workload,
    peer: Option<&Identity>,
    client: SocketAddr,
    target: SocketAddr,
) -> Result<ConnectionInfo, Rejection> {
    // ztunnel's own listeners in the pod are not destinations: a tunnel to them would loop
    // through the pod's proxy again, without end.
    if PROXY_PORTS.contains(&target.port()) {
        return Err(Rejection::BadRequest(format!(
            "port {} of pod {} is ztunnel's own",
            target.port(),
            workload.uid
        )));
    }
    if !workload.workload_ips.contains(&target.ip()) {
        return Err(Rejection::BadRequest(format!(
            "{} is not an address of pod {}",
            target.ip(),
            workload.uid
        )));
    }
    let connection = ConnectionInfo {
        source_identity: peer.cloned(),
        source_ip: client.ip(),
        destination_ip: target.ip(),
        destination_port: target.port(),
    };
    let decision = connections::evaluate(snapshot, workload, &connection);
    if decision.allowed {
        Ok(connection)
    } else {
        Err(Rejection::Unauthorized(decision.to_string()))
    }
}

pub(crate) async fn serve_plaintext(pod: Arc<Pod>, listener: TcpListener) {
    super::accept_loop(pod, listener, "inbound plaintext", plaintext).await
}

async fn plaintext(pod: Arc<Pod>, downstream: TcpStream, client: SocketAddr) {
    let target = match original_destination(&downstream) {
        Ok(target) => target,
        Err(err) => {
            tracing::warn!(pod = %pod.uid, %client, error = %err, "inbound plaintext without an original destination");
            return;
        }
    };
    let decided = match local_workload(&pod).await {
        Ok((snapshot, workload)) => authorize(&snapshot, &workload, None, client, target),
        Err(rejection) => Err(rejection),
    };
    let connection = match decided {
        Ok(connection) => connection,
        Err(rejection) => {
            tracing::info!(target: "access", pod = %pod.uid, src = %client, dst = %target, reason = %rejection, "inbound plaintext refused");
            return;
        }
    };
    let upstream = match pod.netns.connect_from(Some(client.ip()), target).await {
        Ok(upstream) => pod
            .context
            .connections
            .track(&pod.local, connection, upstream),
        Err(err) => {
            tracing::info!(pod = %pod.uid, %client, %target, error = %err, "inbound plaintext connect failed");
            return;
        }
    };
    let labels = inbound_labels(&pod, client, None, None, false);
    let open = pod.context.metrics.connection_opened(labels);
    let transfer = splice(
        &mut Buffered::new(downstream),
        &mut Buffered::new(upstream),
        &open,
    )
    .await;
    tracing::info!(
        target: "access",
        pod = %pod.uid, src = %client, dst = %target,
        received = transfer.forward, sent = transfer.backward, error = ?transfer.error,
        "inbound plaintext connection complete"
    );
}
