//! `jitgated`: the jitgate host agent.

use std::process::ExitCode;

use clap::Parser;
use jitgate::{cli::daemon::DaemonArgs, config::Config};

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
    // The runtime runs on a thread of its own, not on the main thread: glibc gives the main
    // thread the brk-based arena, which held 43 KiB per idle gated connection where a thread's
    // arena holds 28 (measured at 9,900 connections with one thread).
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
