//! Keeping the outbox bounded and honest: its ages (the `[outbox]` section of `keyward.toml`),
//! pruning delivered entries, and dead-lettering what no promise depends on.
//!
//! A delivery the promise depends on (the authority update, a purge, a tightening change's KV
//! write: `Target::is_promised`) is retried until it lands, with capped backoff; past
//! `stuck_after_s` it is shown as stuck. Any other delivery (a KV write of a change that does not
//! tighten, which the edge can also learn from the authority) is dead-lettered once its change
//! is `dead_letter_after_s` old, never for its number of attempts. Both are counted in
//! `GET /v1/regions` and `keyward outbox status`, and tried again by `keyward outbox redrive`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::store::{Store, StoreError, TargetHealth};

/// How often the retrier prunes and dead-letters.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(60);

/// The outbox's ages, in seconds (the `[outbox]` section of `keyward.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxSettings {
    /// An entry whose every delivery landed is deleted this long after (default 7 days).
    pub prune_delivered_after_s: u64,
    /// A delivery the promise depends on, pending this long, is shown as stuck (default 1 hour).
    pub stuck_after_s: u64,
    /// Any other delivery, pending this long, is dead-lettered (default 7 days).
    pub dead_letter_after_s: u64,
    /// The longest a change's caller waits for its delivery, in milliseconds (default 5000, at
    /// least 100): what has not landed by then is answered as pending and goes on.
    pub answer_within_ms: u64,
}

impl Default for OutboxSettings {
    fn default() -> OutboxSettings {
        const DAY: u64 = 24 * 3600;
        OutboxSettings {
            prune_delivered_after_s: 7 * DAY,
            stuck_after_s: 3600,
            dead_letter_after_s: 7 * DAY,
            answer_within_ms: 5_000,
        }
    }
}

impl OutboxSettings {
    /// The shortest answer window accepted: below it, a change's caller would be told of pending
    /// deliveries that a moment more would have landed.
    pub const MIN_ANSWER_WITHIN_MS: u64 = 100;

    /// Refuses an answer window shorter than [`Self::MIN_ANSWER_WITHIN_MS`].
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.answer_within_ms < Self::MIN_ANSWER_WITHIN_MS {
            anyhow::bail!(
                "[outbox] answer_within_ms is {}: it must be at least {} (default 5000)",
                self.answer_within_ms,
                Self::MIN_ANSWER_WITHIN_MS
            );
        }
        Ok(())
    }

    /// The longest a change's caller waits for its delivery.
    pub fn answer_within(&self) -> Duration {
        Duration::from_millis(self.answer_within_ms)
    }

    /// Changes committed before this are stuck while a promised delivery of theirs is pending.
    pub fn stuck_before(&self, now: i64) -> i64 {
        before(now, self.stuck_after_s)
    }
}

/// What one round of upkeep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Upkept {
    pub pruned: u64,
    pub dead_lettered: u64,
}

/// Dead-letters what is too old to wait for and prunes what was delivered long enough ago;
/// each dead-lettered delivery is logged as a loss, with its count.
pub async fn upkeep(store: &Store, settings: &OutboxSettings, now: i64) -> Result<Upkept, StoreError> {
    let dead_lettered = store.dead_letter(before(now, settings.dead_letter_after_s)).await?;
    if dead_lettered > 0 {
        tracing::warn!(
            dead_lettered,
            "gave up KV writes of changes that do not tighten, pending past the dead-letter age; \
             `keyward outbox redrive` tries them again"
        );
    }
    let pruned = store.prune_delivered(before(now, settings.prune_delivered_after_s)).await?;
    if pruned > 0 {
        tracing::info!(pruned, "pruned delivered outbox entries");
    }
    Ok(Upkept { pruned, dead_lettered })
}

/// One target's deliveries as `GET /v1/regions` and `keyward outbox status` answer them: pending
/// (and how long the oldest has waited), stuck, dead-lettered, and the last error.
pub fn health_json(health: Option<&TargetHealth>, now: i64) -> Value {
    let lag = health.and_then(|h| h.oldest).map_or(0, |oldest| now - oldest);
    json!({
        "pending": health.map_or(0, |h| h.pending),
        "lag_ms": lag,
        "stuck": health.map_or(0, |h| h.stuck),
        "dead_lettered": health.map_or(0, |h| h.dead_lettered),
        "last_error": health.and_then(|h| h.last_error.clone()),
    })
}

fn before(now: i64, age_s: u64) -> i64 {
    now.saturating_sub(i64::try_from(age_s.saturating_mul(1000)).unwrap_or(i64::MAX))
}
