//! New keys from the operating system's secure random source.

use keyward_shared::{Key, KeyError};

/// The prefix of root keys.
pub const ROOT_KEY_PREFIX: &str = "kw_root";

/// A new key with this prefix and 32 bytes from the OS's CSPRNG.
pub fn generate(prefix: &str) -> Result<Key, KeyError> {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).expect("the operating system's random source is available");
    Key::generate(prefix, random)
}

/// A 64-hex-character secret (for purge signing in local setups).
pub fn secret_hex() -> String {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random).expect("the operating system's random source is available");
    random.iter().map(|b| format!("{b:02x}")).collect()
}
