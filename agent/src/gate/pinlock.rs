//! One host agent per pin directory. Two agents on one `bpf_pin_dir` share its maps, so the
//! second would rewrite the first one's destination rules and egress (opening its gate) and
//! swap its programs; a lock on the directory, held for the agent's lifetime, prevents that.
//!
//! The lock is `flock(2)` on the directory itself: it needs no file on bpffs (which holds only
//! BPF objects), the kernel releases it when the holder dies however it dies, and
//! `/proc/locks` names the holder for the error message.

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

use anyhow::{Context as _, bail};

/// The held lock; dropping it (or the agent exiting) releases it.
#[derive(Debug)]
pub struct PinLock {
    _dir: File,
}

/// Takes the pin directory for this agent, or says which live agent holds it.
pub fn acquire(pin_dir: &Path) -> anyhow::Result<PinLock> {
    let dir = File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
    if try_lock(&dir) {
        return Ok(PinLock { _dir: dir });
    }
    let who = holder(pin_dir).map_or_else(|| "another process".to_owned(), |h| h.to_string());
    bail!(
        "{who} holds the pin directory {dir}: two agents on one pin directory share its kernel maps, and this one would rewrite the other's rules. Give this agent its own bpf_pin_dir, or stop the other agent first",
        dir = pin_dir.display()
    )
}

fn try_lock(dir: &File) -> bool {
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// A live process holding a pin directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// Its command line, for people.
    pub command: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {})", self.command, self.pid)
    }
}

/// The live agent holding `pin_dir`, if any. `None` also when the directory does not exist.
pub fn holder(pin_dir: &Path) -> Option<Holder> {
    let meta = std::fs::metadata(pin_dir).ok()?;
    let dir = File::open(pin_dir).ok()?;
    if try_lock(&dir) {
        return None;
    }
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let pid = find_holder(&locks, meta.dev(), meta.ino());
    Some(Holder {
        pid: pid.unwrap_or(0),
        command: pid
            .and_then(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
            .map(|raw| {
                raw.split(|b| *b == 0)
                    .filter(|part| !part.is_empty())
                    .map(|part| String::from_utf8_lossy(part).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "a jitgated".to_owned()),
    })
}

/// The pid of the `FLOCK` on inode `ino` of device `dev` in `/proc/locks` text.
fn find_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 28536 00:28:677187 0 EOF"
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let pid: u32 = fields.get(4)?.parse().ok()?;
        let mut id = fields.get(5)?.split(':');
        let maj = u32::from_str_radix(id.next()?, 16).ok()?;
        let min = u32::from_str_radix(id.next()?, 16).ok()?;
        let inode: u64 = id.next()?.parse().ok()?;
        (maj == major && min == minor && inode == ino).then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_found_by_device_and_inode() {
        let locks = "1: POSIX  ADVISORY  WRITE 700 00:28:677187 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 812 00:1a:99 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 913 00:28:677187 0 EOF\n";
        let dev = libc::makedev(0, 0x28);
        assert_eq!(find_holder(locks, dev, 677_187), Some(913));
        assert_eq!(find_holder(locks, dev, 99), None);
        assert_eq!(find_holder(locks, libc::makedev(0, 0x1a), 99), Some(812));
    }

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_and_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = acquire(dir.path()).expect("first lock");
        let err = acquire(dir.path()).expect_err("second lock must fail");
        let text = format!("{err:#}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert!(text.contains("bpf_pin_dir"), "{text}");
        assert_eq!(holder(dir.path()).map(|h| h.pid), Some(std::process::id()));
        drop(first);
        assert_eq!(holder(dir.path()), None);
        acquire(dir.path()).expect("lock after release");
    }
}
