-- What a paid call cost beyond the worst case its reservation held (nano-USD): 0 unless a
-- remote billed more than the request allowed it to (see docs/api.md, "Budgets").
ALTER TABLE ledger ADD COLUMN overrun_nanos INTEGER NOT NULL DEFAULT 0 CHECK (overrun_nanos >= 0);
