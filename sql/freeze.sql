-- pgferry cutover: the freeze of a source's captured tables (see crates/pgferry-sync/src/freeze.rs).
--
-- Run by `pgferry cutover` inside the freeze transaction, after it has locked every captured
-- table IN EXCLUSIVE MODE; every statement is idempotent, so a cutover that was interrupted can
-- freeze again. Removed with the schema by `pgferry uninstall` and `pgferry clean` (the
-- freeze triggers are pgferry_* triggers calling a function in schema pgferry).

-- Cutovers of this source, newest last:
--   state  'frozen'   the captured tables refuse writes; a cutover is running or was interrupted
--          'done'     cut over: the source stays frozen (it is the old system) and no longer
--                     replicates: the sync engine refuses new rounds from it
--          'unfrozen' writable again: the cutover failed and was rolled back, or
--                     `pgferry unfreeze` ran
CREATE TABLE IF NOT EXISTS pgferry.cutover (
    cutover_id bigserial PRIMARY KEY,
    state text NOT NULL CHECK (state IN ('frozen', 'done', 'unfrozen')),
    targets text[] NOT NULL,
    frozen_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    finished_at timestamptz,
    note text
);

-- The freeze triggers' function: every write to a frozen table fails, whatever role writes.
-- SQLSTATE 25006 (read_only_sql_transaction), the error a read-only transaction gives.
CREATE OR REPLACE FUNCTION pgferry.refuse_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'table %.% is frozen: pgferry cut this database over to a new one and it no longer takes writes',
        TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'read_only_sql_transaction',
              HINT = 'point the application at the new database; `pgferry unfreeze --source …` makes this one writable again';
END
$$;
