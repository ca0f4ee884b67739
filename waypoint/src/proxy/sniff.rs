//! Protocol detection for ports that declare no protocol (Envoy's `http_inspector`, as Istio
//! uses it for undeclared ports): the client's first bytes decide whether a tunnel carries HTTP
//! (served at L7) or something else (proxied at L4).
//!
//! HTTP is recognized by the HTTP/2 connection preface or a complete HTTP/1.x request line.
//! Anything else is TCP, and binary protocols are told apart on their first byte, so they pay no
//! delay. A client that sends nothing within the detection timeout is taken for the client of a
//! server-first protocol (MySQL, SMTP, ...) and proxied at L4; such ports are best declared
//! (`appProtocol: tcp` or a `tcp-` port name) so they never wait.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest HTTP/1 request line waited for; a longer first line is not HTTP to the waypoint
/// (Envoy's default request-header limit is 60 KiB; request lines are far shorter in practice).
const MAX_REQUEST_LINE: usize = 16 * 1024;
/// Longer than any method a client sends.
const MAX_METHOD: usize = 24;

/// What a tunnel carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http,
    Tcp,
}

/// Reads the first bytes of `io` until they tell HTTP from TCP, the detection `timeout` passes
/// (TCP), or the client closes or fails (TCP: whatever it sent is still forwarded). Returns the
/// verdict and the bytes read, which belong in front of the stream again ([`Rewind`]).
pub async fn detect<S: AsyncRead + Unpin>(io: &mut S, timeout: Duration) -> (Detected, Bytes) {
    let mut read = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(detected) = classify(&read) {
            return (detected, read.freeze());
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut read)).await {
            Ok(Ok(n)) if n > 0 => continue,
            // End of stream, a read error or the timeout: not HTTP as far as anyone can tell.
            _ => return (Detected::Tcp, read.freeze()),
        }
    }
}

/// The verdict on the bytes so far, or `None` while they could still become either.
pub fn classify(bytes: &[u8]) -> Option<Detected> {
    if bytes.is_empty() {
        return None;
    }
    let common = bytes.len().min(H2_PREFACE.len());
    if bytes[..common] == H2_PREFACE[..common] {
        return (bytes.len() >= H2_PREFACE.len()).then_some(Detected::Http);
    }
    // HTTP/1.x: `method SP request-target SP HTTP/1.x CRLF`.
    let method = bytes.iter().take_while(|&&b| is_token(b)).count();
    if method == bytes.len() {
        return (method > MAX_METHOD).then_some(Detected::Tcp);
    }
    if method == 0 || method > MAX_METHOD || bytes[method] != b' ' {
        return Some(Detected::Tcp);
    }
    let Some(end) = bytes.iter().position(|&b| b == b'\n') else {
        return (bytes.len() > MAX_REQUEST_LINE).then_some(Detected::Tcp);
    };
    let line = bytes[..end].strip_suffix(b"\r").unwrap_or(&bytes[..end]);
    let rest = &line[method + 1..];
    let http = match rest.iter().rposition(|&b| b == b' ') {
        Some(space) => {
            let (target, version) = (&rest[..space], &rest[space + 1..]);
            !target.is_empty()
                && !target.contains(&b' ')
                && matches!(version, b"HTTP/1.1" | b"HTTP/1.0")
        }
        None => false,
    };
    Some(if http { Detected::Http } else { Detected::Tcp })
}

/// RFC 9110 `tchar`: what a method is made of.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A stream with the bytes detection read put back in front of it.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn http1_request_lines_and_the_h2_preface_are_http() {
        for http in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"POST /orders?id=1 HTTP/1.0\r\nHost: x\r\n",
            b"OPTIONS * HTTP/1.1\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
        ] {
            assert_eq!(
                classify(http),
                Some(Detected::Http),
                "{:?}",
                String::from_utf8_lossy(http)
            );
        }
    }

    #[test]
    fn binary_and_other_text_protocols_are_tcp_as_soon_as_they_differ() {
        for tcp in [
            &b"\x16\x03\x01\x02\x00"[..],        // a TLS ClientHello
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // PostgreSQL SSLRequest
            b"*1\r\n$4\r\nPING\r\n",             // Redis
            b"EHLO client\r\n",                  // SMTP, client's turn
            b"GET /no-version\r\n",
            b"GET / HTTP/3.0\r\n",
            b"GET  / HTTP/1.1\r\n",
            b"hello world\n",
        ] {
            assert_eq!(
                classify(tcp),
                Some(Detected::Tcp),
                "{:?}",
                String::from_utf8_lossy(tcp)
            );
        }
    }

    #[test]
    fn partial_input_waits_for_more() {
        for partial in [
            &b""[..],
            b"G",
            b"GET",
            b"GET /a",
            b"GET /a HTTP/1.",
            b"PRI * HT",
        ] {
            assert_eq!(
                classify(partial),
                None,
                "{:?}",
                String::from_utf8_lossy(partial)
            );
        }
        assert_eq!(
            classify(&[b'A'; MAX_METHOD + 1]),
            Some(Detected::Tcp),
            "no method is that long"
        );
        let mut long = b"GET /".to_vec();
        long.resize(MAX_REQUEST_LINE + 1, b'a');
        assert_eq!(classify(&long), Some(Detected::Tcp));
    }

    #[tokio::test]
    async fn detection_reads_across_writes_and_rewinds_what_it_read() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            client.write_all(b"GET /split ").await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            client
                .write_all(b"HTTP/1.1\r\nhost: a\r\n\r\n")
                .await
                .unwrap();
            client
        });
        let (detected, read) = detect(&mut server, Duration::from_secs(5)).await;
        assert_eq!(detected, Detected::Http);
        let _client = writer.await.unwrap();
        let mut rewound = Rewind::new(read, server);
        let sent = b"GET /split HTTP/1.1\r\nhost: a\r\n\r\n";
        let mut text = vec![0; sent.len()];
        rewound.read_exact(&mut text).await.unwrap();
        assert_eq!(text, sent);
    }

    #[tokio::test]
    async fn a_silent_client_is_tcp_after_the_timeout() {
        let (_client, mut server) = tokio::io::duplex(64);
        let started = std::time::Instant::now();
        let (detected, read) = detect(&mut server, Duration::from_millis(50)).await;
        assert_eq!(detected, Detected::Tcp);
        assert!(read.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
