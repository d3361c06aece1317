//! What delivery comes to: each attempt at a delivery, the errors that stay typed until they
//! are recorded as text, and the reports answered to the caller of a change.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::{FIRST_BACKOFF, MAX_BACKOFF};
use crate::edge_client::{EdgeError, EdgeRegion};
use crate::kv::KvError;
use crate::metrics;
use crate::store::{AttemptOutcome, Delivery, DeliveryState, Target};

/// How the authority update went.
#[derive(Debug, Clone, Serialize)]
pub struct AuthorityReport {
    pub acknowledged: bool,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a change's KV write in one region stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvState {
    Written,
    /// Not attempted yet: a tightening change's KV writes follow its answer.
    Pending,
    /// Attempted and failed; retried with backoff.
    Failed,
    /// Left to a newer change of the same key, which carries the newer record.
    Superseded,
}

/// What happened in one region when a change was pushed.
#[derive(Debug, Clone, Serialize)]
pub struct RegionReport {
    pub name: String,
    pub kv: KvState,
    /// Whether the region accepted the purge; `None` when no purge was sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<bool>,
    /// From the start of this delivery to this region's purge acknowledgement (or failure);
    /// without a purge, to its KV write.
    pub latency_ms: f64,
    /// When the region began answering from the new record, by its clock (Unix ms); only
    /// regions purged through their signed route report it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applied_at_ms: Option<u64>,
    /// What `acknowledged` means for this region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_means: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The outcome of delivering one entry.
#[derive(Debug, Clone, Serialize)]
pub struct Delivered {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<AuthorityReport>,
    pub regions: Vec<RegionReport>,
}

/// Why one delivery failed; recorded as text (with its causes, [`error_text`]) in its row.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("authority update")]
    Authority(#[source] EdgeError),
    #[error("purge")]
    Purge(#[source] EdgeError),
    #[error("KV write")]
    Kv(#[source] KvError),
    /// A purge-by-tag held back: the refill it causes would read the old record.
    #[error("not sent: {}", authority_lacks_message(.0))]
    AuthorityLacks(String),
}

/// An error and its causes, one after another, as recorded in the outbox and answered in reports.
pub fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text = format!("{text}: {error}");
        cause = error.source();
    }
    text
}

/// Why a region's acknowledgement counts for nothing yet.
pub(super) fn authority_lacks_message(reason: &str) -> String {
    format!("the key's authority does not hold this change yet: {reason}")
}

/// What a delivery not acknowledged when the answer was due (`answer_within` after the call)
/// is reported as: still pending, with its last error if an attempt failed before.
pub(super) fn still_pending(delivery: &Delivery, answer_within: std::time::Duration) -> String {
    let ms = answer_within.as_millis();
    let after = if ms.is_multiple_of(1000) { format!("{} s", ms / 1000) } else { format!("{ms} ms") };
    let what = format!("still pending after {after}: its delivery goes on (GET /v1/regions shows it)");
    match &delivery.last_error {
        Some(error) => format!("{what}; last error: {error}"),
        None => what,
    }
}

/// One attempt at one delivery in a pass: how it went, and when it ended. Cheap to clone, as
/// the authority's attempt is awaited by every region whose purge depends on it.
#[derive(Debug, Clone)]
pub(super) struct Attempt<T = ()> {
    pub(super) result: Result<T, Arc<DeliveryError>>,
    /// From the start of the pass, in milliseconds.
    pub(super) at_ms: f64,
}

impl<T> Attempt<T> {
    /// An attempt that ended now, in a pass that started at `started`.
    pub(super) fn ended(result: Result<T, DeliveryError>, started: Instant) -> Attempt<T> {
        Attempt { result: result.map_err(Arc::new), at_ms: started.elapsed().as_secs_f64() * 1e3 }
    }
}

/// A delivery attempted in a pass and how it went: what `Deliverer::record` writes.
pub(super) struct Attempted<'a> {
    pub(super) delivery: &'a Delivery,
    pub(super) result: Result<(), Arc<DeliveryError>>,
    /// A signed purge's acknowledgement: when the region began answering from its record.
    pub(super) applied_at_ms: Option<u64>,
    /// When it ended, from the start of the pass, in milliseconds.
    pub(super) at_ms: f64,
}

impl Attempted<'_> {
    /// Counts the attempt in `/metrics`: its latency when it landed, a failure when not.
    pub(super) fn count(&self) {
        let target = self.delivery.target.to_string();
        match &self.result {
            Ok(()) => metrics::DELIVERY_LATENCY.with_label_values(&[target.as_str()]).observe(self.at_ms / 1e3),
            Err(_) => {
                metrics::DELIVERY_FAILURES.with_label_values(&[target.as_str()]).inc();
                if matches!(self.delivery.target, Target::Kv(_)) {
                    metrics::KV_WRITE_ERRORS.inc();
                }
            }
        }
    }

    pub(super) fn outcome(&self, now: i64) -> AttemptOutcome {
        let d = self.delivery;
        let error = self.result.as_ref().err().map(|e| error_text(&**e));
        if let Some(error) = &error {
            tracing::warn!(outbox = d.outbox_id, target = %d.target, attempts = d.attempts + 1, %error, "delivery failed; will retry");
        }
        let backoff = FIRST_BACKOFF.saturating_mul(1 << d.attempts.clamp(0, 16)).min(MAX_BACKOFF);
        AttemptOutcome {
            outbox_id: d.outbox_id,
            target: d.target.clone(),
            error,
            retry_at: now + backoff.as_millis() as i64,
            applied_at: self.applied_at_ms.map(|ms| ms as i64),
        }
    }
}

/// One region's deliveries in a pass, and this pass's attempts at them.
pub(super) struct RegionPass<'a> {
    pub(super) kv: Option<&'a Delivery>,
    pub(super) purge: Option<&'a Delivery>,
    pub(super) kv_attempt: Option<Attempt>,
    /// A signed purge's attempt answers when the region began answering from the record.
    pub(super) purge_attempt: Option<Attempt<Option<u64>>>,
}

impl<'a> RegionPass<'a> {
    /// The region's report. A region is not reported as acknowledged while `lacks` says why not,
    /// whatever it answered: the key's authority lacks the change (a copy it refills from the
    /// authority would be the old record), or its purge is still under way.
    pub(super) fn report(&self, region: &EdgeRegion, lacks: Option<String>) -> RegionReport {
        let kv = match (&self.kv_attempt, self.kv) {
            (Some(attempt), _) if attempt.result.is_ok() => KvState::Written,
            (Some(_), _) => KvState::Failed,
            (None, Some(d)) if d.is_pending() => KvState::Pending,
            (None, Some(d)) if d.state == DeliveryState::Superseded => KvState::Superseded,
            (None, _) => KvState::Written,
        };
        let purged = self.purge_attempt.as_ref().map(|a| a.result.is_ok());
        let acknowledged = purged.or_else(|| self.purge.map(|d| d.state == DeliveryState::Done));
        // The purge's acknowledgement is what the caller waits for; without one, the KV write.
        let latency_ms = self.purge_attempt.as_ref().map(|a| a.at_ms).or(self.kv_attempt.as_ref().map(|a| a.at_ms));
        let purge_error = self.purge_attempt.as_ref().and_then(|a| a.result.as_ref().err());
        let kv_error = self.kv_attempt.as_ref().and_then(|a| a.result.as_ref().err());
        RegionReport {
            name: region.name.clone(),
            kv,
            acknowledged: acknowledged.map(|ack| ack && lacks.is_none()),
            latency_ms: latency_ms.unwrap_or(0.0),
            applied_at_ms: self.purge_attempt.as_ref().and_then(|a| a.result.as_ref().ok().copied().flatten()),
            ack_means: self.purge.map(|_| region.ack_means()),
            // The error that explains `acknowledged` comes first.
            error: purge_error.map(|e| error_text(&**e)).or(lacks).or_else(|| kv_error.map(|e| error_text(&**e))),
        }
    }

    /// This pass's attempts, to record.
    pub(super) fn attempted(self) -> impl Iterator<Item = Attempted<'a>> {
        let kv = self.kv.zip(self.kv_attempt.map(|a| (a.result, a.at_ms, None)));
        let purge = self.purge.zip(self.purge_attempt.map(|a| {
            let applied = a.result.as_ref().ok().copied().flatten();
            (a.result.map(|_| ()), a.at_ms, applied)
        }));
        kv.into_iter().chain(purge).map(|(delivery, (result, at_ms, applied_at_ms))| Attempted {
            delivery,
            result,
            at_ms,
            applied_at_ms,
        })
    }
}

/// The authority's report: this pass's attempt, or, without one, whether it was delivered before
/// (pending: as [`still_pending`] says, with the answer window `answer_within`).
pub(super) fn authority_report(
    delivery: &Delivery,
    attempt: Option<&Attempt>,
    answer_within: std::time::Duration,
) -> AuthorityReport {
    match attempt {
        Some(attempt) => AuthorityReport {
            acknowledged: attempt.result.is_ok(),
            latency_ms: attempt.at_ms,
            error: attempt.result.as_ref().err().map(|e| error_text(&**e)),
        },
        None => AuthorityReport {
            acknowledged: delivery.state == DeliveryState::Done,
            latency_ms: 0.0,
            error: delivery.is_pending().then(|| still_pending(delivery, answer_within)),
        },
    }
}
