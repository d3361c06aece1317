//! Usage events: one per verification, buffered where it was answered and shipped in batches to
//! the control plane's signed ingestion route, with every loss counted.
//!
//! Each holder of events (an edge isolate, or the control plane itself for its own verify
//! route) numbers its batches `1, 2, 3, ...` and its events from 0, and says in each batch how
//! many events it still holds after it. The receiver can then count exactly what never arrived:
//! a missing batch number is a gap, and the events it carried are the difference between where
//! the next batch's events start and where the last received one's ended. Events a holder had to
//! drop (its buffer full) are counted by the holder and reported in its next batch. A holder
//! that stops while holding events shows, at the receiver, as a possible loss of at most what
//! its last batch said it still held. [`UsageBuffer`] is the holder's side, as a pure state
//! machine: a batch that was not acknowledged is sent again unchanged (same number, same
//! events), so a retried batch is recognised and never counted twice.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::verify::{Code, Source, VerifyRequest, VerifyResponse};

/// Signed, body [`UsageBatch`]: the control plane's ingestion route.
pub const USAGE_PATH: &str = "/internal/usage";
/// The most events in one batch; a holder ships as soon as it has this many.
pub const MAX_BATCH_EVENTS: usize = 500;
/// A holder ships at least this often while it holds events.
pub const SHIP_EVERY_MS: u64 = 2_000;
/// The most events a holder keeps waiting to be shipped; beyond, new events are dropped and
/// counted ([`UsageBatch::dropped`]). An event is at most about 3 KiB (its fields are bounded),
/// so a full buffer holds at most about 15 MiB, and typically a tenth of that.
pub const MAX_HELD_EVENTS: usize = 5_000;
/// The longest text kept for an IP address, a user agent or a country.
pub const MAX_IP: usize = 64;
pub const MAX_USER_AGENT: usize = 256;
pub const MAX_COUNTRY: usize = 8;
/// The longest text kept for an id (request, workspace, API, key) or a region.
pub const MAX_ID: usize = 128;

/// The end user a verification was made for, as the caller names them in the verify request
/// (all optional; the caller's own address and agent are recorded apart).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
}

impl ClientInfo {
    /// Refuses fields longer than their limits, so a caller cannot make events large.
    pub fn check(&self) -> Result<(), String> {
        let fields = [
            ("ip", &self.ip, MAX_IP),
            ("user_agent", &self.user_agent, MAX_USER_AGENT),
            ("country", &self.country, MAX_COUNTRY),
        ];
        for (name, value, limit) in fields {
            if value.as_ref().is_some_and(|v| v.chars().count() > limit) {
                return Err(format!("client.{name} is at most {limit} characters"));
            }
        }
        Ok(())
    }
}

/// One verification, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// When it was decided (Unix ms, the answering machine's clock).
    pub at_ms: u64,
    pub request_id: String,
    /// The caller's workspace (the root key's).
    pub workspace_id: String,
    /// The API named in the request, or the key's when the answer may show it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_id: Option<String>,
    /// Only where the answer may show the key ([`crate::Decision::reveals_key`]): never for a
    /// malformed key, nor for a key the caller may not see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// `cf.colo` in production, the region's name locally, `origin` at the control plane.
    pub region: String,
    pub code: Code,
    /// The record version the answer was decided on, when there was a record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientInfo>,
}

/// Where, when and for whom a verification was answered: what its event needs beside the
/// request and the answer.
#[derive(Debug, Clone)]
pub struct Answered<'a> {
    pub at_ms: u64,
    pub request_id: String,
    pub workspace_id: &'a str,
    pub region: &'a str,
    pub caller_ip: Option<String>,
    pub user_agent: Option<String>,
}

impl UsageEvent {
    /// The event of one answered verification, at the answer's `decided_at_ms`. It names the key
    /// (and the version decided on) only where the answer does; the API is the one asked for, or
    /// the key's where the answer shows it.
    pub fn of(answered: Answered<'_>, request: &VerifyRequest, response: &VerifyResponse) -> UsageEvent {
        // Cut to their limits; empty texts are left out (the receiver refuses empty ids).
        let cut = |text: Option<String>, limit: usize| {
            text.map(|t| t.chars().take(limit).collect::<String>()).filter(|t| !t.is_empty())
        };
        UsageEvent {
            at_ms: response.decided_at_ms.unwrap_or(answered.at_ms),
            request_id: cut(Some(answered.request_id), MAX_ID).unwrap_or_default(),
            workspace_id: answered.workspace_id.to_owned(),
            api_id: cut(request.api_id.clone().or_else(|| response.api_id.clone()), MAX_ID),
            key_id: response.key_id.clone(),
            region: answered.region.to_owned(),
            code: response.code,
            version: response.version.filter(|_| response.key_id.is_some()),
            source: response.source,
            caller_ip: cut(answered.caller_ip, MAX_IP),
            user_agent: cut(answered.user_agent, MAX_USER_AGENT),
            client: request.client.clone().filter(|c| c.ip.is_some() || c.user_agent.is_some() || c.country.is_some()),
        }
    }
}

/// What a holder ships: its events since the last batch, numbered so that the receiver can
/// count what is lost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageBatch {
    /// The holder, unique per isolate (or process) lifetime.
    pub holder: String,
    /// Where the holder runs (a region name, `origin`).
    pub region: String,
    /// 1 for a holder's first batch, then one more for each batch.
    pub seq: u64,
    /// How many events the holder put in batches before this one: where this batch's events
    /// start in the holder's numbering.
    pub first_event: u64,
    /// Events the holder has dropped so far because its buffer was full (a running total, so a
    /// batch that never arrives loses no count).
    pub dropped: u64,
    /// Events the holder still holds after this batch.
    pub held_after: u64,
    pub events: Vec<UsageEvent>,
}

/// The receiver's answer to a batch it took (or had already taken).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageAck {
    pub seq: u64,
    /// The batch had been received before: nothing was stored again.
    pub duplicate: bool,
}

/// A holder's events waiting to be shipped, and the batch under way. Pure: the caller supplies
/// the time and sends what [`UsageBuffer::batch`] gives.
#[derive(Debug)]
pub struct UsageBuffer {
    holder: String,
    region: String,
    held: VecDeque<UsageEvent>,
    /// The batch sent and not yet acknowledged: sent again, unchanged, until it is; and when it
    /// was first sent.
    in_flight: Option<UsageBatch>,
    in_flight_since_ms: u64,
    next_seq: u64,
    /// Events put in batches so far.
    batched: u64,
    dropped: u64,
    /// The running total of drops the last batch carried.
    dropped_shipped: u64,
    last_batch_at_ms: u64,
    max_held: usize,
}

impl UsageBuffer {
    pub fn new(holder: String, region: String, now_ms: u64) -> UsageBuffer {
        UsageBuffer::with_capacity(holder, region, now_ms, MAX_HELD_EVENTS)
    }

    pub fn with_capacity(holder: String, region: String, now_ms: u64, max_held: usize) -> UsageBuffer {
        UsageBuffer {
            holder,
            region,
            held: VecDeque::new(),
            in_flight: None,
            in_flight_since_ms: 0,
            next_seq: 1,
            batched: 0,
            dropped: 0,
            dropped_shipped: 0,
            last_batch_at_ms: now_ms,
            max_held,
        }
    }

    /// Keeps an event to ship; one that does not fit is dropped and counted.
    pub fn push(&mut self, event: UsageEvent) {
        if self.held.len() >= self.max_held {
            self.dropped += 1;
        } else {
            self.held.push_back(event);
        }
    }

    /// Events held and not yet in a batch, plus those of the batch under way.
    pub fn holding(&self) -> u64 {
        self.held.len() as u64 + self.in_flight.as_ref().map_or(0, |b| b.events.len() as u64)
    }

    /// Whether a batch should go now: one is under way and unacknowledged (retry it), a full
    /// batch is held, or events (or drops) have waited [`SHIP_EVERY_MS`].
    pub fn due(&self, now_ms: u64) -> bool {
        let waiting = !self.held.is_empty() || self.dropped > self.dropped_shipped;
        self.in_flight.is_some()
            || self.held.len() >= MAX_BATCH_EVENTS
            || (waiting && now_ms.saturating_sub(self.last_batch_at_ms) >= SHIP_EVERY_MS)
    }

    /// The batch to send now: the unacknowledged one again (the same number and events, with
    /// `held_after` as it is now), or a new one of up to [`MAX_BATCH_EVENTS`] events. `None`
    /// when there is nothing to send.
    pub fn batch(&mut self, now_ms: u64) -> Option<UsageBatch> {
        let held = self.held.len() as u64;
        if let Some(batch) = &mut self.in_flight {
            batch.held_after = held;
            return Some(batch.clone());
        }
        if self.held.is_empty() && self.dropped == self.dropped_shipped {
            return None;
        }
        let take = self.held.len().min(MAX_BATCH_EVENTS);
        let events: Vec<UsageEvent> = self.held.drain(..take).collect();
        let batch = UsageBatch {
            holder: self.holder.clone(),
            region: self.region.clone(),
            seq: self.next_seq,
            first_event: self.batched,
            dropped: self.dropped,
            held_after: self.held.len() as u64,
            events,
        };
        self.next_seq += 1;
        self.batched += batch.events.len() as u64;
        self.dropped_shipped = self.dropped;
        self.last_batch_at_ms = now_ms;
        self.in_flight = Some(batch.clone());
        self.in_flight_since_ms = now_ms;
        Some(batch)
    }

    /// The receiver took batch `seq`: it is not sent again. The next batch is due
    /// [`SHIP_EVERY_MS`] from now, or at once with a full batch held.
    pub fn acknowledged(&mut self, seq: u64, now_ms: u64) {
        if self.in_flight.as_ref().is_some_and(|b| b.seq == seq) {
            self.in_flight = None;
            self.last_batch_at_ms = now_ms;
        }
    }

    /// Batch `seq` is given up (refused as invalid, or unacknowledged for too long): it is not
    /// sent again, and the receiver counts it, from the numbering, once a later batch arrives.
    pub fn abandon(&mut self, seq: u64, now_ms: u64) {
        self.acknowledged(seq, now_ms);
    }

    /// The batch under way, if one is: its number and when it was first sent.
    pub fn in_flight(&self) -> Option<(u64, u64)> {
        self.in_flight.as_ref().map(|b| (b.seq, self.in_flight_since_ms))
    }
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    fn event(n: u64) -> UsageEvent {
        UsageEvent {
            at_ms: n,
            request_id: format!("req_{n}"),
            workspace_id: "ws".into(),
            api_id: None,
            key_id: None,
            region: "r1".into(),
            code: Code::Valid,
            version: Some(1),
            source: Some(Source::Memory),
            caller_ip: None,
            user_agent: None,
            client: None,
        }
    }

    fn buffer(max_held: usize) -> UsageBuffer {
        UsageBuffer::with_capacity("h".into(), "r1".into(), 0, max_held)
    }

    #[test]
    fn nothing_is_due_until_events_wait_or_fill_a_batch() {
        let mut b = buffer(10_000);
        assert!(!b.due(10_000));
        assert_eq!(b.batch(10_000), None);
        b.push(event(1));
        assert!(!b.due(SHIP_EVERY_MS - 1));
        assert!(b.due(SHIP_EVERY_MS));
        for n in 0..MAX_BATCH_EVENTS as u64 {
            b.push(event(n));
        }
        assert!(b.due(1), "a full batch goes at once");
    }

    #[test]
    fn batches_are_numbered_and_say_where_their_events_start() {
        let mut b = buffer(10_000);
        for n in 0..(MAX_BATCH_EVENTS as u64 + 3) {
            b.push(event(n));
        }
        let first = b.batch(5).unwrap();
        assert_eq!((first.seq, first.first_event, first.events.len(), first.held_after), (1, 0, MAX_BATCH_EVENTS, 3));
        assert_eq!(b.holding(), MAX_BATCH_EVENTS as u64 + 3);
        b.acknowledged(1, 6);
        let second = b.batch(6).unwrap();
        assert_eq!((second.seq, second.first_event, second.events.len(), second.held_after), (2, 500, 3, 0));
    }

    #[test]
    fn an_unacknowledged_batch_is_sent_again_unchanged() {
        let mut b = buffer(10_000);
        b.push(event(1));
        let sent = b.batch(1).unwrap();
        assert_eq!(sent.held_after, 0);
        b.push(event(2));
        assert!(b.due(1), "the batch under way is due until acknowledged");
        let again = b.batch(2).unwrap();
        assert_eq!(
            (again.seq, &again.events, again.held_after),
            (sent.seq, &sent.events, 1),
            "held_after as it is now"
        );
        b.acknowledged(99, 3);
        assert_eq!(b.batch(3).unwrap().events, sent.events, "another number's ack does not end it");
        b.acknowledged(sent.seq, 100);
        assert!(!b.due(100 + SHIP_EVERY_MS - 1), "the next batch waits its interval from the ack");
        assert!(b.due(100 + SHIP_EVERY_MS));
        let next = b.batch(4).unwrap();
        assert_eq!((next.seq, next.first_event, next.events[0].at_ms), (2, 1, 2));
    }

    #[test]
    fn events_that_do_not_fit_are_dropped_and_counted_in_the_next_batch() {
        let mut b = buffer(2);
        for n in 0..5 {
            b.push(event(n));
        }
        let batch = b.batch(1).unwrap();
        assert_eq!((batch.events.len(), batch.dropped), (2, 3));
        b.abandon(batch.seq, 1);
        assert_eq!(b.batch(2), None, "nothing new to send");
        b.push(event(9));
        b.push(event(9));
        b.push(event(9));
        let next = b.batch(3).unwrap();
        assert_eq!(
            (next.seq, next.first_event, next.dropped),
            (2, 2, 4),
            "a running total: the abandoned batch's count survives"
        );
    }

    #[test]
    fn client_fields_are_bounded() {
        assert!(ClientInfo::default().check().is_ok());
        let long = ClientInfo { country: Some("x".repeat(MAX_COUNTRY + 1)), ..ClientInfo::default() };
        assert!(long.check().unwrap_err().contains("country"));
        let ok = ClientInfo {
            ip: Some("203.0.113.9".into()),
            user_agent: Some("curl/8".into()),
            country: Some("DE".into()),
        };
        assert!(ok.check().is_ok());
    }
}
