//! Records stored in Workers KV and read by the edge. Serialization is a boundary: every record
//! carries its schema number, and readers reject a schema they do not know.

use serde::{Deserialize, Serialize};

use crate::KeyHash;
use crate::credits::Credits;
use crate::policy::Policy;
use crate::ratelimit::{self, RateLimit};
use crate::scope::Scopes;

/// The schema written by this version of Keyward.
pub const RECORD_SCHEMA: u32 = 1;
/// How long an edge copy is trusted without being read again, unless the API says otherwise.
pub const DEFAULT_MAX_STALENESS_MS: u64 = 1_000;

/// Where a key is in its life. Revoked and deleted are both final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Active,
    Revoked,
    Deleted,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Revoked => "revoked",
            KeyStatus::Deleted => "deleted",
        }
    }

    pub fn parse(text: &str) -> Option<KeyStatus> {
        match text {
            "active" => Some(KeyStatus::Active),
            "revoked" => Some(KeyStatus::Revoked),
            "deleted" => Some(KeyStatus::Deleted),
            _ => None,
        }
    }
}

/// An API key as the edge sees it. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub schema: u32,
    pub id: String,
    pub hash: KeyHash,
    pub api_id: String,
    pub workspace_id: String,
    pub name: Option<String>,
    /// The display start (`sk_live_3xQ9ab`), never the secret.
    pub start: String,
    pub owner_id: Option<String>,
    pub meta: Meta,
    pub enabled: bool,
    pub status: KeyStatus,
    pub expires_at: Option<i64>,
    pub permissions: Vec<String>,
    /// Grows by one on every change; a copy with a smaller version is older.
    pub version: u64,
    pub max_staleness_ms: u64,
    pub created_at: i64,
    pub updated_at: i64,
    /// The key's usage credits; `None`: unlimited. Stored as one string
    /// ([`crate::credits::as_text`]).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "crate::credits::as_text")]
    pub credits: Option<Credits>,
    /// The key's named rate limits (none: unlimited). Stored as one string
    /// ([`crate::ratelimit::as_text`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "crate::ratelimit::as_text")]
    pub ratelimits: Vec<RateLimit>,
    /// The key's own allow and deny lists of client IPs and countries (empty: none).
    #[serde(default, skip_serializing_if = "Policy::is_empty", with = "crate::policy::as_text")]
    pub policy: Policy,
    /// The identity whose shared credits and rate limits the key spends too, beside its own
    /// (`crate::identity`); `None`: only its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_id: Option<String>,
}

impl KeyRecord {
    /// Whether going from `self` to `next` can turn an accepted verification into a rejected
    /// one: revoke, delete, disable, expiry set or moved earlier, a permission removed, or a
    /// move to another API or workspace, credits given to an unlimited key or lowered (see
    /// [`Credits::is_tightened_by`]), a rate limit added or lowered ([`ratelimit::tightened`]),
    /// or its allow and deny lists tightened ([`Policy::is_tightened_by`]), or an identity
    /// attached or changed (its limits and credits apply too; detaching loosens). Such a change must
    /// be purged from edge copies at once.
    pub fn is_tightened_by(&self, next: &KeyRecord) -> bool {
        let expiry_earlier = match (self.expires_at, next.expires_at) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(old), Some(new)) => new < old,
        };
        (self.status != next.status && next.status != KeyStatus::Active)
            || (self.enabled && !next.enabled)
            || expiry_earlier
            || self.permissions.iter().any(|p| !next.permissions.contains(p))
            || self.api_id != next.api_id
            || self.workspace_id != next.workspace_id
            || self.policy.is_tightened_by(&next.policy)
            || match (&self.credits, &next.credits) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(old), Some(new)) => old.is_tightened_by(new),
            }
            || ratelimit::tightened(&self.ratelimits, &next.ratelimits)
            || (next.identity_id.is_some() && self.identity_id != next.identity_id)
    }

    /// Whether the key may be spent from at `now_ms`: active, enabled and unexpired.
    pub fn is_usable(&self, now_ms: i64) -> bool {
        self.status == KeyStatus::Active && self.enabled && self.expires_at.is_none_or(|at| now_ms < at)
    }
}

impl KeyRecord {
    /// The bytes this record takes in memory beyond its own size (its strings, meta text and
    /// permissions), for [`crate::budget::Weigh`].
    pub fn heap_bytes(&self) -> usize {
        let strings = [Some(&self.id), Some(&self.api_id), Some(&self.workspace_id), self.name.as_ref()]
            .into_iter()
            .chain([Some(&self.start), self.owner_id.as_ref()])
            .flatten()
            .map(|s| s.len())
            .sum::<usize>();
        let permissions = self.permissions.iter().map(|p| p.len() + std::mem::size_of::<String>()).sum::<usize>();
        strings + self.meta.as_str().len() + permissions + self.policy.heap_bytes()
    }
}

impl RootKeyRecord {
    /// The bytes this record takes in memory beyond its own size, for [`crate::budget::Weigh`].
    pub fn heap_bytes(&self) -> usize {
        // A scope names at most one API id; 64 bytes covers it with room.
        self.id.len() + self.workspace_id.len() + self.scopes.0.len() * (std::mem::size_of::<crate::Scope>() + 64)
    }
}

/// A key's meta: a JSON object, kept as its text. The edge parses it only to check it is an
/// object, never into a map (a parsed 16 KiB object took 200-280 KB of isolate memory), and
/// answers the text as it is.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct Meta(Box<serde_json::value::RawValue>);

impl Meta {
    /// The meta of this JSON object.
    pub fn from_map(map: &serde_json::Map<String, serde_json::Value>) -> Meta {
        let text = serde_json::to_string(map).expect("a JSON map always serializes");
        Meta(serde_json::value::RawValue::from_string(text).expect("serde_json wrote valid JSON"))
    }

    /// The object itself, parsed.
    pub fn to_map(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(self.0.get()).expect("Meta holds a JSON object")
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl Default for Meta {
    fn default() -> Meta {
        Meta::from_map(&serde_json::Map::new())
    }
}

impl PartialEq for Meta {
    fn eq(&self, other: &Meta) -> bool {
        self.as_str() == other.as_str()
    }
}

impl<'de> Deserialize<'de> for Meta {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Meta, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
        // An object without parsing it: RawValue is valid JSON, so `{...}` is an object.
        if !raw.get().trim_start().starts_with('{') {
            return Err(serde::de::Error::custom("meta must be a JSON object"));
        }
        Ok(Meta(raw))
    }
}

/// A root key as the edge sees it: enough to authenticate a caller of the verify route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootKeyRecord {
    pub schema: u32,
    pub id: String,
    pub hash: KeyHash,
    pub workspace_id: String,
    pub scopes: Scopes,
    pub status: KeyStatus,
    pub version: u64,
    pub updated_at: i64,
}

/// Why a stored record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record is not valid JSON for its type: {0}")]
    Json(#[from] serde_json::Error),
    #[error("record schema {0} is not known to this version (expected {RECORD_SCHEMA})")]
    UnknownSchema(u32),
}

impl KeyRecord {
    pub fn from_json(text: &str) -> Result<KeyRecord, RecordError> {
        let record: KeyRecord = serde_json::from_str(text)?;
        check_schema(record.schema)?;
        Ok(record)
    }
}

impl RootKeyRecord {
    pub fn from_json(text: &str) -> Result<RootKeyRecord, RecordError> {
        let record: RootKeyRecord = serde_json::from_str(text)?;
        check_schema(record.schema)?;
        Ok(record)
    }
}

fn check_schema(schema: u32) -> Result<(), RecordError> {
    if schema == RECORD_SCHEMA { Ok(()) } else { Err(RecordError::UnknownSchema(schema)) }
}

#[cfg(test)]
pub(crate) mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    pub(crate) fn sample(hash: KeyHash) -> KeyRecord {
        KeyRecord {
            schema: RECORD_SCHEMA,
            id: "key_1".into(),
            hash,
            api_id: "api_1".into(),
            workspace_id: "ws_1".into(),
            name: Some("ci".into()),
            start: "sk_live_111111".into(),
            owner_id: Some("user_9".into()),
            meta: Meta::default(),
            enabled: true,
            status: KeyStatus::Active,
            expires_at: None,
            permissions: vec!["read".into(), "write".into()],
            version: 1,
            max_staleness_ms: DEFAULT_MAX_STALENESS_MS,
            created_at: 1_000,
            updated_at: 1_000,
            credits: None,
            ratelimits: Vec::new(),
            policy: Policy::default(),
            identity_id: None,
        }
    }

    #[test]
    fn round_trip_and_schema_check() {
        let record = sample(KeyHash::of("x"));
        let text = serde_json::to_string(&record).unwrap();
        assert_eq!(KeyRecord::from_json(&text).unwrap(), record);
        let future = text.replace("\"schema\":1", "\"schema\":2");
        assert!(matches!(KeyRecord::from_json(&future), Err(RecordError::UnknownSchema(2))));
        assert!(matches!(KeyRecord::from_json("{}"), Err(RecordError::Json(_))));
    }

    #[test]
    fn tightening_table() {
        fn check(edit: fn(&mut KeyRecord), expected: bool) {
            let old = sample(KeyHash::of("x"));
            let mut new = old.clone();
            edit(&mut new);
            assert_eq!(old.is_tightened_by(&new), expected);
        }
        check(|_| {}, false);
        check(|r| r.status = KeyStatus::Revoked, true);
        check(|r| r.status = KeyStatus::Deleted, true);
        check(|r| r.enabled = false, true);
        check(|r| r.expires_at = Some(5), true);
        check(|r| r.permissions.pop().map(drop).unwrap_or(()), true);
        check(|r| r.permissions.push("admin".into()), false);
        check(|r| r.name = Some("renamed".into()), false);
        check(|r| r.meta = Meta::from_map(&serde_json::json!({ "plan": 1 }).as_object().unwrap().clone()), false);
        check(|r| r.api_id = "api_2".into(), true);
        check(|r| r.policy.deny_countries.push("RU".parse().unwrap()), true);
        let credits = Credits { set_to: 5, set_version: 1, added: 0, refill: None };
        check(|r| r.credits = Some(Credits { set_to: 5, set_version: 1, added: 0, refill: None }), true);
        let mut limited = sample(KeyHash::of("x"));
        limited.credits = Some(credits.clone());
        let mut more = limited.clone();
        more.credits = Some(Credits { added: 3, ..credits.clone() });
        assert!(!limited.is_tightened_by(&more));
        assert!(more.is_tightened_by(&limited));
        let mut unlimited = limited.clone();
        unlimited.credits = None;
        assert!(!limited.is_tightened_by(&unlimited));
        let mut expiring = sample(KeyHash::of("x"));
        expiring.expires_at = Some(100);
        let mut later = expiring.clone();
        later.expires_at = Some(200);
        assert!(!expiring.is_tightened_by(&later));
        assert!(later.is_tightened_by(&expiring));
        let mut never = expiring.clone();
        never.expires_at = None;
        assert!(!expiring.is_tightened_by(&never));
        let limit = api_limit();
        let mut rated = sample(KeyHash::of("x"));
        rated.ratelimits = vec![limit.clone()];
        assert!(sample(KeyHash::of("x")).is_tightened_by(&rated));
        assert!(!rated.is_tightened_by(&sample(KeyHash::of("x"))));
        let mut lower = rated.clone();
        lower.ratelimits[0].limit = 10;
        assert!(rated.is_tightened_by(&lower));
        assert!(!lower.is_tightened_by(&rated));
    }

    /// An exact limit of 50 per 10 s named `api`.
    fn api_limit() -> RateLimit {
        RateLimit {
            name: "api".into(),
            limit: 50,
            duration_ms: 10_000,
            cost: 1,
            mode: ratelimit::Mode::Exact,
            auto: true,
        }
    }

    #[test]
    fn ratelimits_travel_as_text() {
        let mut record = sample(KeyHash::of("x"));
        record.ratelimits = vec![api_limit()];
        let text = serde_json::to_string(&record).unwrap();
        assert!(text.contains(r#""ratelimits":"api 50 10000 1 e a""#), "{text}");
        assert_eq!(KeyRecord::from_json(&text).unwrap(), record);
        let without = serde_json::to_string(&sample(KeyHash::of("x"))).unwrap();
        assert!(!without.contains("ratelimits"));
    }

    #[test]
    fn credits_travel_as_text() {
        let mut record = sample(KeyHash::of("x"));
        record.credits = Some(Credits { set_to: 5, set_version: 1, added: 2, refill: None });
        let text = serde_json::to_string(&record).unwrap();
        assert!(text.contains(r#""credits":"5 1 2""#), "{text}");
        assert_eq!(KeyRecord::from_json(&text).unwrap(), record);
        let without = serde_json::to_string(&sample(KeyHash::of("x"))).unwrap();
        assert!(!without.contains("credits"));
        assert_eq!(KeyRecord::from_json(&without).unwrap().credits, None);
    }

    #[test]
    fn status_names() {
        for status in [KeyStatus::Active, KeyStatus::Revoked, KeyStatus::Deleted] {
            assert_eq!(KeyStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(KeyStatus::parse("gone"), None);
    }

    #[test]
    fn meta_is_kept_as_text_and_must_be_an_object() {
        let record = sample(KeyHash::of("k"));
        let mut json = serde_json::to_value(&record).unwrap();
        json["meta"] = serde_json::json!({ "plan": "pro", "seats": [1, 2] });
        let text = serde_json::to_string(&json).unwrap();
        let read = KeyRecord::from_json(&text).unwrap();
        assert_eq!(read.meta.as_str(), r#"{"plan":"pro","seats":[1,2]}"#);
        assert_eq!(read.meta.to_map()["plan"], "pro");
        assert_eq!(serde_json::to_value(&read).unwrap()["meta"]["seats"][1], 2);
        for not_an_object in [serde_json::json!([1]), serde_json::json!("x"), serde_json::json!(null)] {
            json["meta"] = not_an_object.clone();
            let text = serde_json::to_string(&json).unwrap();
            assert!(KeyRecord::from_json(&text).is_err(), "{not_an_object}");
        }
    }
}
