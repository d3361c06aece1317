-- A key's usage credits as its record carries them (`keyward_shared::credits::Credits` as JSON);
-- NULL: unlimited.
ALTER TABLE keys ADD COLUMN credits TEXT;
