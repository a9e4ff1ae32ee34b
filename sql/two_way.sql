-- pgferry two-way (multi-node) replication: what a node's schema pgferry gains when it first
-- takes part in a two-way sync (see crates/pgferry-sync/src/conflict.rs).
--
-- Run by the sync engine in one transaction under lock_timeout; every statement is idempotent.
-- Removed with the schema by `pgferry uninstall` and `pgferry clean`.

-- The time of each captured change, for the `latest` rule where track_commit_timestamp is off
-- (the write's clock time, not its commit time: docs/conflicts.md). Added without a table
-- rewrite: rows captured before have none.
ALTER TABLE pgferry.delta ADD COLUMN IF NOT EXISTS changed_at timestamptz;
ALTER TABLE pgferry.delta ALTER COLUMN changed_at SET DEFAULT pg_catalog.clock_timestamp();

-- Every conflict this node decided while applying a peer's changes, in the round's
-- transaction: the keys of the group (a key change links two keys), both sides' row images and
-- change times, the rule and the winner (a node name, 'merged' or 'skip').
CREATE TABLE IF NOT EXISTS pgferry.conflict (
    conflict_id bigserial PRIMARY KEY,
    decided_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    table_name text NOT NULL,
    keys jsonb NOT NULL,
    local_node text NOT NULL,
    remote_node text NOT NULL,
    local_ops text NOT NULL,
    remote_ops text NOT NULL,
    local_rows jsonb NOT NULL,
    remote_rows jsonb NOT NULL,
    local_changed_at timestamptz,
    remote_changed_at timestamptz,
    rule text NOT NULL,
    winner text NOT NULL,
    -- 'key' (one key changed on both nodes) or 'unique:INDEX' (two keys whose rows collide in
    -- another unique index; keys holds the remote's key first)
    kind text NOT NULL DEFAULT 'key',
    -- the table's schema and name as in pgferry.captured_table (table_name is for people)
    schema_name text NOT NULL,
    relation_name text NOT NULL,
    -- a skip settled by `pgferry conflicts resolve` (NULL: open, or settled by a later change)
    settled_at timestamptz,
    settled_by text
);
CREATE INDEX IF NOT EXISTS conflict_decided_at ON pgferry.conflict (decided_at);
