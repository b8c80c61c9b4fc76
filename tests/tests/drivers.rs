//! Client compatibility: the same scenario, run by each driver directly against PostgreSQL and
//! as a gated workload through the gate, must give the same results. The scenario
//! (`tests/compat/`): connect (through the gate with a made-up password), parameters with
//! unicode and NULLs, server-side prepared statements, binary results, a savepoint, an error
//! and recovery on the same connection, 100k rows at once and through a server-side cursor, a
//! 10 MiB bytea both ways, COPY in and out (text, csv, binary where the driver has it),
//! pipelining, LISTEN/NOTIFY, and statement_timeout through the startup `options`.

use std::{path::PathBuf, process::Command};

use jitgate_e2e::{Gate, config::Body, servers::Postgres};
use serde_json::Value;

/// No masking and no guardrail in the way: what is compared is the protocol's fidelity.
fn body(pg: &Postgres) -> String {
    let keys = format!(
        "protocol = \"postgres\"\ndatabases = [\"orders\"]\n{}",
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
    let want = result(
        &format!("{name} direct"),
        &String::from_utf8_lossy(&out.stdout),
        &String::from_utf8_lossy(&out.stderr),
    );
    let gated_cmd = fill(gated);
    let gated_refs: Vec<&str> = gated_cmd.iter().map(String::as_str).collect();
    let ran = gate.run("bot", &["--grant", "orders-db:admin"], &gated_refs);
    let got = result(
        &format!("{name} through the gate"),
        &ran.stdout,
        &ran.stderr,
    );
    assert!(
        want.get("failed").is_none(),
        "{name} failed directly: {want}"
    );
    for key in expect {
        assert!(
            want.get(*key).is_some(),
            "{name}: the scenario lacks {key}: {want}"
        );
    }
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
