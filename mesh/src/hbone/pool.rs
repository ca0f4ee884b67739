//! The client's connection pool: HTTP/2 connections shared by tunnels with the same source
//! identity, expected destination identities and destination address.
//!
//! A connection carries at most `client_max_streams` tunnels (or fewer, if the server says so);
//! past that a new one is opened. Dials for the same key are serialized so a burst of tunnels to a
//! new destination opens one connection, not one each. Closed connections are never handed out,
//! and connections idle past the timeout are released.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;

use super::client::PeerInfo;
use crate::identity::Identity;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub source: Identity,
    /// Sorted, so the same set in another order shares connections.
    pub destination_identities: Vec<Identity>,
    pub address: SocketAddr,
}

impl PoolKey {
    pub fn new(
        source: Identity,
        mut destination_identities: Vec<Identity>,
        address: SocketAddr,
    ) -> Self {
        destination_identities.sort();
        destination_identities.dedup();
        PoolKey {
            source,
            destination_identities,
            address,
        }
    }
}

/// One HTTP/2 connection to an HBONE server.
pub(crate) struct Connection {
    pub send: SendRequest<Bytes>,
    pub peer: PeerInfo,
    max_streams: usize,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    last_released: Mutex<Instant>,
}

impl Connection {
    /// `closed` is set by whoever drives the connection, when it ends.
    pub fn new(
        send: SendRequest<Bytes>,
        peer: PeerInfo,
        max_streams: usize,
        closed: Arc<AtomicBool>,
    ) -> Self {
        Connection {
            send,
            peer,
            max_streams,
            active: AtomicUsize::new(0),
            closed,
            last_released: Mutex::new(Instant::now()),
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the connection unusable after an error on it, so no new tunnel picks it.
    pub fn mark_broken(&self) {
        self.closed.store(true, Ordering::Release);
    }

    fn limit(&self) -> usize {
        self.max_streams
            .min(self.send.current_max_send_streams())
            .max(1)
    }

    fn try_reserve(self: &Arc<Self>) -> Option<StreamSlot> {
        let limit = self.limit();
        let mut active = self.active.load(Ordering::Acquire);
        loop {
            if self.is_closed() || active >= limit {
                return None;
            }
            match self.active.compare_exchange_weak(
                active,
                active + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(StreamSlot(self.clone())),
                Err(now) => active = now,
            }
        }
    }

    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        let released = *self.last_released.lock().expect("pool lock poisoned");
        Some(now.saturating_duration_since(released))
    }
}

/// A reserved stream on a connection; dropping it frees the slot.
pub(crate) struct StreamSlot(Arc<Connection>);

impl StreamSlot {
    pub fn connection(&self) -> &Arc<Connection> {
        &self.0
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        *self.0.last_released.lock().expect("pool lock poisoned") = Instant::now();
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Default)]
pub(crate) struct Pool {
    connections: Mutex<HashMap<PoolKey, Vec<Arc<Connection>>>>,
    dial_locks: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
}

impl Pool {
    /// A stream slot on a pooled connection for `key`, dialing a new connection with `dial` when
    /// none has room. Concurrent callers for one key wait for a single dial.
    pub async fn checkout<F, Fut, E>(&self, key: &PoolKey, dial: F) -> Result<(StreamSlot, bool), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Connection, E>>,
    {
        if let Some(slot) = self.reserve_existing(key) {
            return Ok((slot, true));
        }
        let lock = self
            .dial_locks
            .lock()
            .expect("pool lock poisoned")
            .entry(key.clone())
            .or_default()
            .clone();
        let _dialing = lock.lock().await;
        if let Some(slot) = self.reserve_existing(key) {
            return Ok((slot, true));
        }
        let connection = Arc::new(dial().await?);
        let slot = connection
            .try_reserve()
            .expect("a fresh connection has room for one stream");
        self.connections
            .lock()
            .expect("pool lock poisoned")
            .entry(key.clone())
            .or_default()
            .push(connection);
        Ok((slot, false))
    }

    fn reserve_existing(&self, key: &PoolKey) -> Option<StreamSlot> {
        let mut connections = self.connections.lock().expect("pool lock poisoned");
        let list = connections.get_mut(key)?;
        list.retain(|c| !c.is_closed());
        list.iter().find_map(Connection::try_reserve)
    }

    /// Drops closed connections and releases those idle for longer than `idle_timeout`. A released
    /// connection is not closed under its streams: it closes when its last user lets go.
    pub fn sweep(&self, idle_timeout: Duration) {
        let now = Instant::now();
        let mut connections = self.connections.lock().expect("pool lock poisoned");
        connections.retain(|_, list| {
            list.retain(|c| {
                !c.is_closed() && c.idle_for(now).is_none_or(|idle| idle < idle_timeout)
            });
            !list.is_empty()
        });
        drop(connections);
        self.dial_locks
            .lock()
            .expect("pool lock poisoned")
            .retain(|_, lock| Arc::strong_count(lock) > 1);
    }

    /// Open pooled connections for `key` (for tests and debugging).
    pub fn connection_count(&self, key: &PoolKey) -> usize {
        let connections = self.connections.lock().expect("pool lock poisoned");
        connections
            .get(key)
            .map_or(0, |list| list.iter().filter(|c| !c.is_closed()).count())
    }
}
