//! The built-in `ambit/echo` image: an HTTP and TCP echo server, and a tiny HTTP client, so the
//! local mesh's demo needs nothing installed.
//!
//! The server answers HTTP requests with who it is and who called (the address it saw), and
//! echoes anything that is not HTTP byte for byte until the client closes.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const HTTP_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"PATCH ",
    b"OPTIONS ",
    b"CONNECT ",
    b"TRACE ",
];

/// Serves on every port in `ports` until killed.
pub async fn serve(ports: &[u16], name: &str) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for &port in ports {
        let listener = TcpListener::bind(("0.0.0.0", port)).await?;
        let name = name.to_owned();
        tasks.spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let _ = handle(stream, peer, port, &name).await;
                });
            }
        });
    }
    eprintln!("ambit/echo {name}: listening on {ports:?}");
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn handle(stream: TcpStream, peer: SocketAddr, port: u16, name: &str) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let start = reader.fill_buf().await?.to_vec();
    if !HTTP_METHODS.iter().any(|m| start.starts_with(m)) {
        // What was peeked is still in the reader's buffer, which `into_inner` drops: echo it first.
        let mut stream = reader.into_inner();
        stream.write_all(&start).await?;
        let (mut read, mut write) = stream.split();
        tokio::io::copy(&mut read, &mut write).await?;
        return write.shutdown().await;
    }
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        let mut content_length = 0usize;
        let mut close = false;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((key, value)) = header.split_once(':') {
                match key.trim().to_ascii_lowercase().as_str() {
                    "content-length" => content_length = value.trim().parse().unwrap_or(0),
                    "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; content_length];
        reader.read_exact(&mut body).await?;
        let text = format!(
            "hostname={name} port={port} peer={peer} request={}\n",
            request_line.trim_end()
        );
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-ambit-echo: {name}\r\n\r\n{text}",
            text.len()
        );
        reader.get_mut().write_all(response.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

/// GETs `url` (http only) and returns the status line and body; with `include_headers`, the
/// status line, the headers, a blank line and the body, as `curl -i` prints them.
pub async fn fetch(url: &str, include_headers: bool) -> anyhow::Result<String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// URLs are supported: {url}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let address = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let mut stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        TcpStream::connect(&address),
    )
    .await
    .map_err(|_| anyhow::anyhow!("connecting to {address} timed out"))?
    .map_err(|e| call_error(&address, e))?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| call_error(&address, e))?;
    let mut response = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer from {address} within 10 s"))?
    .map_err(|e| call_error(&address, e))?;
    if response.is_empty() {
        anyhow::bail!(
            "{address} closed the connection without answering: the mesh refused the call, most likely denied by an AuthorizationPolicy or because the service has no ready endpoint (see `ambit mesh status`)"
        );
    }
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or((response.as_str(), ""));
    if include_headers {
        return Ok(format!("{}\n\n{body}", head.replace("\r\n", "\n")));
    }
    let status = head.lines().next().unwrap_or_default();
    Ok(format!("{status}\n{body}"))
}

/// A failed call in words a mesh user can act on, not a bare `os error 104`.
fn call_error(address: &str, err: std::io::Error) -> anyhow::Error {
    use std::io::ErrorKind;
    match err.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => anyhow::anyhow!(
            "the connection to {address} was reset by the mesh: most likely denied by an AuthorizationPolicy, or the service has no ready endpoint (see `ambit mesh status`; {err})"
        ),
        ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "connection to {address} refused: nothing listens there (is the pod's server up and ready? see `ambit mesh status`; {err})"
        ),
        _ => anyhow::anyhow!("calling {address}: {err}"),
    }
}
