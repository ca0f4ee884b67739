//! The `istio.workload.zds` protobuf messages, written by hand with prost derives.
//!
//! Field numbers, enum values and names follow ztunnel's `proto/zds.proto` exactly (the file
//! istio-cni also compiles as `pkg/zdsapi`), so Ambit and Istio components can drive each other.
//! Numbers that look out of order (`keep = 5`, `DelWorkload.uid = 2`) are Istio's, not typos.

use prost::Name;

/// Protobuf package of every message here.
pub const PACKAGE: &str = "istio.workload.zds";

/// Protocol version announced in [`ZdsHello`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    /// Proto3's mandatory zero value; never a real version.
    NotUsed = 0,
    V1 = 1,
}

/// First packet on every connection, sent by ztunnel.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct ZdsHello {
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

/// Who a workload is. Tag 4 (the old `trust_domain`) is reserved upstream and must not be reused.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct WorkloadInfo {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub namespace: String,
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// Start proxying for a pod; the packet carries the pod's netns fd as `SCM_RIGHTS`.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct AddWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// Keep a pod whose netns the node agent no longer has; legal only before [`SnapshotSent`].
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct KeepWorkload {
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// Stop proxying for a pod.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct DelWorkload {
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// The initial snapshot is complete: ztunnel drops every workload it was not told about.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct SnapshotSent {}

/// Answer to each request; an empty `error` is an ack, anything else a nack.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Ack {
    #[prost(string, tag = "1")]
    pub error: String,
}

/// Node agent → ztunnel.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct WorkloadRequest {
    #[prost(oneof = "workload_request::Payload", tags = "1, 5, 2, 3")]
    pub payload: Option<workload_request::Payload>,
}

/// The oneof of [`WorkloadRequest`].
pub mod workload_request {
    #[derive(Clone, PartialEq, Eq, Hash, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Add(super::AddWorkload),
        #[prost(message, tag = "5")]
        Keep(super::KeepWorkload),
        #[prost(message, tag = "2")]
        Del(super::DelWorkload),
        #[prost(message, tag = "3")]
        SnapshotSent(super::SnapshotSent),
    }
}

/// ztunnel → node agent.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct WorkloadResponse {
    #[prost(oneof = "workload_response::Payload", tags = "1")]
    pub payload: Option<workload_response::Payload>,
}

/// The oneof of [`WorkloadResponse`].
pub mod workload_response {
    #[derive(Clone, PartialEq, Eq, Hash, prost::Oneof)]
    pub enum Payload {
        #[prost(message, tag = "1")]
        Ack(super::Ack),
    }
}

macro_rules! named {
    ($($ty:ident),* $(,)?) => {
        $(impl Name for $ty {
            const NAME: &'static str = stringify!($ty);
            const PACKAGE: &'static str = PACKAGE;
        })*
    };
}

named!(
    ZdsHello,
    WorkloadInfo,
    AddWorkload,
    KeepWorkload,
    DelWorkload,
    SnapshotSent,
    Ack,
    WorkloadRequest,
    WorkloadResponse,
);

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    // Golden bytes computed by hand from the field numbers in Istio's zds.proto, so a wrong tag
    // fails here rather than only against a live istio-cni.
    #[test]
    fn wire_bytes_match_istio_numbering() {
        let hello = ZdsHello {
            version: Version::V1 as i32,
        };
        assert_eq!(hello.encode_to_vec(), [0x08, 0x01]);

        let keep = WorkloadRequest {
            payload: Some(workload_request::Payload::Keep(KeepWorkload {
                uid: "u".into(),
            })),
        };
        assert_eq!(keep.encode_to_vec(), [0x2a, 0x03, 0x0a, 0x01, b'u']);

        let del = WorkloadRequest {
            payload: Some(workload_request::Payload::Del(DelWorkload {
                uid: "u".into(),
            })),
        };
        assert_eq!(del.encode_to_vec(), [0x12, 0x03, 0x12, 0x01, b'u']);

        let snap = WorkloadRequest {
            payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
        };
        assert_eq!(snap.encode_to_vec(), [0x1a, 0x00]);

        let add = WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: "u".into(),
                workload_info: Some(WorkloadInfo {
                    name: "n".into(),
                    namespace: "s".into(),
                    service_account: "a".into(),
                }),
            })),
        };
        assert_eq!(
            add.encode_to_vec(),
            [
                0x0a, 0x0e, 0x0a, 0x01, b'u', 0x12, 0x09, 0x0a, 0x01, b'n', 0x12, 0x01, b's', 0x1a,
                0x01, b'a'
            ]
        );

        let nack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error: "e".into() })),
        };
        assert_eq!(nack.encode_to_vec(), [0x0a, 0x03, 0x0a, 0x01, b'e']);
        assert_eq!(
            WorkloadRequest::full_name(),
            "istio.workload.zds.WorkloadRequest"
        );
    }
}
