//! Live inbound connections and the policy they were allowed under. When the state changes,
//! each is checked again and those the new policy denies are closed, as Istio's ztunnel does:
//! revoking access must not wait for clients to reconnect.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use ambit_mesh::rbac::{ConnectionInfo, Decision};
use ambit_mesh::state::{Snapshot, StateStore, Workload};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::local::{LocalWorkload, LocalWorkloadError};

struct Tracked {
    pod: Arc<LocalWorkload>,
    connection: ConnectionInfo,
    cancel: CancellationToken,
}

/// Every live inbound connection on the node.
pub struct ConnectionTracker {
    state: Arc<StateStore>,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Tracked>>,
}

/// Authorizes `connection` to `pod` against `snapshot`, finding the pod's workload in it afresh;
/// an error when it has none.
pub fn authorize(
    snapshot: &Snapshot,
    pod: &LocalWorkload,
    connection: &ConnectionInfo,
) -> Result<Decision, LocalWorkloadError> {
    let workload = pod.find(snapshot)?;
    Ok(evaluate(snapshot, &workload, connection))
}

/// Authorizes `connection` to `workload` against `snapshot`'s policies.
pub fn evaluate(snapshot: &Snapshot, workload: &Workload, connection: &ConnectionInfo) -> Decision {
    snapshot.policies().evaluate(
        &workload.namespace,
        &workload.authorization_policies,
        connection,
    )
}

impl ConnectionTracker {
    /// Tracks connections against the policy in `state`.
    pub fn new(state: Arc<StateStore>) -> Self {
        ConnectionTracker {
            state,
            next_id: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
        }
    }

    /// Wraps an upstream so the connection can be closed by a later policy change; the entry is
    /// removed when the wrapper is dropped.
    ///
    /// The connection was authorized before its upstream was connected; a change that landed
    /// meanwhile was re-checked without it. So it is checked once more here, after it is
    /// registered: whatever changes from now on, some check sees it.
    pub fn track<T>(
        self: &Arc<Self>,
        pod: &Arc<LocalWorkload>,
        connection: ConnectionInfo,
        upstream: T,
    ) -> Revocable<T> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let allowed_now =
            authorize(&self.state.load(), pod, &connection).is_ok_and(|decision| decision.allowed);
        self.live.lock().expect("tracker lock").insert(
            id,
            Tracked {
                pod: pod.clone(),
                connection,
                cancel: cancel.clone(),
            },
        );
        if !allowed_now {
            cancel.cancel();
        }
        Revocable {
            inner: upstream,
            revoked: Box::pin(cancel.cancelled_owned()),
            _entry: Entry {
                tracker: self.clone(),
                id,
            },
        }
    }

    pub fn len(&self) -> usize {
        self.live.lock().expect("tracker lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks every live connection against `snapshot`; closes those now denied. Returns how
    /// many were closed.
    pub fn recheck(&self, snapshot: &Snapshot) -> usize {
        let live = self.live.lock().expect("tracker lock");
        let mut closed = 0;
        for tracked in live.values() {
            // A pod whose workload left the state no longer admits anyone, as new connections
            // find.
            let decision = authorize(snapshot, &tracked.pod, &tracked.connection);
            let allowed = decision.as_ref().is_ok_and(|d| d.allowed);
            if !allowed && !tracked.cancel.is_cancelled() {
                let reason = match decision {
                    Ok(decision) => decision.to_string(),
                    Err(err) => err.to_string(),
                };
                tracing::info!(
                    target: "access",
                    pod = %tracked.pod.pod.uid, connection = %tracked.connection, %reason,
                    "policy changed; closing a connection it no longer allows"
                );
                tracked.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Re-checks live connections after every state change, until the store is gone.
    pub async fn watch(self: Arc<Self>) {
        let mut changes = self.state.subscribe();
        while changes.changed().await.is_ok() {
            self.recheck(&self.state.load());
        }
    }
}

struct Entry {
    tracker: Arc<ConnectionTracker>,
    id: u64,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.tracker
            .live
            .lock()
            .expect("tracker lock")
            .remove(&self.id);
    }
}

/// An upstream that fails every read and write once its connection's access is revoked, which
/// ends the splice and closes both sides.
pub struct Revocable<T> {
    inner: T,
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
    _entry: Entry,
}

impl<T> Revocable<T> {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.revoked.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "access revoked by a policy change",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Revocable<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Revocable<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
