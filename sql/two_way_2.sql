-- pgferry two-way (multi-node) replication, second part: change times a decision carries, and what
-- lets a conflict between two nodes end alike on a third (see crates/pgferry-sync/src/mesh.rs).
--
-- Run by the sync engine after two_way.sql, in one transaction under lock_timeout; every
-- statement is idempotent. Removed with the schema by `pgferry uninstall` and `pgferry clean`.

-- A capture row a decision wrote (the kept rows of a conflict recorded as changed, so they ship
-- to every peer) carries the time of the winning change, so the `latest` rule judges it as that
-- change and not as a new one; NULL on rows the capture triggers write.
ALTER TABLE pgferry.delta ADD COLUMN IF NOT EXISTS origin_at timestamptz;

-- Where this node's row of a key came from, when a round applied it from a peer (meshes of
-- three or more nodes): the peer, the transactions of its changes, the time of the latest, and
-- the row version the round wrote (its xmin; NULL: the round deleted the row). A change that
-- arrives later from another peer which had not applied those transactions is a conflict with
-- them, decided here by the sync's rule. Kept until every other peer has applied them
-- (`waiting`: the peers not yet known to have).
CREATE TABLE IF NOT EXISTS pgferry.row_origin (
    table_id integer NOT NULL,
    key text[] NOT NULL,
    node text NOT NULL,
    node_id text NOT NULL,
    xids text[] NOT NULL,
    changed_at timestamptz,
    row_xmin text,
    waiting text[] NOT NULL,
    PRIMARY KEY (table_id, key)
);
CREATE INDEX IF NOT EXISTS row_origin_node ON pgferry.row_origin (node_id);
