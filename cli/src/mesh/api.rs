//! The local mesh daemon's control protocol: one JSON request per line on a Unix socket in the
//! state directory, one JSON response line back. The CLI is its only client; `status --json`
//! prints [`Status`] as is, so its shape is a stable, documented interface (see docs/mesh.md).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// What the CLI asks.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Request {
    Status,
    /// Manifests as (source name, YAML text), applied as one change.
    Apply {
        manifests: Vec<(String, String)>,
    },
    Delete {
        manifests: Vec<(String, String)>,
    },
    Label {
        kind: String,
        namespace: String,
        name: String,
        key: String,
        /// `None` removes the label.
        value: Option<String>,
    },
    Down,
}

/// The daemon's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum Response {
    Ok { message: String, status: Status },
    Error { message: String },
}

/// The mesh as `ambit mesh status --json` prints it. Fields are only ever added.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub state_dir: String,
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<PodStatus>,
    pub services: Vec<ServiceStatus>,
    /// `namespace/name` of each AuthorizationPolicy.
    pub policies: Vec<String>,
    /// `namespace/name` of each `istio-waypoint` Gateway.
    pub waypoints: Vec<String>,
    /// Waypoint problems: traffic refused or sent direct although it names a waypoint, and
    /// workloads behind L7 policy that plaintext clients still reach.
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    pub netns: String,
    pub address: String,
    /// ztunnel's Prometheus endpoint for this node.
    pub metrics: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    /// Its hostname (`spec.hostname`, else its name), in its processes' UTS namespace.
    #[serde(default)]
    pub hostname: String,
    pub node: String,
    pub netns: String,
    pub ip: String,
    pub identity: String,
    /// In the mesh: traffic captured by ztunnel.
    pub enrolled: bool,
    /// Why not, when not enrolled.
    pub reason: Option<String>,
    /// The pod's annotations, including `ambient.istio.io/redirection: enabled` when enrolled.
    pub annotations: std::collections::BTreeMap<String, String>,
    /// The process ids of the pod's running containers (stable across enrollment; a container
    /// that exited is not listed until it runs again).
    pub pids: Vec<u32>,
    /// Restarts of all its containers, as kubectl's RESTARTS column.
    #[serde(default)]
    pub restarts: u32,
    /// kubectl's READY column: ready containers / containers (`1/1`). A pod is a Service
    /// endpoint only while all are ready.
    #[serde(default)]
    pub ready: String,
    /// The pod's phase: `Pending`, `Running`, `Succeeded` or `Failed`.
    #[serde(default)]
    pub phase: String,
    /// kubectl's STATUS column: the phase, or what holds a container up (`CrashLoopBackOff`,
    /// `Error`, `Completed`, `StartError`).
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub containers: Vec<ContainerStatus>,
    /// A waypoint's WasmPlugins as its metrics report them: state (`running`, `retrying`,
    /// `failed`), whether some version is in force, failures, last error. Absent for other pods
    /// and for a waypoint that did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugins: Option<Vec<ambit_waypoint::wasm::PluginStatus>>,
}

/// One container's process, supervised per the pod's `restartPolicy`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerStatus {
    pub name: String,
    /// `running`; `waiting` for its restart (kubelet's CrashLoopBackOff); `terminated` (exited,
    /// and its restartPolicy does not start it again).
    pub state: String,
    /// Why it is waiting (`CrashLoopBackOff`) or terminated (its last exit's reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Running and passing its readiness probe (running suffices without one).
    #[serde(default)]
    pub ready: bool,
    /// Its last failed probe in the current run (`Readiness probe failed: ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<String>,
    pub pid: Option<u32>,
    pub restarts: u32,
    /// How its last run ended.
    pub last_exit: Option<LastExit>,
}

/// A container's last run's end, in kubelet's terms.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastExit {
    /// `Completed` (exit code 0), `Error`, or `StartError` (it could not be started again).
    pub reason: String,
    /// The exit code; 128 + the signal's number when a signal ended it.
    pub exit_code: i32,
    /// The signal that ended it (`SIGKILL`...).
    pub signal: Option<String>,
    pub message: Option<String>,
    /// Seconds since the Unix epoch.
    pub finished_at: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    pub hostname: String,
    pub vip: String,
    pub ports: Vec<String>,
    /// The waypoint it names with `istio.io/use-waypoint`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<ServiceWaypoint>,
}

/// A Service's waypoint and where its traffic goes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceWaypoint {
    /// `namespace/name` of the Gateway.
    pub name: String,
    /// `waypoint` (through it), `refused` (it is missing or not running and L7 policy targets
    /// it), or `direct` (to the pods, as Istio does when the binding fails).
    pub traffic: String,
    /// Why not through the waypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Sends one request to the daemon listening at `socket`.
pub async fn call(socket: &Path, request: &Request) -> anyhow::Result<Response> {
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        anyhow::anyhow!(
            "no local mesh is running (cannot reach {}: {e}); start one with `ambit mesh up`",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    let mut answer = String::new();
    BufReader::new(read).read_line(&mut answer).await?;
    if answer.is_empty() {
        anyhow::bail!(
            "the mesh daemon closed the connection without answering; see `ambit mesh logs daemon`"
        );
    }
    Ok(serde_json::from_str(&answer)?)
}
