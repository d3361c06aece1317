-- Each outbox entry names the workspace whose key or root key it carries, so that
-- `GET /v1/regions` shows a workspace its own deliveries only. Entries written before this
-- migration take their key's or root key's workspace. A delivery may now also be
-- 'dead_lettered': a delivery no promise depends on, given up after its age limit (7 days by
-- default) and redriven by an operator (`keyward outbox redrive`). Delivered entries are pruned
-- by age, hence the index on creation time.

ALTER TABLE outbox ADD COLUMN workspace_id TEXT;
UPDATE outbox SET workspace_id = (SELECT workspace_id FROM keys WHERE keys.id = outbox.key_id)
    WHERE kind = 'key';
UPDATE outbox SET workspace_id = (SELECT workspace_id FROM root_keys WHERE root_keys.id = outbox.key_id)
    WHERE kind = 'root_key';

CREATE INDEX outbox_by_workspace ON outbox (workspace_id, id);
CREATE INDEX outbox_by_age ON outbox (created_at);
