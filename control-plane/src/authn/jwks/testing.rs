//! Throwaway issuer keys and the ServiceAccount tokens they sign, for
//! tests: the unit tests' (`jwks::testing`) and the integration tests',
//! which include this file as a module of their own (they cannot see the
//! crate's test-only items). It uses only the crate's own dependencies,
//! which its integration tests have too.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING,
    ECDSA_P521_SHA512_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RSA_PKCS1_SHA256,
};
use base64::Engine as _;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key and its JWK, as the API server publishes it at
/// `GET /openid/v1/jwks`.
pub enum Signer {
    /// An RSA key, for RS256 tokens.
    Rsa(RsaKeyPair),
    /// An ECDSA key, its curve's JWK name and its token's `alg`.
    Ec(EcdsaKeyPair, &'static str, &'static str),
}

impl Signer {
    /// A new 2048-bit RSA key (RS256).
    pub fn rsa() -> Self {
        Self::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).unwrap())
    }

    /// A new P-256 key (ES256).
    pub fn p256() -> Self {
        let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        Self::Ec(key, "P-256", "ES256")
    }

    /// A new P-384 key (ES384).
    pub fn p384() -> Self {
        let key = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).unwrap();
        Self::Ec(key, "P-384", "ES384")
    }

    /// A new P-521 key (ES512).
    pub fn p521() -> Self {
        let key = EcdsaKeyPair::generate(&ECDSA_P521_SHA512_FIXED_SIGNING).unwrap();
        Self::Ec(key, "P-521", "ES512")
    }

    /// The key's entry in `keys`, with ID `kid`.
    pub fn jwk(&self, kid: &str) -> serde_json::Value {
        match self {
            Self::Rsa(key) => {
                let public = PublicKeyComponents::<Vec<u8>>::from(key.public_key());
                serde_json::json!({"use": "sig", "kty": "RSA", "kid": kid,
                    "alg": "RS256", "n": b64(&public.n), "e": b64(&public.e)})
            }
            Self::Ec(key, crv, alg) => {
                let point = key.public_key().as_ref();
                let (x, y) = point[1..].split_at(point.len() / 2);
                serde_json::json!({"use": "sig", "kty": "EC", "crv": crv, "kid": kid,
                    "alg": alg, "x": b64(x), "y": b64(y)})
            }
        }
    }

    /// A token with `header` and `claims`, signed by this key.
    pub fn sign(&self, header: &serde_json::Value, claims: &serde_json::Value) -> String {
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let signature = match self {
            Self::Rsa(key) => {
                let mut signature = vec![0; key.public_modulus_len()];
                key.sign(&RSA_PKCS1_SHA256, &rng, signed.as_bytes(), &mut signature)
                    .unwrap();
                signature
            }
            Self::Ec(key, ..) => key.sign(&rng, signed.as_bytes()).unwrap().as_ref().to_vec(),
        };
        format!("{signed}.{}", b64(&signature))
    }

    /// A projected token of `shop/web` for audience `trellis`,
    /// expiring in 2100, told from others by `jti`, its header naming
    /// `kid` and this key's algorithm.
    pub fn token(&self, kid: &str, jti: &str) -> String {
        let alg = match self {
            Self::Rsa(_) => "RS256",
            Self::Ec(_, _, alg) => alg,
        };
        self.sign(
            &serde_json::json!({"alg": alg, "kid": kid}),
            &serde_json::json!({"aud": ["trellis"], "exp": 4_102_444_800_u64,
                "iss": "https://kubernetes.default.svc.cluster.local", "jti": jti,
                "sub": "system:serviceaccount:shop:web"}),
        )
    }
}

/// A JSON Web Key Set of `keys`, shaped as the API server serves it.
pub fn jwks(keys: &[(&str, &Signer)]) -> String {
    let keys: Vec<_> = keys.iter().map(|(kid, key)| key.jwk(kid)).collect();
    serde_json::json!({ "keys": keys }).to_string()
}
