//! One pod's DNS proxy: the answer to one question (the sockets and the checks before and after
//! are `ambit_mesh::dns::Server`'s).

use std::time::Instant;

use ambit_mesh::dns::{Answer, Forwarder, Transport};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

use super::names::{Family, IndexCache, Lookup, Resolution};
use super::{PodDns, MESH_TTL};
use crate::metrics::DnsLabels;

/// Answers one pod's queries.
pub(super) struct Handler {
    pod: PodDns,
    forwarder: Forwarder,
    index: IndexCache,
}

impl Handler {
    pub fn new(pod: PodDns, forwarder: Forwarder) -> Self {
        Handler {
            pod,
            forwarder,
            index: IndexCache::default(),
        }
    }
}

impl Answer for Handler {
    async fn answer(&self, query: &Query, transport: Transport, answer: &mut Message) {
        let labels = DnsLabels {
            query_type: query.query_type().to_string(),
            protocol: transport.label(),
            source: self.pod.local.find(&self.pod.state.load()).ok(),
        };
        self.pod.metrics.dns_request(&labels);
        let name = query.name();
        let family = match query.query_type() {
            RecordType::A => Some(Family::V4),
            RecordType::AAAA => Some(Family::V6),
            _ => None,
        };
        let resolution = match family {
            Some(family) if query.query_class() == DNSClass::IN => {
                let host = name.to_lowercase().to_ascii();
                let host = host.trim_end_matches('.');
                let snapshot = self.pod.state.load();
                Lookup {
                    snapshot: &snapshot,
                    index: &self.index,
                    network: &self.pod.network,
                    namespace: &self.pod.local.pod.namespace,
                }
                .resolve(host, family)
            }
            _ => Resolution::Forward,
        };
        match resolution {
            Resolution::Addresses(addresses) => {
                answer.metadata.authoritative = true;
                // Owner name as asked: clients may randomise its case (0x20) and check it.
                answer.answers = addresses
                    .into_iter()
                    .map(|address| Record::from_rdata(name.clone(), MESH_TTL, RData::from(address)))
                    .collect();
                tracing::debug!(target: "dns", %name, answers = answer.answers.len(), "mesh name");
            }
            Resolution::NoSuchName => {
                answer.metadata.authoritative = true;
                answer.metadata.response_code = ResponseCode::NXDomain;
                tracing::debug!(target: "dns", %name, "not in the mesh: NXDOMAIN");
            }
            Resolution::Forward => {
                self.pod.metrics.dns_upstream_request(&labels);
                let start = Instant::now();
                let forwarded = self
                    .forwarder
                    .forward(name.clone(), query.query_type())
                    .await;
                self.pod
                    .metrics
                    .dns_upstream_duration(&labels, start.elapsed());
                match forwarded {
                    Ok(forwarded) => {
                        tracing::debug!(target: "dns", %name, code = %forwarded.code, answers = forwarded.answers.len(), "forwarded");
                        answer.metadata.response_code = forwarded.code;
                        answer.answers = forwarded.answers;
                        answer.authorities = forwarded.authorities;
                    }
                    Err(error) => {
                        self.pod.metrics.dns_upstream_failure(&labels);
                        tracing::debug!(target: "dns", %name, code = %error.code(), %error, "forwarding failed");
                        answer.metadata.response_code = error.code();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::proxy::local::LocalWorkload;
    use crate::proxy::PodInfo;
    use ambit_mesh::dns::Server;
    use ambit_mesh::state::{Snapshot, StateStore};
    use hickory_proto::rr::Name;

    #[tokio::test]
    async fn a_failed_forward_is_servfail_and_counted() {
        let snapshot = Snapshot::build(Vec::new(), Vec::new(), Vec::new()).unwrap();
        let handler = Handler::new(
            PodDns {
                state: Arc::new(StateStore::new(snapshot)),
                network: String::new(),
                metrics: Default::default(),
                local: Arc::new(LocalWorkload {
                    pod: PodInfo {
                        uid: "pod".into(),
                        name: "pod".into(),
                        namespace: "default".into(),
                        service_account: "default".into(),
                    },
                    node: String::new(),
                }),
            },
            Forwarder::unreachable(),
        );
        let server = Server::new(handler, super::super::LIMITS);
        let mut query = Message::query();
        query.add_query(Query::query(
            Name::from_ascii("example.org.").unwrap(),
            RecordType::A,
        ));
        let bytes = server
            .handle(&query.to_vec().unwrap(), Transport::Udp)
            .await
            .expect("an answer");
        let answer = Message::from_vec(&bytes).unwrap();
        assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
        assert!(answer.metadata.recursion_available);
        let metrics = server.answerer().pod.metrics.render();
        for name in [
            "istio_dns_requests_total",
            "istio_dns_upstream_requests_total",
            "istio_dns_upstream_failures_total",
            "istio_dns_upstream_request_duration_seconds_bucket",
        ] {
            assert!(
                metrics.lines().any(|l| l.starts_with(name)
                    && l.contains("request_query_type=\"a\"")
                    && l.contains("request_protocol=\"udp\"")
                    && l.contains("source_canonical_service=\"unknown\"")),
                "{name} in {metrics}"
            );
        }
    }
}
