//! Splicing two byte streams both ways, with TCP half-close carried across, counting what moved
//! even when the splice ends in an error (telemetry needs the bytes of failed connections too).
//!
//! Bytes move as [`Bytes`] chunks, not through a caller's buffer: a socket's reads land in a
//! per-direction [`BytesMut`] whose filled part is handed on whole, and an HBONE stream
//! ([`crate::hbone::H2Stream`]) takes and gives h2's own chunks. So a byte from a socket reaches
//! h2 without a copy, and one from h2 reaches the socket straight from h2's receive buffer (Istio's
//! ztunnel moves bytes the same way).
//!
//! Each direction's read buffer grows as the direction proves busy (1 KiB, then 16 KiB after
//! 128 KiB moved, then 64 KiB after 4 MiB) and is given back while the direction idles, so ten
//! thousand idle connections hold no buffers and a bulk flow reads in large pieces. 64 KiB, not
//! Istio's 256 KiB: chunks handed to h2 live until the TLS writer has sent them, so every read
//! takes a fresh allocation, and glibc maps and unmaps those above 128 KiB each time.
//!
//! A [`Meter`] is told of bytes as they are written, so long-lived connections show their traffic
//! while open.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// What a splice moved, and how it ended.
#[derive(Debug, Default)]
pub struct Transfer {
    /// Bytes read from the first stream and written to the second.
    pub forward: u64,
    /// Bytes read from the second stream and written to the first.
    pub backward: u64,
    pub error: Option<io::Error>,
}

/// A byte stream that hands out and takes whole chunks.
pub trait ChunkStream: Unpin {
    /// The next chunk read; empty at end of stream.
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>>;

    /// Writes from the front of `data`, advancing it past what was taken (at least one byte).
    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>>;

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Closes the write half (TCP FIN, HTTP/2 END_STREAM).
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl<T: ChunkStream + ?Sized> ChunkStream for &mut T {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        (**self).poll_read_chunk(cx)
    }

    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        (**self).poll_write_chunk(cx, data)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        (**self).poll_shutdown(cx)
    }
}

/// Told of bytes as a splice writes them.
pub trait Meter {
    /// Bytes written to the second stream (read from the first).
    fn forward(&self, _bytes: u64) {}
    /// Bytes written to the first stream (read from the second).
    fn backward(&self, _bytes: u64) {}
}

/// No meter.
impl Meter for () {}

const INITIAL_BUFFER: usize = 1024;
const LARGE_BUFFER: usize = 16 * 1024;
const JUMBO_BUFFER: usize = 64 * 1024;
/// Bytes a direction moves before its buffer grows to the next size.
const LARGE_AFTER: u64 = 128 * 1024;
const JUMBO_AFTER: u64 = 4 * 1024 * 1024;

/// Any `AsyncRead + AsyncWrite` (a socket) as a [`ChunkStream`], reading into a buffer of its own
/// that grows with the flow (module docs).
pub struct Buffered<T> {
    inner: T,
    buffer: BytesMut,
    size: usize,
    read: u64,
}

impl<T> Buffered<T> {
    pub fn new(inner: T) -> Self {
        Buffered {
            inner,
            buffer: BytesMut::new(),
            size: INITIAL_BUFFER,
            read: 0,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> ChunkStream for Buffered<T> {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        // `reserve` reuses the allocation when the last chunk handed out from it is gone (the
        // writer sent it), else takes a new one.
        self.buffer.reserve(self.size);
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.inner), cx, &mut self.buffer) {
            Poll::Ready(Ok(n)) => {
                let before = self.read;
                self.read += n as u64;
                if before < LARGE_AFTER && self.read >= LARGE_AFTER {
                    self.size = LARGE_BUFFER;
                } else if before < JUMBO_AFTER && self.read >= JUMBO_AFTER {
                    self.size = JUMBO_BUFFER;
                }
                Poll::Ready(Ok(self.buffer.split().freeze()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                // Idle: give the memory back; the next read takes it again at the grown size.
                if self.size > INITIAL_BUFFER {
                    self.buffer = BytesMut::new();
                }
                Poll::Pending
            }
        }
    }

    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, data))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        data.advance(n);
        Poll::Ready(Ok(()))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One direction of a splice.
#[derive(Default)]
struct Direction {
    /// Read but not yet written.
    pending: Bytes,
    moved: u64,
    /// End of stream read, not yet passed on.
    eof: bool,
    done: bool,
}

impl Direction {
    /// Moves bytes from `from` to `to` until `from` would block, then returns Pending; Ready once
    /// the end of stream has been passed on as a shutdown.
    fn poll<R: ChunkStream + ?Sized, W: ChunkStream + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        meter: impl Fn(u64),
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                ready!(to.poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            if !self.pending.is_empty() {
                let before = self.pending.len();
                ready!(to.poll_write_chunk(cx, &mut self.pending))?;
                let written = (before - self.pending.len()) as u64;
                self.moved += written;
                meter(written);
                continue;
            }
            match from.poll_read_chunk(cx) {
                Poll::Ready(Ok(chunk)) if chunk.is_empty() => {
                    ready!(to.poll_flush(cx))?;
                    self.eof = true;
                }
                Poll::Ready(Ok(chunk)) => self.pending = chunk,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => {
                    // Nothing more to read for now: push out what was written.
                    ready!(to.poll_flush(cx))?;
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies both ways until both directions reach EOF (each EOF is passed on as a shutdown of the
/// other side's write half) or one fails.
pub async fn splice<A, B>(a: &mut A, b: &mut B, meter: &(impl Meter + ?Sized)) -> Transfer
where
    A: ChunkStream + ?Sized,
    B: ChunkStream + ?Sized,
{
    let mut forward = Direction::default();
    let mut backward = Direction::default();
    let result = poll_fn(|cx| {
        let forward_done = forward.poll(cx, &mut *a, &mut *b, |n| meter.forward(n))?;
        let backward_done = backward.poll(cx, &mut *b, &mut *a, |n| meter.backward(n))?;
        if forward_done.is_ready() && backward_done.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    Transfer {
        forward: forward.moved,
        backward: backward.moved,
        error: result.err(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Default)]
    struct Counts(AtomicU64, AtomicU64);

    impl Meter for Counts {
        fn forward(&self, bytes: u64) {
            self.0.fetch_add(bytes, Ordering::Relaxed);
        }
        fn backward(&self, bytes: u64) {
            self.1.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn counts_both_directions_and_carries_half_close() {
        let (mut client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, mut server) = tokio::io::duplex(1024);
        let counts = std::sync::Arc::new(Counts::default());
        let meter = counts.clone();
        let splicing = tokio::spawn(async move {
            let (mut a, mut b) = (Buffered::new(proxy_a), Buffered::new(proxy_b));
            splice(&mut a, &mut b, &*meter).await
        });
        client.write_all(b"hello server").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello server");
        // The meter saw the bytes before the splice ended.
        assert_eq!(counts.0.load(Ordering::Relaxed), 12);
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"bye");
        let transfer = splicing.await.unwrap();
        assert_eq!((transfer.forward, transfer.backward), (12, 3));
        assert_eq!(counts.1.load(Ordering::Relaxed), 3);
        assert!(transfer.error.is_none());
    }

    #[tokio::test]
    async fn buffers_grow_with_the_flow_and_bytes_arrive_intact() {
        let (mut client, proxy_a) = tokio::io::duplex(256 * 1024);
        let (proxy_b, mut server) = tokio::io::duplex(256 * 1024);
        let splicing = tokio::spawn(async move {
            let (mut a, mut b) = (Buffered::new(proxy_a), Buffered::new(proxy_b));
            let transfer = splice(&mut a, &mut b, &()).await;
            (transfer, a.size)
        });
        let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(got == data, "bytes differ after the splice");
        drop(server);
        drop(writer.await.unwrap());
        let (transfer, size) = splicing.await.unwrap();
        assert_eq!(transfer.forward, data.len() as u64);
        assert_eq!(size, JUMBO_BUFFER);
    }
}
