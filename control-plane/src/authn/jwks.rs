//! The cluster's service account issuer keys, and a ServiceAccount token's
//! signature checked against them.
//!
//! The API server publishes the public keys it signs ServiceAccount tokens
//! with at [`JWKS_PATH`] (a JSON Web Key Set, readable by every service
//! account through the default `system:service-account-issuer-discovery`
//! binding). A token whose signature does not verify against one of them
//! cannot be one the API server issued, so it is refused without asking for
//! a TokenReview. A signature that verifies proves only that the cluster
//! issued the token once: the TokenReview stays the authority on whether it
//! still stands (its pod deleted, the token revoked).
//!
//! The algorithms the API server signs with are verified: RS256 (an RSA
//! key) and ES256, ES384 or ES512 (an ECDSA key on P-256, P-384 or P-521).
//! A token signed with any other algorithm, `none` included, is refused as
//! not verifiable.

use std::collections::HashMap;

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, ECDSA_P521_SHA512_FIXED,
    RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents, UnparsedPublicKey,
};
use base64::Engine as _;
use serde::Deserialize;

/// Where the API server publishes its service account issuer keys.
pub const JWKS_PATH: &str = "/openid/v1/jwks";

/// The longest key ID shown in an error; a token's header is the caller's
/// to write.
const MAX_KID_SHOWN: usize = 64;

/// One public key of the set.
#[derive(Clone, Debug, PartialEq, Eq)]
enum IssuerKey {
    /// RS256: big-endian modulus and exponent.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// ES256, ES384 or ES512 (`alg`): the uncompressed point of its curve
    /// (`04 || x || y`).
    Ec { alg: Alg, point: Vec<u8> },
}

impl IssuerKey {
    fn alg(&self) -> Alg {
        match self {
            Self::Rsa { .. } => Alg::Rs256,
            Self::Ec { alg, .. } => *alg,
        }
    }

    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            Self::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok(),
            Self::Ec { alg, point } => {
                let algorithm = match alg {
                    Alg::Es384 => &ECDSA_P384_SHA384_FIXED,
                    Alg::Es512 => &ECDSA_P521_SHA512_FIXED,
                    Alg::Es256 | Alg::Rs256 => &ECDSA_P256_SHA256_FIXED,
                };
                UnparsedPublicKey::new(algorithm, point)
                    .verify(message, signature)
                    .is_ok()
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alg {
    Rs256,
    Es256,
    Es384,
    Es512,
}

/// The issuer keys the API server publishes, by key ID.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IssuerKeys {
    keys: HashMap<String, IssuerKey>,
}

/// One entry of `keys` in a JSON Web Key Set.
#[derive(Deserialize)]
struct Jwk {
    #[serde(default)]
    kty: String,
    #[serde(default)]
    kid: String,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    crv: String,
    #[serde(default)]
    n: String,
    #[serde(default)]
    e: String,
    #[serde(default)]
    x: String,
    #[serde(default)]
    y: String,
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

fn unbase64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

impl IssuerKeys {
    /// Reads a JSON Web Key Set as the API server serves it at
    /// [`JWKS_PATH`]. Keys of a type or curve this module does not verify,
    /// or meant for encryption, are passed over; a set with none left that
    /// can verify is an error, as it would refuse every token. The error
    /// says what is wrong with the document.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let jwks: Jwks =
            serde_json::from_slice(body).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in jwks.keys {
            if jwk.usage.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            let key = match (jwk.kty.as_str(), jwk.crv.as_str()) {
                ("RSA", _) => {
                    let (Some(n), Some(e)) = (unbase64(&jwk.n), unbase64(&jwk.e)) else {
                        return Err(format!(
                            "RSA key {} has no base64url n and e",
                            shown_kid(&jwk.kid)
                        ));
                    };
                    IssuerKey::Rsa { n, e }
                }
                ("EC", crv @ ("P-256" | "P-384" | "P-521")) => {
                    let (alg, len) = match crv {
                        "P-256" => (Alg::Es256, 32),
                        "P-384" => (Alg::Es384, 48),
                        _ => (Alg::Es512, 66),
                    };
                    let (Some(x), Some(y)) = (unbase64(&jwk.x), unbase64(&jwk.y)) else {
                        return Err(format!(
                            "{crv} key {} has no base64url x and y",
                            shown_kid(&jwk.kid)
                        ));
                    };
                    if x.len() != len || y.len() != len {
                        return Err(format!(
                            "{crv} key {} has an x or y that is not {len} bytes",
                            shown_kid(&jwk.kid)
                        ));
                    }
                    let mut point = Vec::with_capacity(1 + 2 * len);
                    point.push(4);
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    IssuerKey::Ec { alg, point }
                }
                _ => continue,
            };
            keys.insert(jwk.kid, key);
        }
        if keys.is_empty() {
            return Err(
                "the key set holds no RSA or ECDSA (P-256, P-384, P-521) signing key".into(),
            );
        }
        Ok(Self { keys })
    }

    /// Whether the set has a key with ID `kid`.
    pub fn has(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// How many keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the set holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The parts of a token's JOSE header that choose the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenHeader {
    /// The `kid`, if the header names one.
    pub kid: Option<String>,
    alg: Alg,
}

/// Why a token's signature was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error(
        "the token's signature does not verify against the cluster's service account issuer keys"
    )]
    DoesNotVerify,
    #[error("the token is signed by key {}, which the cluster does not publish", shown_kid(.0))]
    UnknownKey(String),
    #[error(
        "the token's signature algorithm {} cannot be verified; a ServiceAccount token is \
         signed with RS256, ES256, ES384 or ES512",
        shown_kid(.0)
    )]
    Unverifiable(String),
    #[error("the token's header is not a JSON object with an alg")]
    BadHeader,
}

/// `kid` (or an `alg`) quoted for an error, at most [`MAX_KID_SHOWN`]
/// characters of it, control characters escaped.
fn shown_kid(kid: &str) -> String {
    let mut shown: String = kid.chars().take(MAX_KID_SHOWN).collect();
    if shown.len() < kid.len() {
        shown.push('…');
    }
    format!("{shown:?}")
}

/// Reads the JOSE header of `token` (three base64url parts): its `kid` and
/// its `alg`, which must be RS256, ES256, ES384 or ES512.
pub fn header(token: &str) -> Result<TokenHeader, SignatureError> {
    let part = token.split('.').next().unwrap_or_default();
    let header = unbase64(part)
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .ok_or(SignatureError::BadHeader)?;
    let alg = match header.get("alg").and_then(serde_json::Value::as_str) {
        Some("RS256") => Alg::Rs256,
        Some("ES256") => Alg::Es256,
        Some("ES384") => Alg::Es384,
        Some("ES512") => Alg::Es512,
        Some(other) => return Err(SignatureError::Unverifiable(other.to_owned())),
        None => return Err(SignatureError::BadHeader),
    };
    let kid = header
        .get("kid")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    Ok(TokenHeader { kid, alg })
}

/// Checks the signature of `token` against `keys`: with the key its `kid`
/// names (absent from the set: [`SignatureError::UnknownKey`]), or, with no
/// `kid`, with any key of its algorithm.
pub fn verify(token: &str, keys: &IssuerKeys) -> Result<(), SignatureError> {
    let header = header(token)?;
    let Some((signed, signature)) = token.rsplit_once('.') else {
        return Err(SignatureError::DoesNotVerify);
    };
    let signature = unbase64(signature).ok_or(SignatureError::DoesNotVerify)?;
    let verifies =
        |key: &IssuerKey| key.alg() == header.alg && key.verifies(signed.as_bytes(), &signature);
    let verified = match &header.kid {
        Some(kid) => {
            let key = keys
                .keys
                .get(kid)
                .ok_or_else(|| SignatureError::UnknownKey(kid.clone()))?;
            verifies(key)
        }
        None => keys.keys.values().any(verifies),
    };
    if verified {
        Ok(())
    } else {
        Err(SignatureError::DoesNotVerify)
    }
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::testing::{Signer, jwks};
    use super::*;

    /// Tokens signed by a published key verify, RS256 and ES256 alike; a
    /// token signed by another key, or whose claims were changed after
    /// signing, does not, and one naming an unpublished kid is refused
    /// naming it.
    #[test]
    fn verifies_rs256_and_es256_against_the_published_keys() {
        let (rsa, p256, stranger) = (Signer::rsa(), Signer::p256(), Signer::rsa());
        let keys = IssuerKeys::parse(jwks(&[("rsa-1", &rsa), ("ec-1", &p256)]).as_bytes()).unwrap();
        assert_eq!(keys.len(), 2);
        verify(&rsa.token("rsa-1", "a"), &keys).unwrap();
        verify(&p256.token("ec-1", "a"), &keys).unwrap();

        let forged = stranger.token("rsa-1", "a");
        let e = verify(&forged, &keys).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the token's signature does not verify against the cluster's service account \
             issuer keys"
        );
        // An ES256 header on a token whose kid names an RSA key.
        let e = verify(&p256.token("rsa-1", "x"), &keys).unwrap_err();
        assert_eq!(e, SignatureError::DoesNotVerify);

        let token = rsa.token("rsa-1", "a");
        let (head, rest) = token.split_once('.').unwrap();
        let signature = rest.rsplit_once('.').unwrap().1;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let changed = format!(
            "{head}.{}.{signature}",
            b64(
                r#"{"aud":["trellis"],"exp":4102444800,"sub":"system:serviceaccount:kube-system:admin"}"#
            )
        );
        assert_eq!(verify(&changed, &keys), Err(SignatureError::DoesNotVerify));

        let e = verify(&rsa.token("rotated-away", "x"), &keys).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the token is signed by key \"rotated-away\", which the cluster does not publish"
        );
    }

    /// A cluster whose service account signing key is on P-384 or P-521
    /// signs with ES384 or ES512: its tokens verify, each against its own
    /// curve's key only.
    #[test]
    fn verifies_es384_and_es512_against_the_published_keys() {
        let (p384, p521) = (Signer::p384(), Signer::p521());
        let keys = IssuerKeys::parse(jwks(&[("p384", &p384), ("p521", &p521)]).as_bytes()).unwrap();
        assert_eq!(keys.len(), 2);
        verify(&p384.token("p384", "a"), &keys).unwrap();
        verify(&p521.token("p521", "a"), &keys).unwrap();
        let forged = Signer::p384().token("p384", "a");
        assert_eq!(verify(&forged, &keys), Err(SignatureError::DoesNotVerify));
        // An ES512 token whose kid names the P-384 key.
        let crossed = p521.token("p384", "a");
        assert_eq!(verify(&crossed, &keys), Err(SignatureError::DoesNotVerify));
    }

    /// A token without a kid is checked against every key of its algorithm.
    #[test]
    fn a_token_without_a_kid_is_checked_against_every_key() {
        let (rsa, other) = (Signer::rsa(), Signer::rsa());
        let keys = IssuerKeys::parse(jwks(&[("a", &other), ("b", &rsa)]).as_bytes()).unwrap();
        let claims = serde_json::json!({"aud": "trellis"});
        let token = rsa.sign(&serde_json::json!({"alg": "RS256"}), &claims);
        verify(&token, &keys).unwrap();
        let stranger = Signer::rsa().sign(&serde_json::json!({"alg": "RS256"}), &claims);
        assert_eq!(verify(&stranger, &keys), Err(SignatureError::DoesNotVerify));
    }

    /// `none` and every other algorithm are refused naming it, whatever the
    /// keys.
    #[test]
    fn other_algorithms_are_not_verifiable() {
        let rsa = Signer::rsa();
        let keys = IssuerKeys::parse(jwks(&[("k", &rsa)]).as_bytes()).unwrap();
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let payload = b64(r#"{"aud":["trellis"],"exp":4102444800}"#);
        for alg in ["none", "HS256", "RS512", "PS256", "EdDSA"] {
            let token = format!(
                "{}.{payload}.c2ln",
                b64(&format!(r#"{{"alg":"{alg}","kid":"k"}}"#))
            );
            let e = verify(&token, &keys).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "the token's signature algorithm \"{alg}\" cannot be verified; a \
                     ServiceAccount token is signed with RS256, ES256, ES384 or ES512"
                )
            );
        }
        let no_alg = format!("{}.{payload}.c2ln", b64(r#"{"kid":"k"}"#));
        assert_eq!(verify(&no_alg, &keys), Err(SignatureError::BadHeader));
    }

    /// The key set as the API server serves it; keys this module cannot
    /// use are passed over, and a set with none left, or not a key set at
    /// all, is an error naming why.
    #[test]
    fn reads_the_api_servers_key_set() {
        let rsa = Signer::rsa();
        let mut set: serde_json::Value = serde_json::from_str(&jwks(&[("k", &rsa)])).unwrap();
        set["keys"].as_array_mut().unwrap().extend([
            serde_json::json!({"use": "sig", "kty": "EC", "crv": "secp256k1", "kid": "k1",
                "x": "AA", "y": "AA"}),
            serde_json::json!({"use": "enc", "kty": "RSA", "kid": "enc", "n": "AQAB", "e": "AQAB"}),
        ]);
        let keys = IssuerKeys::parse(set.to_string().as_bytes()).unwrap();
        assert!(keys.has("k") && !keys.has("k1") && !keys.has("enc"));

        let err = |body: &str| IssuerKeys::parse(body.as_bytes()).unwrap_err();
        assert!(
            err("<html>").starts_with("not a JSON Web Key Set: "),
            "{}",
            err("<html>")
        );
        assert!(err(r#"{"kind":"Status"}"#).starts_with("not a JSON Web Key Set: "));
        assert_eq!(
            err(r#"{"keys":[]}"#),
            "the key set holds no RSA or ECDSA (P-256, P-384, P-521) signing key"
        );
        assert_eq!(
            err(r#"{"keys":[{"kty":"RSA","kid":"k","n":"!!","e":"AQAB"}]}"#),
            "RSA key \"k\" has no base64url n and e"
        );
        assert_eq!(
            err(r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k","x":"AAAA","y":"AAAA"}]}"#),
            "P-256 key \"k\" has an x or y that is not 32 bytes"
        );
        assert_eq!(
            err(r#"{"keys":[{"kty":"EC","crv":"P-521","kid":"k","x":"AAAA","y":"AAAA"}]}"#),
            "P-521 key \"k\" has an x or y that is not 66 bytes"
        );
    }

    /// A key ID from the caller's header is shown bounded and escaped.
    #[test]
    fn unknown_key_ids_are_shown_bounded() {
        let e = SignatureError::UnknownKey(format!("{}\n", "x".repeat(500)));
        let text = e.to_string();
        assert!(text.len() < 200, "{text}");
        let e = SignatureError::UnknownKey("a\nb".into());
        assert_eq!(
            e.to_string(),
            "the token is signed by key \"a\\nb\", which the cluster does not publish"
        );
    }
}
