//! ambit-cni: the Kubernetes node agent (`ambit-cni agent`: enrolls ambient pods, installs the
//! in-pod redirect rules, hands their netns to ztunnel over ZDS, annotates them) and, when the
//! container runtime runs it with `CNI_COMMAND` set, the chained CNI plugin.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ambit_cni::health::{self, Health};
use ambit_cni::install;
use ambit_cni::kubernetes::{Controller, ControllerConfig};
use ambit_cni::locate::NetnsLocator;
use ambit_cni::plugin::{self, event};
use ambit_cni::rules::{self, Backend, RuleOptions};
use ambit_mesh::lifecycle::{self, Drain};
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ambit-cni",
    about = "Ambit's node agent and chained CNI plugin (run by the container runtime when \
             CNI_COMMAND is set)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; boxing the agent's arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the node agent: watch this node's pods and all namespaces, enroll ambient pods.
    Agent(AgentArgs),
    /// Remove the chained plugin from the node (conflist entry and binary) and the node's
    /// kubelet-probe SNAT (chain AMBIT-PROBES; needs the host network and NET_ADMIN).
    Uninstall(CniDirs),
}

#[derive(clap::Args)]
struct CniDirs {
    /// The node's CNI binary directory, as mounted in this pod.
    #[arg(long, env = "AMBIT_CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The node's CNI configuration directory, as mounted in this pod.
    #[arg(
        long,
        env = "AMBIT_CNI_CONF_DIR",
        default_value = "/host/etc/cni/net.d"
    )]
    cni_conf_dir: PathBuf,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// This node (the downward API's spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// The agent's own namespace (downward API); never enrolled, ztunnel runs there.
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// The ZDS socket ztunnel connects to.
    #[arg(long, env = "AMBIT_ZDS_SOCKET", default_value = ambit_mesh::zds::DEFAULT_SOCKET_PATH)]
    zds_socket: PathBuf,
    /// Where the CNI plugin reaches the agent.
    #[arg(long, env = "AMBIT_PLUGIN_SOCKET", default_value = event::DEFAULT_SOCKET)]
    plugin_socket: PathBuf,
    /// `iptables` or `nftables`.
    #[arg(long, env = "AMBIT_RULES_BACKEND", default_value = "iptables", value_parser = parse_backend)]
    backend: Backend,
    /// Redirect pods' DNS to ztunnel's DNS proxy.
    #[arg(long, env = "AMBIT_DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    dns_capture: bool,
    /// Capture IPv6 too.
    #[arg(long, env = "AMBIT_IPV6", default_value_t = true, action = clap::ArgAction::Set)]
    ipv6: bool,
    /// The node's /proc, to find running pods' network namespaces.
    #[arg(long, env = "AMBIT_PROC_DIR", default_value = "/host/proc")]
    proc_dir: PathBuf,
    /// Directories of pinned network namespaces (the runtime's, e.g. /var/run/netns).
    #[arg(
        long = "netns-dir",
        env = "AMBIT_NETNS_DIRS",
        value_delimiter = ',',
        default_value = "/var/run/netns"
    )]
    netns_dirs: Vec<PathBuf>,
    /// Namespaces never enrolled.
    #[arg(
        long = "exclude-namespace",
        env = "AMBIT_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    exclude_namespaces: Vec<String>,
    /// SNAT the kubelet's probes of enrolled pods to 169.254.7.127 in the node's nat table
    /// (chain AMBIT-PROBES), so that they reach the app rather than ztunnel.
    #[arg(long, env = "AMBIT_PROBE_SNAT", default_value_t = true, action = clap::ArgAction::Set)]
    probe_snat: bool,
    /// Where the kubelet probes `/readyz` and `/healthz` (istio-cni's port 8000).
    #[arg(long, env = "AMBIT_READINESS_ADDRESS", default_value = health::DEFAULT_ADDRESS)]
    readiness_address: SocketAddr,
    /// Install the plugin into the node's CNI directories (and keep it chained).
    #[arg(long, env = "AMBIT_INSTALL_CNI", default_value_t = true, action = clap::ArgAction::Set)]
    install_cni: bool,
    #[command(flatten)]
    dirs: CniDirs,
}

fn parse_backend(value: &str) -> Result<Backend, String> {
    match value {
        "iptables" => Ok(Backend::Iptables),
        "nftables" => Ok(Backend::Nftables),
        other => Err(format!(
            "unknown rules backend {other:?}: iptables or nftables"
        )),
    }
}

fn main() {
    if plugin::invoked_as_plugin() {
        std::process::exit(plugin::main());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime")
            .and_then(|runtime| {
                let result = runtime.block_on(agent(args));
                // The drain is over: blocking tasks still in flight are not waited for.
                runtime.shutdown_background();
                result
            }),
        Command::Uninstall(dirs) => {
            // Best effort: run outside the host network, there is nothing of ours to remove.
            if let Err(error) = std::fs::File::open("/proc/self/ns/net")
                .map_err(|e| e.to_string())
                .and_then(|netns| rules::probes::remove(netns).map_err(|e| e.to_string()))
            {
                eprintln!("ambit-cni: warning: cannot remove the kubelet-probe SNAT: {error}");
            }
            install::uninstall(&dirs.cni_bin_dir, &dirs.cni_conf_dir)
                .context("uninstalling the CNI plugin")
        }
    };
    if let Err(error) = result {
        eprintln!("ambit-cni: {error:#}");
        std::process::exit(1);
    }
}

async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    lifecycle::raise_open_files_limit();
    let deadline = lifecycle::termination_deadline()?;
    // kube-rs leaves the choice of rustls provider to the program: ring, as everywhere in Ambit.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let drain = Drain::default();
    // Listening first: the kubelet sees "alive, not ready" while the API is still being reached.
    let (installed_tx, installed) = tokio::sync::watch::channel(!args.install_cni);
    let (agent_tx, agent_started) = tokio::sync::watch::channel(false);
    let health = Health::new(drain.clone())
        .require(
            "the Kubernetes watches to sync and the ZDS socket to listen",
            move || *agent_started.borrow(),
        )
        .require(
            "the plugin to be chained into the node's CNI configuration",
            move || *installed.borrow(),
        );
    tokio::spawn(health::serve(
        health::bind(args.readiness_address).await?,
        health,
    ));
    let kube_config = kube::Config::infer()
        .await
        .context("cannot find the Kubernetes API (in-cluster service account or KUBECONFIG)")?;
    let client = kube::Client::try_from(kube_config).context("cannot build the API client")?;

    let mut excluded = args.exclude_namespaces.clone();
    excluded.extend(args.pod_namespace.clone());
    let mut config = ControllerConfig::new(args.node_name.clone());
    config.zds_socket = args.zds_socket.clone();
    config.backend = args.backend;
    config.rule_options = RuleOptions {
        dns_capture: args.dns_capture,
        ipv6: args.ipv6,
        ..Default::default()
    };
    config.locator = NetnsLocator {
        proc_dir: Some(args.proc_dir.clone()),
        netns_dirs: args.netns_dirs.clone(),
    };
    config.excluded_namespaces = excluded.clone();
    if !args.probe_snat {
        config.probe_netns = None;
    }
    let controller = Controller::new(client, config);
    let mut agent = controller.agent();
    tokio::spawn(async move {
        // The controller starts the agent (ZDS listening) only after both watches listed once.
        if agent.wait_for(Option::is_some).await.is_ok() {
            agent_tx.send_replace(true);
        }
    });

    let listener = event::bind(&args.plugin_socket)?;
    tokio::spawn(event::serve(
        listener,
        controller.plugin_requests(),
        drain.clone(),
    ));
    if args.install_cni {
        let binary = std::env::current_exe().context("cannot find this program's binary")?;
        install::install_binary(&binary, &args.dirs.cni_bin_dir)?;
        // The entry names the socket as the host sees it: the DaemonSet mounts the same path.
        let entry = install::plugin_entry(&args.plugin_socket, &excluded);
        tokio::spawn(install::keep_installed(
            args.dirs.cni_conf_dir.clone(),
            entry,
            Duration::from_secs(5),
            installed_tx,
        ));
    }
    tracing::info!(node = %args.node_name, "ambit-cni node agent starting");
    // The controller keeps answering the plugin requests already taken while the drain runs.
    tokio::select! {
        result = controller.run() => result.context("the node agent stopped"),
        _ = drain.run_until_stopped("node agent", deadline) => {
            // The probe SNAT stays too, like the enrolled pods' in-pod rules it goes with; the
            // next agent converges it at start, `ambit-cni uninstall` removes it.
            tracing::info!("the plugin and the probe SNAT stay installed, so new ambient pods wait for the agent to return");
            Ok(())
        }
    }
}
