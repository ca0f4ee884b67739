//! ZDS, the protocol a node agent (istio-cni, or Ambit's) uses to hand pods to ztunnel.
//!
//! The node agent listens on a `SOCK_SEQPACKET` Unix socket (Istio's default path is
//! [`DEFAULT_SOCKET_PATH`]); ztunnel connects and says [`proto::ZdsHello`]. The agent then sends
//! one [`proto::WorkloadRequest`] at a time and waits for its [`proto::WorkloadResponse`] before
//! the next: an `AddWorkload` (with the pod's network namespace attached as an `SCM_RIGHTS` fd)
//! for every pod it knows, `KeepWorkload` for pods whose netns it lost, `SnapshotSent`, and from
//! then on `AddWorkload` / `DelWorkload` as pods come and go. Each packet is exactly one protobuf
//! message with no length prefix.
//!
//! [`ZdsClient`] is ztunnel's end, [`ZdsServer`] / [`ZdsConnection`] the node agent's. Both match
//! Istio's wire format (see [`proto`]), so either can face the Istio implementation.

pub(crate) mod client;
pub mod proto;
pub(crate) mod server;
pub(crate) mod socket;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use client::{WorkloadEvent, ZdsClient};
pub use proto::WorkloadInfo;
pub use server::{ZdsConnection, ZdsServer};

/// Where istio-cni listens and ztunnel connects (`INPOD_UDS`; a hostPath shared by both pods).
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/ztunnel/ztunnel.sock";

/// Largest packet either side reads. Both ztunnel and istio-cni receive into 1024 bytes, so a
/// larger packet would be truncated by an Istio peer: this side refuses to send one and treats
/// one it receives as an error.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// How long the node agent waits for each answer (and for the hello): istio-cni's read/write
/// deadline.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything that can go wrong on a ZDS connection.
///
/// [`ZdsError::is_recoverable`] tells a per-message problem (answer it with a nack, or log it,
/// and carry on) from a broken connection (drop it; ztunnel reconnects).
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("cannot {op} the ZDS socket {}: {source}", path.display())]
    Socket {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("ZDS socket I/O failed: {0}")]
    Io(io::Error),
    #[error("the ZDS peer closed the connection")]
    Closed,
    #[error("the ZDS connection failed earlier (I/O error or a missed ack) and must be reopened")]
    Broken,
    #[error(
        "received a ZDS packet longer than {max} bytes; it was truncated by the kernel and \
         discarded"
    )]
    Truncated { max: usize },
    #[error(
        "received a ZDS packet whose ancillary data (file descriptors) was truncated; it was \
         discarded"
    )]
    ControlTruncated,
    #[error("ZDS packet is not a valid {message}: {source}")]
    Decode {
        message: &'static str,
        source: prost::DecodeError,
    },
    #[error("ZDS {message} carries no payload this implementation knows (a newer protocol?)")]
    MissingPayload { message: &'static str },
    #[error(
        "ZDS AddWorkload for uid {uid} carried {count} file descriptors; exactly one (the pod \
         netns) is required"
    )]
    AddFdCount { uid: String, count: usize },
    #[error(
        "ZDS {message} carried {count} file descriptor(s); only AddWorkload may carry one (the \
         pod netns)"
    )]
    UnexpectedFds { message: &'static str, count: usize },
    #[error("ztunnel's ZdsHello announced protocol version {version}; only V1 (1) is supported")]
    UnsupportedVersion { version: i32 },
    #[error("ztunnel did not send its ZdsHello within {timeout:?}")]
    HelloTimeout { timeout: Duration },
    #[error("ztunnel rejected ZDS {request}: {reason}")]
    Nack { request: String, reason: String },
    #[error(
        "ztunnel did not answer ZDS {request} within {timeout:?}; the connection is out of step \
         and was closed"
    )]
    AckTimeout { request: String, timeout: Duration },
    #[error(
        "ZDS {request} encodes to {len} bytes, over the {max}-byte packet size peers accept; not \
         sent"
    )]
    TooLarge {
        request: String,
        len: usize,
        max: usize,
    },
}

impl ZdsError {
    /// True when the error concerned one message only and the connection is still usable.
    /// ztunnel's side should nack such a message and keep reading.
    pub fn is_recoverable(&self) -> bool {
        matches!(
            self,
            ZdsError::Truncated { .. }
                | ZdsError::ControlTruncated
                | ZdsError::Decode { .. }
                | ZdsError::MissingPayload { .. }
                | ZdsError::AddFdCount { .. }
                | ZdsError::UnexpectedFds { .. }
                | ZdsError::Nack { .. }
                | ZdsError::TooLarge { .. }
        )
    }
}

/// Wraps a socket error, naming a vanished peer as such rather than as a raw errno.
fn io_error(e: io::Error) -> ZdsError {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => ZdsError::Closed,
        _ => ZdsError::Io(e),
    }
}

/// Checks the framing of a received packet and returns its bytes. Runs before any decoding, with
/// the packet's fds still owned by the caller so they are closed on every error path.
fn packet_bytes<'a>(packet: &socket::Packet, buf: &'a [u8]) -> Result<Option<&'a [u8]>, ZdsError> {
    if packet.control_truncated {
        return Err(ZdsError::ControlTruncated);
    }
    if packet.truncated {
        return Err(ZdsError::Truncated {
            max: MAX_MESSAGE_LEN,
        });
    }
    // A zero-length read without descriptors is end-of-stream. Only an encoded message with
    // every field at its default is empty, and no peer has a reason to send one.
    if packet.len == 0 && packet.fds.is_empty() {
        return Ok(None);
    }
    Ok(Some(&buf[..packet.len]))
}
