//! `GET /v1/events`: server-sent events for services that cache keys themselves. Every
//! tightening change (revoke, delete, disable, expiry moved earlier, permission removed) is
//! emitted as it commits, with its outbox id as the event id. A subscriber that reconnects with
//! `Last-Event-ID` (or `?after=`) gets every event after that one, so it misses nothing.
//!
//! A stream lives no longer than its root key's right to it: every poll looks the root key up
//! again, and a stream whose root key was revoked or no longer holds a `read_key` scope ends
//! with a last `closed` event saying why. A root key may hold `max_streams_per_root_key` open
//! streams (4 by default) and a workspace `max_streams_per_workspace` (32), the `[events]`
//! section of `keyward.toml` ([`EventSettings`]); one more is refused with 429
//! `TOO_MANY_STREAMS`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use futures::Stream;
use keyward_shared::error::ErrorDetail;
use keyward_shared::{ErrorCode, KeyAction, KeyHash, KeyRecord, KeyStatus, Scope, Scopes};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::auth::{Readable, RootKey};
use super::extract::Query;
use super::{AppError, AppState, Result};
use crate::store::Store;

/// How many event streams may be open at once (the `[events]` section of `keyward.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventSettings {
    /// Open event streams one root key may hold at once (default 4).
    pub max_streams_per_root_key: usize,
    /// Open event streams the root keys of one workspace may hold together (default 32).
    pub max_streams_per_workspace: usize,
}

impl Default for EventSettings {
    fn default() -> EventSettings {
        EventSettings { max_streams_per_root_key: 4, max_streams_per_workspace: 32 }
    }
}

impl EventSettings {
    /// Refuses a limit of 0, which would refuse every stream.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.max_streams_per_root_key == 0 || self.max_streams_per_workspace == 0 {
            anyhow::bail!(
                "[events] max_streams_per_root_key and max_streams_per_workspace must be at least 1 (defaults 4 and 32)"
            );
        }
        Ok(())
    }
}
/// Events read from the database per query.
const PAGE: u32 = 100;
/// How long a quiet stream waits before looking again without a wake-up: the longest a revoked
/// root key's stream stays open when nothing else happens.
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
    if !Readable::of(caller.scopes()).any() {
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
    let place = state.streams.open(caller.id(), caller.workspace_id())?;
    let mut changes = state.changes.subscribe();
    changes.mark_unchanged();
    let subscription = Subscription {
        store: state.store.clone(),
        root_key: *caller.hash(),
        workspace: caller.workspace_id().to_owned(),
        cursor: from_header.or(resume.after).unwrap_or(0),
        ready: Vec::new(),
        changes,
        closed: false,
        _place: place,
    };
    let events = futures::stream::unfold(subscription, |s| async move { s.next().await.map(|(e, s)| (Ok(e), s)) });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// One open stream: where it is in the outbox, what it has read but not sent, and its place
/// among the open streams (given back when the stream is dropped).
struct Subscription {
    store: Store,
    /// The hash of the root key that opened it, looked up again on every poll.
    root_key: KeyHash,
    workspace: String,
    cursor: i64,
    /// Events read and not yet sent, the next one last.
    ready: Vec<Event>,
    changes: watch::Receiver<i64>,
    /// Set once the `closed` event is out: the stream then ends.
    closed: bool,
    _place: Place,
}

impl Subscription {
    /// The next event, waiting for one as long as it takes; `None` once the stream has closed.
    async fn next(mut self) -> Option<(Event, Subscription)> {
        loop {
            if let Some(event) = self.ready.pop() {
                return Some((event, self));
            }
            if self.closed {
                return None;
            }
            match self.poll().await {
                Err(closing) => {
                    self.closed = true;
                    return Some((closing, self));
                }
                Ok(true) => continue,
                // Without a sender (the server is stopping) `changed` fails at once: wait anyway.
                Ok(false) => {
                    if let Ok(Err(_)) = tokio::time::timeout(POLL, self.changes.changed()).await {
                        tokio::time::sleep(POLL).await;
                    }
                }
            }
        }
    }

    /// Checks the root key again, then reads the next page of events it may see; answers
    /// whether rows were read (more may follow at once), or the `closed` event that ends the
    /// stream. A database error is logged and sends nothing: the next poll tries again.
    async fn poll(&mut self) -> Result<bool, Event> {
        let scopes = match self.store.active_root_key(&self.root_key).await {
            Ok(Some((record, _))) => record.scopes,
            Ok(None) => return Err(closing(ErrorCode::Unauthorized, "this root key was revoked")),
            Err(e) => {
                tracing::error!(error = %e, "cannot read an event stream's root key");
                return Ok(false);
            }
        };
        if !Readable::of(&scopes).any() {
            return Err(closing(ErrorCode::Forbidden, "this root key no longer holds an `api.<id|*>.read_key` scope"));
        }
        let rows = match self.store.tightening_after(&self.workspace, self.cursor, PAGE).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "cannot read events");
                return Ok(false);
            }
        };
        for row in &rows {
            self.cursor = row.id;
            match KeyRecord::from_json(&row.record) {
                Ok(record) if may_see(&scopes, &record) => self.ready.push(event(row.id, &record)),
                Ok(_) => {}
                Err(e) => tracing::error!(outbox = row.id, error = %e, "an event's record is unreadable"),
            }
        }
        self.ready.reverse();
        Ok(!rows.is_empty())
    }
}

fn may_see(scopes: &Scopes, record: &KeyRecord) -> bool {
    scopes.grants(&Scope::key(&record.api_id, KeyAction::ReadKey))
}

/// The last event of a stream that its root key may no longer hold.
fn closing(code: ErrorCode, message: &str) -> Event {
    let data = serde_json::to_string(&ErrorDetail { code, message }).expect("an error serializes");
    Event::default().event("closed").data(data)
}

/// A tightening change as a subscriber sees it: what a cache of keys needs to drop or update
/// its copy (the key's id, to find it), and nothing the key view does not show (no hash).
#[derive(Serialize)]
struct Tightened<'a> {
    key_id: &'a str,
    api_id: &'a str,
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

/// The open event streams, counted per root key and per workspace against their limits.
#[derive(Default)]
pub struct Streams {
    limits: EventSettings,
    open: Mutex<OpenStreams>,
}

#[derive(Default)]
struct OpenStreams {
    by_root_key: HashMap<String, usize>,
    by_workspace: HashMap<String, usize>,
}

impl Streams {
    pub fn new(limits: EventSettings) -> Streams {
        Streams { limits, open: Mutex::default() }
    }

    /// Takes a place for one more stream of this root key, unless it or its workspace already
    /// holds as many as it may.
    fn open(self: &Arc<Self>, root_key: &str, workspace: &str) -> Result<Place> {
        let EventSettings { max_streams_per_root_key: per_root_key, max_streams_per_workspace: per_workspace } =
            self.limits;
        let mut open = self.open.lock().expect("not poisoned");
        if open.by_root_key.get(root_key).copied().unwrap_or(0) >= per_root_key {
            return Err(AppError::TooManyStreams(format!(
                "this root key has {per_root_key} event streams open, the most one root key may; \
                 close one, or use another root key"
            )));
        }
        if open.by_workspace.get(workspace).copied().unwrap_or(0) >= per_workspace {
            return Err(AppError::TooManyStreams(format!(
                "this workspace's root keys have {per_workspace} event streams open, the most one \
                 workspace may; close one first"
            )));
        }
        *open.by_root_key.entry(root_key.to_owned()).or_default() += 1;
        *open.by_workspace.entry(workspace.to_owned()).or_default() += 1;
        Ok(Place { streams: self.clone(), root_key: root_key.to_owned(), workspace: workspace.to_owned() })
    }
}

/// One open stream's place, given back when it is dropped.
struct Place {
    streams: Arc<Streams>,
    root_key: String,
    workspace: String,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.streams.open.lock().expect("not poisoned");
        let OpenStreams { by_root_key, by_workspace } = &mut *open;
        for (counts, id) in [(by_root_key, &self.root_key), (by_workspace, &self.workspace)] {
            if let Some(count) = counts.get_mut(id) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(id);
                }
            }
        }
    }
}
