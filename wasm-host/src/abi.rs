//! The proxy-wasm ABI's vocabulary (0.2.0 and 0.2.1): status codes, enums, version detection and
//! the serialized header-map ("pairs") format, with cpp-host's limits on what a guest may hand
//! the host.

use wasmtime::{ExternType, Module};

/// `proxy_status_t`: what every host function returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    InvalidMemoryAccess = 6,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
    Unimplemented = 12,
}

/// `proxy_map_type_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapType {
    RequestHeaders,
    RequestTrailers,
    ResponseHeaders,
    ResponseTrailers,
    GrpcInitialMetadata,
    GrpcTrailingMetadata,
    HttpCallResponseHeaders,
    HttpCallResponseTrailers,
}

impl MapType {
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => MapType::RequestHeaders,
            1 => MapType::RequestTrailers,
            2 => MapType::ResponseHeaders,
            3 => MapType::ResponseTrailers,
            4 => MapType::GrpcInitialMetadata,
            5 => MapType::GrpcTrailingMetadata,
            6 => MapType::HttpCallResponseHeaders,
            7 => MapType::HttpCallResponseTrailers,
            _ => return None,
        })
    }
}

/// `proxy_buffer_type_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufferType {
    RequestBody,
    ResponseBody,
    DownstreamData,
    UpstreamData,
    HttpCallResponseBody,
    GrpcReceiveBuffer,
    VmConfiguration,
    PluginConfiguration,
    CallData,
}

impl BufferType {
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => BufferType::RequestBody,
            1 => BufferType::ResponseBody,
            2 => BufferType::DownstreamData,
            3 => BufferType::UpstreamData,
            4 => BufferType::HttpCallResponseBody,
            5 => BufferType::GrpcReceiveBuffer,
            6 => BufferType::VmConfiguration,
            7 => BufferType::PluginConfiguration,
            8 => BufferType::CallData,
            _ => return None,
        })
    }
}

/// `proxy_stream_type_t` (`proxy_continue_stream`, `proxy_close_stream`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamType {
    Request,
    Response,
    Downstream,
    Upstream,
}

impl StreamType {
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => StreamType::Request,
            1 => StreamType::Response,
            2 => StreamType::Downstream,
            3 => StreamType::Upstream,
            _ => return None,
        })
    }
}

/// `proxy_metric_type_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

impl MetricType {
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => MetricType::Counter,
            1 => MetricType::Gauge,
            2 => MetricType::Histogram,
            _ => return None,
        })
    }
}

/// `proxy_log_level_t`, mapped onto `tracing` levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    pub fn from_raw(raw: i32) -> Option<Self> {
        Some(match raw {
            0 => LogLevel::Trace,
            1 => LogLevel::Debug,
            2 => LogLevel::Info,
            3 => LogLevel::Warn,
            4 => LogLevel::Error,
            5 => LogLevel::Critical,
            _ => return None,
        })
    }
}

/// What a stream callback asked for. Envoy reads any non-zero value as a kind of "stop", so
/// values above 1 pause too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

impl Action {
    pub fn from_raw(raw: i32) -> Self {
        if raw == 0 {
            Action::Continue
        } else {
            Action::Pause
        }
    }
}

/// The ABI a module was built against, from its `proxy_abi_version_*` export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbiVersion {
    V0_2_0,
    V0_2_1,
}

/// Why a module's ABI cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AbiError {
    #[error("the module targets proxy-wasm ABI 0.1.0, which this host does not run; rebuild it with a current SDK (ABI 0.2.1)")]
    Unsupported010,
    #[error("the module exports no proxy_abi_version_* function: it is not a proxy-wasm filter")]
    NotProxyWasm,
}

impl AbiVersion {
    /// Reads the version marker the way cpp-host does: the first exported function named
    /// exactly after a known version wins.
    pub fn detect(module: &Module) -> Result<Self, AbiError> {
        for export in module.exports() {
            if !matches!(export.ty(), ExternType::Func(_)) {
                continue;
            }
            match export.name() {
                "proxy_abi_version_0_2_1" => return Ok(AbiVersion::V0_2_1),
                "proxy_abi_version_0_2_0" => return Ok(AbiVersion::V0_2_0),
                "proxy_abi_version_0_1_0" => return Err(AbiError::Unsupported010),
                _ => {}
            }
        }
        Err(AbiError::NotProxyWasm)
    }
}

/// A header (or metadata) map as the ABI sees it: ordered, with repeats, pseudo-headers first.
pub type Pairs = Vec<(String, Vec<u8>)>;

/// cpp-host's bounds on a serialized map handed over by a guest.
pub const MAX_PAIRS_BYTES: usize = 1024 * 1024;
pub const MAX_PAIRS_COUNT: usize = 1024;

/// Serializes a map: `count`, then `(key_len, value_len)` per pair, then each key and value
/// followed by a NUL; integers are u32 little-endian, lengths exclude the NUL.
pub fn encode_pairs<'a>(pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])> + Clone) -> Vec<u8> {
    let items: Vec<(&[u8], &[u8])> = pairs.into_iter().collect();
    if items.is_empty() {
        return Vec::new();
    }
    let size = 4 + items
        .iter()
        .map(|(k, v)| 8 + k.len() + 1 + v.len() + 1)
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for (k, v) in &items {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in &items {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses a serialized map from a guest, refusing anything that does not add up exactly: a count
/// larger than the buffer can hold, missing NULs, trailing bytes, or a map past cpp-host's size
/// limits. Keys must be UTF-8 (header names are ASCII).
pub fn decode_pairs(bytes: &[u8]) -> Result<Pairs, Status> {
    if bytes.is_empty() || bytes == [0] {
        return Ok(Vec::new());
    }
    if bytes.len() > MAX_PAIRS_BYTES || bytes.len() < 4 {
        return Err(Status::BadArgument);
    }
    let word = |at: usize| -> Result<usize, Status> {
        let raw = bytes.get(at..at + 4).ok_or(Status::BadArgument)?;
        Ok(u32::from_le_bytes(raw.try_into().expect("4 bytes")) as usize)
    };
    let count = word(0)?;
    // Each pair takes at least 10 bytes (two lengths and two NULs): a count that cannot fit is a
    // lie, caught before anything is allocated for it.
    if count > MAX_PAIRS_COUNT || count.saturating_mul(10) > bytes.len() - 4 {
        return Err(Status::BadArgument);
    }
    let mut sizes = Vec::with_capacity(count);
    for i in 0..count {
        sizes.push((word(4 + i * 8)?, word(8 + i * 8)?));
    }
    let mut at = 4 + count * 8;
    let mut take = |len: usize| -> Result<&[u8], Status> {
        let end = at.checked_add(len).ok_or(Status::BadArgument)?;
        let slice = bytes.get(at..end).ok_or(Status::BadArgument)?;
        if bytes.get(end) != Some(&0) {
            return Err(Status::BadArgument);
        }
        at = end + 1;
        Ok(slice)
    };
    let mut pairs = Vec::with_capacity(count);
    for (key_len, value_len) in sizes {
        let key = std::str::from_utf8(take(key_len)?)
            .map_err(|_| Status::BadArgument)?
            .to_owned();
        let value = take(value_len)?.to_vec();
        pairs.push((key, value));
    }
    if at != bytes.len() {
        return Err(Status::BadArgument);
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_with_the_spec_layout() {
        let encoded = encode_pairs([(&b"a"[..], &b"1"[..]), (&b"bb"[..], &b""[..])]);
        assert_eq!(
            encoded,
            [
                2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, b'a', 0, b'1', 0, b'b',
                b'b', 0, 0
            ]
        );
        let decoded = decode_pairs(&encoded).unwrap();
        assert_eq!(
            decoded,
            vec![("a".to_owned(), b"1".to_vec()), ("bb".to_owned(), vec![])]
        );
        assert!(decode_pairs(&[]).unwrap().is_empty());
        assert!(decode_pairs(&[0]).unwrap().is_empty());
    }

    #[test]
    fn lying_or_malformed_maps_are_refused() {
        let good = encode_pairs([(&b"key"[..], &b"value"[..])]);
        let mut lying_count = good.clone();
        lying_count[0] = 200;
        assert_eq!(decode_pairs(&lying_count), Err(Status::BadArgument));
        let mut huge_count = good.clone();
        huge_count[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_pairs(&huge_count), Err(Status::BadArgument));
        let mut long_key = good.clone();
        long_key[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(decode_pairs(&long_key), Err(Status::BadArgument));
        let mut no_nul = good.clone();
        let nul = 4 + 8 + 3;
        no_nul[nul] = b'x';
        assert_eq!(decode_pairs(&no_nul), Err(Status::BadArgument));
        let mut trailing = good;
        trailing.push(7);
        assert_eq!(decode_pairs(&trailing), Err(Status::BadArgument));
        assert_eq!(decode_pairs(&[1, 0]), Err(Status::BadArgument));
    }
}
