-- pgferry delta columns (two-way syncs): what schema pgferry gains the first time an install
-- declares a delta column (`pgferry install --delta-column SCHEMA.TABLE.COLUMN`). A delta column
-- merges instead of overwriting when two nodes changed it (local + (remote new - remote old)),
-- so its capture records the old and new values.
--
-- Run by pgferry-install inside the install transaction, only when the columns are missing;
-- every statement is idempotent. Nullable columns without a default: adding them rewrites
-- nothing, and rows of tables without delta columns keep them NULL (their capture functions do
-- not name them). Removed with the schema by `pgferry uninstall` and `pgferry clean`.

-- The table's delta columns, in a fixed order (the table's column order at declaration);
-- NULL: none.
ALTER TABLE pgferry.captured_table ADD COLUMN IF NOT EXISTS delta_columns text[];

-- The values of those columns, aligned with captured_table.delta_columns: before and after an
-- UPDATE; NULL and the values for an INSERT; the values and NULL for a DELETE. A NULL column
-- value is a NULL element.
ALTER TABLE pgferry.delta ADD COLUMN IF NOT EXISTS delta_old numeric[];
ALTER TABLE pgferry.delta ADD COLUMN IF NOT EXISTS delta_new numeric[];
