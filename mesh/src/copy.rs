//! Splicing two byte streams both ways, with TCP half-close carried across, counting what moved
//! even when the splice ends in an error (telemetry needs the bytes of failed connections too).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a splice moved, and how it ended.
#[derive(Debug, Default)]
pub struct Transfer {
    /// Bytes read from the first stream and written to the second.
    pub forward: u64,
    /// Bytes read from the second stream and written to the first.
    pub backward: u64,
    pub error: Option<io::Error>,
}

/// Copies both ways until both directions reach EOF (each EOF is passed on as a shutdown of the
/// other side's write half) or one fails. `buffer` bytes are used per direction.
pub async fn splice<A, B>(a: &mut A, b: &mut B, buffer: usize) -> Transfer
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a = Counted { inner: a, read: 0 };
    let mut b = Counted { inner: b, read: 0 };
    let result = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, buffer, buffer).await;
    Transfer {
        forward: a.read,
        backward: b.read,
        error: result.err(),
    }
}

/// Counts bytes read through it.
struct Counted<'a, T: ?Sized> {
    inner: &'a mut T,
    read: u64,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut *self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        poll
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_directions_and_carries_half_close() {
        let (mut client, mut proxy_a) = tokio::io::duplex(1024);
        let (mut proxy_b, mut server) = tokio::io::duplex(1024);
        let splicing = tokio::spawn(async move { splice(&mut proxy_a, &mut proxy_b, 64).await });
        client.write_all(b"hello server").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello server");
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"bye");
        let transfer = splicing.await.unwrap();
        assert_eq!((transfer.forward, transfer.backward), (12, 3));
        assert!(transfer.error.is_none());
    }
}
