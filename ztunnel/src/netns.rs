//! A pod's network namespace, held open by its fd, and a thread that lives inside it to create
//! sockets there.
//!
//! Sockets keep the namespace they were created in, so ztunnel can listen and connect "as the pod"
//! from its own process. Switching namespaces is per thread: one thread per pod enters the pod's
//! namespace once and stays, so the async runtime's threads never change namespace.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// `ioctl(NS_GET_NSTYPE)`: `_IO(0xb7, 0x3)` in linux/nsfs.h.
const NS_GET_NSTYPE: u64 = 0xb703;

/// Listen queue of the per-pod listeners (tokio's default; the kernel caps it at somaxconn).
const LISTEN_BACKLOG: i32 = 1024;

/// Ambit's packet mark (Istio's 0x539): the in-pod rules let marked packets through unredirected.
pub const PROXY_MARK: u32 = 0x539;

/// Why a namespace could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("the fd handed over is not a network namespace: {0}")]
    NotANetns(String),
    #[error("cannot enter the pod's network namespace: {0}")]
    Enter(nix::Error),
    #[error("the pod's namespace thread is gone")]
    ThreadGone,
    #[error("cannot start the pod's namespace thread: {0}")]
    Spawn(io::Error),
}

type Job = Box<dyn FnOnce() + Send>;

/// An open pod network namespace with its socket thread.
pub struct PodNetns {
    fd: OwnedFd,
    inode: u64,
    jobs: mpsc::Sender<Job>,
}

impl PodNetns {
    /// Takes ownership of a netns fd (from ZDS or `/var/run/netns/<name>`) and starts its thread.
    pub fn new(fd: OwnedFd) -> Result<Self, NetnsError> {
        let stat =
            nix::sys::stat::fstat(fd.as_fd()).map_err(|e| NetnsError::NotANetns(e.to_string()))?;
        // Anything but a network namespace (a regular file, a socket, another namespace type)
        // would make setns fail later, less clearly.
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the fd's namespace type.
        let ns_type = unsafe { nix::libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
        if ns_type != nix::libc::CLONE_NEWNET {
            return Err(NetnsError::NotANetns(format!(
                "fd {} (inode {}) is not a network namespace",
                fd.as_raw_fd(),
                stat.st_ino
            )));
        }
        let thread_fd = fd.try_clone().map_err(NetnsError::Spawn)?;
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (entered, entered_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("netns-{}", stat.st_ino))
            .spawn(move || {
                let result = nix::sched::setns(&thread_fd, nix::sched::CloneFlags::CLONE_NEWNET);
                let ok = result.is_ok();
                let _ = entered.send(result);
                if ok {
                    for job in inbox {
                        job();
                    }
                }
            })
            .map_err(NetnsError::Spawn)?;
        entered_rx
            .recv()
            .map_err(|_| NetnsError::ThreadGone)?
            .map_err(NetnsError::Enter)?;
        Ok(PodNetns {
            fd,
            inode: stat.st_ino,
            jobs,
        })
    }

    /// The namespace's inode: the same namespace handed over twice has the same one.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Runs `f` on the thread inside the namespace.
    pub async fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::ThreadGone)?;
        rx.await.map_err(|_| NetnsError::ThreadGone)
    }

    /// A listener inside the namespace: marked, `SO_REUSEPORT` so an upgraded ztunnel can bind
    /// beside the old one, non-blocking for Tokio.
    pub async fn listen(&self, address: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let std_listener = self
            .run(move || -> io::Result<std::net::TcpListener> {
                let socket = Socket::new(
                    Domain::for_address(address),
                    Type::STREAM,
                    Some(Protocol::TCP),
                )?;
                socket.set_mark(PROXY_MARK)?;
                socket.set_reuse_address(true)?;
                socket.set_reuse_port(true)?;
                socket.set_nonblocking(true)?;
                socket.bind(&SockAddr::from(address))?;
                // A burst of connects from the app must not overflow the queue: each dropped SYN
                // costs the client a one-second retransmit.
                socket.listen(LISTEN_BACKLOG)?;
                Ok(socket.into())
            })
            .await
            .map_err(io::Error::other)??;
        tokio::net::TcpListener::from_std(std_listener)
    }

    /// A UDP socket bound inside the namespace (the DNS proxy's), marked like the listeners so its
    /// replies count as ztunnel's own packets in the pod's rules, `SO_REUSEPORT` for the same
    /// upgrade overlap, non-blocking for Tokio.
    pub async fn bind_udp(&self, address: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
        let std_socket = self
            .run(move || -> io::Result<std::net::UdpSocket> {
                let socket = Socket::new(
                    Domain::for_address(address),
                    Type::DGRAM,
                    Some(Protocol::UDP),
                )?;
                socket.set_mark(PROXY_MARK)?;
                socket.set_reuse_address(true)?;
                socket.set_reuse_port(true)?;
                socket.set_nonblocking(true)?;
                socket.bind(&SockAddr::from(address))?;
                Ok(socket.into())
            })
            .await
            .map_err(io::Error::other)??;
        tokio::net::UdpSocket::from_std(std_socket)
    }

    /// A TCP connection from inside the namespace, marked so the pod's rules do not capture it.
    pub async fn connect(&self, address: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        self.connect_from(None, address).await
    }

    /// Like [`connect`](Self::connect), with `source` as the source address (`IP_TRANSPARENT`):
    /// inbound connections reach the app from the original client's address, as Istio does. The
    /// in-pod rules route the app's replies back to ztunnel (mark 0x539 → connmark 0x111 →
    /// table 100). Where spoofing is refused, the connection goes out from the pod's own address.
    pub async fn connect_from(
        &self,
        source: Option<IpAddr>,
        address: SocketAddr,
    ) -> io::Result<tokio::net::TcpStream> {
        let std_socket = self
            .run(move || -> io::Result<std::net::TcpStream> {
                let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
                socket.set_mark(PROXY_MARK)?;
                socket.set_nonblocking(true)?;
                socket.set_tcp_nodelay(true)?;
                if let Some(source) = source.filter(|s| s.is_ipv4() == address.is_ipv4()) {
                    let spoofed = if source.is_ipv4() {
                        socket.set_ip_transparent_v4(true)
                    } else {
                        socket.set_ip_transparent_v6(true)
                    }
                    .and_then(|()| bind_address_no_port(&socket))
                    .and_then(|()| socket.bind(&SockAddr::from(SocketAddr::new(source, 0))));
                    if let Err(err) = spoofed {
                        tracing::debug!(%source, error = %err, "cannot keep the client's source address; using the pod's");
                    }
                }
                Ok(socket.into())
            })
            .await
            .map_err(io::Error::other)??;
        tokio::net::TcpSocket::from_std_stream(std_socket)
            .connect(address)
            .await
    }
}

/// `IP_BIND_ADDRESS_NO_PORT`: bind the address now, pick the port at `connect`. Without it,
/// `bind(ip, 0)` must find a port free for every destination, and with thousands of TIME_WAIT
/// sockets on the client's address the search made inbound connects ~25x slower in the ztunnel
/// bench.
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let enable: nix::libc::c_int = 1;
    // SAFETY: a plain int option on a socket we own, with its exact size.
    let result = unsafe {
        nix::libc::setsockopt(
            socket.as_raw_fd(),
            nix::libc::IPPROTO_IP,
            nix::libc::IP_BIND_ADDRESS_NO_PORT,
            (&enable as *const nix::libc::c_int).cast(),
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The original destination of a REDIRECTed connection (`SO_ORIGINAL_DST`).
pub fn original_destination(stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let local = stream.local_addr()?;
    let original = if local.is_ipv4() {
        socket.original_dst_v4()?
    } else {
        socket.original_dst_v6()?
    };
    original
        .as_socket()
        .ok_or_else(|| io::Error::other("SO_ORIGINAL_DST returned a non-IP address"))
}
