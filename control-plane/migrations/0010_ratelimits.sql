-- A key's named rate limits as its record carries them (a JSON list of
-- `keyward_shared::ratelimit::RateLimit`); NULL: none.
ALTER TABLE keys ADD COLUMN ratelimits TEXT;
