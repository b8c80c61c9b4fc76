//! `cargo xtask bench`: what the gate costs, side by side with what users would run instead.
//!
//! One run sets up its own world ([`env`]), then measures in stages; within a stage the
//! variants are interleaved round by round, so that the noise of a shared machine hits them
//! alike. Every figure comes from raw samples summarised here ([`stats`]); the tables are
//! printed and written to `BENCHMARKS.md` with the machine, the command and each target's
//! verdict. `--quick` runs every stage with tiny sizes: the test suite checks that it works
//! end to end, never what it measures.

mod env;
mod fleet;
mod http;
mod stages;
mod stats;

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use self::{env::Env, stats::Table};
use crate::is_root;

/// How much of everything a run does.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// pgbench seconds per run, and rounds of every variant per cell.
    pub secs: u32,
    pub rounds: usize,
    pub clients: Vec<u32>,
    pub scale: u32,
    /// Connection setups per variant.
    pub setups: usize,
    /// `connect()` samples per variant.
    pub connects: usize,
    pub idle: usize,
    /// Rows of the masked result.
    pub people: u32,
}

impl Sizes {
    pub fn full() -> Self {
        Self {
            secs: 5,
            rounds: 2,
            clients: vec![1, 8, 32],
            scale: 10,
            setups: 200,
            connects: 4000,
            idle: 10_000,
            people: 200_000,
        }
    }

    pub fn quick() -> Self {
        Self {
            secs: 1,
            rounds: 1,
            clients: vec![1, 8, 32],
            scale: 1,
            setups: 10,
            connects: 200,
            idle: 200,
            people: 5_000,
        }
    }
}

/// Which part of the bench a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// Every stage but the fleet's; writes BENCHMARKS.md.
    All,
    /// Only the fleet bench (`cargo xtask bench fleet`), into its own BENCHMARKS.md section.
    Fleet,
    /// Only the HTTP stage and the JSON masker (`cargo xtask bench http`); the report goes
    /// under target/bench/, since BENCHMARKS.md holds whole runs only.
    Http,
    /// Only the idle-connection stage (`cargo xtask bench idle`), under target/bench/.
    Idle,
    /// Only the masking stages (`cargo xtask bench mask`), under target/bench/.
    Mask,
    /// Only the pgbench matrix (`cargo xtask bench pg`), under target/bench/.
    Pg,
}

pub struct Options {
    pub suite: Suite,
    /// Fleet sizes for the fleet bench (empty: its defaults).
    pub hosts: Vec<usize>,
    pub quick: bool,
    /// pgbench client counts instead of the defaults (empty: the defaults).
    pub clients: Vec<u32>,
    /// Use binaries already built there (no build step).
    pub bin_dir: Option<PathBuf>,
    pub out: Option<PathBuf>,
}

/// Written after the generated part; what follows it in an existing file (the analysis of the
/// figures) is kept when the results are regenerated.
const NOTES_MARKER: &str =
    "<!-- Generated above by `cargo xtask bench`; the notes below are kept across runs. -->";

pub fn run(opts: &Options) -> Result<()> {
    if !is_root() {
        bail!(
            "the benchmarks load the gate into the kernel and create cgroups: run them as root (`sudo -E cargo xtask bench`)"
        );
    }
    let bin_dir = match &opts.bin_dir {
        Some(d) => d
            .canonicalize()
            .with_context(|| format!("--bin-dir {}", d.display()))?,
        None => {
            crate::setup::setup()?;
            crate::run(crate::cargo().args(["build", "--release", "--bins"]))?;
            crate::target_dir("release")
        }
    };
    if opts.suite == Suite::Fleet {
        let out = opts.out.clone().unwrap_or_else(|| {
            if opts.quick {
                crate::target_dir("bench").join("BENCHMARKS-fleet-quick.md")
            } else {
                crate::root().join("BENCHMARKS.md")
            }
        });
        return fleet::run(&bin_dir, opts.quick, &opts.hosts, &out);
    }
    let mut sizes = if opts.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    if !opts.clients.is_empty() {
        sizes.clients.clone_from(&opts.clients);
    }
    if matches!(
        opts.suite,
        Suite::Http | Suite::Idle | Suite::Mask | Suite::Pg
    ) {
        return run_part(&bin_dir, &sizes, opts);
    }
    let out = opts.out.clone().unwrap_or_else(|| {
        if opts.quick {
            crate::target_dir("bench").join("BENCHMARKS-quick.md")
        } else {
            crate::root().join("BENCHMARKS.md")
        }
    });
    let started = Instant::now();
    println!(
        "== jitgate benchmarks ({}) ==",
        if opts.quick { "quick" } else { "full" }
    );
    let mut env = Env::start(&bin_dir, sizes.scale, sizes.people)?;
    let results = stages::run_all(&mut env, &sizes)?;
    drop(env);
    let elapsed = started.elapsed();

    let mut tables: Vec<Table> = results.tables();
    let targets = results.targets();
    tables.push(targets);
    for t in &tables {
        println!("\n{}", t.text());
    }
    let command = if opts.quick {
        "cargo xtask bench --quick"
    } else {
        "cargo xtask bench"
    };
    let mut doc = format!(
        "# Benchmarks\n\n\
         What the gate costs on the data path, measured side by side with PostgreSQL direct\n\
         and with pgbouncer in session mode. Regenerate with `{command}` (as root; it builds\n\
         in release mode, sets up its own PostgreSQL, pgbouncer and host agent, and tears\n\
         them down). Variants are interleaved round by round; compare ratios within one run.\n\n\
         ## Run\n\n{}\n- Command: `{command}`; measuring took {:.1} min ({} s per pgbench run, {} round(s)).\n\n\
         ## Results\n\n",
        machine(&bin_dir),
        elapsed.as_secs_f64() / 60.0,
        sizes.secs,
        sizes.rounds,
    );
    for t in &tables {
        doc.push_str(&t.markdown());
        doc.push('\n');
    }
    doc.push_str(NOTES_MARKER);
    doc.push_str("\n\n");
    if let Ok(old) = fs::read_to_string(&out)
        && let Some((_, notes)) = old.split_once(NOTES_MARKER)
    {
        doc.push_str(notes.trim_start_matches('\n'));
    }
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&out, doc).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "\nwrote {} (measuring took {:.1} min)",
        out.display(),
        elapsed.as_secs_f64() / 60.0
    );
    Ok(())
}

/// One stage alone (`bench http`, `bench idle`, `bench mask`, `bench pg`), reported under target/bench/.
fn run_part(bin_dir: &Path, sizes: &Sizes, opts: &Options) -> Result<()> {
    let name = match opts.suite {
        Suite::Http => "http",
        Suite::Mask => "mask",
        Suite::Pg => "pg",
        _ => "idle",
    };
    let out = opts.out.clone().unwrap_or_else(|| {
        crate::target_dir("bench").join(if opts.quick {
            format!("BENCHMARKS-{name}-quick.md")
        } else {
            format!("BENCHMARKS-{name}.md")
        })
    });
    let started = Instant::now();
    println!(
        "== jitgate benchmarks, {name} alone ({}) ==",
        if opts.quick { "quick" } else { "full" }
    );
    let mut env = Env::start(bin_dir, sizes.scale, sizes.people)?;
    let tables = match opts.suite {
        Suite::Http => stages::run_http(&mut env, sizes)?,
        Suite::Mask => stages::run_mask(&mut env, sizes)?,
        Suite::Pg => stages::run_pg(&mut env, sizes)?,
        _ => stages::run_idle(&mut env, sizes)?,
    };
    drop(env);
    let elapsed = started.elapsed();
    let mut doc = format!(
        "# Benchmarks: {name} alone\n\n{}\n- Command: `cargo xtask bench {name}{}`; measuring took {:.1} min ({} s per run, {} round(s)).\n\n",
        machine(bin_dir),
        if opts.quick { " --quick" } else { "" },
        elapsed.as_secs_f64() / 60.0,
        sizes.secs,
        sizes.rounds,
    );
    for t in &tables {
        println!("\n{}", t.text());
        doc.push_str(&t.markdown());
        doc.push('\n');
    }
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&out, doc).with_context(|| format!("writing {}", out.display()))?;
    println!("\nwrote {}", out.display());
    Ok(())
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// The machine and software the figures come from.
fn machine(bin_dir: &Path) -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = first_line(Command::new("uname").arg("-r"));
    let postgres = env::Env::postgres_version();
    let bouncer = first_line(Command::new("pgbouncer").arg("--version"));
    let rev = first_line(
        Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(crate::root()),
    );
    let profile = if bin_dir.ends_with("release") {
        "release"
    } else {
        "debug (figures not representative)"
    };
    format!(
        "- Machine: {cpu}, {cores} cores, {mem_gib:.1} GiB, Linux {kernel}\n\
         - Software: {postgres}, {bouncer}, jitgate {rev} ({profile} build)"
    )
}
