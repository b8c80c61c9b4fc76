//! Establishes who is on the other end of a control connection, from the kernel alone.
//!
//! `SO_PEERCRED` gives the uid and pid at `connect()` time. The pid's cgroup says whether the
//! caller is a workload; to make sure the pid still names the same process when we read its
//! cgroup (and was not recycled), we hold a pidfd for it (`SO_PEERPIDFD`, or `pidfd_open` on
//! older kernels) and check the process is alive after reading. When anything is doubtful the
//! caller is treated as an unattributed process inside the gate: it gets no rights.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use tokio::net::UnixStream;

use crate::{
    gate::cgroup,
    identity::{self, Caller, Workloads},
};

const SO_PEERPIDFD: libc::c_int = 77;

fn peer_pidfd(stream: &UnixStream, pid: u32) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid socket, output buffer and length.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            std::ptr::from_mut(&mut fd).cast(),
            &mut len,
        )
    };
    if rc == 0 && fd >= 0 {
        // SAFETY: the kernel handed us a new pidfd.
        return Some(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    // Older kernels: open one now (the recycling window is back, narrowed to this call).
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: on success pidfd_open returned a new descriptor.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the pidfd's process still exists. EPERM also means it does: the host agent runs
/// without CAP_KILL, so it may not signal another user's process, but the kernel only says
/// so for a live one (a dead one is ESRCH).
fn alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: signal 0 only checks the process exists.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Identifies the caller on `stream`.
pub fn identify(stream: &UnixStream, workloads: &Workloads) -> std::io::Result<Caller> {
    let cred = stream.peer_cred()?;
    let uid = cred.uid();
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0);
    let user = identity::user_name(uid);
    let doubtful = || Caller {
        uid,
        pid,
        user: user.clone(),
        workload: None,
        gated_unattributed: true,
        person: None,
        token: None,
    };
    if pid == 0 {
        return Ok(doubtful());
    }
    let Some(pidfd) = peer_pidfd(stream, pid) else {
        return Ok(doubtful());
    };
    let Ok(path) = cgroup::cgroup_of_pid(pid) else {
        return Ok(doubtful());
    };
    if !alive(&pidfd) {
        return Ok(doubtful());
    }
    let (workload, gated_unattributed) = if workloads.is_gated_path(&path) {
        let workload = workloads.attribute_path(&path);
        let unattributed = workload.is_none();
        (workload, unattributed)
    } else {
        (workloads.attribute_uid(uid), false)
    };
    Ok(Caller {
        uid,
        pid,
        user,
        workload,
        gated_unattributed,
        person: None,
        token: None,
    })
}
