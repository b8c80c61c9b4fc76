//! `jitgated`: the jitgate host agent.

use std::process::ExitCode;

use clap::Parser;
use jitgate::{cli::daemon::DaemonArgs, config::Config};

/// The agent allocates and frees small buffers on every message it relays (HTTP headers,
/// TLS records, statement records); glibc's allocator took about a sixth (18%) of the agent's
/// CPU per HTTP request (`perf`, `cargo xtask bench http`). mimalloc's per-thread free lists
/// are cheaper there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc 2's `mi_option_arena_eager_commit` (`mimalloc.h`, `mi_option_e`; the crate
/// exports no constant for it, and `features = ["v2"]` pins the enum this names).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Arenas committed eagerly (mimalloc's default where the OS overcommits) held an idle gated
/// connection at 38 KiB of resident memory and a fresh agent at 59 MiB; committed on
/// demand, 20 KiB and 32 MiB (glibc's allocator: 24 KiB and 24 MiB; `cargo xtask bench
/// idle`, 9,872 connections), at the same CPU per request.
/// Set before the first arena is reserved: in a constructor, which runs before any Rust
/// allocation (mimalloc serves only Rust's allocations here; C code keeps glibc's malloc).
/// Being set in code, it wins over `MIMALLOC_ARENA_EAGER_COMMIT` in the environment (the
/// other `MIMALLOC_*` variables still apply).
#[used]
#[unsafe(link_section = ".init_array")]
static LAZY_ARENAS: extern "C" fn() = {
    extern "C" fn lazy_arenas() {
        // SAFETY: sets one of mimalloc's option values; no allocation, no other state.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    }
    lazy_arenas
};

fn main() -> ExitCode {
    let args = DaemonArgs::parse();
    if let Some(path) = args.check_config {
        return match Config::load(&path) {
            Ok(c) => {
                println!(
                    "{}: valid ({} workloads, {} resources, {} policies)",
                    path.display(),
                    c.workloads.len(),
                    c.resources.len(),
                    c.policies.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    if args.retire_spool {
        return retire_spool(&args.config);
    }
    jitgate::ops::logging::init(args.log_json);
    // The config is read before the runtime exists: it says how many threads to start.
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("jitgated: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let threads = config.daemon.worker_threads.resolve();
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jitgated: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The runtime runs on a thread of its own, not on the main thread: under glibc's
    // allocator (before mimalloc) the main thread's brk-based arena held 43 KiB per idle
    // gated connection where a thread's arena held 28 (9,900 connections, one thread).
    let agent = std::thread::Builder::new()
        .name("jitgated-rt".into())
        .stack_size(8 << 20)
        .spawn(move || runtime.block_on(jitgate::daemon::run(config, threads)));
    let result = match agent.map(std::thread::JoinHandle::join) {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(anyhow::anyhow!("the host agent's runtime thread panicked")),
        Err(e) => Err(anyhow::anyhow!("cannot start the runtime thread: {e}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jitgated: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `jitgated --retire-spool`: see [`jitgate::cli::daemon::DaemonArgs::retire_spool`].
fn retire_spool(path: &std::path::Path) -> ExitCode {
    let result = (|| {
        let config = Config::load(path)?;
        let jitgate::config::StoreConfig::Postgres(options) = &config.daemon.store else {
            anyhow::bail!(
                "[store] is not a postgres store: only a fleet host has a spool to retire"
            );
        };
        // The running agent owns the spool: retiring it under its feet would lose whatever
        // it spools next.
        if std::os::unix::net::UnixStream::connect(&config.daemon.socket).is_ok() {
            anyhow::bail!(
                "jitgated is running (it answers on {}): stop it first (systemctl stop jitgated)",
                config.daemon.socket.display()
            );
        }
        // The agent holds this lock from its first step: the socket answers only later, so
        // the socket alone would let a retire run beside a starting agent.
        let _held = jitgate::daemon::lock_state_dir(&config.daemon.state_dir).map_err(|_| {
            anyhow::anyhow!(
                "jitgated is running (it holds {}): stop it first (systemctl stop jitgated)",
                config.daemon.state_dir.join("jitgated.lock").display()
            )
        })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(jitgate::store::postgres::PostgresStore::retire_spool(
            options,
            &config.daemon.state_dir,
        ))
    })();
    match result {
        Ok(done) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("jitgated --retire-spool: {e:#}");
            ExitCode::FAILURE
        }
    }
}
