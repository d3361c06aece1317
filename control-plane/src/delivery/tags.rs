//! Purges by tag, batched across keys and shared fairly between workspaces.
//!
//! Every purge-by-tag call spends the account's API budget (Cloudflare: 1,200 calls per 5
//! minutes for the whole account), so one tenant revoking thousands of keys must neither make
//! a call per key nor keep everyone else's revocations waiting. Purges wait in one queue per
//! workspace; one call at a time takes up to the zone's tags per call, one tag from each waiting
//! workspace in turn, starting after the workspace served last. While two workspaces wait,
//! neither takes more than half of a call's tags (and so of the calls), and a workspace with one
//! revocation waits for at most one call ahead of it. The calls themselves, and the account's
//! rate limit, are [`TagPurge`]'s (`cloudflare.rs`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use keyward_shared::KeyHash;
use tokio::sync::{Notify, oneshot};

use crate::cloudflare::{CloudflareApi, CloudflareError};

/// Where purges by tag go: one call purges up to [`TagPurge::max_tags`] tags, waiting for the
/// account's rate limit.
pub trait TagPurge: Send + Sync {
    fn max_tags(&self) -> usize;
    fn purge<'a>(&'a self, tags: &'a [KeyHash]) -> BoxFuture<'a, Result<(), CloudflareError>>;
}

impl TagPurge for CloudflareApi {
    fn max_tags(&self) -> usize {
        self.max_tags_per_purge()
    }

    fn purge<'a>(&'a self, tags: &'a [KeyHash]) -> BoxFuture<'a, Result<(), CloudflareError>> {
        Box::pin(self.purge_tags(tags))
    }
}

/// How a batched purge went, told to everyone whose tag it carried.
pub type BatchResult = Result<(), BatchError>;

/// Why a batched purge failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// The call that carried the tag failed (one failure, told to every tag in it).
    #[error("the batched purge call failed")]
    Call(#[source] Arc<CloudflareError>),
    #[error("the purge batcher stopped")]
    Stopped,
}

/// Those waiting for one tag's purge.
type Waiters = Vec<oneshot::Sender<BatchResult>>;

/// Purges by tag in batches, a fair share for each workspace. Cheap to share: one task sends
/// the batches.
pub struct TagBatcher {
    state: Arc<BatchState>,
}

struct BatchState {
    purger: Arc<dyn TagPurge>,
    queue: Mutex<FairQueue>,
    wake: Notify,
}

impl TagBatcher {
    /// Starts the task that sends batches (on the current tokio runtime).
    pub fn new(purger: Arc<dyn TagPurge>) -> TagBatcher {
        let state = Arc::new(BatchState { purger, queue: Mutex::new(FairQueue::default()), wake: Notify::new() });
        tokio::spawn(send_batches(state.clone()));
        TagBatcher { state }
    }

    /// Purges these keys' copies for `workspace`; answers once a call carrying all of them has.
    pub async fn purge(&self, workspace: &str, tags: &[KeyHash]) -> BatchResult {
        let waits: Vec<_> = {
            let mut queue = self.state.queue.lock().expect("not poisoned");
            tags.iter().map(|tag| queue.push(workspace, *tag)).collect()
        };
        self.state.wake.notify_one();
        for wait in waits {
            wait.await.map_err(|_| BatchError::Stopped)??;
        }
        Ok(())
    }
}

async fn send_batches(state: Arc<BatchState>) {
    loop {
        let batch = state.queue.lock().expect("not poisoned").take(state.purger.max_tags().max(1));
        if batch.is_empty() {
            state.wake.notified().await;
            continue;
        }
        let tags: Vec<KeyHash> = batch.iter().map(|(tag, _)| *tag).collect();
        let result = state.purger.purge(&tags).await.map_err(|e| BatchError::Call(Arc::new(e)));
        for waiter in batch.into_iter().flat_map(|(_, waiters)| waiters) {
            let _ = waiter.send(result.clone());
        }
    }
}

/// One workspace's tags waiting, in arrival order, each with who waits for it.
type Waiting = VecDeque<(KeyHash, oneshot::Sender<BatchResult>)>;

/// Tags waiting to be purged, a queue per workspace, the workspaces in the order they are served.
#[derive(Default)]
pub struct FairQueue {
    workspaces: VecDeque<(String, Waiting)>,
}

impl FairQueue {
    /// Queues one tag for `workspace`; answers where its purge's outcome will arrive.
    pub fn push(&mut self, workspace: &str, tag: KeyHash) -> oneshot::Receiver<BatchResult> {
        let (done, wait) = oneshot::channel();
        let position = self.workspaces.iter().position(|(w, _)| w == workspace);
        let queue = match position {
            Some(i) => &mut self.workspaces[i].1,
            None => {
                self.workspaces.push_back((workspace.to_owned(), VecDeque::new()));
                &mut self.workspaces.back_mut().expect("just pushed").1
            }
        };
        queue.push_back((tag, done));
        wait
    }

    /// The next call's tags, at most `max`: one from each waiting workspace in turn. A tag queued
    /// twice goes once, with all its waiters. The next call starts with the workspace this one
    /// would have served next, and emptied workspaces leave the queue.
    pub fn take(&mut self, max: usize) -> Vec<(KeyHash, Waiters)> {
        let mut batch: Vec<(KeyHash, Waiters)> = Vec::new();
        let mut stop = 0;
        'rounds: loop {
            let mut served = 0;
            for (i, (_, queue)) in self.workspaces.iter_mut().enumerate() {
                if batch.len() == max {
                    stop = i;
                    break 'rounds;
                }
                let Some((tag, waiter)) = queue.pop_front() else { continue };
                served += 1;
                match batch.iter_mut().find(|(t, _)| *t == tag) {
                    Some((_, waiters)) => waiters.push(waiter),
                    None => batch.push((tag, vec![waiter])),
                }
            }
            if served == 0 || batch.len() == max {
                break;
            }
        }
        self.workspaces.rotate_left(stop);
        self.workspaces.retain(|(_, queue)| !queue.is_empty());
        batch
    }

    /// Tags waiting, per workspace, in the order the workspaces will be served.
    pub fn waiting(&self) -> Vec<(&str, usize)> {
        self.workspaces.iter().map(|(w, q)| (w.as_str(), q.len())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(workspace: &str, i: usize) -> KeyHash {
        KeyHash::of(&format!("{workspace}-{i}"))
    }

    /// Queues `counts[i]` tags for workspace `w<i>`, then takes batches of `max` until none is
    /// left; answers each batch's tags per workspace.
    fn batches(counts: &[usize], max: usize) -> Vec<Vec<usize>> {
        let mut queue = FairQueue::default();
        let mut owner = std::collections::HashMap::new();
        let mut waits = Vec::new();
        for (w, &count) in counts.iter().enumerate() {
            for i in 0..count {
                let t = tag(&format!("w{w}"), i);
                owner.insert(t.to_hex(), w);
                waits.push(queue.push(&format!("w{w}"), t));
            }
        }
        let mut out = Vec::new();
        loop {
            let batch = queue.take(max);
            if batch.is_empty() {
                return out;
            }
            let mut per = vec![0; counts.len()];
            for (t, _) in &batch {
                per[owner[&t.to_hex()]] += 1;
            }
            out.push(per);
        }
    }

    #[test]
    fn a_busy_workspace_takes_no_more_than_half_while_another_waits() {
        assert_eq!(batches(&[100, 100], 30)[0], vec![15, 15]);
        // One revocation of another workspace goes in the next call, whatever waits before it.
        let shares = batches(&[1000, 1], 30);
        assert_eq!(shares[0], vec![29, 1]);
        assert!(shares[1..].iter().all(|b| b[1] == 0 && b[0] <= 30), "{shares:?}");
        // Alone, a workspace has every tag of a call.
        assert_eq!(batches(&[45], 30), vec![vec![30], vec![15]]);
        // Three workspaces: ten tags each.
        assert_eq!(batches(&[50, 50, 50], 30)[0], vec![10, 10, 10]);
    }

    #[test]
    fn when_a_call_cannot_serve_every_workspace_the_next_one_starts_where_it_stopped() {
        // Five workspaces, two tags a call: every workspace is served once before any twice.
        let mut queue = FairQueue::default();
        let mut waits = Vec::new();
        for w in 0..5 {
            waits.extend((0..3).map(|i| queue.push(&format!("w{w}"), tag(&format!("w{w}"), i))));
        }
        let mut order = Vec::new();
        for _ in 0..5 {
            order.push(queue.waiting()[0].0.to_owned());
            queue.take(2);
        }
        assert_eq!(order, ["w0", "w2", "w4", "w1", "w3"]);
        // Two workspaces, three tags a call: they take turns being first.
        assert_eq!(batches(&[9, 9], 3), vec![vec![2, 1], vec![1, 2], vec![2, 1], vec![1, 2], vec![2, 1], vec![1, 2]]);
    }

    #[test]
    fn a_tag_queued_twice_is_purged_once_for_both() {
        let mut queue = FairQueue::default();
        let (a, b) = (queue.push("w", tag("w", 0)), queue.push("w", tag("w", 0)));
        let batch = queue.take(30);
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].1.len(), 2);
        drop((a, b));
        assert!(queue.waiting().is_empty());
    }
}
