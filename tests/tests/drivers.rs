//! Client compatibility: the same scenario, run by each driver directly against PostgreSQL and
//! as a gated workload through the gate, must give the same results. The scenario
//! (`tests/compat/`): connect (through the gate with a made-up password), parameters with
//! unicode and NULLs, server-side prepared statements, binary results, a savepoint, an error
//! and recovery on the same connection, 100k rows at once and through a server-side cursor, a
//! 10 MiB bytea both ways, COPY in and out (text, csv, binary where the driver has it),
//! pipelining, LISTEN/NOTIFY, cancellation, and statement_timeout by SET and through the
//! startup `options`. The gate terminates TLS toward the client (`client_tls = "enable"`):
//! libpq-based drivers negotiate it by default (`prefer`), psql, pgx and sqlx are pointed at it
//! with `sslmode=verify-full` (the host CA that `jitgate run` exports), so a gate that did not
//! offer TLS or offered the wrong certificate fails the comparison.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use jitgate_e2e::{Gate, config::Body, servers::Postgres};
use serde_json::Value;

/// No masking and no guardrail in the way: what is compared is the protocol's fidelity.
fn body(pg: &Postgres) -> String {
    let keys = format!(
        "protocol = \"postgres\"\ndatabases = [\"orders\"]\nclient_tls = \"enable\"\n{}",
        pg.credentials_toml()
    );
    Body::new()
        .workload("bot", &["root"])
        .resource_with("orders-db", &format!("127.0.0.1:{}", pg.port), &keys)
        .policy(
            &["bot"],
            &["orders-db"],
            &["read", "write", "admin"],
            "max_ttl = \"1h\"\napproval = \"auto\"\napprovers = [\"root\"]",
        )
        .build()
}

fn compat_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("compat")
}

/// The JSON object a driver program printed last.
fn result(what: &str, stdout: &str, stderr: &str) -> Value {
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{what}: no result ({e}):\n{stdout}\n{stderr}"))
}

/// Runs `cmd` with `direct` and with `gated` as its connection argument(s): directly, then
/// as a gated workload with an admin grant (the scenario makes a temporary table, which
/// the gate counts as DDL), both as the admin role; the two results must be equal and
/// complete.
fn compare(name: &str, cmd: &[&str], direct: &[&str], gated: &[&str], expect: &[&str]) {
    compare_by(name, cmd, direct, gated, |what, stdout, stderr| {
        let got = result(what, stdout, stderr);
        for key in expect {
            assert!(
                got.get(*key).is_some() || got.get("failed").is_some(),
                "{what}: the scenario lacks {key}: {got}"
            );
        }
        got
    });
}

/// [`compare`] with the outputs read by `read(what, stdout, stderr)`.
fn compare_by(
    name: &str,
    cmd: &[&str],
    direct: &[&str],
    gated: &[&str],
    read: impl Fn(&str, &str, &str) -> Value,
) {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let gate = Gate::start(&format!("drivers-{name}"), "", &body(&pg));
    let admin_password = std::fs::read_to_string(pg.secrets.join("orders_admin.pw"))
        .expect("the admin role's password");
    let fill = |args: &[&str]| -> Vec<String> {
        cmd.iter()
            .chain(args)
            .map(|a| {
                a.replace("{port}", &pg.port.to_string())
                    .replace("{admin_password}", admin_password.trim())
            })
            .collect()
    };
    let direct_cmd = fill(direct);
    let out = Command::new(&direct_cmd[0])
        .args(&direct_cmd[1..])
        .output()
        .expect("running the driver directly");
    let want = read(
        &format!("{name} direct"),
        &String::from_utf8_lossy(&out.stdout),
        &String::from_utf8_lossy(&out.stderr),
    );
    let gated_cmd = fill(gated);
    let gated_refs: Vec<&str> = gated_cmd.iter().map(String::as_str).collect();
    let ran = gate.run("bot", &["--grant", "orders-db:admin"], &gated_refs);
    let got = read(
        &format!("{name} through the gate"),
        &ran.stdout,
        &ran.stderr,
    );
    assert!(
        want.get("failed").is_none(),
        "{name} failed directly: {want}"
    );
    assert_eq!(
        got,
        want,
        "{name}: through the gate (left) differs from direct (right); stderr:\n{}\n{}",
        ran.stderr,
        gate.log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

const COMMON: &[&str] = &[
    "connect",
    "params",
    "savepoint",
    "error",
    "recovered",
    "rows",
    "server_cursor",
    "bytea_in",
    "bytea_out",
    "copy",
    "notify",
    "options_timeout",
];

fn python(driver: &str, expect: &[&str]) {
    let script = compat_dir().join("drivers.py").display().to_string();
    compare(
        driver,
        &["/usr/bin/python3", &script, driver],
        &["postgresql://orders_admin:{admin_password}@127.0.0.1:{port}/orders"],
        &["postgresql://mallory:not-the-password@127.0.0.1:{port}/orders"],
        expect,
    );
}

#[test]
fn psycopg2_matches_direct() {
    python("psycopg2", &[COMMON, &["agg"]].concat());
}

#[test]
fn psycopg3_matches_direct() {
    python(
        "psycopg3",
        &[COMMON, &["binary", "prepared", "copy_binary", "pipeline"]].concat(),
    );
}

#[test]
fn sqlalchemy_matches_direct() {
    let without: Vec<&str> = COMMON
        .iter()
        .copied()
        .filter(|k| !["copy", "notify"].contains(k))
        .collect();
    python("sqlalchemy", &without);
}

#[test]
fn asyncpg_matches_direct() {
    python("asyncpg", &[COMMON, &["prepared"]].concat());
}

#[test]
fn jdbc_matches_direct() {
    let program = compat_dir().join("Compat.java").display().to_string();
    compare(
        "jdbc",
        &[
            "/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
            "-cp",
            "/usr/share/java/postgresql.jar",
            &program,
            "jdbc:postgresql://127.0.0.1:{port}/orders",
        ],
        &["orders_admin", "{admin_password}"],
        &["mallory", "not-the-password"],
        &[COMMON, &["prepared"]].concat(),
    );
}

fn node(driver: &str, expect: &[&str]) {
    let script = compat_dir().join("drivers.js").display().to_string();
    compare(
        driver,
        &["/usr/bin/node", &script, driver],
        &["postgresql://orders_admin:{admin_password}@127.0.0.1:{port}/orders"],
        &["postgresql://mallory:not-the-password@127.0.0.1:{port}/orders"],
        expect,
    );
}

#[test]
fn node_postgres_matches_direct() {
    let without_copy: Vec<&str> = COMMON.iter().copied().filter(|k| *k != "copy").collect();
    node("pg", &[&without_copy[..], &["prepared"]].concat());
}

#[test]
fn postgres_js_matches_direct() {
    node("postgres", &[COMMON, &["prepared"]].concat());
}

/// Steps the Rust and Go programs add to the common ones.
const MORE: &[&str] = &["binary", "prepared", "pipeline", "set_timeout"];

fn rust(driver: &str, gated_url: &str, expect: &[&str]) {
    let program = jitgate_e2e::find_bin("jitgate-drivers")
        .display()
        .to_string();
    compare(
        driver,
        &[&program, driver],
        &["postgresql://orders_admin:{admin_password}@127.0.0.1:{port}/orders"],
        &[gated_url],
        expect,
    );
}

#[test]
fn tokio_postgres_matches_direct() {
    // tokio-postgres without a TLS connector: plaintext on the loopback hop.
    rust(
        "tokio-postgres",
        "postgresql://mallory:not-the-password@127.0.0.1:{port}/orders",
        &[COMMON, MORE, &["copy_binary", "cancel", "after_cancel"]].concat(),
    );
}

#[test]
fn sqlx_matches_direct() {
    rust(
        "sqlx",
        "postgresql://mallory:not-the-password@127.0.0.1:{port}/orders?sslmode=verify-full",
        &[COMMON, &["prepared", "set_timeout"]].concat(),
    );
}

/// Builds the pgx program with Debian's Go and pgx (GOPATH mode: no module download).
fn build_pgx(out: &Path) {
    let cache = out.join("gocache");
    let built = Command::new("/usr/bin/go")
        .args(["build", "-o"])
        .arg(out.join("pgx-compat"))
        .arg(".")
        .current_dir(compat_dir().join("pgx"))
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", &cache)
        .env("HOME", out)
        .output()
        .expect("running go build (`cargo xtask setup` installs golang-go and pgx)");
    assert!(
        built.status.success(),
        "go build of tests/compat/pgx: {}",
        String::from_utf8_lossy(&built.stderr)
    );
}

#[test]
fn pgx_matches_direct() {
    jitgate_e2e::root_or_skip!();
    let dir = tempfile::tempdir().expect("a build directory");
    build_pgx(dir.path());
    let program = dir.path().join("pgx-compat").display().to_string();
    compare(
        "pgx",
        &[&program],
        &["postgres://orders_admin:{admin_password}@127.0.0.1:{port}/orders?sslmode=disable"],
        &["postgres://mallory:not-the-password@127.0.0.1:{port}/orders?sslmode=verify-full"],
        &[COMMON, MORE, &["copy_binary", "cancel", "after_cancel"]].concat(),
    );
}

/// psql's output with what differs by connection taken out: the PID in "Asynchronous
/// notification ... received from server process with PID N".
fn without_pids(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("with PID ") {
            Some(at) => {
                let rest = &line[at + "with PID ".len()..];
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                format!("{}with PID _{}", &line[..at], &rest[digits..])
            }
            None => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// psql runs `tests/compat/scenario.sql` plus a 10 MiB bytea literal (a 20 MiB Query
/// message), with statement_timeout in the startup `options`; every line of output,
/// errors with their LINE and caret included, must be the same.
#[test]
fn psql_matches_direct() {
    jitgate_e2e::root_or_skip!();
    let dir = tempfile::tempdir().expect("a scratch directory");
    let script = dir.path().join("scenario.sql");
    let mut sql = std::fs::read_to_string(compat_dir().join("scenario.sql")).expect("the scenario");
    let hex: String = (0..10 * 1024 * 1024usize)
        .map(|i| format!("{:02x}", (i * 7919 + 13) % 256))
        .collect();
    sql.push_str(&format!(
        "INSERT INTO t (id, v, b) VALUES (3, 'blob', '\\x{hex}') RETURNING length(b), md5(b);\n"
    ));
    std::fs::write(&script, sql).expect("writing the scenario");
    // The gated workload runs as root: readable wherever it is.
    let script = script.display().to_string();
    let options = "options=-c%20statement_timeout%3D4321";
    compare_by(
        "psql",
        &["psql", "-X", "-f", &script],
        &[&format!(
            "postgresql://orders_admin:{{admin_password}}@127.0.0.1:{{port}}/orders?{options}"
        )],
        &[&format!(
            "postgresql://mallory:not-the-password@127.0.0.1:{{port}}/orders?sslmode=verify-full&{options}"
        )],
        |what, stdout, stderr| {
            for needle in [
                "4321ms",
                "LINE 1: selec 1;",
                "twelve!",
                "99995",
                "10485760",
                "canceling statement due to statement timeout",
                "Asynchronous notification \"chan\" with payload \"ping\"",
            ] {
                assert!(
                    stdout.contains(needle) || stderr.contains(needle),
                    "{what}: no {needle:?} in\n{stdout}\n{stderr}"
                );
            }
            // `jitgate run` says on stderr which task and grant it got; that is not psql's.
            let stderr: Vec<&str> = stderr
                .lines()
                .filter(|l| !l.starts_with("jitgate: "))
                .collect();
            serde_json::json!({
                "stdout": without_pids(stdout),
                "stderr": without_pids(&stderr.join("\n")),
            })
        },
    );
}

/// pgbench in each query mode, and a `\startpipeline` script, directly and through the
/// gate: every transaction processed, none failed, the same effect on the table.
#[test]
fn pgbench_matches_direct() {
    jitgate_e2e::root_or_skip!();
    let pg = Postgres::start_secured(false);
    let init = Command::new("pgbench")
        .args(["-i", "-s", "1", "-q", "-h"])
        .arg(pg.socket_dir())
        .args(["-p", &pg.port.to_string(), "-U", "postgres", "orders"])
        .output()
        .expect("pgbench -i");
    assert!(init.status.success(), "{init:?}");
    pg.admin(
        "orders",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO orders_rw",
    );
    let gate = Gate::start("drivers-pgbench", "", &body(&pg));
    let dir = tempfile::tempdir().expect("a scratch directory");
    let pipeline = dir.path().join("pipeline.sql");
    std::fs::write(
        &pipeline,
        "\\set aid random(1, 100000)\n\\startpipeline\n\
         SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n\
         UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n\
         SELECT 1;\n\\endpipeline\n",
    )
    .expect("the pipeline script");
    let pipeline = pipeline.display().to_string();
    let port = pg.port.to_string();
    let sum = || pg.admin("orders", "SELECT sum(abalance) FROM pgbench_accounts");
    let summary = |what: &str, stdout: &str, stderr: &str, code: i32| -> Vec<String> {
        assert_eq!(code, 0, "{what}:\n{stdout}\n{stderr}");
        stdout
            .lines()
            .filter(|l| {
                l.starts_with("number of transactions actually processed")
                    || l.starts_with("number of failed transactions")
                    || l.starts_with("query mode")
            })
            .map(str::to_owned)
            .collect()
    };
    for (mode, script) in [
        ("simple", None),
        ("extended", None),
        ("prepared", None),
        ("extended", Some(&pipeline)),
        ("prepared", Some(&pipeline)),
    ] {
        let mut args: Vec<&str> = vec!["pgbench", "-n", "-M", mode, "-c", "2", "-t", "25"];
        match script {
            Some(file) => args.extend(["-f", file.as_str()]),
            None => args.push("-S"),
        }
        args.extend(["-h", "127.0.0.1", "-p", &port]);
        let what = format!("pgbench -M {mode} {script:?}");

        let before = sum();
        let direct = Command::new(args[0])
            .args(&args[1..])
            .args(["-U", "orders_rw", "orders"])
            .env(
                "PGPASSWORD",
                std::fs::read_to_string(pg.secrets.join("orders_rw.pw"))
                    .expect("the write role's password")
                    .trim(),
            )
            .output()
            .expect("pgbench directly");
        let want = summary(
            &format!("{what} direct"),
            &String::from_utf8_lossy(&direct.stdout),
            &String::from_utf8_lossy(&direct.stderr),
            direct.status.code().unwrap_or(-1),
        );
        let direct_delta: i64 =
            sum().trim().parse::<i64>().unwrap_or(0) - before.trim().parse::<i64>().unwrap_or(0);

        let before = sum();
        args.extend(["-U", "mallory", "orders"]);
        let ran = gate.run("bot", &["--grant", "orders-db:write"], &args);
        let got = summary(&format!("{what} gated"), &ran.stdout, &ran.stderr, ran.code);
        let gated_delta: i64 =
            sum().trim().parse::<i64>().unwrap_or(0) - before.trim().parse::<i64>().unwrap_or(0);

        assert_eq!(got, want, "{what}: through the gate (left) vs direct");
        assert!(
            want.iter().any(|l| l.ends_with("50/50")),
            "{what}: {want:?}"
        );
        assert_eq!(gated_delta, direct_delta, "{what}: the updates' effect");
        if script.is_some() {
            assert_eq!(direct_delta, 50, "{what}: one update per transaction");
        }
    }
}
