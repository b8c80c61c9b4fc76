-- The client compatibility scenario for psql, run directly and through the gate by
-- tests/tests/drivers.rs (which appends a 10 MiB bytea literal); the outputs must match.
\pset null '(null)'
SELECT 1 AS connect;
SELECT 41 + 1 AS answer, 'héllo ✓ 😀 中文' AS unicode, NULL::int AS nothing;
SHOW statement_timeout;
PREPARE twice(int) AS SELECT $1 * 2;
EXECUTE twice(21);
EXECUTE twice(22);
DEALLOCATE twice;
CREATE TEMP TABLE t (id int, v text, b bytea);
BEGIN;
INSERT INTO t VALUES (1, 'one', NULL);
SAVEPOINT s;
INSERT INTO t VALUES (2, 'two', NULL);
ROLLBACK TO SAVEPOINT s;
COMMIT;
SELECT count(*) FROM t;
SELECT 1/0;
SELECT id
  FROM t WHERE nope = 1;
selec 1;
SELECT 2 AS recovered;
SELECT count(*), sum(g) FROM generate_series(1, 100000) g;
BEGIN;
DECLARE big CURSOR FOR SELECT g FROM generate_series(1, 100000) g;
MOVE 99990 FROM big;
FETCH 5 FROM big;
COMMIT;
COPY t (id, v) FROM STDIN;
10	ten
11	\N
\.
COPY (SELECT id, v FROM t WHERE id >= 10 ORDER BY id) TO STDOUT WITH (FORMAT csv);
\copy (SELECT id, v FROM t WHERE id >= 10 ORDER BY id) TO STDOUT
CREATE FUNCTION pg_temp.stamp() RETURNS trigger LANGUAGE plpgsql AS $$
begin
  new.v := coalesce(new.v, '') || '!';
  return new;
end $$;
CREATE TRIGGER stamp BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION pg_temp.stamp();
INSERT INTO t (id, v) VALUES (12, 'twelve') RETURNING v;
DO $$ BEGIN RAISE NOTICE 'notice %', 7; END $$;
SELECT 5 AS five \gset
\echo five is :five
SET statement_timeout = 200;
SELECT pg_sleep(2);
RESET statement_timeout;
LISTEN chan;
NOTIFY chan, 'ping';
SELECT 'after notify' AS step;
