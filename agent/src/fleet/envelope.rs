//! Signed envelopes: an ed25519 signature over the exact bytes of a fleet document, and the
//! name of the key that made it. Keys are ring's (already linked for TLS); the private key file
//! is PKCS#8 in PEM, as `openssl genpkey -algorithm ed25519` writes it, so operators can keep
//! their keys with their usual tools.
//!
//! ```json
//! {"key": "ops", "alg": "ed25519", "signature": "<base64>", "payload": "{\"version\": 3, ...}"}
//! ```

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use super::Rejection;

pub const ALG: &str = "ed25519";

/// A signed document as it travels.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The name of the signing key, as the agents' `[fleet.keys]` list it.
    pub key: String,
    pub alg: String,
    /// base64 of the 64-byte signature over `payload`'s UTF-8 bytes.
    pub signature: String,
    /// The document, exactly as signed.
    pub payload: String,
}

pub use crate::config::TrustedKeys;

/// Opening envelopes with the trusted keys.
pub trait Open {
    /// Checks an envelope and returns the payload it carries, or why it is refused.
    fn open(&self, bytes: &[u8]) -> Result<String, Rejection>;
}

impl Open for TrustedKeys {
    fn open(&self, bytes: &[u8]) -> Result<String, Rejection> {
        let envelope: Envelope = serde_json::from_slice(bytes).map_err(|e| {
            Rejection::NotSigned(format!(
                "the message is not a signed envelope ({e}); sign documents with `tether fleet sign`"
            ))
        })?;
        if envelope.alg != ALG {
            return Err(Rejection::NotSigned(format!(
                "the envelope's algorithm is `{}`; only ed25519 is accepted",
                envelope.alg
            )));
        }
        let Some(public) = self.get(&envelope.key) else {
            return Err(Rejection::UnknownKey(format!(
                "the document is signed with key `{}`, which this device does not trust (trusted: {})",
                envelope.key,
                self.names().collect::<Vec<_>>().join(", ")
            )));
        };
        let signature = B64.decode(envelope.signature.trim()).map_err(|_| {
            Rejection::BadSignature("the envelope's signature is not base64".into())
        })?;
        UnparsedPublicKey::new(&ED25519, public)
            .verify(envelope.payload.as_bytes(), &signature)
            .map_err(|_| {
                Rejection::BadSignature(format!(
                    "the signature does not match the payload under key `{}`: the document was altered or signed with another key",
                    envelope.key
                ))
            })?;
        Ok(envelope.payload)
    }
}

/// A private signing key and the name it goes by.
#[derive(Debug)]
pub struct SigningKey {
    pub name: String,
    pair: Ed25519KeyPair,
}

const PEM_LABEL: &str = "PRIVATE KEY";

/// RFC 8410's PKCS#8 v1 encoding of an ed25519 private key is this prefix and the 32-byte seed.
/// ring writes v2 (with the public key), which OpenSSL 3.0 does not read, so keys are saved as
/// v1: `openssl pkey -in ops.key -pubout` works on them.
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// The start of ring's v2 document, up to the seed.
const PKCS8_V2_PREFIX: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

impl SigningKey {
    /// A fresh key: (the PEM to keep secret, the public key in hex for agents' config).
    pub fn generate() -> Result<(String, String), String> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| "the system's random source failed".to_owned())?;
        let v2 = pkcs8.as_ref();
        let seed = v2
            .strip_prefix(&PKCS8_V2_PREFIX[..])
            .and_then(|rest| rest.get(..32))
            .ok_or_else(|| "ring made a key in an unexpected encoding".to_owned())?;
        let v1: Vec<u8> = PKCS8_V1_PREFIX.iter().chain(seed).copied().collect();
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&v1)
            .map_err(|_| "ring rejected the key it just made".to_owned())?;
        let b64 = B64.encode(&v1);
        let mut pem = format!("-----BEGIN {PEM_LABEL}-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str(&format!("-----END {PEM_LABEL}-----\n"));
        Ok((pem, hex::encode(pair.public_key().as_ref())))
    }

    /// Reads a PKCS#8 PEM file; the key is named `name`.
    pub fn load(path: &Path, name: String) -> Result<SigningKey, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the key {}: {e}", path.display()))?;
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::trim)
            .collect();
        let der = B64
            .decode(body)
            .map_err(|_| format!("{} is not a PEM private key", path.display()))?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|_| format!("{} is not an ed25519 private key (PKCS#8)", path.display()))?;
        Ok(SigningKey { name, pair })
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.pair.public_key().as_ref())
    }

    /// Signs `payload` as it is, byte for byte.
    pub fn sign(&self, payload: String) -> Envelope {
        let signature = self.pair.sign(payload.as_bytes());
        Envelope {
            key: self.name.clone(),
            alg: ALG.to_owned(),
            signature: B64.encode(signature.as_ref()),
            payload,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn key(dir: &Path, name: &str) -> (SigningKey, String) {
        let (pem, public) = SigningKey::generate().unwrap();
        let path = dir.join(format!("{name}.key"));
        std::fs::write(&path, pem).unwrap();
        (SigningKey::load(&path, name.into()).unwrap(), public)
    }

    fn trusted(pairs: &[(&str, &str)]) -> TrustedKeys {
        TrustedKeys::from_hex(
            &pairs
                .iter()
                .map(|(n, k)| (n.to_string(), k.to_string()))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn a_signed_payload_opens_and_every_alteration_is_refused() {
        let dir = crate::test_scratch_dir("envelope");
        let (ops, ops_pub) = key(&dir, "ops");
        let (other, other_pub) = key(&dir, "other");
        assert_eq!(ops.public_hex(), ops_pub);
        let keys = trusted(&[("ops", &ops_pub)]);
        let payload = r#"{"version": 3, "policy": {"mode": "local-only"}}"#.to_owned();
        let env = ops.sign(payload.clone());
        let bytes = serde_json::to_vec(&env).unwrap();
        assert_eq!(keys.open(&bytes).unwrap(), payload);

        // Tampered payload: one byte changed.
        let mut t = env.clone();
        t.payload = t.payload.replace("local-only", "cloud-first");
        let err = keys.open(&serde_json::to_vec(&t).unwrap()).unwrap_err();
        assert!(matches!(err, Rejection::BadSignature(_)), "{err:?}");

        // Signed by a key the device does not trust, under that key's name.
        let err = keys
            .open(&serde_json::to_vec(&other.sign(payload.clone())).unwrap())
            .unwrap_err();
        assert!(matches!(err, Rejection::UnknownKey(_)), "{err:?}");

        // Signed by another key but claiming to be `ops`.
        let mut forged = other.sign(payload.clone());
        forged.key = "ops".into();
        let err = keys
            .open(&serde_json::to_vec(&forged).unwrap())
            .unwrap_err();
        assert!(matches!(err, Rejection::BadSignature(_)), "{err:?}");

        // A bare document, with no envelope.
        let err = keys.open(payload.as_bytes()).unwrap_err();
        assert!(matches!(err, Rejection::NotSigned(_)), "{err:?}");

        // Both keys trusted: the other one now opens.
        let both = trusted(&[("ops", &ops_pub), ("other", &other_pub)]);
        assert!(
            both.open(&serde_json::to_vec(&other.sign(payload)).unwrap())
                .is_ok()
        );
    }

    #[test]
    fn malformed_public_keys_are_named() {
        let err =
            TrustedKeys::from_hex(&[("ops".to_string(), "abcd".to_string())].into()).unwrap_err();
        assert!(err[0].contains("fleet.keys.ops"), "{err:?}");
    }
}
