//! `keyward admin`: commands an operator runs on the control plane's machine, against the
//! database itself and never over HTTP, for when the admin API cannot be used at all.
//!
//! `admin recover` is the way back in for a workspace whose every root key was revoked (a root
//! key with `root_key.manage` may revoke them all, its own included): it mints a root key with
//! every scope straight into the database and prints it once. The running control plane, which
//! reads the same database, accepts it at once and publishes it to the edge from the outbox.

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::change;
use crate::store::Store;

/// Mints a root key with every scope for `workspace` (or the only workspace, when there is one)
/// in the database at `database`; answers it as JSON, the key included.
pub async fn recover(database: &Path, workspace: Option<&str>) -> anyhow::Result<Value> {
    // Opening a missing file would create an empty database: refuse, naming the setting.
    if !database.is_file() {
        bail!(
            "no database at {}: give the control plane's database file (`database` in keyward.toml, or KEYWARD_DATABASE)",
            database.display()
        );
    }
    let store = Store::open(database).await?;
    let workspaces = store.workspaces().await?;
    let listed = || workspaces.iter().map(|(id, name)| format!("  {id}  {name}")).collect::<Vec<_>>().join("\n");
    let workspace_id = match (workspace, workspaces.as_slice()) {
        (Some(id), all) if all.iter().any(|(w, _)| w == id) => id.to_owned(),
        (Some(id), _) => bail!("no workspace `{id}` in {}; its workspaces are:\n{}", database.display(), listed()),
        (None, [(only, _)]) => only.clone(),
        (None, []) => bail!("{} has no workspace: `keyward serve` creates the first one", database.display()),
        (None, _) => bail!(
            "{} has {} workspaces: name one with --workspace:\n{}",
            database.display(),
            workspaces.len(),
            listed()
        ),
    };
    let key = crate::config::Config::load(None)
        .context("the audit log's chain needs the control plane's config (KEYWARD_CONFIG or keyward.toml)")?
        .audit_key()
        .context("no audit_secret or purge_secret in the config (or KEYWARD_AUDIT_SECRET): the audit log's chain cannot be continued")?;
    let store = store.with_audit_key(key);
    let reach = store.last_reach().await?;
    let (minted, published) =
        change::recover_root_key(&store, &workspace_id, reach).await.context("cannot mint the root key")?;
    store.close().await;
    Ok(json!({
        "workspace_id": minted.workspace_id,
        "id": minted.id,
        "key": minted.key.expose(),
        "start": minted.key.start(),
        "scopes": minted.scopes,
        "published": published,
    }))
}
