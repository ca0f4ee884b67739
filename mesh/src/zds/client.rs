//! ztunnel's end of ZDS: connect to the node agent, receive workload events, answer each one.

use std::os::fd::OwnedFd;
use std::path::Path;

use prost::{Message, Name};
use tracing::debug;

use super::proto::{
    workload_request, workload_response, Ack, AddWorkload, DelWorkload, KeepWorkload, SnapshotSent,
    Version, WorkloadInfo, WorkloadRequest, WorkloadResponse, ZdsHello,
};
use super::socket::{Packet, SeqPacket};
use super::{io_error, packet_bytes, ZdsError, MAX_MESSAGE_LEN};

/// What the node agent asked for. Every event (and every recoverable error from
/// [`ZdsClient::next`]) must be answered with [`ZdsClient::ack`] or [`ZdsClient::nack`]: the agent
/// sends nothing further until it gets the answer.
#[derive(Debug)]
pub enum WorkloadEvent {
    /// Proxy this pod, inside `netns` (an fd for the pod's network namespace, now ours).
    Add {
        uid: String,
        info: Option<WorkloadInfo>,
        netns: OwnedFd,
    },
    /// Keep this pod even though the agent sent no netns for it; only before `SnapshotSent`.
    Keep { uid: String },
    /// Stop proxying this pod.
    Del { uid: String },
    /// The initial snapshot is complete: drop every workload not named since connecting.
    SnapshotSent,
}

/// A connection to the node agent, after the hello.
pub struct ZdsClient {
    sock: SeqPacket,
}

impl ZdsClient {
    /// Connects to the node agent's socket and announces protocol V1.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ZdsError> {
        let path = path.as_ref();
        let sock = SeqPacket::connect(path).map_err(|source| ZdsError::Socket {
            op: "connect to",
            path: path.to_path_buf(),
            source,
        })?;
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        sock.send(&hello.encode_to_vec(), &[])
            .await
            .map_err(io_error)?;
        debug!(path = %path.display(), "ZDS connected, hello sent");
        Ok(ZdsClient { sock })
    }

    /// Waits for the next request. A recoverable error (see [`ZdsError::is_recoverable`]) means
    /// one bad message was consumed and its fds closed; nack it and call `next` again.
    /// [`ZdsError::Closed`] means the agent hung up. Cancel-safe.
    pub async fn next(&mut self) -> Result<WorkloadEvent, ZdsError> {
        let mut buf = [0u8; MAX_MESSAGE_LEN];
        let packet = self.sock.recv(&mut buf).await.map_err(io_error)?;
        let event = decode_request(packet, &buf)?;
        debug!(?event, "ZDS request received");
        Ok(event)
    }

    /// Answers the last request with success.
    pub async fn ack(&mut self) -> Result<(), ZdsError> {
        self.answer(String::new()).await
    }

    /// Answers the last request with a failure, `error` being the reason the agent reports. Text
    /// too long for one packet is shortened.
    pub async fn nack(&mut self, error: &str) -> Result<(), ZdsError> {
        // An empty error string *is* an ack on the wire; never let a failure read as success.
        let error = if error.is_empty() {
            "unspecified error"
        } else {
            error
        };
        self.answer(fit_error(error)).await
    }

    async fn answer(&mut self, error: String) -> Result<(), ZdsError> {
        let response = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error })),
        };
        self.sock
            .send(&response.encode_to_vec(), &[])
            .await
            .map_err(io_error)
    }
}

/// Shortens a nack's text so the response fits the peer's receive buffer; istio-cni would
/// otherwise see only a truncated packet, losing the reason entirely.
fn fit_error(error: &str) -> String {
    // Two tags plus two length varints of at most two bytes each wrap the text.
    const BUDGET: usize = MAX_MESSAGE_LEN - 8;
    const MARK: &str = "…";
    if error.len() <= BUDGET {
        return error.to_owned();
    }
    let mut end = BUDGET - MARK.len();
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &error[..end])
}

pub(crate) fn decode_request(packet: Packet, buf: &[u8]) -> Result<WorkloadEvent, ZdsError> {
    let bytes = packet_bytes(&packet, buf)?.ok_or(ZdsError::Closed)?;
    let mut fds = packet.fds;
    let request = WorkloadRequest::decode(bytes).map_err(|source| ZdsError::Decode {
        message: WorkloadRequest::NAME,
        source,
    })?;
    let Some(payload) = request.payload else {
        if !fds.is_empty() {
            return Err(ZdsError::UnexpectedFds {
                message: WorkloadRequest::NAME,
                count: fds.len(),
            });
        }
        return Err(ZdsError::MissingPayload {
            message: WorkloadRequest::NAME,
        });
    };
    use workload_request::Payload;
    let message = match &payload {
        Payload::Add(_) => AddWorkload::NAME,
        Payload::Keep(_) => KeepWorkload::NAME,
        Payload::Del(_) => DelWorkload::NAME,
        Payload::SnapshotSent(_) => SnapshotSent::NAME,
    };
    match payload {
        Payload::Add(add) => {
            if fds.len() != 1 {
                return Err(ZdsError::AddFdCount {
                    uid: add.uid,
                    count: fds.len(),
                });
            }
            let netns = fds.pop().expect("exactly one fd, checked above");
            Ok(WorkloadEvent::Add {
                uid: add.uid,
                info: add.workload_info,
                netns,
            })
        }
        _ if !fds.is_empty() => Err(ZdsError::UnexpectedFds {
            message,
            count: fds.len(),
        }),
        Payload::Keep(keep) => Ok(WorkloadEvent::Keep { uid: keep.uid }),
        Payload::Del(del) => Ok(WorkloadEvent::Del { uid: del.uid }),
        Payload::SnapshotSent(_) => Ok(WorkloadEvent::SnapshotSent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_nack_text_fits_one_packet() {
        let long = "é".repeat(MAX_MESSAGE_LEN);
        let fitted = fit_error(&long);
        assert!(fitted.ends_with('…'));
        let encoded = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error: fitted })),
        }
        .encoded_len();
        assert!(encoded <= MAX_MESSAGE_LEN, "{encoded}");
        assert_eq!(fit_error("short"), "short");
    }
}
