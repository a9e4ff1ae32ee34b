-- The capture function of one table (pgferry schema version 1), generated at install from one
-- of two bodies, chosen per table:
--   capture_statement.plpgsql  ordinary tables outside any inheritance tree: statement-level
--       AFTER INSERT/UPDATE/DELETE triggers read the keys from transition tables (one INSERT ...
--       SELECT per statement, so a bulk statement pays per statement, not per row), plus a
--       row-level AFTER UPDATE trigger, WHEN the key changed (evaluated without a function
--       call; not UPDATE OF <key>, which misses keys changed by BEFORE triggers), that records
--       the old and new key as a pair.
--   capture_row.plpgsql  partitioned tables, partitions and inheritance trees: an AFTER ROW
--       trigger. Row triggers are inherited by partitions (also those attached later) and fire
--       for rows a statement on a parent touches in a child; statement triggers do neither.
--       A row moved between partitions arrives as DELETE plus INSERT, each with the key.
-- Placeholders: @FUNCTION@ (qualified name), @BODY@ (the body, passed as a quoted literal so
-- no column name can break out of it), and in the bodies @TABLE_ID@, @CURRENT_XID@, and
-- @KEY_NEW@, @KEY_OLD@, @KEY_N@, @KEY_O@: text[] key expressions over NEW, OLD and the
-- transition tables' rows n and o, each key column in its KeyForm.
-- SECURITY DEFINER without SET search_path: every name in the bodies is schema-qualified,
-- operators included (see pgferry--1.sql).
CREATE FUNCTION @FUNCTION@() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS @BODY@
