//! `ambit demo`: HBONE on one machine, with nothing but this binary.
//!
//! app (TCP echo) <- HBONE server (as ns/default/sa/echo) <- mTLS + HTTP/2 CONNECT <- client (as
//! ns/default/sa/sleep). Each tunnel sends a payload, half-closes, and checks the echo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ambit_mesh::hbone::client::{Client, TunnelRequest};
use ambit_mesh::hbone::server::{Accepted, ConnectHandler, ConnectRequest, Rejection, Server};
use ambit_mesh::hbone::{ConnectHeaders, Settings};
use ambit_mesh::identity::{
    BoxFuture, CertificateAuthority, CertificateManager, Identity, ManagerSettings,
    DEFAULT_TRUST_DOMAIN,
};
use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(clap::Args)]
pub struct Args {
    /// Istio `cacerts` directory (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem) to
    /// issue from; a fresh self-signed root is generated when absent.
    #[arg(long, env = "AMBIT_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// Bytes each tunnel sends (and gets echoed back).
    #[arg(long, default_value_t = 1 << 20)]
    bytes: usize,
    /// Tunnels opened at once; they share one pooled HTTP/2 connection.
    #[arg(long, default_value_t = 4)]
    tunnels: usize,
}

/// Lets tunnels reach the one demo app and nothing else: an HBONE server is not an open proxy.
struct DemoApp {
    app: SocketAddr,
}

impl ConnectHandler for DemoApp {
    fn connect(&self, request: ConnectRequest) -> BoxFuture<'_, Result<Accepted, Rejection>> {
        Box::pin(async move {
            if request.target != self.app {
                return Err(Rejection::Unavailable(format!(
                    "no workload at {}",
                    request.target
                )));
            }
            println!(
                "  server: accepted CONNECT {} from {} (verified client identity)",
                request.target, request.peer_identity
            );
            let upstream = TcpStream::connect(self.app)
                .await
                .map_err(|e| Rejection::Unavailable(e.to_string()))?;
            Ok(Accepted::splice(upstream))
        })
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let ca = match &args.ca_dir {
        Some(dir) => {
            println!("CA: loading Istio cacerts from {}", dir.display());
            CertificateAuthority::load(dir)?
        }
        None => {
            println!("CA: generated a self-signed root for trust domain {DEFAULT_TRUST_DOMAIN}");
            CertificateAuthority::generate(DEFAULT_TRUST_DOMAIN)?
        }
    };
    let certificates = Arc::new(CertificateManager::new(
        Arc::new(ca),
        ManagerSettings::default(),
    ));
    let server_id = Identity::new(DEFAULT_TRUST_DOMAIN, "default", "echo")?;
    let client_id = Identity::new(DEFAULT_TRUST_DOMAIN, "default", "sleep")?;

    let app = start_echo_app().await?;
    println!("app: TCP echo on {app}");
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let hbone = listener.local_addr()?;
    let server = Server::new(
        server_id.clone(),
        certificates.clone(),
        Arc::new(DemoApp { app }),
        Settings::default(),
    );
    tokio::spawn(server.serve(listener));
    println!("HBONE server: {hbone} as {server_id}");

    let client = Arc::new(Client::new(certificates.clone(), Settings::default()));
    let request = TunnelRequest {
        source: client_id.clone(),
        destination_identities: vec![server_id.clone()],
        hbone_address: hbone,
        target: app,
        headers: ConnectHeaders {
            forwarded_for: Some("127.0.0.1:0".parse()?),
            baggage: Some("k8s.namespace.name=default,k8s.deployment.name=sleep".into()),
            ..Default::default()
        },
    };
    println!(
        "client: {client_id} opening {} tunnel(s) to {app} via {hbone}, {} bytes each",
        args.tunnels, args.bytes
    );

    let started = Instant::now();
    let mut tasks = Vec::new();
    for index in 0..args.tunnels {
        let client = client.clone();
        let request = request.clone();
        let bytes = args.bytes;
        tasks.push(tokio::spawn(async move {
            one_tunnel(&client, &request, index, bytes).await
        }));
    }
    let mut moved = 0u64;
    for task in tasks {
        moved += task.await.context("tunnel task panicked")??;
    }
    let elapsed = started.elapsed();

    let cert = certificates.fetch(&server_id).await?;
    let expires = cert
        .not_after()
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    println!(
        "done: {} tunnel(s), {moved} bytes each way in {:.1} ms, over {} pooled connection(s)",
        args.tunnels,
        elapsed.as_secs_f64() * 1000.0,
        client.pooled_connections(&request)
    );
    println!(
        "certificates: {} issued by the built-in CA; the server's expires in {}h{:02}m and rotates at half life",
        certificates.identities().len(),
        expires.as_secs() / 3600,
        expires.as_secs() % 3600 / 60
    );

    // A tunnel to anything but the app is refused before a byte moves.
    let mut stray = request.clone();
    stray.target = "127.0.0.1:9".parse()?;
    match client.connect(&stray).await {
        Err(err) => println!("refused as expected: {err}"),
        Ok(_) => bail!("the server accepted a tunnel to an address that is not its workload"),
    }
    Ok(())
}

async fn one_tunnel(
    client: &Client,
    request: &TunnelRequest,
    index: usize,
    bytes: usize,
) -> anyhow::Result<u64> {
    let mut tunnel = client.connect(request).await?;
    println!(
        "  tunnel {index}: server proved {} ({} connection)",
        tunnel.peer().identity,
        if tunnel.reused_connection() {
            "pooled"
        } else {
            "new"
        }
    );
    let payload: Vec<u8> = (0..bytes).map(|i| (i * 31 + index) as u8).collect();
    let (mut read, mut write) = tokio::io::split(&mut tunnel);
    let writer = async {
        write.write_all(&payload).await?;
        write.shutdown().await
    };
    let mut echoed = Vec::with_capacity(bytes);
    let reader = read.read_to_end(&mut echoed);
    tokio::time::timeout(Duration::from_secs(30), async {
        tokio::try_join!(writer, reader)
    })
    .await
    .context("tunnel timed out")??;
    if echoed != payload {
        bail!("tunnel {index}: echo differs from what was sent");
    }
    Ok(bytes as u64)
}

async fn start_echo_app() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    Ok(addr)
}
