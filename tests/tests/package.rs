//! `cargo xtask package` end to end: both packages build; their contents, scripts and units are
//! what an operator relies on; and the .deb installs, upgrades, is removed and purged in a
//! throwaway Debian root (debootstrap) with its maintainer scripts really running.
//!
//! Not covered here: booting that root under systemd (systemd-nspawn) to `systemctl start` the
//! unit. nspawn needs systemd as the host's PID 1, which the CI machines (containers) lack.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

use jitgate_e2e::find_bin;

fn sh(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&sh(cmd).stdout).into_owned()
}

fn target() -> PathBuf {
    find_bin("xtask")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_owned()
}

/// Builds the packages once per test binary: (.deb, .rpm).
fn packages() -> &'static (PathBuf, PathBuf) {
    static BUILT: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = target().join("package-test");
        // A target dir of its own: the `cargo test` running this holds the main one's lock.
        let listed = stdout(
            Command::new(find_bin("xtask"))
                .args(["package", "--out"])
                .arg(&out)
                .env("CARGO_TARGET_DIR", target().join("package-build")),
        );
        let find = |ext: &str| {
            listed
                .lines()
                .map(PathBuf::from)
                .find(|p| p.extension().is_some_and(|e| e == ext))
                .unwrap_or_else(|| panic!("no .{ext} in xtask package output:\n{listed}"))
        };
        (find("deb"), find("rpm"))
    })
}

/// What both packages must install.
const FILES: &[&str] = &[
    "/usr/sbin/jitgated",
    "/usr/bin/jitgate",
    "/etc/jitgate/jitgate.toml",
    "/usr/lib/systemd/system/jitgated.service",
    "/usr/lib/systemd/system/jitgate.slice",
    "/usr/lib/sysusers.d/jitgate.conf",
    "/usr/share/man/man8/jitgated.8.gz",
    "/usr/share/man/man1/jitgate.1.gz",
    "/usr/share/man/man1/jitgate-request.1.gz",
    "/usr/share/man/man1/jitgate-approve.1.gz",
    "/usr/share/bash-completion/completions/jitgate",
    "/usr/share/bash-completion/completions/jitgated",
    "/usr/share/fish/vendor_completions.d/jitgate.fish",
    "/usr/share/doc/jitgate/README.md",
    "/usr/share/doc/jitgate/CHANGELOG.md",
];

#[test]
fn packages_carry_binaries_units_config_docs_and_scripts() {
    jitgate_e2e::root_or_skip!();
    let (deb, rpm) = packages();

    let listing = stdout(Command::new("dpkg-deb").arg("-c").arg(deb));
    let deb_files: BTreeSet<String> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_owned())
        .collect();
    for f in FILES {
        assert!(
            deb_files.contains(*f),
            "{f} missing from the .deb:\n{listing}"
        );
    }
    let control = stdout(Command::new("dpkg-deb").arg("-I").arg(deb));
    assert!(control.contains("Package: jitgate"), "{control}");
    let unpacked = tempfile::tempdir().unwrap();
    sh(Command::new("dpkg-deb")
        .arg("-e")
        .arg(deb)
        .arg(unpacked.path()));
    let conffiles = std::fs::read_to_string(unpacked.path().join("conffiles")).unwrap();
    assert!(
        conffiles.contains("/etc/jitgate/jitgate.toml"),
        "{conffiles}"
    );
    for script in ["postinst", "prerm", "postrm"] {
        sh(Command::new("sh")
            .arg("-n")
            .arg(unpacked.path().join(script)));
    }

    let rpm_files: BTreeSet<String> = stdout(Command::new("rpm").arg("-qpl").arg(rpm))
        .lines()
        .map(str::to_owned)
        .collect();
    for f in FILES {
        assert!(
            rpm_files.contains(*f),
            "{f} missing from the .rpm: {rpm_files:#?}"
        );
    }
    let scripts = stdout(Command::new("rpm").args(["-qp", "--scripts"]).arg(rpm));
    for part in [
        "postinstall scriptlet",
        "preuninstall scriptlet",
        "postuninstall scriptlet",
        "systemd-sysusers jitgate.conf",
        "try-restart jitgated.service",
    ] {
        assert!(
            scripts.contains(part),
            "{part} not in the rpm scripts:\n{scripts}"
        );
    }
    let config = stdout(Command::new("rpm").arg("-qpc").arg(rpm));
    assert_eq!(config.trim(), "/etc/jitgate/jitgate.toml");

    // The shipped binaries accept the shipped config.
    let files = tempfile::tempdir().unwrap();
    sh(Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb)
        .arg(files.path()));
    let checked = stdout(
        Command::new(files.path().join("usr/sbin/jitgated"))
            .arg("--check-config")
            .arg(files.path().join("etc/jitgate/jitgate.toml")),
    );
    assert!(
        checked.contains("valid (0 workloads, 0 resources, 0 policies)"),
        "{checked}"
    );
    // The unit uses the socket group the sysusers file creates and the config names.
    let sysusers =
        std::fs::read_to_string(files.path().join("usr/lib/sysusers.d/jitgate.conf")).unwrap();
    assert!(sysusers.lines().any(|l| l.starts_with("g jitgate")));
    let config = std::fs::read_to_string(files.path().join("etc/jitgate/jitgate.toml")).unwrap();
    assert!(config.contains("socket_group = \"jitgate\""));
    assert!(config.contains("gate_cgroup = \"jitgate.slice\""));
}

/// A pristine minimal Debian root with systemd, made once and copied per use.
fn debian_root() -> PathBuf {
    let pristine = target().join("debootstrap-bookworm");
    if !pristine.join(".complete").exists() {
        let _ = std::fs::remove_dir_all(&pristine);
        let mirror = std::env::var("JITGATE_DEBIAN_MIRROR")
            .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
        sh(Command::new("debootstrap")
            .args([
                "--variant=minbase",
                "--include=systemd,systemd-sysv",
                "bookworm",
            ])
            .arg(&pristine)
            .arg(mirror));
        std::fs::write(pristine.join(".complete"), "").unwrap();
    }
    let work = target().join(format!("package-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    sh(Command::new("cp").arg("-a").arg(&pristine).arg(&work));
    work
}

fn in_root(root: &Path, args: &[&str]) -> Output {
    Command::new("chroot")
        .arg(root)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .expect("chroot")
}

fn ok_in_root(root: &Path, args: &[&str]) -> String {
    let out = in_root(root, args);
    assert!(
        out.status.success(),
        "{args:?} in the Debian root failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn deb_installs_upgrades_removes_and_purges_in_a_debian_root() {
    jitgate_e2e::root_or_skip!();
    let (deb, _) = packages();
    let root = debian_root();
    std::fs::copy(deb, root.join("tmp/jitgate.deb")).unwrap();

    // Install: scripts run (no systemd running in a chroot: enabled, not started).
    ok_in_root(&root, &["dpkg", "-i", "/tmp/jitgate.deb"]);
    for f in FILES {
        assert!(
            root.join(f.trim_start_matches('/')).exists(),
            "{f} not installed"
        );
    }
    let group = ok_in_root(&root, &["getent", "group", "jitgate"]);
    assert!(group.starts_with("jitgate:"), "{group}");
    let state = root.join("var/lib/jitgate");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&state).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700, "state_dir mode");
    assert!(
        root.join("etc/systemd/system/multi-user.target.wants/jitgated.service")
            .is_symlink(),
        "jitgated.service not enabled on install"
    );

    // The units as installed pass systemd's own checks.
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("--man=no")
        .args(["jitgated.service", "jitgate.slice"])
        .output()
        .unwrap();
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify:\n{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // Upgrade (reinstall over itself): state and an edited config survive.
    std::fs::write(state.join("marker"), "grants live here").unwrap();
    let config = root.join("etc/jitgate/jitgate.toml");
    let edited = format!(
        "{}\n# edited by the operator\n",
        std::fs::read_to_string(&config).unwrap()
    );
    std::fs::write(&config, &edited).unwrap();
    ok_in_root(
        &root,
        &["dpkg", "-i", "--force-confold", "/tmp/jitgate.deb"],
    );
    assert!(state.join("marker").exists(), "upgrade lost state");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);

    // Remove: binaries and units go; state and config stay; the unit is disabled.
    ok_in_root(&root, &["dpkg", "-r", "jitgate"]);
    assert!(!root.join("usr/sbin/jitgated").exists());
    assert!(
        !root
            .join("usr/lib/systemd/system/jitgated.service")
            .exists()
    );
    assert!(
        !root
            .join("etc/systemd/system/multi-user.target.wants/jitgated.service")
            .exists()
    );
    assert!(state.join("marker").exists(), "remove lost state");
    assert!(config.exists(), "remove lost the config");

    // Purge: state and config go.
    ok_in_root(&root, &["dpkg", "-P", "jitgate"]);
    assert!(!state.exists(), "purge kept /var/lib/jitgate");
    assert!(
        !root.join("etc/jitgate").exists(),
        "purge kept /etc/jitgate"
    );

    let _ = std::fs::remove_dir_all(&root);
}
