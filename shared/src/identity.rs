//! Identities: a customer (by the API owner's external id) whose rate limits and credits are
//! shared by every key attached to it. A key's own limits and credits and its identity's all
//! apply to each verification of the key.
//!
//! At the edge an identity is a side record like an API's ([`crate::policy::ApiRecord`]): named
//! by [`IdentityRecord::hash_of`] (SHA-256 of `identity:<id>`, which no key's text can hash
//! to), with a KV entry, edge copies under the keys' freshness rules, and a KeyState object of
//! its own that holds its credit ledger and its exact limits' schedules. The identity's meta
//! stays in the control plane.
//!
//! The KeyState object serves a key and an identity with the same code: [`Spender`] is what it
//! holds, and gives the little it needs of either (version, creation time, whether it may be
//! spent, credits, rate limits).

use serde::{Deserialize, Serialize};

use crate::KeyHash;
use crate::credits::Credits;
use crate::ratelimit::{self, RateLimit};
use crate::record::{KeyRecord, RECORD_SCHEMA, RecordError};

/// An identity as the edge sees it: its shared credits and rate limits, versioned like a key's
/// record. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdentityRecord {
    pub schema: u32,
    pub id: String,
    pub workspace_id: String,
    pub external_id: String,
    /// Grows by one on every change; a copy with a smaller version is older.
    pub version: u64,
    pub max_staleness_ms: u64,
    /// The identity's credits, spent by all its keys; `None`: unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::credits::as_text")]
    pub credits: Option<Credits>,
    /// The identity's named rate limits, shared by all its keys (none: unlimited).
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "crate::ratelimit::as_text")]
    pub ratelimits: Vec<RateLimit>,
    /// The anchor of its credits' refill periods.
    pub created_at: i64,
    pub updated_at: i64,
}

impl IdentityRecord {
    /// The hash naming an identity's record at the edge (memory, Cache API, KV, its KeyState
    /// object, and the holders' shares of its credits and limits): SHA-256 of `identity:<id>`.
    pub fn hash_of(identity_id: &str) -> KeyHash {
        KeyHash::of(&format!("identity:{identity_id}"))
    }

    /// Whether going from `self` to `next` may refuse a verification that was admitted: credits
    /// given or lowered, a rate limit added or lowered. Such a change is purged at once.
    pub fn is_tightened_by(&self, next: &IdentityRecord) -> bool {
        let credits = match (&self.credits, &next.credits) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(old), Some(new)) => old.is_tightened_by(new),
        };
        credits || ratelimit::tightened(&self.ratelimits, &next.ratelimits) || self.workspace_id != next.workspace_id
    }

    pub fn from_json(text: &str) -> Result<IdentityRecord, RecordError> {
        let record: IdentityRecord = serde_json::from_str(text)?;
        if record.schema != RECORD_SCHEMA {
            return Err(RecordError::UnknownSchema(record.schema));
        }
        Ok(record)
    }

    /// The bytes this record takes in memory beyond its own size.
    pub fn heap_bytes(&self) -> usize {
        let limits = self.ratelimits.iter().map(|l| l.name.len() + std::mem::size_of::<RateLimit>()).sum::<usize>();
        self.id.len() + self.workspace_id.len() + self.external_id.len() + limits
    }
}

impl crate::freshness::Versioned for IdentityRecord {
    fn version(&self) -> u64 {
        self.version
    }
    /// No later version of an identity is bound to admit less: none is final.
    fn is_final(&self) -> bool {
        false
    }
}

/// The KV key under which an identity's record is stored.
pub fn kv_key_for_identity(identity_id: &str) -> String {
    format!("identity:{}", IdentityRecord::hash_of(identity_id).to_hex())
}

/// What a KeyState object that grants credits and rate-limit tokens holds: a key's record or
/// an identity's. The two JSON shapes exclude each other (a key has a hash and a status, an
/// identity an external id), so the text says which it is.
#[derive(Debug, Clone, PartialEq)]
pub enum Spender {
    Key(Box<KeyRecord>),
    Identity(IdentityRecord),
}

impl Spender {
    /// The record in `text`: a key's, else an identity's.
    pub fn from_json(text: &str) -> Result<Spender, RecordError> {
        match KeyRecord::from_json(text) {
            Ok(key) => Ok(Spender::Key(Box::new(key))),
            Err(key_error) => IdentityRecord::from_json(text).map(Spender::Identity).map_err(|_| key_error),
        }
    }

    pub fn version(&self) -> u64 {
        match self {
            Spender::Key(k) => k.version,
            Spender::Identity(i) => i.version,
        }
    }

    /// The anchor of refill periods.
    pub fn created_at(&self) -> i64 {
        match self {
            Spender::Key(k) => k.created_at,
            Spender::Identity(i) => i.created_at,
        }
    }

    /// Whether it may be spent from at `now_ms`: a key active, enabled and unexpired; an
    /// identity always (a key's own status is decided before its identity is asked).
    pub fn is_usable(&self, now_ms: i64) -> bool {
        match self {
            Spender::Key(k) => k.is_usable(now_ms),
            Spender::Identity(_) => true,
        }
    }

    pub fn credits(&self) -> Option<&Credits> {
        match self {
            Spender::Key(k) => k.credits.as_ref(),
            Spender::Identity(i) => i.credits.as_ref(),
        }
    }

    pub fn ratelimits(&self) -> &[RateLimit] {
        match self {
            Spender::Key(k) => &k.ratelimits,
            Spender::Identity(i) => &i.ratelimits,
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::ratelimit::Mode;

    pub(crate) fn sample() -> IdentityRecord {
        IdentityRecord {
            schema: RECORD_SCHEMA,
            id: "idn_1".into(),
            workspace_id: "ws_1".into(),
            external_id: "customer-7".into(),
            version: 1,
            max_staleness_ms: 1_000,
            credits: Some(Credits { set_to: 100, set_version: 1, added: 0, refill: None }),
            ratelimits: vec![RateLimit {
                name: "api".into(),
                limit: 10,
                duration_ms: 1_000,
                cost: 1,
                mode: Mode::Exact,
                auto: true,
            }],
            created_at: 5,
            updated_at: 5,
        }
    }

    #[test]
    fn round_trip_schema_and_names() {
        let record = sample();
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(IdentityRecord::from_json(&text).unwrap(), record);
        let future = text.replace("\"schema\":1", "\"schema\":2");
        assert!(matches!(IdentityRecord::from_json(&future), Err(RecordError::UnknownSchema(2))));
        assert_ne!(IdentityRecord::hash_of("x"), KeyHash::of("x"));
        assert_ne!(IdentityRecord::hash_of("x"), crate::policy::ApiRecord::hash_of("x"));
        assert!(kv_key_for_identity("x").starts_with("identity:"));
    }

    #[test]
    fn tightening() {
        let old = sample();
        let mut next = old.clone();
        next.version = 2;
        assert!(!old.is_tightened_by(&next), "a version alone tightens nothing");
        next.ratelimits[0].limit = 5;
        assert!(old.is_tightened_by(&next), "a lowered limit");
        let mut next = old.clone();
        next.ratelimits.clear();
        next.credits = None;
        assert!(!old.is_tightened_by(&next), "removing limits and credits loosens");
        assert!(next.is_tightened_by(&old), "giving them tightens");
        let mut lower = old.clone();
        lower.credits = Some(Credits { set_to: 10, set_version: 2, added: 0, refill: None });
        assert!(old.is_tightened_by(&lower));
    }

    #[test]
    fn a_spender_is_told_apart_by_its_text() {
        let identity = sample();
        let text = serde_json::to_string(&identity).unwrap();
        let spender = Spender::from_json(&text).unwrap();
        assert_eq!(spender, Spender::Identity(identity));
        assert!(spender.is_usable(i64::MAX));
        assert_eq!((spender.version(), spender.created_at()), (1, 5));
        let mut key = crate::record::tests::sample(KeyHash::of("k"));
        key.status = crate::KeyStatus::Revoked;
        let spender = Spender::from_json(&serde_json::to_string(&key).unwrap()).unwrap();
        assert!(matches!(spender, Spender::Key(_)));
        assert!(!spender.is_usable(0), "a revoked key is never spent");
        assert!(Spender::from_json("{}").is_err());
    }
}
