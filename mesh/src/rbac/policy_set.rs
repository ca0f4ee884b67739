//! The store of authorization policies and the allow/deny decision for a connection: which
//! policies apply to a destination (global, its namespace's, and the ones its workload lists),
//! and how their DENY and ALLOW results combine, as in ztunnel's `assert_rbac`.

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use tracing::{debug, info, warn};

use super::matching::Peer;
use super::{Action, Authorization, ConnectionInfo, Scope};

/// All known policies, indexed by how they select workloads. Policies are named by their xDS
/// resource name, `namespace/name`.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    by_key: HashMap<String, Authorization>,
    /// Keys of Global-scope policies. Ordered sets keep evaluation order (and so which policy is
    /// reported as deciding) stable from run to run.
    global: BTreeSet<String>,
    /// Keys of Namespace-scope policies, by namespace.
    by_namespace: HashMap<String, BTreeSet<String>>,
}

/// The outcome of authorizing a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the policy that decided, when one did.
    pub policy: Option<String>,
    pub reason: DecisionReason,
}

/// Why a connection was allowed or denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecisionReason {
    /// A DENY policy matched.
    DenyPolicyMatched,
    /// No ALLOW policy applies to the destination, so nothing restricts it.
    NoAllowPolicies,
    /// An ALLOW policy matched.
    AllowPolicyMatched,
    /// ALLOW policies apply to the destination but none matched.
    NoAllowPolicyMatched,
}

impl fmt::Display for DecisionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecisionReason::DenyPolicyMatched => "a DENY policy matched",
            DecisionReason::NoAllowPolicies => "no ALLOW policy applies",
            DecisionReason::AllowPolicyMatched => "an ALLOW policy matched",
            DecisionReason::NoAllowPolicyMatched => "no ALLOW policy matched",
        })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.allowed { "allowed" } else { "denied" })?;
        write!(f, ": {}", self.reason)?;
        if let Some(policy) = &self.policy {
            write!(f, " ({policy})")?;
        }
        Ok(())
    }
}

impl PolicySet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the policy named `namespace/name`, returning the one it replaced.
    ///
    /// Like ztunnel, stores even a policy [`Authorization::validate`] refuses (the control plane
    /// is authoritative, and dropping it could drop a DENY); the problem is logged instead.
    /// Configuration read from files should be checked up front ([`super::parse_policies`]
    /// does).
    pub fn insert(&mut self, policy: Authorization) -> Option<Authorization> {
        if let Err(error) = policy.validate() {
            warn!(%error, "storing a questionable authorization policy");
        }
        let key = policy.key();
        // Through `remove` so a policy whose scope changed leaves its old index.
        let previous = self.remove_key(&key);
        match policy.scope {
            Scope::Global => {
                self.global.insert(key.clone());
            }
            Scope::Namespace => {
                self.by_namespace
                    .entry(policy.namespace.clone())
                    .or_default()
                    .insert(key.clone());
            }
            // Found only through the workloads that list them.
            Scope::WorkloadSelector => {}
        }
        self.by_key.insert(key, policy);
        previous
    }

    /// Removes the policy `namespace/name`, returning it if it was present.
    pub fn remove(&mut self, namespace: &str, name: &str) -> Option<Authorization> {
        self.remove_key(&format!("{namespace}/{name}"))
    }

    fn remove_key(&mut self, key: &str) -> Option<Authorization> {
        let policy = self.by_key.remove(key)?;
        match policy.scope {
            Scope::Global => {
                self.global.remove(key);
            }
            Scope::Namespace => {
                if let Some(keys) = self.by_namespace.get_mut(&policy.namespace) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.by_namespace.remove(&policy.namespace);
                    }
                }
            }
            Scope::WorkloadSelector => {}
        }
        Some(policy)
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&Authorization> {
        self.by_key.get(&format!("{namespace}/{name}"))
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Every policy, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Authorization> + '_ {
        self.by_key.values()
    }

    /// The policies that apply to a workload in `dest_namespace` listing `workload_policies`
    /// (`namespace/name` keys, as in `Workload.authorization_policies`): its namespace's, the
    /// global ones, then the listed ones, each once.
    pub fn policies_for<'a>(
        &'a self,
        dest_namespace: &'a str,
        workload_policies: &'a [String],
    ) -> impl Iterator<Item = &'a Authorization> + 'a {
        let indexed = self
            .by_namespace
            .get(dest_namespace)
            .into_iter()
            .flatten()
            .chain(&self.global)
            .filter_map(|key| self.by_key.get(key));
        let listed = workload_policies.iter().filter_map(move |key| {
            let Some(policy) = self.by_key.get(key) else {
                // Usually a policy istiod has not sent yet or just removed. Worth seeing: until
                // it arrives, a DENY it carries is not enforced.
                warn!(policy = %key, "workload lists an unknown authorization policy; skipping it");
                return None;
            };
            // Already produced by the indexes above; evaluating it twice would change nothing.
            let indexed = policy.scope == Scope::Global
                || (policy.scope == Scope::Namespace && policy.namespace == dest_namespace);
            (!indexed).then_some(policy)
        });
        indexed.chain(listed)
    }

    /// Authorizes a connection to a workload in `dest_namespace` listing `workload_policies`.
    pub fn evaluate(
        &self,
        dest_namespace: &str,
        workload_policies: &[String],
        conn: &ConnectionInfo,
    ) -> Decision {
        evaluate(self.policies_for(dest_namespace, workload_policies), conn)
    }
}

/// Decides a connection against the policies that apply to its destination, following Istio:
/// any matching DENY denies; otherwise, with no ALLOW policy the connection is allowed; otherwise
/// some ALLOW must match. Dry-run policies are evaluated and logged, never enforced.
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Authorization>,
    conn: &ConnectionInfo,
) -> Decision {
    let mut deny = Vec::new();
    let mut allow = Vec::new();
    let mut deny_dry_run = Vec::new();
    let mut allow_dry_run = Vec::new();
    for policy in policies {
        match (policy.action, policy.dry_run) {
            (Action::Deny, false) => deny.push(policy),
            (Action::Allow, false) => allow.push(policy),
            (Action::Deny, true) => deny_dry_run.push(policy),
            (Action::Allow, true) => allow_dry_run.push(policy),
        }
    }
    let peer = Peer::new(conn);

    for policy in &deny_dry_run {
        if policy.matches_peer(&peer) {
            info!(policy = %policy.key(), %conn, "dry-run: DENY policy matched; would deny");
        }
    }
    if let Some(policy) = deny.iter().find(|p| p.matches_peer(&peer)) {
        let key = policy.key();
        debug!(policy = %key, %conn, "denied: DENY policy matched");
        return Decision {
            allowed: false,
            policy: Some(key),
            reason: DecisionReason::DenyPolicyMatched,
        };
    }

    let mut dry_run_allow_matched = false;
    for policy in &allow_dry_run {
        if policy.matches_peer(&peer) {
            dry_run_allow_matched = true;
            info!(policy = %policy.key(), %conn, "dry-run: ALLOW policy matched");
        }
    }
    if allow.is_empty() {
        if !allow_dry_run.is_empty() && !dry_run_allow_matched {
            // Allowed now, but the dry-run ALLOW policies would start denying it if enforced.
            info!(%conn, "dry-run: no ALLOW policy matched; would deny");
        }
        debug!(%conn, "allowed: no ALLOW policy applies");
        return Decision {
            allowed: true,
            policy: None,
            reason: DecisionReason::NoAllowPolicies,
        };
    }
    if let Some(policy) = allow.iter().find(|p| p.matches_peer(&peer)) {
        let key = policy.key();
        debug!(policy = %key, %conn, "allowed: ALLOW policy matched");
        return Decision {
            allowed: true,
            policy: Some(key),
            reason: DecisionReason::AllowPolicyMatched,
        };
    }
    debug!(%conn, "denied: no ALLOW policy matched");
    Decision {
        allowed: false,
        policy: None,
        reason: DecisionReason::NoAllowPolicyMatched,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse_policies, Match, RbacError, StringMatch};
    use super::*;

    fn sleep() -> ConnectionInfo {
        ConnectionInfo {
            source_identity: Some("spiffe://cluster.local/ns/demo/sa/sleep".parse().unwrap()),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination_ip: "10.0.1.1".parse().unwrap(),
            destination_port: 8080,
        }
    }

    fn set(yaml: &str) -> PolicySet {
        let mut set = PolicySet::new();
        for policy in parse_policies(yaml).unwrap() {
            set.insert(policy);
        }
        set
    }

    fn keys<'a>(it: impl Iterator<Item = &'a Authorization>) -> Vec<String> {
        let mut keys: Vec<_> = it.map(Authorization::key).collect();
        keys.sort();
        keys
    }

    fn listed(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    const SCOPES: &str = r#"
- {name: g, namespace: istio-system, scope: Global, rules: [[]]}
- {name: n, namespace: demo, scope: Namespace, rules: [[]]}
- {name: o, namespace: other, scope: Namespace, rules: [[]]}
- {name: w, namespace: demo, scope: WorkloadSelector, rules: [[]]}
"#;

    #[test]
    fn scope_selection() {
        let set = set(SCOPES);
        assert_eq!(set.len(), 4);
        // Global applies everywhere; a namespace policy only in its namespace; a selector
        // policy only to workloads that list it.
        assert_eq!(
            keys(set.policies_for("demo", &[])),
            ["demo/n", "istio-system/g"]
        );
        assert_eq!(
            keys(set.policies_for("other", &[])),
            ["istio-system/g", "other/o"]
        );
        assert_eq!(keys(set.policies_for("elsewhere", &[])), ["istio-system/g"]);
        assert_eq!(
            keys(set.policies_for("demo", &listed(&["demo/w"]))),
            ["demo/n", "demo/w", "istio-system/g"]
        );
        // Unknown keys are skipped.
        assert_eq!(
            keys(set.policies_for("elsewhere", &listed(&["demo/missing"]))),
            ["istio-system/g"]
        );
    }

    #[test]
    fn each_policy_is_produced_once() {
        let set = set(SCOPES);
        let all = listed(&["demo/n", "istio-system/g", "demo/w", "other/o"]);
        assert_eq!(
            keys(set.policies_for("demo", &all)),
            ["demo/n", "demo/w", "istio-system/g", "other/o"]
        );
    }

    #[test]
    fn scope_decides_enforcement() {
        let set = set(
            "- {name: deny-all, namespace: demo, scope: Namespace, action: Deny, rules: [[]]}\n\
             - {name: deny-sel, namespace: other, scope: WorkloadSelector, action: Deny, rules: [[]]}",
        );
        let deny = set.evaluate("demo", &[], &sleep());
        assert!(!deny.allowed);
        assert_eq!(deny.policy.as_deref(), Some("demo/deny-all"));
        assert!(set.evaluate("other", &[], &sleep()).allowed);
        let sel = set.evaluate("other", &listed(&["other/deny-sel"]), &sleep());
        assert!(!sel.allowed);
        assert_eq!(sel.policy.as_deref(), Some("other/deny-sel"));
    }

    #[test]
    fn insert_replaces_and_reindexes_on_scope_change() {
        let mut set = set("- {name: p, namespace: demo, scope: Namespace, rules: [[]]}");
        assert_eq!(keys(set.policies_for("demo", &[])), ["demo/p"]);
        let mut changed = set.get("demo", "p").unwrap().clone();
        changed.scope = Scope::WorkloadSelector;
        let previous = set.insert(changed).unwrap();
        assert_eq!(previous.scope, Scope::Namespace);
        assert_eq!(set.len(), 1);
        assert!(keys(set.policies_for("demo", &[])).is_empty());
        assert_eq!(
            keys(set.policies_for("demo", &listed(&["demo/p"]))),
            ["demo/p"]
        );

        let mut global = set.get("demo", "p").unwrap().clone();
        global.scope = Scope::Global;
        assert!(set.insert(global).is_some());
        assert_eq!(keys(set.policies_for("anywhere", &[])), ["demo/p"]);
    }

    #[test]
    fn remove_unindexes() {
        let mut set = set(SCOPES);
        assert_eq!(set.remove("demo", "n").unwrap().name, "n");
        assert_eq!(set.remove("istio-system", "g").unwrap().name, "g");
        assert!(set.remove("demo", "n").is_none());
        assert!(keys(set.policies_for("demo", &[])).is_empty());
        assert!(!set.by_namespace.contains_key("demo"));
        assert_eq!(set.remove("demo", "w").unwrap().name, "w");
        assert!(keys(set.policies_for("demo", &listed(&["demo/w"]))).is_empty());
        assert_eq!(set.len(), 1);
        set.clear();
        assert!(set.is_empty());
    }

    #[test]
    fn insert_keeps_policies_validation_refuses() {
        let mut set = PolicySet::new();
        let no_namespace = Authorization {
            name: "p".into(),
            scope: Scope::Namespace,
            action: Action::Deny,
            rules: vec![super::super::Rule::default()],
            ..Authorization::default()
        };
        assert!(matches!(
            no_namespace.validate(),
            Err(RbacError::MissingNamespace { .. })
        ));
        assert!(set.insert(no_namespace).is_none());
        assert_eq!(set.len(), 1);
        assert_eq!(keys(set.policies_for("demo", &[])), Vec::<String>::new());
    }

    #[test]
    fn no_policies_allows() {
        let d = PolicySet::new().evaluate("demo", &[], &sleep());
        assert_eq!(
            d,
            Decision {
                allowed: true,
                policy: None,
                reason: DecisionReason::NoAllowPolicies,
            }
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let set = set(
            "- {name: allow-all, namespace: demo, scope: Namespace, action: Allow, rules: [[]]}\n\
             - {name: deny-8080, namespace: demo, scope: Namespace, action: Deny, \
                rules: [[[{destinationPorts: [8080]}]]]}",
        );
        let d = set.evaluate("demo", &[], &sleep());
        assert!(!d.allowed);
        assert_eq!(d.policy.as_deref(), Some("demo/deny-8080"));
        assert_eq!(d.reason, DecisionReason::DenyPolicyMatched);
        let other_port = ConnectionInfo {
            destination_port: 80,
            ..sleep()
        };
        let d = set.evaluate("demo", &[], &other_port);
        assert!(d.allowed);
        assert_eq!(d.policy.as_deref(), Some("demo/allow-all"));
        assert_eq!(d.reason, DecisionReason::AllowPolicyMatched);
    }

    #[test]
    fn unmatched_deny_without_allow_allows() {
        let set = set(
            "- {name: d, namespace: demo, scope: Namespace, action: Deny, \
                rules: [[[{destinationPorts: [22]}]]]}",
        );
        let d = set.evaluate("demo", &[], &sleep());
        assert!(d.allowed);
        assert_eq!(d.reason, DecisionReason::NoAllowPolicies);
        assert_eq!(d.policy, None);
    }

    #[test]
    fn allow_without_match_denies() {
        let set = set(
            "- {name: a, namespace: demo, scope: Namespace, action: Allow, \
                rules: [[[{principals: [!Exact cluster.local/ns/demo/sa/curl]}]]]}",
        );
        let d = set.evaluate("demo", &[], &sleep());
        assert_eq!(
            d,
            Decision {
                allowed: false,
                policy: None,
                reason: DecisionReason::NoAllowPolicyMatched,
            }
        );
        assert_eq!(d.to_string(), "denied: no ALLOW policy matched");
    }

    #[test]
    fn an_allow_policy_without_rules_denies_everything() {
        let set = set("- {name: a, namespace: demo, scope: Namespace, action: Allow}");
        assert!(!set.evaluate("demo", &[], &sleep()).allowed);
        assert!(set.evaluate("other", &[], &sleep()).allowed);
    }

    #[test]
    fn any_matching_allow_allows() {
        let set = set(
            "- {name: a1, namespace: demo, scope: Namespace, rules: [[[{destinationPorts: [80]}]]]}\n\
             - {name: a2, namespace: demo, scope: Namespace, rules: [[[{destinationPorts: [8080]}]]]}",
        );
        let d = set.evaluate("demo", &[], &sleep());
        assert!(d.allowed);
        assert_eq!(d.policy.as_deref(), Some("demo/a2"));
        assert_eq!(d.to_string(), "allowed: an ALLOW policy matched (demo/a2)");
    }

    #[test]
    fn dry_run_never_decides() {
        // A matching dry-run DENY does not deny.
        let set1 = set(
            "- {name: d, namespace: demo, scope: Namespace, action: Deny, dryRun: true, rules: [[]]}",
        );
        let d = set1.evaluate("demo", &[], &sleep());
        assert!(d.allowed);
        assert_eq!(d.reason, DecisionReason::NoAllowPolicies);

        // An unmatched dry-run ALLOW does not turn "no ALLOW policies" into deny.
        let set2 = set(
            "- {name: a, namespace: demo, scope: Namespace, dryRun: true, \
                rules: [[[{destinationPorts: [1]}]]]}",
        );
        assert!(set2.evaluate("demo", &[], &sleep()).allowed);

        // A matching dry-run ALLOW does not rescue a connection real ALLOW policies refuse.
        let set3 = set(
            "- {name: real, namespace: demo, scope: Namespace, rules: [[[{destinationPorts: [1]}]]]}\n\
             - {name: dry, namespace: demo, scope: Namespace, dryRun: true, rules: [[]]}",
        );
        let d = set3.evaluate("demo", &[], &sleep());
        assert!(!d.allowed);
        assert_eq!(d.reason, DecisionReason::NoAllowPolicyMatched);

        // A dry-run DENY does not take precedence over a real ALLOW.
        let set4 = set(
            "- {name: real, namespace: demo, scope: Namespace, rules: [[]]}\n\
             - {name: dry, namespace: demo, scope: Namespace, action: Deny, dryRun: true, rules: [[]]}",
        );
        let d = set4.evaluate("demo", &[], &sleep());
        assert!(d.allowed);
        assert_eq!(d.policy.as_deref(), Some("demo/real"));
    }

    #[test]
    fn global_deny_applies_in_every_namespace() {
        let set = set(
            "- name: require-mtls\n  namespace: istio-system\n  scope: Global\n  action: Deny\n  \
             rules:\n  - - - notPrincipals: [!Presence '']\n",
        );
        let plaintext = ConnectionInfo {
            source_identity: None,
            ..sleep()
        };
        for ns in ["demo", "other", "istio-system"] {
            let d = set.evaluate(ns, &[], &plaintext);
            assert!(!d.allowed, "{ns}");
            assert_eq!(d.policy.as_deref(), Some("istio-system/require-mtls"));
            assert!(set.evaluate(ns, &[], &sleep()).allowed, "{ns}");
        }
    }

    #[test]
    fn evaluate_takes_any_policy_list() {
        let policy = Authorization {
            name: "p".into(),
            namespace: "demo".into(),
            action: Action::Deny,
            rules: vec![super::super::Rule {
                clauses: vec![super::super::Clause {
                    matches: vec![Match {
                        namespaces: vec![StringMatch::Exact("demo".into())],
                        ..Match::default()
                    }],
                }],
            }],
            ..Authorization::default()
        };
        assert!(!evaluate([&policy], &sleep()).allowed);
        assert!(evaluate([], &sleep()).allowed);
    }
}
