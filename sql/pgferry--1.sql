-- pgferry schema, version 1: everything pgferry installs in a source database.
-- Loaded by pgferry-install with include_str!; released files are never edited (upgrades are new
-- files). Placeholders, filled per server version (10 to 18):
--   @XID_TYPE@          xid8 (13+) or int8 (10-12): the writing transaction's 64-bit id
--   @CURRENT_XID@       pg_current_xact_id() (13+) or txid_current()
--   @SNAPSHOT_TYPE@     pg_snapshot (13+) or txid_snapshot
--   @CURRENT_SNAPSHOT@  pg_current_snapshot() (13+) or txid_current_snapshot()
-- Every function is SECURITY DEFINER, so any role that may write a captured table records its
-- changes without grants on this schema. Instead of a per-function SET search_path (measured:
-- about 12% of the trigger's cost on bulk statements, for the GUC save/restore on every call),
-- every name in the function bodies is schema-qualified, operators included, so a writer's
-- search_path cannot substitute anything.

CREATE SCHEMA pgferry;
COMMENT ON SCHEMA pgferry IS 'pgferry delta capture and replication state; remove with pgferry uninstall (source) or pgferry clean (restored copy)';

-- One row: what was installed, and the node identity. A restored copy carries the same row,
-- which is how a target that is an uncleaned copy of its source is recognised.
CREATE TABLE pgferry.installation (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    schema_version integer NOT NULL,
    node_id text NOT NULL,
    system_identifier text,
    database_name text NOT NULL,
    server_version_num integer NOT NULL,
    pgferry_version text NOT NULL,
    -- Capture rows with a smaller xid have been purged (every registered target had them).
    purged_below @XID_TYPE@,
    installed_by text NOT NULL DEFAULT CURRENT_USER,
    installed_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- The registry of captured tables. table_id is what pgferry.delta records; names, never OIDs.
CREATE TABLE pgferry.captured_table (
    table_id integer PRIMARY KEY,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    key_columns text[] NOT NULL,
    key_types text[] NOT NULL,
    key_forms text[] NOT NULL,
    capture_function text NOT NULL,
    capture_mode text NOT NULL CHECK (capture_mode IN ('statement', 'row')),
    partitioned boolean NOT NULL,
    added_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    added_snapshot @SNAPSHOT_TYPE@ NOT NULL DEFAULT @CURRENT_SNAPSHOT@,
    UNIQUE (schema_name, table_name)
);

-- Sequences used by captured tables (owned by a column, or named in a default).
CREATE TABLE pgferry.captured_sequence (
    schema_name text NOT NULL,
    sequence_name text NOT NULL,
    table_id integer NOT NULL REFERENCES pgferry.captured_table ON DELETE CASCADE,
    PRIMARY KEY (schema_name, sequence_name)
);

-- The capture: one row per changed row (or per TRUNCATE), appended by the triggers.
--   xid      the writing transaction; rounds select rows by snapshot visibility of xid (PgQ's
--            rule), never by time, so transactions that commit out of order are never missed
--   op       'I', 'U', 'D', or 'T' (TRUNCATE; key = {schema, partition} when one partition)
--   key      the key after the change (the deleted key for 'D'), as text in the key's KeyForm
--   old_key  the key before an UPDATE that changed it, paired with key; NULL otherwise
-- No index and no constraint: every index would be maintained on every captured write. Rounds
-- read it by a scan that purge keeps short.
CREATE TABLE pgferry.delta (
    xid @XID_TYPE@ NOT NULL,
    table_id integer NOT NULL,
    op "char" NOT NULL,
    key text[],
    old_key text[]
) WITH (fillfactor = 100);

-- Ticks: (snapshot, time) pairs written by a running pgferry, for lag in seconds.
CREATE TABLE pgferry.tick (
    tick_id bigserial PRIMARY KEY,
    snapshot @SNAPSHOT_TYPE@ NOT NULL,
    tick_time timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);

-- Targets reserved (pgferry target add) or registered (first sync) on this source, and the
-- progress each acknowledged. Capture rows are purged only below the slowest of them; a
-- reserved target that has acknowledged nothing yet holds purge back entirely.
CREATE TABLE pgferry.target (
    name text PRIMARY KEY,
    node_id text,
    reserved_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- Captured tables the target had when it registered: a table captured later has rows the
    -- target never received.
    table_ids integer[],
    acked_snapshot @SNAPSHOT_TYPE@,
    acked_at timestamptz
);

-- On a target: the source snapshot it last applied, per source, written in the same transaction
-- as the rows of that round (the truth about a target's progress). Snapshots are kept as text,
-- whose form is the same for pg_snapshot and txid_snapshot, since source and target may run
-- different major versions.
CREATE TABLE pgferry.applied (
    source_node_id text PRIMARY KEY,
    source text NOT NULL,
    snapshot text,
    rounds bigint NOT NULL DEFAULT 0,
    applied_at timestamptz
);

-- On a target, during a round split table by table (--split-rounds-above): the tables already
-- committed at the round's snapshot. Emptied when the round ends.
CREATE TABLE pgferry.applied_table (
    source_node_id text NOT NULL REFERENCES pgferry.applied ON DELETE CASCADE,
    table_id integer NOT NULL,
    snapshot text NOT NULL,
    PRIMARY KEY (source_node_id, table_id)
);

-- TRUNCATE capture, shared by every captured table and partition:
--   TG_ARGV[0] the captured table's table_id, TG_ARGV[1] 'table' or 'partition'.
CREATE FUNCTION pgferry.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $body$
BEGIN
    IF TG_ARGV[1] OPERATOR(pg_catalog.=) 'partition' THEN
        INSERT INTO pgferry.delta (xid, table_id, op, key)
        VALUES (@CURRENT_XID@, TG_ARGV[0]::pg_catalog.int4, 'T',
                ARRAY[TG_TABLE_SCHEMA::pg_catalog.text, TG_TABLE_NAME::pg_catalog.text]);
    ELSE
        INSERT INTO pgferry.delta (xid, table_id, op)
        VALUES (@CURRENT_XID@, TG_ARGV[0]::pg_catalog.int4, 'T');
    END IF;
    RETURN NULL;
END
$body$;
