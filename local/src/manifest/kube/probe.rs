//! Container probes (`readinessProbe`, `livenessProbe`, `startupProbe`) as the API server
//! validates them and kubelet fills in their defaults: one handler (`httpGet`, `tcpSocket` or
//! `exec`), `initialDelaySeconds` 0, `periodSeconds` 10, `timeoutSeconds` 1, `successThreshold` 1
//! (and only 1 for liveness and startup probes), `failureThreshold` 3.
//!
//! A named probe port must name one of the container's own ports: kubelet resolves it there, and
//! a name it cannot resolve would fail every probe, so it is refused at apply.

use super::super::decode::{Node, Result};
use super::{ContainerPort, Protocol, TargetPort};

/// Which probe: they differ in what their outcome does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// Failing: the pod is taken out of its Services' endpoints.
    Readiness,
    /// Failing: the container is killed and restarted per `restartPolicy`.
    Liveness,
    /// Until it passes the other two do not run; failing: as liveness.
    Startup,
}

impl ProbeKind {
    /// kubelet's word for it in events (`Readiness probe failed: ...`).
    pub fn title(self) -> &'static str {
        match self {
            ProbeKind::Readiness => "Readiness",
            ProbeKind::Liveness => "Liveness",
            ProbeKind::Startup => "Startup",
        }
    }

    fn field(self) -> &'static str {
        match self {
            ProbeKind::Readiness => "readinessProbe",
            ProbeKind::Liveness => "livenessProbe",
            ProbeKind::Startup => "startupProbe",
        }
    }
}

/// One probe with kubelet's defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub action: ProbeAction,
    pub initial_delay_seconds: u32,
    pub period_seconds: u32,
    pub timeout_seconds: u32,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// What a probe does; its port resolved against the container's ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeAction {
    /// An HTTP GET; 200-399 passes. `host` defaults to the pod's IP.
    HttpGet {
        host: Option<String>,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    /// A TCP connect; established passes.
    TcpSocket { host: Option<String>, port: u16 },
    /// A command in the container's namespaces and environment; exit code 0 passes.
    Exec { command: Vec<String> },
}

/// The container's three probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Probes {
    pub readiness: Option<Probe>,
    pub liveness: Option<Probe>,
    pub startup: Option<Probe>,
}

/// Reads the probes of a container whose `ports` are already read.
pub(super) fn probes(
    f: &super::super::decode::Fields<'_>,
    ports: &[ContainerPort],
) -> Result<Probes> {
    let read = |kind: ProbeKind| {
        f.get(kind.field())
            .map(|node| probe(&node, kind, ports))
            .transpose()
    };
    Ok(Probes {
        readiness: read(ProbeKind::Readiness)?,
        liveness: read(ProbeKind::Liveness)?,
        startup: read(ProbeKind::Startup)?,
    })
}

fn probe(node: &Node<'_>, kind: ProbeKind, ports: &[ContainerPort]) -> Result<Probe> {
    let f = node.fields()?;
    f.ignore(&["terminationGracePeriodSeconds"]);
    let seconds = |key: &str, default: u32, least: i64| -> Result<u32> {
        let Some(n) = f.get(key) else {
            return Ok(default);
        };
        let value = n.i64()?;
        if value < least {
            return Err(n.error(format!("{value} must be {least} or more")));
        }
        u32::try_from(value).map_err(|_| n.error(format!("{value} is too large")))
    };
    let initial_delay_seconds = seconds("initialDelaySeconds", 0, 0)?;
    let period_seconds = seconds("periodSeconds", 10, 1)?;
    let timeout_seconds = seconds("timeoutSeconds", 1, 1)?;
    let success_threshold = seconds("successThreshold", 1, 1)?;
    let failure_threshold = seconds("failureThreshold", 3, 1)?;
    if success_threshold != 1 && kind != ProbeKind::Readiness {
        return Err(f.error_at(
            "successThreshold",
            format!("must be 1 for a {}", kind.field()),
        ));
    }
    let handlers: Vec<&str> = ["httpGet", "tcpSocket", "exec", "grpc"]
        .into_iter()
        .filter(|k| f.get(k).is_some())
        .collect();
    let action =
        match handlers.as_slice() {
            ["httpGet"] => http_get(&f.require("httpGet")?, ports)?,
            ["tcpSocket"] => {
                let g = f.require("tcpSocket")?.fields()?;
                let host = g.str("host")?;
                let port = probe_port(&g.require("port")?, ports)?;
                g.finish()?;
                ProbeAction::TcpSocket { host, port }
            }
            ["exec"] => {
                let g = f.require("exec")?.fields()?;
                let command = g.string_list("command")?;
                if command.is_empty() {
                    return Err(g.error_at("command", "an exec probe needs a command"));
                }
                g.finish()?;
                ProbeAction::Exec { command }
            }
            ["grpc"] => return Err(f.error_at(
                "grpc",
                "gRPC probes are not supported by the local mesh; use httpGet, tcpSocket or exec",
            )),
            [] => return Err(node.error("a probe needs one of httpGet, tcpSocket or exec")),
            many => {
                return Err(node.error(format!(
                    "a probe takes one handler, found {}",
                    many.join(" and ")
                )))
            }
        };
    f.finish()?;
    Ok(Probe {
        action,
        initial_delay_seconds,
        period_seconds,
        timeout_seconds,
        success_threshold,
        failure_threshold,
    })
}

fn http_get(node: &Node<'_>, ports: &[ContainerPort]) -> Result<ProbeAction> {
    let g = node.fields()?;
    let host = g.str("host")?;
    let port = probe_port(&g.require("port")?, ports)?;
    let path = g.str("path")?.unwrap_or_else(|| "/".into());
    if !path.starts_with('/') {
        return Err(g.error_at("path", format!("{path:?} must start with '/'")));
    }
    match g.str("scheme")?.as_deref() {
        None | Some("HTTP") => {}
        Some("HTTPS") => {
            return Err(g.error_at(
                "scheme",
                "HTTPS probes are not supported by the local mesh; use HTTP or tcpSocket",
            ))
        }
        Some(other) => return Err(g.error_at("scheme", format!("{other:?}: expected HTTP"))),
    }
    let headers = g.list_of("httpHeaders", |h| {
        let hf = h.fields()?;
        let name = hf.require("name")?.non_empty_str()?;
        let value = hf.require("value")?.str()?;
        hf.finish()?;
        Ok((name, value))
    })?;
    g.finish()?;
    Ok(ProbeAction::HttpGet {
        host,
        port,
        path,
        headers,
    })
}

/// A probe's `port`: a number, or the name of one of the container's TCP ports.
fn probe_port(node: &Node<'_>, ports: &[ContainerPort]) -> Result<u16> {
    match super::int_or_name_port(node)? {
        TargetPort::Number(port) => Ok(port),
        TargetPort::Name(name) => ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()) && p.protocol == Protocol::Tcp)
            .map(|p| p.container_port)
            .ok_or_else(|| {
                node.error(format!(
                    "{name:?} is not the name of one of this container's TCP ports"
                ))
            }),
    }
}

#[cfg(test)]
mod tests {
    use crate::manifest::{parse, Object, ProbeAction};

    fn pod(container: &str) -> Result<crate::manifest::Pod, String> {
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec:\n  containers:\n  - name: c\n    image: x\n    command: [sleep, '1']\n    ports: [{{name: web, containerPort: 8080}}]\n{container}"
        );
        match parse(&text).map_err(|e| e.to_string())?.remove(0) {
            Object::Pod(pod) => Ok(pod),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn probes_take_kubelets_defaults_and_resolve_named_ports() {
        let pod = pod("    readinessProbe: {httpGet: {port: web}}\n    livenessProbe: {exec: {command: [\"true\"]}, periodSeconds: 2}\n").unwrap();
        let probes = &pod.spec.containers[0].probes;
        let readiness = probes.readiness.as_ref().unwrap();
        assert_eq!(
            readiness.action,
            ProbeAction::HttpGet {
                host: None,
                port: 8080,
                path: "/".into(),
                headers: vec![]
            }
        );
        assert_eq!(
            (
                readiness.initial_delay_seconds,
                readiness.period_seconds,
                readiness.timeout_seconds,
                readiness.success_threshold,
                readiness.failure_threshold
            ),
            (0, 10, 1, 1, 3)
        );
        assert_eq!(probes.liveness.as_ref().unwrap().period_seconds, 2);
        assert!(probes.startup.is_none());
    }

    #[test]
    fn bad_probes_are_refused_naming_the_field() {
        for (probe, field, words) in [
            (
                "    readinessProbe: {tcpSocket: {port: db}}\n",
                "readinessProbe.tcpSocket.port",
                "not the name",
            ),
            (
                "    readinessProbe: {periodSeconds: 1}\n",
                "readinessProbe",
                "needs one of",
            ),
            (
                "    livenessProbe: {exec: {command: [x]}, successThreshold: 2}\n",
                "livenessProbe.successThreshold",
                "must be 1",
            ),
            (
                "    startupProbe: {tcpSocket: {port: 1}, timeoutSeconds: 0}\n",
                "startupProbe.timeoutSeconds",
                "1 or more",
            ),
            (
                "    readinessProbe: {grpc: {port: 1}}\n",
                "readinessProbe.grpc",
                "not supported",
            ),
            (
                "    readinessProbe: {tcpSocket: {port: 1}, exec: {command: [x]}}\n",
                "readinessProbe",
                "one handler",
            ),
        ] {
            let err = pod(probe).unwrap_err();
            assert!(err.contains(field) && err.contains(words), "{probe}: {err}");
        }
    }
}
