//! Waiting for pods to be ready: `ambit mesh wait` (as `kubectl wait --for=condition=Ready`) and
//! the wait at the end of `mesh up`.

use std::path::Path;
use std::time::{Duration, Instant};

use super::api::{PodStatus, Request};

/// How often the daemon is asked.
const POLL: Duration = Duration::from_millis(200);

/// Which pods to wait for.
pub enum Selection {
    /// These pods of the namespace (each must exist).
    Named {
        namespace: String,
        names: Vec<String>,
    },
    /// Every pod of the namespace, or of the mesh.
    All { namespace: Option<String> },
}

/// How a wait ended.
pub struct Outcome {
    /// `namespace/name` of the pods that became ready, in the order they did.
    pub ready: Vec<String>,
    /// Pods that did not, each with why.
    pub not_ready: Vec<(String, String)>,
    pub elapsed: Duration,
}

/// Whether a pod is done for the wait: ready, or (with `settle_failing`) failing in a way no
/// waiting mends soon (crash-looping, failed to start, or terminated).
fn settled(pod: &PodStatus, settle_failing: bool) -> bool {
    is_ready(pod)
        || matches!(pod.phase.as_str(), "Succeeded" | "Failed")
        || (settle_failing
            && pod
                .containers
                .iter()
                .any(|c| c.state != "running" || c.restarts > 0))
}

fn is_ready(pod: &PodStatus) -> bool {
    !pod.containers.is_empty() && pod.containers.iter().all(|c| c.ready)
}

/// Why `pod` is not ready, in a line: its STATUS, READY and the containers' troubles.
pub fn why_not_ready(pod: &PodStatus) -> String {
    let mut why = format!("{}, {} ready", pod.status, pod.ready);
    for container in pod.containers.iter().filter(|c| !c.ready) {
        let trouble = match (&container.probe, &container.last_exit) {
            (Some(probe), _) if container.state == "running" => probe.clone(),
            (_, Some(exit)) => {
                let mut text = format!("last exit {} (exit code {})", exit.reason, exit.exit_code);
                if let Some(message) = &exit.message {
                    text.push_str(&format!(": {message}"));
                }
                text
            }
            _ if container.state == "running" => "waiting for its readiness probe".into(),
            _ => container.state.clone(),
        };
        why.push_str(&format!("; {}: {trouble}", container.name));
    }
    why
}

/// Polls the daemon until every selected pod is ready (or settled, see [`settled`]), or
/// `timeout` passes. Prints `pod/NAME condition met` as each becomes ready when `announce`.
pub async fn wait(
    state_dir: &Path,
    prefix: &str,
    selection: &Selection,
    timeout: Duration,
    settle_failing: bool,
    announce: bool,
) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    let mut ready: Vec<String> = Vec::new();
    loop {
        let (_, status) = super::request(state_dir, prefix, Request::Status).await?;
        let pods: Vec<&PodStatus> = match selection {
            Selection::Named { namespace, names } => names
                .iter()
                .map(|name| {
                    status
                        .pods
                        .iter()
                        .find(|p| &p.namespace == namespace && &p.name == name)
                        .ok_or_else(|| anyhow::anyhow!("pod {namespace}/{name} not found"))
                })
                .collect::<anyhow::Result<_>>()?,
            Selection::All { namespace } => status
                .pods
                .iter()
                .filter(|p| namespace.as_ref().is_none_or(|ns| &p.namespace == ns))
                .collect(),
        };
        if pods.is_empty() {
            if let Selection::All {
                namespace: Some(namespace),
            } = selection
            {
                anyhow::bail!("no pods found in namespace {namespace}");
            }
        }
        for pod in &pods {
            let key = format!("{}/{}", pod.namespace, pod.name);
            if is_ready(pod) && !ready.contains(&key) {
                if announce {
                    println!("pod/{} condition met", pod.name);
                }
                ready.push(key);
            }
        }
        let timed_out = start.elapsed() >= timeout;
        if timed_out || pods.iter().all(|p| settled(p, settle_failing)) {
            let not_ready = pods
                .iter()
                .filter(|p| !is_ready(p))
                .map(|p| (format!("{}/{}", p.namespace, p.name), why_not_ready(p)))
                .collect();
            return Ok(Outcome {
                ready,
                not_ready,
                elapsed: start.elapsed(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `30s`, `2m`, `500ms`, `1h`, or plain seconds, as kubectl's `--timeout`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a duration such as 30s, 2m or 500ms"))?;
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_kubectl_reads_them() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3d").is_err());
    }
}
