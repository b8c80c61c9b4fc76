//! `cargo xtask bench --quick` end to end: every stage runs against the real kernel, a real
//! PostgreSQL, pgbouncer and the host agent, and the report comes out complete. The figures
//! themselves are never checked here (timing belongs to the bench, not to tests); what is
//! checked is that each one was measured and that the bench's own validity checks held
//! (masking happened exactly where it should, over PostgreSQL and HTTP; every idle connection
//! stayed healthy).

use std::process::Command;

use jitgate_e2e::find_bin;

#[test]
fn bench_quick_runs_end_to_end() {
    jitgate_e2e::root_or_skip!();
    let xtask = find_bin("xtask");
    let bin_dir = xtask.parent().expect("bin dir").to_owned();
    let out = std::env::temp_dir().join(format!("jitgate-bench-quick-{}.md", std::process::id()));
    let run = Command::new(&xtask)
        .args(["bench", "--quick", "--bin-dir"])
        .arg(&bin_dir)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running xtask bench --quick");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "bench --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report = std::fs::read_to_string(&out).expect("the report");
    let _ = std::fs::remove_file(&out);
    for section in [
        "pgbench -S (select-only), simple protocol",
        "pgbench -S (select-only), prepared protocol",
        "pgbench TPC-B-like (default script), simple protocol",
        "pgbench TPC-B-like (default script), prepared protocol",
        "Connection setup",
        "Masking, end to end",
        "Masking engine alone",
        "Kernel cost",
        "Scale: idle gated connections",
        "HTTP: small JSON GETs over keep-alive HTTPS",
        "JSON response masking alone",
        "Targets",
    ] {
        assert!(
            report.contains(&format!("### {section}")),
            "no {section:?} in:\n{report}"
        );
    }
    // Every pgbench cell: four variants at three client counts, each with a figure.
    for variant in [
        "direct",
        "pgbouncer (session)",
        "jitgate full policy",
        "jitgate tcp relay",
    ] {
        let rows: Vec<&str> = report
            .lines()
            .filter(|l| l.contains(&format!("| {variant} |")))
            .collect();
        assert!(rows.len() >= 12, "{variant}: {} pgbench rows", rows.len());
        for row in rows {
            let tps: f64 = row.split('|').nth(3).unwrap().trim().parse().unwrap_or(0.0);
            assert!(tps > 0.0, "no throughput in {row}");
            // A pgbench row (seven columns; other tables share the labels): the proxy's CPU
            // time per transaction, none in the path when direct.
            if row.split('|').count() == 9 {
                let cpu = row.split('|').nth(7).unwrap().trim();
                if variant == "direct" {
                    assert_eq!(cpu, "-", "{row}");
                } else {
                    let cpu: f64 = cpu.parse().unwrap_or(0.0);
                    assert!(cpu > 0.0, "no CPU time per transaction in {row}");
                }
            }
        }
    }
    // Every HTTP cell: four variants (one of them nginx) at three client counts, with
    // throughput, latency and the proxy's CPU time per request.
    // (The relay's label is also the PostgreSQL tables': read from the HTTP table alone.)
    let http = report
        .split("### HTTP:")
        .nth(1)
        .and_then(|t| t.split("\n### ").next())
        .expect("an HTTP table");
    for variant in [
        "nginx (TLS reverse proxy)",
        "jitgate full policy (TLS intercepted)",
        "jitgate tcp relay",
    ] {
        let rows: Vec<&str> = http
            .lines()
            .filter(|l| l.contains(&format!("| {variant} |")))
            .collect();
        assert_eq!(rows.len(), 3, "{variant}: {http}");
        for row in rows {
            let rps: f64 = row.split('|').nth(3).unwrap().trim().parse().unwrap_or(0.0);
            assert!(rps > 0.0, "no throughput in {row}");
            // The proxy's own CPU time per request, read from /proc: the last column.
            let cpu: f64 = row.split('|').nth(9).unwrap().trim().parse().unwrap_or(0.0);
            assert!(cpu > 0.0, "no CPU time per request in {row}");
        }
    }
    // The idle stage's connections all stayed healthy, and each target got a verdict.
    assert!(report.contains("200/200 healthy"), "{report}");
    let verdicts: Vec<&str> = report
        .lines()
        .filter(|l| l.ends_with("| met |") || l.ends_with("| MISSED |"))
        .collect();
    for target in [
        "| full policy >= pgbouncer session mode tps",
        "| agent CPU per -S transaction with full policy <= pgbouncer's",
        "| full policy >= 0.80 of direct tps",
        "| < 100 µs added p99 latency per statement",
        "| masking >= 200 MB/s on one core",
        "| masked results end to end >= 0.8 of the tcp relay",
        "| connection setup p50 with full policy within 10% of direct",
        "| < 64 KiB per idle connection",
        "| redirected connect() within 5 µs",
        "| HTTP: full policy >= nginx reverse proxy requests/s",
        "| HTTP: agent CPU per request with full policy <= nginx's",
    ] {
        assert_eq!(
            verdicts.iter().filter(|l| l.starts_with(target)).count(),
            1,
            "{target}: no verdict, or more than one:\n{report}"
        );
    }
    assert_eq!(verdicts.len(), 11, "{report}");
    assert!(!report.contains("n/a"), "a figure is missing:\n{report}");
    assert!(
        !report.contains("not measured"),
        "a target went unmeasured:\n{report}"
    );
    // The same tables went to the terminal.
    assert!(stdout.contains("Targets"), "{stdout}");
}

/// `cargo xtask bench fleet --quick`: simulated hosts on the agent's own store code against a
/// real PostgreSQL; every figure measured, every decision seen across hosts, every recorded
/// statement found in the store (the run fails otherwise), and the section written between its
/// markers so that a second run replaces it rather than adding another.
#[test]
fn fleet_bench_quick_runs_end_to_end() {
    jitgate_e2e::root_or_skip!();
    let xtask = find_bin("xtask");
    let bin_dir = xtask.parent().expect("bin dir").to_owned();
    let out = std::env::temp_dir().join(format!("jitgate-fleet-quick-{}.md", std::process::id()));
    std::fs::write(&out, "# Benchmarks\n\nkept above\n").expect("a report to add to");
    for _ in 0..2 {
        let run = Command::new(&xtask)
            .args(["bench", "fleet", "--quick", "--bin-dir"])
            .arg(&bin_dir)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("running xtask bench fleet --quick");
        assert!(
            run.status.success(),
            "bench fleet --quick failed:\n{}\n{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
    }
    let report = std::fs::read_to_string(&out).expect("the report");
    let _ = std::fs::remove_file(&out);
    assert!(
        report.starts_with("# Benchmarks\n\nkept above\n"),
        "{report}"
    );
    assert_eq!(
        report
            .matches("## Fleet: one PostgreSQL store, many hosts")
            .count(),
        1,
        "{report}"
    );
    for section in [
        "Fleet: the store's cost of hosts at rest",
        "Fleet: recording statements (sessions included)",
        "Fleet: decisions across hosts, p50 / p99 (ms)",
        "Fleet targets",
    ] {
        assert!(
            report.contains(&format!("### {section}")),
            "no {section:?} in:\n{report}"
        );
    }
    // Two fleet sizes, each a row in each of the three figure tables.
    for hosts in ["| 3 |", "| 6 |"] {
        let rows = report.lines().filter(|l| l.starts_with(hosts)).count();
        assert_eq!(rows, 3, "{hosts}: {report}");
    }
    assert!(!report.contains("n/a"), "a figure is missing:\n{report}");
    assert!(!report.contains("NaN"), "a figure is missing:\n{report}");
    let verdicts = report
        .lines()
        .filter(|l| l.ends_with("| met |") || l.ends_with("| MISSED |"))
        .count();
    assert_eq!(verdicts, 4, "{report}");
}
