//! Typed property reads.
//!
//! `proxy_get_property` returns raw bytes whose encoding depends on the attribute: strings as
//! UTF-8, integers as 8 bytes little-endian (`response.code`, `source.port`), booleans as one
//! byte, timestamps and durations as i64 nanoseconds (Envoy's attribute encoding, which Ambit
//! follows). Paths are lists of segments: `["connection", "uri_san_peer_certificate"]`.

use proxy_wasm::hostcalls;

/// Raw bytes of a property; `None` if the host has no such property (or refuses it).
pub fn get_bytes(path: &[&str]) -> Option<Vec<u8>> {
    hostcalls::get_property(path.to_vec()).ok().flatten()
}

/// A UTF-8 string property (`request.path`, `source.address`, the certificate SANs).
pub fn get_string(path: &[&str]) -> Option<String> {
    get_bytes(path).and_then(|b| String::from_utf8(b).ok())
}

/// An integer property (`response.code`, `request.size`).
pub fn get_i64(path: &[&str]) -> Option<i64> {
    get_bytes(path).and_then(|b| decode_i64(&b))
}

/// A boolean property (`connection.mtls`).
pub fn get_bool(path: &[&str]) -> Option<bool> {
    get_bytes(path).and_then(|b| decode_bool(&b))
}

/// Envoy's integer encoding: exactly 8 bytes, little-endian.
pub fn decode_i64(bytes: &[u8]) -> Option<i64> {
    Some(i64::from_le_bytes(bytes.try_into().ok()?))
}

/// Envoy's boolean encoding: one byte, non-zero is true.
pub fn decode_bool(bytes: &[u8]) -> Option<bool> {
    match bytes {
        [b] => Some(*b != 0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_envoy_encodings() {
        assert_eq!(decode_i64(&200i64.to_le_bytes()), Some(200));
        assert_eq!(decode_i64(&(-5i64).to_le_bytes()), Some(-5));
        assert_eq!(decode_i64(b"200"), None);
        assert_eq!(decode_bool(&[1]), Some(true));
        assert_eq!(decode_bool(&[0]), Some(false));
        assert_eq!(decode_bool(b"true"), None);
    }
}
