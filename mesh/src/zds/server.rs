//! The node agent's end of ZDS: listen for ztunnel, check its hello, send requests one at a time.

use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::{Message, Name};
use tracing::debug;

use super::proto::{
    workload_request::Payload, workload_response, AddWorkload, DelWorkload, KeepWorkload,
    SnapshotSent, Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
};
use super::socket::{Packet, SeqPacket, SeqPacketListener};
use super::{io_error, packet_bytes, ZdsError, ACK_TIMEOUT, MAX_MESSAGE_LEN};

/// The listening socket ztunnel connects to.
pub struct ZdsServer {
    listener: SeqPacketListener,
    path: PathBuf,
}

impl ZdsServer {
    /// Listens on `path`, first removing a socket left there by an earlier run. Anything at
    /// `path` that is not a socket is left alone (and binding fails). Needs a tokio runtime.
    pub fn bind(path: impl AsRef<Path>) -> Result<Self, ZdsError> {
        let path = path.as_ref();
        let err = |op, source| ZdsError::Socket {
            op,
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                std::fs::remove_file(path).map_err(|e| err("remove the stale", e))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("inspect", e)),
        }
        let listener = SeqPacketListener::bind(path).map_err(|e| err("listen on", e))?;
        Ok(ZdsServer {
            listener,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts the next ztunnel and reads its hello (waiting at most [`ACK_TIMEOUT`]). An error
    /// concerns that one connection, which is dropped; the server keeps listening.
    pub async fn accept(&self) -> Result<ZdsConnection, ZdsError> {
        let sock = self.listener.accept().await.map_err(io_error)?;
        let version = tokio::time::timeout(ACK_TIMEOUT, read_hello(&sock))
            .await
            .map_err(|_| ZdsError::HelloTimeout {
                timeout: ACK_TIMEOUT,
            })??;
        debug!(version, "ZDS peer connected");
        Ok(ZdsConnection {
            sock,
            ack_timeout: ACK_TIMEOUT,
            broken: false,
        })
    }
}

async fn read_hello(sock: &SeqPacket) -> Result<i32, ZdsError> {
    let mut buf = [0u8; MAX_MESSAGE_LEN];
    let packet = sock.recv(&mut buf).await.map_err(io_error)?;
    decode_hello(&packet, &buf)
}

/// The bytes of a packet ztunnel sends: it never carries descriptors (any that came are closed
/// with the packet).
fn bytes_without_fds<'a>(
    packet: &Packet,
    buf: &'a [u8],
    message: &'static str,
) -> Result<&'a [u8], ZdsError> {
    let bytes = packet_bytes(packet, buf)?.ok_or(ZdsError::Closed)?;
    if !packet.fds.is_empty() {
        return Err(ZdsError::UnexpectedFds {
            message,
            count: packet.fds.len(),
        });
    }
    Ok(bytes)
}

/// Checks ztunnel's first packet: a [`ZdsHello`] for V1, without descriptors.
pub(crate) fn decode_hello(packet: &Packet, buf: &[u8]) -> Result<i32, ZdsError> {
    let bytes = bytes_without_fds(packet, buf, ZdsHello::NAME)?;
    let hello = ZdsHello::decode(bytes).map_err(|source| ZdsError::Decode {
        message: ZdsHello::NAME,
        source,
    })?;
    if hello.version != Version::V1 as i32 {
        return Err(ZdsError::UnsupportedVersion {
            version: hello.version,
        });
    }
    Ok(hello.version)
}

/// One ztunnel connection. Requests go strictly one at a time (`&mut self`), because an ack only
/// answers "the previous request": it carries no id.
pub struct ZdsConnection {
    sock: SeqPacket,
    ack_timeout: Duration,
    /// Set once an ack may be lost or late; any later ack could be mistaken for the next one's.
    broken: bool,
}

impl ZdsConnection {
    /// Changes how long each request waits for its answer (default [`ACK_TIMEOUT`]).
    pub fn set_ack_timeout(&mut self, timeout: Duration) {
        self.ack_timeout = timeout;
    }

    /// Hands a pod to ztunnel, passing a duplicate of `netns` (the pod's network namespace).
    pub async fn add(
        &mut self,
        uid: &str,
        info: WorkloadInfo,
        netns: BorrowedFd<'_>,
    ) -> Result<(), ZdsError> {
        let payload = Payload::Add(AddWorkload {
            uid: uid.to_owned(),
            workload_info: Some(info),
        });
        self.request(payload, Some(netns)).await
    }

    /// Asks ztunnel to keep a pod whose netns is unknown here; only valid before
    /// [`snapshot_sent`](Self::snapshot_sent).
    pub async fn keep(&mut self, uid: &str) -> Result<(), ZdsError> {
        let payload = Payload::Keep(KeepWorkload {
            uid: uid.to_owned(),
        });
        self.request(payload, None).await
    }

    /// Tells ztunnel a pod is gone.
    pub async fn del(&mut self, uid: &str) -> Result<(), ZdsError> {
        let payload = Payload::Del(DelWorkload {
            uid: uid.to_owned(),
        });
        self.request(payload, None).await
    }

    /// Ends the initial snapshot; ztunnel then drops workloads it was not told about.
    pub async fn snapshot_sent(&mut self) -> Result<(), ZdsError> {
        self.request(Payload::SnapshotSent(SnapshotSent {}), None)
            .await
    }

    async fn request(
        &mut self,
        payload: Payload,
        netns: Option<BorrowedFd<'_>>,
    ) -> Result<(), ZdsError> {
        if self.broken {
            return Err(ZdsError::Broken);
        }
        let request = describe(&payload);
        let bytes = WorkloadRequest {
            payload: Some(payload),
        }
        .encode_to_vec();
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(ZdsError::TooLarge {
                request,
                len: bytes.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        let fds: Vec<BorrowedFd<'_>> = netns.into_iter().collect();
        let exchange = async {
            self.sock.send(&bytes, &fds).await.map_err(io_error)?;
            let mut buf = [0u8; MAX_MESSAGE_LEN];
            let packet = self.sock.recv(&mut buf).await.map_err(io_error)?;
            decode_response(&packet, &buf)
        };
        let response = match tokio::time::timeout(self.ack_timeout, exchange).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                self.broken |= !e.is_recoverable();
                return Err(e);
            }
            Err(_elapsed) => {
                self.broken = true;
                return Err(ZdsError::AckTimeout {
                    request,
                    timeout: self.ack_timeout,
                });
            }
        };
        match response {
            Ok(()) => {
                debug!(%request, "ZDS request acked");
                Ok(())
            }
            Err(reason) => Err(ZdsError::Nack { request, reason }),
        }
    }
}

/// Decodes ztunnel's answer to a request: `Ok(Ok(()))` for an ack, `Ok(Err(reason))` for a nack.
pub(crate) fn decode_response(packet: &Packet, buf: &[u8]) -> Result<Result<(), String>, ZdsError> {
    let bytes = bytes_without_fds(packet, buf, WorkloadResponse::NAME)?;
    let response = WorkloadResponse::decode(bytes).map_err(|source| ZdsError::Decode {
        message: WorkloadResponse::NAME,
        source,
    })?;
    match response.payload {
        Some(workload_response::Payload::Ack(ack)) if ack.error.is_empty() => Ok(Ok(())),
        Some(workload_response::Payload::Ack(ack)) => Ok(Err(ack.error)),
        None => Err(ZdsError::MissingPayload {
            message: WorkloadResponse::NAME,
        }),
    }
}

/// Names a request for errors and logs, in the proto's own terms.
fn describe(payload: &Payload) -> String {
    match payload {
        Payload::Add(a) => format!("{} for uid {}", AddWorkload::NAME, a.uid),
        Payload::Keep(k) => format!("{} for uid {}", KeepWorkload::NAME, k.uid),
        Payload::Del(d) => format!("{} for uid {}", DelWorkload::NAME, d.uid),
        Payload::SnapshotSent(_) => SnapshotSent::NAME.to_owned(),
    }
}
