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
    match runtime.block_on(jitgate::daemon::run(config, threads)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jitgated: {e:#}");
            ExitCode::FAILURE
        }
    }
}
