-- The audit log: one row per admin change, written in the change's own transaction, never
-- updated or deleted. `body` is the entry as canonical JSON; the other columns copy it for
-- queries. `mac` chains each entry to the one before with an HMAC keyed by a secret kept
-- outside the database (see store/audit.rs).
CREATE TABLE audit_log (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    workspace_id TEXT NOT NULL,
    root_key_id TEXT,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    body TEXT NOT NULL,
    mac TEXT NOT NULL
);
CREATE INDEX audit_by_workspace ON audit_log (workspace_id, id);
CREATE INDEX audit_by_target ON audit_log (target, id);
CREATE INDEX audit_by_root_key ON audit_log (root_key_id, id);
