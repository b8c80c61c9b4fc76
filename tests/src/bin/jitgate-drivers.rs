//! The client compatibility scenario for the Rust drivers, tokio-postgres and sqlx, run
//! directly and through the gate by `tests/tests/drivers.rs`; the two outputs must match.
//! Usage: `jitgate-drivers tokio-postgres|sqlx URL`. Prints one JSON object, step -> result
//! (the same steps as `tests/compat/drivers.py`); a failure is printed as `failed`, so it is
//! compared too. Values that differ by connection (pids, timings) are never printed.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result};
use futures_util::{SinkExt as _, StreamExt as _, TryStreamExt as _, pin_mut};
use serde_json::{Value, json};

const UNICODE: &str = "h\u{e9}llo \u{2713} \u{1F600} \u{4e2d}\u{6587}";

type Out = BTreeMap<&'static str, Value>;

fn blob() -> Vec<u8> {
    (0..10 * 1024 * 1024usize)
        .map(|i| ((i * 7919 + 13) % 256) as u8)
        .collect()
}

/// FNV-1a: a digest that needs no extra crate; equal bytes give equal digests.
fn digest(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}:{}", bytes.len())
}

mod tokio_pg {
    use super::*;
    use tokio_postgres::{
        AsyncMessage, Client, NoTls,
        binary_copy::{BinaryCopyInWriter, BinaryCopyOutStream},
        types::Type,
    };

    /// Connects and drives the connection on its own task, forwarding notifications.
    async fn connect(
        config: &tokio_postgres::Config,
    ) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<String>)> {
        let (client, mut connection) = config.connect(NoTls).await.context("connect")?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            pin_mut!(messages);
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    let _ = tx.send(n.payload().to_owned());
                }
            }
        });
        Ok((client, rx))
    }

    fn code(e: &tokio_postgres::Error) -> Value {
        e.code().map_or_else(
            || json!(format!("not a server error: {e}")),
            |c| json!(c.code()),
        )
    }

    pub async fn run(url: &str, out: &mut Out) -> Result<()> {
        let config: tokio_postgres::Config = url.parse().context("the URL")?;
        let (mut client, mut notes) = connect(&config).await?;
        let one: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
        out.insert("connect", json!(one));

        let row = client
            .query_one(
                "SELECT $1::int + 1, $2::text, $3::int, $4::text",
                &[&41i32, &UNICODE, &None::<i32>, &None::<String>],
            )
            .await?;
        let params = json!([
            row.get::<_, i32>(0),
            row.get::<_, String>(1),
            row.get::<_, Option<i32>>(2),
            row.get::<_, Option<String>>(3)
        ]);
        out.insert("params", params);

        // tokio-postgres reads every result in binary.
        let row = client
            .query_one("SELECT 41::int8 + 1, 'x'::text", &[])
            .await?;
        out.insert(
            "binary",
            json!([row.get::<_, i64>(0), row.get::<_, String>(1)]),
        );

        let twice = client.prepare("SELECT $1::int * 2").await?;
        for _ in 0..3 {
            let v: i32 = client.query_one(&twice, &[&21i32]).await?.get(0);
            out.insert("prepared", json!(v));
        }

        client
            .batch_execute("CREATE TEMP TABLE t (id int, v text, b bytea)")
            .await?;
        {
            let mut tx = client.transaction().await?;
            tx.execute("INSERT INTO t VALUES (1, 'one', NULL)", &[])
                .await?;
            let sp = tx.savepoint("s").await?;
            sp.execute("INSERT INTO t VALUES (2, 'two', NULL)", &[])
                .await?;
            sp.rollback().await?;
            tx.commit().await?;
        }
        let n: i64 = client
            .query_one("SELECT count(*) FROM t", &[])
            .await?
            .get(0);
        out.insert("savepoint", json!(n));

        let err = client
            .query("SELECT 1/0", &[])
            .await
            .err()
            .context("1/0 succeeded")?;
        out.insert("error", code(&err));
        let two: i32 = client.query_one("SELECT 2", &[]).await?.get(0);
        out.insert("recovered", json!(two));

        let rows = client
            .query("SELECT g FROM generate_series(1, 100000) g", &[])
            .await?;
        let last: i32 = rows.last().context("no rows")?.get(0);
        out.insert("rows", json!([rows.len(), last]));

        // A portal read in batches (Execute with a row limit).
        {
            let tx = client.transaction().await?;
            let portal = tx
                .bind("SELECT g FROM generate_series(1, 100000) g", &[])
                .await?;
            let mut total = 0;
            loop {
                let batch = tx.query_portal(&portal, 5000).await?;
                if batch.is_empty() {
                    break;
                }
                total += batch.len();
            }
            tx.commit().await?;
            out.insert("server_cursor", json!(total));
        }

        let data = blob();
        let len: i32 = client
            .query_one(
                "INSERT INTO t VALUES (3, 'blob', $1) RETURNING length(b)",
                &[&data],
            )
            .await?
            .get(0);
        out.insert("bytea_in", json!(len));
        let back: Vec<u8> = client
            .query_one("SELECT b FROM t WHERE id = 3", &[])
            .await?
            .get(0);
        out.insert("bytea_out", json!(digest(&back)));

        // COPY in (text, through the extended protocol: Bind, Execute, Sync, then the data)
        // and out (csv), then binary both ways.
        let sink = client.copy_in("COPY t (id, v) FROM STDIN").await?;
        pin_mut!(sink);
        sink.send(bytes::Bytes::from_static(b"10\tten\n11\t\\N\n"))
            .await?;
        let copied = sink.finish().await?;
        let stream = client
            .copy_out(
                "COPY (SELECT id, v FROM t WHERE id >= 10 ORDER BY id) TO STDOUT WITH (FORMAT csv)",
            )
            .await?;
        let chunks: Vec<bytes::Bytes> = stream.try_collect().await?;
        let csv: Vec<u8> = chunks.concat();
        out.insert(
            "copy",
            json!([copied, String::from_utf8_lossy(&csv).into_owned()]),
        );
        let sink = client
            .copy_in("COPY t (id, v) FROM STDIN (FORMAT binary)")
            .await?;
        let writer = BinaryCopyInWriter::new(sink, &[Type::INT4, Type::TEXT]);
        pin_mut!(writer);
        writer.as_mut().write(&[&20i32, &"twenty"]).await?;
        writer.as_mut().write(&[&21i32, &None::<String>]).await?;
        writer.finish().await?;
        let stream = client
            .copy_out(
                "COPY (SELECT id, v FROM t WHERE id >= 20 ORDER BY id) TO STDOUT (FORMAT binary)",
            )
            .await?;
        let rows: Vec<_> = BinaryCopyOutStream::new(stream, &[Type::INT4, Type::TEXT])
            .try_collect()
            .await?;
        let binary: Vec<Value> = rows
            .iter()
            .map(|r| json!([r.get::<i32>(0), r.get::<Option<String>>(1)]))
            .collect();
        out.insert("copy_binary", json!(binary));

        // Pipelining: tokio-postgres sends concurrent queries without waiting.
        let (a, b) = futures_util::try_join!(
            client.query_one("SELECT 1", &[]),
            client.query_one("SELECT $1::text", &[&"piped"])
        )?;
        out.insert(
            "pipeline",
            json!([a.get::<_, i32>(0), b.get::<_, String>(0)]),
        );

        client
            .batch_execute("LISTEN chan; NOTIFY chan, 'ping'")
            .await?;
        let note = tokio::time::timeout(Duration::from_secs(2), notes.recv())
            .await
            .context("no notification")?;
        out.insert("notify", json!([note]));

        client.batch_execute("SET statement_timeout = 200").await?;
        let err = client
            .batch_execute("SELECT pg_sleep(2)")
            .await
            .err()
            .context("the timeout did not fire")?;
        out.insert("set_timeout", code(&err));
        client.batch_execute("RESET statement_timeout").await?;

        // Cancellation through the gate with the key it handed out.
        let token = client.cancel_token();
        let cancel = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            token.cancel_query(NoTls).await
        });
        let err = client
            .batch_execute("SELECT pg_sleep(5)")
            .await
            .err()
            .context("the cancel did not land")?;
        cancel.await??;
        out.insert("cancel", code(&err));
        let three: i32 = client.query_one("SELECT 3", &[]).await?.get(0);
        out.insert("after_cancel", json!(three));
        drop(client);

        let mut timed = config.clone();
        timed.options("-c statement_timeout=200");
        let (client, _notes) = connect(&timed).await?;
        let err = client
            .batch_execute("SELECT pg_sleep(2)")
            .await
            .err()
            .context("the options timeout did not fire")?;
        out.insert("options_timeout", code(&err));
        Ok(())
    }
}

mod sqlx_pg {
    use super::*;
    use sqlx::{
        Connection as _, Row as _,
        postgres::{PgConnectOptions, PgConnection, PgListener},
    };

    fn code(e: &sqlx::Error) -> Value {
        match e.as_database_error().and_then(|d| d.code()) {
            Some(c) => json!(c),
            None => json!(format!("not a server error: {e}")),
        }
    }

    pub async fn run(url: &str, out: &mut Out) -> Result<()> {
        let options: PgConnectOptions = url.parse().context("the URL")?;
        let mut conn = PgConnection::connect_with(&options).await?;
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await?;
        out.insert("connect", json!(one));

        let row = sqlx::query("SELECT $1::int + 1, $2::text, $3::int, $4::text")
            .bind(41i32)
            .bind(UNICODE)
            .bind(None::<i32>)
            .bind(None::<String>)
            .fetch_one(&mut conn)
            .await?;
        out.insert(
            "params",
            json!([
                row.try_get::<i32, _>(0)?,
                row.try_get::<String, _>(1)?,
                row.try_get::<Option<i32>, _>(2)?,
                row.try_get::<Option<String>, _>(3)?
            ]),
        );

        // sqlx prepares every statement once per connection and reads binary results.
        for _ in 0..3 {
            let v: i32 = sqlx::query_scalar("SELECT $1::int * 2")
                .bind(21i32)
                .fetch_one(&mut conn)
                .await?;
            out.insert("prepared", json!(v));
        }

        sqlx::query("CREATE TEMP TABLE t (id int, v text, b bytea)")
            .execute(&mut conn)
            .await?;
        {
            let mut tx = conn.begin().await?;
            sqlx::query("INSERT INTO t VALUES (1, 'one', NULL)")
                .execute(&mut *tx)
                .await?;
            let mut nested = tx.begin().await?; // a savepoint
            sqlx::query("INSERT INTO t VALUES (2, 'two', NULL)")
                .execute(&mut *nested)
                .await?;
            nested.rollback().await?;
            tx.commit().await?;
        }
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&mut conn)
            .await?;
        out.insert("savepoint", json!(n));

        let err = sqlx::query("SELECT 1/0")
            .execute(&mut conn)
            .await
            .err()
            .context("1/0 succeeded")?;
        out.insert("error", code(&err));
        let two: i32 = sqlx::query_scalar("SELECT 2").fetch_one(&mut conn).await?;
        out.insert("recovered", json!(two));

        let rows: Vec<i32> = sqlx::query_scalar("SELECT g FROM generate_series(1, 100000) g")
            .fetch_all(&mut conn)
            .await?;
        out.insert("rows", json!([rows.len(), rows.last()]));

        {
            let mut tx = conn.begin().await?;
            sqlx::query("DECLARE big CURSOR FOR SELECT g FROM generate_series(1, 100000) g")
                .execute(&mut *tx)
                .await?;
            let mut total = 0;
            loop {
                let batch = sqlx::query("FETCH 5000 FROM big")
                    .fetch_all(&mut *tx)
                    .await?;
                if batch.is_empty() {
                    break;
                }
                total += batch.len();
            }
            tx.commit().await?;
            out.insert("server_cursor", json!(total));
        }

        let data = blob();
        let len: i32 =
            sqlx::query_scalar("INSERT INTO t VALUES (3, 'blob', $1) RETURNING length(b)")
                .bind(&data)
                .fetch_one(&mut conn)
                .await?;
        out.insert("bytea_in", json!(len));
        let back: Vec<u8> = sqlx::query_scalar("SELECT b FROM t WHERE id = 3")
            .fetch_one(&mut conn)
            .await?;
        out.insert("bytea_out", json!(digest(&back)));

        let mut copy = conn.copy_in_raw("COPY t (id, v) FROM STDIN").await?;
        copy.send(b"10\tten\n11\t\\N\n".as_slice()).await?;
        let copied = copy.finish().await?;
        let mut csv = Vec::new();
        {
            let stream = conn
                .copy_out_raw(
                    "COPY (SELECT id, v FROM t WHERE id >= 10 ORDER BY id) TO STDOUT WITH (FORMAT csv)",
                )
                .await?;
            pin_mut!(stream);
            while let Some(chunk) = stream.next().await {
                csv.extend_from_slice(&chunk?);
            }
        }
        out.insert(
            "copy",
            json!([copied, String::from_utf8_lossy(&csv).into_owned()]),
        );

        let mut listener = PgListener::connect(url).await?;
        listener.listen("chan").await?;
        sqlx::query("NOTIFY chan, 'ping'")
            .execute(&mut conn)
            .await?;
        let note = tokio::time::timeout(Duration::from_secs(2), listener.recv())
            .await
            .context("no notification")??;
        out.insert("notify", json!([note.payload()]));

        sqlx::query("SET statement_timeout = 200")
            .execute(&mut conn)
            .await?;
        let err = sqlx::query("SELECT pg_sleep(2)")
            .execute(&mut conn)
            .await
            .err()
            .context("the timeout did not fire")?;
        out.insert("set_timeout", code(&err));
        conn.close().await?;

        let timed = options.clone().options([("statement_timeout", "200")]);
        let mut conn = PgConnection::connect_with(&timed).await?;
        let err = sqlx::query("SELECT pg_sleep(2)")
            .execute(&mut conn)
            .await
            .err()
            .context("the options timeout did not fire")?;
        out.insert("options_timeout", code(&err));
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut out = Out::new();
    let result = match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("tokio-postgres"), Some(url)) => tokio_pg::run(url, &mut out).await,
        (Some("sqlx"), Some(url)) => sqlx_pg::run(url, &mut out).await,
        _ => Err(anyhow::anyhow!(
            "usage: jitgate-drivers tokio-postgres|sqlx URL"
        )),
    };
    if let Err(e) = result {
        out.insert("failed", json!(format!("{e:#}")));
    }
    println!("{}", serde_json::to_string(&out).unwrap_or_default());
}
