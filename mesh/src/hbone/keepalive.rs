//! HTTP/2 PING keepalive: a connection whose peer stops answering is torn down rather than left
//! to hold streams that will never move again.

use std::time::Duration;

use h2::{Ping, PingPong};

/// Why a keepalive gave up on a connection.
#[derive(Debug, thiserror::Error)]
pub enum KeepaliveError {
    #[error("peer did not answer an HTTP/2 PING within {0:?}")]
    Timeout(Duration),
    #[error("HTTP/2 PING failed: {0}")]
    Failed(#[from] h2::Error),
}

/// Pings every `interval` and fails when one goes unanswered for `timeout`. Never returns Ok: the
/// caller races it against the connection.
pub async fn run(mut ping_pong: PingPong, interval: Duration, timeout: Duration) -> KeepaliveError {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(err)) => return KeepaliveError::Failed(err),
            Err(_) => return KeepaliveError::Timeout(timeout),
        }
    }
}
