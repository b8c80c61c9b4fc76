//! `jitgated`'s command line. Defined here, beside the `jitgate` command's, so that man
//! pages and completions for both come from one place.

use std::path::PathBuf;

use clap::Parser;

use crate::config::DEFAULT_CONFIG_PATH;

/// The jitgate host agent: attaches the gate to the kernel, runs the proxy, keeps grants.
///
/// Run by systemd (jitgated.service) on hosts installed from packages. SIGHUP re-reads the
/// configuration; SIGTERM drains sessions and stops, leaving the gate closed.
#[derive(Parser)]
#[command(name = "jitgated", version)]
pub struct DaemonArgs {
    /// Configuration file.
    #[arg(long, short, env = "JITGATE_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Validate the configuration file and exit (0 when valid).
    #[arg(long, value_name = "PATH")]
    pub check_config: Option<PathBuf>,
    /// Fleet mode, with jitgated stopped: retire this host's local spool on purpose (every
    /// record shipped), record it in the shared store, and remove the spool file, so that
    /// the next start's new spool is not reported as records lost. Exits 0 when done.
    #[arg(long)]
    pub retire_spool: bool,
    /// Log as JSON lines instead of text (or the journal, under systemd).
    #[arg(long)]
    pub log_json: bool,
}
