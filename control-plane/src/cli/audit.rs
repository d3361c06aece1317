//! `keyward audit verify`: walks the audit log's chain on the database itself, with the secret
//! from the config, and (given a checkpoint saved before from `keyward audit checkpoint`) checks
//! that no entry was deleted from the end since. Fails (non-zero) naming the first entry that
//! does not verify.

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::outbox::{DatabaseArgs, open};
use crate::store::audit::Checkpoint;

/// Verifies the chain; answers what it found, or fails naming the broken entry.
pub async fn verify(database: DatabaseArgs, checkpoint: Option<PathBuf>) -> anyhow::Result<Value> {
    let checkpoint: Option<Checkpoint> = match checkpoint {
        Some(path) => {
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
            Some(serde_json::from_str(&text).with_context(|| {
                format!("{} is not a checkpoint (save one with `keyward audit checkpoint --json`)", path.display())
            })?)
        }
        None => None,
    };
    let (store, _) = open(database).await?;
    let verified = store.verify_audit(checkpoint.as_ref()).await?;
    store.close().await;
    if let Some((id, why)) = &verified.broken {
        bail!("the audit log does not verify at entry {id}: {why} ({} entries)", verified.entries);
    }
    Ok(json!({
        "entries": verified.entries,
        "head": verified.head.map(|h| json!({ "id": h.id, "mac": h.mac })),
        "checkpoint": checkpoint.map(|c| c.id),
        "verified": true,
    }))
}
