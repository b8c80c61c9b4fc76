//! `cargo xtask`: the project's own commands.
//!
//! * `setup`  installs what building and testing need (nightly rust-src, LLVM 22, bpf-linker,
//!   curl, python3, PostgreSQL, pgbouncer, sqlite3, rpm, debootstrap), skipping what is there.
//! * `test`   setup, build, then every test: unit tests and the end-to-end suite (root).
//! * `demo`   setup, build, then a narrated end-to-end scenario; leaves the daemon running.
//! * `lint`   rustfmt --check and clippy with warnings denied.
//! * `bench`  PostgreSQL direct vs pgbouncer vs jitgate (full policy, tcp relay); writes
//!   BENCHMARKS.md. `--quick` runs every stage with tiny sizes. `bench fleet`: simulated
//!   hosts on one shared PostgreSQL store (the store's cost per host and per statement,
//!   decisions timed across hosts), into the fleet section of BENCHMARKS.md. `bench http`:
//!   the HTTP stage and the JSON masker alone, reported under target/bench/; `bench idle`
//!   the idle-connection stage alone; `bench mask` the masking stages; `bench pg` the pgbench
//!   matrix.
//! * `compat` PostgreSQL's whole regression suite directly and through the gate, compared
//!   (`tests/tests/regress.rs`; the test suite runs a subset).
//! * `fuzz`   the cargo-fuzz targets in `fuzz/` (every parser that reads a workload's
//!   bytes), each for `--seconds` (the test suite runs them for a few seconds each).
//! * `package` the .deb and .rpm (release build, man pages, completions) in target/package/.

mod bench;
mod demo;
mod fuzz;
mod local;
mod package;
mod regress;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

/// A bench run apart from the main one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BenchSuite {
    /// Simulated hosts on one shared PostgreSQL store (issue 18's scale figures).
    Fleet,
    /// The HTTP stage and the JSON masker alone (report under target/bench/).
    Http,
    /// The idle-connection stage alone (report under target/bench/).
    Idle,
    /// The masking stages alone, end to end and the engine (report under target/bench/).
    Mask,
    /// The pgbench matrix alone (report under target/bench/).
    Pg,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install build and test prerequisites that are missing.
    Setup,
    /// Build everything (kernel programs included).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run every test (end-to-end tests need root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Show jitgate working end to end on this machine; leaves the daemon running.
    Demo {
        /// Stop a demo left running, detach its gate and clean up.
        #[arg(long)]
        stop: bool,
    },
    /// rustfmt --check and clippy -D warnings.
    Lint,
    /// Measure the gate against PostgreSQL direct and pgbouncer; writes BENCHMARKS.md.
    /// `bench fleet`: only the fleet bench (simulated hosts on one shared PostgreSQL store),
    /// into its own section of BENCHMARKS.md; `bench http|idle|mask|pg`: one stage alone.
    Bench {
        /// `fleet` for the fleet bench alone; `http`, `idle`, `mask` or `pg` for that stage
        /// alone.
        #[arg(value_enum)]
        suite: Option<BenchSuite>,
        /// Fleet sizes for `bench fleet` (default 10,100,1000; 3,6 with --quick).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<usize>,
        /// Every stage with tiny sizes (checks the bench works; figures mean nothing).
        #[arg(long)]
        quick: bool,
        /// pgbench client counts (default 1,8,32), for `bench pg` or the whole run.
        #[arg(long, value_delimiter = ',')]
        clients: Vec<u32>,
        /// Binaries already built there (default: a release build first).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Where the report goes (default: BENCHMARKS.md, or target/bench/ with --quick).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run PostgreSQL's whole regression suite directly and through the gate and compare
    /// (root); the summary goes to target/compat/regress.md.
    Compat,
    /// Run the fuzz targets in fuzz/ (nightly, cargo-fuzz).
    Fuzz {
        /// One target (pg_frontend, sql_analysis, masking, config); default all.
        #[arg(long)]
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// `none`, or `address` to catch memory errors in the C parser (slower build).
        #[arg(long, default_value = "none")]
        sanitizer: String,
    },
    /// Build the .deb and .rpm packages.
    Package {
        /// Directory for the packages [default: target/package]
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    // bpf-linker installs into ~/.cargo/bin; make sure the nested eBPF build finds it.
    c.env("PATH", setup::path_with_cargo_bin());
    c
}

/// Runs a command, failing with its name if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn build(release: bool) -> Result<()> {
    let mut c = cargo();
    c.args(["build", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

pub fn target_dir(profile: &str) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), PathBuf::from)
        .join(profile)
}

fn test(args: &[String]) -> Result<()> {
    setup::setup()?;
    build(false)?;
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    if !is_root() {
        if ci {
            bail!("CI=true but not running as root: the end-to-end tests need root (BPF, cgroups)");
        }
        eprintln!(
            "\n*** Not root: the end-to-end tests will SKIP. Run `sudo -E cargo xtask test` to run them. ***\n"
        );
    }
    let mut c = cargo();
    c.args(["test", "--no-fail-fast"])
        .args(args)
        .env("JITGATE_BIN_DIR", target_dir("debug"));
    let tests = run(&mut c);
    // Every parser that reads a workload's bytes, briefly (`cargo xtask fuzz` for longer).
    // Skipped when a filter picks some tests only.
    let fuzzed = if args.is_empty() {
        fuzz::run_fuzz(&fuzz::Options {
            target: None,
            seconds: 10,
            sanitizer: "none".into(),
        })
    } else {
        Ok(())
    };
    tests.and(fuzzed)
}

/// The full regression comparison: the ignored test in `tests/tests/regress.rs`.
fn compat() -> Result<()> {
    setup::setup()?;
    build(false)?;
    if !is_root() {
        bail!(
            "the regression comparison needs root (BPF, cgroups): run `sudo -E cargo xtask compat`"
        );
    }
    let mut c = cargo();
    c.args([
        "test",
        "-p",
        "jitgate-e2e",
        "--test",
        "regress",
        "--",
        "--ignored",
        "--nocapture",
        "whole_suite",
    ])
    .env("JITGATE_BIN_DIR", target_dir("debug"));
    run(&mut c)
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    // The fuzz targets are their own workspace.
    run(cargo().args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--check"]))?;
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Cmd::Setup => setup::setup(),
        Cmd::Build { release } => setup::setup().and_then(|()| build(release)),
        Cmd::Test { args } => test(&args),
        Cmd::Demo { stop: true } => demo::stop(),
        Cmd::Demo { stop: false } => setup::setup()
            .and_then(|()| build(false))
            .and_then(|()| demo::run(&target_dir("debug"))),
        Cmd::Lint => setup::setup().and_then(|()| lint()),
        Cmd::Bench {
            suite,
            hosts,
            quick,
            clients,
            bin_dir,
            out,
        } => bench::run(&bench::Options {
            suite: match suite {
                None => bench::Suite::All,
                Some(BenchSuite::Fleet) => bench::Suite::Fleet,
                Some(BenchSuite::Http) => bench::Suite::Http,
                Some(BenchSuite::Idle) => bench::Suite::Idle,
                Some(BenchSuite::Mask) => bench::Suite::Mask,
                Some(BenchSuite::Pg) => bench::Suite::Pg,
            },
            hosts,
            quick,
            clients,
            bin_dir,
            out,
        }),
        Cmd::Compat => compat(),
        Cmd::Fuzz {
            target,
            seconds,
            sanitizer,
        } => setup::setup().and_then(|()| {
            fuzz::run_fuzz(&fuzz::Options {
                target,
                seconds,
                sanitizer,
            })
        }),
        Cmd::Package { out } => package::run_package(&package::Options { out }).map(drop),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
