//! Which workload in the state is an enrolled pod, found as Istio's ztunnel finds it
//! (`find_by_info`): by the `WorkloadInfo` the node agent sent (name, namespace, service account)
//! among the workloads on this node. The ZDS uid is the node agent's own key (istio-cni sends the
//! Kubernetes pod UID) and never names a WDS workload (`Kubernetes//Pod/<ns>/<name>`).
//!
//! A new pod usually reaches ztunnel before the control plane has pushed its workload, so a
//! connection waits for it, bounded ([`WAIT`]), as Istio's `wait_for_workload` does. The lookup is
//! made again for every connection and every re-check: a workload that changes or arrives later is
//! followed, one that leaves is no longer served.

use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::state::{Snapshot, StateStore, Workload};

use super::PodInfo;

/// How long a connection waits for its pod's workload to reach the state (Istio's 5 s).
pub const WAIT: Duration = Duration::from_secs(5);

/// Why an enrolled pod has no workload to serve it with.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LocalWorkloadError {
    #[error(
        "no workload on {node} matches pod {pod} (the control plane has not delivered it, or the \
         node agent's WorkloadInfo does not name it)"
    )]
    NotFound { pod: String, node: String },
    #[error("workloads {uids:?} on {node} all match pod {pod}; refusing to pick one")]
    Ambiguous {
        pod: String,
        node: String,
        uids: Vec<String>,
    },
}

/// An enrolled pod as the node agent described it, and the node it runs on.
#[derive(Clone, Debug)]
pub struct LocalWorkload {
    pub pod: PodInfo,
    /// This ztunnel's node (`NODE_NAME`); empty: every node's workloads are candidates.
    pub node: String,
}

impl LocalWorkload {
    /// The pod's workload in `snapshot`: the one on this node with the pod's name, namespace and
    /// service account. Two matches are refused rather than guessed between (Istio takes either).
    pub fn find(&self, snapshot: &Snapshot) -> Result<Arc<Workload>, LocalWorkloadError> {
        let mut matches = snapshot
            .workloads_named(&self.pod.namespace, &self.pod.name)
            .iter()
            .filter(|w| self.node.is_empty() || w.node == self.node)
            .filter(|w| w.service_account == self.service_account());
        let Some(first) = matches.next() else {
            return Err(LocalWorkloadError::NotFound {
                pod: self.describe(),
                node: self.node_name(),
            });
        };
        let others: Vec<String> = matches.map(|w| w.uid.clone()).collect();
        if others.is_empty() {
            return Ok(first.clone());
        }
        let mut uids = others;
        uids.push(first.uid.clone());
        uids.sort();
        Err(LocalWorkloadError::Ambiguous {
            pod: self.describe(),
            node: self.node_name(),
            uids,
        })
    }

    /// [`find`](Self::find), waiting up to `timeout` for the state to deliver the workload;
    /// returns it with the snapshot it was found in, so one decision reads one view.
    pub async fn wait(
        &self,
        state: &StateStore,
        timeout: Duration,
    ) -> Result<(Arc<Snapshot>, Arc<Workload>), LocalWorkloadError> {
        // Subscribed before looking, so a change landing in between still wakes us.
        let mut changes = state.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let snapshot = state.load();
            match self.find(&snapshot) {
                Ok(workload) => return Ok((snapshot, workload)),
                Err(err @ LocalWorkloadError::Ambiguous { .. }) => return Err(err),
                Err(err) => {
                    let changed = tokio::time::timeout_at(deadline, changes.changed()).await;
                    if !matches!(changed, Ok(Ok(()))) {
                        return Err(err);
                    }
                }
            }
        }
    }

    /// The service account the node agent named; Kubernetes defaults an unset one to `default`.
    pub fn service_account(&self) -> &str {
        match self.pod.service_account.as_str() {
            "" => "default",
            named => named,
        }
    }

    fn describe(&self) -> String {
        format!(
            "{}/{} (service account {})",
            self.pod.namespace,
            self.pod.name,
            self.service_account()
        )
    }

    fn node_name(&self) -> String {
        if self.node.is_empty() {
            "any node (NODE_NAME unset)".into()
        } else {
            format!("node {:?}", self.node)
        }
    }
}
