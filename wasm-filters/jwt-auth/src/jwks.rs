//! JSON Web Key Sets (RFC 7517): the public keys tokens are checked against.
//!
//! Only signature keys this filter can use are kept: `kty: RSA` (`n`, `e`; at least 2048 bits)
//! for RS256 and `kty: EC`, `crv: P-256` (`x`, `y`) for ES256. Keys marked for another use
//! (`use` other than `sig`) or another algorithm are skipped; a set left with no usable key is
//! an error, so a typo in the configuration fails `on_configure` instead of every request.

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use p256::ecdsa::VerifyingKey as EcKey;
use rsa::pkcs1v15::VerifyingKey as RsaVerifyingKey;
use rsa::traits::PublicKeyParts;
use rsa::{BigUint, RsaPublicKey};
use serde::Deserialize;
use sha2::Sha256;

/// Smallest RSA modulus accepted (NIST SP 800-131A).
pub const MIN_RSA_BITS: usize = 2048;

/// JWK members are base64url without padding, but some issuers pad: accept both.
const JWK_B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The signature algorithms this filter verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    RS256,
    ES256,
}

impl Algorithm {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "RS256" => Some(Algorithm::RS256),
            "ES256" => Some(Algorithm::ES256),
            _ => None,
        }
    }
}

/// The verifying half of a key.
#[derive(Clone, Debug)]
pub enum KeyMaterial {
    Rsa(RsaVerifyingKey<Sha256>),
    Ec(EcKey),
}

/// One usable key.
#[derive(Clone, Debug)]
pub struct Key {
    pub kid: Option<String>,
    pub material: KeyMaterial,
}

impl Key {
    /// The algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        match self.material {
            KeyMaterial::Rsa(_) => Algorithm::RS256,
            KeyMaterial::Ec(_) => Algorithm::ES256,
        }
    }
}

/// Why a key set was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwksError {
    #[error("jwks is not a JSON Web Key Set: {0}")]
    Json(String),
    #[error("jwks key {index}: {reason}")]
    BadKey { index: usize, reason: String },
    #[error("jwks has no RS256 or ES256 signature key")]
    NoUsableKey,
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
struct RawKey {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

/// Parses a JWKS document (`{"keys": [...]}`) into usable keys.
pub fn parse_jwks(json: &str) -> Result<Vec<Key>, JwksError> {
    let set: RawSet = serde_json::from_str(json).map_err(|e| JwksError::Json(e.to_string()))?;
    let mut keys = Vec::new();
    for (index, raw) in set.keys.iter().enumerate() {
        if raw.use_.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let bad = |reason: &str| JwksError::BadKey {
            index,
            reason: reason.to_string(),
        };
        let material = match (raw.kty.as_str(), raw.alg.as_deref()) {
            ("RSA", None | Some("RS256")) => {
                let n = decode_member(raw.n.as_deref())
                    .ok_or_else(|| bad("RSA key needs base64url n"))?;
                let e = decode_member(raw.e.as_deref())
                    .ok_or_else(|| bad("RSA key needs base64url e"))?;
                let key = RsaPublicKey::new(BigUint::from_bytes_be(&n), BigUint::from_bytes_be(&e))
                    .map_err(|err| bad(&format!("RSA key rejected: {err}")))?;
                if key.size() * 8 < MIN_RSA_BITS {
                    return Err(bad(&format!("RSA key shorter than {MIN_RSA_BITS} bits")));
                }
                KeyMaterial::Rsa(RsaVerifyingKey::new(key))
            }
            ("EC", None | Some("ES256")) => {
                if raw.crv.as_deref() != Some("P-256") {
                    // Another curve (P-384, P-521): not for ES256, skip like another alg.
                    continue;
                }
                let x = decode_member(raw.x.as_deref())
                    .ok_or_else(|| bad("EC key needs base64url x"))?;
                let y = decode_member(raw.y.as_deref())
                    .ok_or_else(|| bad("EC key needs base64url y"))?;
                if x.len() != 32 || y.len() != 32 {
                    return Err(bad("P-256 coordinates must be 32 bytes"));
                }
                // SEC1 uncompressed point: 0x04 || x || y.
                let mut point = Vec::with_capacity(65);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                let key =
                    EcKey::from_sec1_bytes(&point).map_err(|_| bad("EC point is not on P-256"))?;
                KeyMaterial::Ec(key)
            }
            // Other key types (oct, OKP) and algorithms (RS384, PS256, ...) are not supported.
            _ => continue,
        };
        keys.push(Key {
            kid: raw.kid.clone(),
            material,
        });
    }
    if keys.is_empty() {
        return Err(JwksError::NoUsableKey);
    }
    Ok(keys)
}

fn decode_member(value: Option<&str>) -> Option<Vec<u8>> {
    JWK_B64.decode(value?).ok().filter(|b| !b.is_empty())
}
