//! The jwt-auth filter's `.wasm` in Ambit's Wasm host: tokens signed here (RS256 with the test key
//! in `testdata/`, ES256 with a fixed P-256 scalar) against the host's real clock.

use std::time::{SystemTime, UNIX_EPOCH};

use ambit_filter_test::{Filter, Outcome};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use serde_json::{json, Value};

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn rsa_key() -> rsa::RsaPrivateKey {
    rsa::RsaPrivateKey::from_pkcs8_pem(include_str!("../testdata/rsa-test-key.pem")).unwrap()
}

fn ec_key() -> p256::ecdsa::SigningKey {
    p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).unwrap()
}

fn jwks() -> Value {
    let public = rsa_key().to_public_key();
    let point = ec_key().verifying_key().to_encoded_point(false);
    json!({"keys": [
        {"kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
         "n": b64(&public.n().to_bytes_be()), "e": b64(&public.e().to_bytes_be())},
        {"kty": "EC", "kid": "ec-1", "crv": "P-256",
         "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())}
    ]})
}

fn sign(alg: &str, kid: &str, claims: &Value) -> String {
    let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = match alg {
        "RS256" => rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(rsa_key())
            .sign(input.as_bytes())
            .to_vec(),
        _ => {
            let sig: p256::ecdsa::Signature = ec_key().sign(input.as_bytes());
            sig.to_bytes().to_vec()
        }
    };
    format!("{input}.{}", b64(&signature))
}

fn claims(extra: Value) -> Value {
    let mut claims = json!({"iss": "https://issuer.example", "aud": ["orders"], "sub": "alice",
                            "org": {"id": 42}, "exp": now() + 300, "nbf": now() - 10});
    claims
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    claims
}

fn filter(extra: Value) -> Filter {
    let mut config = json!({
        "issuers": ["https://issuer.example"],
        "audiences": ["orders"],
        // Istio's RequestAuthentication gives the key set as a string.
        "jwks": jwks().to_string(),
        "claim_to_headers": [{"claim": "sub", "header": "x-jwt-sub"},
                             {"claim": "org.id", "header": "x-jwt-org"}],
    });
    config
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Filter::package("ambit-filter-jwt-auth")
        .config_json(&config)
        .load()
        .unwrap()
}

fn with_token(filter: &Filter, token: &str) -> Outcome {
    filter
        .request()
        .path("/orders")
        .header("authorization", &format!("Bearer {token}"))
        .header("x-jwt-sub", "forged")
        .run()
}

fn assert_unauthorized(outcome: &Outcome, description: &str) {
    assert_eq!(outcome.status(), 401, "{outcome}");
    assert!(outcome.upstream.is_none(), "{outcome}");
    let challenge = outcome.header("www-authenticate").unwrap();
    assert_eq!(
        challenge,
        format!(
            "Bearer realm=\"ambit\", error=\"invalid_token\", error_description=\"{description}\""
        )
    );
    let body = outcome.response.json();
    assert_eq!(body["status"], 401, "{outcome}");
    assert_eq!(body["error"], "unauthorized");
    assert_eq!(body["message"], description);
    assert_eq!(outcome.header("content-type"), Some("application/json"));
}

#[test]
fn valid_rs256_and_es256_tokens_pass_with_claims_forwarded() {
    let filter = filter(json!({}));
    for (alg, kid) in [("RS256", "rsa-1"), ("ES256", "ec-1")] {
        let token = sign(alg, kid, &claims(json!({})));
        let outcome = with_token(&filter, &token);
        assert!(outcome.passed(), "{alg}: {outcome}");
        // The forged header is replaced by the verified claim.
        let upstream = outcome.upstream.as_ref().unwrap();
        assert_eq!(
            upstream.headers.get_all("x-jwt-sub"),
            vec!["alice"],
            "{alg}"
        );
        assert_eq!(upstream.headers.get("x-jwt-org"), Some("42"));
        assert_eq!(
            upstream.headers.get("authorization"),
            Some(format!("Bearer {token}").as_str())
        );
    }
}

#[test]
fn forward_false_strips_the_token() {
    let filter = filter(json!({"forward": false}));
    let outcome = with_token(&filter, &sign("ES256", "ec-1", &claims(json!({}))));
    assert!(outcome.passed(), "{outcome}");
    assert_eq!(outcome.upstream_header("authorization"), None);
    assert_eq!(outcome.upstream_header("x-jwt-sub"), Some("alice"));
}

#[test]
fn expired_wrong_issuer_wrong_audience_and_bad_signature_get_401() {
    let filter = filter(json!({}));
    let expired = sign("RS256", "rsa-1", &claims(json!({"exp": now() - 120})));
    assert_unauthorized(&with_token(&filter, &expired), "token has expired");
    let issuer = sign(
        "ES256",
        "ec-1",
        &claims(json!({"iss": "https://evil.example"})),
    );
    assert_unauthorized(
        &with_token(&filter, &issuer),
        "token issuer is not accepted",
    );
    let audience = sign("RS256", "rsa-1", &claims(json!({"aud": "payments"})));
    assert_unauthorized(
        &with_token(&filter, &audience),
        "token audience is not accepted",
    );
    // A valid signature over other claims: swap the payload.
    let good = sign("RS256", "rsa-1", &claims(json!({})));
    let other = sign("RS256", "rsa-1", &claims(json!({"sub": "mallory"})));
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap(),
        parts[2]
    );
    assert_unauthorized(&with_token(&filter, &forged), "token signature is invalid");
}

#[test]
fn a_missing_token_gets_a_bare_challenge_unless_allowed() {
    let filter = filter(json!({"realm": "orders"}));
    let outcome = filter.request().header("x-jwt-sub", "forged").run();
    assert_eq!(outcome.status(), 401, "{outcome}");
    assert_eq!(
        outcome.header("www-authenticate"),
        Some("Bearer realm=\"orders\"")
    );
    let lenient = self::filter(json!({"allow_missing": true}));
    let outcome = lenient.request().header("x-jwt-sub", "forged").run();
    assert!(outcome.passed(), "{outcome}");
    // Claim headers are removed from every request, so a token-less one cannot forge them.
    assert_eq!(outcome.upstream_header("x-jwt-sub"), None);
}
