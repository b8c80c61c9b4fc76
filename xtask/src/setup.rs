//! Installs what a fresh Debian machine lacks to build and test jitgate. Idempotent: every
//! step checks first and does nothing when its tool is already there.

use std::{
    ffi::OsString,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Result, bail};

use crate::{is_root, run};

/// Debian packages: LLVM 22 for bpf-linker, and the real programs the tests drive. Each
/// comes with the file whose presence means it is there (whatever package provided it).
const PACKAGES: &[(&str, &str, &str)] = &[
    (
        "llvm-22-dev",
        "/usr/lib/llvm-22/bin/llvm-config",
        "LLVM 22, which bpf-linker links against",
    ),
    (
        "libpolly-22-dev",
        "/usr/lib/llvm-22/lib/libPolly.a",
        "LLVM 22 Polly, needed to link bpf-linker",
    ),
    (
        "libclang-dev",
        "/usr/lib/llvm-14/lib/libclang.so",
        "libclang, for the bindings of pg_query (the PostgreSQL parser)",
    ),
    (
        "curl",
        "/usr/bin/curl",
        "HTTP client driven as a gated workload",
    ),
    (
        "nginx",
        "/usr/sbin/nginx",
        "the TLS reverse proxy the HTTP bench compares the gate with",
    ),
    (
        "python3",
        "/usr/bin/python3",
        "scripted workloads and the demo's web server",
    ),
    ("iproute2", "/usr/bin/ip", "host address discovery in tests"),
    (
        "sqlite3",
        "/usr/bin/sqlite3",
        "tamper test on the audit log",
    ),
    (
        "postgresql",
        "/usr/lib/postgresql",
        "a real server behind the gate in tests",
    ),
    (
        "postgresql-server-dev-15",
        "/usr/include/postgresql/15/server/postgres.h",
        "server headers, to build the C functions of PostgreSQL's regression suite",
    ),
    (
        "postgresql-client",
        "/usr/bin/psql",
        "psql as a gated client",
    ),
    ("passwd", "/usr/sbin/useradd", "test accounts"),
    (
        "python3-psycopg2",
        "/usr/lib/python3/dist-packages/psycopg2/__init__.py",
        "psycopg2, a driver in the client compatibility tests",
    ),
    (
        "python3-psycopg",
        "/usr/lib/python3/dist-packages/psycopg/__init__.py",
        "psycopg 3, a driver in the client compatibility tests",
    ),
    (
        "python3-asyncpg",
        "/usr/lib/python3/dist-packages/asyncpg/__init__.py",
        "asyncpg, a driver in the client compatibility tests",
    ),
    (
        "python3-sqlalchemy",
        "/usr/lib/python3/dist-packages/sqlalchemy/__init__.py",
        "SQLAlchemy (over psycopg2), in the client compatibility tests",
    ),
    (
        "python3-requests",
        "/usr/lib/python3/dist-packages/requests/__init__.py",
        "Python requests, an HTTP client in the http tests",
    ),
    (
        "python3-httpx",
        "/usr/lib/python3/dist-packages/httpx/__init__.py",
        "httpx, an HTTP client in the http tests",
    ),
    (
        "python3-websockets",
        "/usr/lib/python3/dist-packages/websockets/__init__.py",
        "a WebSocket server and client in the http tests",
    ),
    (
        "libpostgresql-jdbc-java",
        "/usr/share/java/postgresql.jar",
        "the PostgreSQL JDBC driver, in the client compatibility tests",
    ),
    (
        "nodejs",
        "/usr/bin/node",
        "runs node-postgres and postgres.js in the client compatibility tests",
    ),
    (
        "npm",
        "/usr/bin/npm",
        "installs node-postgres, postgres.js, oidc-provider and playwright-core",
    ),
    (
        "chromium",
        "/usr/bin/chromium",
        "the headless browser the web console tests drive (playwright-core cannot download one)",
    ),
    (
        "openjdk-17-jdk-headless",
        "/usr/lib/jvm/java-17-openjdk-amd64/bin/javac",
        "runs the JDBC compatibility program from source",
    ),
    (
        "golang-go",
        "/usr/bin/go",
        "builds the pgx compatibility program",
    ),
    (
        "golang-github-jackc-pgx-v4-dev",
        "/usr/share/gocode/src/github.com/jackc/pgx/v4/conn.go",
        "pgx, a Go driver in the client compatibility tests",
    ),
    (
        "pgbouncer",
        "/usr/sbin/pgbouncer",
        "the connection pooler the benchmarks compare with",
    ),
    (
        "rpm",
        "/usr/bin/rpm",
        "reads the built .rpm in the package test",
    ),
    (
        "debootstrap",
        "/usr/sbin/debootstrap",
        "a throwaway Debian root the package test installs the .deb into",
    ),
    (
        "systemd",
        "/usr/bin/systemd-analyze",
        "systemd-analyze verify of the shipped units",
    ),
];

fn home() -> PathBuf {
    std::env::var_os("CARGO_HOME").map_or_else(
        || {
            std::env::var_os("HOME")
                .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
                .join(".cargo")
        },
        PathBuf::from,
    )
}

/// PATH with `$CARGO_HOME/bin` in front (where `cargo install` puts bpf-linker).
pub fn path_with_cargo_bin() -> OsString {
    let mut paths = vec![home().join("bin")];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, file, _)| !std::path::Path::new(file).exists())
        .map(|(p, _, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        let list = PACKAGES
            .iter()
            .filter(|(p, _, _)| missing.contains(p))
            .map(|(p, _, why)| format!("  {p}: {why}"))
            .collect::<Vec<_>>()
            .join("\n");
        bail!(
            "missing Debian packages:\n{list}\ninstall them with `sudo apt-get install -y {}` or run this command as root",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly_rust_src() -> Result<()> {
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        eprintln!("xtask: installing the nightly toolchain (kernel programs build with it)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()?;
    if !String::from_utf8_lossy(&components.stdout).contains("rust-src") {
        eprintln!("xtask: adding rust-src to nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let path = path_with_cargo_bin();
    if succeeds(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", &path),
    ) {
        return Ok(());
    }
    eprintln!("xtask: installing bpf-linker (built against LLVM 22, about a minute)");
    let mut llvm_path = OsString::from("/usr/lib/llvm-22/bin:");
    llvm_path.push(&path);
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "bpf-linker",
                "--version",
                "0.13.0",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", llvm_path)
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
}

/// cargo-deb and cargo-generate-rpm, at the versions the package metadata is written for.
pub fn packaging_tools() -> Result<()> {
    for (tool, subcommand, version) in [
        ("cargo-deb", "deb", "3.8.0"),
        ("cargo-generate-rpm", "generate-rpm", "0.21.1"),
    ] {
        let installed = crate::cargo()
            .args([subcommand, "--version"])
            .output()
            .is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains(version)
            });
        if installed {
            continue;
        }
        eprintln!("xtask: installing {tool} {version}");
        run(crate::cargo().args(["install", "--locked", tool, "--version", version]))?;
    }
    Ok(())
}

/// node-postgres and postgres.js for the client compatibility tests, from npm into
/// `tests/compat/node_modules` (where `drivers.js` finds them), at pinned versions.
fn node_drivers() -> Result<()> {
    npm_packages(
        "tests/compat",
        "node-postgres and postgres.js",
        &[("pg", "8.13.1"), ("postgres", "3.4.5")],
    )
}

/// For the web console tests: a real OpenID Provider (`oidc-provider`) and the driver of
/// Debian's chromium (`playwright-core`), from npm into `tests/console/node_modules` (where
/// `provider.mjs` and `browser.mjs` find them; the test runs them as root), at pinned versions.
fn console_packages() -> Result<()> {
    npm_packages(
        "tests/console",
        "oidc-provider and playwright-core",
        &[("oidc-provider", "9.13.3"), ("playwright-core", "1.65.2")],
    )
}

/// Installs `packages` (name, pinned version) from npm into `dir/node_modules` (`dir`
/// relative to the repository), unless those versions are there already.
fn npm_packages(dir: &str, what: &str, packages: &[(&str, &str)]) -> Result<()> {
    let dir = crate::root().join(dir);
    let installed = packages.iter().all(|(name, version)| {
        std::fs::read_to_string(dir.join("node_modules").join(name).join("package.json"))
            .is_ok_and(|p| p.contains(&format!("\"version\": \"{version}\"")))
    });
    if installed {
        return Ok(());
    }
    eprintln!("xtask: installing {what} (npm)");
    run(Command::new("npm")
        .args([
            "install",
            "--no-save",
            "--no-audit",
            "--no-fund",
            "--prefix",
        ])
        .arg(&dir)
        .args(packages.iter().map(|(n, v)| format!("{n}@{v}"))))
}

pub fn setup() -> Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    node_drivers()?;
    console_packages()?;
    crate::fuzz::install()?;
    if is_root() {
        crate::regress::prepare()?;
    } else {
        eprintln!("xtask: not root: PostgreSQL's regression suite is not fetched (its tests skip)");
    }
    Ok(())
}
