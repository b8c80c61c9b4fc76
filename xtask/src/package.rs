//! `cargo xtask package`: the .deb and .rpm.
//!
//! Release binaries (the eBPF object is embedded in `jitgated`), man pages and completions
//! generated from the CLI definitions into `packaging/build/`, then cargo-deb and
//! cargo-generate-rpm with the metadata in `agent/Cargo.toml`. Unit files, the default config
//! and maintainer scripts live in `packaging/`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, root, run, setup, target_dir};

pub struct Options {
    /// Where the packages go (default: target/package/).
    pub out: Option<PathBuf>,
}

/// Builds both packages; returns their paths (.deb first).
pub fn run_package(opts: &Options) -> Result<Vec<PathBuf>> {
    setup::setup()?;
    setup::packaging_tools()?;
    let out = opts.out.clone().unwrap_or_else(|| target_dir("package"));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;

    run(cargo().args(["build", "--release", "--bins", "-p", "jitgate"]))?;
    let docs = root().join("packaging/build");
    let _ = std::fs::remove_dir_all(&docs);
    run(Command::new(target_dir("release").join("jitgate"))
        .arg("generate-docs")
        .arg(&docs))?;
    gzip_man_pages(&docs.join("man"))?;

    for old in std::fs::read_dir(&out)?.flatten() {
        let p = old.path();
        if p.extension().is_some_and(|e| e == "deb" || e == "rpm") {
            std::fs::remove_file(&p)?;
        }
    }
    run(cargo()
        .args(["deb", "-p", "jitgate", "--no-build", "--output"])
        .arg(&out))?;
    run(cargo()
        .args([
            "generate-rpm",
            "-p",
            "agent",
            "--payload-compress",
            "gzip",
            "--output",
        ])
        .arg(&out))?;

    let mut built: Vec<PathBuf> = std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb" || e == "rpm"))
        .collect();
    built.sort_by_key(|p| p.extension().is_some_and(|e| e == "rpm"));
    if built.len() != 2 {
        bail!(
            "expected one .deb and one .rpm in {}, found {built:?}",
            out.display()
        );
    }
    for p in &built {
        println!("{}", p.display());
    }
    Ok(built)
}

/// Man pages ship compressed (Debian policy; rpm does the same).
fn gzip_man_pages(dir: &Path) -> Result<()> {
    for page in std::fs::read_dir(dir)?.flatten() {
        let p = page.path();
        if p.extension().is_some_and(|e| e == "1" || e == "8") {
            run(Command::new("gzip").args(["-9nf"]).arg(&p))?;
        }
    }
    Ok(())
}
