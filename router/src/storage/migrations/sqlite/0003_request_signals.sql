-- The confidence signals of a locally generated answer, kept when the policy's `log_signals`
-- asks (docs/confidence.md, "Per-team calibration from feedback"): every generated token's
-- log-prob, entropy and margin as little-endian f32 triples, and optionally the hidden-state
-- features as little-endian f16 (final_mean, final_last, middle_mean, middle_last, a quarter
-- of the values each). A table of its own so that the ledger's rows stay small for the
-- reports that scan them, and so that the signals are deleted on their own schedule
-- (`storage.signals_retention_days`), by their request's time, through the index.
CREATE TABLE request_signals (
    request_id              TEXT PRIMARY KEY NOT NULL,
    request_created_unix_ms INTEGER NOT NULL,
    tokens                  BLOB NOT NULL,
    hidden                  BLOB
) STRICT;

CREATE INDEX request_signals_by_time ON request_signals (request_created_unix_ms);
