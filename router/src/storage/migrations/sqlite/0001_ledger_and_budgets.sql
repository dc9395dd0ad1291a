-- Budget scopes: one row per scope and period ("team:alpha:month:2026-11"), created on first
-- use. Limits are not stored: they come from configuration with every reservation.
CREATE TABLE budget_scopes (
    scope           TEXT PRIMARY KEY NOT NULL,
    spent_nanos     INTEGER NOT NULL DEFAULT 0 CHECK (spent_nanos >= 0),
    reserved_nanos  INTEGER NOT NULL DEFAULT 0 CHECK (reserved_nanos >= 0),
    created_unix_ms INTEGER NOT NULL
) STRICT;

-- A reservation holds amount_nanos in reserved_nanos of each of its scopes while 'held'.
CREATE TABLE reservations (
    id              TEXT PRIMARY KEY NOT NULL,
    request_id      TEXT NOT NULL,
    amount_nanos    INTEGER NOT NULL CHECK (amount_nanos >= 0),
    created_unix_ms INTEGER NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('held', 'settled', 'released', 'expired')),
    actual_nanos    INTEGER CHECK (actual_nanos >= 0)
) STRICT;

-- Finds stale reservations without scanning finished ones.
CREATE INDEX reservations_held_by_age ON reservations (created_unix_ms) WHERE state = 'held';
-- Finds old finished reservations to forget.
CREATE INDEX reservations_by_age ON reservations (created_unix_ms);

CREATE TABLE reservation_scopes (
    reservation_id TEXT NOT NULL REFERENCES reservations (id) ON DELETE CASCADE,
    scope          TEXT NOT NULL REFERENCES budget_scopes (scope),
    PRIMARY KEY (reservation_id, scope)
) STRICT;

-- One row per request.
CREATE TABLE ledger (
    id                   TEXT PRIMARY KEY NOT NULL,
    created_unix_ms      INTEGER NOT NULL,
    team                 TEXT,
    key_id               TEXT,
    experiment           TEXT,
    variant              TEXT,
    route                TEXT NOT NULL,
    reason               TEXT NOT NULL,
    confidence           REAL,
    confidence_aggregate TEXT,
    local_tokens         INTEGER NOT NULL CHECK (local_tokens >= 0),
    remote_model         TEXT,
    remote_input_tokens  INTEGER NOT NULL CHECK (remote_input_tokens >= 0),
    remote_output_tokens INTEGER NOT NULL CHECK (remote_output_tokens >= 0),
    cost_nanos           INTEGER NOT NULL CHECK (cost_nanos >= 0),
    latency_ms           INTEGER NOT NULL CHECK (latency_ms >= 0),
    status               INTEGER NOT NULL,
    prompt_text          TEXT,
    feedback_score       REAL CHECK (feedback_score >= 0 AND feedback_score <= 1),
    feedback_comment     TEXT,
    feedback_unix_ms     INTEGER
) STRICT;

CREATE INDEX ledger_by_time ON ledger (created_unix_ms);
CREATE INDEX ledger_by_team_time ON ledger (team, created_unix_ms);
CREATE INDEX ledger_by_experiment ON ledger (experiment, created_unix_ms) WHERE experiment IS NOT NULL;
