//! L4 through the waypoint: a tunnel to a port declared TCP (or sniffed as not HTTP) is
//! authorized once, with Istio's TCP rule for AuthorizationPolicy, then joined byte for byte to
//! an endpoint of the addressed service over HBONE. Endpoint choice, outlier records and connect
//! retries (Istio's default two, each to an endpoint not tried yet) are the HTTP path's.
//!
//! HTTP WasmPlugins cannot see such a connection. One in the AUTHN or AUTHZ phase that applies
//! to the port is a promise that traffic is checked, so the connection is refused rather than
//! let past it unchecked; STATS and unphased plugins are skipped, as in Istio.

use std::sync::Arc;

use ambit_mesh::copy::{splice, Buffered};
use ambit_mesh::state::{Snapshot, Workload};
use ambit_mesh::telemetry::{Reporter, TrafficLabels};
use tokio::io::{AsyncRead, AsyncWrite};

use super::inbound::TunnelInfo;
use super::pipeline::addressed;
use super::upstream::{open, Failure, Target};
use super::{forward, Context};
use crate::l7::authz::{RequestAttributes, Verdict};

/// Proxies one tunnel at L4 until either side closes it. `client` is the tunnel's end (with any
/// bytes protocol detection read put back in front).
pub async fn serve<S>(context: Arc<Context>, tunnel: Arc<TunnelInfo>, mut client: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let snapshot = context.state.load();
    let mut labels = TrafficLabels {
        reporter: Reporter::Waypoint,
        source: tunnel.source.clone(),
        source_principal: Some(tunnel.connect.peer_identity.clone()),
        destination: None,
        destination_principal: None,
        destination_service: None,
        mutual_tls: true,
        response_flags: "-",
    };
    let Ok(target) = addressed(&context, &snapshot, &tunnel) else {
        return refuse(&context, labels, "NR");
    };
    if let Target::Service { service, .. } = &target {
        labels.destination_service = Some((
            service.hostname.clone(),
            service.namespace.clone(),
            service.name.clone(),
        ));
    }
    if let Err(flag) = admit(&context, &tunnel, &target) {
        return refuse(&context, labels, flag);
    }
    let (mut upstream, endpoint) = match connect(&context, &snapshot, &tunnel, &target).await {
        Ok(connected) => connected,
        Err(flag) => return refuse(&context, labels, flag),
    };
    let _in_flight = context.upstreams.start(&endpoint);
    labels.destination_principal = endpoint.identity().ok();
    labels.destination = Some(endpoint);
    let open = context.metrics.connection_opened(&labels);
    let transfer = splice(
        &mut Buffered::new(&mut client),
        &mut Buffered::new(&mut upstream),
        &open,
    )
    .await;
    if let Some(err) = &transfer.error {
        tracing::debug!(error = %err, target = %tunnel.connect.target, "L4 connection ended with an error");
    }
}

/// A connection that goes no further: counted as opened and closed with the reason's flag, and
/// dropped, which closes the tunnel.
fn refuse(context: &Context, mut labels: TrafficLabels, flag: &'static str) {
    labels.response_flags = flag;
    drop(context.metrics.connection_opened(&labels));
}

/// Authorization and the Wasm guard, before any endpoint is contacted.
fn admit(context: &Context, tunnel: &TunnelInfo, target: &Target) -> Result<(), &'static str> {
    let (service, port) = target.service_and_port();
    let selected = context.wasm.select(service, port);
    if let Some((plugin, _)) = &selected.unavailable {
        tracing::debug!(%plugin, target = %tunnel.connect.target, "L4 connection refused: a fail-closed WasmPlugin applies and is not running");
        return Err("RBAC");
    }
    if let Some(plugin) = selected.before_authz.first() {
        tracing::debug!(plugin = %plugin.name(), target = %tunnel.connect.target, "L4 connection refused: an AUTHN/AUTHZ WasmPlugin applies and cannot see non-HTTP traffic");
        return Err("RBAC");
    }
    let l7 = context.l7.load();
    if l7.policies.is_empty() {
        return Ok(());
    }
    let verdict = l7.policies.evaluate(&RequestAttributes {
        source_principal: Some(&tunnel.connect.peer_identity),
        source_ip: tunnel.client_address().ip(),
        remote_ip: tunnel.client_address().ip(),
        destination: tunnel.connect.target,
        service,
        http: None,
    });
    match verdict {
        Verdict::Allow => Ok(()),
        Verdict::Deny(policy) => {
            tracing::debug!(%policy, principal = %tunnel.connect.peer_identity, target = %tunnel.connect.target, "L4 connection denied by authorization policy");
            Err("RBAC")
        }
    }
}

/// An endpoint's byte stream, trying another endpoint after a connect failure as the HTTP path
/// does. The error is the response flag: `UH` without a healthy endpoint, `UF` when none could
/// be reached.
async fn connect(
    context: &Context,
    snapshot: &Snapshot,
    tunnel: &TunnelInfo,
    target: &Target,
) -> Result<(Box<dyn ambit_mesh::hbone::server::Upstream>, Arc<Workload>), &'static str> {
    let attempts = 1 + context.settings.retries;
    let base = context.upstreams.next_base();
    let mut tried: Vec<Arc<Workload>> = Vec::new();
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(forward::backoff(context.settings.retry_backoff, attempt)).await;
        }
        let Some(endpoint) =
            context
                .upstreams
                .pick(snapshot, target, base + attempt as usize, &tried)
        else {
            return Err("UH");
        };
        match open(context, tunnel, &endpoint).await {
            Ok(io) => {
                context.upstreams.record(&endpoint.workload, false);
                return Ok((io, endpoint.workload));
            }
            Err(Failure::Connect { message, retryable }) => {
                tracing::debug!(endpoint = %endpoint.workload.uid, attempt, error = %message, "L4 upstream connect failed");
                context.upstreams.record(&endpoint.workload, true);
                if !retryable {
                    break;
                }
                tried.push(endpoint.workload);
            }
            Err(Failure::Reset(reason) | Failure::ClientBody(reason)) => {
                tracing::debug!(endpoint = %endpoint.workload.uid, attempt, %reason, "L4 upstream reset");
                context.upstreams.record(&endpoint.workload, true);
                tried.push(endpoint.workload);
            }
        }
    }
    Err("UF")
}
