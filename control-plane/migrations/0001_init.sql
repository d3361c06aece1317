-- Keyward's first schema. Times are Unix milliseconds; JSON columns hold JSON text.
-- Plaintext keys are never stored: only their SHA-256 (hex) and display start.

CREATE TABLE workspaces (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE root_keys (
    id            TEXT PRIMARY KEY,
    workspace_id  TEXT NOT NULL REFERENCES workspaces(id),
    name          TEXT NOT NULL,
    hash          TEXT NOT NULL UNIQUE,
    start         TEXT NOT NULL,
    scopes        TEXT NOT NULL,
    status        TEXT NOT NULL,
    version       INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE TABLE apis (
    id                TEXT PRIMARY KEY,
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    name              TEXT NOT NULL,
    prefix            TEXT NOT NULL,
    max_staleness_ms  INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    UNIQUE (workspace_id, name)
);

CREATE TABLE keys (
    id                TEXT PRIMARY KEY,
    api_id            TEXT NOT NULL REFERENCES apis(id),
    workspace_id      TEXT NOT NULL REFERENCES workspaces(id),
    hash              TEXT NOT NULL UNIQUE,
    start             TEXT NOT NULL,
    name              TEXT,
    owner_id          TEXT,
    meta              TEXT NOT NULL,
    enabled           INTEGER NOT NULL,
    status            TEXT NOT NULL,
    expires_at        INTEGER,
    permissions       TEXT NOT NULL,
    version           INTEGER NOT NULL,
    max_staleness_ms  INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL
);

CREATE INDEX keys_by_api ON keys (api_id, id);
CREATE INDEX keys_by_start ON keys (workspace_id, start);
