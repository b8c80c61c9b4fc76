#!/usr/bin/python3
"""One scenario, three Python drivers: run directly and through the gate, the outputs must
match. Usage: drivers.py psycopg2|psycopg3|asyncpg DSN. Prints one JSON object: step -> result.
Values that differ by connection (pids, timings) are never printed."""

import asyncio
import hashlib
import json
import sys

DRIVER, DSN = sys.argv[1], sys.argv[2]
BLOB = bytes((i * 7919 + 13) % 256 for i in range(10 * 1024 * 1024))
UNICODE = "h\u00e9llo \u2713 \U0001F600 \u4e2d\u6587"
out = {}


def digest(b):
    return hashlib.md5(bytes(b)).hexdigest()


def psycopg2_run():
    import psycopg2
    import psycopg2.extensions as ext

    conn = psycopg2.connect(DSN)
    cur = conn.cursor()
    cur.execute("SELECT 1")
    out["connect"] = cur.fetchone()[0]
    cur.execute("SELECT %s::int + 1, %s::text, %s::int, %s::text", (41, UNICODE, None, None))
    out["params"] = list(cur.fetchone())
    conn.commit()
    cur.execute("CREATE TEMP TABLE t (id int, v text, b bytea)")
    cur.execute("INSERT INTO t VALUES (1, 'one', NULL)")
    cur.execute("SAVEPOINT s")
    cur.execute("INSERT INTO t VALUES (2, 'two', NULL)")
    cur.execute("ROLLBACK TO SAVEPOINT s")
    conn.commit()
    cur.execute("SELECT count(*) FROM t")
    out["savepoint"] = cur.fetchone()[0]
    try:
        cur.execute("SELECT 1/0")
    except psycopg2.Error as e:
        out["error"] = e.pgcode
    conn.rollback()
    cur.execute("SELECT 2")
    out["recovered"] = cur.fetchone()[0]
    cur.execute("SELECT count(*), sum(g) FROM (SELECT generate_series(1, 100000) g) s")
    out["agg"] = [int(x) for x in cur.fetchone()]
    cur.execute("SELECT g FROM generate_series(1, 100000) g")
    rows = cur.fetchall()
    out["rows"] = [len(rows), rows[-1][0]]
    named = conn.cursor(name="big")
    named.itersize = 5000
    named.execute("SELECT g FROM generate_series(1, 100000) g")
    n = sum(1 for _ in named)
    named.close()
    out["server_cursor"] = n
    conn.commit()
    cur.execute("INSERT INTO t VALUES (3, 'blob', %s) RETURNING length(b)", (psycopg2.Binary(BLOB),))
    out["bytea_in"] = cur.fetchone()[0]
    cur.execute("SELECT b FROM t WHERE id = 3")
    out["bytea_out"] = digest(cur.fetchone()[0])
    import io
    cur.copy_expert("COPY t (id, v) FROM STDIN", io.StringIO("10\tten\n11\t\\N\n"))
    buf = io.StringIO()
    cur.copy_expert("COPY (SELECT id, v FROM t WHERE id >= 10 ORDER BY id) TO STDOUT WITH (FORMAT csv)", buf)
    out["copy"] = buf.getvalue()
    conn.commit()
    conn.set_isolation_level(ext.ISOLATION_LEVEL_AUTOCOMMIT)
    cur.execute("LISTEN chan")
    cur.execute("NOTIFY chan, 'ping'")
    conn.poll()
    out["notify"] = [n.payload for n in conn.notifies]
    conn.close()
    timed = psycopg2.connect(DSN, options="-c statement_timeout=200")
    tcur = timed.cursor()
    try:
        tcur.execute("SELECT pg_sleep(2)")
    except psycopg2.Error as e:
        out["options_timeout"] = e.pgcode
    timed.close()


def psycopg3_run():
    import psycopg

    with psycopg.connect(DSN) as conn:
        out["connect"] = conn.execute("SELECT 1").fetchone()[0]
        out["params"] = list(conn.execute("SELECT %s::int + 1, %s::text, %s::int, %s::text", (41, UNICODE, None, None)).fetchone())
        out["binary"] = list(conn.cursor(binary=True).execute("SELECT 41 + 1, 'x'::text").fetchone())
        for _ in range(3):
            out["prepared"] = conn.execute("SELECT %s::int * 2", (21,), prepare=True).fetchone()[0]
        conn.commit()
        conn.execute("CREATE TEMP TABLE t (id int, v text, b bytea)")
        conn.commit()
        with conn.transaction():
            conn.execute("INSERT INTO t VALUES (1, 'one', NULL)")
            try:
                with conn.transaction():
                    conn.execute("INSERT INTO t VALUES (2, 'two', NULL)")
                    raise RuntimeError("roll back the savepoint")
            except RuntimeError:
                pass
        out["savepoint"] = conn.execute("SELECT count(*) FROM t").fetchone()[0]
        try:
            conn.execute("SELECT 1/0")
        except psycopg.Error as e:
            out["error"] = e.sqlstate
        conn.rollback()
        out["recovered"] = conn.execute("SELECT 2").fetchone()[0]
        rows = conn.execute("SELECT g FROM generate_series(1, 100000) g").fetchall()
        out["rows"] = [len(rows), rows[-1][0]]
        with conn.cursor(name="big") as named:
            named.execute("SELECT g FROM generate_series(1, 100000) g")
            out["server_cursor"] = sum(1 for _ in named)
        conn.commit()
        out["bytea_in"] = conn.execute("INSERT INTO t VALUES (3, 'blob', %s) RETURNING length(b)", (BLOB,)).fetchone()[0]
        out["bytea_out"] = digest(conn.execute("SELECT b FROM t WHERE id = 3").fetchone()[0])
        with conn.cursor() as cur:
            with cur.copy("COPY t (id, v) FROM STDIN") as copy:
                copy.write_row((10, "ten"))
                copy.write_row((11, None))
            data = b""
            with cur.copy("COPY (SELECT id, v FROM t WHERE id >= 10 ORDER BY id) TO STDOUT WITH (FORMAT csv)") as copy:
                for chunk in copy:
                    data += bytes(chunk)
            out["copy"] = data.decode()
            with cur.copy("COPY (SELECT id, v FROM t WHERE id >= 10 ORDER BY id) TO STDOUT WITH (FORMAT binary)") as copy:
                copy.set_types(["int4", "text"])
                out["copy_binary"] = [list(r) for r in copy.rows()]
        conn.commit()
        with conn.pipeline():
            a = conn.execute("SELECT 1")
            b = conn.execute("SELECT %s::text", ("piped",))
        out["pipeline"] = [a.fetchone()[0], b.fetchone()[0]]
    with psycopg.connect(DSN, autocommit=True) as conn:
        got = []
        conn.add_notify_handler(lambda n: got.append(n.payload))
        conn.execute("LISTEN chan")
        conn.execute("NOTIFY chan, 'ping'")
        conn.execute("SELECT 1")
        out["notify"] = got
    with psycopg.connect(DSN, options="-c statement_timeout=200") as timed:
        try:
            timed.execute("SELECT pg_sleep(2)")
        except psycopg.Error as e:
            out["options_timeout"] = e.sqlstate


async def asyncpg_main():
    import asyncpg

    conn = await asyncpg.connect(DSN)
    out["connect"] = await conn.fetchval("SELECT 1")
    row = await conn.fetchrow("SELECT $1::int + 1, $2::text, $3::int, $4::text", 41, UNICODE, None, None)
    out["params"] = list(row)
    stmt = await conn.prepare("SELECT $1::int * 2")
    for _ in range(3):
        out["prepared"] = await stmt.fetchval(21)
    await conn.execute("CREATE TEMP TABLE t (id int, v text, b bytea)")
    async with conn.transaction():
        await conn.execute("INSERT INTO t VALUES (1, 'one', NULL)")
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO t VALUES (2, 'two', NULL)")
                raise RuntimeError("roll back the savepoint")
        except RuntimeError:
            pass
    out["savepoint"] = await conn.fetchval("SELECT count(*) FROM t")
    try:
        await conn.fetchval("SELECT 1/0")
    except asyncpg.PostgresError as e:
        out["error"] = e.sqlstate
    out["recovered"] = await conn.fetchval("SELECT 2")
    rows = await conn.fetch("SELECT g FROM generate_series(1, 100000) g")
    out["rows"] = [len(rows), rows[-1][0]]
    async with conn.transaction():
        n = 0
        async for _ in conn.cursor("SELECT g FROM generate_series(1, 100000) g", prefetch=5000):
            n += 1
        out["server_cursor"] = n
    out["bytea_in"] = await conn.fetchval("INSERT INTO t VALUES (3, 'blob', $1) RETURNING length(b)", BLOB)
    out["bytea_out"] = digest(await conn.fetchval("SELECT b FROM t WHERE id = 3"))
    await conn.copy_records_to_table("t", records=[(10, "ten"), (11, None)], columns=["id", "v"])
    import io
    buf = io.BytesIO()
    await conn.copy_from_query("SELECT id, v FROM t WHERE id >= 10 ORDER BY id", output=buf, format="csv")
    out["copy"] = buf.getvalue().decode()
    got = asyncio.get_event_loop().create_future()
    await conn.add_listener("chan", lambda *args: got.done() or got.set_result(args[3]))
    await conn.execute("NOTIFY chan, 'ping'")
    out["notify"] = [await asyncio.wait_for(got, 2)]
    await conn.close()
    timed = await asyncpg.connect(DSN, server_settings={"statement_timeout": "200"})
    try:
        await timed.execute("SELECT pg_sleep(2)")
    except asyncpg.PostgresError as e:
        out["options_timeout"] = e.sqlstate
    await timed.close()


def sqlalchemy_run():
    import sqlalchemy as sa

    engine = sa.create_engine(DSN.replace("postgresql://", "postgresql+psycopg2://"), future=True)
    meta = sa.MetaData()
    t = sa.Table(
        "t",
        meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("v", sa.Text),
        sa.Column("b", sa.LargeBinary),
        prefixes=["TEMPORARY"],
    )
    with engine.connect() as conn:
        out["connect"] = conn.execute(sa.text("SELECT 1")).scalar()
        row = conn.execute(
            sa.text("SELECT CAST(:a AS int) + 1, CAST(:b AS text), CAST(:c AS int), CAST(:d AS text)"),
            {"a": 41, "b": UNICODE, "c": None, "d": None},
        ).one()
        out["params"] = list(row)
        meta.create_all(conn)
        conn.commit()
        with conn.begin():
            conn.execute(t.insert(), [{"id": 1, "v": "one"}])
            nested = conn.begin_nested()
            conn.execute(t.insert(), [{"id": 2, "v": "two"}])
            nested.rollback()
        out["savepoint"] = conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
        try:
            conn.execute(sa.text("SELECT 1/0"))
        except sa.exc.DBAPIError as e:
            out["error"] = e.orig.pgcode
        conn.rollback()
        out["recovered"] = conn.execute(sa.text("SELECT 2")).scalar()
        rows = conn.execute(sa.text("SELECT g FROM generate_series(1, 100000) g")).all()
        out["rows"] = [len(rows), rows[-1][0]]
        with engine.connect() as streaming:
            streamed = streaming.execution_options(stream_results=True, yield_per=5000).execute(
                sa.text("SELECT g FROM generate_series(1, 100000) g")
            )
            out["server_cursor"] = sum(1 for _ in streamed)
        conn.commit()
        with conn.begin():
            conn.execute(t.insert(), [{"id": 3, "v": "blob", "b": BLOB}])
        out["bytea_in"] = conn.execute(sa.text("SELECT length(b) FROM t WHERE id = 3")).scalar()
        out["bytea_out"] = digest(conn.execute(sa.select(t.c.b).where(t.c.id == 3)).scalar())
        conn.commit()
    timed = sa.create_engine(
        DSN.replace("postgresql://", "postgresql+psycopg2://"),
        connect_args={"options": "-c statement_timeout=200"},
        future=True,
    )
    with timed.connect() as conn:
        try:
            conn.execute(sa.text("SELECT pg_sleep(2)"))
        except sa.exc.DBAPIError as e:
            out["options_timeout"] = e.orig.pgcode


try:
    if DRIVER == "sqlalchemy":
        sqlalchemy_run()
    elif DRIVER == "psycopg2":
        psycopg2_run()
    elif DRIVER == "psycopg3":
        psycopg3_run()
    elif DRIVER == "asyncpg":
        asyncio.run(asyncpg_main())
    else:
        raise SystemExit(f"unknown driver {DRIVER}")
except Exception as e:  # a failure is a result to compare too
    out["failed"] = f"{type(e).__name__}: {e}"
print(json.dumps(out, sort_keys=True, default=str))
