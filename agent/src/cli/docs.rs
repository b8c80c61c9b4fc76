//! Man pages and shell completions for both binaries, generated from their clap definitions
//! so they never drift from the real options. Packaging calls `jitgate generate-docs DIR`.

use std::{io, path::Path};

use clap::CommandFactory as _;
use clap_complete::Shell;

use super::{Cli, daemon::DaemonArgs};

/// The shells packages ship completions for, and where each package puts them.
const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "bash"),
    (Shell::Zsh, "zsh"),
    (Shell::Fish, "fish"),
];

/// Writes `DIR/man/*.{1,8}` and `DIR/completions/{bash,zsh,fish}/*`.
pub fn generate(dir: &Path) -> io::Result<()> {
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(Cli::command(), &man)?;
    clap_mangen::Man::new(DaemonArgs::command())
        .section("8")
        .generate_to(&man)?;
    for (shell, name) in SHELLS {
        let out = dir.join("completions").join(name);
        std::fs::create_dir_all(&out)?;
        clap_complete::generate_to(shell, &mut Cli::command(), "jitgate", &out)?;
        clap_complete::generate_to(shell, &mut DaemonArgs::command(), "jitgated", &out)?;
    }
    Ok(())
}

/// Prints the completion script for `jitgate` in `shell`.
pub fn print_completions(shell: Shell) {
    clap_complete::generate(shell, &mut Cli::command(), "jitgate", &mut io::stdout());
}
