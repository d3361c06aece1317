-- Identities: a customer (by the API owner's `external_id`, unique in its workspace) whose
-- rate limits and credits (`keyward_shared::identity::IdentityRecord`'s, as JSON; NULL: none)
-- are shared by every key attached to it. `meta` stays here (JSON object text); `version`
-- grows by one on every change (compare-and-set). A key names its identity in `identity_id`
-- (NULL: none); no foreign key, so that a deleted key's row may keep naming an identity that
-- was deleted after it (an identity that a live key names cannot be deleted).

CREATE TABLE identities (
    id                TEXT PRIMARY KEY,
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    external_id       TEXT NOT NULL,
    meta              TEXT NOT NULL,
    credits           TEXT,
    ratelimits        TEXT,
    max_staleness_ms  INTEGER NOT NULL,
    version           INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    UNIQUE (workspace_id, external_id)
);

ALTER TABLE keys ADD COLUMN identity_id TEXT;
CREATE INDEX keys_by_identity ON keys (identity_id);
