//! SHA-256 hashing of keys and constant-time comparison of hashes.
//!
//! A key is stored and looked up only by the SHA-256 of its whole text; the plaintext never
//! leaves the process that received it.

use core::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 of a key's full text. Equality is constant-time.
#[derive(Clone, Copy)]
pub struct KeyHash([u8; 32]);

impl KeyHash {
    /// Hashes a key's full text (prefix included).
    pub fn of(key_text: &str) -> KeyHash {
        KeyHash(Sha256::digest(key_text.as_bytes()).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits; anything else is `None`.
    pub fn from_hex(text: &str) -> Option<KeyHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(KeyHash(out))
    }
}

impl PartialEq for KeyHash {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for KeyHash {}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", self.to_hex())
    }
}

impl Serialize for KeyHash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for KeyHash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        KeyHash::from_hex(&text).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn check(input: &str, expected_hex: &str) {
        assert_eq!(KeyHash::of(input).to_hex(), expected_hex);
    }

    #[test]
    fn known_vectors() {
        check("", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        check("abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn equality_and_hex_round_trip() {
        let a = KeyHash::of("sk_live_x");
        assert_eq!(a, KeyHash::from_hex(&a.to_hex()).unwrap());
        assert_ne!(a, KeyHash::of("sk_live_y"));
        assert!(KeyHash::from_hex("zz").is_none());
        assert!(KeyHash::from_hex(&"0".repeat(63)).is_none());
    }
}
