//! Tokens signed here with fixed test keys (RSA 2048 from `testdata/`, a fixed P-256 scalar),
//! verified through the same code the filter runs.

use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use serde_json::json;
use std::sync::OnceLock;

const NOW: u64 = 1_700_000_000;

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn rsa_key() -> &'static rsa::RsaPrivateKey {
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| {
        rsa::RsaPrivateKey::from_pkcs8_pem(include_str!("../testdata/rsa-test-key.pem")).unwrap()
    })
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
         "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())},
        {"kty": "oct", "k": "c2VjcmV0"}
    ]})
}

fn sign(alg: &str, kid: Option<&str>, claims: &Value) -> String {
    let mut header = json!({"alg": alg, "typ": "JWT"});
    if let Some(kid) = kid {
        header["kid"] = json!(kid);
    }
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = match alg {
        "RS256" => rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(rsa_key().clone())
            .sign(input.as_bytes())
            .to_vec(),
        "ES256" => {
            let sig: p256::ecdsa::Signature = ec_key().sign(input.as_bytes());
            sig.to_bytes().to_vec()
        }
        _ => b"junk".to_vec(),
    };
    format!("{input}.{}", b64(&signature))
}

fn config(extra: Value) -> Config {
    let mut base = json!({
        "issuers": ["https://issuer.example"],
        "audiences": ["orders"],
        "jwks": jwks(),
        "claim_to_headers": [
            {"claim": "sub", "header": "X-Jwt-Sub"},
            {"claim": "groups", "header": "x-jwt-groups"},
            {"claim": "org.id", "header": "x-jwt-org"},
            {"claim": "missing", "header": "x-jwt-missing"}
        ]
    });
    base.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    Config::parse(Some(base.to_string().as_bytes())).unwrap()
}

fn good_claims() -> Value {
    json!({"iss": "https://issuer.example", "aud": ["other", "orders"], "sub": "alice",
           "groups": ["admin", "dev"], "org": {"id": 42}, "exp": NOW + 300, "nbf": NOW - 10})
}

fn run(config: &Config, header: Option<&str>) -> Outcome {
    authenticate(config, &config.rules(), header, NOW)
}

fn rejection(outcome: Outcome) -> (String, String) {
    match outcome {
        Outcome::Rejected(r) => {
            assert_eq!(r.status, 401);
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            (
                r.get_header("www-authenticate").unwrap().to_string(),
                body["message"].as_str().unwrap().to_string(),
            )
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn rs256_and_es256_tokens_pass_and_forward_claims() {
    let c = config(json!({}));
    for (alg, kid) in [
        ("RS256", Some("rsa-1")),
        ("ES256", Some("ec-1")),
        ("ES256", None),
    ] {
        let token = sign(alg, kid, &good_claims());
        let outcome = run(&c, Some(&format!("Bearer {token}")));
        assert_eq!(
            outcome,
            Outcome::Authenticated(vec![
                ("x-jwt-sub".into(), "alice".into()),
                ("x-jwt-groups".into(), "admin,dev".into()),
                ("x-jwt-org".into(), "42".into()),
            ]),
            "{alg} {kid:?}"
        );
    }
}

#[test]
fn missing_token_gets_a_bare_challenge() {
    let c = config(json!({"realm": "orders"}));
    let (challenge, message) = rejection(run(&c, None));
    assert_eq!(challenge, "Bearer realm=\"orders\"");
    assert_eq!(message, "a bearer token is required");
    let c = config(json!({"allow_missing": true}));
    assert_eq!(run(&c, None), Outcome::Anonymous);
    // allow_missing does not let a bad token through.
    let (challenge, _) = rejection(run(&c, Some("Bearer x.y.z")));
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
}

#[test]
fn claim_failures_are_named() {
    let c = config(json!({}));
    let cases = [
        (json!({"exp": NOW - 61}), "token has expired"),
        (json!({"nbf": NOW + 61}), "token is not valid yet"),
        (
            json!({"iss": "https://evil.example"}),
            "token issuer is not accepted",
        ),
        (json!({"aud": "payments"}), "token audience is not accepted"),
        (
            json!({"exp": "tomorrow"}),
            "token claim exp has the wrong type",
        ),
    ];
    for (patch, want) in cases {
        let mut claims = good_claims();
        claims
            .as_object_mut()
            .unwrap()
            .extend(patch.as_object().unwrap().clone());
        let token = sign("ES256", Some("ec-1"), &claims);
        let (challenge, message) = rejection(run(&c, Some(&format!("Bearer {token}"))));
        assert_eq!(message, want);
        assert!(
            challenge.ends_with(&format!("error_description=\"{want}\"")),
            "{challenge}"
        );
    }
    // Within the skew is fine.
    let mut claims = good_claims();
    claims["exp"] = json!(NOW - 30);
    let token = sign("RS256", Some("rsa-1"), &claims);
    assert!(matches!(
        run(&c, Some(&format!("bearer {token}"))),
        Outcome::Authenticated(_)
    ));
    // require_exp refuses a token without exp.
    let c = config(json!({"require_exp": true}));
    claims.as_object_mut().unwrap().remove("exp");
    let token = sign("RS256", Some("rsa-1"), &claims);
    assert_eq!(
        rejection(run(&c, Some(&format!("Bearer {token}")))).1,
        "token has no exp claim"
    );
}

#[test]
fn signature_and_key_failures() {
    let c = config(json!({}));
    let token = sign("RS256", Some("rsa-1"), &good_claims());
    // Payload swapped: signature no longer matches.
    let mut parts: Vec<String> = token.split('.').map(String::from).collect();
    let mut claims = good_claims();
    claims["sub"] = json!("mallory");
    parts[1] = b64(claims.to_string().as_bytes());
    let tampered = parts.join(".");
    assert_eq!(
        rejection(run(&c, Some(&format!("Bearer {tampered}")))).1,
        "token signature is invalid"
    );
    // kid of the other algorithm's key: no candidate.
    let wrong_kid = sign("RS256", Some("ec-1"), &good_claims());
    assert_eq!(
        rejection(run(&c, Some(&format!("Bearer {wrong_kid}")))).1,
        "no configured key matches the token"
    );
    // alg none and HS256 are refused before any key is looked at.
    for alg in ["none", "HS256"] {
        let t = sign(alg, None, &good_claims());
        let msg = rejection(run(&c, Some(&format!("Bearer {t}")))).1;
        assert_eq!(
            msg,
            format!("token algorithm {alg} is not accepted (RS256, ES256)")
        );
    }
    // Not a bearer token / not three parts / bad base64.
    assert_eq!(
        rejection(run(&c, Some("Basic YTpi"))).1,
        "credentials are not a Bearer token"
    );
    assert!(rejection(run(&c, Some("Bearer a.b")))
        .1
        .contains("three dot-separated parts"));
    assert!(rejection(run(&c, Some("Bearer a.b.c+")))
        .1
        .contains("base64url"));
}

#[test]
fn attacker_alg_text_is_sanitized() {
    let c = config(json!({}));
    let header = b64(br#"{"alg":"x\", evil=\"1"}"#);
    let token = format!("{header}.{}.{}", b64(b"{}"), b64(b"sig"));
    let (challenge, _) = rejection(run(&c, Some(&format!("Bearer {token}"))));
    assert_eq!(challenge.matches('"').count(), 6, "{challenge}");
}

#[test]
fn config_errors() {
    let bad = [
        json!({"jwks": {"keys": []}}),
        json!({"jwks": "not json"}),
        json!({"jwks": {"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}}),
        json!({"jwks": {"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}]}}),
        json!({"jwks": jwks(), "claim_to_headers": [{"claim": "sub", "header": "bad header"}]}),
        json!({"jwks": jwks(), "realm": "a\"b"}),
        json!({"jwks": jwks(), "unknown": 1}),
        json!({}),
    ];
    for cfg in bad {
        assert!(
            Config::parse(Some(cfg.to_string().as_bytes())).is_err(),
            "{cfg} should fail"
        );
    }
    // jwks as a string, Istio style.
    let c = Config::parse(Some(
        json!({"jwks": jwks().to_string()}).to_string().as_bytes(),
    ))
    .unwrap();
    assert_eq!(c.keys.len(), 2);
    assert_eq!(c.from_header, "authorization");
    assert!(c.forward);
}

#[test]
fn bearer_parsing() {
    assert_eq!(bearer_token("Bearer abc"), Some("abc"));
    assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
    assert_eq!(bearer_token("Bearer "), None);
    assert_eq!(bearer_token("Token abc"), None);
}
