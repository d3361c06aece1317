-- Usage events: one row per verification, at the edge or at the origin, kept 30 days.
-- Ingestion is by numbered batches (`usage_batches`, one row per holder and batch number), so a
-- batch sent twice is stored once and what never arrived is counted from the numbering.
-- Per-minute and per-day counts (`usage_minutes`, `usage_days`, kept a year) are maintained in
-- the same transaction as the events; `''` stands for "none" in their keys.

CREATE TABLE usage_events (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    request_id TEXT NOT NULL,
    workspace_id TEXT NOT NULL,
    api_id TEXT,
    key_id TEXT,
    owner_id TEXT,
    region TEXT NOT NULL,
    code TEXT NOT NULL,
    version INTEGER,
    source TEXT,
    caller_ip TEXT,
    user_agent TEXT,
    client_ip TEXT,
    client_user_agent TEXT,
    client_country TEXT
);
CREATE INDEX usage_events_by_key ON usage_events (key_id, at_ms) WHERE key_id IS NOT NULL;
CREATE INDEX usage_events_by_api ON usage_events (workspace_id, api_id, at_ms);
CREATE INDEX usage_events_by_owner ON usage_events (workspace_id, owner_id, at_ms) WHERE owner_id IS NOT NULL;
CREATE INDEX usage_events_by_age ON usage_events (at_ms);

CREATE TABLE usage_minutes (
    bucket INTEGER NOT NULL,
    workspace_id TEXT NOT NULL,
    api_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    region TEXT NOT NULL,
    code TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (key_id, bucket, workspace_id, api_id, owner_id, region, code)
) WITHOUT ROWID;
CREATE INDEX usage_minutes_by_api ON usage_minutes (workspace_id, api_id, bucket);
CREATE INDEX usage_minutes_by_owner ON usage_minutes (workspace_id, owner_id, bucket);
CREATE INDEX usage_minutes_by_age ON usage_minutes (bucket);

CREATE TABLE usage_days (
    bucket INTEGER NOT NULL,
    workspace_id TEXT NOT NULL,
    api_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    owner_id TEXT NOT NULL,
    region TEXT NOT NULL,
    code TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (key_id, bucket, workspace_id, api_id, owner_id, region, code)
) WITHOUT ROWID;
CREATE INDEX usage_days_by_api ON usage_days (workspace_id, api_id, bucket);
CREATE INDEX usage_days_by_owner ON usage_days (workspace_id, owner_id, bucket);
CREATE INDEX usage_days_by_age ON usage_days (bucket);

-- A key's last use and last VALID answer, by the time each was decided.
CREATE TABLE usage_last (
    key_id TEXT PRIMARY KEY,
    last_used_ms INTEGER NOT NULL,
    last_valid_ms INTEGER
);

CREATE TABLE usage_batches (
    holder TEXT NOT NULL,
    seq INTEGER NOT NULL,
    region TEXT NOT NULL,
    first_event INTEGER NOT NULL,
    events INTEGER NOT NULL,
    dropped INTEGER NOT NULL,
    held_after INTEGER NOT NULL,
    received_at_ms INTEGER NOT NULL,
    PRIMARY KEY (holder, seq)
);
CREATE INDEX usage_batches_by_age ON usage_batches (received_at_ms);

-- Per holder, what its batches add up to: losses are read from here, exactly, whatever the
-- range asked (a batch's row alone could not tell a pruned batch from a lost one).
CREATE TABLE usage_holders (
    holder TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    batches INTEGER NOT NULL,
    max_seq INTEGER NOT NULL,
    numbered INTEGER NOT NULL,
    stored INTEGER NOT NULL,
    dropped INTEGER NOT NULL,
    held_after INTEGER NOT NULL,
    last_at_ms INTEGER NOT NULL
);
