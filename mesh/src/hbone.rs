//! HBONE: TCP tunnelled as HTTP/2 `CONNECT` streams inside mutual TLS, Istio's wire format.
//!
//! The [`server`] terminates mTLS, checks each `CONNECT` and lets a handler decide (200, 401, 503)
//! before any byte moves; the [`client`] opens streams over pooled connections, verifying the
//! server's SPIFFE identity. [`Settings`] holds the HTTP/2 tuning both sides share.

pub mod client;
mod keepalive;
mod pool;
pub mod server;
mod stream;

use std::net::SocketAddr;
use std::time::Duration;

pub use stream::H2Stream;

/// Istio's HBONE port.
pub const HBONE_PORT: u16 = 15008;

/// HTTP/2 and timing settings, Istio ztunnel's defaults unless a test shortens them.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Flow-control window per stream (`HTTP2_STREAM_WINDOW_SIZE`).
    pub stream_window: u32,
    /// Flow-control window per connection: 4× the stream window, so one busy stream cannot
    /// starve the others on the same connection.
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Streams a server accepts at once on one connection.
    pub server_max_streams: u32,
    /// Streams a client puts on one pooled connection before opening another.
    pub client_max_streams: usize,
    /// Largest header block a server accepts; larger requests are refused.
    pub server_max_header_list: u32,
    pub client_max_header_list: u32,
    /// How often an idle connection is pinged, and how long a ping may go unanswered.
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// TLS plus HTTP/2 handshake budget; a peer that stalls longer is dropped.
    pub handshake_timeout: Duration,
    /// How long a client waits for the server's answer to a `CONNECT` (the server may be
    /// connecting to its upstream meanwhile).
    pub response_timeout: Duration,
    /// A pooled connection with no streams for this long is released.
    pub pool_idle_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            server_max_streams: 200,
            client_max_streams: 100,
            server_max_header_list: 64 * 1024,
            client_max_header_list: 16 * 1024,
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(15),
            pool_idle_timeout: Duration::from_secs(300),
        }
    }
}

/// The request headers HBONE carries besides `:authority`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectHeaders {
    /// `forwarded: for="<ip:port>"`: the original client, as the source ztunnel saw it.
    pub forwarded_for: Option<SocketAddr>,
    /// `forwarded: ...;host=<service hostname>` when the destination was a service.
    pub forwarded_host: Option<String>,
    /// W3C baggage describing the source workload (`k8s.namespace.name=...`).
    pub baggage: Option<String>,
    /// W3C trace context; the client makes a random one per tunnel when none is given.
    pub traceparent: Option<String>,
}

impl ConnectHeaders {
    /// The `forwarded` header value, RFC 7239 with the address quoted (it holds a colon).
    pub fn forwarded_value(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(addr) = self.forwarded_for {
            parts.push(format!("for=\"{addr}\""));
        }
        if let Some(host) = &self.forwarded_host {
            parts.push(format!("host={host}"));
        }
        (!parts.is_empty()).then(|| parts.join(";"))
    }

    /// Reads `forwarded`, `baggage` and `traceparent` from request headers. Unparseable
    /// `forwarded` elements are ignored rather than failing the tunnel: they only feed telemetry.
    pub fn from_headers(headers: &http::HeaderMap) -> Self {
        let text = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let mut parsed = ConnectHeaders {
            baggage: text("baggage"),
            traceparent: text("traceparent"),
            ..Default::default()
        };
        if let Some(forwarded) = text("forwarded") {
            // Only the first element (the hop that entered the mesh) matters.
            let first = forwarded.split(',').next().unwrap_or_default();
            for pair in first.split(';') {
                let Some((key, value)) = pair.trim().split_once('=') else {
                    continue;
                };
                // Quotes and blanks off both ends, together: what is left has neither, so the
                // value reads back the same once written with `forwarded_value`.
                let value = value.trim_matches(|c: char| c == '"' || c.is_ascii_whitespace());
                match key.trim().to_ascii_lowercase().as_str() {
                    "for" => parsed.forwarded_for = value.parse().ok(),
                    "host" => parsed.forwarded_host = Some(value.to_owned()),
                    _ => {}
                }
            }
        }
        parsed
    }
}

/// A fresh W3C `traceparent` (version 00, not sampled), as ztunnel sends per connection.
pub fn random_traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-00")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trips_through_headers() {
        let sent = ConnectHeaders {
            forwarded_for: Some("10.0.0.7:41234".parse().unwrap()),
            forwarded_host: Some("echo.default.svc.cluster.local".into()),
            baggage: Some("k8s.namespace.name=default".into()),
            traceparent: Some(random_traceparent()),
        };
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "forwarded",
            sent.forwarded_value().unwrap().parse().unwrap(),
        );
        headers.insert("baggage", sent.baggage.clone().unwrap().parse().unwrap());
        headers.insert(
            "traceparent",
            sent.traceparent.clone().unwrap().parse().unwrap(),
        );
        assert_eq!(
            headers["forwarded"],
            "for=\"10.0.0.7:41234\";host=echo.default.svc.cluster.local"
        );
        assert_eq!(ConnectHeaders::from_headers(&headers), sent);
    }

    #[test]
    fn ipv6_forwarded_and_junk_are_handled() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "forwarded",
            "for=\"[fd00::1]:80\";proto=http, for=1.2.3.4"
                .parse()
                .unwrap(),
        );
        let parsed = ConnectHeaders::from_headers(&headers);
        assert_eq!(parsed.forwarded_for, Some("[fd00::1]:80".parse().unwrap()));
        headers.insert("forwarded", "for=nonsense;;=".parse().unwrap());
        assert_eq!(ConnectHeaders::from_headers(&headers).forwarded_for, None);
    }

    #[test]
    fn traceparent_has_w3c_shape() {
        let tp = random_traceparent();
        let parts: Vec<_> = tp.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "00")
        );
        assert_ne!(random_traceparent(), tp);
    }
}
