//! Usage: the edge's signed ingestion route, and what was used, by whom, from where, as counts
//! with the losses beside them: `GET /v1/keys/{id}/usage`, `GET /v1/apis/{id}/usage` and
//! `GET /v1/usage?owner_id=` (each needs `read_key` on the APIs it covers).

use std::collections::BTreeMap;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use keyward_shared::internal::{NONCE_HEADER, SIGNATURE_HEADER, SignatureError, SignedHeaders, TIMESTAMP_HEADER};
use keyward_shared::usage::{USAGE_PATH, UsageAck};
use keyward_shared::{ErrorCode, KeyAction, Scope};
use serde::{Deserialize, Serialize};

use super::auth::RootKey;
use super::extract::{Json, Path, Query, check_id};
use super::{AppError, AppState, Result};
use crate::store::usage::{
    DAY_MS, Granularity, Losses, RAW_RETENTION_MS, ROLLUP_RETENTION_MS, SeriesPoint, SourceColumn, SourceCount, UsageOf,
};
use crate::time::now_ms;
use crate::usage::IngestError;

/// Largest usage batch body: 500 events whose bounded fields, escaped as JSON at worst, take up
/// to about 6 KiB each.
pub const MAX_USAGE_BODY: usize = 4 * 1024 * 1024;
/// The longest range a per-minute series may cover.
const MAX_MINUTE_RANGE_MS: i64 = 31 * DAY_MS;
const TOP: i64 = 10;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(USAGE_PATH, post(ingest).layer(DefaultBodyLimit::max(MAX_USAGE_BODY)))
        .route("/v1/keys/{id}/usage", get(of_key))
        .route("/v1/apis/{id}/usage", get(of_api))
        .route("/v1/usage", get(of_owner))
}

/// Refuses on missing or malformed signature headers and on a declared length over the limit
/// before reading the body; then reads at most the limit.
async fn ingest(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Json<UsageAck>> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let signed = SignedHeaders {
        timestamp: header(TIMESTAMP_HEADER),
        nonce: header(NONCE_HEADER),
        signature: header(SIGNATURE_HEADER),
    };
    if signed.timestamp.parse::<i64>().is_err()
        || !keyward_shared::internal::is_nonce(signed.nonce)
        || signed.signature.len() != 64
    {
        return Err(signature_error(SignatureError::Malformed));
    }
    let too_large = || AppError::PayloadTooLarge(format!("a usage batch is at most {} KiB", MAX_USAGE_BODY / 1024));
    if header("content-length").parse::<usize>().is_ok_and(|n| n > MAX_USAGE_BODY) {
        return Err(too_large());
    }
    let body = to_bytes(body, MAX_USAGE_BODY).await.map_err(|_| too_large())?;
    match state.usage.ingest_signed(USAGE_PATH, signed, &body).await {
        Ok(ack) => Ok(Json(ack)),
        Err(IngestError::Signature(e)) => Err(signature_error(e)),
        Err(IngestError::Invalid(message)) => Err(AppError::BadRequest(message)),
        Err(e @ (IngestError::NoSecret | IngestError::Busy)) => {
            Err(AppError::Coded(ErrorCode::Unavailable, e.to_string()))
        }
        Err(IngestError::Store(e)) => Err(e.into()),
    }
}

fn signature_error(e: SignatureError) -> AppError {
    let code = match e {
        SignatureError::Malformed => ErrorCode::BadSignatureHeaders,
        SignatureError::Stale => ErrorCode::StaleTimestamp,
        SignatureError::Mismatch => ErrorCode::BadSignature,
        SignatureError::Replayed => ErrorCode::Replayed,
    };
    AppError::Coded(code, e.to_string())
}

/// The range asked: `from_ms` and `to_ms` (default the last 24 hours), `granularity` of the
/// series (default minute up to a day, hour up to 31 days, day beyond).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeQuery {
    #[serde(default)]
    from_ms: Option<i64>,
    #[serde(default)]
    to_ms: Option<i64>,
    #[serde(default)]
    granularity: Option<Granularity>,
    #[serde(default)]
    owner_id: Option<String>,
    /// `counts` leaves out the top and new sources (the parts that read raw events): totals,
    /// series and losses only, from the per-minute and per-day counts. Default `all`.
    #[serde(default)]
    parts: Option<Parts>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Parts {
    All,
    Counts,
}

struct Range {
    from_ms: i64,
    to_ms: i64,
    granularity: Granularity,
    /// Whether the raw-event parts (top and new sources) are read.
    sources: bool,
    now_ms: i64,
}

impl RangeQuery {
    fn range(&self) -> Result<Range> {
        let now = now_ms();
        if self.from_ms.is_some_and(|t| t < 0) || self.to_ms.is_some_and(|t| t < 0) {
            return Err(AppError::BadRequest("from_ms and to_ms are Unix milliseconds, not negative".into()));
        }
        let to_ms = self.to_ms.unwrap_or(now);
        let from_ms = self.from_ms.unwrap_or(to_ms.saturating_sub(DAY_MS));
        if from_ms >= to_ms {
            return Err(AppError::BadRequest("from_ms must be before to_ms".into()));
        }
        if from_ms < now - ROLLUP_RETENTION_MS {
            return Err(AppError::BadRequest("counts are kept for 365 days: from_ms is older".into()));
        }
        let span = to_ms - from_ms;
        let granularity = self.granularity.unwrap_or(if span <= DAY_MS {
            Granularity::Minute
        } else if span <= MAX_MINUTE_RANGE_MS {
            Granularity::Hour
        } else {
            Granularity::Day
        });
        if granularity == Granularity::Minute && span > MAX_MINUTE_RANGE_MS {
            return Err(AppError::BadRequest("a per-minute series covers at most 31 days".into()));
        }
        Ok(Range { from_ms, to_ms, granularity, now_ms: now, sources: self.parts != Some(Parts::Counts) })
    }
}

/// The answer: counts by outcome, a series, the top sources and those new to the key, and what
/// was lost beside them.
#[derive(Serialize)]
struct UsageReport {
    from_ms: i64,
    to_ms: i64,
    granularity: Granularity,
    /// Verifications by outcome code, in whole minutes of the range.
    totals: BTreeMap<String, i64>,
    total: i64,
    /// The same counts per region (`origin` for the control plane's own verify route).
    regions: BTreeMap<String, BTreeMap<String, i64>>,
    series: Vec<SeriesPoint>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_used_ms: Option<Option<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_valid_ms: Option<Option<i64>>,
    /// The sources with the most verifications over the range (raw events: the last 30 days).
    top: BTreeMap<&'static str, Vec<SourceCount>>,
    /// Sources seen in the 24 hours before `to_ms` that had not been seen in the 30 days before.
    new_sources: BTreeMap<&'static str, Vec<SourceCount>>,
    losses: LossReport,
}

#[derive(Serialize)]
struct LossReport {
    total: Losses,
    by_region: BTreeMap<String, Losses>,
    note: &'static str,
}

const LOSS_NOTE: &str = "losses are counted over every workspace (a lost batch's events cannot be told apart): \
lost_events is exact; possibly_lost_events is what holders said they still held and never sent";

async fn of_key(
    State(state): State<AppState>,
    caller: RootKey,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Result<Json<UsageReport>> {
    check_id(&id, "key")?;
    no_owner(&q)?;
    let record = state.store.key(caller.workspace_id(), &id).await?.ok_or_else(|| AppError::not_found("key"))?;
    caller.require(&Scope::key(&record.api_id, KeyAction::ReadKey))?;
    let mut report = report(&state, &UsageOf::Key(id.clone()), &q.range()?).await?;
    let (used, valid) = state.store.usage_last(&id).await?;
    report.last_used_ms = Some(used);
    report.last_valid_ms = Some(valid);
    Ok(Json(report))
}

async fn of_api(
    State(state): State<AppState>,
    caller: RootKey,
    Path(id): Path<String>,
    Query(q): Query<RangeQuery>,
) -> Result<Json<UsageReport>> {
    check_id(&id, "api")?;
    no_owner(&q)?;
    state.store.api(caller.workspace_id(), &id).await?.ok_or_else(|| AppError::not_found("API"))?;
    caller.require(&Scope::key(&id, KeyAction::ReadKey))?;
    let of = UsageOf::Api { workspace_id: caller.workspace_id().to_owned(), api_id: id };
    Ok(Json(report(&state, &of, &q.range()?).await?))
}

/// An owner's keys may be in any API: reading their usage needs `api.*.read_key`.
async fn of_owner(
    State(state): State<AppState>,
    caller: RootKey,
    Query(q): Query<RangeQuery>,
) -> Result<Json<UsageReport>> {
    let owner_id = q.owner_id.clone().ok_or_else(|| AppError::BadRequest("name the owner: ?owner_id=...".into()))?;
    if owner_id.is_empty() || owner_id.chars().count() > 200 {
        return Err(AppError::BadRequest("owner_id must be 1 to 200 characters".into()));
    }
    caller.require(&Scope::Key { api: keyward_shared::scope::ApiSelector::Any, action: KeyAction::ReadKey })?;
    let of = UsageOf::Owner { workspace_id: caller.workspace_id().to_owned(), owner_id };
    Ok(Json(report(&state, &of, &q.range()?).await?))
}

fn no_owner(q: &RangeQuery) -> Result<()> {
    match q.owner_id {
        Some(_) => Err(AppError::BadRequest("owner_id belongs to GET /v1/usage".into())),
        None => Ok(()),
    }
}

async fn report(state: &AppState, of: &UsageOf, range: &Range) -> Result<UsageReport> {
    let store = &state.store;
    let series = store.usage_series(of, range.from_ms, range.to_ms, range.granularity).await?;
    // The totals are the regions' counts added up: one read of the per-minute counts for both.
    let mut regions: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    let mut totals: BTreeMap<String, i64> = BTreeMap::new();
    for (region, code, count) in store.usage_by_region(of, range.from_ms, range.to_ms).await? {
        *totals.entry(code.clone()).or_default() += count;
        regions.entry(region).or_default().insert(code, count);
    }
    let raw_from = range.from_ms.max(range.now_ms - RAW_RETENTION_MS);
    let mut top = BTreeMap::new();
    let mut new_sources = BTreeMap::new();
    let recent = range.to_ms - DAY_MS;
    for column in SourceColumn::ALL.into_iter().filter(|_| range.sources) {
        let name = column.name();
        top.insert(name, store.usage_top(of, column, raw_from, range.to_ms, TOP).await?);
        new_sources.insert(name, store.usage_new_sources(of, column, recent, range.to_ms, RAW_RETENTION_MS).await?);
    }
    let by_region: BTreeMap<String, Losses> =
        store.usage_losses(range.from_ms, range.now_ms).await?.into_iter().collect();
    let mut total = Losses::default();
    for losses in by_region.values() {
        total.add(losses);
    }
    Ok(UsageReport {
        from_ms: range.from_ms,
        to_ms: range.to_ms,
        granularity: range.granularity,
        total: totals.values().sum(),
        totals,
        regions,
        series,
        last_used_ms: None,
        last_valid_ms: None,
        top,
        new_sources,
        losses: LossReport { total, by_region, note: LOSS_NOTE },
    })
}
