//! `GET`, `PUT` and `PATCH /v1/apis/{id}/policy`: an API's allow and deny lists of client IPs
//! and countries, and its limit override, delivered to the edge like a revocation when they
//! tighten (see docs/design.md, Tightening during an incident). `PUT` replaces the whole policy,
//! `PATCH` only what it names, so two responders changing different lists at once lose nothing;
//! either may name the `version` it read, and is refused (409) if the policy moved on since.
//! Also the lists' input form, shared with the keys' routes.
//!
//! Reading needs `api.<id>.read_key`, changing `api.<id>.update_key` (the lists decide which of
//! the API's keys' verifications are admitted); another workspace's API is `NOT_FOUND`.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use keyward_shared::policy::{ApiRecord, LimitOverride, Policy};
use keyward_shared::{KeyAction, Scope};
use serde::{Deserialize, Serialize};

use super::auth::RootKey;
use super::extract::{Json, Path, check_id};
use super::{AppError, AppState, Reached, Result};
use crate::time::now_ms;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/apis/{id}/policy", get(read).put(replace).patch(amend))
}

/// Allow and deny lists as an admin sends them: CIDR ranges (or addresses) and ISO 3166-1
/// alpha-2 country codes, checked one by one so a bad entry is named in a 400.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyInput {
    #[serde(default)]
    allow_ips: Vec<String>,
    #[serde(default)]
    deny_ips: Vec<String>,
    #[serde(default)]
    allow_countries: Vec<String>,
    #[serde(default)]
    deny_countries: Vec<String>,
}

/// One list's entries, or a 400 naming the first that is not a range or a country code.
fn each<T: std::str::FromStr<Err = keyward_shared::policy::PolicyError>>(
    list: Vec<String>,
    name: &str,
) -> Result<Vec<T>> {
    list.iter().map(|e| e.parse().map_err(|err| AppError::BadRequest(format!("{name}: {err}")))).collect()
}

impl PolicyInput {
    /// The lists, or a 400 naming the first entry that is not a range or a country code.
    pub(super) fn parse(self) -> Result<Policy> {
        let policy = Policy {
            allow_ips: each(self.allow_ips, "allow_ips")?,
            deny_ips: each(self.deny_ips, "deny_ips")?,
            allow_countries: each(self.allow_countries, "allow_countries")?,
            deny_countries: each(self.deny_countries, "deny_countries")?,
        };
        policy.check().map_err(|e| AppError::BadRequest(e.to_string()))?;
        Ok(policy)
    }
}

/// An API's policy as the admin API shows it.
#[derive(Serialize)]
struct PolicyView {
    api_id: String,
    /// 0 until the first change.
    version: u64,
    policy: Policy,
    /// `null`: none. Caps every rate limit of the API's keys at `percent`% of its limit.
    limit_override: Option<LimitOverride>,
    updated_at: i64,
}

impl From<ApiRecord> for PolicyView {
    fn from(r: ApiRecord) -> PolicyView {
        PolicyView {
            api_id: r.id,
            version: r.version,
            policy: r.policy,
            limit_override: r.limit_override,
            updated_at: r.updated_at,
        }
    }
}

/// The answer to a change: the policy as it now is, and what its delivery reached (absent when
/// nothing changed).
#[derive(Serialize)]
struct ChangedPolicy {
    #[serde(flatten)]
    view: PolicyView,
    #[serde(flatten)]
    reached: Option<Reached>,
}

/// The whole policy, replacing the one in force: lists left out are emptied, and
/// `limit_override` left out or `null` is lifted.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplacePolicy {
    #[serde(default)]
    allow_ips: Vec<String>,
    #[serde(default)]
    deny_ips: Vec<String>,
    #[serde(default)]
    allow_countries: Vec<String>,
    #[serde(default)]
    deny_countries: Vec<String>,
    #[serde(default)]
    limit_override: Option<LimitOverride>,
    /// The version this change was made from; refused (409) if the policy is no longer at it.
    #[serde(default)]
    version: Option<u64>,
}

/// Part of a policy: each list named replaces that list, the others stay; `limit_override`
/// named sets it (`null` lifts it), left out it stays.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AmendPolicy {
    allow_ips: Option<Vec<String>>,
    deny_ips: Option<Vec<String>>,
    allow_countries: Option<Vec<String>>,
    deny_countries: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    limit_override: Option<Option<LimitOverride>>,
    #[serde(default)]
    version: Option<u64>,
}

/// A field that is present, `null` included (`Some(None)`), told apart from one left out (`None`).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> std::result::Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Refuses a change made from a version the policy is no longer at.
fn expect_version(record: &ApiRecord, version: Option<u64>) -> Result<()> {
    match version {
        Some(v) if v != record.version => Err(AppError::Conflict(format!(
            "the API's policy is at version {}, not {v}: read it again and retry",
            record.version
        ))),
        _ => Ok(()),
    }
}

async fn find(state: &AppState, caller: &RootKey, id: &str, action: KeyAction) -> Result<ApiRecord> {
    check_id(id, "api")?;
    let record = state.store.api_record(caller.workspace_id(), id).await?.ok_or_else(|| AppError::not_found("API"))?;
    caller.require(&Scope::key(id, action))?;
    Ok(record)
}

async fn read(State(state): State<AppState>, caller: RootKey, Path(id): Path<String>) -> Result<Json<PolicyView>> {
    Ok(Json(find(&state, &caller, &id, KeyAction::ReadKey).await?.into()))
}

async fn replace(
    State(state): State<AppState>,
    caller: RootKey,
    Path(id): Path<String>,
    Json(body): Json<ReplacePolicy>,
) -> Result<Json<ChangedPolicy>> {
    let old = find(&state, &caller, &id, KeyAction::UpdateKey).await?;
    expect_version(&old, body.version)?;
    if let Some(o) = &body.limit_override {
        o.check().map_err(|e| AppError::BadRequest(e.to_string()))?;
    }
    let lists = PolicyInput {
        allow_ips: body.allow_ips,
        deny_ips: body.deny_ips,
        allow_countries: body.allow_countries,
        deny_countries: body.deny_countries,
    };
    let new = ApiRecord { policy: lists.parse()?, limit_override: body.limit_override, ..old.clone() };
    let (record, delivered) = state.change.commit_api(caller.actor(), old, new, now_ms()).await?;
    Ok(Json(ChangedPolicy { view: record.into(), reached: delivered.map(Reached::from) }))
}

async fn amend(
    State(state): State<AppState>,
    caller: RootKey,
    Path(id): Path<String>,
    Json(body): Json<AmendPolicy>,
) -> Result<Json<ChangedPolicy>> {
    let old = find(&state, &caller, &id, KeyAction::UpdateKey).await?;
    expect_version(&old, body.version)?;
    let mut policy = old.policy.clone();
    if let Some(list) = body.allow_ips {
        policy.allow_ips = each(list, "allow_ips")?;
    }
    if let Some(list) = body.deny_ips {
        policy.deny_ips = each(list, "deny_ips")?;
    }
    if let Some(list) = body.allow_countries {
        policy.allow_countries = each(list, "allow_countries")?;
    }
    if let Some(list) = body.deny_countries {
        policy.deny_countries = each(list, "deny_countries")?;
    }
    policy.check().map_err(|e| AppError::BadRequest(e.to_string()))?;
    let limit_override = body.limit_override.unwrap_or(old.limit_override);
    if let Some(o) = &limit_override {
        o.check().map_err(|e| AppError::BadRequest(e.to_string()))?;
    }
    let new = ApiRecord { policy, limit_override, ..old.clone() };
    let (record, delivered) = state.change.commit_api(caller.actor(), old, new, now_ms()).await?;
    Ok(Json(ChangedPolicy { view: record.into(), reached: delivered.map(Reached::from) }))
}
