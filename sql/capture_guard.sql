-- The capture guard: rows pgferry applies are never captured again, also where its role may
-- not set session_replication_role = replica (under which the capture triggers do not fire).
--
-- Every round's target transaction runs `SET LOCAL pgferry.apply = 'on'`. The capture
-- functions return at once when that setting is on AND the session's role (SESSION_USER: the
-- functions are SECURITY DEFINER, so current_user is their owner) may use schema pgferry, which
-- an application's role normally may not (the capture needs no grant): an application that sets
-- pgferry.apply itself is still captured. The privilege is checked only when the setting is on,
-- so an ordinary write pays one current_setting call per trigger call.
--
-- The per-table bodies carry the guard from their second versions on
-- (capture_statement_v2.plpgsql, capture_row_v2.plpgsql, capture_row_delta_v2.plpgsql); this
-- file gives it to the shared TRUNCATE capture of pgferry--1.sql (released files are not
-- edited). Run after pgferry--1.sql by every new install and target registration, and by
-- `pgferry install` on a schema whose TRUNCATE capture lacks the guard. Idempotent.
CREATE OR REPLACE FUNCTION pgferry.capture_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $body$
BEGIN
    IF pg_catalog.current_setting('pgferry.apply', true) OPERATOR(pg_catalog.=) 'on' THEN
        IF pg_catalog.has_schema_privilege(SESSION_USER, 'pgferry', 'USAGE') THEN
            RETURN NULL;
        END IF;
    END IF;
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
