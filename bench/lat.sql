-- The latency workload of bench/daemon.sh and bench/daemon-ab.sh: pgbench's tpcb-like
-- transaction with, as its last statement, a lat row stamped with clock_timestamp(), so the
-- workload writes its own timestamp just before COMMIT.
-- pgbench sets :scale for a custom script only from -s (without it, 1: one branch, ten
-- tellers, 100,000 accounts, whatever the database holds): the scripts that run it pass -s.
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
INSERT INTO lat (t0) VALUES (clock_timestamp());
END;
