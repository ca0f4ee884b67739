//! Outbound: connections the pod's app made, REDIRECTed to 15001 inside the pod.
//!
//! As in Istio's ztunnel, each connection first finds the pod's own workload ([`super::local`]),
//! waiting up to 5 s for the state to deliver it: the tunnel's client certificate is the
//! workload's identity (its trust domain included), and a pod whose workload never arrives gets
//! its connection closed, logged with the reason and counted with `response_flags="NR"`.
//!
//! Waypoints follow Istio's rule that the original addressing decides: a connection to a
//! service VIP goes through the *service's* waypoint (never the endpoint's workload waypoint);
//! a connection to a pod IP goes through the *pod's* waypoint. Either way it is HBONE to
//! `<waypoint ip>:<hboneMtlsPort>`, `:authority` the original VIP:port or pod ip:port, the
//! waypoint's identity expected. Which waypoints serve which kind of traffic
//! (`istio.io/waypoint-for`) is decided by the control plane when it fills in `waypoint`.

use std::net::SocketAddr;
use std::sync::Arc;

use ambit_mesh::hbone::client::TunnelRequest;
use ambit_mesh::hbone::{ConnectHeaders, HBONE_PORT};
use ambit_mesh::identity::Identity;
use ambit_mesh::state::{Destination, GatewayAddress, Protocol, Service, Snapshot, Workload};
use tokio::net::{TcpListener, TcpStream};

use super::{is_waypoint, resolve_waypoint, Pod};
use crate::metrics::{Reporter, TrafficLabels};
use crate::netns::original_destination;
use ambit_mesh::copy::{splice, Buffered};

/// Where one outbound connection goes, decided before any byte moves.
#[derive(Debug)]
enum Route {
    Hbone {
        request: Box<TunnelRequest>,
        labels: TrafficLabels,
    },
    /// Plain TCP to the destination, from inside the pod (not in the mesh, or `protocol: TCP`).
    Plain {
        target: SocketAddr,
        labels: TrafficLabels,
    },
    /// A VIP with no usable endpoint: the connection is closed.
    Refuse(String),
    /// A destination behind a waypoint that cannot be reached: the connection is closed and
    /// counted with `response_flags="UH"` (Envoy's "no healthy upstream"), since sending it
    /// around the waypoint would skip the L7 policy the waypoint exists for.
    RefuseWaypoint {
        reason: String,
        labels: TrafficLabels,
    },
}

pub(crate) async fn serve(pod: Arc<Pod>, listener: TcpListener) {
    super::accept_loop(pod, listener, "outbound", handle).await
}

async fn handle(pod: Arc<Pod>, app: TcpStream, client: SocketAddr) {
    let _ = app.set_nodelay(true);
    let destination = match original_destination(&app) {
        Ok(destination) => destination,
        Err(err) => {
            tracing::warn!(pod = %pod.uid, %client, error = %err, "outbound connection without an original destination; closing");
            return;
        }
    };
    let source = match pod.local.wait(&pod.context.state, super::local::WAIT).await {
        Ok(found) => found,
        Err(err) => {
            tracing::warn!(target: "access", pod = %pod.uid, src = %client, dst = %destination, error = %err, "outbound refused: the pod's own workload is unknown");
            let labels = TrafficLabels {
                response_flags: "NR",
                ..source_labels(None, None)
            };
            drop(pod.context.metrics.connection_opened(labels));
            return;
        }
    };
    let route = route(&pod, source, client, destination);
    tracing::debug!(pod = %pod.uid, %client, %destination, ?route, "outbound");
    let metrics = &pod.context.metrics;
    let mut app = Buffered::new(app);
    let (transfer, open) = match route {
        Route::Hbone { request, labels } => match pod.client.connect(&request).await {
            Ok(mut tunnel) => {
                let open = metrics.connection_opened(labels);
                (splice(&mut app, &mut tunnel, &open).await, open)
            }
            Err(err) => {
                tracing::warn!(target: "access", pod = %pod.uid, src = %client, dst = %destination, error = %err, "outbound HBONE failed");
                return;
            }
        },
        Route::Plain { target, labels } => match pod.netns.connect(target).await {
            Ok(upstream) => {
                let open = metrics.connection_opened(labels);
                (
                    splice(&mut app, &mut Buffered::new(upstream), &open).await,
                    open,
                )
            }
            Err(err) => {
                tracing::info!(target: "access", pod = %pod.uid, src = %client, dst = %target, error = %err, "outbound passthrough connect failed");
                return;
            }
        },
        Route::Refuse(reason) => {
            tracing::info!(target: "access", pod = %pod.uid, src = %client, dst = %destination, reason, "outbound refused");
            return;
        }
        Route::RefuseWaypoint { reason, labels } => {
            tracing::warn!(target: "access", pod = %pod.uid, src = %client, dst = %destination, reason, "outbound refused: its waypoint cannot be reached");
            // Counted as a connection that opened and closed at once, with its refusal flag.
            drop(metrics.connection_opened(labels));
            return;
        }
    };
    tracing::info!(
        target: "access",
        pod = %pod.uid, src = %client, dst = %destination,
        mtls = open.labels().mutual_tls, sent = transfer.forward, received = transfer.backward,
        error = ?transfer.error,
        "outbound connection complete"
    );
}

/// The pod's workload, the snapshot it was found in and the identity it connects as.
struct Source {
    snapshot: Arc<Snapshot>,
    workload: Arc<Workload>,
    identity: Identity,
}

fn route(
    pod: &Pod,
    (snapshot, workload): (Arc<Snapshot>, Arc<Workload>),
    client: SocketAddr,
    destination: SocketAddr,
) -> Route {
    let identity = match workload.identity() {
        Ok(identity) => identity,
        Err(err) => {
            return Route::Refuse(format!(
                "the pod's workload {} has no usable identity: {err}",
                workload.uid
            ))
        }
    };
    let source = Source {
        snapshot,
        workload,
        identity,
    };
    let snapshot = &source.snapshot;
    let network = &pod.context.network;
    let headers = ConnectHeaders {
        forwarded_for: Some(client),
        ..Default::default()
    };
    let pick = rand::random::<u32>() as usize;
    // A waypoint's own connections (it is not captured in Istio, but may be enrolled here)
    // must never loop back into it.
    let bypass = |gateway: &GatewayAddress| is_waypoint(snapshot, gateway, &source.workload);
    match snapshot.resolve(network, destination, pick) {
        Destination::Service {
            service,
            endpoint,
            target_port,
        } => match &service.waypoint {
            // "The service is itself the waypoint": its endpoints are waypoint pods.
            Some(gateway) if !bypass(gateway) && !is_waypoint(snapshot, gateway, &endpoint) => {
                via_waypoint(&source, gateway, destination, Some(&service), headers, pick)
            }
            _ => hbone_or_plain(&source, &endpoint, target_port, Some(&service), headers),
        },
        Destination::Workload { workload, port } => match &workload.waypoint {
            Some(gateway) if !bypass(gateway) && !is_waypoint(snapshot, gateway, &workload) => {
                via_waypoint(&source, gateway, destination, None, headers, pick)
            }
            _ => hbone_or_plain(&source, &workload, port, None, headers),
        },
        Destination::NoEndpoint { service } => Route::Refuse(format!(
            "service {} has no healthy endpoint for port {}",
            service.hostname,
            destination.port()
        )),
        Destination::Passthrough => Route::Plain {
            target: destination,
            labels: source_labels(Some(&source), None),
        },
    }
}

/// Source-reported labels for a connection from `source` (`None`: the pod's workload is unknown)
/// to `destination` (`None`: not known yet, or outside the mesh).
fn source_labels(source: Option<&Source>, destination: Option<Arc<Workload>>) -> TrafficLabels {
    TrafficLabels {
        reporter: Reporter::Source,
        source: source.map(|s| s.workload.clone()),
        source_principal: source.map(|s| s.identity.clone()),
        destination,
        destination_principal: None,
        destination_service: None,
        mutual_tls: false,
        response_flags: "-",
    }
}

/// HBONE to the waypoint for `original` (a service VIP:port when `service` is set, else a pod
/// ip:port). Metrics name the waypoint as the destination workload and principal (the peer this
/// ztunnel actually talks to) and the service as `destination_service`, as Istio's ztunnel does.
fn via_waypoint(
    source: &Source,
    gateway: &GatewayAddress,
    original: SocketAddr,
    service: Option<&Service>,
    mut headers: ConnectHeaders,
    pick: usize,
) -> Route {
    let mut labels = TrafficLabels {
        destination_service: service
            .map(|s| (s.hostname.clone(), s.namespace.clone(), s.name.clone())),
        mutual_tls: true,
        ..source_labels(Some(source), None)
    };
    let waypoint = match resolve_waypoint(&source.snapshot, gateway, pick) {
        Ok(waypoint) => waypoint,
        // Fail closed: sending directly would skip the L7 policy the waypoint exists for.
        Err(reason) => {
            labels.response_flags = "UH";
            return Route::RefuseWaypoint { reason, labels };
        }
    };
    if let Some(service) = service {
        headers.forwarded_host = Some(service.hostname.clone());
    }
    labels.destination = Some(waypoint.workload.clone());
    labels.destination_principal = waypoint.identities.first().cloned();
    Route::Hbone {
        request: Box::new(TunnelRequest {
            source: source.identity.clone(),
            destination_identities: waypoint.identities,
            hbone_address: waypoint.hbone_address,
            target: original,
            headers,
        }),
        labels,
    }
}

fn hbone_or_plain(
    source: &Source,
    endpoint: &Arc<Workload>,
    port: u16,
    service: Option<&Service>,
    mut headers: ConnectHeaders,
) -> Route {
    let Some(&ip) = endpoint.workload_ips.first() else {
        return Route::Refuse(format!("workload {} has no address", endpoint.uid));
    };
    let target = SocketAddr::new(ip, port);
    let hbone = endpoint.protocol == Protocol::Hbone;
    let labels = TrafficLabels {
        destination_principal: hbone.then(|| endpoint.identity().ok()).flatten(),
        destination_service: service
            .map(|s| (s.hostname.clone(), s.namespace.clone(), s.name.clone())),
        mutual_tls: hbone,
        ..source_labels(Some(source), Some(endpoint.clone()))
    };
    if !hbone {
        return Route::Plain { target, labels };
    }
    let mut destination_identities: Vec<Identity> = endpoint.identity().into_iter().collect();
    if let Some(service) = service {
        headers.forwarded_host = Some(service.hostname.clone());
        destination_identities.extend(
            service
                .subject_alt_names
                .iter()
                .filter_map(|san| san.parse().ok()),
        );
    }
    Route::Hbone {
        request: Box::new(TunnelRequest {
            source: source.identity.clone(),
            destination_identities,
            hbone_address: SocketAddr::new(ip, HBONE_PORT),
            target,
            headers,
        }),
        labels,
    }
}
