//! Async `SOCK_SEQPACKET` Unix sockets carrying file descriptors: the transport under ZDS.
//!
//! Neither std nor tokio speaks `SOCK_SEQPACKET`, so the sockets are made with nix, kept
//! nonblocking, and driven through [`AsyncFd`]. Every packet is one whole message: a send either
//! goes out complete or fails, and a receive returns at most one packet.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr,
};
use tokio::io::unix::AsyncFd;

/// Linux's `SCM_MAX_FD`: the most descriptors one packet can carry.
const SCM_MAX_FD: usize = 253;

/// One received packet. Descriptors are owned, so whatever the caller does not keep is closed.
pub(crate) struct Packet {
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// The packet was longer than the buffer; the kernel discarded the rest.
    pub truncated: bool,
    /// Ancillary data did not fit; some descriptors may have been dropped by the kernel.
    pub control_truncated: bool,
}

pub(crate) struct SeqPacket {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacket {
    fn new(fd: OwnedFd) -> io::Result<Self> {
        Ok(SeqPacket { fd: register(fd)? })
    }

    pub(crate) fn connect(path: &Path) -> io::Result<Self> {
        let fd = new_socket()?;
        let addr = UnixAddr::new(path)?;
        // A nonblocking connect to a Unix socket completes at once or fails (EAGAIN when the
        // listener's backlog is full); it never leaves a connection half-open.
        socket::connect(fd.as_raw_fd(), &addr)?;
        Self::new(fd)
    }

    /// Sends `data` as one packet, with `fds` attached as `SCM_RIGHTS` when non-empty.
    pub(crate) async fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| send_once(fd.as_raw_fd(), data, &raw)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one packet into `buf`. Cancel-safe: nothing is consumed until a packet is read.
    pub(crate) async fn recv(&self, buf: &mut [u8]) -> io::Result<Packet> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv_once(fd.as_raw_fd(), buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

pub(crate) struct SeqPacketListener {
    fd: AsyncFd<OwnedFd>,
}

impl SeqPacketListener {
    pub(crate) fn bind(path: &Path) -> io::Result<Self> {
        let fd = new_socket()?;
        let addr = UnixAddr::new(path)?;
        socket::bind(fd.as_raw_fd(), &addr)?;
        socket::listen(&fd, Backlog::new(128)?)?;
        Ok(SeqPacketListener { fd: register(fd)? })
    }

    pub(crate) async fn accept(&self) -> io::Result<SeqPacket> {
        loop {
            let mut guard = self.fd.readable().await?;
            let accepted = guard.try_io(|fd| {
                let raw = socket::accept4(
                    fd.as_raw_fd(),
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                )?;
                // SAFETY: accept4 just returned this descriptor; nothing else owns it.
                Ok(unsafe { OwnedFd::from_raw_fd(raw) })
            });
            match accepted {
                Ok(result) => return SeqPacket::new(result?),
                Err(_would_block) => continue,
            }
        }
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which never hands it out mutably or gives
    // it back, so the descriptor stays open and unchanged until the `AsyncFd` is dropped.
    Ok(unsafe { AsyncFd::register(fd) }?)
}

fn new_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn send_once(fd: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let iov = [IoSlice::new(data)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    // MSG_NOSIGNAL: a peer that went away must surface as EPIPE, not kill the process.
    let sent = socket::sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    if sent != data.len() {
        // Cannot happen on SOCK_SEQPACKET (sends are atomic), but a silent short packet would be
        // decoded as a different message by the peer.
        return Err(io::Error::other(format!(
            "short send on a SOCK_SEQPACKET socket: {sent} of {} bytes",
            data.len()
        )));
    }
    Ok(())
}

fn recv_once(fd: RawFd, buf: &mut [u8]) -> io::Result<Packet> {
    // Room for the kernel's maximum descriptor count (plus credentials, in case a peer enables
    // SO_PASSCRED), so a hostile sender cannot make the kernel truncate the ancillary data: nix
    // refuses to parse truncated control data, and descriptors installed before the cut would
    // then leak.
    let mut cmsg_buf = nix::cmsg_space!([RawFd; SCM_MAX_FD], nix::libc::ucred);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg_buf),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let control_truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    let mut fds = Vec::new();
    if !control_truncated {
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: SCM_RIGHTS descriptors are freshly installed in this process by the
                // kernel for this receive; nothing else refers to them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
    }
    Ok(Packet {
        len: msg.bytes,
        fds,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        control_truncated,
    })
}
