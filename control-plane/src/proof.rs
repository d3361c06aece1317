//! The revocation proof: for a key that stopped being valid (revoked, deleted, disabled or
//! expired), when it changed and by whom, how each region took the change, and every `VALID`
//! answer since, each judged against the promise.
//!
//! A `VALID` decided on a record older than the change is a **violation** when it was decided
//! later than the promise allows: in a region that acknowledged a signed purge, after the
//! moment the region began answering from the purge's record (`applied_at`); in a location
//! purged by tag, after the purge's acknowledgement plus the edge's memory trust; and anywhere,
//! after the change's answer plus the key's `max_staleness_ms`. Each bound allows
//! [`SKEW_MS`] for clocks that differ between machines. A `VALID` inside those bounds is shown
//! as within the promise, not hidden. For an expiry the change is `expires_at` itself, which
//! every verifier decides from the record: any `VALID` after it (plus the allowance) is a
//! violation.

use serde::Serialize;

use crate::store::DeliveryState;
use crate::store::proof::{Answer, TargetDelivery};

/// The allowance for clock differences between the control plane and the regions.
pub const SKEW_MS: i64 = 250;
/// The edge's memory trust in tag-only purge mode (its `MEMORY_TRUST_MS` default).
pub const MEMORY_TRUST_MS: i64 = 100;

/// The change a proof is about.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// `revoked`, `deleted`, `disabled` or `expired`.
    pub kind: String,
    /// The record version that made the key invalid (`None` for an expiry: every version).
    pub version: Option<u64>,
    /// When it took effect: committed, or `expires_at`.
    pub at_ms: i64,
    /// When the change's caller was answered, where known.
    pub answered_at_ms: Option<i64>,
    pub max_staleness_ms: u64,
}

/// How a region took the change, as its purge's delivery shows.
#[derive(Debug, Clone, Serialize)]
pub struct RegionTook {
    pub region: String,
    pub acknowledged: bool,
    /// When the region answered from the purge's record (signed purge), by its clock.
    pub applied_at_ms: Option<i64>,
    /// When the control plane recorded the acknowledgement.
    pub acknowledged_at_ms: Option<i64>,
    /// Whether the purge reached isolate memory (signed) or only Cache API copies (by tag).
    pub by_tag: bool,
    pub error: Option<String>,
}

/// One `VALID` answer after the change, judged.
#[derive(Debug, Clone, Serialize)]
pub struct Judged {
    #[serde(flatten)]
    pub answer: Answer,
    /// `violation`, `within_promise`, or `newer_record` (decided on the change's version or a
    /// later one: not about this change).
    pub verdict: &'static str,
    /// The latest moment this answer could be decided and keep the promise, and which bound.
    pub bound_ms: Option<i64>,
    pub bound: &'static str,
}

impl RegionTook {
    /// How `region` took the change, from its purge's delivery.
    pub fn of(region: &str, delivery: &TargetDelivery, by_tag: bool) -> RegionTook {
        RegionTook {
            region: region.to_owned(),
            acknowledged: delivery.state == DeliveryState::Done,
            applied_at_ms: delivery.applied_at,
            acknowledged_at_ms: delivery.done_at,
            by_tag,
            error: delivery.last_error.clone(),
        }
    }
}

/// Judges one `VALID` answer decided after the change, given how its region took the change.
pub fn judge(change: &Change, took: Option<&RegionTook>, answer: Answer) -> Judged {
    let about_change = match (change.version, answer.version) {
        (Some(changed), Some(decided)) => (decided as u64) < changed,
        _ => true,
    };
    if !about_change {
        return Judged { answer, verdict: "newer_record", bound_ms: None, bound: "" };
    }
    let (bound_ms, bound) = bound(change, took);
    let verdict = match bound_ms {
        Some(bound) if answer.at_ms > bound => "violation",
        _ => "within_promise",
    };
    Judged { answer, verdict, bound_ms, bound }
}

/// The latest a `VALID` on an older record may be decided in a region, and which rule says so.
pub fn bound(change: &Change, took: Option<&RegionTook>) -> (Option<i64>, &'static str) {
    if change.kind == "expired" {
        return (Some(change.at_ms + SKEW_MS), "expires_at + skew");
    }
    let anywhere = change.answered_at_ms.map(|at| at + change.max_staleness_ms as i64 + SKEW_MS);
    let region =
        took.filter(|t| t.acknowledged).and_then(|t| match (t.by_tag, t.applied_at_ms, t.acknowledged_at_ms) {
            (false, Some(applied), _) => Some((applied + SKEW_MS, "applied_at + skew")),
            (true, _, Some(acked)) => {
                Some((acked + MEMORY_TRUST_MS + SKEW_MS, "purge acknowledged + memory trust + skew"))
            }
            _ => None,
        });
    match (region, anywhere) {
        (Some((r, why)), Some(a)) if r <= a => (Some(r), why),
        (_, Some(a)) => (Some(a), "answer + max_staleness_ms + skew"),
        (Some((r, why)), None) => (Some(r), why),
        (None, None) => (None, "the change's answer is not recorded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(kind: &str) -> Change {
        Change {
            kind: kind.into(),
            version: Some(5),
            at_ms: 1_000,
            answered_at_ms: Some(1_050),
            max_staleness_ms: 1_000,
        }
    }

    fn valid(at_ms: i64, version: i64) -> Answer {
        Answer {
            at_ms,
            region: "r0".into(),
            code: "VALID".into(),
            version: Some(version),
            source: Some("memory".into()),
            caller_ip: None,
            client_ip: None,
        }
    }

    fn took(applied: Option<i64>, acked: Option<i64>, by_tag: bool) -> RegionTook {
        RegionTook {
            region: "r0".into(),
            acknowledged: true,
            applied_at_ms: applied,
            acknowledged_at_ms: acked,
            by_tag,
            error: None,
        }
    }

    /// A case: its name, the change, how the region took it, the answer, the verdict and bound.
    type Case<'a> = (&'a str, &'a Change, Option<&'a RegionTook>, Answer, &'a str, Option<i64>);

    #[test]
    fn verdicts() {
        let revoked = change("revoked");
        let signed = took(Some(1_020), Some(1_040), false);
        let tag = took(None, Some(1_040), true);
        let unacked = RegionTook { acknowledged: false, ..took(None, None, false) };
        let cases: &[Case] = &[
            (
                "signed purge: before applied_at + skew",
                &revoked,
                Some(&signed),
                valid(1_200, 4),
                "within_promise",
                Some(1_270),
            ),
            ("signed purge: after it", &revoked, Some(&signed), valid(1_271, 4), "violation", Some(1_270)),
            (
                "by tag: within ack + memory trust + skew",
                &revoked,
                Some(&tag),
                valid(1_390, 4),
                "within_promise",
                Some(1_390),
            ),
            ("by tag: past it", &revoked, Some(&tag), valid(1_391, 4), "violation", Some(1_390)),
            (
                "no ack: within answer + staleness + skew",
                &revoked,
                Some(&unacked),
                valid(2_300, 4),
                "within_promise",
                Some(2_300),
            ),
            ("no ack: past it", &revoked, Some(&unacked), valid(2_301, 4), "violation", Some(2_300)),
            ("no region known: the answer bound", &revoked, None, valid(2_301, 4), "violation", Some(2_300)),
            ("a newer record is not about the change", &revoked, Some(&signed), valid(9_999, 5), "newer_record", None),
        ];
        for (name, change, took, answer, verdict, bound) in cases {
            let judged = judge(change, *took, answer.clone());
            assert_eq!((judged.verdict, judged.bound_ms), (*verdict, *bound), "{name}");
        }
    }

    #[test]
    fn expiry_is_judged_from_expires_at_whatever_the_version() {
        let expired = Change { kind: "expired".into(), version: None, answered_at_ms: None, ..change("expired") };
        assert_eq!(judge(&expired, None, valid(1_250, 9)).verdict, "within_promise");
        assert_eq!(judge(&expired, None, valid(1_251, 9)).verdict, "violation");
    }

    #[test]
    fn without_the_answer_time_the_region_bound_still_judges() {
        let unanswered = Change { answered_at_ms: None, ..change("revoked") };
        let signed = took(Some(1_020), Some(1_040), false);
        assert_eq!(judge(&unanswered, Some(&signed), valid(1_300, 4)).verdict, "violation");
        assert_eq!(judge(&unanswered, None, valid(99_999, 4)).bound, "the change's answer is not recorded");
    }
}
