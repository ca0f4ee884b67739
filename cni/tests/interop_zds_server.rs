//! Ambit's node agent driving a ZDS peer Ambit did not write: `tests/interop/zds_ztunnel.py`, a
//! Python stdlib script on ztunnel's side of `istio.workload.zds` that connects, says
//! `ZdsHello` V1, decodes every `WorkloadRequest` by hand from Istio's field numbers, receives the
//! netns fd over `SCM_RIGHTS` and acks (or nacks on request).
//!
//! Checked, each from the peer's own decoding: the empty first snapshot (SnapshotSent); Add with
//! the uid, `WorkloadInfo` and the pod's network namespace (the fd the peer received is an nsfs
//! file with the inode of the pod's netns); Del with the uid; on a reconnect the replayed snapshot
//! (Add for the enrolled pod, then SnapshotSent); a nack failing the enrollment with the peer's
//! error and the pod's rules rolled back; no field outside Istio's proto in any message.
//!
//! Needs root, iproute2, iptables and `python3`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ambit_cni::agent::{EnrolledPod, NodeAgent};
use ambit_cni::rules::{Backend, RuleOptions};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

const PEER: &str = "python ZDS ztunnel peer (zds_ztunnel.py)";
const TIMEOUT: Duration = Duration::from_secs(15);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/zds_ztunnel.py")
}

/// A network namespace made with `ip netns add`, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("ambzds{}{tag}", std::process::id() % 100_000);
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .status();
        let status = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add (root and iproute2 needed)");
        assert!(status.success(), "ip netns add {name}");
        Netns(name)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0))
    }

    fn iptables_save(&self) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.0, "iptables-save"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

struct Peer {
    name: &'static str,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
    child: Child,
}

impl Peer {
    async fn connect(name: &'static str, socket: &Path, nack: &[&str]) -> Peer {
        let mut command = Command::new("python3");
        command.arg(script()).arg("--socket").arg(socket);
        for uid in nack {
            command.arg("--nack").arg(uid);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{PEER} ({name}): python3 runs: {e}"));
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut peer = Peer { name, lines, child };
        let first = peer.next("connect and send ZdsHello").await;
        assert!(
            first["connected"].is_string(),
            "{PEER} ({name}): could not connect to the node agent: {first}"
        );
        peer
    }

    async fn next(&mut self, step: &str) -> Value {
        let name = self.name;
        let line = tokio::time::timeout(TIMEOUT, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{PEER} ({name}): {step}: nothing within {TIMEOUT:?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("{PEER} ({name}): {step}: the peer exited"));
        eprintln!("{PEER} ({name}): {line}");
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{PEER} ({name}): {step}: {line:?}: {e}"))
    }

    /// The next message the peer received, checked to be `kind` and clean.
    async fn expect(&mut self, step: &str, kind: &str) -> Value {
        let name = self.name;
        let record = self.next(step).await;
        assert_eq!(
            record["message"].as_str(),
            Some(kind),
            "{PEER} ({name}): {step}: expected {kind}, got {record}"
        );
        assert_eq!(
            record["unknown_fields"],
            serde_json::json!([]),
            "{PEER} ({name}): {step}: fields outside Istio's zds.proto: {record}"
        );
        assert_eq!(
            record["truncated"], false,
            "{PEER} ({name}): {step}: ancillary data truncated"
        );
        record
    }

    async fn close(mut self) {
        drop(self.child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

fn rule_options() -> RuleOptions {
    RuleOptions {
        dns_capture: false,
        ipv6: false,
        ..Default::default()
    }
}

fn pod(netns: &Netns, name: &str) -> EnrolledPod {
    EnrolledPod {
        uid: ambit_cni::testing::pod_uid("bookinfo", name),
        namespace: "bookinfo".into(),
        name: name.into(),
        service_account: "bookinfo-reviews".into(),
        netns: netns.path(),
    }
}

fn check_add(record: &Value, pod: &EnrolledPod, step: &str) {
    assert_eq!(
        record["uid"].as_str(),
        Some(pod.uid.as_str()),
        "{step}: uid"
    );
    assert_eq!(
        record["workload_info"],
        serde_json::json!({
            "name": pod.name,
            "namespace": pod.namespace,
            "service_account": pod.service_account,
        }),
        "{step}: WorkloadInfo"
    );
    assert_eq!(
        record["fds"], 1,
        "{step}: exactly one fd (SCM_RIGHTS): {record}"
    );
    // The peer sees a namespace file (nsfs) with the inode of the pod's netns: the same
    // namespace, whichever path the agent opened it by.
    let inode = std::fs::metadata(&pod.netns).unwrap().ino();
    assert_eq!(
        record["fd_nsfs"], true,
        "{step}: the fd the peer received must be a namespace (nsfs) file: {record}"
    );
    assert_eq!(
        record["fd_inode"].as_u64(),
        Some(inode),
        "{step}: the fd the peer received must be the pod's network namespace (inode of {})",
        pod.netns.display()
    );
    assert_eq!(record["acked"], true, "{step}: the peer acked");
}

#[tokio::test]
async fn node_agent_drives_an_independent_ztunnel_side_peer() {
    let python = std::process::Command::new("python3")
        .arg("--version")
        .output();
    assert!(
        python.is_ok_and(|o| o.status.success()),
        "{PEER}: python3 is required for the interop tests"
    );
    let dir = std::env::temp_dir().join(format!("ambit-interop-zds-server-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("ztunnel.sock");
    let reviews_netns = Netns::new("a");
    let refused_netns = Netns::new("b");

    let agent: Arc<NodeAgent> = NodeAgent::start(&socket, Backend::Iptables, rule_options())
        .unwrap_or_else(|e| panic!("ambit node agent listens on {}: {e}", socket.display()));

    // 1. A fresh ztunnel: nothing enrolled yet, so the snapshot is just SnapshotSent.
    let mut first = Peer::connect(
        "first connection",
        &socket,
        &[&ambit_cni::testing::pod_uid("bookinfo", "refused")],
    )
    .await;
    first
        .expect(
            "ambit node agent → peer: initial (empty) snapshot",
            "snapshot_sent",
        )
        .await;
    agent
        .wait_for_ztunnel(TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("ambit node agent: {PEER} counted as connected: {e}"));

    // 2. Enroll: rules in the pod, then Add with the netns fd.
    let reviews = pod(&reviews_netns, "reviews-v1-0");
    agent
        .enroll(reviews.clone())
        .await
        .unwrap_or_else(|e| panic!("ambit node agent → {PEER}: enroll {}: {e}", reviews.uid));
    let add = first
        .expect("ambit node agent → peer: AddWorkload", "add")
        .await;
    check_add(
        &add,
        &reviews,
        &format!("{PEER}: AddWorkload {}", reviews.uid),
    );
    assert!(
        reviews_netns.iptables_save().contains("ISTIO_PRERT"),
        "ambit node agent: the enrolled pod has its redirect rules"
    );
    assert_eq!(agent.enrolled(), std::slice::from_ref(&reviews.uid));

    // 3. A nack: the enrollment fails with the peer's error and the pod's rules are removed.
    let refused = pod(&refused_netns, "refused");
    let error = agent
        .enroll(refused.clone())
        .await
        .expect_err("ambit node agent: an enrollment the peer nacks must fail");
    let nack = first
        .expect("ambit node agent → peer: AddWorkload (to be nacked)", "add")
        .await;
    assert_eq!(nack["uid"].as_str(), Some(refused.uid.as_str()));
    assert_eq!(nack["acked"], false);
    assert!(
        error.to_string().contains("zds_ztunnel.py refuses"),
        "ambit node agent: the enrollment error must carry the peer's nack: {error}"
    );
    assert!(
        !refused_netns.iptables_save().contains("ISTIO_PRERT"),
        "ambit node agent: rules rolled back after the nack:\n{}",
        refused_netns.iptables_save()
    );
    // istio-cni tells a ztunnel that refused a pod to forget it: a Del may follow.
    assert_eq!(
        agent.enrolled(),
        std::slice::from_ref(&reviews.uid),
        "ambit node agent: enrolled after the nack"
    );

    // 4. ztunnel restarts: the new connection gets the snapshot replayed (Add, then SnapshotSent).
    first.close().await;
    let mut second = Peer::connect("second connection", &socket, &[]).await;
    let mut replay = second
        .next("ambit node agent → peer: snapshot replay")
        .await;
    if replay["message"] == "del" {
        // The Del for the nacked pod may still be in flight to the first connection; a Del on
        // the new one for a pod it never had is harmless. Anything else is not expected.
        assert_eq!(
            replay["uid"].as_str(),
            Some(refused.uid.as_str()),
            "{replay}"
        );
        replay = second
            .next("ambit node agent → peer: snapshot replay")
            .await;
    }
    assert_eq!(
        replay["message"], "add",
        "{PEER} (second connection): snapshot replay starts with the enrolled pod: {replay}"
    );
    check_add(
        &replay,
        &reviews,
        &format!(
            "{PEER} (second connection): replayed AddWorkload {}",
            reviews.uid
        ),
    );
    second
        .expect(
            "ambit node agent → peer: end of the replayed snapshot",
            "snapshot_sent",
        )
        .await;

    // 5. Unenroll: rules removed, then Del with the uid.
    agent
        .unenroll(&reviews.uid)
        .await
        .unwrap_or_else(|e| panic!("ambit node agent → {PEER}: unenroll {}: {e}", reviews.uid));
    let del = second
        .expect("ambit node agent → peer: DelWorkload", "del")
        .await;
    assert_eq!(
        del["uid"].as_str(),
        Some(reviews.uid.as_str()),
        "{PEER}: DelWorkload uid (field 2)"
    );
    assert_eq!(del["fds"], 0, "{PEER}: DelWorkload carries no fd");
    assert!(
        !reviews_netns.iptables_save().contains("ISTIO_PRERT"),
        "ambit node agent: rules removed on unenroll"
    );
    assert!(agent.enrolled().is_empty());

    second.close().await;
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}
