//! ztunnel as Kubernetes runs it: SIGTERM with a tunnel open (not-ready at once, no new
//! connections, the open tunnel moves bytes until the drain deadline, then is cut, exit 0); the
//! open-files limit (2,000 concurrent tunnels through a ztunnel started with a soft limit of
//! 1024); and connection metrics that balance (opened == closed) after rapid stream resets and
//! once the mesh idles.
//!
//! Node 2's ztunnel (the `echo` side: inbound HBONE, GOAWAY, upstream sockets) runs as the real
//! binary inside its node's namespace; node 1's runs in process.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::sync::Arc;

use ambit_mesh::identity::{CertificateAuthority, CertificateManager, Identity};
use ambit_mesh::lifecycle;
use ambit_mesh::testing::echo_line;
use ambit_mesh::tls;
use ambit_ztunnel::netns::PodNetns;
use ambit_ztunnel::testing::{
    app_call, app_connect, app_server, http_get, metric_sum, Cluster, ClusterOptions,
    ProcessOptions, ZtunnelProcess, VIP,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";

fn process(env: &[(&str, &str)], open_files_soft_limit: Option<u64>) -> ClusterOptions {
    ClusterOptions {
        process: Some(ProcessOptions {
            binary: env!("CARGO_BIN_EXE_ambit-ztunnel").into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            open_files_soft_limit,
        }),
        ..Default::default()
    }
}

fn service() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), 80)
}

async fn readiness(process: &ZtunnelProcess) -> String {
    process
        .get(process.readiness_address, "/healthz/ready")
        .await
        .unwrap_or_else(|e| format!("unreachable: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_open_tunnel_until_the_deadline_then_exits_zero() {
    let deadline = Duration::from_secs(3);
    let options = process(&[("CONNECTION_TERMINATION_DEADLINE", "3s")], None);
    let mut cluster = Cluster::start_with(options).await;
    let accepted = app_server(&cluster.echo, 8080).await;

    let mut tunnel = BufReader::new(app_connect(&cluster.sleep, service()).await.unwrap());
    let mut greeting = String::new();
    tunnel.read_line(&mut greeting).await.unwrap();
    assert!(greeting.starts_with("peer="), "{greeting:?}");
    echo_line(&mut tunnel, "before").await.unwrap();

    let process = cluster.process.as_mut().unwrap();
    process.signal("TERM");
    let signalled = Instant::now();
    loop {
        let ready = readiness(process).await;
        if ready.starts_with("HTTP/1.1 503") {
            assert!(ready.contains("shutting down"), "{ready}");
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(2),
            "still ready: {ready}"
        );
    }
    let not_ready_after = signalled.elapsed();
    assert!(
        not_ready_after < Duration::from_millis(100),
        "not-ready only {not_ready_after:?} after SIGTERM"
    );

    // No new connection reaches the app: the pod's HBONE listener is closed.
    let before = accepted.load(std::sync::atomic::Ordering::SeqCst);
    let refused = app_call(&cluster.sleep, service(), b"new\n").await;
    assert!(
        !refused.as_deref().unwrap_or_default().starts_with(b"peer="),
        "a new connection was served while draining: {refused:?}"
    );
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), before);

    // The open tunnel keeps moving bytes until just before the deadline...
    let mut moved = 0;
    while signalled.elapsed() + Duration::from_millis(700) < deadline {
        echo_line(&mut tunnel, &format!("during {moved}"))
            .await
            .unwrap_or_else(|e| panic!("open tunnel broke while draining, after {moved} echoes, {:?} after SIGTERM: {e}", signalled.elapsed()));
        moved += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(moved >= 5, "{moved}");

    // ...then is cut, and the process exits 0.
    let mut rest = Vec::new();
    let cut = tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut rest)).await;
    let cut_after = signalled.elapsed();
    assert!(cut.is_ok(), "the open tunnel was never closed");
    assert!(
        cut_after >= deadline - Duration::from_millis(500),
        "cut {cut_after:?} after SIGTERM, before the {deadline:?} deadline"
    );
    let status = process.wait(Duration::from_secs(10)).await;
    let output = process.output();
    let status = status.unwrap_or_else(|| panic!("ztunnel did not exit\n{output}"));
    assert_eq!(status.code(), Some(0), "{output}");
    let last = output
        .lines()
        .rev()
        .find(|l| l.contains("shut down"))
        .unwrap_or_default();
    assert!(
        last.contains("still open at the deadline were cut") && last.contains("cut=1"),
        "no line saying what was cut:\n{output}"
    );
    assert!(output.contains("open files limit"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_tunnels_through_a_ztunnel_started_with_1024_open_files() {
    const CONNECTIONS: usize = 2000;
    // This process holds both ends of every connection, and node 1's ztunnel.
    lifecycle::raise_open_files_limit();
    let mut cluster = Cluster::start_with(process(&[], Some(1024))).await;
    let process = cluster.process.take().unwrap();
    let output = process.output();
    assert!(
        output.contains("open files limit raised") && output.contains("soft=1024"),
        "{output}"
    );
    let accepted = app_server(&cluster.echo, 8080).await;

    // Opened one after another from one thread in the pod, then all held open at once.
    let sleep = PodNetns::new(cluster.sleep.open().into()).unwrap();
    let target = service();
    let streams = sleep
        .run(move || -> std::io::Result<Vec<std::net::TcpStream>> {
            (0..CONNECTIONS)
                .map(|_| {
                    let stream =
                        std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
                    stream.set_nonblocking(true)?;
                    Ok(stream)
                })
                .collect()
        })
        .await
        .unwrap()
        .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for (n, stream) in streams.into_iter().enumerate() {
        tasks.spawn(async move {
            let mut stream = BufReader::new(tokio::net::TcpStream::from_std(stream)?);
            let mut greeting = String::new();
            tokio::time::timeout(Duration::from_secs(60), stream.read_line(&mut greeting))
                .await
                .map_err(|_| std::io::Error::other("no greeting"))??;
            if !greeting.starts_with("peer=") {
                return Err(std::io::Error::other(format!("greeting {greeting:?}")));
            }
            echo_line(&mut stream, &format!("tunnel {n}")).await?;
            Ok(stream)
        });
    }
    let mut open = Vec::new();
    let mut failed = Vec::new();
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            Ok(stream) => open.push(stream),
            Err(err) => failed.push(err.to_string()),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {CONNECTIONS} tunnels failed, e.g. {:?}\n{}",
        failed.len(),
        failed.first(),
        process.output()
    );
    assert_eq!(open.len(), CONNECTIONS);
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= CONNECTIONS);

    // All closed: both ztunnels count every one of them closed.
    drop(open);
    let idle = Instant::now() + Duration::from_secs(30);
    loop {
        let node2 = process
            .get(process.stats_address, "/metrics")
            .await
            .unwrap();
        let node1 = http_get(cluster.ztunnels[0].stats_address, "/metrics").await;
        let counts = [&node1, &node2].map(|m| (metric_sum(m, OPENED), metric_sum(m, CLOSED)));
        if counts
            .iter()
            .all(|&(opened, closed)| opened == closed && opened >= CONNECTIONS as u64)
        {
            break;
        }
        assert!(
            Instant::now() < idle,
            "(opened, closed) per node never balanced: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A rapid-reset HBONE client on one connection: opens `established` tunnels (each answered 200,
/// its upstream connected and spliced), keeps them open, then resets `CONNECT`s as fast as it
/// can until the server gives up on the connection (h2's reset-flood guard answers GOAWAY), which
/// ends the established tunnels with it. Returns how many resets went out.
async fn rapid_resets(
    cluster: &Cluster,
    manager: &CertificateManager,
    established: usize,
) -> usize {
    let source = Identity::new("cluster.local", "default", "sleep").unwrap();
    let echo: Identity = "spiffe://cluster.local/ns/default/sa/echo".parse().unwrap();
    let cert = manager.fetch(&source).await.unwrap();
    let config = Arc::new(tls::client_config(&cert, &[echo]).unwrap());
    let address = SocketAddr::new(cluster.echo.ip.into(), 15008);
    let sleep = PodNetns::new(cluster.sleep.open().into()).unwrap();
    let tcp = sleep.connect(address).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(tls::server_name_for(address), tcp)
        .await
        .unwrap();
    let (mut send, connection) = h2::client::handshake(tls).await.unwrap();
    let driver = tokio::spawn(connection);
    let target = SocketAddr::new(cluster.echo.ip.into(), 8080);
    let connect = || {
        http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .unwrap()
    };
    let mut open = Vec::new();
    for _ in 0..established {
        send = send.ready().await.unwrap();
        let (response, stream) = send.send_request(connect(), false).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(response.status(), 200);
        open.push((stream, response.into_body()));
    }
    let mut resets = 0;
    for _ in 0..10_000 {
        let Ok(ready) = send.ready().await else { break };
        send = ready;
        let Ok((_response, mut stream)) = send.send_request(connect(), false) else {
            break;
        };
        stream.send_reset(h2::Reason::CANCEL);
        resets += 1;
        tokio::task::yield_now().await;
    }
    // The server ends the connection; the tunnels on it end too.
    let _ = tokio::time::timeout(Duration::from_secs(10), driver).await;
    resets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_counted_opened_is_counted_closed_after_rapid_resets() {
    let cluster = Cluster::start().await;
    let _accepted = app_server(&cluster.echo, 8080).await;
    let ca = CertificateAuthority::load(&cluster.dir.join("cacerts")).unwrap();
    let manager = ambit_mesh::testing::manager(Arc::new(ca), Duration::from_secs(3600));
    const ESTABLISHED: usize = 10;
    for _ in 0..3 {
        let resets = rapid_resets(&cluster, &manager, ESTABLISHED).await;
        assert!(resets < 10_000, "the server never stopped the reset flood");
    }
    // Ordinary traffic too, through both ztunnels.
    for n in 0..20 {
        let reply = app_call(&cluster.sleep, service(), format!("{n}\n").as_bytes())
            .await
            .unwrap();
        assert!(reply.starts_with(b"peer="));
    }
    let idle = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = [0, 1].map(|n| cluster.ztunnels[n].metrics.render());
        let counts = metrics
            .each_ref()
            .map(|m| (metric_sum(m, OPENED), metric_sum(m, CLOSED)));
        // Node 2 counted the established tunnels (and the resets it connected upstream).
        if counts.iter().all(|&(opened, closed)| opened == closed)
            && counts[1].0 >= 3 * ESTABLISHED as u64 + 20
        {
            break;
        }
        assert!(
            Instant::now() < idle,
            "(opened, closed) on (node 1, node 2) never balanced after the mesh idled: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The status line and body of a whole HTTP/1.1 response.
fn status_and_body(response: &str) -> (&str, &str) {
    let status = response.lines().next().unwrap_or_default();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_logging_shows_and_changes_the_level_of_the_running_binary() {
    let cluster = Cluster::start_with(process(&[], None)).await;
    let _accepted = app_server(&cluster.echo, 8080).await;
    let process = cluster.process.as_ref().unwrap();
    let admin = async |method: &str, path: &str| {
        let response = process
            .request(process.admin_address, method, path)
            .await
            .unwrap();
        let (status, body) = status_and_body(&response);
        (status.to_owned(), body.to_owned())
    };
    let ok = |level: &str| {
        (
            "HTTP/1.1 200 OK".to_owned(),
            format!("current log level is {level}\n"),
        )
    };
    assert_eq!(admin("GET", "/logging").await, ok("info"));
    assert_eq!(admin("POST", "/logging").await, ok("info"));
    // No debug line yet: each tunnel into the echo pod logs its end at debug only.
    let tunnel = || async {
        let reply = app_call(&cluster.sleep, service(), b"x\n").await.unwrap();
        assert!(reply.starts_with(b"peer="), "{reply:?}");
    };
    tunnel().await;
    let debug_lines = || {
        process
            .output()
            .lines()
            .filter(|l| l.contains("DEBUG") && l.contains("HBONE tunnel closed"))
            .count()
    };
    assert_eq!(debug_lines(), 0);

    // Istio's per-module form, shown back as the filter in force.
    let scoped = "ambit_mesh::hbone:debug,info";
    assert_eq!(
        admin("POST", &format!("/logging?level={scoped}")).await,
        ok("ambit_mesh::hbone=debug,info")
    );
    assert_eq!(
        admin("GET", "/logging").await,
        ok("ambit_mesh::hbone=debug,info")
    );
    tunnel().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while debug_lines() == 0 {
        assert!(
            Instant::now() < deadline,
            "no debug line after /logging?level={scoped}:\n{}",
            process.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A bad level is refused and changes nothing; a GET never changes it.
    let (status, body) = admin("POST", "/logging?level=loud").await;
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert!(body.contains("\"loud\" is invalid"), "{body}");
    let (status, _) = admin("GET", "/logging?level=trace").await;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(
        admin("GET", "/logging").await,
        ok("ambit_mesh::hbone=debug,info")
    );
    // Back to RUST_LOG.
    assert_eq!(admin("POST", "/logging?reset").await, ok("info"));
    assert_eq!(admin("POST", "/logging?level=warn").await, ok("warn"));
}

/// Istio's `/quitquitquit`: a GET is refused and changes nothing; a POST answers at once (Istio's
/// ztunnel only waits for the shutdown to be triggered, not for the drain) and the process drains
/// as on SIGTERM: not ready, then exit 0 with the reason logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_quitquitquit_takes_post_only_and_drains_then_exits_zero() {
    let options = process(&[("CONNECTION_TERMINATION_DEADLINE", "2s")], None);
    let mut cluster = Cluster::start_with(options).await;
    let _accepted = app_server(&cluster.echo, 8080).await;
    let mut tunnel = BufReader::new(app_connect(&cluster.sleep, service()).await.unwrap());
    let mut greeting = String::new();
    tunnel.read_line(&mut greeting).await.unwrap();
    assert!(greeting.starts_with("peer="), "{greeting:?}");
    let process = cluster.process.as_mut().unwrap();

    let refused = process
        .request(process.admin_address, "GET", "/quitquitquit")
        .await
        .unwrap();
    assert_eq!(
        status_and_body(&refused),
        (
            "HTTP/1.1 405 Method Not Allowed",
            "/quitquitquit takes POST\n"
        )
    );
    assert!(
        process.wait(Duration::from_millis(300)).await.is_none(),
        "a GET stopped it"
    );
    assert!(readiness(process).await.starts_with("HTTP/1.1 200"));
    echo_line(&mut tunnel, "after GET").await.unwrap();

    let posted = Instant::now();
    let answer = process
        .request(process.admin_address, "POST", "/quitquitquit")
        .await
        .unwrap();
    assert_eq!(
        status_and_body(&answer),
        ("HTTP/1.1 200 OK", "shutting down: draining\n")
    );
    assert!(
        posted.elapsed() < Duration::from_millis(500),
        "answered only after {:?}",
        posted.elapsed()
    );
    let ready = readiness(process).await;
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("shutting down"),
        "{ready}"
    );
    // The open tunnel drains like on SIGTERM.
    echo_line(&mut tunnel, "draining").await.unwrap();
    let status = process.wait(Duration::from_secs(10)).await;
    let output = process.output();
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{output}");
    assert!(posted.elapsed() >= Duration::from_millis(1500), "{output}");
    assert!(
        output.contains("shutting down") && output.contains("/quitquitquit"),
        "{output}"
    );
}
