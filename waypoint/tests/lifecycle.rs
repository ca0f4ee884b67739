//! The waypoint as Kubernetes stops it: the real `ambit-waypoint` process gets SIGTERM with an L4
//! tunnel open through it. Readiness turns 503 at once, new HBONE connections are refused, the
//! open tunnel keeps moving bytes until the drain deadline, then is cut, and the process exits 0
//! with a line saying what was cut. Loopback only (127.78.60.x), real TLS and HBONE.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ambit_mesh::hbone::client::{Client, TunnelRequest};
use ambit_mesh::hbone::{ConnectHeaders, Settings};
use ambit_mesh::identity::CertificateAuthority;
use ambit_mesh::testing;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const ECHO: &str = "127.78.60.1:5432";
const VIP: &str = "10.96.1.10:5432";

fn state_yaml() -> String {
    r#"
workloads:
- uid: cluster1//v1/Pod/default/echo
  name: echo
  namespace: default
  serviceAccount: echo
  workloadIps: ["127.78.60.1"]
  protocol: TCP
  services:
    default/echo.default.svc.cluster.local: {5432: 5432}
- uid: cluster1//v1/Pod/default/sleep
  name: sleep
  namespace: default
  serviceAccount: sleep
  workloadIps: ["10.9.9.9"]
  protocol: HBONE
services:
- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["/10.96.1.10"], ports: {5432: 5432}, appProtocols: {5432: tcp}}
"#
    .to_owned()
}

/// Ports free right now on 127.0.0.1 (the kernel will not hand them out again at once).
fn free_ports<const N: usize>() -> [SocketAddr; N] {
    let listeners: Vec<_> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap())
}

struct Process {
    child: Child,
    log: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(address: SocketAddr, path: &str) -> String {
    let Ok(mut stream) = TcpStream::connect(address).await else {
        return "unreachable".into();
    };
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_open_tunnel_until_the_deadline_then_exits_zero() {
    let deadline = Duration::from_secs(2);
    let dir = std::env::temp_dir().join(format!("ambit-waypoint-life-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    ca.save(&dir.join("cacerts")).unwrap();
    let state = dir.join("state.yaml");
    std::fs::write(&state, state_yaml()).unwrap();

    let echo = TcpListener::bind(ECHO).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });

    let [hbone, stats, readiness] = free_ports();
    let log = dir.join("waypoint.log");
    let output = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ambit-waypoint"))
        .env("LOCAL_XDS_PATH", &state)
        .env("AMBIT_CA_DIR", dir.join("cacerts"))
        .env("POD_NAMESPACE", "default")
        .env("SERVICE_ACCOUNT", "waypoint")
        .env("AMBIT_HBONE_ADDRESS", hbone.to_string())
        .env("AMBIT_STATS_ADDRESS", stats.to_string())
        .env("AMBIT_READINESS_ADDRESS", readiness.to_string())
        .env("CONNECTION_TERMINATION_DEADLINE", "2s")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(output.try_clone().unwrap())
        .stderr(output)
        .spawn()
        .unwrap();
    let mut process = Process { child, log };
    let output = |p: &Process| std::fs::read_to_string(&p.log).unwrap_or_default();
    let started = Instant::now();
    while !get(readiness, "/healthz/ready")
        .await
        .starts_with("HTTP/1.1 200")
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "never ready\n{}",
            output(&process)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let certificates = testing::manager(Arc::new(ca), Duration::from_secs(3600));
    let request = TunnelRequest {
        source: testing::identity("default", "sleep"),
        destination_identities: vec![testing::identity("default", "waypoint")],
        hbone_address: hbone,
        target: VIP.parse().unwrap(),
        headers: ConnectHeaders {
            forwarded_for: Some("10.9.9.9:40000".parse().unwrap()),
            ..Default::default()
        },
    };
    let client = Client::new(certificates.clone(), Settings::default());
    let mut tunnel = BufReader::new(client.connect(&request).await.unwrap());
    testing::echo_line(&mut tunnel, "before").await.unwrap();

    // The shell's builtin: no procps needed.
    let kill = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", process.child.id())])
        .status()
        .unwrap();
    assert!(kill.success());
    let signalled = Instant::now();
    loop {
        let ready = get(readiness, "/healthz/ready").await;
        if ready.starts_with("HTTP/1.1 503") {
            break;
        }
        assert!(signalled.elapsed() < Duration::from_secs(2), "{ready}");
    }
    let not_ready_after = signalled.elapsed();
    assert!(
        not_ready_after < Duration::from_millis(100),
        "not-ready only {not_ready_after:?} after SIGTERM"
    );

    // A new HBONE connection (a fresh client: nothing pooled) finds the listener closed.
    let fresh = Client::new(certificates, Settings::default());
    assert!(fresh.connect(&request).await.is_err());

    let mut moved = 0;
    while signalled.elapsed() + Duration::from_millis(600) < deadline {
        testing::echo_line(&mut tunnel, &format!("during {moved}"))
            .await
            .unwrap_or_else(|e| panic!("open tunnel broke while draining: {e}"));
        moved += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(moved >= 3, "{moved}");

    let mut rest = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut rest)).await;
    assert!(cut.is_ok(), "the open tunnel was never closed");
    assert!(
        signalled.elapsed() >= deadline - Duration::from_millis(500),
        "cut {:?} after SIGTERM, before the deadline",
        signalled.elapsed()
    );
    let exited = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < exited, "no exit\n{}", output(&process));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let log = output(&process);
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("still open at the deadline were cut") && l.contains("cut=1")),
        "no line saying what was cut:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
