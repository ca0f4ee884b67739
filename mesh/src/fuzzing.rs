//! Entry points for the fuzz targets in `fuzz/` and for the tests that replay their corpus
//! (feature `fuzzing`). Each takes the bytes a fuzzer makes up, feeds them to one parser the way
//! the socket, the HTTP/2 stream or the file would, and asserts what must hold for any input: no
//! panic, no descriptor leaked, and what was accepted reads back the same once written out.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Uri};
use http::Method;

use crate::hbone::server::connect_target;
use crate::hbone::ConnectHeaders;
use crate::state::local::LocalConfig;
use crate::zds::client::{decode_request, WorkloadEvent};
use crate::zds::server::{decode_hello, decode_response};
use crate::zds::socket::Packet;
use crate::zds::MAX_MESSAGE_LEN;

/// One received ZDS packet, made up: the first byte says how many descriptors came with it (low
/// two bits) and whether the kernel flagged the data (bit 2) or the descriptors (bit 3) as
/// truncated; the rest is the packet's bytes, cut at the receive buffer's size as the kernel
/// would.
struct FuzzPacket {
    packet: Packet,
    buf: Vec<u8>,
    /// The descriptors' numbers, to check afterwards that each was closed.
    raw: Vec<RawFd>,
}

impl FuzzPacket {
    fn new(data: &[u8]) -> Option<Self> {
        let (&flags, bytes) = data.split_first()?;
        let fds: Vec<OwnedFd> = (0..flags & 0b11)
            .map(|_| {
                std::fs::File::open("/dev/null")
                    .expect("open /dev/null")
                    .into()
            })
            .collect();
        let raw = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let len = bytes.len().min(MAX_MESSAGE_LEN);
        let mut buf = vec![0; MAX_MESSAGE_LEN];
        buf[..len].copy_from_slice(&bytes[..len]);
        let packet = Packet {
            len,
            fds,
            truncated: flags & 0b100 != 0 || bytes.len() > MAX_MESSAGE_LEN,
            control_truncated: flags & 0b1000 != 0,
        };
        Some(FuzzPacket { packet, buf, raw })
    }

    /// Panics if any of the packet's descriptors is still open.
    fn assert_closed(raw: &[RawFd]) {
        for &fd in raw {
            // SAFETY: F_GETFD only reads the descriptor's flags; on a closed number it fails
            // with EBADF and touches nothing.
            let flags = unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) };
            assert_eq!(flags, -1, "descriptor {fd} from a ZDS packet was leaked");
        }
    }
}

/// ztunnel's side: a node agent's request, with descriptors. An `AddWorkload` that is accepted
/// owns exactly one of the packet's descriptors; every other descriptor is closed, whatever the
/// outcome.
pub fn zds_request(data: &[u8]) {
    let Some(FuzzPacket { packet, buf, raw }) = FuzzPacket::new(data) else {
        return;
    };
    let count = packet.fds.len();
    match decode_request(packet, &buf) {
        Ok(WorkloadEvent::Add { netns, .. }) => {
            assert_eq!(count, 1, "AddWorkload accepted with {count} descriptors");
            assert_eq!(netns.as_raw_fd(), raw[0]);
        }
        Ok(_) => assert_eq!(count, 0, "a request other than Add kept descriptors"),
        Err(err) => assert!(!err.to_string().is_empty()),
    }
    FuzzPacket::assert_closed(&raw);
}

/// The node agent's side: ztunnel's hello, then its answer to a request. Neither may carry
/// descriptors; any that come are closed.
pub fn zds_response(data: &[u8]) {
    let Some(FuzzPacket { packet, buf, raw }) = FuzzPacket::new(data) else {
        return;
    };
    if let Ok(version) = decode_hello(&packet, &buf) {
        assert_eq!(version, 1);
        assert!(packet.fds.is_empty());
    }
    if let Ok(Err(reason)) = decode_response(&packet, &buf) {
        assert!(!reason.is_empty(), "an empty reason is an ack");
    }
    drop(packet);
    FuzzPacket::assert_closed(&raw);
}

/// The HBONE server's reading of one CONNECT: lines of method, `:authority`, `forwarded`,
/// `baggage` and `traceparent`. Parts h2 itself would refuse (a method or header value that is
/// not a token or visible text) end the run, as h2 never hands them over.
pub fn hbone_connect(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let Ok(method) = Method::from_bytes(lines.next().unwrap_or_default()) else {
        return;
    };
    let Ok(authority) = Authority::try_from(lines.next().unwrap_or_default()) else {
        return;
    };
    let Ok(uri) = Uri::builder().authority(authority).build() else {
        return;
    };
    let mut headers = HeaderMap::new();
    for name in ["forwarded", "baggage", "traceparent"] {
        let Some(line) = lines.next() else { break };
        let Ok(value) = HeaderValue::from_bytes(line) else {
            return;
        };
        headers.append(HeaderName::from_static(name), value);
    }
    if let Ok(target) = connect_target(&method, &uri) {
        assert_eq!(method, Method::CONNECT);
        assert_eq!(target.to_string().parse(), Ok(target));
    }
    let parsed = ConnectHeaders::from_headers(&headers);
    // What this hop read, the next hop must read the same from what this one sends.
    if let Some(value) = parsed.forwarded_value() {
        let mut sent = HeaderMap::new();
        let value = HeaderValue::from_str(&value).expect("forwarded_value is a valid header");
        sent.insert("forwarded", value);
        let again = ConnectHeaders::from_headers(&sent);
        assert_eq!(again.forwarded_for, parsed.forwarded_for);
        assert_eq!(again.forwarded_host, parsed.forwarded_host);
    }
}

/// The `LOCAL_XDS_PATH` file: parsed and validated as a reload would. A file that is taken also
/// writes out (as the local mesh writes it) to YAML that reads back to the same configuration.
pub fn local_state(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.yaml");
    let Ok(config) = LocalConfig::parse(text, path) else {
        return;
    };
    if config.clone().into_snapshot(path).is_err() {
        return;
    }
    let written = serde_yaml::to_string(&config).expect("a parsed configuration serializes");
    let again = LocalConfig::parse(&written, path).expect("written state parses");
    assert_eq!(
        serde_yaml::to_string(&again).expect("serializes"),
        written,
        "state changed on a write/read round trip"
    );
    again
        .into_snapshot(path)
        .expect("written state validates again");
}

/// Runs `target` on every file in `dir` (a fuzz target's corpus), for `cargo test`. Returns how
/// many inputs ran; panics naming the input that failed.
pub fn replay(dir: &Path, target: fn(&[u8])) -> usize {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .collect();
    entries.sort();
    for path in &entries {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let outcome = std::panic::catch_unwind(|| target(&data));
        assert!(outcome.is_ok(), "corpus input {} failed", path.display());
    }
    entries.len()
}
