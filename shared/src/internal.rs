//! Internal requests from the control plane to the edge: their wire types and their signature.
//!
//! A signed request carries a timestamp and a unique nonce in headers, and an HMAC-SHA256 over
//! method, path, timestamp, nonce and body. The receiver rejects a bad signature, a timestamp
//! outside [`MAX_SKEW_MS`], and (with its own memory of nonces) a repeated nonce.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

#[cfg(doc)]
use crate::policy::ApiRecord;
use crate::{KeyRecord, RootKeyRecord};

pub const PURGE_PATH: &str = "/internal/purge";
pub const AUTHORITY_PATH: &str = "/internal/authority";
/// Signed, body [`SettleOrder`]: one verification of a key settled at its authority (the
/// control plane's own verify route), answered with its [`crate::credits::Settlement`].
pub const SETTLE_PATH: &str = "/internal/settle";
/// Signed, body `{}`: what this isolate's memory holds ([`MemoryStats`]).
pub const STATS_PATH: &str = "/internal/stats";
pub const TIMESTAMP_HEADER: &str = "x-keyward-timestamp";
pub const NONCE_HEADER: &str = "x-keyward-nonce";
pub const SIGNATURE_HEADER: &str = "x-keyward-signature";
/// How far a signed request's timestamp may be from the receiver's clock, either way.
pub const MAX_SKEW_MS: i64 = 30_000;
/// Largest body a worker's signed internal route reads: a larger one is refused (413
/// `PAYLOAD_TOO_LARGE`) by its `content-length` before reading, or as soon as more arrived.
pub const MAX_SIGNED_BODY: usize = 256 * 1024;

/// Tells an edge region to replace its copies of these keys with these records, the newest the
/// control plane has: memory takes them, Cache API copies are dropped. A region never replaces
/// a copy with an older version, so a late or repeated purge cannot move a key back in time.
/// Carrying the record (rather than only dropping copies) means the region rejects the key from
/// its next request without a refill, so the purge need not wait for KV or the authority to
/// have the change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// The region this purge is for, under the signature: a purge captured on its way to one
    /// region is refused by every other.
    pub region: String,
    pub records: Vec<KeyRecord>,
    /// APIs' records (their allow and deny lists, their limit override), replaced the same way,
    /// each as its JSON text ([`ApiRecord::from_json`]): read by one deserializer at the edge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apis: Vec<String>,
    /// Identities' records (their shared credits and limits), replaced the same way, each as
    /// its JSON text (`crate::identity::IdentityRecord::from_json`); the region drops its
    /// shares of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

/// What a region answers to a purge it accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurgeAck {
    pub region: String,
    /// How many of the keys this location held a copy of before the purge.
    pub purged: usize,
    /// When the region began answering from the purge's records, by its clock (Unix ms).
    pub applied_at_ms: u64,
}

/// What one isolate's memory holds: key and root-key copies (counted as the edge bounds them)
/// and the whole wasm linear memory, which only grows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryStats {
    pub key_copies: usize,
    pub key_copy_bytes: usize,
    pub root_copies: usize,
    pub root_copy_bytes: usize,
    /// The budget for both kinds of copies together.
    pub copy_budget_bytes: usize,
    pub wasm_memory_bytes: usize,
    /// Lookups of keys with no copy here: answered from a remembered miss, fetched from KV and
    /// the authority, refused (`CALLER_RATE_LIMITED`).
    pub key_misses: MissCounts,
    /// The same for root keys callers presented.
    pub root_key_misses: MissCounts,
    /// Confirmations of key copies with KV and the authority.
    #[serde(default)]
    pub key_confirmations: ConfirmCounts,
    /// The same for root keys.
    #[serde(default)]
    pub root_key_confirmations: ConfirmCounts,
    /// The same for APIs' records.
    #[serde(default)]
    pub api_confirmations: ConfirmCounts,
    /// The same for identities' records.
    #[serde(default)]
    pub identity_confirmations: ConfirmCounts,
    /// Reads the KeyState objects this isolate hosts answered (the authority's home; 0 in a
    /// region that hosts none).
    #[serde(default)]
    pub authority_reads_answered: u64,
    /// Credit lease and settle requests the KeyState objects this isolate hosts answered.
    #[serde(default)]
    pub authority_credit_calls_answered: u64,
    /// What this isolate, as a holder of credit leases, asked its keys' authorities.
    #[serde(default)]
    pub credits: CreditCounts,
}

/// What one isolate asked of its keys' authorities for credits: each of `leases_waited`,
/// `leases_ahead` and `settled` is one authority call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditCounts {
    /// Lease requests a verification waited for (its share was spent).
    pub leases_waited: u64,
    /// Lease requests ahead of need, after the answer.
    pub leases_ahead: u64,
    /// Verifications settled at the authority (an idempotency key, or the origin's).
    pub settled: u64,
    /// Verifications answered `UNAVAILABLE` because credits could not be asked.
    pub unavailable: u64,
    /// Credits taken for a verification that another authority refused (a key's and its
    /// identity's are decided together) that could not be put back: their lease had been
    /// reported already, so they count as spent.
    #[serde(default)]
    pub put_back_lost: u64,
    /// Idempotent settlements of an identity given back because the key's authority refused
    /// the verification (a retry of a refused one is settled afresh and given back again), and those
    /// that could not be given back (the authority did not answer in time: the identity's
    /// credit stays spent).
    #[serde(default)]
    pub released: u64,
    #[serde(default)]
    pub release_lost: u64,
}

/// How one isolate confirmed its copies with KV and the authority: each confirmation is one
/// authority call (`waited` + `ahead` of them in all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfirmCounts {
    /// Confirmations a request waited for (a stale copy or a miss).
    pub waited: u64,
    /// Confirmations ahead of expiry, in the background, while the copy was answered from.
    pub ahead: u64,
    /// Requests that waited for another request's confirmation of the same key instead of
    /// asking themselves (the single flight).
    pub shared: u64,
    /// Confirmations a tag purge overtook (their mark gone once their copy was written: the
    /// copy was taken back out), and those that could not read or put a mark (their copy kept
    /// out of the Cache API). Tag-only purges only.
    #[serde(default)]
    pub overtaken: u64,
    #[serde(default)]
    pub unmarked: u64,
}

/// What one isolate did with lookups it held no copy for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissCounts {
    pub remembered: u64,
    pub fetched: u64,
    pub refused: u64,
}

/// Sets keys' and root keys' authoritative records in their KeyState Durable Objects. Each
/// object keeps a record only if its version is newer than the one it holds, so a late or
/// repeated update cannot move a key back in time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityUpdate {
    #[serde(default)]
    pub records: Vec<KeyRecord>,
    #[serde(default)]
    pub root_keys: Vec<RootKeyRecord>,
    /// APIs' records, each as its JSON text, each kept in the object `api:<hash>`
    /// ([`ApiRecord::hash_of`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apis: Vec<String>,
    /// Identities' records, each as its JSON text, each kept in the object named by the hex of
    /// `crate::identity::IdentityRecord::hash_of`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
}

/// A verification of the key with this hash, settled at its authority: what it costs, and its
/// idempotency key if it has one (a [`crate::credits::SettleRequest`], flat).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleOrder {
    pub hash: crate::KeyHash,
    pub cost: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Exact rate limits to decide with the credits, all or nothing, each with its cost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ratelimits: Vec<crate::ratelimit::LimitAsk>,
    /// The version of the record the control plane decided on (see [`crate::credits::SettleRequest::version`]).
    #[serde(default)]
    pub version: u64,
    /// The version of the key's API record the control plane read, and its limit override's
    /// percent (100: none): the cap the exact limits are decided under ([`crate::ratelimit::Cap`]).
    #[serde(default)]
    pub api_version: u64,
    #[serde(default = "no_cap")]
    pub limit_percent: u8,
}

fn no_cap() -> u8 {
    100
}

/// The answer to a [`SettleOrder`]: its settlement, and each asked rate limit's state
/// (`verdict` `limited`: a limit refused it, nothing was spent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettleAnswer {
    pub verdict: crate::credits::Verdict,
    pub remaining: u64,
    pub decided_at_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ratelimits: Vec<crate::verify::LimitLeft>,
}

/// The shortest secret the control plane and the workers accept for signing internal requests.
pub const MIN_SECRET_BYTES: usize = 32;

/// The versions the authority holds after an update, in the order of the update's records,
/// then its root keys, then its APIs, then its identities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthorityAck {
    pub versions: Vec<u64>,
}

/// Why a signed request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing or malformed signature headers")]
    Malformed,
    #[error("timestamp is more than {MAX_SKEW_MS} ms from the receiver's clock")]
    Stale,
    #[error("signature does not match")]
    Mismatch,
    #[error("this nonce was already used")]
    Replayed,
}

type HmacSha256 = Hmac<Sha256>;

fn mac(secret: &[u8], method: &str, path: &str, timestamp_ms: i64, nonce: &str, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    for part in [method.as_bytes(), path.as_bytes(), timestamp_ms.to_string().as_bytes(), nonce.as_bytes()] {
        mac.update(part);
        mac.update(b"\n");
    }
    mac.update(body);
    mac
}

/// The hex signature of a request.
pub fn sign(secret: &[u8], method: &str, path: &str, timestamp_ms: i64, nonce: &str, body: &[u8]) -> String {
    hex::encode(mac(secret, method, path, timestamp_ms, nonce, body).finalize().into_bytes())
}

/// The headers of a signed request, as received.
#[derive(Debug, Clone, Copy)]
pub struct SignedHeaders<'a> {
    pub timestamp: &'a str,
    pub nonce: &'a str,
    pub signature: &'a str,
}

/// Checks a request's signature (in constant time) and its timestamp. Replays are the caller's
/// to catch, by remembering nonces for twice [`MAX_SKEW_MS`].
pub fn verify(
    secret: &[u8],
    method: &str,
    path: &str,
    headers: SignedHeaders<'_>,
    body: &[u8],
    now_ms: i64,
) -> Result<(), SignatureError> {
    let timestamp_ms: i64 = headers.timestamp.parse().map_err(|_| SignatureError::Malformed)?;
    if !is_nonce(headers.nonce) {
        return Err(SignatureError::Malformed);
    }
    let signature = hex::decode(headers.signature).map_err(|_| SignatureError::Malformed)?;
    mac(secret, method, path, timestamp_ms, headers.nonce, body)
        .verify_slice(&signature)
        .map_err(|_| SignatureError::Mismatch)?;
    check_timestamp(timestamp_ms, now_ms)
}

/// A signed timestamp within [`MAX_SKEW_MS`] of the receiver's clock, or `Stale`; checked by
/// [`verify`], and by a receiver before it reads the body.
pub fn check_timestamp(timestamp_ms: i64, now_ms: i64) -> Result<(), SignatureError> {
    match (now_ms - timestamp_ms).abs() > MAX_SKEW_MS {
        true => Err(SignatureError::Stale),
        false => Ok(()),
    }
}

/// A nonce is 16 to 64 characters of letters, digits and `-`.
pub fn is_nonce(text: &str) -> bool {
    (16..=64).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    const SECRET: &[u8] = b"test-secret";
    const NONCE: &str = "0123456789abcdef";

    fn check(
        signature: &str,
        timestamp: &str,
        nonce: &str,
        body: &[u8],
        now: i64,
        expected: Result<(), SignatureError>,
    ) {
        let headers = SignedHeaders { timestamp, nonce, signature };
        assert_eq!(verify(SECRET, "POST", PURGE_PATH, headers, body, now), expected);
    }

    #[test]
    fn known_vector() {
        // Independently computed: printf 'POST\n/internal/purge\n1000\n0123456789abcdef\n{}'
        //   | openssl dgst -sha256 -hmac test-secret
        assert_eq!(
            sign(SECRET, "POST", PURGE_PATH, 1000, NONCE, b"{}"),
            "aaaa45d4b4fa2ecc46a3d8f8c4bbd0167b02ed210c1f7a68617e4b918391653d"
        );
    }

    #[test]
    fn verify_table() {
        let good = sign(SECRET, "POST", PURGE_PATH, 1000, NONCE, b"{}");
        check(&good, "1000", NONCE, b"{}", 1000, Ok(()));
        check(&good, "1000", NONCE, b"{}", 1000 + MAX_SKEW_MS, Ok(()));
        check(&good, "1000", NONCE, b"{}", 1001 + MAX_SKEW_MS, Err(SignatureError::Stale));
        check(&good, "1000", NONCE, b"{}", 999 - MAX_SKEW_MS, Err(SignatureError::Stale));
        check(&good, "1000", NONCE, b"{ }", 1000, Err(SignatureError::Mismatch));
        check(&good, "1001", NONCE, b"{}", 1000, Err(SignatureError::Mismatch));
        check(&good, "1000", "0123456789abcdee", b"{}", 1000, Err(SignatureError::Mismatch));
        check(&good, "x", NONCE, b"{}", 1000, Err(SignatureError::Malformed));
        check(&good, "1000", "short", b"{}", 1000, Err(SignatureError::Malformed));
        check("zz", "1000", NONCE, b"{}", 1000, Err(SignatureError::Malformed));
        let other = sign(b"other", "POST", PURGE_PATH, 1000, NONCE, b"{}");
        check(&other, "1000", NONCE, b"{}", 1000, Err(SignatureError::Mismatch));
    }
}
