-- One transaction of the rehearsal's writer (pgbench -f): an order, a payment, an event.
\set account random(1, 1000)
\set event random(1, 1000000000)
BEGIN;
INSERT INTO shop.orders (account_id, amount) VALUES (:account, random() * 100);
UPDATE shop.accounts SET balance = balance + 1 WHERE id = :account;
UPDATE shop.orders SET state = 'paid' WHERE id = (SELECT max(id) FROM shop.orders WHERE account_id = :account);
INSERT INTO shop.events VALUES (:event, CASE WHEN :event % 2 = 0 THEN 'eu' ELSE 'us' END, 'live')
    ON CONFLICT DO NOTHING;
COMMIT;
