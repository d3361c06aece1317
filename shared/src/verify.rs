//! The verification decision: one pure function from a record (or its absence), the caller,
//! the request and the time to an outcome code. The edge and the control plane both call it, so
//! they cannot disagree.

use serde::{Deserialize, Serialize};

use crate::KeyHash;
use crate::credits::{MAX_IDEMPOTENCY_KEY, is_idempotency_key};
use crate::ratelimit::{self, LimitAsk};
use crate::record::{KeyRecord, KeyStatus, Meta};
use crate::scope::{KeyAction, Scope, Scopes};
use crate::usage::ClientInfo;

/// The most credits one verification may spend (`cost`), as a rate limit's cost is bounded:
/// a caller's number that holders add into the rate they ask leases for.
pub const MAX_COST: u64 = ratelimit::MAX_LIMIT;

/// Most permissions a verify request may ask for.
pub const MAX_REQUESTED_PERMISSIONS: usize = 64;
/// Largest verify request body accepted, at the edge and at the origin.
pub const MAX_VERIFY_BODY: usize = 4 * 1024;

/// `POST /v1/keys/verify`, at the edge and at the origin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_id: Option<String>,
    /// Names that must all be present on the key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// The end user the caller verifies for, recorded in the usage event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientInfo>,
    /// The credits this verification spends when the key has credits (default 1; 0 checks
    /// that one is left without spending it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<u64>,
    /// Settles the spend at the key's authority; a retry with the same key within 10 minutes,
    /// in any region, gets the same credits answer and spends nothing more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Rate limits of the key to apply beside its automatic ones, by name, each with an
    /// optional cost (default: the limit's own). A name the key does not carry is ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ratelimits: Vec<LimitAsk>,
}

impl VerifyRequest {
    /// A verify request from its JSON body, or what is wrong with it: a body over
    /// [`MAX_VERIFY_BODY`], JSON that is not a verify request, or more than
    /// [`MAX_REQUESTED_PERMISSIONS`] permissions.
    pub fn from_json(body: &[u8]) -> Result<VerifyRequest, RequestError> {
        if body.len() > MAX_VERIFY_BODY {
            return Err(RequestError::TooLarge);
        }
        let request: VerifyRequest = serde_json::from_slice(body).map_err(|e| RequestError::Invalid(e.to_string()))?;
        request.check()?;
        Ok(request)
    }

    /// Refuses a request asking for more than [`MAX_REQUESTED_PERMISSIONS`] permissions,
    /// naming its client with fields over their limits, or a `cost` over [`MAX_COST`].
    pub fn check(&self) -> Result<(), RequestError> {
        if self.permissions.len() > MAX_REQUESTED_PERMISSIONS {
            return Err(RequestError::TooManyPermissions(self.permissions.len()));
        }
        if let Some(client) = &self.client {
            client.check().map_err(RequestError::Client)?;
        }
        check_limit_asks(&self.ratelimits)?;
        if self.cost.is_some_and(|c| c > MAX_COST) {
            return Err(RequestError::Invalid(format!("cost is 0 to {MAX_COST}")));
        }
        if self.idempotency_key.as_ref().is_some_and(|k| !is_idempotency_key(k)) {
            let message = format!("idempotency_key is 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters but `|`");
            return Err(RequestError::Invalid(message));
        }
        Ok(())
    }
}

/// Refuses more than [`ratelimit::MAX_LIMITS`] named limits, a name that cannot be a limit's,
/// or a cost of 0.
fn check_limit_asks(asks: &[LimitAsk]) -> Result<(), RequestError> {
    let bad = |m: String| Err(RequestError::Invalid(m));
    if asks.len() > ratelimit::MAX_LIMITS {
        return bad(format!("ratelimits names at most {} limits", ratelimit::MAX_LIMITS));
    }
    for ask in asks {
        if !ratelimit::is_name(&ask.name) {
            return bad(format!("ratelimits: `{}` cannot name a limit", ask.name));
        }
        if ask.cost.is_some_and(|c| !(1..=ratelimit::MAX_LIMIT).contains(&c)) {
            return bad(format!("ratelimits: a cost is 1 to {}", ratelimit::MAX_LIMIT));
        }
    }
    Ok(())
}

/// Why a verify request was refused before any lookup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("a verify request is at most {MAX_VERIFY_BODY} bytes")]
    TooLarge,
    #[error("invalid verify request: {0}")]
    Invalid(String),
    #[error("a verify request asks for at most {MAX_REQUESTED_PERMISSIONS} permissions, not {0}")]
    TooManyPermissions(usize),
    #[error("invalid verify request: {0}")]
    Client(String),
}

/// The outcome of a verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Code {
    Valid,
    NotFound,
    Revoked,
    Disabled,
    Expired,
    /// The key's or its API's allow or deny lists refuse this client.
    Forbidden,
    InsufficientPermissions,
    RateLimited,
    UsageExceeded,
    Malformed,
    Unavailable,
}

impl Code {
    /// Whether a key decided so passed existence, status and expiry checks: `VALID` or
    /// `INSUFFICIENT_PERMISSIONS`, the decisions allow and deny lists may still refuse.
    pub fn passed_status_checks(self) -> bool {
        matches!(self, Code::Valid | Code::InsufficientPermissions)
    }
}

/// Who is asking: the workspace and scopes of the root key in `Authorization`.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub workspace_id: &'a str,
    pub scopes: &'a Scopes,
}

/// What [`decide`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub code: Code,
    /// The requested permissions the key holds (all of them when the code is `VALID`).
    pub permissions_matched: Vec<String>,
}

impl Decision {
    fn of(code: Code) -> Decision {
        Decision { code, permissions_matched: Vec::new() }
    }

    /// `UNAVAILABLE`: what the decision rests on (a record, an API's lists) could not be
    /// confirmed, so the request fails closed.
    pub fn unavailable() -> Decision {
        Decision::of(Code::Unavailable)
    }

    /// A `VALID` decision one of the key's rate limits refused (`RATE_LIMITED`), or that could
    /// not be decided (`UNAVAILABLE`: an exact limit's authority did not answer). Any other
    /// decision stays as it is.
    pub fn refused_by_limits(self, code: Code) -> Decision {
        if self.code != Code::Valid {
            return self;
        }
        match code {
            Code::Valid => self,
            Code::RateLimited => Decision { code, ..self },
            _ => Decision::of(Code::Unavailable),
        }
    }

    /// A `VALID` decision the key's credits refused: `USAGE_EXCEEDED`, or `UNAVAILABLE` when
    /// they could not be asked. Any other decision stays as it is (credits come last).
    pub fn refused_by_credits(self, code: Code) -> Decision {
        if self.code != Code::Valid {
            return self;
        }
        match code {
            Code::Valid => self,
            Code::UsageExceeded => Decision { code, ..self },
            _ => Decision::of(Code::Unavailable),
        }
    }

    /// The decision once the key's and its API's allow and deny lists were asked: a key that
    /// passed the status checks (`VALID` or `INSUFFICIENT_PERMISSIONS`) is `FORBIDDEN` when
    /// they do not admit the client; any other decision stays as it is (they come after
    /// revoked, disabled and expired, before permissions, rate limits and credits).
    pub fn forbidden_unless(self, admitted: bool) -> Decision {
        if !admitted && self.code.passed_status_checks() { Decision::of(Code::Forbidden) } else { self }
    }

    /// Whether the answer may say anything about the key (its id, owner, meta). Never for a key
    /// the caller may not see, so that existence does not leak.
    pub fn reveals_key(&self) -> bool {
        !matches!(self.code, Code::NotFound | Code::Malformed | Code::Unavailable)
    }
}

/// Decides the outcome for the key whose hash is `presented`, given its record if one was found.
///
/// A record of another workspace, of an API other than the one named, of an API the caller may
/// not verify, or one that was deleted, is `NOT_FOUND`. Then in order: revoked, disabled, expired
/// (at or after `expires_at`), missing permissions.
pub fn decide(
    record: Option<&KeyRecord>,
    presented: &KeyHash,
    caller: Caller<'_>,
    request: &VerifyRequest,
    now_ms: i64,
) -> Decision {
    let Some(record) = record else {
        return Decision::of(Code::NotFound);
    };
    let visible = record.hash == *presented
        && record.workspace_id == caller.workspace_id
        && request.api_id.as_ref().is_none_or(|api| *api == record.api_id)
        && caller.scopes.grants(&Scope::key(&record.api_id, KeyAction::VerifyKey))
        && record.status != KeyStatus::Deleted;
    if !visible {
        return Decision::of(Code::NotFound);
    }
    if record.status == KeyStatus::Revoked {
        return Decision::of(Code::Revoked);
    }
    if !record.enabled {
        return Decision::of(Code::Disabled);
    }
    if record.expires_at.is_some_and(|at| now_ms >= at) {
        return Decision::of(Code::Expired);
    }
    let (matched, missing): (Vec<&String>, Vec<&String>) =
        request.permissions.iter().partition(|p| record.permissions.contains(p));
    let permissions_matched = matched.into_iter().cloned().collect();
    let code = if missing.is_empty() { Code::Valid } else { Code::InsufficientPermissions };
    Decision { code, permissions_matched }
}

/// The decision when the best record there is could not be confirmed in time (see
/// [`crate::freshness::resolve`]): the edge fails closed. A caller who may not see the key
/// learns only that it does not exist (its workspace, API and hash never change, so the
/// unconfirmed record answers that correctly); anyone else gets `UNAVAILABLE`, never the
/// unconfirmed record's own outcome.
pub fn decide_unconfirmed(
    unconfirmed: &KeyRecord,
    presented: &KeyHash,
    caller: Caller<'_>,
    request: &VerifyRequest,
    now_ms: i64,
) -> Decision {
    match decide(Some(unconfirmed), presented, caller, request, now_ms).code {
        Code::NotFound => Decision::of(Code::NotFound),
        _ => Decision::of(Code::Unavailable),
    }
}

/// Where the edge found the record it answered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Memory,
    Cache,
    Kv,
    /// The key's authority (its KeyState Durable Object) held a newer record than any copy.
    Authority,
    /// The control plane's database (the origin's own, strongly consistent answer).
    Origin,
    /// A `NOT_FOUND` this isolate gave the caller's workspace for the same key moments before
    /// (the key does not exist, or is another workspace's), answered again without a lookup.
    Remembered,
}

/// The answer to a well-formed verify request (HTTP 200 whatever the code).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyResponse {
    pub valid: bool,
    pub code: Code,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    pub permissions: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// The version of the record the outcome was decided on, where the answer may say anything
    /// about the key ([`Decision::reveals_key`]): a run can tell an answer given before a
    /// change from one given after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The deciding clock's time (Unix milliseconds) when the outcome was decided, after the
    /// record was found: what to compare with the moment of a revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at_ms: Option<u64>,
    /// The key's credits, when it has them and the verification reached them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<CreditsLeft>,
    /// The rate limits the verification was checked against, where it reached them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ratelimits: Vec<LimitLeft>,
}

/// What a verify answer says of one rate limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitLeft {
    pub name: String,
    /// Tokens the answering holder could spend now without waiting: its share, and what the
    /// authority could still grant at its last contact (`exact`), or its own count (`local`).
    pub remaining: u64,
    /// When the limit's schedule is empty again (its whole burst available), Unix ms.
    pub reset_at: i64,
    /// How long until the next token falls due (0: now).
    pub retry_after_ms: u64,
}

/// What a verify answer says of a key's credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditsLeft {
    /// An upper bound of what remains globally: what the answering holder knew at its last
    /// contact with the key's authority (the balance and every share leased out), less what it
    /// spent since. Other holders may have spent some of it.
    pub remaining: u64,
}

impl VerifyResponse {
    /// The answer for a decision; details of the key only where [`Decision::reveals_key`].
    pub fn new(decision: Decision, record: Option<&KeyRecord>, source: Option<Source>) -> VerifyResponse {
        let shown = record.filter(|_| decision.reveals_key());
        VerifyResponse {
            valid: decision.code == Code::Valid,
            code: decision.code,
            key_id: shown.map(|r| r.id.clone()),
            api_id: shown.map(|r| r.api_id.clone()),
            name: shown.and_then(|r| r.name.clone()),
            owner_id: shown.and_then(|r| r.owner_id.clone()),
            meta: shown.map(|r| r.meta.clone()),
            expires_at: shown.and_then(|r| r.expires_at),
            // Where a key that is not found was looked for would tell another workspace's key
            // (found in memory, the cache or the authority) from one that does not exist; an
            // answer remembered for the workspace is either kind alike.
            source: source.filter(|s| decision.code != Code::NotFound || *s == Source::Remembered),
            version: shown.map(|r| r.version),
            decided_at_ms: None,
            credits: None,
            ratelimits: Vec::new(),
            permissions: decision.permissions_matched,
        }
    }

    /// The same answer, saying it was decided at `decided_at_ms`.
    pub fn decided_at(self, decided_at_ms: u64) -> VerifyResponse {
        VerifyResponse { decided_at_ms: Some(decided_at_ms), ..self }
    }

    /// The same answer, saying what remains of the key's credits.
    pub fn with_credits(self, remaining: u64) -> VerifyResponse {
        VerifyResponse { credits: Some(CreditsLeft { remaining }), ..self }
    }

    /// The same answer, saying what is left of the rate limits it was checked against.
    pub fn with_limits(self, ratelimits: Vec<LimitLeft>) -> VerifyResponse {
        VerifyResponse { ratelimits, ..self }
    }

    /// The answer for a key that failed the format or checksum: no lookup was made.
    pub fn malformed() -> VerifyResponse {
        VerifyResponse::new(Decision::of(Code::Malformed), None, None)
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;
    use crate::record::tests::sample;

    const NOW: i64 = 10_000;

    struct Case {
        name: &'static str,
        edit: fn(&mut KeyRecord),
        api_id: Option<&'static str>,
        permissions: &'static [&'static str],
        scopes: &'static [&'static str],
        expected: Code,
    }

    const ALL_VERIFY: &[&str] = &["api.*.verify_key"];

    fn check(case: &Case) {
        let presented = KeyHash::of("sk_live_presented");
        let mut record = sample(presented);
        (case.edit)(&mut record);
        let scopes = Scopes(case.scopes.iter().map(|s| s.parse().unwrap()).collect());
        let caller = Caller { workspace_id: "ws_1", scopes: &scopes };
        let request = VerifyRequest {
            key: "sk_live_presented".into(),
            api_id: case.api_id.map(str::to_owned),
            permissions: case.permissions.iter().map(|p| p.to_string()).collect(),
            ..VerifyRequest::default()
        };
        let decision = decide(Some(&record), &presented, caller, &request, NOW);
        assert_eq!(decision.code, case.expected, "{}", case.name);
    }

    #[test]
    fn decision_table() {
        let cases = [
            Case {
                name: "plain valid",
                edit: |_| {},
                api_id: None,
                permissions: &[],
                scopes: ALL_VERIFY,
                expected: Code::Valid,
            },
            Case {
                name: "named api",
                edit: |_| {},
                api_id: Some("api_1"),
                permissions: &[],
                scopes: ALL_VERIFY,
                expected: Code::Valid,
            },
            Case {
                name: "scoped to its api",
                edit: |_| {},
                api_id: None,
                permissions: &[],
                scopes: &["api.api_1.verify_key"],
                expected: Code::Valid,
            },
            Case {
                name: "other api named",
                edit: |_| {},
                api_id: Some("api_2"),
                permissions: &[],
                scopes: ALL_VERIFY,
                expected: Code::NotFound,
            },
            Case {
                name: "caller scoped to other api",
                edit: |_| {},
                api_id: None,
                permissions: &[],
                scopes: &["api.api_2.verify_key"],
                expected: Code::NotFound,
            },
            Case {
                name: "caller without verify",
                edit: |_| {},
                api_id: None,
                permissions: &[],
                scopes: &["api.*.read_key"],
                expected: Code::NotFound,
            },
            Case {
                name: "other workspace",
                edit: |r| r.workspace_id = "ws_2".into(),
                api_id: None,
                permissions: &[],
                scopes: ALL_VERIFY,
                expected: Code::NotFound,
            },
            Case {
                name: "hash mismatch",
                edit: |r| r.hash = KeyHash::of("other"),
                api_id: None,
                permissions: &[],
                scopes: ALL_VERIFY,
                expected: Code::NotFound,
            },
            Case {
                name: "deleted",
                edit: |r| r.status = KeyStatus::Deleted,
                api_id: None,
                permissions: &[],
                scopes: ALL_VERIFY,
                expected: Code::NotFound,
            },
            Case {
                name: "revoked",
                edit: |r| r.status = KeyStatus::Revoked,
                api_id: None,
                permissions: &[],
                scopes: ALL_VERIFY,
                expected: Code::Revoked,
            },
            Case {
                name: "revoked beats disabled",
                edit: |r| {
                    r.status = KeyStatus::Revoked;
                    r.enabled = false
                },
                api_id: None,
                permissions: &[],
                scopes: ALL_VERIFY,
                expected: Code::Revoked,
            },
            Case {
                name: "disabled",
                edit: |r| r.enabled = false,
                api_id: None,
                permissions: &[],
                scopes: ALL_VERIFY,
                expected: Code::Disabled,
            },
            Case {
                name: "disabled beats expired",
                edit: |r| {
                    r.enabled = false;
                    r.expires_at = Some(1)
                },
                api_id: None,
                permissions: &[],
                scopes: ALL_VERIFY,
                expected: Code::Disabled,
            },
            Case {
                name: "expires exactly now",
                edit: |r| r.expires_at = Some(NOW),
                api_id: None,
                permissions: &[],
                scopes: ALL_VERIFY,
                expected: Code::Expired,
            },
            Case {
                name: "expires a ms later",
                edit: |r| r.expires_at = Some(NOW + 1),
                api_id: None,
                permissions: &[],
                scopes: ALL_VERIFY,
                expected: Code::Valid,
            },
            Case {
                name: "has permissions",
                edit: |_| {},
                api_id: None,
                permissions: &["read", "write"],
                scopes: ALL_VERIFY,
                expected: Code::Valid,
            },
            Case {
                name: "missing one permission",
                edit: |_| {},
                api_id: None,
                permissions: &["read", "admin"],
                scopes: ALL_VERIFY,
                expected: Code::InsufficientPermissions,
            },
            Case {
                name: "expired beats permissions",
                edit: |r| r.expires_at = Some(0),
                api_id: None,
                permissions: &["admin"],
                scopes: ALL_VERIFY,
                expected: Code::Expired,
            },
        ];
        for case in &cases {
            check(case);
        }
    }

    #[test]
    fn absent_record_is_not_found() {
        let scopes = Scopes(vec![]);
        let caller = Caller { workspace_id: "ws_1", scopes: &scopes };
        let request = VerifyRequest { key: "k".into(), ..VerifyRequest::default() };
        assert_eq!(decide(None, &KeyHash::of("k"), caller, &request, NOW).code, Code::NotFound);
    }

    #[test]
    fn response_hides_details_unless_revealed() {
        let record = sample(KeyHash::of("k"));
        let hidden = VerifyResponse::new(Decision::of(Code::NotFound), Some(&record), Some(Source::Kv));
        assert_eq!(hidden.key_id, None);
        assert_eq!(hidden.owner_id, None);
        assert_eq!(hidden.version, None, "a version would tell that the key exists");
        let shown = VerifyResponse::new(Decision::of(Code::Revoked), Some(&record), Some(Source::Kv));
        assert_eq!(shown.key_id.as_deref(), Some("key_1"));
        assert_eq!(shown.version, Some(record.version));
        assert!(!shown.valid);
        let json = serde_json::to_value(shown.decided_at(1_234)).unwrap();
        assert_eq!((json["version"].as_u64(), json["decided_at_ms"].as_u64()), (Some(record.version), Some(1_234)));
        let json = serde_json::to_value(VerifyResponse::malformed()).unwrap();
        assert_eq!(json["code"], "MALFORMED");
        assert_eq!(json["valid"], false);
    }

    #[test]
    fn not_found_never_says_where_it_was_looked_for() {
        for source in [Source::Memory, Source::Cache, Source::Kv, Source::Authority] {
            let answer = VerifyResponse::new(Decision::of(Code::NotFound), None, Some(source));
            assert_eq!(answer.source, None, "{source:?}");
        }
        let found = VerifyResponse::new(Decision::of(Code::Revoked), None, Some(Source::Memory));
        assert_eq!(found.source, Some(Source::Memory));
        let again = VerifyResponse::new(Decision::of(Code::NotFound), None, Some(Source::Remembered));
        assert_eq!(serde_json::to_value(&again).unwrap()["source"], "remembered");
    }

    /// An unconfirmed record is never answered with its own outcome: a caller who may see the
    /// key gets `UNAVAILABLE` whatever the record says, anyone else `NOT_FOUND`.
    #[test]
    fn an_unconfirmed_record_fails_closed() {
        let presented = KeyHash::of("k");
        let all = Scopes(vec!["api.*.verify_key".parse().unwrap()]);
        let none = Scopes(vec!["api.other.verify_key".parse().unwrap()]);
        let request = VerifyRequest { key: "k".into(), ..VerifyRequest::default() };
        type Row<'a> = (&'a str, fn(&mut KeyRecord), &'a Scopes, &'a str, Code);
        let rows: [Row; 5] = [
            ("valid record, caller may see it", |_| {}, &all, "ws_1", Code::Unavailable),
            ("expired record, caller may see it", |r| r.expires_at = Some(0), &all, "ws_1", Code::Unavailable),
            ("disabled record, caller may see it", |r| r.enabled = false, &all, "ws_1", Code::Unavailable),
            ("another workspace's key", |_| {}, &all, "ws_2", Code::NotFound),
            ("caller without a verify scope for its API", |_| {}, &none, "ws_1", Code::NotFound),
        ];
        for (name, edit, scopes, workspace_id, expected) in rows {
            let mut record = sample(presented);
            edit(&mut record);
            let caller = Caller { workspace_id, scopes };
            let decision = decide_unconfirmed(&record, &presented, caller, &request, NOW);
            assert_eq!(decision.code, expected, "{name}");
            assert!(decision.permissions_matched.is_empty(), "{name}");
        }
    }

    #[test]
    fn verify_requests_are_checked_once_for_both_routes() {
        let ok = VerifyRequest::from_json(br#"{"key":"k","permissions":["a"]}"#).unwrap();
        assert_eq!(ok.permissions, ["a"]);
        let big = vec![b' '; MAX_VERIFY_BODY + 1];
        assert_eq!(VerifyRequest::from_json(&big), Err(RequestError::TooLarge));
        assert!(matches!(VerifyRequest::from_json(br#"{"key":"k","extra":1}"#), Err(RequestError::Invalid(_))));
        let many: Vec<String> = (0..=MAX_REQUESTED_PERMISSIONS).map(|i| format!("p{i}")).collect();
        let body = serde_json::to_vec(&serde_json::json!({ "key": "k", "permissions": many })).unwrap();
        assert_eq!(
            VerifyRequest::from_json(&body),
            Err(RequestError::TooManyPermissions(MAX_REQUESTED_PERMISSIONS + 1))
        );
        let at_limit: Vec<String> = many[..MAX_REQUESTED_PERMISSIONS].to_vec();
        let body = serde_json::to_vec(&serde_json::json!({ "key": "k", "permissions": at_limit })).unwrap();
        assert!(VerifyRequest::from_json(&body).is_ok());
        for (cost, ok) in [(0, true), (1, true), (MAX_COST, true), (MAX_COST + 1, false), (u64::MAX, false)] {
            let body = serde_json::to_vec(&serde_json::json!({ "key": "k", "cost": cost })).unwrap();
            assert_eq!(VerifyRequest::from_json(&body).is_ok(), ok, "cost {cost}");
        }
    }

    #[test]
    fn lists_refuse_only_keys_that_passed_the_status_checks() {
        let valid = Decision { code: Code::Valid, permissions_matched: vec!["read".into()] };
        assert_eq!(valid.clone().forbidden_unless(true), valid);
        let forbidden = valid.forbidden_unless(false);
        assert_eq!((forbidden.code, forbidden.reveals_key()), (Code::Forbidden, true));
        assert!(forbidden.permissions_matched.is_empty(), "a refused client learns no permissions");
        assert_eq!(Decision::of(Code::InsufficientPermissions).forbidden_unless(false).code, Code::Forbidden);
        for code in [Code::Revoked, Code::Disabled, Code::Expired, Code::NotFound, Code::Unavailable] {
            assert_eq!(Decision::of(code).forbidden_unless(false).code, code, "{code:?}");
        }
        assert_eq!(serde_json::to_value(Code::Forbidden).unwrap(), "FORBIDDEN");
    }

    #[test]
    fn credits_refuse_only_valid_decisions() {
        let valid = Decision { code: Code::Valid, permissions_matched: vec!["read".into()] };
        assert_eq!(valid.clone().refused_by_credits(Code::Valid), valid);
        let exceeded = valid.clone().refused_by_credits(Code::UsageExceeded);
        assert_eq!((exceeded.code, exceeded.reveals_key()), (Code::UsageExceeded, true));
        let unavailable = valid.refused_by_credits(Code::Unavailable);
        assert_eq!((unavailable.code, unavailable.reveals_key()), (Code::Unavailable, false));
        for code in [Code::Revoked, Code::Disabled, Code::NotFound, Code::InsufficientPermissions] {
            assert_eq!(Decision::of(code).refused_by_credits(Code::UsageExceeded).code, code);
        }
    }
}
