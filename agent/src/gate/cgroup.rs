//! cgroup v2 plumbing: finding the mount, the gate root, task cgroups, and which cgroup a
//! process is in.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};

/// Finds the cgroup2 mount point in `/proc/self/mountinfo` (it is `/sys/fs/cgroup` on most
/// hosts, `/sys/fs/cgroup/unified` on hybrid layouts).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    find_cgroup2_mount(&mountinfo).ok_or_else(|| {
        anyhow!(
            "cgroup v2 is not mounted: jitgate needs the unified cgroup hierarchy (mount -t cgroup2 none /sys/fs/cgroup)"
        )
    })
}

fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields: id parent major:minor root mount-point options ... - fstype source super-options
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mount_path(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// The cgroup id the kernel reports for a cgroup directory (`bpf_get_current_cgroup_id`):
/// its inode number on cgroup2.
pub fn cgroup_id(path: &Path) -> io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// The cgroup under `mount` whose id is `id`, if it still exists. Walks the hierarchy, so
/// only for rare events (an agent finding its gate root moved).
pub fn find_by_id(mount: &Path, id: u64) -> Option<PathBuf> {
    let mut stack = vec![(mount.to_path_buf(), 0u32)];
    while let Some((dir, depth)) = stack.pop() {
        if cgroup_id(&dir).is_ok_and(|ino| ino == id) {
            return Some(dir);
        }
        if depth >= 64 {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    None
}

/// The cgroup2 path (relative to the mount, without leading `/`) of process `pid`.
pub fn cgroup_of_pid(pid: u32) -> io::Result<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    parse_proc_cgroup(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("process {pid} has no cgroup v2 entry"),
        )
    })
}

fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|p| p.trim_start_matches('/').to_owned())
}

/// Creates `path` (and parents) if missing.
pub fn ensure_dir(path: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating cgroup {}", path.display()))
}

/// Moves process `pid` (all its threads) into the cgroup at `path`.
pub fn move_pid(path: &Path, pid: u32) -> anyhow::Result<()> {
    fs::write(path.join("cgroup.procs"), pid.to_string())
        .with_context(|| format!("moving process {pid} into {}", path.display()))
}

/// Whether any process remains in the cgroup at `path` or below it.
pub fn is_populated(path: &Path) -> io::Result<bool> {
    let events = fs::read_to_string(path.join("cgroup.events"))?;
    Ok(events.lines().any(|line| line.trim() == "populated 1"))
}

/// Removes an empty cgroup and, when `kill` is set and the kernel supports it, kills what is
/// left first (`cgroup.kill`, Linux 5.14+).
pub fn remove(path: &Path, kill: bool) -> anyhow::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if kill && is_populated(path).unwrap_or(false) {
        let _ = fs::write(path.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if !is_populated(path).unwrap_or(false) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    // Children first.
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove(&entry.path(), kill)?;
            }
        }
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => bail!("removing cgroup {}: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "25 20 0:22 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            find_cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            find_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
        assert_eq!(unescape_mount_path("/a\\040b"), "/a b");
    }

    #[test]
    fn parses_proc_cgroup() {
        assert_eq!(
            parse_proc_cgroup("9:name=systemd:/\n0::/jitgate.slice/ci-bot/t1\n"),
            Some("jitgate.slice/ci-bot/t1".into())
        );
        assert_eq!(parse_proc_cgroup("0::/\n"), Some(String::new()));
        assert_eq!(parse_proc_cgroup("4:memory:/x\n"), None);
    }
}
