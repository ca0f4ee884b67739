//! Compact JWS tokens (RFC 7515/7519): parsing, signature check, registered claims.
//!
//! Pure Rust and host-free, so every rule is unit-tested natively: the header must name RS256
//! or ES256 (never `none`, never a MAC: a public key is not a secret), the signature must
//! verify with a configured key (the one whose `kid` matches, or any key of the algorithm when
//! the token has no `kid`), then `exp`, `nbf`, `iss` and `aud` are checked with a clock skew.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Verifier;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::jwks::{Algorithm, Key, KeyMaterial};

/// Why a token was refused. The messages go to the client in `error_description`, so they
/// say what is wrong without echoing token contents.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JwtError {
    #[error("token is not a JWS compact serialization: {0}")]
    Malformed(&'static str),
    #[error("credentials are not a Bearer token")]
    NotBearer,
    #[error("token algorithm {0} is not accepted (RS256, ES256)")]
    UnsupportedAlgorithm(String),
    #[error("no configured key matches the token")]
    UnknownKey,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token has no exp claim")]
    MissingExpiry,
    #[error("token claim {0} has the wrong type")]
    BadClaim(&'static str),
    #[error("token issuer is not accepted")]
    WrongIssuer,
    #[error("token audience is not accepted")]
    WrongAudience,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// A parsed, not yet verified token.
#[derive(Debug)]
pub struct Token<'a> {
    pub algorithm: Algorithm,
    pub kid: Option<String>,
    pub claims: Map<String, Value>,
    /// `header.payload`, what the signature covers.
    signing_input: &'a str,
    signature: Vec<u8>,
}

/// The claim rules from configuration.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// Accepted `iss` values; empty accepts any.
    pub issuers: Vec<String>,
    /// Accepted audiences; empty accepts any. A token's `aud` (string or list) must hold one.
    pub audiences: Vec<String>,
    /// Leeway for `exp` and `nbf`, in seconds.
    pub clock_skew_secs: u64,
    /// Refuse tokens without `exp`.
    pub require_exp: bool,
}

impl<'a> Token<'a> {
    /// Splits and decodes a compact token.
    pub fn parse(token: &'a str) -> Result<Self, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed("expected three dot-separated parts"));
        };
        let header: Header = serde_json::from_slice(&decode(h)?)
            .map_err(|_| JwtError::Malformed("header is not a JSON object with alg"))?;
        let algorithm = Algorithm::from_name(&header.alg)
            .ok_or_else(|| JwtError::UnsupportedAlgorithm(sanitize(&header.alg)))?;
        let claims: Map<String, Value> = serde_json::from_slice(&decode(p)?)
            .map_err(|_| JwtError::Malformed("payload is not a JSON object"))?;
        Ok(Self {
            algorithm,
            kid: header.kid,
            claims,
            signing_input: &token[..h.len() + 1 + p.len()],
            signature: decode(s)?,
        })
    }

    /// Checks the signature against the keys.
    pub fn verify_signature(&self, keys: &[Key]) -> Result<(), JwtError> {
        let mut candidates = keys.iter().filter(|k| {
            k.algorithm() == self.algorithm
                && match (&self.kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    // A token without kid may use any key of its algorithm; a token with a kid
                    // may use a key published without one.
                    _ => true,
                }
        });
        let mut tried = false;
        let message = self.signing_input.as_bytes();
        for key in candidates.by_ref() {
            tried = true;
            let ok = match &key.material {
                KeyMaterial::Rsa(vk) => {
                    rsa::pkcs1v15::Signature::try_from(self.signature.as_slice())
                        .map(|sig| vk.verify(message, &sig).is_ok())
                        .unwrap_or(false)
                }
                KeyMaterial::Ec(vk) => p256::ecdsa::Signature::from_slice(&self.signature)
                    .map(|sig| vk.verify(message, &sig).is_ok())
                    .unwrap_or(false),
            };
            if ok {
                return Ok(());
            }
        }
        Err(if tried {
            JwtError::BadSignature
        } else {
            JwtError::UnknownKey
        })
    }

    /// Checks `exp`, `nbf`, `iss`, `aud` at `now` (seconds since the epoch).
    pub fn validate_claims(&self, rules: &Rules, now: u64) -> Result<(), JwtError> {
        let now = now as f64;
        let skew = rules.clock_skew_secs as f64;
        match self.number("exp")? {
            Some(exp) if now >= exp + skew => return Err(JwtError::Expired),
            None if rules.require_exp => return Err(JwtError::MissingExpiry),
            _ => {}
        }
        if let Some(nbf) = self.number("nbf")? {
            if now + skew < nbf {
                return Err(JwtError::NotYetValid);
            }
        }
        if !rules.issuers.is_empty() {
            let iss = self.claims.get("iss").and_then(Value::as_str);
            if !iss.is_some_and(|iss| rules.issuers.iter().any(|i| i == iss)) {
                return Err(JwtError::WrongIssuer);
            }
        }
        if !rules.audiences.is_empty() {
            let accepted = |a: &str| rules.audiences.iter().any(|want| want == a);
            let ok = match self.claims.get("aud") {
                Some(Value::String(a)) => accepted(a),
                Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).any(accepted),
                _ => false,
            };
            if !ok {
                return Err(JwtError::WrongAudience);
            }
        }
        Ok(())
    }

    /// A NumericDate claim (may be fractional).
    fn number(&self, name: &'static str) -> Result<Option<f64>, JwtError> {
        match self.claims.get(name) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or(JwtError::BadClaim(name)),
        }
    }
}

/// Parses, verifies and validates a token: the claims when it is good.
pub fn verify(
    token: &str,
    keys: &[Key],
    rules: &Rules,
    now: u64,
) -> Result<Map<String, Value>, JwtError> {
    let token = Token::parse(token)?;
    token.verify_signature(keys)?;
    token.validate_claims(rules, now)?;
    Ok(token.claims)
}

fn decode(part: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed("a part is not unpadded base64url"))
}

/// Keeps attacker-chosen text short and free of quotes before it reaches a response header.
fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(16)
        .collect()
}
