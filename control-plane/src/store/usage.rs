//! Usage events: ingestion of numbered batches (idempotent, with their rollups), the queries
//! behind the usage routes, the losses the numbering shows, and pruning by age.

use std::collections::HashMap;

use keyward_shared::usage::{UsageBatch, UsageEvent};
use serde::Serialize;
use sqlx::{QueryBuilder, Sqlite, Transaction};

use super::{Store, StoreError};

pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 60 * MINUTE_MS;
pub const DAY_MS: i64 = 24 * HOUR_MS;
/// Raw events (and the batches that brought them) are kept this long.
pub const RAW_RETENTION_MS: i64 = 30 * DAY_MS;
/// Per-minute and per-day counts are kept this long.
pub const ROLLUP_RETENTION_MS: i64 = 365 * DAY_MS;
/// A holder whose last batch said it still held events, and that has sent nothing for this
/// long, shows them as a possible loss.
pub const SILENT_AFTER_MS: i64 = 10_000;
/// Rows deleted per statement when pruning (periods, for the rollups).
const PRUNE_CHUNK: u64 = 5_000;
const PRUNE_PERIODS: u64 = 60;
/// Rows per multi-row insert (17 columns each, well under SQLite's bound on parameters).
const INSERT_ROWS: usize = 100;

/// Whose usage a query reads. Key ids are unique across workspaces; the caller has checked
/// that the key is the asker's to read.
#[derive(Debug, Clone)]
pub enum UsageOf {
    Key(String),
    Api { workspace_id: String, api_id: String },
    Owner { workspace_id: String, owner_id: String },
}

impl UsageOf {
    /// The filter, for raw events and rollups alike (whose "none" is `''`).
    fn push_filter(&self, q: &mut QueryBuilder<'_, Sqlite>) {
        match self {
            UsageOf::Key(id) => {
                q.push("key_id = ").push_bind(id.clone());
            }
            UsageOf::Api { workspace_id, api_id } => {
                q.push("workspace_id = ")
                    .push_bind(workspace_id.clone())
                    .push(" AND api_id = ")
                    .push_bind(api_id.clone());
            }
            UsageOf::Owner { workspace_id, owner_id } => {
                q.push("workspace_id = ").push_bind(workspace_id.clone());
                q.push(" AND owner_id = ").push_bind(owner_id.clone());
            }
        }
    }
}

/// The periods a series may be counted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub fn ms(self) -> i64 {
        match self {
            Granularity::Minute => MINUTE_MS,
            Granularity::Hour => HOUR_MS,
            Granularity::Day => DAY_MS,
        }
    }
}

/// The sources a top list or a "new to this key" list is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceColumn {
    CallerIp,
    ClientIp,
    Country,
    Region,
}

impl SourceColumn {
    pub const ALL: [SourceColumn; 4] =
        [SourceColumn::CallerIp, SourceColumn::ClientIp, SourceColumn::Country, SourceColumn::Region];

    /// The name reports use for it (its serde name).
    pub fn name(self) -> &'static str {
        match self {
            SourceColumn::CallerIp => "caller_ip",
            SourceColumn::ClientIp => "client_ip",
            SourceColumn::Country => "country",
            SourceColumn::Region => "region",
        }
    }

    fn column(self) -> &'static str {
        match self {
            SourceColumn::CallerIp => "caller_ip",
            SourceColumn::ClientIp => "client_ip",
            SourceColumn::Country => "client_country",
            SourceColumn::Region => "region",
        }
    }
}

/// One point of a series: a period's start, an outcome, how many.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct SeriesPoint {
    pub at_ms: i64,
    pub code: String,
    pub count: i64,
}

/// A source and how many verifications came from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct SourceCount {
    pub value: String,
    pub count: i64,
}

/// What the batch numbering shows was lost, per region where the holders ran. Counted over
/// every workspace (a lost batch's events cannot be told apart), as event counts only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Losses {
    /// Batches that never arrived although a later one from the same holder did.
    pub missing_batches: i64,
    /// The events those batches carried: exact, from where each holder's events are numbered.
    pub lost_events: i64,
    /// Events holders dropped because their buffers were full (each holder reports a running
    /// total in every batch; the highest received counts).
    pub dropped_events: i64,
    /// Events holders said they still held and never sent (the holder has been silent for
    /// [`SILENT_AFTER_MS`]): at most this many are lost.
    pub possibly_lost_events: i64,
}

impl Losses {
    pub fn add(&mut self, other: &Losses) {
        self.missing_batches += other.missing_batches;
        self.lost_events += other.lost_events;
        self.dropped_events += other.dropped_events;
        self.possibly_lost_events += other.possibly_lost_events;
    }
}

/// What one holder's batches add up to (`usage_holders`).
#[derive(sqlx::FromRow)]
struct HolderRow {
    region: String,
    batches: i64,
    max_seq: i64,
    numbered: i64,
    stored: i64,
    dropped: i64,
    held_after: i64,
    last_at_ms: i64,
}

/// A rollup row's key: bucket, workspace, API, key, owner, region, code (`''` for none).
type RollupKey = (i64, String, String, String, String, String, String);

impl Store {
    /// Stores a batch of usage events with their rollups, in one transaction. A batch whose
    /// holder and number were stored before changes nothing: answers `true` (a duplicate).
    pub async fn ingest_usage(&self, batch: &UsageBatch, now_ms: i64) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO usage_batches (holder, seq, region, first_event, events, dropped, held_after, received_at_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (holder, seq) DO NOTHING",
        )
        .bind(&batch.holder)
        .bind(batch.seq as i64)
        .bind(&batch.region)
        .bind(batch.first_event as i64)
        .bind(batch.events.len() as i64)
        .bind(batch.dropped as i64)
        .bind(batch.held_after as i64)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Ok(true);
        }
        note_holder(&mut tx, batch, now_ms).await?;
        let owners = owners_of(&mut tx, &batch.events).await?;
        insert_events(&mut tx, &batch.events, &owners, now_ms).await?;
        add_rollups(&mut tx, &batch.events, &owners).await?;
        note_last_use(&mut tx, &batch.events).await?;
        tx.commit().await?;
        Ok(false)
    }

    /// Counts by region and outcome over `[from_ms, to_ms)`, in whole minutes.
    pub async fn usage_by_region(
        &self,
        of: &UsageOf,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        let mut q = QueryBuilder::new("SELECT region, code, SUM(count) FROM usage_minutes WHERE ");
        of.push_filter(&mut q);
        q.push(" AND bucket >= ").push_bind(floor(from_ms, MINUTE_MS));
        q.push(" AND bucket < ").push_bind(to_ms);
        q.push(" GROUP BY region, code ORDER BY region, code");
        Ok(q.build_query_as().fetch_all(&self.pool).await?)
    }

    /// Counts per period and outcome over `[from_ms, to_ms)`.
    pub async fn usage_series(
        &self,
        of: &UsageOf,
        from_ms: i64,
        to_ms: i64,
        granularity: Granularity,
    ) -> Result<Vec<SeriesPoint>, StoreError> {
        let (table, step) = match granularity {
            Granularity::Day => ("usage_days", DAY_MS),
            other => ("usage_minutes", other.ms()),
        };
        let mut q = QueryBuilder::new("SELECT (bucket / ");
        q.push(step.to_string()).push(") * ").push(step.to_string());
        q.push(" AS at_ms, code, SUM(count) AS count FROM ").push(table).push(" WHERE ");
        of.push_filter(&mut q);
        q.push(" AND bucket >= ").push_bind(floor(from_ms, step));
        q.push(" AND bucket < ").push_bind(to_ms);
        q.push(" GROUP BY at_ms, code ORDER BY at_ms, code");
        Ok(q.build_query_as().fetch_all(&self.pool).await?)
    }

    /// A key's last use and last `VALID` answer (Unix ms, when each was decided).
    pub async fn usage_last(&self, key_id: &str) -> Result<(Option<i64>, Option<i64>), StoreError> {
        let row: Option<(i64, Option<i64>)> =
            sqlx::query_as("SELECT last_used_ms, last_valid_ms FROM usage_last WHERE key_id = ?")
                .bind(key_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map_or((None, None), |(used, valid)| (Some(used), valid)))
    }

    /// The `limit` sources with the most verifications over `[from_ms, to_ms)`, from raw events.
    pub async fn usage_top(
        &self,
        of: &UsageOf,
        column: SourceColumn,
        from_ms: i64,
        to_ms: i64,
        limit: i64,
    ) -> Result<Vec<SourceCount>, StoreError> {
        let col = column.column();
        let mut q = QueryBuilder::new(format!("SELECT {col} AS value, COUNT(*) AS count FROM usage_events WHERE "));
        of.push_filter(&mut q);
        q.push(format!(" AND {col} IS NOT NULL AND at_ms >= ")).push_bind(from_ms);
        q.push(" AND at_ms < ").push_bind(to_ms);
        q.push(" GROUP BY value ORDER BY count DESC, value LIMIT ").push_bind(limit);
        Ok(q.build_query_as().fetch_all(&self.pool).await?)
    }

    /// Sources seen in `[since_ms, now_ms)` that had not been seen in the `lookback_ms` before
    /// `since_ms`: during a leak, exactly what a responder looks for.
    pub async fn usage_new_sources(
        &self,
        of: &UsageOf,
        column: SourceColumn,
        since_ms: i64,
        now_ms: i64,
        lookback_ms: i64,
    ) -> Result<Vec<SourceCount>, StoreError> {
        let col = column.column();
        let mut q = QueryBuilder::new(format!("SELECT {col} AS value, COUNT(*) AS count FROM usage_events WHERE "));
        of.push_filter(&mut q);
        q.push(format!(" AND {col} IS NOT NULL AND at_ms >= ")).push_bind(since_ms);
        q.push(" AND at_ms < ").push_bind(now_ms);
        q.push(format!(" AND {col} NOT IN (SELECT {col} FROM usage_events WHERE "));
        of.push_filter(&mut q);
        q.push(format!(" AND {col} IS NOT NULL AND at_ms >= ")).push_bind(since_ms - lookback_ms);
        q.push(" AND at_ms < ").push_bind(since_ms);
        q.push(") GROUP BY value ORDER BY count DESC, value LIMIT 100");
        Ok(q.build_query_as().fetch_all(&self.pool).await?)
    }

    /// What was lost, per region, by holders that sent a batch since `since_ms` (and those
    /// silent at `now_ms`).
    pub async fn usage_losses(&self, since_ms: i64, now_ms: i64) -> Result<Vec<(String, Losses)>, StoreError> {
        let rows: Vec<HolderRow> = sqlx::query_as(
            "SELECT region, batches, max_seq, numbered, stored, dropped, held_after, last_at_ms \
             FROM usage_holders WHERE last_at_ms >= ?",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        let mut by_region: HashMap<String, Losses> = HashMap::new();
        for h in rows {
            let silent = now_ms - h.last_at_ms >= SILENT_AFTER_MS;
            let losses = Losses {
                missing_batches: h.max_seq - h.batches,
                lost_events: h.numbered - h.stored,
                dropped_events: h.dropped,
                possibly_lost_events: if silent { h.held_after } else { 0 },
            };
            by_region.entry(h.region).or_default().add(&losses);
        }
        let mut regions: Vec<_> = by_region.into_iter().collect();
        regions.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(regions)
    }

    /// Deletes raw events and batches past [`RAW_RETENTION_MS`] and counts past
    /// [`ROLLUP_RETENTION_MS`]. Answers how many raw events went.
    pub async fn prune_usage(&self, now_ms: i64) -> Result<u64, StoreError> {
        let raw_before = now_ms - RAW_RETENTION_MS;
        let rollups_before = now_ms - ROLLUP_RETENTION_MS;
        let mut pruned = 0;
        for (table, column, before) in [
            ("usage_events", "at_ms", raw_before),
            ("usage_batches", "received_at_ms", raw_before),
            ("usage_holders", "last_at_ms", raw_before),
            ("usage_minutes", "bucket", rollups_before),
            ("usage_days", "bucket", rollups_before),
        ] {
            // In chunks, each its own short transaction: a change waiting for the write lock
            // waits for one chunk, never for the whole prune.
            // Rollup tables have no rowid: they go a few periods at a time.
            let sql = if column == "bucket" {
                format!(
                    "DELETE FROM {table} WHERE bucket IN \
                     (SELECT DISTINCT bucket FROM {table} WHERE bucket < ? LIMIT {PRUNE_PERIODS})"
                )
            } else {
                format!(
                    "DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE {column} < ? LIMIT {PRUNE_CHUNK})"
                )
            };
            loop {
                let done = sqlx::query(&sql).bind(before).execute(&self.pool).await?.rows_affected();
                if table == "usage_events" {
                    pruned += done;
                }
                if done == 0 || (column != "bucket" && done < PRUNE_CHUNK) {
                    break;
                }
            }
        }
        Ok(pruned)
    }
}

/// Adds a batch to its holder's sums. `held_after` is the highest-numbered batch's.
async fn note_holder(tx: &mut Transaction<'_, Sqlite>, batch: &UsageBatch, now_ms: i64) -> Result<(), StoreError> {
    let events = batch.events.len() as i64;
    sqlx::query(
        "INSERT INTO usage_holders (holder, region, batches, max_seq, numbered, stored, dropped, held_after, last_at_ms) \
         VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?) ON CONFLICT (holder) DO UPDATE SET \
           batches = batches + 1, \
           held_after = CASE WHEN excluded.max_seq > max_seq THEN excluded.held_after ELSE held_after END, \
           max_seq = MAX(max_seq, excluded.max_seq), \
           numbered = MAX(numbered, excluded.numbered), \
           stored = stored + excluded.stored, \
           dropped = MAX(dropped, excluded.dropped), \
           last_at_ms = MAX(last_at_ms, excluded.last_at_ms)",
    )
    .bind(&batch.holder)
    .bind(&batch.region)
    .bind(batch.seq as i64)
    .bind(batch.first_event as i64 + events)
    .bind(events)
    .bind(batch.dropped as i64)
    .bind(batch.held_after as i64)
    .bind(now_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn floor(at_ms: i64, step: i64) -> i64 {
    at_ms.div_euclid(step) * step
}

/// The owner of each key the events name, as the keys table has it now.
async fn owners_of(
    tx: &mut Transaction<'_, Sqlite>,
    events: &[UsageEvent],
) -> Result<HashMap<String, Option<String>>, StoreError> {
    let mut owners = HashMap::new();
    for key_id in events.iter().filter_map(|e| e.key_id.as_ref()) {
        if owners.contains_key(key_id) {
            continue;
        }
        let owner: Option<Option<String>> =
            sqlx::query_scalar("SELECT owner_id FROM keys WHERE id = ?").bind(key_id).fetch_optional(&mut **tx).await?;
        owners.insert(key_id.clone(), owner.flatten());
    }
    Ok(owners)
}

fn owner<'a>(owners: &'a HashMap<String, Option<String>>, event: &UsageEvent) -> Option<&'a String> {
    event.key_id.as_ref().and_then(|id| owners.get(id)).and_then(Option::as_ref)
}

async fn insert_events(
    tx: &mut Transaction<'_, Sqlite>,
    events: &[UsageEvent],
    owners: &HashMap<String, Option<String>>,
    now_ms: i64,
) -> Result<(), StoreError> {
    for chunk in events.chunks(INSERT_ROWS) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO usage_events (at_ms, received_at_ms, request_id, workspace_id, api_id, key_id, owner_id, \
             region, code, version, source, caller_ip, user_agent, client_ip, client_user_agent, client_country) ",
        );
        q.push_values(chunk, |mut row, e| {
            let client = e.client.as_ref();
            row.push_bind(e.at_ms as i64)
                .push_bind(now_ms)
                .push_bind(e.request_id.clone())
                .push_bind(e.workspace_id.clone())
                .push_bind(e.api_id.clone())
                .push_bind(e.key_id.clone())
                .push_bind(owner(owners, e).cloned())
                .push_bind(e.region.clone())
                .push_bind(code_text(e))
                .push_bind(e.version.map(|v| v as i64))
                .push_bind(e.source.map(|s| json_text(&s)))
                .push_bind(e.caller_ip.clone())
                .push_bind(e.user_agent.clone())
                .push_bind(client.and_then(|c| c.ip.clone()))
                .push_bind(client.and_then(|c| c.user_agent.clone()))
                .push_bind(client.and_then(|c| c.country.clone()));
        });
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Adds the events to the per-minute and per-day counts.
async fn add_rollups(
    tx: &mut Transaction<'_, Sqlite>,
    events: &[UsageEvent],
    owners: &HashMap<String, Option<String>>,
) -> Result<(), StoreError> {
    for (table, step) in [("usage_minutes", MINUTE_MS), ("usage_days", DAY_MS)] {
        let mut counts: HashMap<RollupKey, i64> = HashMap::new();
        for e in events {
            let key = (
                floor(e.at_ms as i64, step),
                e.workspace_id.clone(),
                e.api_id.clone().unwrap_or_default(),
                e.key_id.clone().unwrap_or_default(),
                owner(owners, e).cloned().unwrap_or_default(),
                e.region.clone(),
                code_text(e),
            );
            *counts.entry(key).or_default() += 1;
        }
        for ((bucket, workspace, api, key, owner, region, code), count) in counts {
            sqlx::query(&format!(
                "INSERT INTO {table} (bucket, workspace_id, api_id, key_id, owner_id, region, code, count) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET count = count + excluded.count"
            ))
            .bind(bucket)
            .bind(workspace)
            .bind(api)
            .bind(key)
            .bind(owner)
            .bind(region)
            .bind(code)
            .bind(count)
            .execute(&mut **tx)
            .await?;
        }
    }
    Ok(())
}

async fn note_last_use(tx: &mut Transaction<'_, Sqlite>, events: &[UsageEvent]) -> Result<(), StoreError> {
    let mut last: HashMap<&str, (i64, Option<i64>)> = HashMap::new();
    for e in events {
        let Some(key_id) = e.key_id.as_deref() else { continue };
        let at = e.at_ms as i64;
        let valid = (e.code == keyward_shared::Code::Valid).then_some(at);
        let entry = last.entry(key_id).or_insert((at, valid));
        entry.0 = entry.0.max(at);
        entry.1 = entry.1.max(valid);
    }
    for (key_id, (used, valid)) in last {
        sqlx::query(
            "INSERT INTO usage_last (key_id, last_used_ms, last_valid_ms) VALUES (?, ?, ?) \
             ON CONFLICT (key_id) DO UPDATE SET last_used_ms = MAX(last_used_ms, excluded.last_used_ms), \
             last_valid_ms = CASE WHEN excluded.last_valid_ms IS NULL THEN last_valid_ms \
                                  WHEN last_valid_ms IS NULL THEN excluded.last_valid_ms \
                                  ELSE MAX(last_valid_ms, excluded.last_valid_ms) END",
        )
        .bind(key_id)
        .bind(used)
        .bind(valid)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

fn code_text(event: &UsageEvent) -> String {
    code_name(event.code)
}

/// An outcome code as stored and labelled (`VALID`).
pub fn code_name(code: keyward_shared::Code) -> String {
    json_text(&code)
}

/// A unit enum's serde name (`"VALID"` → `VALID`).
fn json_text<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}
