-- The row capture function of one table (pgferry schema version 1), generated at install.
-- Placeholders: @FUNCTION@ (qualified name), @TABLE_ID@, @NEW_KEY@ and @OLD_KEY@ (text[]
-- expressions over NEW/OLD, each key column in its KeyForm), @CURRENT_XID@. The body is passed
-- as a quoted literal, so no column name can break out of it.
-- AFTER ROW: it sees the row as committed by every BEFORE trigger, and it works on partitioned
-- parents (11+), whose partitions inherit it. A row moved between partitions arrives as DELETE
-- plus INSERT, each with the parent's key. SECURITY DEFINER without SET search_path: every
-- name in the body is schema-qualified, operators included (see pgferry--1.sql).
CREATE FUNCTION @FUNCTION@() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS @BODY@
