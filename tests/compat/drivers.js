// The scenario of drivers.py for node-postgres (`pg`) and postgres.js (`postgres`): run
// directly and through the gate, the outputs must match.
// Usage: NODE_PATH=<modules> node drivers.js pg|postgres URL
'use strict';
const crypto = require('crypto');

const [driver, url] = process.argv.slice(2);
const blob = Buffer.alloc(10 * 1024 * 1024);
for (let i = 0; i < blob.length; i++) blob[i] = (i * 7919 + 13) % 256;
const unicode = 'h\u00e9llo \u2713 \u{1F600} \u4e2d\u6587';
const md5 = (b) => crypto.createHash('md5').update(b).digest('hex');
const out = {};

async function withPg() {
  const { Client } = require('pg');
  const c = new Client({ connectionString: url });
  await c.connect();
  out.connect = (await c.query('SELECT 1 AS x')).rows[0].x;
  const p = await c.query('SELECT $1::int + 1 AS a, $2::text AS b, $3::int AS c, $4::text AS d', [41, unicode, null, null]);
  out.params = [p.rows[0].a, p.rows[0].b, p.rows[0].c, p.rows[0].d];
  for (let i = 0; i < 3; i++) {
    out.prepared = (await c.query({ name: 'dbl', text: 'SELECT $1::int * 2 AS v', values: [21] })).rows[0].v;
  }
  await c.query('CREATE TEMP TABLE t (id int, v text, b bytea)');
  await c.query('BEGIN');
  await c.query("INSERT INTO t VALUES (1, 'one', NULL)");
  await c.query('SAVEPOINT s');
  await c.query("INSERT INTO t VALUES (2, 'two', NULL)");
  await c.query('ROLLBACK TO SAVEPOINT s');
  await c.query('COMMIT');
  out.savepoint = Number((await c.query('SELECT count(*) AS n FROM t')).rows[0].n);
  try { await c.query('SELECT 1/0'); } catch (e) { out.error = e.code; }
  out.recovered = (await c.query('SELECT 2 AS v')).rows[0].v;
  const rows = (await c.query('SELECT g FROM generate_series(1, 100000) g')).rows;
  out.rows = [rows.length, rows[rows.length - 1].g];
  await c.query('BEGIN');
  await c.query('DECLARE big CURSOR FOR SELECT g FROM generate_series(1, 100000) g');
  let n = 0;
  for (;;) {
    const page = await c.query('FETCH 5000 FROM big');
    if (page.rows.length === 0) break;
    n += page.rows.length;
  }
  await c.query('COMMIT');
  out.server_cursor = n;
  out.bytea_in = (await c.query("INSERT INTO t VALUES (3, 'blob', $1) RETURNING length(b) AS n", [blob])).rows[0].n;
  out.bytea_out = md5((await c.query('SELECT b FROM t WHERE id = 3')).rows[0].b);
  const got = new Promise((resolve) => c.on('notification', (m) => resolve(m.payload)));
  await c.query('LISTEN chan');
  await c.query("NOTIFY chan, 'ping'");
  out.notify = [await got];
  await c.end();
  const timed = new Client({ connectionString: url, options: '-c statement_timeout=200' });
  await timed.connect();
  try { await timed.query('SELECT pg_sleep(2)'); } catch (e) { out.options_timeout = e.code; }
  await timed.end();
}

async function withPostgresJs() {
  const postgres = require('postgres');
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  out.connect = (await sql`SELECT 1 AS x`)[0].x;
  const p = await sql`SELECT ${41}::int + 1 AS a, ${unicode}::text AS b, ${null}::int AS c, ${null}::text AS d`;
  out.params = [p[0].a, p[0].b, p[0].c, p[0].d];
  for (let i = 0; i < 3; i++) out.prepared = (await sql`SELECT ${21}::int * 2 AS v`)[0].v;
  await sql`CREATE TEMP TABLE t (id int, v text, b bytea)`;
  await sql.begin(async (tx) => {
    await tx`INSERT INTO t VALUES (1, 'one', NULL)`;
    try {
      await tx.savepoint(async (sp) => {
        await sp`INSERT INTO t VALUES (2, 'two', NULL)`;
        throw new Error('roll back the savepoint');
      });
    } catch (e) { /* rolled back */ }
  });
  out.savepoint = Number((await sql`SELECT count(*) AS n FROM t`)[0].n);
  try { await sql`SELECT 1/0`; } catch (e) { out.error = e.code; }
  out.recovered = (await sql`SELECT 2 AS v`)[0].v;
  const rows = await sql`SELECT g FROM generate_series(1, 100000) g`;
  out.rows = [rows.length, rows[rows.length - 1].g];
  let n = 0;
  await sql.begin(async (tx) => {
    for await (const page of tx`SELECT g FROM generate_series(1, 100000) g`.cursor(5000)) n += page.length;
  });
  out.server_cursor = n;
  out.bytea_in = (await sql`INSERT INTO t VALUES (3, 'blob', ${blob}) RETURNING length(b) AS n`)[0].n;
  out.bytea_out = md5((await sql`SELECT b FROM t WHERE id = 3`)[0].b);
  const w = await sql`COPY t (id, v) FROM STDIN`.writable();
  await new Promise((resolve, reject) => { w.on('error', reject); w.on('finish', resolve); w.end('10\tten\n11\t\\N\n'); });
  let copied = '';
  const r = await sql`COPY (SELECT id, v FROM t WHERE id >= 10 ORDER BY id) TO STDOUT WITH (FORMAT csv)`.readable();
  for await (const chunk of r) copied += chunk.toString();
  out.copy = copied;
  let heard;
  const got = new Promise((resolve) => { heard = resolve; });
  await sql.listen('chan', (payload) => heard(payload));
  await sql.notify('chan', 'ping');
  out.notify = [await got];
  await sql.end();
  const timed = postgres(url, { max: 1, connection: { statement_timeout: 200 } });
  try { await timed`SELECT pg_sleep(2)`; } catch (e) { out.options_timeout = e.code; }
  await timed.end();
}

(driver === 'pg' ? withPg() : withPostgresJs())
  .catch((e) => { out.failed = `${e.name}: ${e.message}`; })
  .finally(() => {
    const sorted = Object.fromEntries(Object.keys(out).sort().map((k) => [k, out[k]]));
    console.log(JSON.stringify(sorted));
    process.exit(0);
  });
