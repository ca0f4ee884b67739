//! Issue 21's noisy neighbour through a real waypoint: a WasmPlugin looping on one service under
//! load leaves another service's request rate and p99 alone. In a test binary of its own, so no
//! other test of the same process competes for the CPU while the two runs are compared.

#[path = "support/l7mesh.rs"]
mod l7mesh;

use std::time::Duration;

use ambit_wasm_host::testing::build_filter;
use ambit_waypoint::l7::EMPTY_CONFIG;
use ambit_waypoint::proxy::ProxySettings;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use l7mesh::{eventually, write_config, L7Mesh, ECHO_HOST, ECHO_VIP};

/// Load on one service: `conns` keep-alive connections, each in its own tunnel, sending GETs
/// one after another (closed loop), or one per `pace` at most, until `stop`; returns each
/// request's status and latency.
async fn load(
    mesh: &L7Mesh,
    vip: &str,
    host: &'static str,
    conns: usize,
    pace: Option<Duration>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinSet<Vec<(StatusCode, Duration)>> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let io = TokioIo::new(mesh.tunnel_as("sleep", vip).await);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(connection);
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut samples = Vec::new();
            let mut ticks = pace.map(|pace| {
                let mut ticks = tokio::time::interval(pace);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticks
            });
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(ticks) = ticks.as_mut() {
                    ticks.tick().await;
                }
                let request = Request::get("/")
                    .header("host", host)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let started = std::time::Instant::now();
                let Ok(response) = sender.send_request(request).await else {
                    break;
                };
                let status = response.status();
                let _ = response.into_body().collect().await;
                samples.push((status, started.elapsed()));
            }
            samples
        });
    }
    tasks
}

/// `web`'s requests/s and p99 over `seconds` (closed loop), with `other` under load beside it;
/// and the statuses `other` got. `other`'s load is paced, so that both runs offer it the same
/// requests: closed-loop, fast failures would mean more requests, not a noisier neighbour.
async fn web_beside_loaded_other(mesh: &L7Mesh, seconds: u64) -> (f64, Duration, Vec<StatusCode>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop_other = std::sync::Arc::new(AtomicBool::new(false));
    // 8 connections at up to 50 requests/s each.
    let pace = Some(Duration::from_millis(20));
    let mut other = load(mesh, OTHER_VIP, OTHER_HOST, 8, pace, stop_other.clone()).await;
    // Let the other service's load settle (and a looping plugin's circuit open) first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stop_web = std::sync::Arc::new(AtomicBool::new(false));
    let mut web = load(mesh, ECHO_VIP, ECHO_HOST, 4, None, stop_web.clone()).await;
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop_web.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut latencies = Vec::new();
    while let Some(samples) = web.join_next().await {
        for (status, latency) in samples.unwrap() {
            assert_eq!(status, StatusCode::OK, "web must be served throughout");
            latencies.push(latency);
        }
    }
    stop_other.store(true, Ordering::Relaxed);
    let mut statuses = Vec::new();
    while let Some(samples) = other.join_next().await {
        statuses.extend(samples.unwrap().into_iter().map(|(status, _)| status));
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    (
        latencies.len() as f64 / elapsed.as_secs_f64(),
        p99,
        statuses,
    )
}

/// One GET on a fresh tunnel to `vip`.
async fn one_status(mesh: &L7Mesh, vip: &str, host: &str) -> StatusCode {
    let io = TokioIo::new(mesh.tunnel_as("sleep", vip).await);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(connection);
    let request = Request::get("/")
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    sender.send_request(request).await.unwrap().status()
}

const OTHER_VIP: &str = "10.96.1.11:80";
const OTHER_HOST: &str = "echo-v2.default.svc.cluster.local";

/// Issue 21's noisy neighbour: a WasmPlugin looping in `proxy_on_request_headers` on service
/// `other` (echo-v2), under load, beside the same run without it. The loop may cost `other`'s
/// requests (500 per failStrategy, fast once its circuit opens) but not `web`'s rate or p99.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_filter_on_one_service_leaves_another_services_rate_and_p99_alone() {
    let looping = format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: looping, \
         namespace: default}}\nspec:\n  targetRefs: [{{kind: Service, group: \"\", name: \
         echo-v2}}]\n  url: file://{}\n  failStrategy: FAIL_CLOSE\n  pluginConfig: {{\"mode\": \
         \"loop\"}}\n",
        build_filter("test-hostile").display()
    );
    let mesh = L7Mesh::start(173, "", ProxySettings::default()).await;
    let seconds = 3;
    let (clean_rate, clean_p99, statuses) = web_beside_loaded_other(&mesh, seconds).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));

    write_config(&mesh.config_path, &looping);
    eventually(|| async {
        one_status(&mesh, OTHER_VIP, OTHER_HOST).await == StatusCode::INTERNAL_SERVER_ERROR
    })
    .await;
    let (rate, p99, statuses) = web_beside_loaded_other(&mesh, seconds).await;
    assert!(statuses
        .iter()
        .all(|s| *s == StatusCode::INTERNAL_SERVER_ERROR));

    let opened = mesh
        .counter("ambit_wasm_plugin_circuit_opened_total", &["looping"])
        .await;
    assert!(opened >= 1, "the looping plugin's circuit never opened");

    // Clean again: the two clean runs bracket the looping one, so the machine's drift (other
    // tests, other builds) is in the baseline, not in the ratio.
    write_config(&mesh.config_path, EMPTY_CONFIG);
    eventually(|| async { one_status(&mesh, OTHER_VIP, OTHER_HOST).await == StatusCode::OK }).await;
    let (again_rate, again_p99, _) = web_beside_loaded_other(&mesh, seconds).await;
    println!(
        "web beside a loaded other: clean {clean_rate:.0} req/s p99 {clean_p99:?}; with a \
         looping filter on other {rate:.0} req/s p99 {p99:?} ({} answers to other); clean \
         again {again_rate:.0} req/s p99 {again_p99:?}",
        statuses.len()
    );
    let clean_rate = clean_rate.min(again_rate);
    let clean_p99 = clean_p99.max(again_p99);
    assert!(
        rate >= clean_rate * 0.8,
        "web's rate fell from {clean_rate:.0} to {rate:.0} req/s"
    );
    assert!(
        p99.as_secs_f64() <= clean_p99.as_secs_f64() * 1.2,
        "web's p99 rose from {clean_p99:?} to {p99:?}"
    );
}
