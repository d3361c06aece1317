-- The outbox: every key change, written in the same transaction as the change, with one
-- delivery row per target ('authority', 'kv:<region>', 'purge:<region>'). A delivery is
-- 'pending' until acknowledged ('done'), or 'superseded' by a newer change of the same key
-- that carries the same target. Tightening rows are also the event stream (`GET /v1/events`).

CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id      TEXT NOT NULL,
    kv_key      TEXT NOT NULL,
    record      TEXT NOT NULL,
    tightening  INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE INDEX outbox_by_key ON outbox (key_id, id);
CREATE INDEX outbox_tightening ON outbox (tightening, id);

CREATE TABLE deliveries (
    outbox_id        INTEGER NOT NULL REFERENCES outbox(id),
    target           TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    last_error       TEXT,
    done_at          INTEGER,
    PRIMARY KEY (outbox_id, target)
);

CREATE INDEX deliveries_pending ON deliveries (state, next_attempt_at);
