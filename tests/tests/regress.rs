//! PostgreSQL's own regression suite, run with the installed `pg_regress --use-existing`
//! directly against one fresh server and as a gated workload (admin grant, no masking, no
//! guardrails: what is measured is the gate's protocol fidelity, not a policy) against
//! another. Every test that passes directly must pass through the gate, except those listed
//! with their reason in docs/COMPAT.md (each a documented refusal); an exception that passes
//! through the gate is stale and fails the run too.
//!
//! `cargo xtask setup` fetches the suite (`xtask/src/regress.rs`). The test suite runs a
//! subset; `cargo xtask compat` runs the whole parallel schedule (`whole_suite`, ignored
//! otherwise) and writes the table to `target/compat/regress.md`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use jitgate_e2e::{Gate, config::Body, servers::Postgres};

/// Tests the subset runs, in this order (each needs only `test_setup` and the ones before
/// it): data types, DML, COPY, transactions, prepared statements, cursors, PL/pgSQL,
/// triggers, errors, and the statements the gate looks hardest at.
const SUBSET: &[&str] = &[
    "test_setup",
    "boolean",
    "char",
    "varchar",
    "text",
    "int4",
    "int8",
    "numeric",
    "uuid",
    "enum",
    "strings",
    "date",
    "timestamptz",
    "interval",
    "create_function_sql",
    "insert",
    "copy",
    "copy2",
    "copyselect",
    "select",
    "transactions",
    "prepare",
    "portals",
    "plpgsql",
    "triggers",
    "errors",
    "with",
    "merge",
    "arrays",
    "json",
    "jsonb",
    "largeobject",
    "encoding",
    "temp",
    "truncate",
    "sequence",
    "rangefuncs",
];

/// The suite `cargo xtask setup` fetched: `src/` (src/test/regress of the server's source)
/// and `lib/` (`regress.so`).
fn suite() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let dir = target.join("compat/regress");
    assert!(
        dir.join("lib/regress.so").exists() && dir.join("src/parallel_schedule").exists(),
        "PostgreSQL's regression suite is not in {}: run `cargo xtask setup` (as root)",
        dir.display()
    );
    dir
}

/// The documented exceptions: the table between the `regress-exceptions` markers of
/// docs/COMPAT.md, test name -> reason.
fn exceptions() -> BTreeMap<String, String> {
    let doc = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/COMPAT.md"),
    )
    .expect("docs/COMPAT.md");
    let start = doc
        .find("<!-- regress-exceptions -->")
        .expect("the regress-exceptions marker in docs/COMPAT.md");
    let end = doc
        .find("<!-- /regress-exceptions -->")
        .expect("the closing regress-exceptions marker in docs/COMPAT.md");
    doc[start..end]
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // | `name` | reason |
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_owned(), cells.get(2)?.to_string()))
        })
        .collect()
}

/// The database pg_regress would create without `--use-existing`, with the same settings.
fn create_regression_db(pg: &Postgres) {
    pg.admin("postgres", "CREATE DATABASE regression TEMPLATE=template0");
    pg.admin(
        "postgres",
        "ALTER DATABASE regression SET lc_messages TO 'C';
         ALTER DATABASE regression SET lc_monetary TO 'C';
         ALTER DATABASE regression SET lc_numeric TO 'C';
         ALTER DATABASE regression SET lc_time TO 'C';
         ALTER DATABASE regression SET bytea_output TO 'hex';
         ALTER DATABASE regression SET timezone_abbreviations TO 'Default';",
    );
}

/// No masking, no guardrails, an admin grant given automatically: the gate parses, judges,
/// records and relays every statement, and refuses only what it always refuses.
fn body(pg: &Postgres) -> String {
    Body::new()
        .workload("bot", &["root"])
        .resource_with(
            "regress-db",
            &format!("127.0.0.1:{}", pg.port),
            "protocol = \"postgres\"\ndefault_guardrails = false\n\
             [resource.credentials.admin]\nuser = \"postgres\"\n",
        )
        .policy(
            &["bot"],
            &["regress-db"],
            &["admin"],
            "max_ttl = \"2h\"\napproval = \"auto\"\napprovers = [\"root\"]",
        )
        .build()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Failed,
}

/// One run: each test's outcome, and the diffs of the failed ones.
struct Run {
    outcomes: BTreeMap<String, Outcome>,
    diffs: String,
    log: String,
    /// Where pg_regress wrote each test's output (`<test>.out`).
    results: PathBuf,
}

impl Run {
    /// What one test printed, as pg_regress saved it.
    fn output(&self, test: &str) -> Option<String> {
        std::fs::read_to_string(self.results.join(format!("{test}.out"))).ok()
    }
}

/// pg_regress's summary lines: `test name ... ok 12 ms`, `     name ... FAILED 12 ms`,
/// `ok 3  + name 12 ms` (newer layouts are read too).
fn parse_summary(log: &str) -> BTreeMap<String, Outcome> {
    let mut outcomes = BTreeMap::new();
    for line in log.lines() {
        let Some((head, tail)) = line.split_once(" ... ") else {
            continue;
        };
        let name = head.trim().trim_start_matches("test ").trim();
        let outcome = if tail.trim_start().starts_with("ok") {
            Outcome::Ok
        } else if tail.contains("FAILED") || tail.contains("failed") {
            Outcome::Failed
        } else {
            continue;
        };
        if !name.is_empty() && !name.contains(' ') {
            outcomes.insert(name.to_owned(), outcome);
        }
    }
    outcomes
}

/// The pg_regress command line for one run; the output directory is made writable for the
/// server (COPY TO a file) and for the workload's user.
fn pg_regress(suite: &Path, port: u16, out: &Path, tests: Option<&[&str]>) -> Vec<String> {
    let results = out.join("results");
    std::fs::create_dir_all(&results).expect("the output directory");
    for d in [out, &results] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
            .expect("chmod");
    }
    let bin = "/usr/lib/postgresql";
    let mut majors: Vec<u32> = std::fs::read_dir(bin)
        .expect("PostgreSQL")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    majors.sort_unstable();
    let major = majors.pop().expect("a PostgreSQL major version");
    let src = suite.join("src");
    let mut cmd = vec![
        format!("{bin}/{major}/lib/pgxs/src/test/regress/pg_regress"),
        "--use-existing".into(),
        "--host=127.0.0.1".into(),
        format!("--port={port}"),
        "--user=postgres".into(),
        format!("--bindir={bin}/{major}/bin"),
        format!("--inputdir={}", src.display()),
        format!("--outputdir={}", out.display()),
        format!("--dlpath={}", suite.join("lib").display()),
        "--max-connections=8".into(),
    ];
    match tests {
        Some(tests) => cmd.extend(tests.iter().map(|t| (*t).to_owned())),
        None => cmd.push(format!(
            "--schedule={}",
            src.join("parallel_schedule").display()
        )),
    }
    cmd
}

fn finish(out: &Path, stdout: &str, stderr: &str) -> Run {
    let log = format!("{stdout}{stderr}");
    Run {
        outcomes: parse_summary(&log),
        diffs: std::fs::read_to_string(out.join("regression.diffs")).unwrap_or_default(),
        log,
        results: out.join("results"),
    }
}

fn direct(suite: &Path, out: &Path, tests: Option<&[&str]>) -> Run {
    let pg = Postgres::start();
    create_regression_db(&pg);
    let cmd = pg_regress(suite, pg.port, out, tests);
    let ran = Command::new(&cmd[0])
        .args(&cmd[1..])
        .output()
        .expect("running pg_regress");
    finish(
        out,
        &String::from_utf8_lossy(&ran.stdout),
        &String::from_utf8_lossy(&ran.stderr),
    )
}

fn gated(name: &str, suite: &Path, out: &Path, tests: Option<&[&str]>) -> (Run, String) {
    let pg = Postgres::start();
    create_regression_db(&pg);
    let gate = Gate::start(name, "", &body(&pg));
    let cmd = pg_regress(suite, pg.port, out, tests);
    let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let ran = gate.run("bot", &["--grant", "regress-db:admin"], &refs);
    (finish(out, &ran.stdout, &ran.stderr), gate.log())
}

/// The diff hunks of one test in pg_regress's regression.diffs.
fn diff_of<'a>(diffs: &'a str, test: &str) -> &'a str {
    let marker = format!("/results/{test}.out");
    let Some(at) = diffs.find(&marker) else {
        return "";
    };
    let start = diffs[..at].rfind("diff ").unwrap_or(at);
    let end = diffs[at..]
        .find("\ndiff ")
        .map_or(diffs.len(), |e| at + e + 1);
    &diffs[start..end]
}

fn compare(name: &str, tests: Option<&[&str]>, report: Option<&Path>) {
    jitgate_e2e::root_or_skip!();
    let suite = suite();
    let scratch = tempfile::tempdir().expect("a scratch directory");
    std::fs::set_permissions(
        scratch.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let want = direct(&suite, &scratch.path().join("direct"), tests);
    let (got, gate_log) = gated(name, &suite, &scratch.path().join("gated"), tests);
    assert!(
        want.outcomes.len() >= tests.map_or(150, |t| t.len()),
        "pg_regress ran too few tests directly ({}):\n{}",
        want.outcomes.len(),
        want.log
    );
    let exceptions = exceptions();
    let mut table = String::from("| test | direct | gated | note |\n| --- | --- | --- | --- |\n");
    let mut broken = Vec::new();
    let mut stale = Vec::new();
    for (test, direct) in &want.outcomes {
        let gated = got.outcomes.get(test).copied();
        let note = match (direct, gated, exceptions.get(test)) {
            (Outcome::Ok, Some(Outcome::Ok), Some(_)) => {
                stale.push(test.clone());
                "listed as an exception but passes: remove it from docs/COMPAT.md".to_owned()
            }
            (Outcome::Ok, Some(Outcome::Ok), None) => String::new(),
            (Outcome::Ok, _, Some(reason)) => format!("exception: {reason}"),
            (Outcome::Ok, _, None) => {
                broken.push(test.clone());
                "FAILS THROUGH THE GATE".to_owned()
            }
            // The expected output can be from another minor version than the server (the
            // mirror may lack the installed server's source), so a test can fail directly.
            // Through the gate it must then print exactly what it printed directly.
            (Outcome::Failed, _, reason) => match (want.output(test), got.output(test)) {
                (Some(d), Some(g)) if d == g => {
                    "fails directly; the gate's output is the same as direct".to_owned()
                }
                _ => match reason {
                    Some(reason) => format!("fails directly; exception: {reason}"),
                    None => {
                        broken.push(test.clone());
                        "fails directly, and THE GATE'S OUTPUT DIFFERS FROM DIRECT".to_owned()
                    }
                },
            },
        };
        let _ = writeln!(
            table,
            "| {test} | {direct:?} | {} | {note} |",
            gated.map_or("missing".to_owned(), |g| format!("{g:?}"))
        );
    }
    let passed = |run: &Run| run.outcomes.values().filter(|o| **o == Outcome::Ok).count();
    let summary = format!(
        "{} tests; passed directly {}, through the gate {}; exceptions used {}; unexpected failures {}",
        want.outcomes.len(),
        passed(&want),
        passed(&got),
        want.outcomes
            .iter()
            .filter(|(t, o)| **o == Outcome::Ok && got.outcomes.get(*t) != Some(&Outcome::Ok))
            .filter(|(t, _)| exceptions.contains_key(*t))
            .count(),
        broken.len()
    );
    println!("{summary}\n\n{table}");
    if let Some(report) = report {
        std::fs::create_dir_all(report.parent().expect("a report directory")).expect("mkdir");
        std::fs::write(
            report,
            format!("# PostgreSQL regression suite through the gate\n\n{summary}\n\n{table}"),
        )
        .expect("writing the report");
    }
    let details: String = broken
        .iter()
        .map(|t| {
            // A test that fails directly too is shown as direct against gated.
            let diff = if want.outcomes.get(t) == Some(&Outcome::Failed) {
                Command::new("diff")
                    .arg("-U3")
                    .arg(want.results.join(format!("{t}.out")))
                    .arg(got.results.join(format!("{t}.out")))
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            } else {
                diff_of(&got.diffs, t).to_owned()
            };
            format!("---- {t}\n{diff}\n")
        })
        .collect();
    assert!(
        broken.is_empty() && stale.is_empty(),
        "{summary}\nfailing through the gate only: {broken:?}; stale exceptions: {stale:?}\n{details}\n\
         gated pg_regress:\n{}\nagent log (last lines):\n{}",
        got.log,
        gate_log
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn subset_matches_direct() {
    compare("regress-subset", Some(SUBSET), None);
}

/// The whole parallel schedule (`cargo xtask compat`).
#[test]
#[ignore = "minutes long: run by `cargo xtask compat`"]
fn whole_suite_matches_direct() {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    compare("regress-all", None, Some(&target.join("compat/regress.md")));
}
