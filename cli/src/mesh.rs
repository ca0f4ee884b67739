//! `ambit mesh`: the whole mesh on one Linux machine, driven by Kubernetes YAML.
//!
//! `up` starts a daemon (this binary, `mesh daemon`) that owns the mesh: network namespaces for
//! nodes and pods, an in-process ztunnel and node agent per node, the pods' processes and the
//! embedded control plane. Every other command talks to it over a Unix socket in the state
//! directory, except `exec` and `logs`, which need no daemon.

mod api;
mod daemon;
mod echo;
mod wait;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use api::{Request, Response, Status};

/// The demo applied when `up` is given no file.
const DEMO: &str = include_str!("../../deploy/examples/demo.yaml");

#[derive(Args)]
pub struct MeshArgs {
    /// Where the mesh keeps its socket, logs, CA and state.
    #[arg(
        long,
        global = true,
        env = "AMBIT_MESH_DIR",
        default_value = "/run/ambit-mesh"
    )]
    state_dir: PathBuf,
    /// Prefix of every network namespace the mesh creates.
    #[arg(
        long,
        global = true,
        env = "AMBIT_MESH_PREFIX",
        default_value = "ambit"
    )]
    prefix: String,
    #[command(subcommand)]
    command: MeshCommand,
}

#[derive(Subcommand)]
enum MeshCommand {
    /// Create the mesh (default: the bundled demo), wait until ready, print a summary.
    Up {
        /// Manifests to apply (Namespace, Pod, Deployment, Service, AuthorizationPolicy, ...).
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        /// After `up`, call the demo service from the demo client and show identities and metrics.
        #[arg(long)]
        demo: bool,
        /// How the node agents install Istio's in-pod redirect rules.
        #[arg(long, value_enum, default_value_t = Rules::Iptables)]
        rules: Rules,
        /// Return once the manifests are applied, without waiting for pods to be ready.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for pods to be ready (30s, 2m, ...).
        #[arg(long, default_value = "60s", value_parser = wait::parse_duration)]
        timeout: Duration,
    },
    /// Wait for pods to be ready, like `kubectl wait --for=condition=Ready`.
    Wait {
        /// `pod/NAME` (or `NAME`), one or more; or `--all`.
        pods: Vec<String>,
        /// The condition: `condition=Ready`, the only one.
        #[arg(long = "for", default_value = "condition=Ready")]
        condition: String,
        /// Every pod in the namespace.
        #[arg(long)]
        all: bool,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// How long to wait (30s, 2m, ...).
        #[arg(long, default_value = "30s", value_parser = wait::parse_duration)]
        timeout: Duration,
    },
    /// Apply manifests to the running mesh.
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Delete the objects named in manifests from the running mesh.
    Delete {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Set or remove a label, like `kubectl label`: KEY=VALUE sets, KEY- removes.
    Label {
        /// `namespace` or `pod`.
        kind: String,
        name: String,
        /// KEY=VALUE or KEY-.
        label: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Run a command inside a pod's network namespace.
    Exec {
        pod: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Nodes, pods, services, policies and waypoints.
    Status {
        /// The stable JSON form (documented in docs/mesh.md).
        #[arg(long)]
        json: bool,
    },
    /// Print a component's log: `daemon` (ztunnels and node agents), or a pod (`POD -n NS`, or
    /// NAMESPACE/POD).
    Logs {
        component: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Remove everything the mesh made: namespaces, rules, processes, files.
    Down,
    /// GET an http:// URL and print the answer (a curl for pods; use it through `exec`).
    Fetch {
        url: String,
        /// Print the response headers too, as `curl -i`.
        #[arg(short = 'i', long = "include")]
        include: bool,
    },
    /// Run the mesh (started by `up`).
    #[command(hide = true)]
    Daemon {
        #[arg(long)]
        nodes: u8,
        #[arg(long, value_enum)]
        rules: Rules,
    },
    /// A waypoint pod's process (started by the daemon for each `istio-waypoint` Gateway).
    #[command(hide = true)]
    Waypoint(Box<ambit_waypoint::config::Config>),
    /// The built-in `ambit/echo` image.
    #[command(hide = true)]
    EchoServer {
        #[arg(long)]
        name: String,
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
    },
}

impl MeshArgs {
    pub fn is_daemon(&self) -> bool {
        matches!(
            self.command,
            MeshCommand::Daemon { .. } | MeshCommand::Waypoint(_)
        )
    }

    /// The daemon and the processes it runs in pods: they serve sockets.
    pub fn is_server(&self) -> bool {
        self.is_daemon() || matches!(self.command, MeshCommand::EchoServer { .. })
    }
}

/// The in-pod rules backend (Istio's istio-cni has the same two).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Rules {
    Iptables,
    Nftables,
}

impl Rules {
    fn backend(self) -> ambit_cni::rules::Backend {
        match self {
            Rules::Iptables => ambit_cni::rules::Backend::Iptables,
            Rules::Nftables => ambit_cni::rules::Backend::Nftables,
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Rules::Iptables => "iptables",
            Rules::Nftables => "nftables",
        }
    }
}

fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("daemon.sock")
}

fn read_manifests(files: &[PathBuf]) -> anyhow::Result<Vec<(String, String)>> {
    files
        .iter()
        .map(|file| {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            Ok((file.display().to_string(), text))
        })
        .collect()
}

async fn request(
    state_dir: &Path,
    prefix: &str,
    request: Request,
) -> anyhow::Result<(String, Status)> {
    let response = match api::call(&socket_path(state_dir), &request).await {
        Ok(response) => response,
        Err(err) => match left_behind(state_dir, prefix) {
            Some(left) => bail!(
                "the mesh daemon is not running (it crashed or was killed; see `ambit mesh logs daemon`), and it left behind {left}; pods get no traffic from the mesh. `ambit mesh up` removes all that and starts a new mesh (`ambit mesh down` only removes it)"
            ),
            None => return Err(err),
        },
    };
    match response {
        Response::Ok { message, status } => Ok((message, status)),
        Response::Error { message } => bail!("{message}"),
    }
}

/// What a mesh whose daemon is gone left behind: its network namespaces and live processes.
fn left_behind(state_dir: &Path, prefix: &str) -> Option<String> {
    let namespaces = ambit_local::topology::leftover_namespaces(prefix);
    let processes: Vec<String> = std::fs::read_to_string(state_dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|pid| !pid.is_empty() && Path::new(&format!("/proc/{pid}")).exists())
        .map(str::to_owned)
        .collect();
    if namespaces.is_empty() && processes.is_empty() {
        return None;
    }
    let mut parts = Vec::new();
    if !namespaces.is_empty() {
        parts.push(format!(
            "{} network namespace(s) ({})",
            namespaces.len(),
            namespaces.join(", ")
        ));
    }
    if !processes.is_empty() {
        parts.push(format!(
            "{} pod process(es) (pids {})",
            processes.len(),
            processes.join(", ")
        ));
    }
    Some(parts.join(" and "))
}

pub fn run(args: MeshArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let state_dir = args.state_dir.clone();
    match args.command {
        MeshCommand::Daemon { nodes, rules } => runtime.block_on(daemon::run(daemon::Options {
            state_dir,
            prefix: args.prefix,
            nodes,
            rules: rules.backend(),
        })),
        MeshCommand::EchoServer { name, ports } => runtime.block_on(echo::serve(&ports, &name)),
        MeshCommand::Waypoint(config) => runtime.block_on(async {
            let _waypoint =
                ambit_waypoint::app::Waypoint::start(*config, Default::default()).await?;
            std::future::pending::<anyhow::Result<()>>().await
        }),
        MeshCommand::Fetch { url, include } => {
            println!("{}", runtime.block_on(echo::fetch(&url, include))?);
            Ok(())
        }
        MeshCommand::Wait {
            pods,
            condition,
            all,
            namespace,
            timeout,
        } => {
            if !condition.eq_ignore_ascii_case("condition=Ready") {
                bail!("--for={condition}: only --for=condition=Ready is supported");
            }
            let selection = match (all, pods.is_empty()) {
                (true, true) => wait::Selection::All {
                    namespace: Some(namespace),
                },
                (false, false) => wait::Selection::Named {
                    namespace,
                    names: pods
                        .iter()
                        .map(|p| match p.split_once('/') {
                            Some(("pod" | "pods" | "po", name)) => Ok(name.to_owned()),
                            Some((kind, _)) => {
                                bail!("{p}: only pods can be waited for, not {kind}")
                            }
                            None => Ok(p.clone()),
                        })
                        .collect::<anyhow::Result<_>>()?,
                },
                (true, false) => bail!("give pod names or --all, not both"),
                (false, true) => bail!("give pod/NAME ... or --all"),
            };
            let outcome = runtime.block_on(wait::wait(
                &state_dir,
                &args.prefix,
                &selection,
                timeout,
                false,
                true,
            ))?;
            if !outcome.not_ready.is_empty() {
                let lines: Vec<String> = outcome
                    .not_ready
                    .iter()
                    .map(|(pod, why)| format!("  pod/{pod}: {why}"))
                    .collect();
                bail!(
                    "timed out after {:.1} s waiting for the condition Ready on {} pod(s):\n{}",
                    outcome.elapsed.as_secs_f64(),
                    outcome.not_ready.len(),
                    lines.join("\n")
                );
            }
            Ok(())
        }
        MeshCommand::Up {
            files,
            nodes,
            demo,
            rules,
            no_wait,
            timeout,
        } => {
            let manifests = if files.is_empty() {
                vec![(
                    "deploy/examples/demo.yaml (bundled)".to_owned(),
                    DEMO.to_owned(),
                )]
            } else {
                read_manifests(&files)?
            };
            let wait = (!no_wait).then_some(timeout);
            runtime.block_on(up(
                &state_dir,
                &args.prefix,
                nodes,
                rules,
                manifests,
                demo,
                wait,
            ))
        }
        MeshCommand::Apply { files } => {
            let (message, _) = runtime.block_on(request(
                &state_dir,
                &args.prefix,
                Request::Apply {
                    manifests: read_manifests(&files)?,
                },
            ))?;
            println!("{message}");
            Ok(())
        }
        MeshCommand::Delete { files } => {
            let (message, _) = runtime.block_on(request(
                &state_dir,
                &args.prefix,
                Request::Delete {
                    manifests: read_manifests(&files)?,
                },
            ))?;
            println!("{message}");
            Ok(())
        }
        MeshCommand::Label {
            kind,
            name,
            label,
            namespace,
        } => {
            let (key, value) = match label.split_once('=') {
                Some((key, value)) => (key.to_owned(), Some(value.to_owned())),
                None => match label.strip_suffix('-') {
                    Some(key) => (key.to_owned(), None),
                    None => bail!("label {label:?} must be KEY=VALUE or KEY-"),
                },
            };
            let kind = match kind.as_str() {
                "namespace" | "namespaces" | "ns" => "Namespace",
                "pod" | "pods" | "po" => "Pod",
                other => bail!("cannot label {other:?}: only namespace and pod"),
            };
            let (message, _) = runtime.block_on(request(
                &state_dir,
                &args.prefix,
                Request::Label {
                    kind: kind.into(),
                    namespace,
                    name,
                    key,
                    value,
                },
            ))?;
            println!("{message}");
            Ok(())
        }
        MeshCommand::Status { json } => {
            let (_, status) =
                runtime.block_on(request(&state_dir, &args.prefix, Request::Status))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(())
        }
        MeshCommand::Exec {
            pod,
            namespace,
            command,
        } => {
            let (_, status) =
                runtime.block_on(request(&state_dir, &args.prefix, Request::Status))?;
            drop(runtime);
            let pod = status
                .pods
                .iter()
                .find(|p| p.name == pod && p.namespace == namespace)
                .ok_or_else(|| anyhow::anyhow!("no pod {namespace}/{pod} in the mesh"))?;
            // `ip netns exec` also mounts /etc/netns/<netns>/ (the pod's hosts and resolv.conf
            // files) over /etc; the pod's hostname comes with a UTS namespace of its own.
            let mut ip = std::process::Command::new("ip");
            let hostname = if pod.hostname.is_empty() {
                &pod.name
            } else {
                &pod.hostname
            };
            daemon::pods::with_hostname(&mut ip, hostname);
            let err = ip.args(["netns", "exec", &pod.netns]).args(&command).exec();
            bail!(
                "cannot run {command:?} in pod {namespace}/{}: {err}",
                pod.name
            )
        }
        MeshCommand::Logs {
            component,
            namespace,
        } => {
            let file = if component == "daemon" || component == "ztunnel" {
                state_dir.join("logs/daemon.log")
            } else {
                let (namespace, pod) = component
                    .split_once('/')
                    .unwrap_or((&namespace, &component));
                state_dir.join(format!("logs/pods/{namespace}_{pod}.log"))
            };
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("no log for {component} at {}", file.display()))?;
            print!("{text}");
            Ok(())
        }
        MeshCommand::Down => runtime.block_on(down(&state_dir, &args.prefix)),
    }
}

async fn up(
    state_dir: &Path,
    prefix: &str,
    nodes: u8,
    rules: Rules,
    manifests: Vec<(String, String)>,
    demo: bool,
    wait_for: Option<Duration>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    if api::call(&socket_path(state_dir), &Request::Status)
        .await
        .is_ok()
    {
        bail!(
            "a mesh is already running from {}; `ambit mesh down` first",
            state_dir.display()
        );
    }
    daemon::clean_leftovers(state_dir, prefix);
    std::fs::create_dir_all(state_dir.join("logs"))?;
    let log = std::fs::File::create(state_dir.join("logs/daemon.log"))?;
    let exe = std::env::current_exe()?;
    let mut daemon = std::process::Command::new(exe);
    daemon
        .args(["mesh", "--state-dir"])
        .arg(state_dir)
        .args(["--prefix", prefix, "daemon", "--nodes", &nodes.to_string()])
        .args(["--rules", rules.flag()])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own session: the daemon outlives this command and the terminal's signals.
    unsafe {
        daemon.pre_exec(|| {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    let mut child = daemon.spawn().context("starting the mesh daemon")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Response::Ok { .. }) = api::call(&socket_path(state_dir), &Request::Status).await
        {
            break;
        }
        if let Some(exit) = child.try_wait()? {
            let log =
                std::fs::read_to_string(state_dir.join("logs/daemon.log")).unwrap_or_default();
            bail!("the mesh daemon exited ({exit}):\n{log}");
        }
        if Instant::now() > deadline {
            bail!("the mesh daemon did not come up within 60 s; see `ambit mesh logs daemon`");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (message, mut status) = request(state_dir, prefix, Request::Apply { manifests }).await?;
    println!("{message}");
    println!(
        "mesh up in {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        state_dir.display()
    );
    let mut timed_out = None;
    if let Some(timeout) = wait_for {
        let all = wait::Selection::All { namespace: None };
        let outcome = wait::wait(state_dir, prefix, &all, timeout, true, false).await?;
        let total = outcome.ready.len() + outcome.not_ready.len();
        println!(
            "{}/{total} pods ready in {:.1} s",
            outcome.ready.len(),
            outcome.elapsed.as_secs_f64()
        );
        for (pod, why) in &outcome.not_ready {
            println!("  not ready: pod {pod}: {why}");
        }
        if outcome.elapsed >= timeout && !outcome.not_ready.is_empty() {
            timed_out = Some(timeout);
        }
        (_, status) = request(state_dir, prefix, Request::Status).await?;
    }
    print_status(&status);
    if let Some(timeout) = timed_out {
        bail!(
            "pods were not ready within {:.0} s (above); the mesh is up: `ambit mesh status` shows them, `ambit mesh wait --all -n NS` waits longer, `--no-wait` skips this",
            timeout.as_secs_f64()
        );
    }
    if demo {
        run_demo(&status).await?;
    } else {
        println!("\nnext: ambit mesh up --demo, or ambit mesh exec client -n demo -- ambit mesh fetch http://echo.demo.svc.cluster.local/");
    }
    Ok(())
}

async fn run_demo(status: &Status) -> anyhow::Result<()> {
    let client = status
        .pods
        .iter()
        .find(|p| p.namespace == "demo" && p.name == "client")
        .ok_or_else(|| anyhow::anyhow!("--demo needs the bundled demo (pod demo/client)"))?;
    let exe = std::env::current_exe()?;
    let url = "http://echo.demo.svc.cluster.local/";
    println!("\n$ ambit mesh exec client -n demo -- ambit mesh fetch {url}");
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", &client.netns])
        .arg(&exe)
        .args(["mesh", "fetch", url])
        .output()
        .await?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    for node in &status.nodes {
        let metrics = fetch_metrics(&node.metrics).await.unwrap_or_default();
        for line in metrics.lines().filter(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                || l.starts_with("istio_dns_requests_total")
        }) {
            println!("{} ztunnel: {line}", node.name);
        }
    }
    Ok(())
}

async fn fetch_metrics(address: &str) -> anyhow::Result<String> {
    let body = echo::fetch(&format!("http://{address}/metrics"), false).await?;
    Ok(body)
}

async fn down(state_dir: &Path, prefix: &str) -> anyhow::Result<()> {
    let namespaces = ambit_local::topology::leftover_namespaces(prefix).len();
    let running = match api::call(&socket_path(state_dir), &Request::Down).await {
        Ok(_) => {
            // The daemon removes its namespaces and exits; wait for its socket to go.
            let deadline = Instant::now() + Duration::from_secs(20);
            while socket_path(state_dir).exists() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            true
        }
        Err(_) => false,
    };
    daemon::clean_leftovers(state_dir, prefix);
    let left = ambit_local::topology::leftover_namespaces(prefix);
    let removed = namespaces.saturating_sub(left.len());
    if running {
        println!("mesh down ({removed} network namespace(s) removed)");
    } else {
        println!("no mesh daemon was running; {removed} leftover network namespace(s) removed");
    }
    if !left.is_empty() {
        bail!("could not remove network namespace(s) {}", left.join(", "));
    }
    Ok(())
}

fn print_status(status: &Status) {
    println!("NODES");
    for node in &status.nodes {
        println!(
            "  {:<8} {:<12} metrics {}",
            node.name, node.address, node.metrics
        );
    }
    println!(
        "PODS\n  {:<24} {:<5} {:<16} {:<8} {:<8} {:<13} {:<9} IDENTITY",
        "NAME", "READY", "STATUS", "RESTARTS", "NODE", "IP", "MESH"
    );
    for pod in &status.pods {
        println!(
            "  {:<24} {:<5} {:<16} {:<8} {:<8} {:<13} {:<9} {}",
            format!("{}/{}", pod.namespace, pod.name),
            pod.ready,
            pod.status,
            pod.restarts,
            pod.node,
            pod.ip,
            if pod.enrolled { "ambient" } else { "-" },
            pod.identity
        );
        for container in &pod.containers {
            if container.state == "running" {
                if let Some(probe) = container.probe.as_ref().filter(|_| !container.ready) {
                    println!("    {}: running, not ready: {probe}", container.name);
                }
            }
            if container.restarts == 0 && container.state == "running" {
                continue;
            }
            print!(
                "    {}: {}, {} restarts",
                container.name, container.state, container.restarts
            );
            match &container.last_exit {
                Some(exit) => println!(
                    "; last exit {} (exit code {}{}{})",
                    exit.reason,
                    exit.exit_code,
                    exit.signal
                        .as_deref()
                        .map(|s| format!(", {s}"))
                        .unwrap_or_default(),
                    exit.message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ),
                None => println!(),
            }
        }
    }
    println!("SERVICES");
    for service in &status.services {
        let waypoint = service
            .waypoint
            .as_ref()
            .map(|w| format!("  waypoint {} ({})", w.name, w.traffic))
            .unwrap_or_default();
        println!(
            "  {:<24} {:<13} {}{waypoint}",
            format!("{}/{}", service.namespace, service.name),
            service.vip,
            service.ports.join(",")
        );
    }
    if !status.policies.is_empty() {
        println!("POLICIES\n  {}", status.policies.join("\n  "));
    }
    if !status.waypoints.is_empty() {
        println!("WAYPOINTS\n  {}", status.waypoints.join("\n  "));
    }
    let plugins: Vec<_> = status
        .pods
        .iter()
        .flat_map(|pod| pod.plugins.iter().flatten().map(move |p| (pod, p)))
        .collect();
    if !plugins.is_empty() {
        println!("WASMPLUGINS");
        for (pod, plugin) in plugins {
            let state = serde_json::to_value(plugin.state).unwrap_or_default();
            print!(
                "  {:<24} {:<24} {}",
                format!("{}/{}", pod.namespace, pod.name),
                plugin.name,
                state.as_str().unwrap_or("?")
            );
            if plugin.failures > 0 {
                print!(" ({} failures)", plugin.failures);
            }
            match &plugin.last_error {
                Some(error) => println!(": {error}"),
                None => println!(),
            }
        }
    }
    if !status.warnings.is_empty() {
        println!("WARNINGS\n  {}", status.warnings.join("\n  "));
    }
}
