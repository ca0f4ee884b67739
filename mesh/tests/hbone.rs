//! HBONE through real sockets and real mTLS: round trips, headers, pooling and policy answers.

use std::sync::Arc;
use std::time::Duration;

use ambit_mesh::hbone::client::{Client, TunnelRequest};
use ambit_mesh::hbone::{ConnectHeaders, Settings};
use ambit_mesh::testing::{self, TcpForwarder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TTL: Duration = Duration::from_secs(3600);

struct Fixture {
    client: Client,
    forwarder: Arc<TcpForwarder>,
    request: TunnelRequest,
}

async fn fixture(forwarder: TcpForwarder) -> Fixture {
    let ca = testing::ca();
    let certificates = testing::manager(ca, TTL);
    let server_id = testing::identity("default", "echo");
    let forwarder = Arc::new(forwarder);
    let hbone = testing::hbone_server(
        server_id.clone(),
        certificates.clone(),
        forwarder.clone(),
        Settings::default(),
    )
    .await;
    let echo = testing::echo_server().await;
    Fixture {
        client: Client::new(certificates, Settings::default()),
        forwarder,
        request: TunnelRequest {
            source: testing::identity("default", "sleep"),
            destination_identities: vec![server_id],
            hbone_address: hbone,
            target: echo,
            headers: ConnectHeaders::default(),
        },
    }
}

#[tokio::test]
async fn round_trip_carries_bytes_identities_and_headers() {
    let mut fx = fixture(TcpForwarder::default()).await;
    fx.request.headers = ConnectHeaders {
        forwarded_for: Some("10.1.2.3:45678".parse().unwrap()),
        forwarded_host: Some("echo.default.svc.cluster.local".into()),
        baggage: Some("k8s.namespace.name=default,k8s.pod.name=sleep-1".into()),
        traceparent: None,
    };
    let mut tunnel = fx.client.connect(&fx.request).await.unwrap();
    assert_eq!(tunnel.peer().identity, testing::identity("default", "echo"));
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let echoed = testing::echo_round_trip(&mut tunnel, &payload)
        .await
        .unwrap();
    assert_eq!(echoed, payload);

    let seen = fx.forwarder.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.target, fx.request.target);
    assert_eq!(request.peer_identity, testing::identity("default", "sleep"));
    assert_eq!(
        request.headers.forwarded_for,
        fx.request.headers.forwarded_for
    );
    assert_eq!(
        request.headers.forwarded_host.as_deref(),
        Some("echo.default.svc.cluster.local")
    );
    assert_eq!(request.headers.baggage, fx.request.headers.baggage);
    let traceparent = request.headers.traceparent.as_deref().unwrap();
    assert!(
        traceparent.starts_with("00-") && traceparent.len() == 55,
        "{traceparent}"
    );

    // The server reports the bytes it moved once both halves closed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        *fx.forwarder.finished.lock().unwrap(),
        vec![(payload.len() as u64, payload.len() as u64)]
    );
}

#[tokio::test]
async fn half_close_lets_the_response_finish() {
    let fx = fixture(TcpForwarder::default()).await;
    let mut tunnel = fx.client.connect(&fx.request).await.unwrap();
    tunnel.write_all(b"ping").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut back = Vec::new();
    tunnel.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"ping");
}

#[tokio::test]
async fn many_concurrent_streams_share_one_connection() {
    let fx = Arc::new(fixture(TcpForwarder::default()).await);
    let mut tasks = Vec::new();
    for i in 0..50u32 {
        let fx = fx.clone();
        tasks.push(tokio::spawn(async move {
            let mut tunnel = fx.client.connect(&fx.request).await.unwrap();
            let payload = format!("stream {i} ").repeat(1000).into_bytes();
            let echoed = testing::echo_round_trip(&mut tunnel, &payload)
                .await
                .unwrap();
            assert_eq!(echoed, payload);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(fx.client.pooled_connections(&fx.request), 1);
}

#[tokio::test]
async fn pool_opens_a_second_connection_past_100_streams() {
    let fx = fixture(TcpForwarder::default()).await;
    let mut open = Vec::new();
    for _ in 0..100 {
        open.push(fx.client.connect(&fx.request).await.unwrap());
    }
    assert_eq!(fx.client.pooled_connections(&fx.request), 1);
    let extra = fx.client.connect(&fx.request).await.unwrap();
    assert!(!extra.reused_connection());
    assert_eq!(fx.client.pooled_connections(&fx.request), 2);
    // Once streams end, new tunnels reuse what is open instead of dialing.
    drop(open);
    let again = fx.client.connect(&fx.request).await.unwrap();
    assert!(again.reused_connection());
    assert_eq!(fx.client.pooled_connections(&fx.request), 2);
}

#[tokio::test]
async fn a_different_source_identity_gets_its_own_connection() {
    let fx = fixture(TcpForwarder::default()).await;
    let _a = fx.client.connect(&fx.request).await.unwrap();
    let mut other = fx.request.clone();
    other.source = testing::identity("other", "client");
    let b = fx.client.connect(&other).await.unwrap();
    assert!(!b.reused_connection());
    assert_eq!(fx.client.pooled_connections(&fx.request), 1);
    assert_eq!(fx.client.pooled_connections(&other), 1);
}

#[tokio::test]
async fn idle_connections_are_released() {
    let ca = testing::ca();
    let certificates = testing::manager(ca, TTL);
    let server_id = testing::identity("default", "echo");
    let hbone = testing::hbone_server(
        server_id.clone(),
        certificates.clone(),
        Arc::new(TcpForwarder::default()),
        Settings::default(),
    )
    .await;
    let settings = Settings {
        pool_idle_timeout: Duration::from_millis(200),
        ..Settings::default()
    };
    let client = Client::new(certificates, settings);
    let request = TunnelRequest {
        source: testing::identity("default", "sleep"),
        destination_identities: vec![server_id],
        hbone_address: hbone,
        target: testing::echo_server().await,
        headers: ConnectHeaders::default(),
    };
    let tunnel = client.connect(&request).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        client.pooled_connections(&request),
        1,
        "a connection with an open stream is never released"
    );
    drop(tunnel);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(client.pooled_connections(&request), 0);
    let fresh = client.connect(&request).await.unwrap();
    assert!(!fresh.reused_connection());
}

#[tokio::test]
async fn handler_decisions_reach_the_client_as_statuses() {
    let denied = testing::identity("default", "sleep");
    let fx = fixture(TcpForwarder {
        deny: vec![denied],
        ..Default::default()
    })
    .await;
    let err = fx.client.connect(&fx.request).await.err().unwrap();
    assert_eq!(err.status(), Some(http::StatusCode::UNAUTHORIZED), "{err}");

    // Nothing listens on the target: 503.
    let mut unreachable = fx.request.clone();
    unreachable.source = testing::identity("default", "allowed");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    unreachable.target = closed.local_addr().unwrap();
    drop(closed);
    let err = fx.client.connect(&unreachable).await.err().unwrap();
    assert_eq!(
        err.status(),
        Some(http::StatusCode::SERVICE_UNAVAILABLE),
        "{err}"
    );

    // The same connection still serves an allowed tunnel after both refusals.
    let mut allowed = unreachable.clone();
    allowed.target = fx.request.target;
    let mut tunnel = fx.client.connect(&allowed).await.unwrap();
    assert!(tunnel.reused_connection());
    let echoed = testing::echo_round_trip(&mut tunnel, b"still here")
        .await
        .unwrap();
    assert_eq!(echoed, b"still here");
}

#[tokio::test]
async fn wrong_server_identity_fails_the_tunnel_loudly() {
    let mut fx = fixture(TcpForwarder::default()).await;
    fx.request.destination_identities = vec![testing::identity("default", "somebody-else")];
    let err = fx.client.connect(&fx.request).await.err().unwrap();
    let text = err.to_string();
    assert!(text.contains("mTLS handshake"), "{text}");
    assert!(
        text.contains("spiffe://cluster.local/ns/default/sa/echo")
            && text.contains("somebody-else"),
        "the error names both identities: {text}"
    );
    assert!(fx.forwarder.seen.lock().unwrap().is_empty());
}
