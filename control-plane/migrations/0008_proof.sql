-- When a region began answering from a signed purge's record, by the region's clock (Unix ms),
-- as its acknowledgement said: the moment a revocation proof measures that region from.
ALTER TABLE deliveries ADD COLUMN applied_at INTEGER;

-- When the change's caller was answered (Unix ms, the control plane's clock): the promise's
-- bound (`max_staleness_ms`) runs from there.
ALTER TABLE outbox ADD COLUMN answered_at INTEGER;
