//! Man pages and shell completions for both binaries, generated from their clap definitions
//! so they never drift from the real options. Packaging calls `jitgate generate-docs DIR`.

use std::{io, path::Path};

use clap::CommandFactory as _;
use clap_complete::Shell;

use super::{Cli, daemon::DaemonArgs};

/// A command's completion file name, as a shell's completion loader looks for it.
type FileName = fn(&str) -> String;

/// The shells packages ship completions for: directory and file name.
const SHELLS: [(Shell, &str, FileName); 3] = [
    (Shell::Bash, "bash", |cmd| cmd.to_owned()),
    (Shell::Zsh, "zsh", |cmd| format!("_{cmd}")),
    (Shell::Fish, "fish", |cmd| format!("{cmd}.fish")),
];

/// Writes `DIR/man/*.{1,8}` and `DIR/completions/{bash,zsh,fish}/*`.
pub fn generate(dir: &Path) -> io::Result<()> {
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(Cli::command(), &man)?;
    clap_mangen::Man::new(DaemonArgs::command())
        .section("8")
        .generate_to(&man)?;
    for (shell, name, file) in SHELLS {
        let out = dir.join("completions").join(name);
        std::fs::create_dir_all(&out)?;
        for (mut cmd, bin) in [
            (Cli::command(), "jitgate"),
            (DaemonArgs::command(), "jitgated"),
        ] {
            let mut f = std::fs::File::create(out.join(file(bin)))?;
            clap_complete::generate(shell, &mut cmd, bin, &mut f);
        }
    }
    Ok(())
}

/// Prints the completion script for `jitgate` in `shell`.
pub fn print_completions(shell: Shell) {
    clap_complete::generate(shell, &mut Cli::command(), "jitgate", &mut io::stdout());
}
