//! PostgreSQL's own regression suite for the compatibility runs (`tests/tests/regress.rs`):
//! its SQL, expected outputs and schedules from the Debian source of the installed server,
//! and `regress.so` (the C functions the suite loads) built against the installed headers.
//!
//! Everything lands in `target/compat/regress/`: `src/` (the source's `src/test/regress`),
//! `lib/` (`regress.so`, and links to the installed `autoinc.so` and `refint.so`), and
//! `VERSION` (the source version, and the server's when they differ). Fetched once; a new
//! server version fetches again.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::run;

/// Where the suite lives.
pub fn dir() -> PathBuf {
    crate::target_dir("compat").join("regress")
}

/// The installed server's major version (the newest under /usr/lib/postgresql).
fn major() -> Result<String> {
    let mut majors: Vec<u32> = fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|v| Path::new(&format!("/usr/lib/postgresql/{v}/bin/postgres")).exists())
        .collect();
    majors.sort_unstable();
    majors
        .pop()
        .map(|v| v.to_string())
        .context("no PostgreSQL server under /usr/lib/postgresql")
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Debian source versions apt knows for `package`.
fn source_versions(package: &str) -> Vec<String> {
    Command::new("apt-cache")
        .args(["showsrc", package])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix("Version: "))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Adds `deb-src` twins of the machine's Debian `deb` entries (deb822 `.sources` files), so
/// `apt-get source` works, then refreshes the package lists.
fn enable_deb_src() -> Result<()> {
    let mut stanzas = Vec::new();
    for entry in fs::read_dir("/etc/apt/sources.list.d")?.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "sources") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap_or_default();
        for stanza in text.split("\n\n") {
            let is_debian = stanza.lines().any(|l| {
                l.starts_with("URIs:") && l.contains("debian") && !l.contains("nodesource")
            });
            let binary_only = stanza.lines().any(|l| l.trim() == "Types: deb");
            if is_debian && binary_only {
                stanzas.push(stanza.replace("Types: deb", "Types: deb-src"));
            }
        }
    }
    if stanzas.is_empty() {
        bail!(
            "no Debian package source found in /etc/apt/sources.list.d to add a deb-src entry for; \
             add one for your mirror (Types: deb-src) and run again"
        );
    }
    fs::write(
        "/etc/apt/sources.list.d/jitgate-deb-src.sources",
        stanzas.join("\n\n") + "\n",
    )?;
    run(Command::new("apt-get").args(["update", "-q"]))
}

/// Versions to try, best first: the installed server's own, then the others of its major
/// version, newest first (a mirror may lack the source of a security update).
fn candidates(installed: &str, available: &[String]) -> Vec<String> {
    let mut others: Vec<String> = available
        .iter()
        .filter(|v| *v != installed)
        .cloned()
        .collect();
    // apt lists a version once per suite that has it.
    others.sort();
    others.dedup();
    // Newest first, as dpkg orders versions (a total order on distinct versions).
    others.sort_by(|a, b| {
        let newer = Command::new("dpkg")
            .args(["--compare-versions", a, "gt", b])
            .status()
            .is_ok_and(|s| s.success());
        match (a == b, newer) {
            (true, _) => std::cmp::Ordering::Equal,
            (false, true) => std::cmp::Ordering::Less,
            (false, false) => std::cmp::Ordering::Greater,
        }
    });
    let mut all = Vec::new();
    if available.iter().any(|v| v == installed) {
        all.push(installed.to_owned());
    }
    all.extend(others);
    all
}

/// Fetches the suite and builds its library unless already there for this server.
pub fn prepare() -> Result<PathBuf> {
    let major = major()?;
    let package = format!("postgresql-{major}");
    let installed = output(Command::new("dpkg-query").args(["-W", "-f", "${Version}", &package]))
        .with_context(|| format!("which {package} is installed"))?;
    let dir = dir();
    let stamp = dir.join("VERSION");
    let lib = dir.join("lib");
    if fs::read_to_string(&stamp)
        .is_ok_and(|s| s.lines().any(|l| l == format!("server {installed}")))
        && lib.join("regress.so").exists()
    {
        return Ok(dir);
    }
    if !crate::is_root() {
        bail!("fetching PostgreSQL's regression suite needs root (apt-get); run as root");
    }
    let mut available = source_versions(&package);
    if available.is_empty() {
        enable_deb_src()?;
        available = source_versions(&package);
    }
    let download = crate::target_dir("compat").join("download");
    fs::create_dir_all(&download)?;
    let mut fetched = None;
    for version in candidates(&installed, &available) {
        eprintln!(
            "xtask: fetching the source of {package} {version} (PostgreSQL's regression suite)"
        );
        let ok = Command::new("apt-get")
            .args(["source", "-q", "--download-only"])
            .arg(format!("{package}={version}"))
            .current_dir(&download)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            fetched = Some(version);
            break;
        }
    }
    let Some(version) = fetched else {
        bail!(
            "could not fetch the source of {package} (versions known to apt: {available:?}); \
             check the deb-src entries in /etc/apt/sources.list.d"
        );
    };
    let upstream = version.split('-').next().unwrap_or(&version).to_owned();
    let tarball = download.join(format!("{package}_{upstream}.orig.tar.bz2"));
    let _ = fs::remove_dir_all(&dir);
    let src = dir.join("src");
    fs::create_dir_all(&src)?;
    run(Command::new("tar")
        .arg("xjf")
        .arg(&tarball)
        .arg("-C")
        .arg(&src)
        .arg("--strip-components=4")
        .arg(format!("postgresql-{upstream}/src/test/regress")))?;
    fs::create_dir_all(&lib)?;
    run(Command::new("gcc")
        .args(["-O1", "-fPIC", "-shared"])
        .arg(format!("-I/usr/include/postgresql/{major}/server"))
        .arg("-I/usr/include/postgresql/internal")
        .arg(src.join("regress.c"))
        .arg("-o")
        .arg(lib.join("regress.so")))
    .context("building regress.so (needs the server headers, postgresql-server-dev)")?;
    // The trigger tests load two contrib modules the server package ships.
    for module in ["autoinc.so", "refint.so"] {
        let installed = PathBuf::from(format!("/usr/lib/postgresql/{major}/lib/{module}"));
        if installed.exists() {
            std::os::unix::fs::symlink(&installed, lib.join(module))?;
        }
    }
    let mut note = format!("source {version}\nserver {installed}\n");
    if version != installed {
        note.push_str(
            "note: the mirror has no source for the installed server; the suite is from the \
             nearest version, so a few tests may differ from their expected output directly \
             (the comparison is direct against gated, so it holds either way)\n",
        );
        eprintln!("xtask: {}", note.lines().last().unwrap_or_default());
    }
    fs::write(&stamp, note)?;
    Ok(dir)
}
