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
