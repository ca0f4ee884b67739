//! Which pods join the mesh: istio-cni's enrollment decision, as a pure function of a pod's
//! metadata and its namespace's labels.
//!
//! This mirrors istio-cni's default `ambientEnablementSelector`
//! (`cni/pkg/util/enablement_selector.go` `Matches`, selectors from the istio-cni chart):
//!
//! 1. a host-network pod is never enrolled: its "netns" is the node's, and redirect rules there
//!    would capture the whole node;
//! 2. a pod with the annotation `sidecar.istio.io/status` (written by sidecar injection) is never
//!    enrolled: ztunnel and a sidecar on one pod is unsupported, and sidecar injection wins;
//! 3. pod label `istio.io/dataplane-mode=ambient` enrolls, whatever the namespace says;
//! 4. namespace label `istio.io/dataplane-mode=ambient` enrolls every pod of the namespace whose
//!    own `istio.io/dataplane-mode` label is not `none` (Kubernetes `NotIn [none]`, so an absent
//!    label or any other value is in);
//! 5. nothing else is enrolled.
//!
//! Istio decides sidecars by the annotation alone (`podHasSidecar`), not by the
//! `security.istio.io/tlsMode` label, so this does too: a pod carrying only that label is judged
//! by its dataplane-mode labels.

use std::collections::BTreeMap;
use std::fmt;

/// Pod and namespace label selecting the data plane (`ambient` or `none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// [`DATAPLANE_MODE_LABEL`] value that enrolls.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// [`DATAPLANE_MODE_LABEL`] value with which a pod opts out of its namespace's ambient mode.
pub const DATAPLANE_MODE_NONE: &str = "none";
/// Written by Istio's sidecar injector on every pod it injected.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

/// What [`enrollment`] needs to know about a pod, wherever it came from (the Kubernetes API, a
/// local manifest).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `spec.hostNetwork`.
    pub host_network: bool,
}

/// The decision for one pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enrollment {
    Enrolled,
    NotEnrolled(NotEnrolled),
}

impl Enrollment {
    pub fn is_enrolled(self) -> bool {
        self == Enrollment::Enrolled
    }
}

/// Why a pod stays out of the mesh; `Display` says it for logs and events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotEnrolled {
    /// `spec.hostNetwork: true`.
    HostNetwork,
    /// Sidecar-injected (annotation `sidecar.istio.io/status`).
    Sidecar,
    /// Pod label `istio.io/dataplane-mode=none` in an ambient namespace.
    OptedOut,
    /// Neither the pod nor its namespace is labeled `istio.io/dataplane-mode=ambient`.
    NotSelected,
}

impl fmt::Display for NotEnrolled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotEnrolled::HostNetwork => "the pod uses the host network",
            NotEnrolled::Sidecar => {
                "the pod has an Istio sidecar (annotation sidecar.istio.io/status); sidecar and \
                 ambient on one pod are not supported"
            }
            NotEnrolled::OptedOut => "the pod opts out with label istio.io/dataplane-mode=none",
            NotEnrolled::NotSelected => {
                "neither the pod nor its namespace is labeled istio.io/dataplane-mode=ambient"
            }
        })
    }
}

/// Decides whether `pod`, in a namespace labeled `namespace_labels`, belongs in the mesh, with
/// Istio's rules (see the module docs).
pub fn enrollment(pod: &PodMeta, namespace_labels: &BTreeMap<String, String>) -> Enrollment {
    // Exclusions come first: no label can enroll these pods.
    if pod.host_network {
        return Enrollment::NotEnrolled(NotEnrolled::HostNetwork);
    }
    if pod.annotations.contains_key(SIDECAR_STATUS_ANNOTATION) {
        return Enrollment::NotEnrolled(NotEnrolled::Sidecar);
    }
    let pod_mode = pod.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str);
    if pod_mode == Some(DATAPLANE_MODE_AMBIENT) {
        return Enrollment::Enrolled;
    }
    let namespace_mode = namespace_labels
        .get(DATAPLANE_MODE_LABEL)
        .map(String::as_str);
    if namespace_mode != Some(DATAPLANE_MODE_AMBIENT) {
        return Enrollment::NotEnrolled(NotEnrolled::NotSelected);
    }
    if pod_mode == Some(DATAPLANE_MODE_NONE) {
        return Enrollment::NotEnrolled(NotEnrolled::OptedOut);
    }
    Enrollment::Enrolled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pod(pod_labels: &[(&str, &str)]) -> PodMeta {
        PodMeta {
            namespace: "default".into(),
            name: "echo".into(),
            labels: labels(pod_labels),
            ..Default::default()
        }
    }

    const AMBIENT: &[(&str, &str)] = &[(DATAPLANE_MODE_LABEL, DATAPLANE_MODE_AMBIENT)];
    const NONE: &[(&str, &str)] = &[(DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE)];

    #[test]
    fn namespace_label_enrolls_unlabeled_pods() {
        assert_eq!(
            enrollment(&pod(&[]), &labels(AMBIENT)),
            Enrollment::Enrolled
        );
    }

    #[test]
    fn pod_label_enrolls_even_in_an_unlabeled_namespace() {
        assert_eq!(
            enrollment(&pod(AMBIENT), &labels(&[])),
            Enrollment::Enrolled
        );
        assert_eq!(
            enrollment(&pod(AMBIENT), &labels(NONE)),
            Enrollment::Enrolled,
            "the pod's label wins over the namespace's"
        );
    }

    #[test]
    fn pod_label_none_opts_out_of_an_ambient_namespace() {
        assert_eq!(
            enrollment(&pod(NONE), &labels(AMBIENT)),
            Enrollment::NotEnrolled(NotEnrolled::OptedOut)
        );
    }

    #[test]
    fn other_pod_values_follow_the_namespace() {
        // Istio's selector is `NotIn [none]`: any other value, even empty, keeps the pod in.
        for value in ["", "sidecar", "Ambient"] {
            let p = pod(&[(DATAPLANE_MODE_LABEL, value)]);
            assert_eq!(enrollment(&p, &labels(AMBIENT)), Enrollment::Enrolled);
            assert_eq!(
                enrollment(&p, &labels(&[])),
                Enrollment::NotEnrolled(NotEnrolled::NotSelected),
                "{value:?} alone does not enroll"
            );
        }
    }

    #[test]
    fn nothing_labeled_is_not_enrolled() {
        let not_selected = Enrollment::NotEnrolled(NotEnrolled::NotSelected);
        assert_eq!(enrollment(&pod(&[]), &labels(&[])), not_selected);
        assert_eq!(enrollment(&pod(NONE), &labels(&[])), not_selected);
        assert_eq!(enrollment(&pod(&[]), &labels(NONE)), not_selected);
        // Only the exact value counts, as with a Kubernetes label selector.
        assert_eq!(
            enrollment(
                &pod(&[]),
                &labels(&[(DATAPLANE_MODE_LABEL, "AMBIENT"), ("istio-injection", "x")])
            ),
            not_selected
        );
        // Other Istio labels do not select ambient.
        assert_eq!(
            enrollment(&pod(&[("istio.io/use-waypoint", "wp")]), &labels(&[])),
            not_selected
        );
    }

    #[test]
    fn host_network_pods_are_never_enrolled() {
        for (pod_labels, ns_labels) in [(AMBIENT, AMBIENT), (AMBIENT, &[][..]), (&[][..], AMBIENT)]
        {
            let p = PodMeta {
                host_network: true,
                ..pod(pod_labels)
            };
            assert_eq!(
                enrollment(&p, &labels(ns_labels)),
                Enrollment::NotEnrolled(NotEnrolled::HostNetwork)
            );
        }
    }

    #[test]
    fn sidecar_pods_are_never_enrolled() {
        for (pod_labels, ns_labels) in [(AMBIENT, AMBIENT), (AMBIENT, &[][..]), (&[][..], AMBIENT)]
        {
            let p = PodMeta {
                // Presence is what counts, as in istio-cni: even an empty value.
                annotations: labels(&[(SIDECAR_STATUS_ANNOTATION, "")]),
                ..pod(pod_labels)
            };
            assert_eq!(
                enrollment(&p, &labels(ns_labels)),
                Enrollment::NotEnrolled(NotEnrolled::Sidecar)
            );
        }
    }

    #[test]
    fn the_tls_mode_label_alone_is_not_a_sidecar() {
        // Istio's podHasSidecar looks at the annotation only.
        let p = pod(&[("security.istio.io/tlsMode", "istio")]);
        assert_eq!(enrollment(&p, &labels(AMBIENT)), Enrollment::Enrolled);
    }

    #[test]
    fn host_network_is_reported_before_sidecar() {
        let p = PodMeta {
            host_network: true,
            annotations: labels(&[(SIDECAR_STATUS_ANNOTATION, "{}")]),
            ..pod(AMBIENT)
        };
        assert_eq!(
            enrollment(&p, &labels(AMBIENT)),
            Enrollment::NotEnrolled(NotEnrolled::HostNetwork)
        );
    }

    #[test]
    fn reasons_read_well() {
        assert!(enrollment(&pod(AMBIENT), &labels(&[])).is_enrolled());
        assert!(NotEnrolled::OptedOut
            .to_string()
            .contains("istio.io/dataplane-mode=none"));
        assert!(NotEnrolled::Sidecar
            .to_string()
            .contains("sidecar.istio.io/status"));
    }
}
