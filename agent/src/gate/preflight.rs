//! What the host must offer before the gate can close: each failure is one sentence naming
//! what is missing.

use std::{ffi::CString, path::Path};

use anyhow::{Context as _, bail};

use super::{bpf_sys, cgroup};

/// Oldest kernel with every hook and helper the programs use (`bpf_get_netns_cookie` in
/// `sock_ops`, map lookup-and-delete on hash maps, `cgroup.kill`).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// Fails with one clear sentence if the kernel is too old, cgroup v2 is absent or BPF is not
/// permitted. Returns the cgroup2 mount point.
pub fn check() -> anyhow::Result<std::path::PathBuf> {
    let release = nix::sys::utsname::uname()
        .context("uname")?
        .release()
        .to_string_lossy()
        .into_owned();
    match parse_kernel_release(&release) {
        Some(v) if v >= MIN_KERNEL => {}
        _ => bail!(
            "kernel {release} is too old: jitgate needs Linux {}.{} or newer",
            MIN_KERNEL.0,
            MIN_KERNEL.1
        ),
    }
    let mount = cgroup::cgroup2_mount()?;
    if let Err(e) = bpf_sys::probe_bpf() {
        bail!(
            "BPF is not permitted to this process ({e}): run jitgated as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"
        );
    }
    Ok(mount)
}

fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure `pin_dir` lives on a bpffs, mounting one at `/sys/fs/bpf` when the host did not.
pub fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let mut existing = pin_dir;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    if is_bpffs(existing) {
        return std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating {}", pin_dir.display()));
    }
    let default = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(default) {
        bail!(
            "bpf_pin_dir {} is not on a BPF filesystem: mount one there (mount -t bpf bpf DIR) or use a directory under /sys/fs/bpf",
            pin_dir.display()
        );
    }
    std::fs::create_dir_all(default).context("creating /sys/fs/bpf")?;
    let source = CString::new("bpf").expect("literal");
    nix::mount::mount(
        Some(source.as_c_str()),
        default,
        Some(source.as_c_str()),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("the BPF filesystem is not mounted and mounting it at /sys/fs/bpf failed")?;
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    std::fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases() {
        assert_eq!(parse_kernel_release("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_kernel_release("5.15.0-91-generic"), Some((5, 15)));
        assert!(parse_kernel_release("5.4.0").unwrap() < MIN_KERNEL);
        assert_eq!(parse_kernel_release("garbage"), None);
    }
}
