//! How ztunnel finds an enrolled pod's workload, as Istio's ztunnel does: the node agent's uid is
//! a Kubernetes pod UID that never appears in the state (workloads are `Kubernetes//Pod/<ns>/<name>`),
//! so the pod is matched by its `WorkloadInfo` (name, namespace, service account) among the
//! workloads on the ztunnel's own node, waiting up to 5 s for the state to deliver it.
//!
//! Two-node [`Cluster`]s with in-process ztunnels (node names `node-1`, `node-2`), Istio's
//! in-pod rules in every enrolled pod, real HBONE between them. Needs root and iptables, like
//! `tests/inpod.rs`.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use ambit_cni::rules::{self, Backend, RuleOptions};
use ambit_mesh::zds::{WorkloadInfo, ZdsError};
use ambit_ztunnel::inpod::PodStatus;
use ambit_ztunnel::testing::{
    app_call, app_server, pod_uid, uid, workload_uid, Cluster, PodNet, VIP,
};

/// `echo`'s node, by index.
const NODE_2: usize = 1;

fn info(name: &str, namespace: &str, service_account: &str) -> WorkloadInfo {
    WorkloadInfo {
        name: name.into(),
        namespace: namespace.into(),
        service_account: service_account.into(),
    }
}

/// A pod that does not exist yet on node 2, with Istio's in-pod rules installed.
fn new_pod(cluster: &mut Cluster, name: &str) -> PodNet {
    let pod = cluster.topology.add_pod(NODE_2, name);
    let options = RuleOptions {
        dns_capture: false,
        ipv6: false,
        ..Default::default()
    };
    rules::install(pod.open(), Backend::Iptables, &options).unwrap();
    pod
}

/// A workload of the state, on node 2, serving port 8080 directly.
fn workload(uid: &str, name: &str, namespace: &str, sa: &str, pod: &PodNet, extra: &str) -> String {
    format!(
        "\n- uid: {uid}\n  name: {name}\n  namespace: {namespace}\n  serviceAccount: {sa}\n  \
         workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: node-2\n  canonicalName: {name}\n  \
         services: {{}}{extra}",
        ip = pod.ip
    )
}

/// Node 2's pods as its ztunnel reports them, once `ready(pods)` holds (within 5 s).
async fn node2_pods(
    cluster: &Cluster,
    what: &str,
    ready: impl Fn(&[PodStatus]) -> bool,
) -> Vec<PodStatus> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pods = cluster.ztunnels[NODE_2].inpod.pods();
        if ready(&pods) {
            return pods;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: node 2's pods are {pods:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn matched(pods: &[PodStatus], zds_uid: &str) -> Option<String> {
    pods.iter()
        .find(|p| p.uid == zds_uid)
        .and_then(|p| p.workload.clone())
}

/// `client` reaches `target` and the app there answers with the client's address and the payload.
async fn assert_reaches(client: &PodNet, target: SocketAddr, what: &str) {
    let payload = format!("{what}: hello");
    let reply = app_call(client, target, payload.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{what}: {} → {target}: {e}", client.name));
    assert_eq!(
        String::from_utf8_lossy(&reply),
        format!("peer={}\n{payload}", client.ip),
        "{what}: {} → {target}",
        client.name
    );
}

/// `client` cannot get the app at `target` to answer.
async fn assert_refused(client: &PodNet, target: SocketAddr, what: &str) {
    let reply = app_call(client, target, b"refused?").await;
    assert!(
        !matches!(&reply, Ok(bytes) if bytes.ends_with(b"refused?")),
        "{what}: {} → {target} got through: {reply:?}",
        client.name
    );
}

#[tokio::test]
async fn a_workload_delivered_after_the_zds_add_is_served_within_the_wait() {
    let mut cluster = Cluster::start().await;
    app_server(&cluster.echo, 8080).await;
    let vip = SocketAddr::new(VIP.parse().unwrap(), 80);
    assert_reaches(&cluster.sleep, vip, "start").await;

    // echo's workload leaves node 2 (the source side still routes to its address).
    let original = cluster.state_text("", "");
    let moved = original.replacen(
        "  node: node-2\n  canonicalName: echo\n",
        "  node: node-3\n  canonicalName: echo\n",
        1,
    );
    assert_ne!(moved, original);
    cluster.write_state(&moved);
    let echo = uid(&cluster.echo);
    node2_pods(&cluster, "echo's workload moved away", |pods| {
        matched(pods, &echo).is_none()
    })
    .await;

    // A new pod (new Kubernetes UID) in echo's netns: acked although the state lacks it.
    // Taken out of the fixture, so the test can borrow the cluster while it talks.
    let mut agent = cluster.agents.remove(NODE_2);
    agent.del(&echo).await.unwrap();
    let fresh = pod_uid();
    agent
        .add(
            &fresh,
            info("echo", "default", "echo"),
            cluster.echo.open().as_fd(),
        )
        .await
        .expect("an Add whose workload the state lacks yet is acked");
    let pods = node2_pods(&cluster, "fresh echo listed", |pods| {
        pods.iter().any(|p| p.uid == fresh)
    })
    .await;
    let error = pods
        .iter()
        .find(|p| p.uid == fresh)
        .unwrap()
        .workload_error
        .clone();
    assert!(
        error.as_deref().is_some_and(|e| e.contains(
            "no workload on node \"node-2\" matches pod default/echo (service account echo)"
        )),
        "the reason is shown: {error:?}"
    );

    // A connection made now waits for the workload, which arrives 1.5 s later.
    let sleep = cluster.sleep.clone();
    let started = Instant::now();
    let call = tokio::spawn(async move { app_call(&sleep, vip, b"late").await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.write_state(&original);
    let reply = call
        .await
        .unwrap()
        .expect("the call waits for the workload");
    let waited = started.elapsed();
    eprintln!("late workload: the call was served after {waited:?} (workload delivered at 1.5 s)");
    assert_eq!(
        String::from_utf8_lossy(&reply),
        format!("peer={}\nlate", cluster.sleep.ip)
    );
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "served once the workload arrived, within the wait: {waited:?}"
    );
    let pods = cluster.ztunnels[NODE_2].inpod.pods();
    assert_eq!(matched(&pods, &fresh), Some(workload_uid(&cluster.echo)));
}

#[tokio::test]
async fn a_pod_no_workload_matches_is_refused_with_the_reason_until_one_does() {
    let mut cluster = Cluster::start().await;
    app_server(&cluster.echo, 8080).await;
    let echo_ip = SocketAddr::new(cluster.echo.ip.into(), 8080);
    assert_reaches(&cluster.sleep, echo_ip, "start").await;

    // The node agent re-enrolls echo's netns under a name the state does not know.
    let echo = uid(&cluster.echo);
    let ghost = pod_uid();
    // Taken out of the fixture, so the test can borrow the cluster while it talks.
    let mut agent = cluster.agents.remove(NODE_2);
    agent.del(&echo).await.unwrap();
    agent
        .add(
            &ghost,
            info("ghost", "default", "echo"),
            cluster.echo.open().as_fd(),
        )
        .await
        .expect("acked: the workload may still be on its way");

    let started = Instant::now();
    assert_refused(&cluster.sleep, echo_ip, "no workload matches").await;
    let waited = started.elapsed();
    eprintln!("no matching workload: the call was refused after {waited:?}");
    assert!(
        waited >= Duration::from_millis(4500),
        "refused only after the 5 s wait: {waited:?}"
    );
    let pods = cluster.ztunnels[NODE_2].inpod.pods();
    let status = pods.iter().find(|p| p.uid == ghost).unwrap();
    assert_eq!(status.state, "running");
    assert_eq!(status.workload, None);
    assert!(
        status.workload_error.as_deref().is_some_and(|e| e.contains(
            "no workload on node \"node-2\" matches pod default/ghost (service account echo)"
        )),
        "{status:?}"
    );
    // Node 1 is untouched.
    let node1 = cluster.ztunnels[0].inpod.pods();
    assert_eq!(
        matched(&node1, &uid(&cluster.sleep)),
        Some(workload_uid(&cluster.sleep))
    );

    // The control plane renames the workload: the same pod proxy now serves.
    cluster.write_state(&cluster.state_text("", "").replacen(
        "  name: echo\n",
        "  name: ghost\n",
        1,
    ));
    node2_pods(&cluster, "ghost matched", |pods| {
        matched(pods, &ghost).is_some()
    })
    .await;
    assert_reaches(&cluster.sleep, echo_ip, "workload delivered").await;
}

#[tokio::test]
async fn pods_on_one_node_are_told_apart_by_name_and_namespace() {
    let mut cluster = Cluster::start().await;
    // echo2: echo's service account; echo-b: echo's name in another namespace.
    let echo2 = new_pod(&mut cluster, "echo2");
    let echo_b = new_pod(&mut cluster, "echo-b");
    let (uid2, uid_b) = (pod_uid(), pod_uid());
    let other_echo = "Kubernetes//Pod/other/echo";
    let extra = |policies: &str| {
        [
            workload(
                &workload_uid(&echo2),
                "echo2",
                "default",
                "echo",
                &echo2,
                policies,
            ),
            workload(other_echo, "echo", "other", "echo", &echo_b, ""),
        ]
        .concat()
    };
    cluster.write_state(&cluster.state_text(&extra(""), ""));
    // Taken out of the fixture, so the test can borrow the cluster while it talks.
    let mut agent = cluster.agents.remove(NODE_2);
    agent
        .add(
            &uid2,
            info("echo2", "default", "echo"),
            echo2.open().as_fd(),
        )
        .await
        .unwrap();
    agent
        .add(&uid_b, info("echo", "other", "echo"), echo_b.open().as_fd())
        .await
        .unwrap();

    let echo = uid(&cluster.echo);
    let pods = node2_pods(&cluster, "three pods matched", |pods| {
        [&echo, &uid2, &uid_b]
            .iter()
            .all(|u| matched(pods, u).is_some())
    })
    .await;
    assert_eq!(matched(&pods, &echo), Some(workload_uid(&cluster.echo)));
    assert_eq!(matched(&pods, &uid2), Some(workload_uid(&echo2)));
    assert_eq!(matched(&pods, &uid_b), Some(other_echo.to_owned()));

    for pod in [&cluster.echo, &echo2, &echo_b] {
        app_server(pod, 8080).await;
        let target = SocketAddr::new(pod.ip.into(), 8080);
        assert_reaches(&cluster.sleep, target, &format!("to {}", pod.name)).await;
    }

    // A DENY on echo2's workload alone refuses echo2 and nobody else.
    let deny = "policies:\n- name: deny-sleep\n  namespace: default\n  scope: WorkloadSelector\n  \
                action: Deny\n  rules:\n  - - - principals: [!Exact \"cluster.local/ns/default/sa/sleep\"]\n";
    let selected = "\n  authorizationPolicies: [\"default/deny-sleep\"]";
    cluster.write_state(&cluster.state_text(&extra(selected), deny));
    cluster.wait_for_policies(1).await;
    assert_refused(
        &cluster.sleep,
        SocketAddr::new(echo2.ip.into(), 8080),
        "echo2 under its DENY",
    )
    .await;
    for pod in [&cluster.echo, &echo_b] {
        let target = SocketAddr::new(pod.ip.into(), 8080);
        assert_reaches(
            &cluster.sleep,
            target,
            &format!("{} beside echo2's DENY", pod.name),
        )
        .await;
    }
}

#[tokio::test]
async fn a_zds_uid_names_one_pod_at_a_time() {
    let mut cluster = Cluster::start().await;
    let echo2 = new_pod(&mut cluster, "echo2");
    cluster.write_state(&cluster.state_text(
        &workload(
            &workload_uid(&echo2),
            "echo2",
            "default",
            "echo2",
            &echo2,
            "",
        ),
        "",
    ));
    app_server(&cluster.echo, 8080).await;
    app_server(&echo2, 8080).await;
    let echo_ip = SocketAddr::new(cluster.echo.ip.into(), 8080);
    let echo2_ip = SocketAddr::new(echo2.ip.into(), 8080);
    assert_reaches(&cluster.sleep, echo_ip, "start").await;

    // echo's uid for another pod, while echo still holds it: refused, echo untouched.
    let echo = uid(&cluster.echo);
    // Taken out of the fixture, so the test can borrow the cluster while it talks.
    let mut agent = cluster.agents.remove(NODE_2);
    let refused = agent
        .add(
            &echo,
            info("echo2", "default", "echo2"),
            echo2.open().as_fd(),
        )
        .await;
    match &refused {
        Err(ZdsError::Nack { reason, .. }) => assert!(
            reason.contains(&format!("uid {echo} already names pod default/echo"))
                && reason.contains("default/echo2"),
            "{reason}"
        ),
        other => panic!("a second pod under echo's uid: expected a nack, got {other:?}"),
    }
    assert_reaches(&cluster.sleep, echo_ip, "after the refused reuse").await;

    // After a Del, the uid may name the new pod; nothing of echo's stays attached to it.
    agent.del(&echo).await.unwrap();
    agent
        .add(
            &echo,
            info("echo2", "default", "echo2"),
            echo2.open().as_fd(),
        )
        .await
        .expect("a uid reused after its Del is a new pod");
    let pods = node2_pods(&cluster, "uid reused", |pods| {
        matched(pods, &echo) == Some(workload_uid(&echo2))
    })
    .await;
    let status = pods.iter().find(|p| p.uid == echo).unwrap();
    assert_eq!(
        (status.name.as_str(), status.identity.as_str()),
        ("echo2", "spiffe://cluster.local/ns/default/sa/echo2")
    );
    assert_reaches(&cluster.sleep, echo2_ip, "the reused uid's pod").await;
    // echo is out of the mesh now: its in-pod rules lead to no listener.
    assert_refused(&cluster.sleep, echo_ip, "echo after its Del").await;

    // An Add whose WorkloadInfo names no pod is refused; the running pod is untouched.
    let fresh = pod_uid();
    let refused = agent
        .add(
            &fresh,
            info("", "default", "echo"),
            cluster.echo.open().as_fd(),
        )
        .await;
    assert!(
        matches!(&refused, Err(ZdsError::Nack { reason, .. }) if reason.contains("WorkloadInfo needs the pod's name")),
        "{refused:?}"
    );
    assert_reaches(&cluster.sleep, echo2_ip, "after the refused Add").await;
}

/// The state with `sleep` (node 1) and `echo` in trust domain `other.local`, `sleep` on `node`.
fn other_trust_domain(cluster: &Cluster, sleep_node: &str) -> String {
    let text = cluster
        .state_text("", "")
        .replacen(
            "  node: node-1\n  canonicalName: sleep\n",
            &format!("  node: {sleep_node}\n  canonicalName: sleep\n  trustDomain: other.local\n"),
            1,
        )
        .replacen(
            "  canonicalName: echo\n",
            "  canonicalName: echo\n  trustDomain: other.local\n",
            1,
        );
    assert_eq!(text.matches("trustDomain: other.local").count(), 2);
    text
}

/// Outbound finds the source pod's workload as Istio's does (waiting up to 5 s) and connects as
/// that workload's identity, trust domain included; a pod whose workload never arrives has its
/// connection closed after the wait and counted (`response_flags="NR"`).
#[tokio::test]
async fn outbound_waits_for_the_source_workload_and_connects_as_its_identity() {
    let cluster = Cluster::start().await;
    app_server(&cluster.echo, 8080).await;
    let echo_ip = SocketAddr::new(cluster.echo.ip.into(), 8080);
    let sleep = uid(&cluster.sleep);
    let node1_sleep = |what: &'static str, matched_now: bool| {
        let cluster = &cluster;
        let sleep = sleep.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matched(&cluster.ztunnels[0].inpod.pods(), &sleep).is_some() != matched_now {
                assert!(Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // sleep's workload leaves node 1; both pods move to another trust domain.
    cluster.write_state(&other_trust_domain(&cluster, "node-3"));
    node1_sleep("sleep's workload gone from node 1", false).await;

    // A connection made now waits; the workload arrives 1 s later.
    let client = cluster.sleep.clone();
    let started = Instant::now();
    let call = tokio::spawn(async move { app_call(&client, echo_ip, b"late").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.write_state(&other_trust_domain(&cluster, "node-1"));
    let reply = call
        .await
        .unwrap()
        .expect("the call waits for sleep's workload");
    let waited = started.elapsed();
    eprintln!("late source workload: served after {waited:?} (delivered at 1 s)");
    assert_eq!(
        String::from_utf8_lossy(&reply),
        format!("peer={}\nlate", cluster.sleep.ip)
    );
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // Echo's ztunnel saw the client certificate of sleep's workload, not the identity sleep's
    // proxy started with (cluster.local).
    let principal = "source_principal=\"spiffe://other.local/ns/default/sa/sleep\"";
    let node2 = cluster.ztunnels[NODE_2].metrics.render();
    assert!(
        node2
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total") && l.contains(principal)),
        "{node2}"
    );

    // The workload leaves again and does not come back: closed after the wait, and counted.
    cluster.write_state(&other_trust_domain(&cluster, "node-3"));
    node1_sleep("sleep's workload gone again", false).await;
    let started = Instant::now();
    let reply = app_call(&cluster.sleep, echo_ip, b"never").await;
    let waited = started.elapsed();
    assert!(
        !matches!(&reply, Ok(bytes) if bytes.ends_with(b"never")),
        "served without a source workload: {reply:?}"
    );
    assert!(
        waited >= Duration::from_millis(4500) && waited < Duration::from_secs(8),
        "closed after the 5 s wait: {waited:?}"
    );
    let node1 = cluster.ztunnels[0].metrics.render();
    let refused: Vec<&str> = node1
        .lines()
        .filter(|l| l.contains("response_flags=\"NR\""))
        .collect();
    assert!(
        refused
            .iter()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total") && l.ends_with(" 1"))
            && refused
                .iter()
                .any(|l| l.starts_with("istio_tcp_connections_closed_total") && l.ends_with(" 1")),
        "{node1}"
    );
}
