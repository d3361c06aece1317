//! The key format: `<prefix>_<base58(32 random bytes ++ CRC32 of those bytes)>`.
//!
//! The checksum lets the edge (and leak scanners) reject typos and junk offline, before any
//! lookup. The prefix names the environment (`sk_live`, `sk_test`). Randomness is supplied by the
//! caller, so this module stays pure.

use core::fmt;

use crate::hash::KeyHash;

/// Bytes of entropy in a key.
pub const RANDOM_LEN: usize = 32;
/// Characters of the encoded body shown in a key's display start, after the prefix.
pub const START_BODY_CHARS: usize = 6;
/// The longest prefix accepted.
pub const MAX_PREFIX_LEN: usize = 24;
/// Longest text that can be a key; anything longer is rejected before decoding.
pub const MAX_KEY_LEN: usize = MAX_PREFIX_LEN + 1 + 50;

/// Why a text is not a well-formed key, or a prefix is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a key is `<prefix>_<body>`; this text has no `_` separator")]
    NoSeparator,
    #[error("the prefix must be 1 to {MAX_PREFIX_LEN} characters of a-z, 0-9 and single `_`, starting with a letter")]
    BadPrefix,
    #[error("the key body is not base58")]
    NotBase58,
    #[error("the key body has the wrong length")]
    BadLength,
    #[error("the key's checksum does not match: it was mistyped or altered")]
    BadChecksum,
    #[error("the key is longer than any Keyward key")]
    TooLong,
}

/// A well-formed key. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    text: String,
    prefix_len: usize,
}

impl Key {
    /// Builds a key from a prefix and 32 bytes the caller drew from a secure random source.
    pub fn generate(prefix: &str, random: [u8; RANDOM_LEN]) -> Result<Key, KeyError> {
        validate_prefix(prefix)?;
        let mut payload = [0u8; RANDOM_LEN + 4];
        payload[..RANDOM_LEN].copy_from_slice(&random);
        payload[RANDOM_LEN..].copy_from_slice(&crc32fast::hash(&random).to_be_bytes());
        let body = bs58::encode(payload).into_string();
        Ok(Key { text: format!("{prefix}_{body}"), prefix_len: prefix.len() })
    }

    /// Parses a key, checking prefix, encoding, length and checksum. Does no lookup.
    pub fn parse(text: &str) -> Result<Key, KeyError> {
        if text.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong);
        }
        let (prefix, body) = text.rsplit_once('_').ok_or(KeyError::NoSeparator)?;
        validate_prefix(prefix)?;
        let mut payload = [0u8; RANDOM_LEN + 4];
        let n = match bs58::decode(body).onto(&mut payload[..]) {
            Ok(n) => n,
            Err(bs58::decode::Error::BufferTooSmall) => return Err(KeyError::BadLength),
            Err(_) => return Err(KeyError::NotBase58),
        };
        if n != RANDOM_LEN + 4 {
            return Err(KeyError::BadLength);
        }
        let (random, sum) = payload.split_at(RANDOM_LEN);
        if crc32fast::hash(random).to_be_bytes() != sum {
            return Err(KeyError::BadChecksum);
        }
        Ok(Key { text: text.to_owned(), prefix_len: prefix.len() })
    }

    /// The plaintext. Call only to show it once to its owner or to send it where it is used.
    pub fn expose(&self) -> &str {
        &self.text
    }

    pub fn prefix(&self) -> &str {
        &self.text[..self.prefix_len]
    }

    /// What a person sees of the key: the prefix and the first characters of the body.
    pub fn start(&self) -> &str {
        &self.text[..self.prefix_len + 1 + START_BODY_CHARS]
    }

    pub fn hash(&self) -> KeyHash {
        KeyHash::of(&self.text)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}…)", self.start())
    }
}

/// Checks that a prefix is 1..=24 characters of `[a-z0-9_]`, starts with a letter and has no
/// empty segment (`sk__live`, `sk_`), so the last `_` always separates prefix from body.
pub fn validate_prefix(prefix: &str) -> Result<(), KeyError> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix.split('_').all(|segment| !segment.is_empty())
        && prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok { Ok(()) } else { Err(KeyError::BadPrefix) }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    const ZEROS: [u8; 32] = [0; 32];

    fn check(text: &str, expected: Result<&str, KeyError>) {
        assert_eq!(Key::parse(text).map(|k| k.prefix().to_owned()).as_deref(), expected.as_deref());
    }

    #[test]
    fn known_vector() {
        // CRC32 (IEEE) of 32 zero bytes is 0x190A55AD; base58 of 36 bytes with 32 leading zeros
        // is 32 `1`s followed by the checksum's digits.
        let key = Key::generate("sk_live", ZEROS).unwrap();
        assert_eq!(crc32fast::hash(&ZEROS), 0x190A_55AD);
        assert_eq!(key.expose(), "sk_live_11111111111111111111111111111111e8AP6");
        assert_eq!(key.start(), "sk_live_111111");
        // Independently computed with Python's hashlib.
        assert_eq!(key.hash().to_hex(), "e18a8b75f0b050abe1cd9c50a5f0627d510d73ef1940f17a50b159637efc9187");
    }

    #[test]
    fn parse_table() {
        let good = Key::generate("sk_test", [7; 32]).unwrap();
        check(good.expose(), Ok("sk_test"));
        check("sk_live_11111111111111111111111111111111e8AP6", Ok("sk_live"));
        // One character changed: the checksum fails.
        check("sk_live_11111111111111111111111111111111e8AP7", Err(KeyError::BadChecksum));
        let mut typo = good.expose().to_owned().into_bytes();
        typo[20] = if typo[20] == b'x' { b'y' } else { b'x' };
        check(&String::from_utf8(typo).unwrap(), Err(KeyError::BadChecksum));
        check("sk_live_11111111111111111111111111111112e8AP6", Err(KeyError::BadLength));
        check("nounderscore", Err(KeyError::NoSeparator));
        check("SK_abc", Err(KeyError::BadPrefix));
        check("_abc", Err(KeyError::BadPrefix));
        check("sk__abc", Err(KeyError::BadPrefix));
        check("sk_0OIl", Err(KeyError::NotBase58));
        check("sk_abc", Err(KeyError::BadLength));
        check(&format!("sk_{}", "z".repeat(80)), Err(KeyError::TooLong));
        let long_body = bs58::encode([9u8; 40]).into_string();
        check(&format!("sk_{long_body}"), Err(KeyError::BadLength));
    }

    #[test]
    fn prefixes() {
        for ok in ["sk", "sk_live", "a1_b2_c3", "kw_root"] {
            assert_eq!(validate_prefix(ok), Ok(()), "{ok}");
        }
        for bad in ["", "1sk", "sk_", "sk-live", "Sk", "sk__x", &"a".repeat(25)] {
            assert_eq!(validate_prefix(bad), Err(KeyError::BadPrefix), "{bad}");
        }
    }

    #[test]
    fn debug_redacts_the_secret() {
        let key = Key::generate("sk_live", [42; 32]).unwrap();
        let shown = format!("{key:?}");
        assert!(!shown.contains(key.expose()), "{shown}");
        assert!(shown.contains(key.start()));
    }
}
