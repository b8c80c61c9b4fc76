//! The PostgreSQL gate with a real server and real clients (psql, pgbench, tokio-postgres) in
//! gated workloads: credential injection, per-statement enforcement, masking, recording.

use std::{io::Write as _, time::Duration};

use jitgate_e2e::{
    Gate, Ran,
    config::Body,
    free_port, rfc3339_ms,
    scrape::scrape,
    servers::{PG_ROLES, Postgres},
};
use serde_json::Value;

/// Config of a `bot` identity with auto-approved read/write/admin grants on `orders-db`.
fn body(pg: &Postgres, extra: &str) -> String {
    body_with_policy(pg, extra, "")
}

/// [`body`] with `policy_extra` lines in the policy.
fn body_with_policy(pg: &Postgres, extra: &str, policy_extra: &str) -> String {
    let keys = format!(
        r#"protocol = "postgres"
databases = ["orders"]
{extra}
{credentials}
[[resource.mask]]
columns = ["*.email"]
strategy = "partial"
[[resource.mask]]
detectors = ["card", "ssn", "aws_key", "jwt", "private_key"]
strategy = "redact"
"#,
        credentials = pg.credentials_toml(),
    );
    Body::new()
        .workload("bot", &["root"])
        .resource_with("orders-db", &format!("127.0.0.1:{}", pg.port), &keys)
        .policy(
            &["bot"],
            &["orders-db"],
            &["read", "write", "admin"],
            &format!(
                "max_ttl = \"1h\"\napproval = \"auto\"\napprovers = [\"root\"]\n{policy_extra}"
            ),
        )
        .build()
}

/// A connection string with a user and password the gate must ignore.
fn url(pg: &Postgres, db: &str) -> String {
    format!(
        "postgres://mallory:not-the-password@127.0.0.1:{}/{db}",
        pg.port
    )
}

fn psql(gate: &Gate, grant: Option<&str>, pg: &Postgres, sql: &[&str]) -> Ran {
    let u = url(pg, "orders");
    let mut cmd: Vec<&str> = vec!["psql", &u, "-X", "-At", "-v", "VERBOSITY=verbose"];
    for s in sql {
        cmd.push("-c");
        cmd.push(s);
    }
    let grant_arg;
    let run_args: Vec<&str> = match grant {
        Some(g) => {
            grant_arg = format!("orders-db:{g}");
            vec!["--grant", &grant_arg]
        }
        None => vec![],
    };
    gate.run("bot", &run_args, &cmd)
}

/// Runs a psql script (stdin) in a workload.
fn psql_script(gate: &Gate, grant: &str, pg: &Postgres, script: &str) -> Ran {
    let u = url(pg, "orders");
    let g = format!("orders-db:{grant}");
    let mut child = gate.spawn_stdin(
        "bot",
        &["--grant", &g],
        &["psql", &u, "-X", "-At", "-v", "VERBOSITY=verbose"],
    );
    // Written from a thread of its own: psql answers while it reads, and a script whose
    // answers fill the stdout pipe before the script is all written would wait forever.
    let mut stdin = child.stdin.take().unwrap();
    let script = script.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn pgclient(gate: &Gate, grant: &str, pg: &Postgres, args: &[&str]) -> Value {
    let client = gate.bins().pgclient.display().to_string();
    let u = url(pg, "orders");
    let g = format!("orders-db:{grant}");
    let mut cmd = vec![client.as_str(), args[0], &u];
    cmd.extend_from_slice(&args[1..]);
    let ran = gate.run("bot", &["--grant", &g], &cmd);
    serde_json::from_str(ran.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {ran:#?}"))
}

#[test]
fn credentials_are_injected_and_results_masked() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-basic", "", &body(&pg, ""));

    // No grant: a real ErrorResponse with the command to run (psql prints the HINT; a driver
    // sees the SQLSTATE, which psql does not print for connection errors).
    let refused = psql(&gate, None, &pg, &["SELECT 1"]);
    assert_ne!(refused.code, 0);
    assert!(
        refused
            .stderr
            .contains("HINT:  jitgate request orders-db --access read"),
        "{refused:#?}"
    );
    let client = gate.bins().pgclient.display().to_string();
    let u = url(&pg, "orders");
    let ran = gate.run("bot", &[], &[&client, "extended", &u, "SELECT 1"]);
    let driver: Value = serde_json::from_str(ran.stdout.trim()).expect("pgclient output");
    assert_eq!(driver["ok"], false, "{driver}");
    assert_eq!(driver["code"], "28000", "{driver}");
    assert!(
        driver["hint"]
            .as_str()
            .is_some_and(|h| h.contains("jitgate request orders-db")),
        "{driver}"
    );

    // With a read grant: the workload's user and password are ignored, the read role is used,
    // and sensitive values never reach the client.
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "SELECT current_user",
            "SELECT id, email, card, ssn, note FROM users ORDER BY id",
        ],
    );
    assert_eq!(ran.code, 0, "{ran:#?}");
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines[0], "orders_ro");
    assert_eq!(lines[1], "1|j***@example.com|****|****|vip");
    assert_eq!(
        lines[2],
        "2|j***@example.org|****|****|call +1 415 555 0100"
    );
    assert_eq!(lines[3], "3|a***@example.net|none|none|****");

    // The real passwords are nowhere the workload (or a reader of logs and records) can see.
    // Statement records are stored in binary batches, which the dump shows in hex.
    let recorded = gate.wait_for("the statements' records", Duration::from_secs(10), || {
        let all = serde_json::to_string(&gate.recorded_statements()).unwrap();
        all.contains("current_user").then_some(all)
    });
    let dump = gate.sqlite(".dump");
    assert!(dump.contains("CREATE TABLE"), "{dump}");
    assert!(
        dump.contains("statement_chunks VALUES"),
        "no records dumped"
    );
    let dump_lower = dump.to_ascii_lowercase();
    for (_, pw) in PG_ROLES {
        assert!(!ran.stdout.contains(pw) && !ran.stderr.contains(pw));
        assert!(!gate.log().contains(pw), "password in the daemon log");
        assert!(!dump.contains(pw), "password in the state store");
        let hex: String = pw.bytes().map(|b| format!("{b:02x}")).collect();
        assert!(!dump_lower.contains(&hex), "password in a statement batch");
        assert!(!recorded.contains(pw), "password in a statement record");
    }
    // A database not listed for the resource is refused.
    let other = gate.run(
        "bot",
        &["--grant", "orders-db:read"],
        &["psql", &url(&pg, "postgres"), "-X", "-At", "-c", "SELECT 1"],
    );
    assert!(
        other.stderr.contains("3D000") || other.stderr.contains("not available"),
        "{other:#?}"
    );
}

#[test]
fn read_grants_cannot_write_by_any_route() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-read", "", &body(&pg, ""));
    let attempts = [
        "INSERT INTO scratch VALUES (1, 'x')",
        "UPDATE users SET name = 'x' WHERE id = 1",
        "DELETE FROM users WHERE id = 1",
        "WITH d AS (DELETE FROM users WHERE id = 1 RETURNING *) SELECT * FROM d",
        "BEGIN READ WRITE",
        "SET default_transaction_read_only = off",
        // PostgreSQL reads any unique prefix of off/false/no as false.
        "SET default_transaction_read_only = 'fa'",
        "SET default_transaction_read_only = of",
        "RESET default_transaction_read_only",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "SET ROLE orders_admin",
        "SET SESSION AUTHORIZATION orders_admin",
        "SELECT set_config('default_transaction_read_only', 'off', false)",
        "DO $$ BEGIN INSERT INTO scratch VALUES (2, 'y'); END $$",
        "PREPARE p AS INSERT INTO scratch VALUES (3, 'z')",
        "CREATE TABLE evil (a int)",
        "TRUNCATE scratch",
        "COPY scratch FROM STDIN",
        "SELECT 1; DELETE FROM users WHERE id = 1",
        "SELECT * FROM users FOR UPDATE",
        "SELECT * INTO copied FROM users",
        "EXPLAIN ANALYZE DELETE FROM users WHERE id = 1",
        "CREATE TEMP TABLE t AS SELECT 1",
        // A change of literal mode could hide a statement sent right behind it.
        "SET standard_conforming_strings = off",
    ];
    for sql in attempts {
        let ran = psql(&gate, Some("read"), &pg, &[sql]);
        // Refused by the gate itself (its errors read `ERROR:  SQLSTATE: jitgate: ...`), not
        // only by the read role's privileges on the server.
        assert!(
            ran.stderr
                .lines()
                .any(|l| l.starts_with("ERROR:") && l.contains(": jitgate: ")),
            "a read grant ran {sql:?} or only the server refused it: {ran:#?}"
        );
    }
    // Through the extended protocol too.
    let r = pgclient(
        &gate,
        "read",
        &pg,
        &["execute", "INSERT INTO scratch VALUES (4, 'w')"],
    );
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["code"], "42501");
    assert_eq!(pg.admin("orders", "SELECT count(*) FROM scratch"), "0\n");
    assert_eq!(
        pg.admin("orders", "SELECT name FROM users WHERE id = 1"),
        "Jane\n"
    );
    // Server-side enforcement backs the proxy up: nextval is not a write to the parser, but the
    // read-only session refuses it.
    let ran = psql(&gate, Some("read"), &pg, &["SELECT nextval('ticket')"]);
    assert!(ran.stderr.contains("25006"), "{ran:#?}");
    // The same statements work with a write grant.
    let ran = psql(
        &gate,
        Some("write"),
        &pg,
        &["INSERT INTO scratch VALUES (1, 'x')"],
    );
    assert_eq!(ran.code, 0, "{ran:#?}");
    assert_eq!(pg.admin("orders", "SELECT count(*) FROM scratch"), "1\n");
}

#[test]
fn read_grants_cannot_act_through_functions() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-read-fns", "", &body(&pg, ""));
    pg.admin(
        "orders",
        "SELECT lo_from_bytea(424242, 'original'); \
         ALTER LARGE OBJECT 424242 OWNER TO orders_rw; \
         GRANT SELECT, UPDATE ON LARGE OBJECT 424242 TO orders_ro; \
         CREATE FUNCTION user_count() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM users'; \
         GRANT EXECUTE ON FUNCTION user_count() TO PUBLIC; \
         CREATE FUNCTION public.\"LoUnlink\"(oid) RETURNS int LANGUAGE internal AS 'be_lo_unlink'",
    );
    // Named, qualified, in capitals, quoted, nested, in a CTE, in a WHERE, in VALUES: the
    // decision comes from what the catalog says the function is.
    let attempts = [
        "SELECT lo_from_bytea(0, 'x')",
        "SELECT lo_create(0)",
        "SELECT lo_creat(-1)",
        "SELECT pg_catalog.lo_create(0)",
        "SELECT LO_CREATE(0)",
        "SELECT \"lo_create\"(0)",
        "SELECT lo_put(424242, 0, 'XX')",
        "SELECT lowrite(lo_open(424242, 131072), 'XX')",
        "SELECT lo_truncate(lo_open(424242, 131072), 0)",
        "SELECT lo_unlink(424242)",
        "SELECT x FROM (SELECT lo_unlink(424242) AS x) s",
        "WITH c AS (SELECT lo_unlink(424242)) SELECT * FROM c",
        "SELECT 1 WHERE lo_unlink(424242) = 1",
        "SELECT * FROM (VALUES (lo_unlink(424242))) v(x)",
        // Compiled code under a name of capitals (the gate folds names; the catalog keeps
        // them).
        "SELECT \"LoUnlink\"(424242)",
        "SELECT pg_logical_emit_message(false, 'jitgate', 'x')",
        "SELECT pg_advisory_lock(42)",
        "SELECT pg_try_advisory_xact_lock(43)",
        "SELECT pg_advisory_lock_shared(44)",
        "SELECT pg_stat_reset()",
        "SELECT pg_notify('chan', 'x')",
        "SELECT query_to_xml('SELECT lo_unlink(424242)', true, true, '')",
    ];
    for sql in attempts {
        let ran = psql(&gate, Some("read"), &pg, &[sql]);
        // 25006, or 42501 where masking refuses it first (query_to_xml).
        assert!(
            (ran.stderr.contains("25006") || ran.stderr.contains("42501"))
                && ran.stderr.contains(": jitgate: "),
            "a read grant ran {sql:?}: {ran:#?}"
        );
    }
    // Through the extended protocol too.
    let r = pgclient(&gate, "read", &pg, &["execute", "SELECT lo_unlink(424242)"]);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["code"], "25006", "{r}");
    // As an admin sees it: nothing was created, changed, removed or locked.
    assert_eq!(
        pg.admin("orders", "SELECT count(*) FROM pg_largeobject_metadata"),
        "1\n"
    );
    assert_eq!(
        pg.admin("orders", "SELECT convert_from(lo_get(424242), 'UTF8')"),
        "original\n"
    );
    assert_eq!(
        pg.admin(
            "orders",
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        ),
        "0\n"
    );
    // What only reads still runs: volatile clocks and randomness, sizes, reading a large
    // object, a SQL function (the read-only transaction governs what it runs).
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "SELECT random() < 2, clock_timestamp() IS NOT NULL, pg_is_in_recovery(), \
             pg_database_size(current_database()) > 0, convert_from(lo_get(424242), 'UTF8'), \
             user_count(), upper('a')",
        ],
    );
    assert_eq!(ran.code, 0, "{ran:#?}");
    assert_eq!(ran.stdout.trim(), "t|t|f|t|original|3|A", "{ran:#?}");
    // A write grant may.
    let ran = psql(&gate, Some("write"), &pg, &["SELECT lo_unlink(424242)"]);
    assert_eq!(ran.code, 0, "{ran:#?}");
    assert_eq!(
        pg.admin("orders", "SELECT count(*) FROM pg_largeobject_metadata"),
        "0\n"
    );
}

#[test]
fn blast_radius_limits_cut_results_and_slow_statements() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let limits = "[policy.limits]\nrows_per_statement = 1000\nbytes_per_statement = \"256KiB\"\n\
                  rows_per_session = 5000\nstatements_per_second = 20\n";
    let gate = Gate::start("pg-limits", "", &body_with_policy(&pg, "", limits));
    // A big result is cut with 54000 and a hint, and the session goes on.
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &["SELECT generate_series(1, 100000)", "SELECT 'still here'"],
    );
    assert!(
        ran.stderr.contains("54000") && ran.stderr.contains("rows_per_statement"),
        "{ran:#?}"
    );
    assert!(ran.stdout.ends_with("still here\n"), "{ran:#?}");
    assert!(
        ran.stdout.lines().count() <= 1001,
        "more than the limit arrived"
    );
    // Every route: bytes, a wide row, COPY, a cursor, the extended protocol, a union.
    for sql in [
        "SELECT repeat('x', 1000) FROM generate_series(1, 900)",
        "COPY (SELECT generate_series(1, 100000)) TO STDOUT",
        "SELECT * FROM generate_series(1, 600) UNION ALL SELECT * FROM generate_series(1, 600)",
    ] {
        let ran = psql(&gate, Some("read"), &pg, &[sql, "SELECT 'still here'"]);
        assert!(ran.stderr.contains("54000"), "{sql}: {ran:#?}");
        assert!(ran.stdout.ends_with("still here\n"), "{sql}: {ran:#?}");
    }
    let ran = psql_script(
        &gate,
        "read",
        &pg,
        "BEGIN;\nDECLARE c CURSOR FOR SELECT generate_series(1, 100000);\nFETCH ALL FROM c;\nROLLBACK;\nSELECT 'still here';\n",
    );
    assert!(ran.stderr.contains("54000"), "{ran:#?}");
    assert!(ran.stdout.ends_with("still here\n"), "{ran:#?}");
    let r = pgclient(
        &gate,
        "read",
        &pg,
        &["stream", "SELECT generate_series(1, 100000)"],
    );
    assert_eq!(r["code"], "54000", "{r}");
    // Fetching in pages stays within the statement limit, until the session's is spent.
    let ran = psql_script(
        &gate,
        "read",
        &pg,
        &format!(
            "BEGIN;\nDECLARE c CURSOR FOR SELECT generate_series(1, 100000);\n{}ROLLBACK;\nSELECT 'after';\n",
            "FETCH 900 FROM c;\n".repeat(7)
        ),
    );
    assert!(
        ran.stderr.contains("54000") && ran.stderr.contains("rows_per_session"),
        "{ran:#?}"
    );
    let fetched = ran
        .stdout
        .lines()
        .filter(|l| l.parse::<u64>().is_ok())
        .count();
    assert!((4500..=5000).contains(&fetched), "{fetched} rows: {ran:#?}");
    // Statements per second: a burst past 20 is refused with 53400; the session goes on.
    let script = "SELECT 1;\n".repeat(60) + "\\! sleep 1.2\nSELECT 'after the pause';\n";
    let ran = psql_script(&gate, "read", &pg, &script);
    let refused = ran.stderr.matches("53400").count();
    let ran_ok = ran.stdout.lines().filter(|l| *l == "1").count();
    assert!(
        refused >= 30 && (20..60).contains(&ran_ok),
        "{refused} refused, {ran_ok} ran: {ran:#?}"
    );
    assert!(ran.stdout.contains("after the pause"), "{ran:#?}");
    // Prepared once, run many times: each run (a portal's first Execute) takes from the
    // same rate, and a refused one gets 53400 as a simple query does.
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let r = pgclient(&gate, "read", &pg, &["repeat", "SELECT 1", "60"]);
    let codes: Vec<&str> = r["codes"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let ran = r["ran"].as_u64().unwrap_or_default();
    assert!(
        codes.len() >= 30 && codes.iter().all(|c| *c == "53400") && (20..60).contains(&ran),
        "{r}"
    );
    // Each limit reached is audited once per session, not once per attempt.
    let audit = gate.cli(&["audit", "--json"]).json();
    let reached: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "limit.reached")
        .collect();
    assert!(
        reached
            .iter()
            .any(|e| e["detail"]["limit"] == "statements_per_second"),
        "{audit}"
    );
    assert!(
        reached.len() <= 12,
        "{} limit records: {audit}",
        reached.len()
    );
}

/// Hostile: a portal whose first run was refused by the statement rate stays unrun; rolled
/// back to a savepoint from before the refusal (the portal survives it), its next Execute is
/// judged again, not taken for a portal already running (which the rate never sees).
#[test]
fn a_portal_refused_by_the_rate_is_judged_again_after_a_savepoint_rollback() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let limits = "[policy.limits]\nstatements_per_second = 2\n";
    let gate = Gate::start("pg-savepoint-rate", "", &body_with_policy(&pg, "", limits));
    let r = pgclient(&gate, "read", &pg, &["raw-savepoint"]);
    assert!(r["setup"]["code"].is_null(), "{r}");
    assert!(r["drained_refused"].as_u64() > Some(0), "{r}");
    assert_eq!(r["first"]["code"], "53400", "{r}");
    assert!(r["rolled_back"]["code"].is_null(), "{r}");
    assert_eq!(
        r["second"]["code"], "53400",
        "the portal ran past the rate: {r}"
    );
    assert!(r["second"]["value"].is_null(), "{r}");
}

#[test]
fn default_guardrails_and_approval_holds() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-guard", "", &body(&pg, ""));
    for sql in [
        "COPY users TO PROGRAM 'id'",
        "SELECT pg_read_file('/etc/passwd')",
        "UPDATE users SET note = pg_read_file('/etc/hostname') WHERE id = 1",
        "SELECT lo_import('/etc/passwd')",
        "SELECT lo_export(1, '/tmp/x')",
        "SELECT dblink_connect('host=10.0.0.1')",
        "CREATE EXTENSION postgres_fdw",
        "COPY users TO '/tmp/users.txt'",
    ] {
        let ran = psql(&gate, Some("admin"), &pg, &[sql]);
        assert!(ran.stderr.contains("guardrail"), "{sql}: {ran:#?}");
    }
    // Admin grants can run DDL, write grants cannot.
    let ran = psql(&gate, Some("write"), &pg, &["DROP TABLE scratch"]);
    assert!(ran.stderr.contains("needs admin access"), "{ran:#?}");

    // DELETE without WHERE is held; approve releases it.
    pg.admin("orders", "INSERT INTO scratch VALUES (1, 'a'), (2, 'b')");
    let u = url(&pg, "orders");
    let mut w = gate.spawn(
        "bot",
        &["--grant", "orders-db:write"],
        &["psql", &u, "-X", "-At", "-c", "DELETE FROM scratch"],
    );
    let request = gate.pending_request();
    assert_eq!(request["statement"], "DELETE FROM scratch");
    // Approvers see the held statement in the plain listing too.
    let listing = gate.cli(&["approvals"]);
    assert!(
        listing.stdout.contains("held statements")
            && listing.stdout.contains("DELETE FROM scratch"),
        "{listing:#?}"
    );
    assert!(
        request["policy"]
            .as_str()
            .unwrap()
            .contains("write-without-where"),
        "{request}"
    );
    let approved = gate.cli(&["approve", request["id"].as_str().unwrap(), "--json"]);
    approved.assert_ok();
    assert_eq!(approved.json()["grant"], Value::Null);
    w.expect_line("DELETE 2", Duration::from_secs(10));
    assert_eq!(w.wait(Duration::from_secs(10)), 0);
    assert_eq!(pg.admin("orders", "SELECT count(*) FROM scratch"), "0\n");

    // ... deny refuses it, and nothing changes.
    pg.admin("orders", "INSERT INTO scratch VALUES (1, 'a')");
    let mut w = gate.spawn(
        "bot",
        &["--grant", "orders-db:write"],
        &[
            "psql",
            &u,
            "-X",
            "-At",
            "-v",
            "VERBOSITY=verbose",
            "-c",
            "UPDATE scratch SET v = 'AKIAIOSFODNN7EXAMPLE'",
        ],
    );
    let request = gate.pending_request();
    // The request (and the audit log) keep the whole statement with secrets masked.
    let held = request["statement"].as_str().unwrap();
    assert!(
        held.starts_with("UPDATE scratch SET v = ") && !held.contains("AKIAIOSFODNN7EXAMPLE"),
        "{request}"
    );
    gate.cli(&["deny", request["id"].as_str().unwrap(), "--reason", "no"])
        .assert_ok();
    w.expect_line("denied by root", Duration::from_secs(10));
    w.wait(Duration::from_secs(10));
    assert_eq!(pg.admin("orders", "SELECT v FROM scratch"), "a\n");
}

#[test]
fn a_refused_statement_leaves_both_sides_in_the_same_transaction_state() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-txn", "", &body(&pg, ""));
    let script = "
BEGIN;
SELECT 'one';
INSERT INTO scratch VALUES (1, 'x');
SELECT 'two';
ROLLBACK;
INSERT INTO scratch VALUES (1, 'x');
SELECT 'three';
SELEC 'typo';
SELECT 'four';
";
    let ran = psql_script(&gate, "read", &pg, script);
    let out = format!("{}{}", ran.stdout, ran.stderr);
    assert!(ran.stdout.contains("one"), "{out}");
    assert!(
        !ran.stdout.contains("two"),
        "the transaction must be aborted on the server too: {out}"
    );
    assert!(
        out.contains("25P02"),
        "in a failed transaction the server refuses the next statement: {out}"
    );
    assert!(
        ran.stdout.contains("three"),
        "outside a transaction a refusal changes nothing: {out}"
    );
    assert!(out.contains("syntax error at or near \"SELEC\""), "{out}");
    assert!(ran.stdout.contains("four"), "{out}");
    assert_eq!(pg.admin("orders", "SELECT count(*) FROM scratch"), "0\n");
}

#[test]
fn drivers_extended_protocol_binary_pipelining_and_cancel() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    // Both runtimes carry sessions, whatever `auto` picks on this machine: this test runs
    // the multi-threaded one, pg-bench the single-threaded one.
    let gate = Gate::start("pg-driver", "worker_threads = 4", &body(&pg, ""));
    let r = pgclient(
        &gate,
        "read",
        &pg,
        &[
            "extended",
            "SELECT id, email, card, ssn FROM users WHERE id = $1",
            "1",
        ],
    );
    assert_eq!(
        r["rows"],
        serde_json::json!([[1, "j***@example.com", "****", "****"]]),
        "{r}"
    );
    let r = pgclient(
        &gate,
        "read",
        &pg,
        &["prepared", "SELECT email FROM users WHERE id = $1::int"],
    );
    assert_eq!(
        r["rows"],
        serde_json::json!([
            [["j***@example.com"]],
            [["j***@example.org"]],
            [["a***@example.net"]]
        ]),
        "{r}"
    );
    let r = pgclient(
        &gate,
        "read",
        &pg,
        &["pipeline", "SELECT email FROM users ORDER BY id LIMIT 1"],
    );
    assert_eq!(
        r["rows"],
        serde_json::json!([[[1]], [["j***@example.com"]], [[3]]]),
        "{r}"
    );
    // Binary bigint carrying a card number is withheld.
    let r = pgclient(
        &gate,
        "read",
        &pg,
        &["extended", "SELECT 4111111111111111::int8, 42::int8"],
    );
    assert_eq!(r["rows"], serde_json::json!([[null, 42]]), "{r}");
    // CancelRequest through the gate reaches the server with its real key.
    let r = pgclient(&gate, "read", &pg, &["cancel"]);
    assert_eq!(r["code"], "57014", "{r}");
}

#[test]
fn pgbench_runs_in_every_query_mode() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let init = std::process::Command::new("pgbench")
        .args(["-i", "-s", "1", "-q", "-h"])
        .arg(pg.socket_dir())
        .args(["-p", &pg.port.to_string(), "-U", "postgres", "orders"])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    pg.admin(
        "orders",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO orders_rw",
    );
    let gate = Gate::start("pg-bench", "worker_threads = 1", &body(&pg, ""));
    for mode in ["simple", "extended", "prepared"] {
        let ran = gate.run(
            "bot",
            &["--grant", "orders-db:write"],
            &[
                "pgbench",
                "-n",
                "-M",
                mode,
                "-c",
                "2",
                "-t",
                "25",
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "mallory",
                "orders",
            ],
        );
        assert_eq!(ran.code, 0, "pgbench -M {mode}: {ran:#?}");
        assert!(
            ran.stdout.contains("number of failed transactions: 0"),
            "{mode}: {ran:#?}"
        );
        assert!(
            ran.stdout
                .contains("number of transactions actually processed: 50/50"),
            "{mode}: {ran:#?}"
        );
    }
}

#[test]
fn copy_output_and_error_details_are_masked() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-copy", "", &body(&pg, ""));
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &["COPY users (id, email, card) TO STDOUT"],
    );
    assert_eq!(
        ran.stdout.lines().next(),
        Some("1\tj***@example.com\t****"),
        "{ran:#?}"
    );
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &["COPY users TO STDOUT WITH (FORMAT csv, HEADER)"],
    );
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(lines[0], "id,name,email,card,ssn,note", "{ran:#?}");
    assert!(
        lines[1].starts_with("1,Jane,\"j***@example.com\",\"****\",\"****\""),
        "{ran:#?}"
    );
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &["\\copy (SELECT email, ssn FROM users WHERE id = 2) to stdout"],
    );
    assert_eq!(ran.stdout.trim(), "j***@example.org\t****", "{ran:#?}");
    // The server echoes row values in error details: masked too.
    pg.admin("orders", "CREATE UNIQUE INDEX ON scratch (v)");
    pg.admin(
        "orders",
        "INSERT INTO scratch VALUES (1, '4111111111111111')",
    );
    let ran = psql(
        &gate,
        Some("write"),
        &pg,
        &["INSERT INTO scratch VALUES (2, '4111111111111111')"],
    );
    assert!(ran.stderr.contains("23505"), "{ran:#?}");
    assert!(
        !ran.stderr.contains("4111111111111111"),
        "card number in an error detail: {ran:#?}"
    );
}

#[test]
fn a_million_masked_rows_stream_in_bounded_memory() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-million", "worker_threads = 2", &body(&pg, ""));
    let peak = |pid: u32| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse().ok())
            .unwrap()
    };
    let pid = gate.daemon_pid().unwrap();
    // Warm up (TLS, caches, first session).
    pgclient(&gate, "read", &pg, &["stream", "SELECT 1"]);
    let before = peak(pid);
    let r = pgclient(
        &gate,
        "read",
        &pg,
        &[
            "stream",
            "SELECT i, 'user' || i || '@example.com' AS email FROM generate_series(1, 1000000) i",
        ],
    );
    assert_eq!(r["rows"], 1_000_000, "{r}");
    assert_eq!(
        r["first"],
        serde_json::json!([1, "u***@example.com"]),
        "{r}"
    );
    let grown_kib = peak(pid).saturating_sub(before);
    assert!(
        grown_kib < 32 * 1024,
        "the daemon's peak memory grew by {grown_kib} KiB over a million rows: not streaming"
    );
}

/// A workload chooses what it selects and what its statements say, and both are masked (the
/// result by the resource's rules, the statement by the recorder's): values built of back to
/// back matches, megabytes of them, come back and are recorded masked, every match, at a cost
/// linear in their size (the masking unit tests count the steps; before that fix this test
/// took the agent minutes of CPU per statement).
#[test]
fn values_built_of_matches_are_masked_whole() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-hostile-values", "", &body(&pg, ""));
    let unit = "4111 1111 1111 1111 / 123-45-6789 / ";
    // A result of 200,000 matches in one value (3.6 MB), and a 2.5 MB statement naming
    // 100,000 card numbers (its result, a count, is not masked).
    let literal = "4111111111111111 ".repeat(100_000);
    let script = format!("SELECT repeat('{unit}', 100000);\nSELECT length('{literal}');\n");
    let ran = psql_script(&gate, "read", &pg, &script);
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let mut lines = ran.stdout.lines();
    let masked = lines.next().unwrap_or_default();
    assert_eq!(
        masked.len(),
        "**** / **** / ".len() * 100_000,
        "{}",
        &masked[..200.min(masked.len())]
    );
    assert_eq!(masked.matches("****").count(), 200_000);
    assert!(!masked.contains("4111") && !masked.contains("6789"));
    assert_eq!(lines.next(), Some(literal.len().to_string().as_str()));
    // The statement is recorded with its card numbers redacted (and cut to the recorded
    // length): not one passes.
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    let id = sessions[0]["id"].as_str().unwrap().to_owned();
    let detail = gate.cli(&["sessions", "show", &id, "--json"]).json();
    let texts: Vec<&str> = detail["statements"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|st| st["text"].as_str())
        .collect();
    let long = texts
        .iter()
        .find(|t| t.starts_with("SELECT length("))
        .unwrap_or_else(|| panic!("the long statement is recorded: {texts:?}"));
    assert!(
        long.contains("**** ****") && !long.contains("4111"),
        "{long:.200}"
    );

    // Bind parameters are recorded with every execution: redacted whole, then cut to the
    // recorded size (64 KiB for a Bind's parameters together).
    let cards = "4111111111111111 ".repeat(6000);
    let filler = "x".repeat(100_000);
    let r = pgclient(
        &gate,
        "read",
        &pg,
        &[
            "execute",
            "SELECT length($1::text) + length($2::text) + length($3::text)",
            &cards,
            &filler,
            "tail",
        ],
    );
    assert_eq!(r["ok"], true, "{r}");
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    let params = sessions
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| {
            let id = s["id"].as_str()?;
            let detail = gate.cli(&["sessions", "show", id, "--json"]).json();
            detail["statements"].as_array()?.iter().find_map(|st| {
                st["text"]
                    .as_str()?
                    .starts_with("SELECT length($1")
                    .then(|| st["params"].clone())
            })
        })
        .next()
        .expect("the execution is recorded");
    let params: Vec<&str> = params
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(params[0], "**** ".repeat(6000));
    assert!(params[1].starts_with("xxx") && params[1].ends_with(" …"));
    assert!(params[0].len() + params[1].len() <= 64 * 1024 + " …".len());
    assert!(params[2].contains("not recorded"), "{}", params[2]);
}

/// Extended-protocol batches written by hand: after a failed Execute the server skips the
/// rest up to Sync; each skipped Execute is recorded as not run (the error stays on the one
/// that failed), and a workload that goes on executing one large statement without a Sync
/// is ended before the gate holds a record per Execute.
#[test]
fn skipped_executes_are_recorded_and_unsynced_ones_bounded() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-batches", "", &body(&pg, ""));
    let r = pgclient(&gate, "read", &pg, &["raw-batch"]);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["skipped_batch"], "22012", "{r}");
    let end = r["unsynced_end"].as_str().unwrap_or_default();
    assert_ne!(end, "timeout", "nothing ended the unsynced Executes: {r}");
    if end == "eof" {
        assert!(
            r["unsynced_codes"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c == "54000")),
            "{r}"
        );
    }
    // Ended by the bound, not by anything else (a reset alone could be a crash).
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    assert!(
        sessions.as_array().unwrap().iter().any(|s| s["detail"]
            .as_str()
            .is_some_and(|d| d.contains("statements in flight"))),
        "{sessions}"
    );
    // Every session shows, the one that recorded hundreds of MiB a page at a time.
    let details: Vec<Value> = sessions
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["id"].as_str())
        .map(|id| gate.cli(&["sessions", "show", id, "--json"]).json())
        .collect();
    let paged = details
        .iter()
        .find_map(|d| Some((d["session"]["id"].as_str()?, d["more_from"].as_u64()?)))
        .expect("the unsynced session is shown in pages");
    let next = gate
        .cli(&[
            "sessions",
            "show",
            paged.0,
            "--from",
            &paged.1.to_string(),
            "--json",
        ])
        .json();
    assert_eq!(
        next["statements"][0]["seq"].as_u64(),
        Some(paged.1),
        "{:.300}",
        next.to_string()
    );
    let errors: Vec<String> = details
        .iter()
        .flat_map(|detail| {
            detail["statements"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|st| st["text"].as_str().is_some_and(|t| t.contains("batch_div")))
                .map(|st| st["error"].as_str().unwrap_or("<none>").to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors[0].starts_with("22012"), "{errors:?}");
    assert!(
        errors[1..].iter().all(|e| e.starts_with("not run")),
        "{errors:?}"
    );
}

/// Hostile: a workload preparing statements without end (each kept by the gate for its
/// judgement and masking plan) is refused past the session's bound, by count and by bytes,
/// with 54000 and a hint; closing them frees the room; the session stays usable.
#[test]
fn prepared_statements_are_bounded_per_session() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-prepared-bound", "", &body(&pg, ""));
    for (n, pad, bound) in [("10050", "0", 10_000), ("1000", "100000", 100)] {
        let out = pgclient(&gate, "read", &pg, &["hoard", n, pad]);
        let prepared = out["prepared"].as_u64().unwrap_or_default();
        assert!(
            prepared >= bound && prepared < 10_001,
            "{n} statements of {pad} bytes: {out}"
        );
        assert_eq!(out["refused"]["code"], "54000", "{out}");
        let message = out["refused"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("prepared statements"), "{out}");
        assert_eq!(out["after"][0][0], "after closing", "{out}");
    }
    // Re-packaged as SQL: PREPARE in simple queries counts against the same bound.
    let mut script: String = (0..10_001)
        .map(|i| format!("PREPARE p{i} AS SELECT {i};\n"))
        .collect();
    script.push_str("DEALLOCATE ALL;\nPREPARE again AS SELECT 'again';\nEXECUTE again;\n");
    let ran = psql_script(&gate, "read", &pg, &script);
    let refusals = ran.stderr.matches("this session holds").count();
    assert_eq!(refusals, 1, "{}", ran.stderr);
    assert!(ran.stderr.contains("54000"), "{}", ran.stderr);
    assert!(ran.stdout.lines().any(|l| l == "again"), "{ran:#?}");
}

/// Hostile: a long statement prepared once and run many times (each run a few bytes on the
/// wire) is recorded whole once; the other runs' records point at that one instead of
/// making the store keep the text again each time.
#[test]
fn a_long_prepared_statement_is_recorded_whole_once() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-record-once", "", &body(&pg, ""));
    let sql = format!("SELECT 1 /* {} */", "long ".repeat(2000));
    let r = pgclient(&gate, "read", &pg, &["repeat", &sql, "20"]);
    assert_eq!(r["ran"], 20, "{r}");
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    let id = sessions[0]["id"].as_str().expect("a session");
    let detail = gate.cli(&["sessions", "show", id, "--json"]).json();
    let runs: Vec<&str> = detail["statements"]
        .as_array()
        .expect("statements")
        .iter()
        .filter_map(|s| s["text"].as_str())
        .filter(|t| t.starts_with("SELECT 1 /* long"))
        .collect();
    assert_eq!(runs.len(), 20, "{detail}");
    let whole = runs.iter().filter(|t| t.len() >= sql.len()).count();
    assert_eq!(whole, 1, "{runs:?}");
    assert!(
        runs.iter()
            .filter(|t| t.len() < 300)
            .all(|t| t.contains("whole in #")),
        "{runs:?}"
    );
}

/// Hostile: portals and SQL cursors share one namespace on the server. A portal the server
/// dropped (SQL CLOSE, ROLLBACK TO a savepoint, CLOSE ALL, COMMIT inside a string that
/// begins again) whose name is declared again as a cursor of a masked column (by a simple
/// query, or by a DECLARE parsed before and executed after) and run with Execute; a cursor
/// dropped by ROLLBACK TO whose name is bound to the masked column and fetched with SQL; a
/// DECLARE parsed and never run; a rebind the server refuses, executed after a ROLLBACK TO
/// that kept the portal; a FETCH parsed before its cursor was declared again: every value
/// comes back masked, never judged or masked as what the name held before.
#[test]
fn a_portal_name_declared_as_a_cursor_is_masked_by_what_the_cursor_reads() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-cursor-names", "", &body(&pg, ""));
    let r = pgclient(&gate, "read", &pg, &["raw-cursor"]);
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        r["steps"]
            .as_array()
            .is_some_and(|s| s.iter().all(|o| o["code"].is_null())),
        "every step ran: {r}"
    );
    assert!(
        !r.to_string().contains("JANE@EXAMPLE.COM"),
        "a masked value leaked: {r}"
    );
    // Each read its row, masked (by its own query, or whole where the gate cannot be sure
    // which query the server ran).
    for route in [
        "closed",
        "rolled_back",
        "closed_all",
        "fetched",
        "parsed_only",
        "declared_later",
        "committed",
        "fetch_redeclared",
    ] {
        assert!(r[route]["code"].is_null(), "{route}: {r}");
        let v = r[route]["value"].as_str().unwrap_or_default();
        assert!(!v.is_empty() && !v.contains("JANE"), "{route}: {r}");
    }
    // Bound again while the portal was still there (the server refuses), then executed
    // after a ROLLBACK TO that kept it: refused until the Bind's answer, or masked whole.
    assert_eq!(r["rebound"]["code"], "42P03", "{r}");
    let in_doubt = &r["in_doubt"];
    assert!(
        in_doubt["code"] == "55000"
            || (in_doubt["code"].is_null()
                && in_doubt["value"]
                    .as_str()
                    .is_some_and(|v| !v.is_empty() && !v.contains("JANE"))),
        "{r}"
    );
}

/// Hostile: names whose meaning changes between what the gate sees and what the server runs
/// (a DECLARE the server does not carry out, FETCH and EXECUTE portals bound before their
/// cursor or prepared statement changed, an EXECUTE pipelined behind a re-PREPARE, a
/// SAVEPOINT the server refuses): each masked value comes back masked, or the statement is
/// refused with an error that says why; never raw.
#[test]
fn names_in_flux_are_masked_or_refused_never_guessed() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-names-flux", "", &body(&pg, ""));
    let r = pgclient(&gate, "read", &pg, &["raw-names"]);
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        r["steps"]
            .as_array()
            .is_some_and(|s| s.iter().all(|o| o["code"].is_null())),
        "every step ran: {r}"
    );
    let text = r.to_string().to_ascii_lowercase();
    assert!(
        !text.contains("jane@example.com"),
        "a masked value leaked: {r}"
    );
    let masked = |route: &str| {
        let v = r[route]["value"].as_str().unwrap_or_default();
        assert!(r[route]["code"].is_null(), "{route}: {r}");
        assert!(!v.is_empty() && !v.contains("JANE"), "{route}: {r}");
    };
    masked("explained");
    assert_eq!(r["taken"]["code"], "42P03", "{r}");
    masked("after_taken");
    assert_eq!(r["fetch_sql"]["code"], "0A000", "{r}");
    assert_eq!(r["fetch_portal"]["code"], "55000", "{r}");
    assert_eq!(r["execute_portal"]["code"], "55000", "{r}");
    assert_eq!(r["pipelined"]["code"], "26000", "{r}");
    assert_eq!(r["skipped_close"]["code"], "22012", "{r}");
    assert_eq!(r["redeclared"]["code"], "42P03", "{r}");
    masked("held");
    masked("first_row");
    assert_eq!(r["stored_by_execute"]["code"], "55000", "{r}");
    assert_eq!(r["bound_over"]["code"], "42P03", "{r}");
    masked("held_bound_over");
    assert_eq!(r["rebound_target"]["code"], "55000", "{r}");
    // Other names changing (a driver's statements and portals) stale nothing.
    assert!(r["unrelated"]["code"].is_null(), "{r}");
    assert_eq!(r["unrelated"]["value"], "Jane", "{r}");
    assert_eq!(r["aborted"]["code"], "22012", "{r}");
    masked("savepoint");
    assert_eq!(r["declared_over_portal"]["code"], "42P03", "{r}");
    masked("portal_fetched");
    // DECLAREs the server ran where the gate did not expect a run: their cursors, declared
    // again (refused there), are still masked by what they read.
    assert_eq!(r["rerun_failed"]["code"], "22012", "{r}");
    assert!(r["rerun"]["code"].is_null(), "{r}");
    assert_eq!(r["rerun_redeclared"]["code"], "42P03", "{r}");
    masked("rerun_fetched");
    assert_eq!(r["forgot_close"]["code"], "22012", "{r}");
    assert!(r["forgotten_run"]["code"].is_null(), "{r}");
    assert_eq!(r["forgotten_redeclared"]["code"], "42P03", "{r}");
    masked("forgotten_fetched");
}

/// Cursors of new names without end, as Django's `iterator()` (a `WITH HOLD` cursor per
/// query, closed after) and psycopg's named cursors (in a transaction, ended by its commit)
/// make them: the thousandth and later are masked by their own query like the first (the
/// gate forgot the dropped ones once the server did, where it used to mask every computed
/// column of each new cursor whole past 1,024). Hostile: a held cursor whose CLOSE the server
/// skipped is still remembered; a DECLARE of its name, which the server refuses, leaves its
/// FETCH masked.
#[test]
fn cursors_of_new_names_keep_their_own_masking_without_end() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-cursor-names", "", &body(&pg, ""));
    const ROUNDS: usize = 1_500;
    let mut script = String::new();
    for i in 0..ROUNDS {
        // A computed column of no masked one: masked whole only if the gate does not know
        // what the cursor reads.
        let query = "SELECT upper(name), id FROM users WHERE id = 1";
        if i % 2 == 0 {
            script.push_str(&format!(
                "DECLARE \"_django_curs_{i}\" NO SCROLL CURSOR WITH HOLD FOR {query};\n\
                 FETCH ALL FROM \"_django_curs_{i}\";\nCLOSE \"_django_curs_{i}\";\n"
            ));
        } else {
            script.push_str(&format!(
                "BEGIN;\nDECLARE c{i} CURSOR FOR {query};\nFETCH ALL FROM c{i};\nCOMMIT;\n"
            ));
        }
    }
    let ran = psql_script(&gate, "read", &pg, &script);
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let rows: Vec<&str> = ran.stdout.lines().filter(|l| l.contains('|')).collect();
    assert_eq!(rows.len(), ROUNDS, "{}", ran.stderr);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(*row, "JANE|1", "cursor {i}");
    }

    // The CLOSE of a held cursor skipped after an error in its string: the cursor stays on
    // the server, the DECLARE of its name fails there, the FETCH reads the old one.
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "DECLARE h CURSOR WITH HOLD FOR SELECT lower(email) FROM users WHERE id = 1",
            "SELECT 1/0; CLOSE h",
            "DECLARE h CURSOR WITH HOLD FOR SELECT 'harmless'",
            "FETCH ALL FROM h",
        ],
    );
    assert!(ran.stderr.contains("22012"), "{ran:#?}");
    assert!(ran.stderr.contains("42P03"), "{ran:#?}");
    // Masked by the old cursor's rule, or whole (the refused DECLARE's string failed: the
    // gate no longer believes in a cursor of the name).
    let fetched = ran.stdout.lines().last().unwrap_or_default();
    assert!(
        fetched == "j***@example.com" || fetched == "****",
        "leaked: {ran:#?}"
    );

    // A held cursor declared in a string that then fails: the server rolls the implicit
    // transaction back, cursor and all, and a function that opens a cursor of the name the
    // caller gives (as PostgreSQL's manual shows) opens it over the masked column. Its
    // FETCH is masked as of a cursor the gate does not know, not by the rolled-back query.
    pg.admin(
        "orders",
        "CREATE FUNCTION open_named(c refcursor) RETURNS refcursor LANGUAGE plpgsql AS \
           $$ BEGIN OPEN c FOR SELECT upper(email) AS x FROM users WHERE id = 1; RETURN c; END $$; \
         GRANT EXECUTE ON FUNCTION open_named(refcursor) TO orders_ro",
    );
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "DECLARE fc CURSOR WITH HOLD FOR SELECT 'harmless'::text AS x; SELECT 1/0",
            "BEGIN",
            "SELECT open_named('fc')",
            "FETCH ALL FROM fc",
            "COMMIT",
        ],
    );
    assert!(ran.stderr.contains("22012"), "{ran:#?}");
    // The FETCH's row is the line before COMMIT's tag.
    let lines: Vec<&str> = ran.stdout.lines().collect();
    let fetched = lines.len().checked_sub(2).map_or("", |at| lines[at]);
    assert!(
        !fetched.is_empty() && !fetched.contains("JANE") && !fetched.contains("harmless"),
        "the function's cursor: {ran:#?}"
    );
    // The same pipelined (every string sent before the server answered the first), and
    // with a cursor not held, which ends with its string's transaction without an error.
    for declare in [
        "DECLARE fc CURSOR WITH HOLD FOR SELECT 'harmless'::text AS x; SELECT 1/0",
        "DECLARE fc CURSOR FOR SELECT 'harmless'::text AS x; SELECT 1",
    ] {
        let r = pgclient(
            &gate,
            "read",
            &pg,
            &[
                "raw-queries",
                declare,
                "BEGIN",
                "SELECT open_named('fc')",
                "FETCH ALL FROM fc",
                "COMMIT",
            ],
        );
        let fetched = &r["results"][3];
        assert!(fetched["code"].is_null(), "{declare}: {r}");
        let v = fetched["value"].as_str().unwrap_or_default();
        assert!(
            !v.is_empty() && !v.contains("JANE") && !v.contains("harmless"),
            "{declare}: {r}"
        );
    }
    // Declared in an extended batch that fails, with a simple Query inside it that the
    // server skips too.
    // Its Sync in the same write, or held back until the error came and sent with the
    // rest.
    let r = pgclient(&gate, "read", &pg, &["raw-skipped-declare"]);
    for route in ["synced", "held_back"] {
        assert_eq!(r[route]["failed"]["code"], "22012", "{route}: {r}");
        assert!(r[route]["fetched"]["code"].is_null(), "{route}: {r}");
        let v = r[route]["fetched"]["value"].as_str().unwrap_or_default();
        assert!(
            !v.is_empty() && !v.contains("JANE") && !v.contains("harmless"),
            "{route}: {r}"
        );
    }
}

/// Hostile: the gate's idea of what a prepared statement's name holds must be the server's:
/// a PREPARE or DEALLOCATE that was parsed and never run, one the server never ran (after
/// an error) or refused (42P05), a Close it skipped, changes nothing there and so nothing
/// here. Each route runs a masked column's value under a name the client tried to make the
/// gate see as harmless; it comes back masked (or is refused), never raw.
#[test]
fn a_prepared_name_is_judged_and_masked_by_what_the_server_runs() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-stale-names", "", &body(&pg, ""));
    let r = pgclient(&gate, "read", &pg, &["raw-stale"]);
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        !r.to_string().contains("JANE@EXAMPLE.COM"),
        "a masked value leaked: {r}"
    );
    // A PREPARE of a name the server holds is refused as the server refuses it.
    assert_eq!(r["unrun"]["code"], "42P05", "{r}");
    let v = r["executed"]["value"].as_str().unwrap_or_default();
    assert!(
        v.contains('@'),
        "EXECUTE did not run the real statement: {r}"
    );
    assert_eq!(r["refused"]["code"], "42P05", "{r}");
    assert_eq!(r["skipped"]["code"], "22012", "{r}");
    assert_eq!(r["reparsed"]["code"], "42P05", "{r}");
    assert_ne!(r["rebound"]["value"], "x", "{r}");
    // The same with the names changing while Parses and Binds are pipelined behind.
    let r = pgclient(&gate, "read", &pg, &["raw-flux"]);
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        !r.to_string().contains("JANE@EXAMPLE.COM"),
        "a masked value leaked: {r}"
    );
    assert_eq!(r["a"][1]["code"], "42P05", "{r}");
    assert_eq!(
        r["a"][2]["code"], "26000",
        "a contested Bind was let through: {r}"
    );
    assert_eq!(r["b"][0]["code"], "42P05", "{r}");
    let v = r["b"][1]["value"].as_str().unwrap_or_default();
    assert!(
        v.contains('@') && v != "x",
        "pb is not the statement the server holds: {r}"
    );
    assert_eq!(r["c"]["code"], "26000", "a phantom was bound: {r}");
    let v = r["d"][1]["value"].as_str().unwrap_or_default();
    assert!(
        v.contains('@'),
        "a pipelined Bind with no name change was refused: {r}"
    );
    assert_eq!(r["e"]["code"], "42622", "{r}");
    // The Execute behind the refused Bind (skipped by the server) is recorded as of it.
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    let noted = sessions.as_array().expect("sessions").iter().any(|s| {
        let id = s["id"].as_str().unwrap_or_default();
        let detail = gate.cli(&["sessions", "show", id, "--json"]).json();
        detail["statements"].as_array().is_some_and(|st| {
            st.iter().any(|x| {
                x["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("\"pa\", not confirmed yet: refused"))
                    && x["error"].as_str().is_some_and(|e| e.contains("not run"))
            })
        })
    });
    assert!(noted, "{sessions}");
}

/// Hostile: a statement the client closed where the server skipped the Close after an
/// error stays on the server; bound and run later it would run with a record without its
/// text. The gate refuses a Bind of a statement it does not hold (26000, as the server
/// would); a DEALLOCATE the server never ran leaves the statement known on both sides; a
/// statement prepared with SQL PREPARE and bound with the protocol runs, recorded with its
/// text.
#[test]
fn a_statement_the_gate_forgot_is_not_run_unrecorded() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-diverge", "", &body(&pg, ""));
    let r = pgclient(&gate, "read", &pg, &["raw-diverge"]);
    assert_eq!(r["closed"]["code"], "22012", "{r}");
    assert_eq!(r["deallocated"]["code"], "22012", "{r}");
    assert_eq!(r["after_close"]["code"], "26000", "{r}");
    assert!(r["after_close"]["value"].is_null(), "{r}");
    // A DEALLOCATE the server never ran leaves the statement on both sides.
    assert_eq!(r["after_deallocate"]["value"], "hidden2 ran", "{r}");
    assert_eq!(r["sql_prepared"]["value"], "sql prepared", "{r}");
    // Nothing ran with an empty record.
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    let id = sessions[0]["id"].as_str().expect("a session");
    let detail = gate.cli(&["sessions", "show", id, "--json"]).json();
    let statements = detail["statements"].as_array().expect("statements");
    assert!(
        statements
            .iter()
            .all(|s| !s["text"].as_str().unwrap_or_default().is_empty()),
        "{detail}"
    );
    assert!(
        statements.iter().any(|s| s["text"]
            .as_str()
            .is_some_and(|t| t.contains("PREPARE sqlp"))
            && s["error"].is_null()),
        "{detail}"
    );
    // The Executes of the refused Binds say so, with the code the client was given.
    let refused: Vec<&Value> = statements
        .iter()
        .filter(|s| {
            s["text"]
                .as_str()
                .is_some_and(|t| t.contains("which the gate does not hold"))
        })
        .collect();
    assert_eq!(refused.len(), 1, "{detail}");
    assert!(
        refused
            .iter()
            .all(|s| s["error"].as_str().is_some_and(|e| e.contains("26000"))),
        "{detail}"
    );
}

#[test]
fn expiry_ends_a_session_mid_transaction_with_57p01() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-expiry", "", &body(&pg, ""));
    let ran = psql_script(
        &gate,
        "read:3s",
        &pg,
        "BEGIN;\nSELECT 'inside';\n\\! sleep 5\nSELECT 'too late';\n",
    );
    let out = format!("{}{}", ran.stdout, ran.stderr);
    assert!(ran.stdout.contains("inside"), "{out}");
    assert!(!ran.stdout.contains("too late"), "{out}");
    assert!(out.contains("57P01"), "{out}");
    assert!(out.contains("expired"), "{out}");
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    let s = sessions
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["outcome"] == "grant_expired")
        .unwrap_or_else(|| panic!("no expired session: {sessions}"));
    let grants = gate.cli(&["grants", "--all", "--json"]).json();
    let expires = rfc3339_ms(&grants[0]["expires_at"]);
    let ended = rfc3339_ms(&s["ended_at"]);
    assert!(
        ended - expires <= 1000,
        "session ended {}ms after expiry",
        ended - expires
    );
}

#[test]
fn an_undecided_hold_times_out_and_its_request_expires() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start(
        "pg-approval-timeout",
        "",
        &body(&pg, "approval_timeout = \"1s\""),
    );
    pg.admin("orders", "INSERT INTO scratch VALUES (1, 'a')");
    let ran = psql(&gate, Some("write"), &pg, &["DELETE FROM scratch"]);
    assert!(ran.stderr.contains("57014"), "{ran:#?}");
    assert_eq!(pg.admin("orders", "SELECT count(*) FROM scratch"), "1\n");
    // Nothing waits any more, so nothing is left to approve.
    let pending = gate.cli(&["approvals", "--json"]).json();
    assert_eq!(pending, serde_json::json!([]), "{pending}");
    let audit = gate.cli(&["audit", "--json"]).json();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "request.expired"
                && e["detail"]["why"] == "approval_timeout passed"),
        "{audit}"
    );
}

#[test]
fn expiry_cancels_the_statement_in_flight() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-expiry-running", "", &body(&pg, ""));
    // The grant ends 3 s into a 6 s INSERT: the session ends, and the INSERT must not commit
    // after it (closing the connection alone would let it run to its end).
    let ran = psql(
        &gate,
        Some("write:3s"),
        &pg,
        &["INSERT INTO scratch SELECT 99, 'late' FROM pg_sleep(6)"],
    );
    assert!(ran.stderr.contains("57P01"), "{ran:#?}");
    let running =
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'INSERT INTO scratch SELECT 99%'";
    gate.wait_for(
        "the cancelled INSERT to end",
        Duration::from_secs(15),
        || (pg.admin("orders", running) == "0\n").then_some(()),
    );
    assert_eq!(
        pg.admin("orders", "SELECT count(*) FROM scratch WHERE id = 99"),
        "0\n"
    );
    assert!(gate.log().contains("cancelled"), "{}", gate.log());
}

/// A workload that sends a statement and never reads its result (a real driver, libpq in
/// psycopg2's async mode, never polled): the socket buffers fill, the gate's write to it
/// blocks, and the server's backend waits on its own write. The grant's end still ends it:
/// the session is cut, the backend goes, and the record says why.
#[test]
fn a_workload_that_stops_reading_loses_the_session_when_its_grant_ends() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-unread", "", &body(&pg, ""));
    let script = r#"
import select, sys, time
import psycopg2, psycopg2.extensions as ext
conn = psycopg2.connect(sys.argv[1], async_=1)
while True:
    state = conn.poll()
    if state == ext.POLL_OK:
        break
    if state == ext.POLL_READ:
        select.select([conn.fileno()], [], [])
    else:
        select.select([], [conn.fileno()], [])
conn.cursor().execute("SELECT repeat('u', 1000) AS unread, generate_series(1, 50000000) AS n")
print("sent", flush=True)
time.sleep(120)
"#;
    let u = url(&pg, "orders");
    let mut workload = gate.spawn(
        "bot",
        &["--grant", "orders-db:read:4s"],
        &["/usr/bin/python3", "-c", script, &u],
    );
    workload.expect_line("sent", Duration::from_secs(20));
    let running = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT repeat(''u''%'";
    // The statement streams its rows (a set-returning function in the select list: in FROM
    // it would be materialized first) until its backend blocks writing, while the grant
    // stands...
    let blocked = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT repeat(''u''%' AND wait_event = 'ClientWrite'";
    gate.wait_for(
        "the statement's backend to block writing",
        Duration::from_secs(10),
        || (pg.admin("orders", blocked) == "1\n").then_some(()),
    );
    // ...and its backend is gone once the grant ends, the workload still not reading.
    gate.wait_for(
        "the unread statement's backend to end",
        Duration::from_secs(20),
        || (pg.admin("orders", running) == "0\n").then_some(()),
    );
    // The session's end is recorded as the gate cuts it, which may be just after the
    // backend went (the cancel goes first).
    let cut = gate.wait_for(
        "a session ended by the grant's expiry",
        Duration::from_secs(15),
        || {
            let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
            sessions
                .as_array()?
                .iter()
                .find(|s| s["outcome"] == "grant_expired")
                .cloned()
        },
    );
    assert!(
        cut["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not reading")),
        "{cut:#}"
    );
    drop(workload);
}

#[test]
fn an_idle_sessions_statements_are_recorded_while_it_stays_open() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-idle-record", "", &body(&pg, ""));
    let u = url(&pg, "orders");
    let mut child = gate.spawn_stdin(
        "bot",
        &["--grant", "orders-db:read"],
        &["psql", &u, "-X", "-At"],
    );
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"SELECT 'recorded while open';\n").unwrap();
    stdin.flush().unwrap();
    // psql keeps the session open, idle, for as long as its stdin is.
    let recorded = |gate: &Gate| -> bool {
        let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
        sessions.as_array().unwrap().iter().any(|s| {
            s["ended_at"].is_null() && {
                let id = s["id"].as_str().unwrap();
                let detail = gate.cli(&["sessions", "show", id, "--json"]).json();
                detail["statements"].as_array().is_some_and(|st| {
                    st.iter().any(|x| {
                        x["text"]
                            .as_str()
                            .is_some_and(|t| t.contains("recorded while open"))
                    })
                })
            }
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = false;
    while !seen && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        seen = recorded(&gate);
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("recorded while open"),
        "{out:?}"
    );
    assert!(
        seen,
        "the statement of an open, idle session never reached the session record"
    );
}

#[test]
fn sessions_are_recorded_statement_by_statement() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-record", "", &body(&pg, ""));
    let r = pgclient(
        &gate,
        "write",
        &pg,
        &[
            "execute",
            "INSERT INTO scratch (v) VALUES ($1)",
            "contact jane@example.com card 4111111111111111",
        ],
    );
    assert_eq!(r["ok"], true, "{r}");
    psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "SELECT email FROM users WHERE id = 1",
            // Many rows, masked in runs: every one counts.
            "SELECT email FROM users, generate_series(1, 3000) AS g WHERE id = 1",
            "DELETE FROM users WHERE id = 1",
        ],
    );
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    let find = |resource_stmt: &str| -> Value {
        for s in sessions.as_array().unwrap() {
            let id = s["id"].as_str().unwrap();
            let detail = gate.cli(&["sessions", "show", id, "--json"]).json();
            if detail["statements"].as_array().is_some_and(|st| {
                st.iter()
                    .any(|x| x["text"].as_str().unwrap_or("").contains(resource_stmt))
            }) {
                return detail;
            }
        }
        panic!("no session ran {resource_stmt}");
    };
    let insert = find("INSERT INTO scratch");
    let st = insert["statements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["text"].as_str().unwrap().contains("INSERT"))
        .unwrap()
        .clone();
    assert_eq!(st["decision"], "allowed");
    assert_eq!(st["tag"], "INSERT 0 1");
    let param = st["params"][0].as_str().unwrap();
    assert!(
        !param.contains("4111111111111111"),
        "card number recorded: {param}"
    );
    assert!(param.contains("card ****"), "{param}");
    assert_eq!(insert["session"]["database"], "orders");
    assert_eq!(insert["session"]["access"], "write");

    let read = find("DELETE FROM users");
    let statements = read["statements"].as_array().unwrap();
    let select = statements
        .iter()
        .find(|x| x["text"].as_str().unwrap().starts_with("SELECT"))
        .unwrap();
    assert_eq!(select["rows"], 1);
    assert_eq!(select["masked"], 1);
    let many = statements
        .iter()
        .find(|x| x["text"].as_str().unwrap().contains("generate_series"))
        .unwrap();
    assert_eq!(many["rows"], 3000, "{many}");
    assert_eq!(many["masked"], 3000, "{many}");
    let delete = statements
        .iter()
        .find(|x| x["text"].as_str().unwrap().starts_with("DELETE"))
        .unwrap();
    assert_eq!(delete["decision"], "denied");
    assert!(
        delete["rule"].as_str().unwrap().contains("write"),
        "{delete}"
    );
    // The human timeline names each decision.
    let text = gate.cli(&["sessions", "show", read["session"]["id"].as_str().unwrap()]);
    assert!(
        text.stdout.contains("denied") && text.stdout.contains("rule: access"),
        "{text:#?}"
    );
}

#[test]
fn scram_md5_and_verified_tls_upstream() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(true);
    let ca = pg.ca.clone().unwrap();
    let tls = format!(
        "upstream_tls = \"verify-full\"\nupstream_ca = \"{}\"\nupstream_server_name = \"db.test\"",
        ca.display()
    );
    let gate = Gate::start("pg-tls", "", &body(&pg, &tls));
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            "SELECT current_user",
        ],
    );
    assert_eq!(ran.stdout, "t\norders_ro\n", "{ran:#?}");
    drop(gate);

    // A CA that did not sign the server's certificate: refused, and said so.
    let wrong = format!(
        "upstream_tls = \"verify-full\"\nupstream_ca = \"{}\"\nupstream_server_name = \"db.test\"",
        std::path::Path::new("/etc/ssl/certs/ca-certificates.crt").display()
    );
    let gate = Gate::start("pg-tls-wrong", "", &body(&pg, &wrong));
    let ran = psql(&gate, Some("read"), &pg, &["SELECT 1"]);
    assert!(
        ran.stderr.contains("cannot reach") && ran.stderr.contains("TLS"),
        "{ran:#?}"
    );
    drop(gate);

    // md5 logins work too (and SCRAM was what all the others used).
    let md5 = body(&pg, "upstream_tls = \"require\"").replace("orders_ro", "orders_md5");
    let gate = Gate::start("pg-md5", "", &md5);
    let ran = psql(&gate, Some("read"), &pg, &["SELECT current_user"]);
    assert_eq!(ran.stdout.trim(), "orders_md5", "{ran:#?}");
    drop(gate);

    // ... but not to a server the workload picked out of an address range without a verified
    // certificate: whoever answers there could replay the md5 or read a cleartext password.
    let range = md5.replace(
        &format!("address = \"127.0.0.1:{}\"", pg.port),
        &format!("address = \"127.0.0.0/8:{}\"", pg.port),
    );
    assert_ne!(range, md5);
    let gate = Gate::start("pg-md5-range", "", &range);
    let ran = psql(&gate, Some("read"), &pg, &["SELECT current_user"]);
    assert!(
        ran.code != 0 && ran.stderr.contains("refused jitgate's login"),
        "{ran:#?}"
    );
    assert!(gate.log().contains("get no password"), "{}", gate.log());
}

#[test]
fn client_tls_with_the_host_local_ca() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-client-tls", "", &body(&pg, "client_tls = \"enable\""));
    for mode in ["require", "verify-full"] {
        let u = format!("postgres://x@127.0.0.1:{}/orders?sslmode={mode}", pg.port);
        let ran = gate.run(
            "bot",
            &["--grant", "orders-db:read"],
            &[
                "psql",
                &u,
                "-X",
                "-At",
                "-c",
                "SELECT email FROM users WHERE id = 1",
            ],
        );
        assert_eq!(
            ran.stdout.trim(),
            "j***@example.com",
            "sslmode={mode}: {ran:#?}"
        );
    }
}

#[test]
fn every_detector_and_strategy_masks() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    pg.admin(
        "orders",
        "CREATE TABLE vault (id int, owner text, secret text, note text);
         INSERT INTO vault VALUES
           (1, 'alice', 's3cr3t', 'card 4111 1111 1111 1111'),
           (2, 'alice', 's3cr3t', 'call +1 415 555 0100'),
           (3, 'bob', 's3cr3t', 'ssn 123-45-6789'),
           (4, 'bob', 's3cr3t', 'iban GB82 WEST 1234 5698 7654 32'),
           (5, 'carol', 's3cr3t', 'key AKIAIOSFODNN7EXAMPLE'),
           (6, 'carol', 's3cr3t', 'token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl'),
           (7, 'dave', 's3cr3t', E'-----BEGIN PRIVATE KEY-----\\nMIIBVQIBADANBg\\n-----END PRIVATE KEY-----'),
           (8, 'dave', 's3cr3t', 'Authorization: Bearer abcdef0123456789'),
           (9, 'erin', 's3cr3t', 'mail bob@example.com'),
           (10, 'erin', 's3cr3t', 'not a card 4111 1111 1111 1112, order 42 shipped');
         GRANT SELECT ON vault TO orders_ro;",
    );
    let masks = r#"[[resource.mask]]
columns = ["vault.owner"]
strategy = "hash"
[[resource.mask]]
columns = ["*.secret"]
strategy = "null"
[[resource.mask]]
detectors = ["card", "phone"]
strategy = "partial"
[[resource.mask]]
detectors = ["ssn", "iban", "aws_key", "jwt", "private_key", "bearer", "email"]
strategy = "redact"
"#;
    let config = body(&pg, "").replace(
        "[[resource.mask]]\ncolumns = [\"*.email\"]\nstrategy = \"partial\"\n[[resource.mask]]\ndetectors = [\"card\", \"ssn\", \"aws_key\", \"jwt\", \"private_key\"]\nstrategy = \"redact\"\n",
        masks,
    );
    assert!(config.contains("vault.owner"), "mask rules replaced");
    let gate = Gate::start("pg-detectors", "", &config);
    let query = "SELECT id, owner, coalesce(secret, '<null>'), note FROM vault ORDER BY id";
    let ran = psql(&gate, Some("read"), &pg, &[query]);
    assert_eq!(ran.code, 0, "{ran:#?}");
    let rows: Vec<Vec<String>> = ran
        .stdout
        .split("\n")
        .filter(|l| !l.is_empty())
        .map(|l| l.split('|').map(str::to_owned).collect())
        .collect();
    assert_eq!(rows.len(), 10, "{ran:#?}");
    let note = |id: usize| rows[id - 1][3].as_str();
    assert_eq!(note(1), "card **** **** **** 1111");
    assert_eq!(note(2), "call +* *** *** **00");
    assert_eq!(note(3), "ssn ****");
    assert_eq!(note(4), "iban ****");
    assert_eq!(note(5), "key ****");
    assert_eq!(note(6), "token ****");
    assert_eq!(note(8), "Authorization: ****");
    assert_eq!(note(9), "mail ****");
    assert!(
        !ran.stdout.contains("PRIVATE KEY") && !ran.stdout.contains("MIIBVQ"),
        "{ran:#?}"
    );
    // A Luhn-invalid number is not a card; ordinary text passes untouched.
    assert_eq!(note(10), "not a card 4111 1111 1111 1112, order 42 shipped");
    // `null`: a real SQL NULL (the coalesce() above, computed from the column, is masked the
    // same way, so psql printed nothing for it).
    assert!(rows.iter().all(|r| r[2].is_empty()), "{ran:#?}");
    let r = pgclient(
        &gate,
        "read",
        &pg,
        &[
            "extended",
            "SELECT id, secret FROM vault WHERE id = $1",
            "1",
        ],
    );
    assert_eq!(r["rows"], serde_json::json!([[1, null]]), "{r}");
    // `hash`: stable pseudonyms, equal for equal values, never the value itself.
    let owners: Vec<&str> = rows.iter().map(|r| r[1].as_str()).collect();
    assert!(owners.iter().all(|o| o.starts_with("h:")), "{owners:?}");
    assert_eq!(owners[0], owners[1]);
    assert_ne!(owners[0], owners[2]);
    let again = psql(
        &gate,
        Some("read"),
        &pg,
        &["SELECT owner FROM vault WHERE id = 1"],
    );
    assert_eq!(
        again.stdout.trim(),
        owners[0],
        "pseudonyms differ across sessions"
    );
    // json and jsonb stay JSON a driver can parse: a detector's mask inside a string is
    // sent in place; a card number that is a JSON number cannot be masked in place, so the
    // value is withheld (NULL, with the NOTICE typed columns get); a column rule's mask is
    // a JSON string.
    let json = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "SELECT jsonb_build_object('note', note) FROM vault WHERE id = 1",
            "SELECT '{\"card\": 4111111111111111}'::json",
            "SELECT to_jsonb(owner) FROM vault WHERE id = 1",
        ],
    );
    assert_eq!(json.code, 0, "{json:#?}");
    let lines: Vec<&str> = json.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{json:#?}");
    assert_eq!(
        lines[0], r#"{"note": "card **** **** **** 1111"}"#,
        "{json:#?}"
    );
    assert_eq!(lines[1], "", "{json:#?}");
    assert!(
        json.stderr.contains("returned as NULL"),
        "no notice for the withheld value: {json:#?}"
    );
    assert!(
        serde_json::from_str::<serde_json::Value>(lines[2])
            .is_ok_and(|v| v.as_str().is_some_and(|s| s.starts_with("h:"))),
        "{json:#?}"
    );
    assert!(!json.stdout.contains("4111111111111111"), "{json:#?}");
}

#[test]
fn psql_cancel_by_ctrl_c_and_no_other_session_seen_or_signalled() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-cancel", "", &body(&pg, ""));
    let u = url(&pg, "orders");
    let sleeping = |pg: &Postgres| {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            let n = pg.admin(
                "orders",
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'",
            );
            if n.trim() == "1" {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the query never started");
    };

    // Ctrl-C: psql sends a CancelRequest with the key the gate issued; the server cancels.
    let mut w = gate.spawn(
        "bot",
        &["--grant", "orders-db:read"],
        &["psql", &u, "-X", "-At", "-c", "SELECT pg_sleep(60)"],
    );
    sleeping(&pg);
    // `jitgate run` execs the command: the workload's pid is psql's.
    // SAFETY: signalling the workload this test started.
    unsafe { libc::kill(w.pid() as i32, libc::SIGINT) };
    w.expect_line(
        "canceling statement due to user request",
        Duration::from_secs(10),
    );
    w.wait(Duration::from_secs(10));

    // Another gated session (same upstream role) can neither read the sleeping session's
    // statement nor signal its backend, under any grant.
    let mut w = gate.spawn(
        "bot",
        &["--grant", "orders-db:read"],
        &["psql", &u, "-X", "-At", "-c", "SELECT pg_sleep(60)"],
    );
    sleeping(&pg);
    let pid = pg.admin(
        "orders",
        "SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
    );
    let pid = pid.trim();
    let attempts = [
        ("read", "SELECT query FROM pg_stat_activity".to_owned()),
        ("read", "SELECT * FROM pg_catalog.pg_stat_activity".to_owned()),
        (
            "read",
            "SELECT pg_stat_get_backend_activity(s) FROM pg_stat_get_backend_idset() s".to_owned(),
        ),
        ("read", "SELECT (pg_stat_get_activity(NULL)).query".to_owned()),
        (
            "read",
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
                .to_owned(),
        ),
        ("read", format!("SELECT pg_cancel_backend({pid})")),
        ("write", format!("SELECT pg_terminate_backend({pid})")),
        ("admin", format!("SELECT pg_catalog.pg_cancel_backend({pid})")),
        (
            "admin",
            "SELECT query FROM pg_stat_activity WHERE pid <> pg_backend_pid()".to_owned(),
        ),
    ];
    for (grant, sql) in &attempts {
        let ran = psql(&gate, Some(grant), &pg, &[sql]);
        assert!(
            ran.stderr.contains(": jitgate: ") && !ran.stdout.contains("pg_sleep"),
            "{grant}: {sql}: {ran:#?}"
        );
    }
    assert_eq!(
        pg.admin(
            "orders",
            "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'"
        ),
        "1\n",
        "another session's statement was cancelled"
    );
    // SAFETY: signalling the workload this test started.
    unsafe { libc::kill(w.pid() as i32, libc::SIGINT) };
    w.expect_line(
        "canceling statement due to user request",
        Duration::from_secs(10),
    );
    w.wait(Duration::from_secs(10));
}

#[test]
fn fastpath_unknown_messages_and_oversized_frames_are_refused() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-raw", "", &body(&pg, ""));
    let client = gate.bins().pgclient.display().to_string();
    let u = url(&pg, "orders");
    let ran = gate.run("bot", &["--grant", "orders-db:read"], &[&client, "raw", &u]);
    let r: Value =
        serde_json::from_str(ran.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {ran:#?}"));
    assert_eq!(r["ok"], true, "{r}");
    // GSSAPI encryption is declined; the client goes on in the clear (loopback hop).
    assert_eq!(r["gssenc"], "N", "{r}");
    assert_eq!(r["login_ready"], true, "{r}");
    // The fastpath FunctionCall is refused and the session stays usable.
    assert_eq!(r["fastpath"], "0A000", "{r}");
    assert_eq!(r["after"], "still usable", "{r}");
    assert_eq!(r["after_error"], Value::Null, "{r}");
    // An unknown message type ends the session: the gate does not guess.
    assert_eq!(r["unknown"], "08P01", "{r}");
    assert_eq!(r["unknown_left_open"], false, "{r}");
    // A frame over its type's cap ends the session with an error, before it is read.
    assert_eq!(r["oversize"], "54000", "{r}");
    assert_eq!(r["oversize_left_open"], false, "{r}");
    // A startup parameter given twice is refused (the server would honour the last one).
    assert_eq!(r["duplicate_param"], "08P01", "{r}");
}

#[test]
fn column_rules_follow_values_through_aliases_and_expressions() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-derived", "", &body(&pg, ""));
    let leaked = |out: &str| out.to_ascii_lowercase().contains("jane@example.com");
    // Views made outside the gate that rename the masked column, or read it whole-row.
    pg.admin(
        "orders",
        "CREATE VIEW contacts AS SELECT id, email AS contact FROM users; \
         CREATE VIEW contacts2 AS SELECT id AS n, contact AS c FROM contacts; \
         CREATE VIEW as_json AS SELECT id, to_jsonb(u) AS j FROM users u; \
         CREATE MATERIALIZED VIEW frozen AS SELECT id, email AS e FROM users; \
         GRANT SELECT ON contacts, contacts2, as_json, frozen TO orders_ro",
    );
    // Functions made outside the gate that return the masked column.
    pg.admin(
        "orders",
        "CREATE FUNCTION get_email(int) RETURNS text LANGUAGE sql AS 'SELECT email FROM users WHERE id = $1'; \
         CREATE FUNCTION wrap_email(int) RETURNS text LANGUAGE sql AS 'SELECT get_email($1)'; \
         CREATE FUNCTION pl_email(i int) RETURNS text LANGUAGE plpgsql AS \
           $$ BEGIN RETURN (SELECT email FROM users WHERE id = i); END $$; \
         CREATE FUNCTION dyn_email(t text) RETURNS text LANGUAGE plpgsql AS \
           $$ DECLARE r text; BEGIN EXECUTE 'SELECT email FROM ' || t || ' LIMIT 1' INTO r; RETURN r; END $$; \
         CREATE FUNCTION all_users() RETURNS SETOF users LANGUAGE sql AS 'SELECT * FROM users'",
    );
    // Every way to get users.email out without naming it as a plain column.
    for sql in [
        "SELECT email AS contact FROM users WHERE id = 1",
        "SELECT * FROM users u(a, b, c) WHERE a = 1",
        "SELECT lower(email) FROM users WHERE id = 1",
        "SELECT email || '' FROM users WHERE id = 1",
        "SELECT row_to_json(u) FROM users u WHERE id = 1",
        "SELECT u FROM users u WHERE id = 1",
        "SELECT (u).email FROM users u WHERE id = 1",
        "SELECT 'x' UNION ALL SELECT email FROM users WHERE id = 1",
        "SELECT 0, '', '', '', '', '' UNION ALL SELECT * FROM users WHERE id = 1",
        "SELECT x FROM (SELECT email AS x FROM users) s WHERE x LIKE 'jane%'",
        "WITH c AS (SELECT upper(email) AS e FROM users) SELECT e FROM c",
        "SELECT string_agg(email, ',') FROM users",
        "SELECT * FROM users a FULL JOIN users b USING (email) WHERE a.id = 1",
        "COPY (SELECT lower(email) FROM users) TO STDOUT",
        // Renamed by an alias column list, a function in FROM, VALUES, a CTE column list.
        "SELECT upper(e) FROM users AS u(i, n, e, d) WHERE i = 1",
        "SELECT value FROM users, jsonb_each_text(to_jsonb(users)) WHERE key = 'email' AND id = 1",
        "SELECT value FROM users u, jsonb_each_text(to_jsonb(u)) WHERE key = 'email' AND id = 1",
        "SELECT v FROM users, LATERAL (VALUES (email || '')) s(v) WHERE id = 1",
        "SELECT column1 FROM users, LATERAL (VALUES (lower(email))) s WHERE id = 1",
        "WITH c(x) AS (SELECT email FROM users WHERE id = 1) SELECT x || '' FROM c",
        "SELECT r.email || '' FROM users u, json_to_record(row_to_json(u)) AS r(email text) WHERE id = 1",
        "SELECT * FROM users u, LATERAL (SELECT upper(u.email)) s(x) WHERE id = 1",
        "COPY (SELECT v FROM users, LATERAL (VALUES (email || '')) s(v)) TO STDOUT",
        // Through views.
        "SELECT contact FROM contacts WHERE id = 1",
        "SELECT * FROM contacts2 WHERE n = 1",
        "SELECT j FROM as_json WHERE id = 1",
        "SELECT j ->> 'email' FROM as_json WHERE id = 1",
        "SELECT e FROM frozen WHERE id = 1",
        "COPY (SELECT c FROM contacts2) TO STDOUT",
        // Through functions.
        "SELECT get_email(1)",
        "SELECT upper(wrap_email(1))",
        "SELECT pl_email(1)",
        "SELECT e FROM all_users() AS f(i, n, e, c, s, o) WHERE i = 1",
    ] {
        let ran = psql(&gate, Some("read"), &pg, &[sql]);
        assert_eq!(ran.code, 0, "{sql}: {ran:#?}");
        assert!(!leaked(&ran.stdout), "{sql} leaked: {ran:#?}");
    }
    // SQL built at run time can read anything, and close a cursor by name (`EXECUTE 'CLOSE '
    // || $1` does): not run while masking applies.
    let ran = psql(&gate, Some("read"), &pg, &["SELECT dyn_email('users')"]);
    assert!(
        ran.stderr.contains("42501") && ran.stderr.contains("close a cursor"),
        "{ran:#?}"
    );
    assert!(!leaked(&ran.stdout), "{ran:#?}");
    // Prepared statements and cursors carry their statement's references.
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "PREPARE p AS SELECT lower(email) FROM users WHERE id = 1",
            "EXECUTE p",
        ],
    );
    assert!(ran.stdout.contains("j***@example.com"), "{ran:#?}");
    // A quoted name is another statement: preparing "M" leaves m's references in place.
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "PREPARE m AS SELECT lower(email) FROM users WHERE id = 1",
            "PREPARE \"M\" AS SELECT 1",
            "EXECUTE m",
        ],
    );
    assert!(ran.stdout.contains("j***@example.com"), "{ran:#?}");
    assert!(!leaked(&ran.stdout), "{ran:#?}");
    // Preparing a name in use fails on the server and in the gate alike: EXECUTE still runs,
    // and is masked as, the first statement.
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "PREPARE q AS SELECT lower(email) FROM users WHERE id = 1",
            "PREPARE q AS SELECT 1",
            "EXECUTE q",
        ],
    );
    assert!(ran.stderr.contains("42P05"), "{ran:#?}");
    assert!(ran.stdout.contains("j***@example.com"), "{ran:#?}");
    assert!(!leaked(&ran.stdout), "{ran:#?}");
    let ran = psql_script(
        &gate,
        "read",
        &pg,
        "BEGIN;\nDECLARE c CURSOR FOR SELECT lower(email) FROM users ORDER BY id;\nFETCH 1 FROM c;\nCOMMIT;\n",
    );
    assert!(ran.stdout.contains("j***@example.com"), "{ran:#?}");
    let r = pgclient(
        &gate,
        "read",
        &pg,
        &[
            "extended",
            "SELECT lower(email) AS e FROM users WHERE id = $1",
            "1",
        ],
    );
    assert_eq!(r["rows"], serde_json::json!([["j***@example.com"]]), "{r}");
    // Computed values that do not come from masked columns pass untouched.
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "SELECT count(*), max(id) FROM users",
            "SELECT id, upper(name) FROM users WHERE id = 1",
            "SELECT count(*) FROM users WHERE email LIKE 'jane%'",
        ],
    );
    assert_eq!(ran.stdout, "3|3\n1|JANE\n1\n", "{ran:#?}");
}

#[test]
fn masked_values_do_not_leave_by_side_channels() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    // A delimiter inside a value before the masked column: the COPY parser must not shift.
    pg.admin(
        "orders",
        "INSERT INTO users VALUES (4, E'Tab\\tName', 'tab@example.com', 'none', 'none', 'x')",
    );
    let gate = Gate::start("pg-side", "", &body(&pg, ""));
    let leaked = |s: &str| s.contains("jane@example.com") || s.contains("tab@example.com");

    // Error messages echo values; with column rules in force they are withheld.
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &["SELECT email::int FROM users WHERE id = 1"],
    );
    assert!(ran.stderr.contains("22P02"), "{ran:#?}");
    assert!(!leaked(&ran.stderr), "{ran:#?}");
    // Every lookup that names its argument in the error, in the middle of the message too.
    for sql in [
        "SELECT email::regclass FROM users WHERE id = 1",
        "SELECT email::regrole FROM users WHERE id = 1",
        "SELECT email::regnamespace FROM users WHERE id = 1",
        "SELECT email::regproc FROM users WHERE id = 1",
        "SELECT email::regtype FROM users WHERE id = 1",
        "SELECT current_setting(email) FROM users WHERE id = 1",
        "SELECT has_table_privilege(email, 'users', 'select') FROM users WHERE id = 1",
        "SELECT to_date(email, 'YYYY') FROM users WHERE id = 1",
        "SELECT email::json FROM users WHERE id = 1",
        "SELECT upper(e)::int FROM users AS u(i, n, e) WHERE i = 1",
    ] {
        let ran = psql(&gate, Some("read"), &pg, &[sql]);
        assert_ne!(ran.code, 0, "{sql}: {ran:#?}");
        assert!(
            !ran.stderr.to_ascii_lowercase().contains("jane"),
            "{sql} echoed the value: {ran:#?}"
        );
    }
    // Binary results (tokio-postgres asks for binary): text inside arrays, records, bytea,
    // tsvector; bytea in text (hex) too.
    for sql in [
        "SELECT array_agg(card) FROM users WHERE id = $1",
        "SELECT row(name, card) FROM users WHERE id = $1",
        "SELECT convert_to(card, 'UTF8') FROM users WHERE id = $1",
        "SELECT array_agg(email) FROM users WHERE id = $1",
        "SELECT row(email, card) FROM users WHERE id = $1",
        "SELECT to_tsvector(email) FROM users WHERE id = $1",
        "SELECT convert_to(email, 'UTF8') FROM users WHERE id = $1",
    ] {
        let r = pgclient(&gate, "read", &pg, &["extended", sql, "1"]);
        let text = r.to_string();
        assert_eq!(r["ok"], true, "{sql}: {r}");
        assert!(
            !text.contains("4111") && !text.contains("jane"),
            "{sql} leaked in binary: {r}"
        );
    }
    for sql in [
        "SELECT convert_to(card, 'UTF8') FROM users WHERE id = 1",
        "SELECT convert_to(email, 'UTF8') FROM users WHERE id = 1",
    ] {
        let ran = psql(&gate, Some("read"), &pg, &[sql]);
        assert!(
            !ran.stdout.contains("34313131") && !ran.stdout.contains("6a616e65"),
            "{sql}: {ran:#?}"
        );
    }

    // What the client wrote itself is still named.
    let ran = psql(&gate, Some("read"), &pg, &["SELECT nosuchcol FROM users"]);
    assert!(ran.stderr.contains("\"nosuchcol\""), "{ran:#?}");

    // Channels that carry values around result rows are refused while masking applies.
    for sql in [
        "SELECT pg_notify('c', email) FROM users WHERE id = 1",
        "SELECT set_config('my.x', email, false) FROM users WHERE id = 1",
        "DO $$BEGIN RAISE NOTICE '%', (SELECT email FROM users WHERE id = 1); END$$",
    ] {
        let ran = psql(&gate, Some("read"), &pg, &[sql]);
        assert_ne!(ran.code, 0, "{sql}: {ran:#?}");
        assert!(
            ran.stderr.contains("42501") && ran.stderr.contains("masking"),
            "{sql}: {ran:#?}"
        );
        assert!(!leaked(&ran.stderr) && !leaked(&ran.stdout), "{ran:#?}");
    }
    // A function body that fetches from or closes a cursor by name can read a cursor the
    // session declared (its rows come back as the function's values) or close it for other
    // code to open another query under its name: defined through the gate while masking
    // applies, refused; defined outside it (here by the database's owner), its values are
    // masked whole.
    for body in [
        "DECLARE r record; BEGIN FETCH c INTO r; RETURN r.x; END",
        "BEGIN CLOSE c; OPEN c FOR SELECT lower(email) AS x FROM users WHERE id = 1; RETURN 'swapped'; END",
    ] {
        let ran = psql(
            &gate,
            Some("admin"),
            &pg,
            &[&format!(
                "CREATE FUNCTION cursor_trick(c refcursor) RETURNS text LANGUAGE plpgsql AS $b${body}$b$"
            )],
        );
        assert!(
            ran.stderr.contains("42501") && ran.stderr.contains("cursor by name"),
            "{body}: {ran:#?}"
        );
    }
    pg.admin(
        "orders",
        "CREATE FUNCTION peek(refcursor) RETURNS text LANGUAGE plpgsql AS \
           $$ DECLARE c refcursor := $1; r record; BEGIN FETCH c INTO r; RETURN r.x; END $$; \
         GRANT EXECUTE ON FUNCTION peek(refcursor) TO orders_ro",
    );
    // Under a name of capitals too (the gate folds names; the catalog keeps them).
    pg.admin(
        "orders",
        "CREATE FUNCTION \"PeekCase\"(refcursor) RETURNS text LANGUAGE plpgsql AS \
           $$ DECLARE c refcursor := $1; r record; BEGIN FETCH c INTO r; RETURN r.x; END $$",
    );
    for call in ["peek('pc')", "\"PeekCase\"('pc')"] {
        let ran = psql(
            &gate,
            Some("read"),
            &pg,
            &[
                "BEGIN",
                "DECLARE pc CURSOR FOR SELECT email AS x FROM users WHERE id = 1",
                &format!("SELECT 'peeked:' || {call}"),
                "COMMIT",
            ],
        );
        assert_eq!(ran.code, 0, "{call}: {ran:#?}");
        let peeked = ran
            .stdout
            .lines()
            .find(|l| l.contains("peeked") || l.contains('*'));
        assert!(peeked.is_some(), "{call}: {ran:#?}");
        assert!(!leaked(&ran.stdout), "{call}: {ran:#?}");
    }
    // One that closes a cursor by name and opens another query under it: called directly
    // or through another function, refused while masking applies (the cursor's rows would
    // be masked as what the session declared).
    pg.admin(
        "orders",
        "CREATE FUNCTION reopen(refcursor) RETURNS text LANGUAGE plpgsql AS \
           $$ DECLARE c refcursor := $1; BEGIN CLOSE c; \
              OPEN c FOR SELECT lower(email) AS x FROM users WHERE id = 1; RETURN 'reopened'; END $$; \
         CREATE FUNCTION via_reopen(refcursor) RETURNS text LANGUAGE sql AS 'SELECT reopen($1)'; \
         CREATE FUNCTION \"SwapCase\"(refcursor) RETURNS text LANGUAGE sql AS 'SELECT reopen($1)'; \
         CREATE FUNCTION std_reopen(c refcursor) RETURNS text LANGUAGE sql RETURN reopen(c); \
         CREATE OPERATOR %%% (RIGHTARG = refcursor, FUNCTION = reopen); \
         CREATE FUNCTION via_op(refcursor) RETURNS text LANGUAGE sql AS 'SELECT %%% $1'; \
         CREATE OPERATOR ~~~ (LEFTARG = tsquery, RIGHTARG = text, FUNCTION = ts_rewrite); \
         CREATE PROCEDURE swap_proc(refcursor) LANGUAGE plpgsql AS \
           $$ DECLARE c refcursor := $1; BEGIN CLOSE c; \
              OPEN c FOR SELECT lower(email) AS x FROM users WHERE id = 1; END $$; \
         GRANT EXECUTE ON FUNCTION reopen(refcursor), via_reopen(refcursor) TO orders_ro",
    );
    for (access, call) in [
        ("read", "SELECT reopen('rc')"),
        ("read", "SELECT length(via_reopen('rc'))"),
        ("read", "SELECT \"SwapCase\"('rc')"),
        ("read", "SELECT std_reopen('rc')"),
        ("read", "SELECT %%% 'rc'::refcursor"),
        ("read", "SELECT via_op('rc')"),
        (
            "read",
            "SELECT 'a'::tsquery ~~~ 'select ''a''::tsquery, to_tsquery(email) from users'",
        ),
        ("write", "CALL swap_proc('rc')"),
    ] {
        let ran = psql(
            &gate,
            Some(access),
            &pg,
            &[
                "BEGIN",
                "DECLARE rc CURSOR FOR SELECT 'harmless'::text AS x",
                call,
                "FETCH ALL FROM rc",
                "COMMIT",
            ],
        );
        assert!(
            ran.stderr.contains("42501") && ran.stderr.contains("close a cursor"),
            "{call}: {ran:#?}"
        );
        assert!(!leaked(&ran.stdout), "{call}: {ran:#?}");
    }

    // A function the session defines itself is masked by what its body reads, before the
    // catalog connection can see it (inside the transaction) and after the name was looked
    // up while no function had it.
    for steps in [
        [
            "BEGIN",
            "CREATE FUNCTION own_email() RETURNS text LANGUAGE sql AS 'SELECT email FROM users WHERE id = 1'",
            "SELECT 'own:' || own_email()",
            "ROLLBACK",
        ],
        [
            "SELECT 'own:' || own_email()",
            "CREATE FUNCTION own_email() RETURNS text LANGUAGE sql AS 'SELECT email FROM users WHERE id = 1'",
            "SELECT 'own:' || own_email()",
            "DROP FUNCTION own_email()",
        ],
    ] {
        let ran = psql(&gate, Some("admin"), &pg, &steps);
        assert!(ran.stdout.contains("CREATE FUNCTION"), "{ran:#?}");
        assert!(!leaked(&ran.stdout), "{steps:?}: {ran:#?}");
        assert!(
            ran.stdout
                .lines()
                .any(|l| l.contains('*') || l.contains("own:")),
            "{ran:#?}"
        );
    }
    // A SQL-standard body (kept parsed, with no source text) is read from its definition.
    pg.admin(
        "orders",
        "CREATE FUNCTION std_email(i int) RETURNS text LANGUAGE sql \
           RETURN (SELECT email FROM users WHERE id = i)",
    );
    let ran = psql(&gate, Some("read"), &pg, &["SELECT 'std:' || std_email(1)"]);
    assert_eq!(ran.code, 0, "{ran:#?}");
    assert!(
        !ran.stdout.trim().is_empty() && !leaked(&ran.stdout),
        "{ran:#?}"
    );
    // An operator created outside the gate calls a function the statement does not name:
    // what it computes is masked whole.
    pg.admin(
        "orders",
        "CREATE FUNCTION op_email(int) RETURNS text LANGUAGE sql AS 'SELECT email FROM users WHERE id = $1'; \
         CREATE OPERATOR ### (RIGHTARG = int, FUNCTION = op_email)",
    );
    let ran = psql(&gate, Some("read"), &pg, &["SELECT 'op:' || ### 1"]);
    assert_eq!(ran.code, 0, "{ran:#?}");
    assert!(
        !ran.stdout.trim().is_empty() && !leaked(&ran.stdout),
        "{ran:#?}"
    );
    // `row.f` calls `f(row)`: followed like the call.
    pg.admin(
        "orders",
        "CREATE FUNCTION mail_of(u users) RETURNS text LANGUAGE sql AS 'SELECT email FROM users WHERE id = 1'",
    );
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &["SELECT 'attr:' || u.mail_of FROM users u WHERE id = 1"],
    );
    assert_eq!(ran.code, 0, "{ran:#?}");
    assert!(
        !ran.stdout.trim().is_empty() && !leaked(&ran.stdout),
        "{ran:#?}"
    );
    // An operator of a built-in's name over a built-in function masks nothing more.
    pg.admin(
        "orders",
        "CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = pg_catalog.texteq)",
    );
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &["SELECT 'n:' || count(*) FROM users WHERE name = 'nobody'"],
    );
    assert_eq!(ran.stdout.trim(), "n:0", "{ran:#?}");
    // A function body runs in the string mode the gate reads it in: one that sets another is
    // refused through the gate, and one stored that way is not called under masking.
    let ran = psql(
        &gate,
        Some("admin"),
        &pg,
        &[
            "CREATE FUNCTION modal() RETURNS int LANGUAGE sql SET standard_conforming_strings = off AS 'SELECT 1'",
        ],
    );
    assert!(ran.stderr.contains("0A000"), "{ran:#?}");
    pg.admin(
        "orders",
        "CREATE FUNCTION modal() RETURNS int LANGUAGE sql SET standard_conforming_strings = off AS 'SELECT 1'",
    );
    let ran = psql(&gate, Some("read"), &pg, &["SELECT modal()"]);
    assert!(ran.stderr.contains("42501"), "{ran:#?}");

    // Literal values pass: nothing computed, nothing to leak.
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &["SELECT set_config('application_name', 'agent', false)"],
    );
    assert_eq!(ran.stdout.trim(), "agent", "{ran:#?}");

    // COPY: escaped delimiters, a query with parentheses in strings, refused formats.
    let ran = psql(&gate, Some("read"), &pg, &["COPY users TO STDOUT"]);
    assert!(
        ran.stdout.contains("4\tTab\\tName\tt***@example.com\t"),
        "{ran:#?}"
    );
    assert!(!leaked(&ran.stdout), "{ran:#?}");
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "COPY (SELECT email, note FROM users WHERE note <> ')(' AND id = 1) TO STDOUT (FORMAT csv)",
        ],
    );
    assert_eq!(ran.stdout.trim(), "\"j***@example.com\",vip", "{ran:#?}");
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &["COPY users TO STDOUT (FORMAT csv, ESCAPE '!')"],
    );
    assert!(ran.stderr.contains("0A000"), "{ran:#?}");
    assert!(ran.stdout.is_empty(), "{ran:#?}");
    // Binary COPY: the masked column and every detector hit are withheld (NULL), the rest
    // arrives as the server sent it.
    for sql in [
        "COPY users TO STDOUT (FORMAT binary)",
        "COPY (SELECT name, card, ssn, note FROM users) TO STDOUT (FORMAT binary)",
    ] {
        let ran = psql(&gate, Some("read"), &pg, &[sql]);
        assert_eq!(ran.code, 0, "{sql}: {ran:#?}");
        assert!(ran.stdout.starts_with("PGCOPY"), "{sql}: {ran:#?}");
        assert!(ran.stdout.contains("Jane"), "{sql}: {ran:#?}");
        for secret in [
            "4111 1111",
            "123-45-6789",
            "jane@example.com",
            "AKIAIOSFODNN7EXAMPLE",
        ] {
            assert!(
                !ran.stdout.contains(secret),
                "{sql} leaked {secret}: {ran:#?}"
            );
        }
    }
    // After search_path changes, an unqualified COPY cannot be mapped to its table: refused;
    // a qualified one is masked as always.
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "SET search_path = pg_catalog, public",
            "COPY users (id, email) TO STDOUT",
        ],
    );
    assert!(
        ran.stderr.contains("42501") && ran.stderr.contains("search_path"),
        "{ran:#?}"
    );
    assert!(!leaked(&ran.stdout), "{ran:#?}");
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "SET search_path = pg_catalog, public",
            "COPY public.users (id, email) TO STDOUT",
        ],
    );
    assert!(ran.stdout.contains("1\tj***@example.com"), "{ran:#?}");
}

#[test]
fn statement_metrics_and_a_shutdown_that_drains_the_statement_in_flight() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let port = free_port();
    let mut gate = Gate::start(
        "pg-drain",
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
        &body(&pg, ""),
    );

    // Statements by kind and decision, masked values by detector.
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &[
            "SELECT id, email, card FROM users ORDER BY id",
            "DELETE FROM users",
        ],
    );
    assert_ne!(ran.code, 0, "{ran:#?}");
    let m = gate.wait_for("statement metrics", Duration::from_secs(10), || {
        let m = scrape(&gate, port);
        m.contains_key(
            r#"jitgate_connections_total{identity="bot",outcome="closed",resource="orders-db"}"#,
        )
        .then_some(m)
    });
    assert!(
        m[r#"jitgate_statements_total{decision="allowed",kind="select"}"#] >= 1.0,
        "{m:#?}"
    );
    assert_eq!(
        m[r#"jitgate_statements_total{decision="denied",kind="delete"}"#], 1.0,
        "{m:#?}"
    );
    assert_eq!(
        m[r#"jitgate_masked_values_total{detector="card"}"#], 2.0,
        "{m:#?}"
    );
    assert_eq!(
        m[r#"jitgate_masked_values_total{detector="column_rule"}"#], 3.0,
        "{m:#?}"
    );
    assert!(m["jitgate_statement_check_seconds_count"] >= 2.0, "{m:#?}");
    assert_eq!(
        m[r#"jitgate_session_setup_seconds_count{protocol="postgres"}"#], 1.0,
        "{m:#?}"
    );

    // SIGTERM while a statement runs: it completes and its result is delivered; the session
    // then ends with FATAL 57P01 between messages, never cut mid-message.
    let u = url(&pg, "orders");
    let mut child = gate.spawn_stdin(
        "bot",
        &["--grant", "orders-db:read"],
        &["psql", &u, "-X", "-At", "-v", "VERBOSITY=verbose"],
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SELECT 'finished' FROM pg_sleep(3);\n\\! sleep 2\nSELECT 'after';\n")
        .unwrap();
    gate.wait_for("the session to open", Duration::from_secs(10), || {
        let open = gate.cli(&["sessions", "--json"]).json();
        open.as_array().is_some_and(|a| !a.is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    gate.stop();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("finished"), "{stdout}{stderr}");
    assert!(!stdout.contains("after"), "{stdout}{stderr}");
    assert!(stderr.contains("57P01"), "{stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");
    gate.launch();
    let sessions = gate.cli(&["sessions", "--all", "--json"]).json();
    assert!(
        sessions
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["outcome"] == "shutdown"),
        "{sessions}"
    );
}

/// What real clients met at the gate and no longer do: tokio-postgres copy_in (a Sync sent
/// in copy-in mode, which the server ignores), PL/pgSQL trigger functions, PGOPTIONS,
/// syntax error positions, and set_config with a bound value under masking.
#[test]
fn copy_in_triggers_options_and_error_positions_with_real_clients() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start("pg-clients", "", &body(&pg, "approval_timeout = \"1s\""));

    // copy_in, then the same session answers a query: three Syncs, two ReadyForQuery.
    let r = pgclient(
        &gate,
        "write",
        &pg,
        &[
            "copy-in",
            "COPY scratch (id, v) FROM STDIN",
            "250",
            "copied",
            "SELECT count(*) FROM scratch WHERE v = 'copied'",
        ],
    );
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["rows"], 250, "{r}");
    assert_eq!(r["after"], serde_json::json!([[250]]), "{r}");
    // A copy the server refuses (no such table) leaves the session usable too.
    let r = pgclient(
        &gate,
        "write",
        &pg,
        &[
            "copy-in",
            "COPY nope FROM STDIN",
            "1",
            "x",
            "SELECT 1::int4",
        ],
    );
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["code"], "42P01", "{r}");

    // A trigger function and its trigger, created through the gate.
    let ran = psql(
        &gate,
        Some("admin"),
        &pg,
        &[
            "CREATE FUNCTION scratch_touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.v := coalesce(NEW.v, TG_OP); RETURN NEW; END $$",
            "CREATE TRIGGER scratch_touch BEFORE INSERT ON scratch FOR EACH ROW EXECUTE FUNCTION scratch_touch()",
            "INSERT INTO scratch (id) VALUES (9001) RETURNING v",
        ],
    );
    assert_eq!(ran.code, 0, "{ran:#?}");
    assert!(ran.stdout.contains("INSERT"), "{ran:#?}");

    // PGOPTIONS reaches the server; a setting that would escape the grant is refused.
    let u = url(&pg, "orders");
    let ran = gate.run(
        "bot",
        &["--grant", "orders-db:read"],
        &[
            "env",
            "PGOPTIONS=-c statement_timeout=300",
            "psql",
            &u,
            "-X",
            "-At",
            "-c",
            "SHOW statement_timeout",
        ],
    );
    assert_eq!(ran.stdout.trim(), "300ms", "{ran:#?}");
    let ran = gate.run(
        "bot",
        &["--grant", "orders-db:read"],
        &[
            "env",
            "PGOPTIONS=-c default_transaction_read_only=off",
            "psql",
            &u,
            "-X",
            "-At",
            "-c",
            "SELECT 1",
        ],
    );
    assert_ne!(ran.code, 0, "{ran:#?}");
    assert!(
        ran.stderr.contains("default_transaction_read_only=off"),
        "{ran:#?}"
    );

    // A syntax error shows where, as the server would.
    let ran = psql(&gate, Some("read"), &pg, &["SELECT id FRM users"]);
    assert!(ran.stderr.contains("42601"), "{ran:#?}");
    assert!(
        ran.stderr.contains("LINE 1: SELECT id FRM users"),
        "{ran:#?}"
    );
    assert!(ran.stderr.contains('^'), "{ran:#?}");

    // Statements that touch every row however they are spelled are held like a DELETE
    // without WHERE; nobody approves within the second, so nothing is deleted.
    for sql in [
        "MERGE INTO scratch USING (SELECT 1) s ON true WHEN MATCHED THEN DELETE",
        "DELETE FROM scratch WHERE 1 = 1",
        "UPDATE scratch SET v = 'x' WHERE 't' OR id = 1",
    ] {
        let ran = psql(&gate, Some("write"), &pg, &[sql]);
        assert!(
            ran.stderr.contains("57014") && ran.stderr.contains("write-without-where"),
            "{sql}: {ran:#?}"
        );
    }
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &["SELECT count(*) FROM scratch WHERE v = 'copied'"],
    );
    assert_eq!(ran.stdout.trim(), "250", "{ran:#?}");

    // A typed value a detector matches comes back NULL, and the client is told why, once
    // per statement.
    let ran = psql(
        &gate,
        Some("read"),
        &pg,
        &["SELECT 4111111111111111::bigint AS id FROM generate_series(1, 3)"],
    );
    assert_eq!(ran.stdout.lines().count(), 3, "{ran:#?}");
    assert!(!ran.stdout.contains("4111"), "{ran:#?}");
    assert_eq!(
        ran.stderr.matches("returned as NULL").count(),
        1,
        "{ran:#?}"
    );
    assert!(ran.stderr.contains("3 value(s)"), "{ran:#?}");

    // Functions that read a query text, relation or cursor given to them return values
    // masking cannot follow: refused while masking applies.
    for sql in [
        "SELECT query_to_xml('select ssn, card from users', true, true, '')",
        "SELECT table_to_xml('users', true, true, '')",
        "SELECT * FROM ts_stat('select to_tsvector(email) from users')",
    ] {
        let ran = psql(&gate, Some("read"), &pg, &[sql]);
        assert!(ran.stderr.contains("42501"), "{sql}: {ran:#?}");
        assert!(ran.stdout.trim().is_empty(), "{sql}: {ran:#?}");
    }

    // Under masking, set_config with a bound value (asyncpg's introspection) runs; with a
    // computed one it does not.
    let r = pgclient(
        &gate,
        "read",
        &pg,
        &["execute", "SELECT set_config('jit.x', $1, false)", "v"],
    );
    assert_eq!(r["ok"], true, "{r}");
    let r = pgclient(
        &gate,
        "read",
        &pg,
        &[
            "execute",
            "SELECT set_config('jit.x', email, false) FROM users WHERE id = 1",
        ],
    );
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["code"], "42501", "{r}");
}
