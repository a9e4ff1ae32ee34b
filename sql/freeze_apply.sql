-- pgferry cutover: the freeze lets pgferry's own apply sessions through, and a cut-over
-- database records who follows it back (`pgferry cutover --reverse`, see
-- crates/pgferry-sync/src/reverse.rs).
--
-- An upgrade of freeze.sql (released files are not edited): every freeze runs freeze.sql, then
-- this file, in the same transaction, so this definition of pgferry.refuse_write() is the one
-- that stands. Every statement is idempotent.

-- The database that replicates back into this cut-over one (its node_id), set when the
-- cutover that made it the old system ran with --reverse: the way back, `pgferry cutover`
-- from that database to this one, is allowed only then.
ALTER TABLE pgferry.cutover ADD COLUMN IF NOT EXISTS followed_by text;

-- The freeze triggers' function. Every write to a frozen table fails with SQLSTATE 25006
-- (read_only_sql_transaction), whatever role writes, except in a transaction that applies a
-- round of pgferry (`SET LOCAL pgferry.apply = 'on'`, which every round's target transaction
-- does) run by a role that may use schema pgferry (an application's role normally may not:
-- the capture functions are SECURITY DEFINER and need no grant). After `cutover --reverse` the
-- old database takes the new one's rows this way while it refuses its applications' writes.
-- A BEFORE ROW trigger lets the row through by returning it: NEW for INSERT and UPDATE, OLD
-- for DELETE; a statement trigger's (TRUNCATE's) return value is ignored.
-- Not SECURITY DEFINER: current_user is the writer. Names and operators are schema-qualified,
-- since the writer's search_path is in force.
CREATE OR REPLACE FUNCTION pgferry.refuse_write() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_catalog.current_setting('pgferry.apply', true) OPERATOR(pg_catalog.=) 'on'
       AND pg_catalog.has_schema_privilege('pgferry', 'USAGE') THEN
        IF TG_LEVEL OPERATOR(pg_catalog.=) 'STATEMENT' THEN
            RETURN NULL;
        ELSIF TG_OP OPERATOR(pg_catalog.=) 'DELETE' THEN
            RETURN OLD;
        END IF;
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'table %.% is frozen: pgferry cut this database over to a new one and it no longer takes writes',
        TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'read_only_sql_transaction',
              HINT = 'point the application at the new database; `pgferry unfreeze --source …` makes this one writable again';
END
$$;
