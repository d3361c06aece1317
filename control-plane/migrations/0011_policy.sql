-- Allow and deny lists (`keyward_shared::policy::Policy` as JSON; NULL: none) for a key, and
-- an API's record at the edge: its lists, its limit override (`LimitOverride` as JSON; NULL:
-- none) and its version (0: never delivered; each change adds one, compare-and-set).

ALTER TABLE keys ADD COLUMN policy TEXT;
ALTER TABLE apis ADD COLUMN policy TEXT;
ALTER TABLE apis ADD COLUMN limit_override TEXT;
ALTER TABLE apis ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE apis ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0;
