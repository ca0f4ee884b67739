//! The chained CNI plugin: what `ambit-cni` does when the container runtime runs it with
//! `CNI_COMMAND` set (CNI spec 1.0).
//!
//! It runs after the primary plugin (which made the pod's interfaces and addresses, handed over
//! as `prevResult`). `ADD` asks the node agent, over [`event`]'s socket, to enroll the pod now,
//! before any of its containers start, and passes `prevResult` through; if the pod belongs in the
//! mesh and cannot be enrolled, the ADD fails, so kubelet retries the sandbox instead of starting
//! a pod outside the mesh. Pods outside the mesh pass through untouched. `DEL` has nothing to
//! undo here (the agent takes pods out when they are deleted, as istio-cni does) and always
//! succeeds. `CHECK` asks the agent whether an ambient pod is still enrolled. `VERSION` prints the
//! versions understood.
//!
//! The agent decides which pods belong in the mesh (it has the pod's and namespace's labels);
//! namespaces listed in `exclude_namespaces` are passed through without asking it, so that
//! system pods start even while the agent is down.

pub mod event;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use event::{EventKind, PodEvent};

/// CNI spec versions this plugin speaks. The result format is the same from 0.3.0 on.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The plugin's `type` in a conflist (and its binary's name in the CNI bin dir).
pub const PLUGIN_TYPE: &str = "ambit-cni";
/// How long ADD waits for the agent by default: enrolling waits for ztunnel (10 s) at most.
const DEFAULT_TIMEOUT_SECONDS: u64 = 30;

/// A CNI error, printed as the spec's error JSON.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct CniError {
    /// The spec's codes (1-99) or ours (100+).
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// Error codes from the CNI spec.
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Ours: the agent could not enroll an ambient pod.
    pub const ENROLLMENT_FAILED: u32 = 100;
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// The plugin's entry in the conflist, with the fields this plugin reads.
#[derive(Debug, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion", default)]
    cni_version: String,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    /// The agent's plugin socket.
    #[serde(default = "default_socket")]
    agent_socket: PathBuf,
    /// How long to wait for the agent.
    #[serde(default = "default_timeout")]
    agent_timeout_seconds: u64,
    /// Namespaces passed through without asking the agent.
    #[serde(default)]
    exclude_namespaces: Vec<String>,
}

fn default_socket() -> PathBuf {
    event::DEFAULT_SOCKET.into()
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECONDS
}

/// The CNI environment of one call.
#[derive(Clone, Debug, Default)]
pub struct CniEnv {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    /// `CNI_ARGS`, parsed (`K8S_POD_NAME=...;K8S_POD_NAMESPACE=...`).
    pub args: BTreeMap<String, String>,
}

impl CniEnv {
    /// Reads the `CNI_*` variables of this process.
    pub fn from_process() -> Self {
        let var = |name| std::env::var(name).unwrap_or_default();
        CniEnv {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            args: parse_args(&var("CNI_ARGS")),
        }
    }
}

fn parse_args(args: &str) -> BTreeMap<String, String> {
    args.split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// True when this process was started as a CNI plugin.
pub fn invoked_as_plugin() -> bool {
    std::env::var_os("CNI_COMMAND").is_some()
}

/// Runs one CNI call of this process (env, stdin, stdout) and returns the exit code.
pub fn main() -> i32 {
    let env = CniEnv::from_process();
    let mut stdin = Vec::new();
    // An unreadable stdin shows up below as a configuration that does not parse.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| "1.0.0".to_owned());
    let (output, exit) = match execute(&env, &stdin) {
        Ok(output) => (output, 0),
        Err(error) => {
            eprintln!("ambit-cni: {} {}: {error}", env.command, env.container_id);
            (Some(error.to_json(&version)), 1)
        }
    };
    if let Some(output) = output {
        let mut stdout = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut stdout, &output);
        let _ = stdout.write_all(b"\n");
        let _ = stdout.flush();
    }
    exit
}

/// One CNI call: what to print on stdout (nothing for DEL and CHECK), or the error.
pub fn execute(env: &CniEnv, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    if env.command == "VERSION" {
        let version = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| "1.0.0".to_owned());
        return Ok(Some(json!({
            "cniVersion": version,
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "cannot parse the network configuration on stdin",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {:?} is not supported", conf.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    match env.command.as_str() {
        "ADD" => add(env, &conf).map(Some),
        // Nothing to undo: the agent unenrolls pods when they are deleted, and DEL must succeed
        // however often it is called.
        "DEL" => Ok(None),
        "CHECK" => check(env, &conf).map(|()| None),
        // CNI 1.1: the plugin has no state of its own to collect, and is ready when it runs.
        "GC" | "STATUS" => Ok(None),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK or VERSION",
        )),
    }
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    let Some(prev) = conf.prev_result.clone() else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "ambit-cni must be chained after the primary CNI plugin (no prevResult)",
            "add it at the end of the plugins list of the node's conflist",
        ));
    };
    let mut result = prev;
    if let Some(object) = result.as_object_mut() {
        object.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    let Some(event) = pod_event(env, conf)? else {
        return Ok(result);
    };
    let reply = ask(conf, EventKind::Add, &event)?;
    if reply.enrolled {
        eprintln!(
            "ambit-cni: pod {}/{} enrolled in the mesh",
            event.pod_namespace, event.pod_name
        );
    } else {
        eprintln!(
            "ambit-cni: pod {}/{} stays out of the mesh: {}",
            event.pod_namespace, event.pod_name, reply.reason
        );
    }
    Ok(result)
}

fn check(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    if let Some(event) = pod_event(env, conf)? {
        ask(conf, EventKind::Check, &event)?;
    }
    Ok(())
}

/// The event for the agent, or `None` for a call about no Kubernetes pod or an excluded one.
fn pod_event(env: &CniEnv, conf: &NetConf) -> Result<Option<PodEvent>, CniError> {
    let (Some(name), Some(namespace)) = (
        env.args.get("K8S_POD_NAME"),
        env.args.get("K8S_POD_NAMESPACE"),
    ) else {
        return Ok(None);
    };
    if conf.exclude_namespaces.iter().any(|n| n == namespace) {
        return Ok(None);
    }
    if env.netns.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_NETNS is not set",
            "the runtime must pass the sandbox's network namespace",
        ));
    }
    Ok(Some(PodEvent {
        pod_name: name.clone(),
        pod_namespace: namespace.clone(),
        container_id: env.container_id.clone(),
        netns: env.netns.clone().into(),
        ips: conf
            .prev_result
            .as_ref()
            .map(result_ips)
            .unwrap_or_default(),
    }))
}

/// The addresses of a CNI result (`ips[].address`, `10.0.1.5/24`).
fn result_ips(result: &Value) -> Vec<IpAddr> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect()
}

fn ask(conf: &NetConf, kind: EventKind, event: &PodEvent) -> Result<event::EventReply, CniError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            CniError::new(
                code::TRY_AGAIN_LATER,
                "cannot start the plugin",
                e.to_string(),
            )
        })?;
    let timeout = Duration::from_secs(conf.agent_timeout_seconds);
    let pod = format!("{}/{}", event.pod_namespace, event.pod_name);
    runtime
        .block_on(event::send(&conf.agent_socket, kind, event, timeout))
        .map_err(|error| match error {
            event::EventError::Refused { message, .. } => CniError::new(
                code::ENROLLMENT_FAILED,
                format!("pod {pod} belongs in the ambient mesh but could not be enrolled"),
                message,
            ),
            other => CniError::new(
                code::TRY_AGAIN_LATER,
                format!("pod {pod}: cannot ask the ambit-cni node agent"),
                other.to_string(),
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> CniEnv {
        CniEnv {
            command: command.into(),
            ..Default::default()
        }
    }

    #[test]
    fn version_lists_the_supported_versions() {
        let out = execute(&env("VERSION"), br#"{"cniVersion":"1.0.0"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(out["cniVersion"], "1.0.0");
        assert!(out["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")));
    }

    #[test]
    fn non_kubernetes_calls_pass_through() {
        let conf = br#"{"cniVersion":"1.0.0","name":"k8s","type":"ambit-cni",
            "prevResult":{"ips":[{"address":"10.1.0.5/24"}]}}"#;
        let out = execute(&env("ADD"), conf).unwrap().unwrap();
        assert_eq!(out["ips"][0]["address"], "10.1.0.5/24");
        assert_eq!(out["cniVersion"], "1.0.0");
    }

    #[test]
    fn excluded_namespaces_pass_through_without_the_agent() {
        let conf = br#"{"cniVersion":"1.0.0","type":"ambit-cni","agent_socket":"/nonexistent",
            "exclude_namespaces":["kube-system"],"prevResult":{"ips":[]}}"#;
        let mut e = env("ADD");
        e.netns = "/var/run/netns/x".into();
        e.args = parse_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns");
        assert!(execute(&e, conf).unwrap().is_some());
        // Any other namespace needs the agent, which is not there: try again later.
        e.args = parse_args("K8S_POD_NAMESPACE=default;K8S_POD_NAME=web");
        let err = execute(&e, conf).unwrap_err();
        assert_eq!(err.code, code::TRY_AGAIN_LATER, "{err}");
    }

    #[test]
    fn unchained_add_and_bad_versions_fail() {
        let err = execute(&env("ADD"), br#"{"cniVersion":"1.0.0"}"#).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG);
        let err = execute(&env("ADD"), br#"{"cniVersion":"0.2.0"}"#).unwrap_err();
        assert_eq!(err.code, code::INCOMPATIBLE_VERSION);
        let err = execute(&env("ADD"), b"not json").unwrap_err();
        assert_eq!(err.code, code::DECODE);
        assert_eq!(err.to_json("1.0.0")["code"], 6);
    }

    #[test]
    fn del_always_succeeds() {
        assert!(execute(&env("DEL"), br#"{"cniVersion":"1.0.0"}"#)
            .unwrap()
            .is_none());
    }

    #[test]
    fn result_ips_strip_prefixes() {
        let ips = result_ips(&json!({"ips":[{"address":"10.0.0.2/24"},{"address":"fd00::2/64"}]}));
        assert_eq!(
            ips,
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
    }
}
