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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jitgated: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(jitgate::daemon::run(&args.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jitgated: {e:#}");
            ExitCode::FAILURE
        }
    }
}
