//! A PostgreSQL driver client (tokio-postgres) for the end-to-end tests: extended protocol,
//! prepared statements, binary results, pipelining, cancellation, streaming. Prints one JSON
//! line: `{"ok": true, "rows": [...]}` or `{"ok": false, "code": "...", "message": "..."}`.

use std::time::Duration;

use futures_util::{StreamExt as _, pin_mut};
use serde_json::{Value, json};
use tokio_postgres::{Client, NoTls, Row, types::Type};

fn cell(row: &Row, i: usize) -> Value {
    let col = &row.columns()[i];
    match *col.type_() {
        Type::INT2 => row
            .get::<_, Option<i16>>(i)
            .map_or(Value::Null, Value::from),
        Type::INT4 => row
            .get::<_, Option<i32>>(i)
            .map_or(Value::Null, Value::from),
        Type::INT8 => row
            .get::<_, Option<i64>>(i)
            .map_or(Value::Null, Value::from),
        Type::BOOL => row
            .get::<_, Option<bool>>(i)
            .map_or(Value::Null, Value::from),
        _ => match row.try_get::<_, Option<String>>(i) {
            Ok(v) => v.map_or(Value::Null, Value::from),
            // Arrays, records, bytea, tsvector: the binary value's bytes, as lossy text.
            Err(_) => row
                .get::<_, Option<Raw>>(i)
                .map_or(Value::Null, |r| Value::from(String::from_utf8_lossy(&r.0))),
        },
    }
}

/// Any value, as the bytes the server sent.
struct Raw(Vec<u8>);

impl<'a> tokio_postgres::types::FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Self(raw.to_vec()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

fn rows(rows: &[Row]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| Value::Array((0..r.len()).map(|i| cell(r, i)).collect()))
            .collect(),
    )
}

fn failure(e: &tokio_postgres::Error) -> Value {
    match e.as_db_error() {
        Some(db) => {
            json!({"ok": false, "code": db.code().code(), "message": db.message(), "hint": db.hint()})
        }
        None => json!({"ok": false, "code": "", "message": e.to_string()}),
    }
}

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn run(args: &[String]) -> Result<Value, tokio_postgres::Error> {
    let url = &args[1];
    let client = connect(url).await?;
    Ok(match args[0].as_str() {
        // Parse/Bind/Execute with a parameter, binary results.
        "extended" => {
            let stmt = client.prepare(&args[2]).await?;
            let param: i32 = args.get(3).map_or(1, |a| a.parse().unwrap_or(1));
            let r = if stmt.params().is_empty() {
                client.query(&stmt, &[]).await?
            } else {
                client.query(&stmt, &[&param]).await?
            };
            json!({"ok": true, "rows": rows(&r)})
        }
        // The same prepared statement executed several times.
        "prepared" => {
            let stmt = client.prepare(&args[2]).await?;
            let mut all = Vec::new();
            for i in 1..=3i32 {
                let r = if stmt.params().is_empty() {
                    client.query(&stmt, &[]).await?
                } else {
                    client.query(&stmt, &[&i]).await?
                };
                all.push(rows(&r));
            }
            json!({"ok": true, "rows": all})
        }
        // One prepared statement run N times, one Bind and Execute each: how many ran, and
        // the SQLSTATEs of those refused.
        "repeat" => {
            let n: usize = args[3].parse().unwrap_or(1);
            let stmt = client.prepare(&args[2]).await?;
            let (mut ran, mut codes) = (0, Vec::new());
            for _ in 0..n {
                match client.query(&stmt, &[]).await {
                    Ok(_) => ran += 1,
                    Err(e) => codes.push(e.code().map(|c| c.code().to_owned()).unwrap_or_default()),
                }
            }
            json!({"ok": true, "ran": ran, "codes": codes})
        }
        // Prepares up to N named statements of about PAD bytes each, all kept, until one is
        // refused: how many were prepared and the refusal's SQLSTATE and message; then
        // closes them all (Close messages) and prepares one more, whose outcome it reports.
        "hoard" => {
            let n: usize = args[2].parse().unwrap_or(1);
            let pad: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(0);
            let filler = "x".repeat(pad);
            let mut held = Vec::new();
            let mut refused = json!(null);
            for i in 0..n {
                match client
                    .prepare(&format!("SELECT {i}::int4, '{filler}'::text"))
                    .await
                {
                    Ok(s) => held.push(s),
                    Err(e) => {
                        refused = json!({
                            "code": e.code().map(|c| c.code().to_owned()).unwrap_or_default(),
                            "message": e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string()),
                        });
                        break;
                    }
                }
            }
            let prepared = held.len();
            drop(held);
            let after = match client.prepare("SELECT 'after closing'::text").await {
                Ok(s) => {
                    let r = client.query(&s, &[]).await?;
                    json!(rows(&r))
                }
                Err(e) => json!(e.code().map(|c| c.code().to_owned()).unwrap_or_default()),
            };
            json!({"ok": true, "prepared": prepared, "refused": refused, "after": after})
        }
        // Several queries in flight at once (pipelining).
        "pipeline" => {
            let (a, b, c) = tokio::join!(
                client.query("SELECT 1::int4", &[]),
                client.query(args[2].as_str(), &[]),
                client.query("SELECT 3::int4", &[]),
            );
            json!({"ok": true, "rows": [rows(&a?), rows(&b?), rows(&c?)]})
        }
        // Execute a statement with text parameters.
        "execute" => {
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = args[3..]
                .iter()
                .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            let n = client.execute(args[2].as_str(), &params).await?;
            json!({"ok": true, "rows": n})
        }
        // Start a long query and cancel it from a second connection (CancelRequest).
        "cancel" => {
            let token = client.cancel_token();
            let slow =
                tokio::spawn(
                    async move { client.query("SELECT pg_sleep(20)", &[]).await.map(|_| ()) },
                );
            tokio::time::sleep(Duration::from_millis(700)).await;
            token.cancel_query(NoTls).await?;
            match slow.await.expect("join") {
                Ok(()) => json!({"ok": true, "rows": []}),
                Err(e) => failure(&e),
            }
        }
        // Stream N rows without holding them (query_raw).
        "stream" => {
            let stream = client
                .query_raw(args[2].as_str(), std::iter::empty::<i32>())
                .await?;
            pin_mut!(stream);
            let mut n = 0u64;
            let mut sample = Value::Null;
            while let Some(row) = stream.next().await {
                let row = row?;
                if n == 0 {
                    sample = Value::Array((0..row.len()).map(|i| cell(&row, i)).collect());
                }
                n += 1;
            }
            json!({"ok": true, "rows": n, "first": sample})
        }
        // COPY ... FROM STDIN with tokio-postgres's copy_in (Bind, Execute, Sync, then the
        // data, CopyDone, Sync: the server ignores the Sync sent in copy-in mode), `args[3]`
        // rows of `args[4]`; then the session must still answer a query (`args[5]`).
        "copy-in" => {
            use futures_util::SinkExt as _;
            let n: usize = args[3].parse().unwrap_or(3);
            let sink = client.copy_in(args[2].as_str()).await?;
            pin_mut!(sink);
            for i in 0..n {
                let line = format!("{}\t{}\n", i, args[4]);
                sink.send(bytes::Bytes::from(line)).await?;
            }
            let copied = sink.finish().await?;
            let after = client.query(args[5].as_str(), &[]).await?;
            json!({"ok": true, "rows": copied, "after": rows(&after)})
        }
        other => json!({"ok": false, "code": "", "message": format!("unknown command {other}")}),
    })
}

/// Hand-made protocol messages no driver sends: GSSENCRequest, the fastpath FunctionCall, an
/// unknown message type and an oversized frame, each on a connection through the gate.
mod raw {
    use std::{
        io::{Read as _, Write as _},
        net::TcpStream,
        time::Duration,
    };

    use serde_json::{Value, json};

    pub(super) fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    pub(super) fn read_message(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 5];
        s.read_exact(&mut head)?;
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        s.read_exact(&mut body)?;
        Ok((head[0], body))
    }

    /// The SQLSTATE of an ErrorResponse body.
    pub(super) fn code_of(body: &[u8]) -> String {
        body.split(|b| *b == 0)
            .find(|f| f.first() == Some(&b'C'))
            .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
            .unwrap_or_default()
    }

    /// Reads until ReadyForQuery (or the end); returns the first error's code and the first
    /// DataRow's first column.
    pub(super) fn until_ready(s: &mut TcpStream) -> (Option<String>, Option<String>, bool) {
        let (mut err, mut value) = (None, None);
        loop {
            match read_message(s) {
                Ok((b'Z', _)) => return (err, value, true),
                Ok((b'E', body)) => {
                    err.get_or_insert(code_of(&body));
                }
                Ok((b'D', body)) if value.is_none() && body.len() >= 6 => {
                    let len = i32::from_be_bytes([body[2], body[3], body[4], body[5]]);
                    if len >= 0 {
                        value =
                            Some(String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned());
                    }
                }
                Ok(_) => {}
                Err(_) => return (err, value, false),
            }
        }
    }

    pub(super) fn startup(
        addr: &str,
        gssenc: bool,
        extra: &[&str],
    ) -> std::io::Result<(TcpStream, Option<u8>)> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut answer = None;
        if gssenc {
            s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b)?;
            answer = Some(b[0]);
        }
        let mut body = 196_608i32.to_be_bytes().to_vec();
        for kv in ["user", "mallory", "database", "orders"]
            .iter()
            .chain(extra)
            .chain(&[""])
        {
            body.extend_from_slice(kv.as_bytes());
            body.push(0);
        }
        let mut m = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        m.extend_from_slice(&body);
        s.write_all(&m)?;
        Ok((s, answer))
    }

    /// `host:port` of `postgres://user:password@host:port/db`.
    pub(super) fn addr_of(url: &str) -> String {
        url.split('@')
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_default()
            .to_owned()
    }

    pub fn run(url: &str) -> std::io::Result<Value> {
        let addr = addr_of(url);
        let (mut s, gss) = startup(&addr, true, &[])?;
        let (login_error, _, ready) = until_ready(&mut s);
        // FunctionCall: function OID 2 (any), no argument formats, no arguments, text result.
        let mut f = 2u32.to_be_bytes().to_vec();
        f.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        s.write_all(&message(b'F', &f))?;
        let (fastpath, _, _) = until_ready(&mut s);
        s.write_all(&message(b'Q', b"SELECT 'still usable'\0"))?;
        let (after_error, after, _) = until_ready(&mut s);
        s.write_all(&message(b'Y', b"junk"))?;
        let (unknown, _, open) = until_ready(&mut s);

        // The same parameter twice: the server would take the last, a check the first.
        let (mut s, _) = startup(
            &addr,
            false,
            &["client_encoding", "UTF8", "CLIENT_ENCODING", "SJIS"],
        )?;
        let (duplicate, _, _) = until_ready(&mut s);

        let (mut s, _) = startup(&addr, false, &[])?;
        until_ready(&mut s);
        // A Query claiming half a gigabyte.
        let mut big = vec![b'Q'];
        big.extend_from_slice(&(512 * 1024 * 1024i32).to_be_bytes());
        big.extend_from_slice(b"SELECT ");
        s.write_all(&big)?;
        let (oversize, _, oversize_open) = until_ready(&mut s);
        Ok(json!({
            "ok": true,
            "gssenc": gss.map(|b| (b as char).to_string()),
            "login_ready": ready,
            "login_error": login_error,
            "fastpath": fastpath,
            "after": after,
            "after_error": after_error,
            "unknown": unknown,
            "unknown_left_open": open,
            "oversize": oversize,
            "oversize_left_open": oversize_open,
            "duplicate_param": duplicate,
        }))
    }
}

/// Extended-protocol batches by hand: a batch whose first Execute fails (the server skips
/// the rest up to Sync), then one large statement executed over and over without a Sync
/// after a failure (the gate must end the session before it holds a record per Execute).
mod batch {
    use std::io::Write as _;

    use serde_json::{Value, json};

    use super::raw::{addr_of, code_of, message, read_message, startup, until_ready};

    fn cstr(b: &mut Vec<u8>, s: &str) {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, name);
        cstr(&mut b, sql);
        b.extend_from_slice(&0i16.to_be_bytes());
        message(b'P', &b)
    }

    fn bind(statement: &str, params: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, "");
        cstr(&mut b, statement);
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        message(b'B', &b)
    }

    fn execute() -> Vec<u8> {
        message(b'E', b"\0\0\0\0\0")
    }

    fn close_statement(name: &str) -> Vec<u8> {
        let mut b = vec![b'S'];
        cstr(&mut b, name);
        message(b'C', &b)
    }

    fn query(sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, sql);
        message(b'Q', &b)
    }

    fn outcome((err, value, _): (Option<String>, Option<String>, bool)) -> Value {
        json!({"code": err, "value": value})
    }

    /// Statements the server keeps while the client told it to drop them (a Close or a
    /// DEALLOCATE it skipped after an error), then bound and run; and a statement prepared
    /// with SQL `PREPARE` bound with the protocol.
    pub fn diverge(url: &str) -> std::io::Result<Value> {
        let addr = addr_of(url);
        let (mut s, _) = startup(&addr, false, &[])?;
        until_ready(&mut s);
        let sync = || message(b'S', b"");
        let run = |s: &mut std::net::TcpStream, statement: &str| -> std::io::Result<Value> {
            let mut m = bind(statement, &[]);
            m.extend(execute());
            m.extend(sync());
            s.write_all(&m)?;
            Ok(outcome(until_ready(s)))
        };
        let mut m = parse("hidden", "SELECT 'hidden ran'::text AS x");
        m.extend(parse("hidden2", "SELECT 'hidden2 ran'::text AS x"));
        m.extend(sync());
        s.write_all(&m)?;
        until_ready(&mut s);
        // A Close after a failing Execute: the server skips it and keeps the statement.
        let mut m = parse("", "SELECT 1 / $1::int");
        m.extend(bind("", &["0"]));
        m.extend(execute());
        m.extend(close_statement("hidden"));
        m.extend(sync());
        s.write_all(&m)?;
        let closed = outcome(until_ready(&mut s));
        let after_close = run(&mut s, "hidden")?;
        // A DEALLOCATE after a failing statement of the same query string never runs.
        s.write_all(&query("SELECT 1 / 0; DEALLOCATE hidden2"))?;
        let deallocated = outcome(until_ready(&mut s));
        let after_deallocate = run(&mut s, "hidden2")?;
        s.write_all(&query("PREPARE sqlp AS SELECT 'sql prepared'::text AS x"))?;
        until_ready(&mut s);
        let sql_prepared = run(&mut s, "sqlp")?;
        Ok(json!({
            "ok": true,
            "closed": closed,
            "after_close": after_close,
            "deallocated": deallocated,
            "after_deallocate": after_deallocate,
            "sql_prepared": sql_prepared,
        }))
    }

    fn bind_portal(portal: &str, statement: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        cstr(&mut b, statement);
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        b.extend_from_slice(&0i16.to_be_bytes());
        message(b'B', &b)
    }

    fn execute_portal(portal: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        b.extend_from_slice(&0i32.to_be_bytes());
        message(b'E', &b)
    }

    /// Under `statements_per_second = 2`: a portal whose first Execute was refused, run
    /// again after ROLLBACK TO SAVEPOINT (the portal, bound before the savepoint, survives
    /// it), at a moment when the rate has a token for the ROLLBACK and none for a second.
    pub fn savepoint(url: &str) -> std::io::Result<Value> {
        let pause = |ms| std::thread::sleep(std::time::Duration::from_millis(ms));
        let addr = addr_of(url);
        let (mut s, _) = startup(&addr, false, &[])?;
        until_ready(&mut s);
        s.write_all(&query("BEGIN"))?;
        until_ready(&mut s);
        // The statement's Parse pays for one run, spent on p0; p is bound, not run.
        let mut m = parse("s", "SELECT 'ran'::text");
        m.extend(bind_portal("p0", "s"));
        m.extend(execute_portal("p0"));
        m.extend(bind_portal("p", "s"));
        m.extend(message(b'S', b""));
        s.write_all(&m)?;
        let setup = outcome(until_ready(&mut s));
        pause(1100);
        s.write_all(&query("SAVEPOINT sp"))?;
        until_ready(&mut s);
        // The rate spent, then p's first Execute: refused.
        let mut m = Vec::new();
        for _ in 0..4 {
            m.extend(query("SELECT 1"));
        }
        m.extend(execute_portal("p"));
        m.extend(message(b'S', b""));
        s.write_all(&m)?;
        let mut drained_refused = 0;
        for _ in 0..4 {
            if until_ready(&mut s).0.as_deref() == Some("53400") {
                drained_refused += 1;
            }
        }
        let first = outcome(until_ready(&mut s));
        // One token back (half a second at 2/s): the ROLLBACK takes it, p finds none.
        pause(600);
        let mut m = query("ROLLBACK TO SAVEPOINT sp");
        m.extend(execute_portal("p"));
        m.extend(message(b'S', b""));
        s.write_all(&m)?;
        let rolled_back = outcome(until_ready(&mut s));
        let second = outcome(until_ready(&mut s));
        Ok(json!({
            "ok": true,
            "setup": setup,
            "drained_refused": drained_refused,
            "first": first,
            "rolled_back": rolled_back,
            "second": second,
        }))
    }

    fn describe_portal(portal: &str) -> Vec<u8> {
        let mut b = vec![b'P'];
        cstr(&mut b, portal);
        message(b'D', &b)
    }

    /// Ways to make the gate believe a statement name holds another text than the server's:
    /// a DEALLOCATE and a PREPARE parsed and never run; a DEALLOCATE the server never ran and
    /// a PREPARE it refused; a Close it skipped, then a Parse of the name it refuses, bound in
    /// a later cycle before its answer. Each runs `SELECT upper(email)` of a masked column;
    /// the first value each returns is reported.
    pub fn stale(url: &str) -> std::io::Result<Value> {
        const REAL: &str = "SELECT upper(email) AS x FROM users WHERE id = 1";
        const FAKE: &str = "SELECT 'x'::text AS x";
        let addr = addr_of(url);
        let (mut s, _) = startup(&addr, false, &[])?;
        until_ready(&mut s);
        let sync = || message(b'S', b"");
        let mut m = parse("p", REAL);
        m.extend(parse("r", REAL));
        m.extend(sync());
        s.write_all(&m)?;
        until_ready(&mut s);
        // Parsed, never run.
        let mut m = parse("", "DEALLOCATE p");
        m.extend(parse("", &format!("PREPARE p AS {FAKE}")));
        m.extend(bind_portal("", "p"));
        m.extend(describe_portal(""));
        m.extend(execute_portal(""));
        m.extend(sync());
        s.write_all(&m)?;
        let unrun = outcome(until_ready(&mut s));
        // Never run, and refused.
        s.write_all(&query(&format!("PREPARE q AS {REAL}")))?;
        until_ready(&mut s);
        s.write_all(&query("SELECT 1 / 0; DEALLOCATE q"))?;
        until_ready(&mut s);
        s.write_all(&query(&format!("PREPARE q AS {FAKE}")))?;
        let refused = outcome(until_ready(&mut s));
        s.write_all(&query("EXECUTE q"))?;
        let executed = outcome(until_ready(&mut s));
        // A skipped Close, a refused re-Parse, a Bind in the cycle after: one write.
        let mut m = parse("", "SELECT 1 / $1::int");
        m.extend(bind("", &["0"]));
        m.extend(execute());
        m.extend(close_statement("r"));
        m.extend(sync());
        m.extend(parse("r", FAKE));
        m.extend(sync());
        m.extend(bind_portal("", "r"));
        m.extend(describe_portal(""));
        m.extend(execute_portal(""));
        m.extend(sync());
        s.write_all(&m)?;
        let skipped = outcome(until_ready(&mut s));
        let reparsed = outcome(until_ready(&mut s));
        let rebound = outcome(until_ready(&mut s));
        Ok(json!({
            "ok": true,
            "unrun": unrun,
            "refused": refused,
            "executed": executed,
            "skipped": skipped,
            "reparsed": reparsed,
            "rebound": rebound,
        }))
    }

    /// Portals and SQL cursors share the server's namespace. A protocol portal the server
    /// dropped (SQL `CLOSE`, `ROLLBACK TO` a savepoint, `CLOSE ALL`, `COMMIT; BEGIN`) whose
    /// name is then declared as a cursor of a masked column (also by a DECLARE parsed
    /// before) and run with Execute; a cursor the server dropped (`ROLLBACK TO`) whose name
    /// is then bound as a portal of the masked column and read with SQL `FETCH`; a DECLARE
    /// parsed and never run; a rebind the server refuses. Each reports what it read.
    pub fn cursor(url: &str) -> std::io::Result<Value> {
        const REAL: &str = "SELECT upper(email) AS x FROM users WHERE id = 1";
        const FAKE: &str = "SELECT 'x'::text AS x";
        let addr = addr_of(url);
        let (mut s, _) = startup(&addr, false, &[])?;
        until_ready(&mut s);
        let sync = || message(b'S', b"");
        let simple = |s: &mut std::net::TcpStream, sql: &str| -> std::io::Result<Value> {
            s.write_all(&query(sql))?;
            Ok(outcome(until_ready(s)))
        };
        let bound = |portal: &str| {
            let mut m = bind_portal(portal, "fake");
            m.extend(describe_portal(portal));
            m.extend(message(b'S', b""));
            m
        };
        let executed = |s: &mut std::net::TcpStream, portal: &str| -> std::io::Result<Value> {
            let mut m = execute_portal(portal);
            m.extend(message(b'S', b""));
            s.write_all(&m)?;
            Ok(outcome(until_ready(s)))
        };
        let mut steps = Vec::new();
        steps.push(simple(&mut s, "BEGIN")?);
        let mut m = parse("fake", FAKE);
        m.extend(parse("real", REAL));
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        // A portal closed with SQL CLOSE.
        s.write_all(&bound("c"))?;
        steps.push(outcome(until_ready(&mut s)));
        steps.push(simple(&mut s, "CLOSE c")?);
        steps.push(simple(&mut s, &format!("DECLARE c CURSOR FOR {REAL}"))?);
        let closed = executed(&mut s, "c")?;
        // A portal dropped by ROLLBACK TO its savepoint.
        steps.push(simple(&mut s, "SAVEPOINT sp")?);
        s.write_all(&bound("d"))?;
        steps.push(outcome(until_ready(&mut s)));
        steps.push(simple(&mut s, "ROLLBACK TO SAVEPOINT sp")?);
        steps.push(simple(&mut s, &format!("DECLARE d CURSOR FOR {REAL}"))?);
        let rolled_back = executed(&mut s, "d")?;
        // Every portal closed with CLOSE ALL.
        s.write_all(&bound("e"))?;
        steps.push(outcome(until_ready(&mut s)));
        steps.push(simple(&mut s, "CLOSE ALL")?);
        steps.push(simple(&mut s, &format!("DECLARE e CURSOR FOR {REAL}"))?);
        let closed_all = executed(&mut s, "e")?;
        // A cursor dropped by ROLLBACK TO, its name bound to the real statement, fetched.
        steps.push(simple(&mut s, "SAVEPOINT sp2")?);
        steps.push(simple(&mut s, &format!("DECLARE g CURSOR FOR {FAKE}"))?);
        steps.push(simple(&mut s, "ROLLBACK TO SAVEPOINT sp2")?);
        let mut m = bind_portal("g", "real");
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        let fetched = simple(&mut s, "FETCH ALL FROM g")?;
        // A DECLARE of a live portal's name parsed and never run: the portal still runs.
        let mut m = bind_portal("h", "real");
        m.extend(parse("", &format!("DECLARE h CURSOR FOR {FAKE}")));
        m.extend(execute_portal("h"));
        m.extend(sync());
        s.write_all(&m)?;
        let parsed_only = outcome(until_ready(&mut s));
        // A DECLARE parsed first, run after a ROLLBACK TO dropped a portal of its name.
        let mut m = parse("decl", &format!("DECLARE m CURSOR FOR {REAL}"));
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        steps.push(simple(&mut s, "SAVEPOINT sp4")?);
        s.write_all(&bound("m"))?;
        steps.push(outcome(until_ready(&mut s)));
        steps.push(simple(&mut s, "ROLLBACK TO SAVEPOINT sp4")?);
        let mut m = bind_portal("", "decl");
        m.extend(execute_portal(""));
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        let declared_later = executed(&mut s, "m")?;
        // COMMIT and BEGIN in one string: the portal ends, the status stays "in a
        // transaction".
        s.write_all(&bound("n"))?;
        steps.push(outcome(until_ready(&mut s)));
        steps.push(simple(&mut s, "COMMIT; BEGIN")?);
        steps.push(simple(&mut s, &format!("DECLARE n CURSOR FOR {REAL}"))?);
        let committed = executed(&mut s, "n")?;
        // A FETCH parsed while its cursor read the fake query, run after the cursor was
        // declared again for the real one.
        steps.push(simple(&mut s, &format!("DECLARE q CURSOR FOR {FAKE}"))?);
        let mut m = parse("fq", "FETCH ALL FROM q");
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        steps.push(simple(&mut s, "CLOSE q")?);
        steps.push(simple(&mut s, &format!("DECLARE q CURSOR FOR {REAL}"))?);
        let mut m = bind_portal("", "fq");
        m.extend(execute_portal(""));
        m.extend(sync());
        s.write_all(&m)?;
        let fetch_redeclared = outcome(until_ready(&mut s));
        // A portal bound to the real statement before a savepoint, a CLOSE of it parsed
        // (never run), then in one write a Bind of it to the fake one (refused by the
        // server: the portal is there), a ROLLBACK TO the savepoint (the portal stays), and
        // an Execute of it.
        let mut m = bind_portal("k", "real");
        m.extend(describe_portal("k"));
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        steps.push(simple(&mut s, "SAVEPOINT sp3")?);
        let mut m = parse("", "CLOSE k");
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        let mut m = bind_portal("k", "fake");
        m.extend(sync());
        m.extend(query("ROLLBACK TO SAVEPOINT sp3"));
        m.extend(execute_portal("k"));
        m.extend(sync());
        s.write_all(&m)?;
        let rebound = outcome(until_ready(&mut s));
        let _ = until_ready(&mut s);
        let in_doubt = outcome(until_ready(&mut s));
        steps.push(simple(&mut s, "COMMIT")?);
        Ok(json!({
            "ok": true,
            "steps": steps,
            "closed": closed,
            "rolled_back": rolled_back,
            "closed_all": closed_all,
            "fetched": fetched,
            "parsed_only": parsed_only,
            "declared_later": declared_later,
            "committed": committed,
            "fetch_redeclared": fetch_redeclared,
            "rebound": rebound,
            "in_doubt": in_doubt,
        }))
    }

    /// Names whose meaning changes between what the gate sees and what the server runs: a
    /// DECLARE the server does not carry out (inside EXPLAIN ANALYZE; of a name taken) over
    /// a cursor of the masked column; FETCH and EXECUTE portals bound before their cursor or
    /// prepared statement changed (the server describes them as they were at the Bind, and
    /// runs them as they are); a SQL FETCH of such a portal; an EXECUTE pipelined behind a
    /// DEALLOCATE of its name; a SAVEPOINT the server refuses (aborted transaction) hiding
    /// an older one of the same name; a DECLARE of a protocol portal's name; DECLARE
    /// portals run where the gate did not expect them to run (a second Execute pipelined
    /// behind a skipped first, a portal it forgot). Each reports what it read.
    pub fn names(url: &str) -> std::io::Result<Value> {
        const REAL: &str = "SELECT upper(email) AS x FROM users WHERE id = 1";
        const FAKE: &str = "SELECT 'x'::text AS x";
        const PLAIN: &str = "SELECT name AS x FROM users WHERE id = 1";
        const EMAIL: &str = "SELECT email AS x FROM users WHERE id = 1";
        let addr = addr_of(url);
        let (mut s, _) = startup(&addr, false, &[])?;
        until_ready(&mut s);
        let sync = || message(b'S', b"");
        let simple = |s: &mut std::net::TcpStream, sql: &str| -> std::io::Result<Value> {
            s.write_all(&query(sql))?;
            Ok(outcome(until_ready(s)))
        };
        let mut steps = Vec::new();
        steps.push(simple(&mut s, "BEGIN")?);
        // A DECLARE inside EXPLAIN ANALYZE makes no cursor.
        steps.push(simple(&mut s, &format!("DECLARE a CURSOR FOR {REAL}"))?);
        steps.push(simple(
            &mut s,
            &format!("EXPLAIN ANALYZE DECLARE a CURSOR FOR {FAKE}"),
        )?);
        let explained = simple(&mut s, "FETCH ALL FROM a")?;
        // A DECLARE of a name taken fails.
        steps.push(simple(&mut s, &format!("DECLARE b CURSOR FOR {REAL}"))?);
        steps.push(simple(&mut s, "SAVEPOINT before_taken")?);
        let taken = simple(&mut s, &format!("DECLARE b CURSOR FOR {FAKE}"))?;
        steps.push(simple(&mut s, "ROLLBACK TO SAVEPOINT before_taken")?);
        let after_taken = simple(&mut s, "FETCH ALL FROM b")?;
        steps.push(simple(&mut s, "COMMIT")?);
        // A FETCH portal bound, then its cursor declared again over the masked column: read
        // with SQL FETCH, then (in a transaction of its own) with Execute.
        let mut fetch = Vec::new();
        for _ in 0..2 {
            steps.push(simple(&mut s, "BEGIN")?);
            steps.push(simple(&mut s, &format!("DECLARE c CURSOR FOR {PLAIN}"))?);
            let mut m = if fetch.is_empty() {
                parse("fc", "FETCH ALL FROM c")
            } else {
                Vec::new()
            };
            m.extend(bind_portal("pc", "fc"));
            m.extend(sync());
            s.write_all(&m)?;
            steps.push(outcome(until_ready(&mut s)));
            steps.push(simple(&mut s, "CLOSE c")?);
            steps.push(simple(&mut s, &format!("DECLARE c CURSOR FOR {EMAIL}"))?);
            if fetch.is_empty() {
                fetch.push(simple(&mut s, "FETCH ALL FROM pc")?);
            } else {
                let mut m = execute_portal("pc");
                m.extend(sync());
                s.write_all(&m)?;
                fetch.push(outcome(until_ready(&mut s)));
            }
            steps.push(simple(&mut s, "ROLLBACK")?);
        }
        let fetch_portal = fetch.pop().unwrap_or_default();
        let fetch_sql = fetch.pop().unwrap_or_default();
        // An EXECUTE portal bound, then its statement prepared again.
        steps.push(simple(&mut s, &format!("PREPARE q AS {PLAIN}"))?);
        steps.push(simple(&mut s, "BEGIN")?);
        let mut m = parse("eq", "EXECUTE q");
        m.extend(bind_portal("pq", "eq"));
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        steps.push(simple(&mut s, "DEALLOCATE q")?);
        steps.push(simple(&mut s, &format!("PREPARE q AS {EMAIL}"))?);
        let mut m = execute_portal("pq");
        m.extend(sync());
        s.write_all(&m)?;
        let execute_portal_stale = outcome(until_ready(&mut s));
        steps.push(simple(&mut s, "ROLLBACK")?);
        // An EXECUTE pipelined behind a DEALLOCATE of its name.
        steps.push(simple(&mut s, &format!("PREPARE r AS {FAKE}"))?);
        let mut m = query("SELECT pg_sleep(0.3); DEALLOCATE r");
        m.extend(query("EXECUTE r"));
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        let pipelined = outcome(until_ready(&mut s));
        // A cursor WITH HOLD whose CLOSE the server skipped (an error before it), declared
        // again (refused there: the name is taken) over another query, then fetched.
        steps.push(simple(
            &mut s,
            &format!("DECLARE hc CURSOR WITH HOLD FOR {REAL}"),
        )?);
        let skipped_close = simple(&mut s, "SELECT 1/0; CLOSE hc")?;
        let redeclared = simple(&mut s, &format!("DECLARE hc CURSOR WITH HOLD FOR {FAKE}"))?;
        let held = simple(&mut s, "FETCH ALL FROM hc")?;
        steps.push(simple(&mut s, "CLOSE hc")?);
        // A FETCH portal run for one row (the server keeps the rest), its cursor declared
        // again over another column, then the portal read with FETCH: by Execute, by a
        // simple query.
        steps.push(simple(&mut s, "BEGIN")?);
        steps.push(simple(
            &mut s,
            "DECLARE dc CURSOR FOR SELECT email AS x FROM users ORDER BY id DESC",
        )?);
        let mut m = parse("fd", "FETCH ALL FROM dc");
        m.extend(bind_portal("pd", "fd"));
        let mut limited = Vec::new();
        cstr(&mut limited, "pd");
        limited.extend_from_slice(&1i32.to_be_bytes());
        m.extend(message(b'E', &limited));
        m.extend(sync());
        s.write_all(&m)?;
        let first_row = outcome(until_ready(&mut s));
        steps.push(simple(&mut s, "CLOSE dc")?);
        steps.push(simple(&mut s, &format!("DECLARE dc CURSOR FOR {PLAIN}"))?);
        let mut m = parse("", "FETCH ALL FROM pd");
        m.extend(bind_portal("", ""));
        m.extend(execute_portal(""));
        m.extend(sync());
        s.write_all(&m)?;
        let stored_by_execute = outcome(until_ready(&mut s));
        steps.push(simple(&mut s, "ROLLBACK")?);
        // A Bind of a held cursor's name (refused there: the cursor stays), then a DECLARE
        // of it over another query (refused too), then a FETCH of it.
        steps.push(simple(
            &mut s,
            &format!("DECLARE hb CURSOR WITH HOLD FOR {REAL}"),
        )?);
        let mut m = parse("", "SELECT 1");
        m.extend(bind_portal("hb", ""));
        m.extend(sync());
        s.write_all(&m)?;
        let bound_over = outcome(until_ready(&mut s));
        steps.push(simple(&mut s, "SELECT 1")?);
        let _ = simple(&mut s, &format!("DECLARE hb CURSOR WITH HOLD FOR {FAKE}"))?;
        let held_bound_over = simple(&mut s, "FETCH ALL FROM hb")?;
        steps.push(simple(&mut s, "CLOSE hb")?);
        // A FETCH portal over a protocol portal, whose target is closed and bound again to
        // the masked column with the protocol.
        steps.push(simple(&mut s, "BEGIN")?);
        let mut m = parse("pl", PLAIN);
        m.extend(parse("em", EMAIL));
        m.extend(bind_portal("tp", "pl"));
        m.extend(parse("ftp", "FETCH ALL FROM tp"));
        m.extend(bind_portal("ptp", "ftp"));
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        let mut close = vec![b'P'];
        cstr(&mut close, "tp");
        let mut m = message(b'C', &close);
        m.extend(bind_portal("tp", "em"));
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        let mut m = execute_portal("ptp");
        m.extend(sync());
        s.write_all(&m)?;
        let rebound_target = outcome(until_ready(&mut s));
        steps.push(simple(&mut s, "ROLLBACK")?);
        // A FETCH portal, then statements and portals of other names parsed, bound and
        // closed (as a driver does between two fetches): the portal still runs.
        steps.push(simple(&mut s, "BEGIN")?);
        steps.push(simple(&mut s, &format!("DECLARE u CURSOR FOR {PLAIN}"))?);
        let mut m = parse("fu", "FETCH ALL FROM u");
        m.extend(bind_portal("pu", "fu"));
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        let mut m = parse("other", "SELECT 1");
        m.extend(bind_portal("po", "other"));
        m.extend(execute_portal("po"));
        let mut close = vec![b'P'];
        cstr(&mut close, "po");
        m.extend(message(b'C', &close));
        m.extend(close_statement("other"));
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        let mut m = execute_portal("pu");
        m.extend(sync());
        s.write_all(&m)?;
        let unrelated = outcome(until_ready(&mut s));
        steps.push(simple(&mut s, "ROLLBACK")?);
        // A SAVEPOINT the server refuses (the transaction is aborted) over an older one of
        // the same name: ROLLBACK TO goes to the older one and drops the portal bound since.
        steps.push(simple(&mut s, "BEGIN")?);
        steps.push(simple(&mut s, "SAVEPOINT s")?);
        let mut m = parse("fake", FAKE);
        m.extend(bind_portal("pf", "fake"));
        m.extend(describe_portal("pf"));
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        let aborted = simple(&mut s, "SELECT 1/0; SAVEPOINT s")?;
        steps.push(simple(&mut s, "ROLLBACK TO SAVEPOINT s")?);
        steps.push(simple(&mut s, &format!("DECLARE pf CURSOR FOR {REAL}"))?);
        let mut m = execute_portal("pf");
        m.extend(sync());
        s.write_all(&m)?;
        let savepoint = outcome(until_ready(&mut s));
        steps.push(simple(&mut s, "COMMIT")?);
        // A DECLARE of a protocol portal's name (refused there: the portal is there), then a
        // SQL FETCH of the name, which reads the portal.
        steps.push(simple(&mut s, "BEGIN")?);
        let mut m = parse("real", REAL);
        m.extend(bind_portal("rp", "real"));
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        steps.push(simple(&mut s, "SAVEPOINT over_portal")?);
        let declared_over_portal = simple(&mut s, &format!("DECLARE rp CURSOR FOR {FAKE}"))?;
        steps.push(simple(&mut s, "ROLLBACK TO SAVEPOINT over_portal")?);
        let portal_fetched = simple(&mut s, "FETCH ALL FROM rp")?;
        steps.push(simple(&mut s, "ROLLBACK")?);
        // A DECLARE portal's first Execute skipped after an error, and a second Execute of
        // it pipelined behind (sent before the error came back) with the cursor's name
        // declared and closed in between: the second is the one the server runs. (CLOSE
        // ALL first: the routes above ran portals the gate did not hold, after which it
        // masks every cursor as reading anything until a CLOSE ALL completes.)
        steps.push(simple(&mut s, "CLOSE ALL")?);
        steps.push(simple(&mut s, "BEGIN")?);
        let mut m = parse("dcl1", &format!("DECLARE rc CURSOR WITH HOLD FOR {REAL}"));
        m.extend(bind_portal("pd1", "dcl1"));
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        steps.push(simple(&mut s, "SAVEPOINT rerun")?);
        let mut m = parse("", "SELECT pg_sleep(0.3)");
        m.extend(bind_portal("", ""));
        m.extend(execute_portal(""));
        m.extend(parse("", "SELECT 1/0"));
        m.extend(bind_portal("", ""));
        m.extend(execute_portal(""));
        m.extend(execute_portal("pd1"));
        m.extend(sync());
        m.extend(query("ROLLBACK TO SAVEPOINT rerun"));
        m.extend(query("DECLARE rc CURSOR FOR SELECT 1"));
        m.extend(query("CLOSE rc"));
        m.extend(execute_portal("pd1"));
        m.extend(sync());
        s.write_all(&m)?;
        let rerun_failed = outcome(until_ready(&mut s));
        for _ in 0..3 {
            steps.push(outcome(until_ready(&mut s)));
        }
        let rerun = outcome(until_ready(&mut s));
        steps.push(simple(&mut s, "COMMIT")?);
        let rerun_redeclared = simple(&mut s, &format!("DECLARE rc CURSOR WITH HOLD FOR {FAKE}"))?;
        let rerun_fetched = simple(&mut s, "FETCH ALL FROM rc")?;
        steps.push(simple(&mut s, "CLOSE rc")?);
        // A DECLARE portal the gate forgot (a CLOSE of it skipped after an error) while the
        // server kept it (the savepoint rolled back to was made after its Bind), then run.
        steps.push(simple(&mut s, "CLOSE ALL")?);
        steps.push(simple(&mut s, "BEGIN")?);
        let mut m = parse("dcl2", &format!("DECLARE fc CURSOR WITH HOLD FOR {REAL}"));
        m.extend(bind_portal("pd2", "dcl2"));
        m.extend(sync());
        s.write_all(&m)?;
        steps.push(outcome(until_ready(&mut s)));
        steps.push(simple(&mut s, "SAVEPOINT forgot")?);
        let forgot_close = simple(&mut s, "SELECT 1/0; CLOSE pd2")?;
        steps.push(simple(&mut s, "ROLLBACK TO SAVEPOINT forgot")?);
        let mut m = execute_portal("pd2");
        m.extend(sync());
        s.write_all(&m)?;
        let forgotten_run = outcome(until_ready(&mut s));
        steps.push(simple(&mut s, "COMMIT")?);
        let forgotten_redeclared =
            simple(&mut s, &format!("DECLARE fc CURSOR WITH HOLD FOR {FAKE}"))?;
        let forgotten_fetched = simple(&mut s, "FETCH ALL FROM fc")?;
        steps.push(simple(&mut s, "CLOSE fc")?);
        Ok(json!({
            "ok": true,
            "steps": steps,
            "explained": explained,
            "declared_over_portal": declared_over_portal,
            "portal_fetched": portal_fetched,
            "rerun_failed": rerun_failed,
            "rerun": rerun,
            "rerun_redeclared": rerun_redeclared,
            "rerun_fetched": rerun_fetched,
            "forgot_close": forgot_close,
            "forgotten_run": forgotten_run,
            "forgotten_redeclared": forgotten_redeclared,
            "forgotten_fetched": forgotten_fetched,
            "taken": taken,
            "after_taken": after_taken,
            "fetch_sql": fetch_sql,
            "fetch_portal": fetch_portal,
            "execute_portal": execute_portal_stale,
            "pipelined": pipelined,
            "skipped_close": skipped_close,
            "redeclared": redeclared,
            "held": held,
            "first_row": first_row,
            "stored_by_execute": stored_by_execute,
            "bound_over": bound_over,
            "held_bound_over": held_bound_over,
            "rebound_target": rebound_target,
            "unrelated": unrelated,
            "aborted": aborted,
            "savepoint": savepoint,
        }))
    }

    /// Names changing while Parses and Binds are pipelined behind them (one write each,
    /// a slow statement first so that everything reaches the gate before the server
    /// answers): a PREPARE in flight taking a name then Parsed and bound; a DEALLOCATE ALL
    /// in flight while a name is Parsed; a Close skipped while its name is Parsed again
    /// (a Parse that fails for another reason).
    pub fn flux(url: &str) -> std::io::Result<Value> {
        const REAL: &str = "SELECT upper(email) AS x FROM users WHERE id = 1";
        const FAKE: &str = "SELECT 'x'::text AS x";
        let addr = addr_of(url);
        let (mut s, _) = startup(&addr, false, &[])?;
        until_ready(&mut s);
        let sync = || message(b'S', b"");
        let bound = |name: &str| {
            let mut m = bind_portal("", name);
            m.extend(describe_portal(""));
            m.extend(execute_portal(""));
            m.extend(message(b'S', b""));
            m
        };
        // A: a PREPARE in flight.
        let mut m = query(&format!("SELECT pg_sleep(0.3); PREPARE pa AS {REAL}"));
        m.extend(parse("pa", FAKE));
        m.extend(sync());
        m.extend(bound("pa"));
        s.write_all(&m)?;
        let a = [
            outcome(until_ready(&mut s)),
            outcome(until_ready(&mut s)),
            outcome(until_ready(&mut s)),
        ];
        // B: a DEALLOCATE ALL in flight while a name is parsed; then a Parse of it refused
        // and a Bind of it.
        let mut m = query("SELECT pg_sleep(0.3); DEALLOCATE ALL");
        m.extend(parse("pb", REAL));
        m.extend(sync());
        s.write_all(&m)?;
        until_ready(&mut s);
        until_ready(&mut s);
        let mut m = parse("pb", FAKE);
        m.extend(sync());
        m.extend(bound("pb"));
        s.write_all(&m)?;
        let b = [outcome(until_ready(&mut s)), outcome(until_ready(&mut s))];
        // C: a Close skipped, its name parsed again (failing: no such table), then bound.
        let mut m = parse("pc", REAL);
        m.extend(sync());
        s.write_all(&m)?;
        until_ready(&mut s);
        let mut m = parse("", "SELECT pg_sleep(0.3), 1 / $1::int");
        m.extend(bind("", &["0"]));
        m.extend(execute());
        m.extend(close_statement("pc"));
        m.extend(sync());
        m.extend(parse("pc", "SELECT a FROM no_such_table"));
        m.extend(sync());
        s.write_all(&m)?;
        until_ready(&mut s);
        until_ready(&mut s);
        s.write_all(&bound("pc"))?;
        let c = outcome(until_ready(&mut s));
        // D: no name changing: two Parses in a cycle, the second bound in the next cycle
        // before its answer (psycopg3's pipeline mode) runs.
        let mut m = parse("", "SELECT 1");
        m.extend(parse("pd", REAL));
        m.extend(sync());
        m.extend(bound("pd"));
        s.write_all(&m)?;
        let d = [outcome(until_ready(&mut s)), outcome(until_ready(&mut s))];
        // E: a name the server would cut to its first 63 bytes.
        let mut m = parse(&"n".repeat(70), FAKE);
        m.extend(sync());
        s.write_all(&m)?;
        let e = outcome(until_ready(&mut s));
        Ok(json!({"ok": true, "a": a, "b": b, "c": c, "d": d, "e": e}))
    }

    /// Simple Queries sent in one write (pipelined: each sent before the server answered
    /// the one before); what each answered (its first error code, its first value).
    pub fn queries(url: &str, texts: &[String]) -> std::io::Result<Value> {
        let addr = addr_of(url);
        let (mut s, _) = startup(&addr, false, &[])?;
        until_ready(&mut s);
        let mut m = Vec::new();
        for text in texts {
            m.extend(query(text));
        }
        s.write_all(&m)?;
        let results: Vec<Value> = texts.iter().map(|_| outcome(until_ready(&mut s))).collect();
        Ok(json!({"ok": true, "results": results}))
    }

    /// A held cursor declared in an extended batch that then fails, a simple Query inside
    /// the batch (skipped by the server with the rest); then, in a transaction, a function
    /// the test made (`open_named`) opening a cursor of that name, and a FETCH of it.
    /// Twice: with the Sync in the batch's write, then held back until the error came,
    /// and sent with everything after it in one write.
    pub fn skipped_declare(url: &str) -> std::io::Result<Value> {
        let addr = addr_of(url);
        let mut out = Vec::new();
        for held_back in [false, true] {
            let (mut s, _) = startup(&addr, false, &[])?;
            until_ready(&mut s);
            let mut m = parse(
                "",
                "DECLARE fc CURSOR WITH HOLD FOR SELECT 'harmless'::text AS x",
            );
            m.extend(bind_portal("", ""));
            m.extend(execute_portal(""));
            m.extend(parse("", "SELECT 1/0"));
            m.extend(bind_portal("", ""));
            m.extend(execute_portal(""));
            m.extend(query("SELECT 1"));
            let after = [
                "BEGIN",
                "SELECT open_named('fc')",
                "FETCH ALL FROM fc",
                "COMMIT",
            ];
            let mut error = None;
            if held_back {
                s.write_all(&m)?;
                // Up to the error; then the Sync and the rest at once.
                while error.is_none() {
                    if let (b'E', body) = read_message(&mut s)? {
                        error = Some(code_of(&body));
                    }
                }
                let mut rest = message(b'S', b"");
                for text in after {
                    rest.extend(query(text));
                }
                s.write_all(&rest)?;
            } else {
                m.extend(message(b'S', b""));
                s.write_all(&m)?;
            }
            let mut failed = outcome(until_ready(&mut s));
            if let Some(code) = error {
                failed["code"] = json!(code);
            }
            let mut results = Vec::new();
            for text in after {
                if !held_back {
                    s.write_all(&query(text))?;
                }
                results.push(outcome(until_ready(&mut s)));
            }
            let fetched = results.remove(2);
            out.push(json!({"failed": failed, "steps": results, "fetched": fetched}));
        }
        Ok(json!({"ok": true, "synced": out[0], "held_back": out[1]}))
    }

    pub fn run(url: &str) -> std::io::Result<Value> {
        let addr = addr_of(url);
        let (mut s, _) = startup(&addr, false, &[])?;
        until_ready(&mut s);
        // 10 / 0 fails; the two after it are skipped by the server.
        let mut m = parse("div", "SELECT 10 / $1::int AS batch_div");
        for p in ["0", "1", "2"] {
            m.extend(bind("div", &[p]));
            m.extend(execute());
        }
        m.extend(message(b'S', b""));
        s.write_all(&m)?;
        let (skipped_batch, _, _) = until_ready(&mut s);

        // A portal bound with a 60 KiB parameter, its first Execute failing, then 10,000
        // Executes and no Sync (each Execute's record holds the portal's parameters; a long
        // statement text would be recorded whole only once). Those the gate took before the
        // server's error are finished with it; at most about 4,400 fit under its 256 MiB,
        // so the rest pass the bound whenever the error came.
        let (mut s, _) = startup(&addr, false, &[])?;
        until_ready(&mut s);
        let big = "x".repeat(60 * 1024);
        let mut m = parse("", "SELECT 1 / $1::int, length($2::text)");
        m.extend(bind("", &["0", &big]));
        for _ in 0..10_000 {
            m.extend(execute());
        }
        s.write_all(&m)?;
        let mut codes = Vec::new();
        // How the connection ended: "eof" (closed after what it sent), "reset", or
        // "timeout" (still open: nothing ended it).
        let end = loop {
            match read_message(&mut s) {
                Ok((b'E', body)) => codes.push(code_of(&body)),
                Ok(_) => {}
                Err(e) => {
                    break match e.kind() {
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timeout",
                        std::io::ErrorKind::UnexpectedEof => "eof",
                        _ => "reset",
                    };
                }
            }
        };
        Ok(json!({
            "ok": true,
            "skipped_batch": skipped_batch,
            "unsynced_codes": codes,
            "unsynced_end": end,
        }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!(
            "usage: jitgate-pgclient extended|prepared|pipeline|execute|cancel|stream|raw URL [SQL] [ARGS...]"
        );
        std::process::exit(2);
    }
    // Raw-protocol scenarios: each prints its JSON report.
    type Scenario = fn(&str) -> std::io::Result<Value>;
    let raw: &[(&str, Scenario)] = &[
        ("raw-flux", batch::flux),
        ("raw-stale", batch::stale),
        ("raw-savepoint", batch::savepoint),
        ("raw-diverge", batch::diverge),
        ("raw-cursor", batch::cursor),
        ("raw-names", batch::names),
        ("raw-skipped-declare", batch::skipped_declare),
        ("raw-batch", batch::run),
        ("raw", raw::run),
    ];
    if args[0] == "raw-queries" {
        let out = batch::queries(&args[1], &args[2..])
            .unwrap_or_else(|e| json!({"ok": false, "code": "", "message": e.to_string()}));
        println!("{out}");
        return;
    }
    if let Some((_, scenario)) = raw.iter().find(|(mode, _)| *mode == args[0]) {
        let out = scenario(&args[1])
            .unwrap_or_else(|e| json!({"ok": false, "code": "", "message": e.to_string()}));
        println!("{out}");
        return;
    }
    let out = match run(&args).await {
        Ok(v) => v,
        Err(e) => failure(&e),
    };
    println!("{out}");
}
