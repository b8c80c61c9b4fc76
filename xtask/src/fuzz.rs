//! `cargo xtask fuzz`: builds the cargo-fuzz targets in `fuzz/` (their own workspace, on the
//! preinstalled nightly) and runs each for a while against its committed seed corpus. New
//! inputs libFuzzer finds go to `target/fuzz/corpus/<target>` (the committed corpus stays
//! as it is), crashes to `target/fuzz/artifacts/<target>/`. `cargo xtask test` runs every
//! target for a few seconds; a crash fails it.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{root, run, target_dir};

/// Every target in `fuzz/fuzz_targets/`, in the order they run.
pub const TARGETS: &[&str] = &[
    "pg_frontend",
    "pg_session",
    "sql_analysis",
    "masking",
    "config",
    "http_request",
];

/// cargo-fuzz at the version the targets are written for.
pub fn install() -> Result<()> {
    let installed = fuzz_cmd()
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("0.13.2"));
    if installed {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz 0.13.2");
    run(crate::cargo().args(["install", "--locked", "cargo-fuzz", "--version", "0.13.2"]))
}

pub struct Options {
    /// One target, or all of them.
    pub target: Option<String>,
    pub seconds: u32,
    /// `none` or `address` (libpg_query is C: AddressSanitizer sees its memory errors; the
    /// build takes about twice as long).
    pub sanitizer: String,
}

/// `cargo +nightly` through rustup's proxy (cargo-fuzz needs nightly for the sanitizer and
/// coverage flags), in the workspace root.
fn fuzz_cmd() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root())
        .env("PATH", crate::setup::path_with_cargo_bin())
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        // The kernel programs are not needed (they have their own build): the fuzzed code
        // is all userspace.
        .env("AYA_BUILD_SKIP", "1")
        .arg("+nightly");
    c
}

/// What libFuzzer said at the end of a run: `Done N runs in S second(s)`.
fn runs(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("Done ") && l.contains(" runs in "))
        .map(str::to_owned)
}

pub fn run_fuzz(opts: &Options) -> Result<()> {
    install()?;
    let targets: Vec<&str> = match &opts.target {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!("no fuzz target {t}; there are {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    run(fuzz_cmd().args(["fuzz", "build", "-s", &opts.sanitizer]))
        .context("building the fuzz targets")?;
    let mut summary = Vec::new();
    for target in targets {
        let found = target_dir("fuzz").join("corpus").join(target);
        let artifacts: PathBuf = target_dir("fuzz").join("artifacts").join(target);
        std::fs::create_dir_all(&found)?;
        std::fs::create_dir_all(&artifacts)?;
        let seeds = root().join("fuzz/corpus").join(target);
        eprintln!("xtask: fuzzing {target} for {} s", opts.seconds);
        let out = fuzz_cmd()
            .args(["fuzz", "run", "-s", &opts.sanitizer, target])
            .arg(&found)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", opts.seconds))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-rss_limit_mb=3072")
            .arg("-timeout=20")
            .output()
            .with_context(|| format!("running fuzz target {target}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let tail: Vec<&str> = stderr.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {target} failed (input kept in {}):\n{}",
                artifacts.display(),
                tail.join("\n")
            );
        }
        let done = runs(&stderr).unwrap_or_else(|| "finished".into());
        summary.push(format!("{target}: {done}, no crash"));
    }
    for line in summary {
        println!("xtask: fuzz {line}");
    }
    Ok(())
}
