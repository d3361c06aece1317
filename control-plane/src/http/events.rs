//! `GET /v1/events`: server-sent events for services that cache keys themselves. Every
//! tightening change (revoke, delete, disable, expiry moved earlier, permission removed) is
//! emitted as it commits, with its outbox id as the event id. A subscriber that reconnects with
//! `Last-Event-ID` (or `?after=`) gets every event after that one, so it misses nothing.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use futures::Stream;
use keyward_shared::{KeyAction, KeyHash, KeyRecord, KeyStatus, Scope};
use serde::{Deserialize, Serialize};

use super::auth::RootKey;
use super::extract::Query;
use super::{AppError, AppState, Result};

/// Events read from the database per query.
const PAGE: u32 = 100;
/// How long a quiet stream waits before looking again without a wake-up.
const POLL: Duration = Duration::from_secs(1);

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/events", get(stream))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resume {
    #[serde(default)]
    after: Option<i64>,
}

async fn stream(
    State(state): State<AppState>,
    caller: RootKey,
    headers: HeaderMap,
    Query(resume): Query<Resume>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    if !caller.scopes().0.iter().any(|s| matches!(s, Scope::Key { action: KeyAction::ReadKey, .. })) {
        return Err(AppError::Forbidden("this root key has no `api.<id|*>.read_key` scope".into()));
    }
    let from_header = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|t| t.parse::<i64>().ok())
                .ok_or_else(|| AppError::BadRequest("Last-Event-ID must be an event id (a number)".into()))?,
        ),
        None => None,
    };
    let cursor = from_header.or(resume.after).unwrap_or(0);
    let scopes = caller.scopes().clone();
    let workspace = caller.workspace_id().to_owned();
    let mut changes = state.changes.subscribe();
    changes.mark_unchanged();
    let start = (cursor, Vec::new(), changes);
    let events = futures::stream::unfold(start, move |(mut cursor, mut ready, mut changes)| {
        let (store, scopes, workspace) = (state.store.clone(), scopes.clone(), workspace.clone());
        async move {
            loop {
                if let Some(event) = ready.pop() {
                    return Some((Ok(event), (cursor, ready, changes)));
                }
                match store.tightening_after(&workspace, cursor, PAGE).await {
                    Ok(rows) if !rows.is_empty() => {
                        for row in rows {
                            cursor = row.id;
                            let Ok(record) = KeyRecord::from_json(&row.record) else { continue };
                            if scopes.grants(&Scope::key(&record.api_id, KeyAction::ReadKey)) {
                                ready.push(event(row.id, &record));
                            }
                        }
                        ready.reverse();
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "cannot read events"),
                }
                let _ = tokio::time::timeout(POLL, changes.changed()).await;
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// A tightening change as a subscriber sees it: what a cache of keys needs to drop or update
/// its copy (the hash, to find it), and nothing it may not keep.
#[derive(Serialize)]
struct Tightened<'a> {
    key_id: &'a str,
    api_id: &'a str,
    hash: &'a KeyHash,
    start: &'a str,
    status: KeyStatus,
    enabled: bool,
    expires_at: Option<i64>,
    permissions: &'a [String],
    version: u64,
    updated_at: i64,
}

fn event(id: i64, record: &KeyRecord) -> Event {
    let data = Tightened {
        key_id: &record.id,
        api_id: &record.api_id,
        hash: &record.hash,
        start: &record.start,
        status: record.status,
        enabled: record.enabled,
        expires_at: record.expires_at,
        permissions: &record.permissions,
        version: record.version,
        updated_at: record.updated_at,
    };
    let data = serde_json::to_string(&data).expect("an event's fields serialize");
    Event::default().id(id.to_string()).event("tightened").data(data)
}
