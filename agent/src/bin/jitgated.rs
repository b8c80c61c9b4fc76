//! `jitgated`: the jitgate host agent.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use jitgate::config::{Config, DEFAULT_CONFIG_PATH};

/// The jitgate host agent: attaches the gate to the kernel, runs the proxy, keeps grants.
#[derive(Parser)]
#[command(name = "jitgated", version)]
struct Args {
    /// Configuration file.
    #[arg(long, short, env = "JITGATE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Validate the configuration file and exit (0 when valid).
    #[arg(long, value_name = "PATH")]
    check_config: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
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
    let filter = tracing_subscriber::EnvFilter::try_from_env("JITGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
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
