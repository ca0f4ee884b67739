//! An HTTP/2 stream as a byte pipe: `AsyncRead` + `AsyncWrite` over h2's send and receive halves,
//! with flow-control capacity released as the reader consumes data, and a [`ChunkStream`] that
//! hands h2's chunks out and takes the splice's chunks in without copying them.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::copy::ChunkStream;

/// Largest piece of a write handed to h2 at once.
const MAX_WRITE_CHUNK: usize = 64 * 1024;

/// One tunnelled byte stream. Dropping it without shutting down resets the stream (CANCEL).
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Data received but not yet read; its capacity is released as it is read.
    pending: Bytes,
    write_closed: bool,
}

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
        }
    }
}

fn h2_to_io(err: h2::Error) -> io::Error {
    if err.is_io() {
        return err.into_io().expect("checked is_io");
    }
    let kind = match err.reason() {
        Some(Reason::CANCEL) | Some(Reason::STREAM_CLOSED) => io::ErrorKind::ConnectionReset,
        Some(Reason::REFUSED_STREAM) => io::ErrorKind::ConnectionRefused,
        _ => io::ErrorKind::BrokenPipe,
    };
    io::Error::new(kind, err)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                Some(Err(err)) if err.reason() == Some(Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(()))
                }
                Some(Err(err)) => return Poll::Ready(Err(h2_to_io(err))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        // Releasing only what was handed to the reader keeps a slow reader's peer from sending
        // more than the window allows.
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl H2Stream {
    /// Waits until h2 lets `wanted` bytes (or some of them) be sent; returns how many may be.
    fn poll_send_capacity(
        &mut self,
        cx: &mut Context<'_>,
        wanted: usize,
    ) -> Poll<io::Result<usize>> {
        // Each write becomes one owned chunk queued in h2 until sent. Chunks past glibc's mmap
        // threshold (128 KiB) are mapped and unmapped every time, and the page faults cost more
        // than the copy: capping chunks took one HBONE stream from ~0.5-0.7 to ~0.9-1.0 GB/s here.
        let wanted = wanted.min(MAX_WRITE_CHUNK);
        self.send.reserve_capacity(wanted);
        loop {
            let available = self.send.capacity();
            if available > 0 {
                return Poll::Ready(Ok(available.min(wanted)));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Poll::Ready(Err(h2_to_io(err))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed by the peer",
                    )))
                }
            }
        }
    }

    fn shutdown_write(&mut self) -> io::Result<()> {
        if !self.write_closed {
            self.write_closed = true;
            // END_STREAM on an empty DATA frame: the TCP half-close of the tunnelled connection.
            self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Ok(())
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_send_capacity(cx, buf.len()))?;
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 sends queued data as the connection is driven; there is nothing to push here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.shutdown_write())
    }
}

impl ChunkStream for H2Stream {
    fn poll_read_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        if !self.pending.is_empty() {
            // Left over from an `AsyncRead`; its capacity was not released yet.
            let data = std::mem::take(&mut self.pending);
            let _ = self.recv.flow_control().release_capacity(data.len());
            return Poll::Ready(Ok(data));
        }
        match ready!(self.recv.poll_data(cx)) {
            Some(Ok(data)) => {
                // The chunk is the splice's now and it holds one at a time, so the peer may fill
                // the window again while this one is written.
                let _ = self.recv.flow_control().release_capacity(data.len());
                Poll::Ready(Ok(data))
            }
            Some(Err(err)) if err.reason() == Some(Reason::NO_ERROR) => {
                Poll::Ready(Ok(Bytes::new()))
            }
            Some(Err(err)) => Poll::Ready(Err(h2_to_io(err))),
            None => Poll::Ready(Ok(Bytes::new())),
        }
    }

    fn poll_write_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        let n = ready!(self.poll_send_capacity(cx, data.len()))?;
        self.send
            .send_data(data.split_to(n), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(()))
    }

    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.shutdown_write())
    }
}
