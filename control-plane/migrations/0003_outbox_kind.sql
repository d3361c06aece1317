-- Each outbox entry says what it carries: a key's record ('key') or a root key's ('root_key');
-- `key_id` holds that key's or root key's id. Entries written before this migration are told
-- apart by the id's prefix, which is `root_` for every root key.

ALTER TABLE outbox ADD COLUMN kind TEXT NOT NULL DEFAULT 'key';
UPDATE outbox SET kind = 'root_key' WHERE key_id LIKE 'root!_%' ESCAPE '!';
