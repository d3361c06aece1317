//! New keys from the operating system's secure random source, and new ids.

use keyward_shared::{Key, KeyError};

/// The prefix of root keys.
pub const ROOT_KEY_PREFIX: &str = "kw_root";

/// A new key with this prefix and 32 bytes from the OS's CSPRNG.
pub fn generate(prefix: &str) -> Result<Key, KeyError> {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).expect("the operating system's random source is available");
    Key::generate(prefix, random)
}

/// A new id with this prefix (`key_01J...`); ids sort by creation time.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new())
}

/// Whether `text` has the shape of an id [`new_id`] makes with `prefix`: `<prefix>_` and a ULID
/// (26 characters of Crockford's base 32).
pub fn is_id(text: &str, prefix: &str) -> bool {
    text.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('_')).is_some_and(|ulid| {
        ulid.len() == 26
            && ulid.bytes().all(|b| b.is_ascii_digit() || (b.is_ascii_uppercase() && !b"ILOU".contains(&b)))
    })
}
